"""Checkpoints that are either complete or absent, the state needed to continue a run exactly, and loading them
without running code.

A checkpoint is written into ``checkpoint-N.tmp-PID`` and renamed to ``checkpoint-N`` once every file is on disk
(``state.json`` last). Old checkpoints are pruned by renaming them to ``checkpoint-N.tmp-pruned`` first, so a kill in
the middle of a deletion never leaves a half-deleted folder that looks complete. Folders named ``.tmp-`` are never
taken for checkpoints and are removed by the next run. Contents:

- ``adapter/`` (PEFT safetensors) or ``trainable.safetensors`` (full / freeze: the trained weights only)
- ``optimizer.pt``, ``scheduler.pt``: tensors and plain values only
- ``rng.pt``: python, numpy, torch and CUDA generator states of every process, as tensors and plain values
- ``state.json``: position (epoch, step within the epoch, global step), running log sums, and the fingerprint of
  every setting the result depends on (``train.fingerprint``)

The ``.pt`` files are read with ``torch.load(weights_only=True)``: a file that holds anything but tensors and plain
values (a pickle that would run code) is refused with a CheckpointError before any of it is executed. A checkpoint
whose files are missing, empty or unreadable is a DamagedCheckpoint: the trainer renames it ``checkpoint-N.damaged``
and falls back to the one before.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from zhiling.errors import CheckpointError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint folder whose files are missing, empty or unreadable (the run falls back to an older one)."""


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
    """Checkpoint folders under ``root`` (named ``checkpoint-N`` and holding a state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_partial(root: str | Path) -> list[Path]:
    """Delete folders left by saves or prunings that were interrupted (``checkpoint-N.tmp-*``)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("checkpoint-") and ".tmp-" in child.name:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def read_state(checkpoint: str | Path) -> TrainState:
    """The state.json of a checkpoint; DamagedCheckpoint when it is missing, empty or not a state."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise DamagedCheckpoint(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}); "
                                f"point training.resume at a checkpoint-N folder under OUTPUT/checkpoints")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        state = TrainState.from_json(data)
        if not isinstance(state.step, int) or not isinstance(state.fingerprint, dict):
            raise TypeError("no step number or fingerprint")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise DamagedCheckpoint(f"{path}: unreadable checkpoint state ({exc or 'empty file'})") from None
    match = CHECKPOINT_RE.match(Path(checkpoint).name)
    if match and int(match.group(1)) != state.step:
        raise DamagedCheckpoint(f"{path}: says step {state.step}, but the folder is {Path(checkpoint).name}")
    return state


def check_complete(checkpoint: Path, sharded: bool, is_adapter: bool) -> None:
    """DamagedCheckpoint unless every file a resume reads is present and not empty."""
    if sharded:
        needed = ["engine", "scheduler.pt", "rng.pt"]
    else:
        weights = "adapter/adapter_model.safetensors" if is_adapter else "trainable.safetensors"
        needed = [weights, *TORCH_FILES]
    for name in needed:
        path = checkpoint / name
        if not path.exists() or (path.is_file() and path.stat().st_size == 0):
            raise DamagedCheckpoint(f"{checkpoint}: {name} is {'empty' if path.exists() else 'missing'}")


# ----- loading without pickle ----------------------------------------------------------------------------------------
def load_torch(path: Path, map_location=None):
    """``torch.load(weights_only=True)``: tensors and plain values only. A file that asks for anything else (a
    pickle that would run code) is a CheckpointError; a truncated or unreadable one is a DamagedCheckpoint."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(f"{path}: refused to load: the file asks to create Python objects other than "
                                  f"tensors and plain values (a pickle that could run code). zhiling's own "
                                  f"checkpoints never need that; a file changed or made elsewhere is not "
                                  f"loaded") from None
        raise DamagedCheckpoint(f"{path}: unreadable ({exc})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in first:
            raise  # not a damaged file: a bug to see with its traceback
        raise DamagedCheckpoint(f"{path}: unreadable ({first})") from None


def load_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file, on the CPU (loading them into the model copies them to its device)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise DamagedCheckpoint(f"{path}: unreadable ({exc})") from None


def check_fit(path: Path, weights: dict, expected: dict[str, tuple], hint: str) -> None:
    """CheckpointError naming the first tensor whose name or shape differs between a checkpoint and the model."""
    missing = [name for name in expected if name not in weights]
    extra = [name for name in weights if name not in expected]
    wrong = [(name, tuple(weights[name].shape), tuple(expected[name])) for name in expected
             if name in weights and tuple(weights[name].shape) != tuple(expected[name])]
    problems = []
    if wrong:
        name, saved, here = wrong[0]
        problems.append(f"{name} has shape {list(saved)} in the checkpoint and {list(here)} in this model"
                        + (f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""))
    if missing:
        problems.append(f"the checkpoint lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                   else ""))
    if extra:
        problems.append(f"the model has no {extra[0]}" + (f" (nor {len(extra) - 1} more)" if len(extra) > 1 else ""))
    if problems:
        raise CheckpointError(f"{path}: does not fit this model: {'; '.join(problems)}. {hint}")


# ----- RNG states ----------------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Every generator's state as tensors and plain values (loadable with ``weights_only=True``)."""
    import numpy as np
    import torch

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- writing -------------------------------------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (where the platform can open folders)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _retire(folder: Path, suffix: str) -> Path:
    """Rename ``folder`` to a ``.tmp-`` name: atomic, so it stops being a checkpoint at once (deleted next)."""
    doomed = folder.with_name(f"{folder.name}.tmp-{suffix}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder, doomed)
    return doomed


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to ``checkpoint-N.damaged`` (kept for inspection, never resumed or pruned)."""
    target, number = folder.with_name(f"{folder.name}.damaged"), 1
    while target.exists():
        number += 1
        target = folder.with_name(f"{folder.name}.damaged-{number}")
    os.rename(folder, target)
    return target


def prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; older ones are deleted. Checkpoints after ``step`` (left
    by a run that went further before it was resumed from an earlier one) are replaced when the run reaches them."""
    older = [path for number, path in list_checkpoints(root) if number < step]
    for path in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(_retire(path, "pruned"), ignore_errors=True)
    _fsync_dir(root)


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
    replaced = _retire(final, "replaced") if final.exists() else None  # left by a run resumed from before it
    os.rename(tmp, final)
    _fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    prune(root, state.step, keep)
    return final
