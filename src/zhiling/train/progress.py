"""What a training run shows: a rich progress bar (step, loss, tokens/s, ETA) and one summary at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainProgress:
    """A progress bar on stderr; a no-op when ``enabled`` is false (other ranks, quiet runs)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, description: str = "training",
                 unit: str | None = None):
        """``unit`` (e.g. "rows"): a plain counting bar without the loss and tokens/s columns."""
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        fields = [TextColumn(unit)] if unit else [TextColumn("loss {task.fields[loss]}"),
                                                  TextColumn("{task.fields[rate]} tok/s")]
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *fields,
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task(description, total=total_steps, completed=start_step, loss="-", rate="-")
        self.bar.start()

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.bar is None:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            fields["rate"] = f"{tokens_per_s:,.0f}"
        self.bar.update(self.task, completed=step, **fields)

    def print(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@dataclass
class RateMeter:
    """Tokens per second since the last reading."""

    tokens: int = 0
    started: float = 0.0

    def __post_init__(self):
        self.started = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> float:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.tokens / elapsed
        self.tokens, self.started = 0, time.perf_counter()
        return rate


def summary_lines(result) -> list[tuple[str, str]]:
    """(label, value) rows of the end-of-run summary."""
    rows = [("time", format_seconds(result.train_seconds)),
            ("steps", f"{result.steps:,}"),
            ("tokens", f"{result.tokens:,} ({result.label_tokens:,} trained)")]
    if result.final_loss is not None:
        rows.append(("final train loss", f"{result.final_loss:.4f}"))
    if result.final_eval_loss is not None:
        rows.append(("final eval loss", f"{result.final_eval_loss:.4f}"))
    if result.best_eval_loss is not None:
        rows.append(("best eval loss", f"{result.best_eval_loss:.4f}"))
    rows.append(("adapter" if result.is_adapter else "model", str(result.final_dir)))
    rows.append(("metrics", f"{result.output_dir / 'metrics.jsonl'}, {result.output_dir / 'loss.png'}"))
    rows.append(("chat with it", result.chat_command))
    return rows


def print_summary(result, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    title = "training finished" if not result.skipped else "already finished (nothing to do)"
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in summary_lines(result):
        table.add_row(label, value)
    console.print(table)
