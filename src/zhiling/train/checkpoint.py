"""Checkpoints that are either complete or absent, and the state needed to continue a run exactly.

A checkpoint is written into ``checkpoint-N.tmp-PID`` and renamed to ``checkpoint-N`` once every file is on disk
(``state.json`` last). A process killed mid-save leaves only a ``.tmp-`` folder, which is never taken for a checkpoint
and is removed by the next run. Contents:

- ``adapter/`` (PEFT format) or ``trainable.safetensors`` (full / freeze: the trained weights only)
- ``optimizer.pt``, ``scheduler.pt``
- ``rng.pt``: python, numpy, torch and CUDA generator states of every process
- ``state.json``: position (epoch, step within the epoch, global step), running log sums, and the fingerprint of
  everything that must not change on resume (batch size, accumulation, processes, data, packing, cutoff, seed).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from zhiling.errors import ZhilingError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where a run is: ``step`` optimizer steps done, ``epoch`` and ``step_in_epoch`` locate the next micro-batches."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0  # useful (non-padding) tokens trained on, all processes
    label_tokens: int = 0
    train_seconds: float = 0.0
    log_loss_sum: float = 0.0  # losses of the steps since the last log line
    log_steps: int = 0
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    fingerprint: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainState":
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**known)


# ----- finding checkpoints -------------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: str | Path) -> list[Path]:
    """Delete folders left by saves that were interrupted (``checkpoint-N.tmp-*``)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("checkpoint-") and ".tmp-" in child.name:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def read_state(checkpoint: str | Path) -> TrainState:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise ZhilingError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}); "
                           f"point training.resume at a checkpoint-N folder under OUTPUT/checkpoints")
    try:
        return TrainState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ZhilingError(f"{path}: unreadable checkpoint state ({exc})") from None


# ----- fingerprint ---------------------------------------------------------------------------------------------------
FINGERPRINT_NAMES = {
    "per_device_batch_size": "training.per_device_batch_size", "gradient_accumulation_steps":
    "training.gradient_accumulation_steps", "processes": "the number of processes", "data": "the training data",
    "packing": "training.packing", "packing_tokens": "the packing length", "cutoff_len": "data.cutoff_len",
    "seed": "training.seed", "method": "training.method", "group_by_length": "training.group_by_length",
}


def fingerprint_changes(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between the fingerprint in a checkpoint and the current run's."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            name = FINGERPRINT_NAMES.get(key, key)
            if key == "data":
                changes.append(f"{name} changed (different files, datasets, template, tokenizer or validation split)")
            else:
                changes.append(f"{name} changed from {saved.get(key)!r} to {current.get(key)!r}")
    return changes


# ----- RNG states ----------------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- writing -------------------------------------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_checkpoint(root: str | Path, state: TrainState, write_files: Callable[[Path], None],
                     keep: int) -> Path:
    """Write a checkpoint atomically: ``write_files(tmp)`` fills a temporary folder, ``state.json`` goes in last,
    then the folder is renamed into place and checkpoints beyond the newest ``keep`` are deleted."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f"checkpoint-{state.step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
