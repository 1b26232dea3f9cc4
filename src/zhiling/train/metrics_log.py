"""OUTPUT/metrics.jsonl (one JSON object per log line), the loss plot, and optional TensorBoard / wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path

from zhiling.errors import ZhilingError


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is re-logged by the resumed run
    return rows


class MetricsLog:
    """Appends records to metrics.jsonl (flushed per line) and forwards them to the trackers."""

    def __init__(self, path: str | Path, trackers: "Trackers | None" = None):
        self.path = Path(path)
        self.trackers = trackers

    def keep_until(self, step: int) -> None:
        """On resume: drop records after ``step`` (the resumed run logs them again, identically)."""
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    def log(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "training loss") -> Path | None:
    """Train loss (and eval loss where present) against steps; None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    train = [(row["step"], row["loss"]) for row in rows if "loss" in row and math.isfinite(row["loss"])]
    evals = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axis.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        axis.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path


def check_trackers(names: list[str]) -> None:
    """Fail before training when a requested tracker is not installed."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        if importlib.util.find_spec(modules[name]) is None:
            raise ZhilingError(f"training.report_to includes {name}, which is not installed: pip install {name}")


class Trackers:
    """TensorBoard and / or wandb, only when asked for in ``training.report_to``; missing packages fail early."""

    def __init__(self, names: list[str], log_dir: Path, run_name: str, config: dict):
        self.writers = []
        self.wandb = None
        for name in names:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise ZhilingError("training.report_to includes tensorboard, which is not installed: "
                                       "pip install tensorboard") from exc
                self.writers.append(SummaryWriter(log_dir=str(log_dir / "runs")))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError as exc:
                    raise ZhilingError("training.report_to includes wandb, which is not installed: "
                                       "pip install wandb") from exc
                self.wandb = wandb.init(project="zhiling", name=run_name, config=config, resume="allow")

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        values = {key: value for key, value in record.items() if isinstance(value, (int, float)) and key != "step"}
        for writer in self.writers:
            for key, value in values.items():
                writer.add_scalar(f"train/{key}" if not key.startswith("eval") else key, value, step)
            writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()
