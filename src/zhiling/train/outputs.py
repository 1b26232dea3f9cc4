"""The output folder of a run: who owns it, what a finished run leaves there, and the run record (zhiling.json).

Layout: ``adapter/`` (PEFT) or ``model/`` (full / freeze), each with the tokenizer (its chat template set to the
training template) and ``zhiling_template.json``; ``zhiling.json``; ``metrics.jsonl``; ``loss.png``;
``checkpoints/``. ``zhiling.json`` is written when a run starts (``status: running``) and again when it ends, so a
folder always says which run it belongs to.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from zhiling.config import ZhilingConfig
from zhiling.config.output import RUN_ENTRIES, RUN_FILE
from zhiling.config.training import stage_name_problem
from zhiling.data.templates import save_template_record
from zhiling.errors import ZhilingError
from zhiling.owned import Mark, NotOwnedError, check_replaceable, record_file, remove_owned
from zhiling.train.runlock import LOCK_FILE


def model_id(cfg: ZhilingConfig, source) -> str:
    """How the run names its base model (local paths made absolute, so the chat command works from anywhere)."""
    name = cfg.model.name_or_path
    if not name or name == "default":
        return "default"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


@dataclass
class OutputState:
    """What the folder held when the run started."""

    record: dict | None  # the previous zhiling.json, if any
    fresh: bool  # nothing of a previous run is kept


def read_record(folder: str | Path) -> dict | None:
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ZhilingError(f"{path}: not a valid run record ({exc}); remove it or choose another output.dir") from None


def write_record(folder: str | Path, record: dict) -> None:
    """Write zhiling.json atomically (temporary file, then rename)."""
    path = Path(folder) / RUN_FILE
    tmp = path.with_name(f".{RUN_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _describe_identity(identity: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in identity.items())


def _beside_record(path: Path) -> bool:
    return (path.parent / RUN_FILE).is_file()


# an entry of the run layout is zhiling's when the folder holds a run record; a stage folder when it holds its own
_RUN_ENTRY = Mark(_beside_record, f"no {RUN_FILE} beside it")
_STAGE_DIR = record_file(RUN_FILE)


def _stage_names(folder: Path, record: dict) -> list[str]:
    """The stage folders a staged run's record names, each checked to be a plain name (never a path)."""
    stages = record.get("stages", [])
    if not isinstance(stages, list):
        raise NotOwnedError(f"{folder / RUN_FILE}: 'stages' is not a list; zhiling will not delete what it names")
    names = []
    for index, stage in enumerate(stages):
        name = stage.get("name") if isinstance(stage, dict) else None
        if name is None:
            continue
        problem = stage_name_problem(name)
        if problem:
            raise NotOwnedError(f"{folder / RUN_FILE}: stages[{index}].name {name!r} is not a stage folder name "
                                f"({problem}); zhiling will not delete what it names. Choose another output.dir")
        names.append(name)
    return names


def _run_paths(folder: Path, stage_names: list[str] = ()) -> list[Path]:
    """What clearing the run in ``folder`` deletes, in order, every path checked (nothing is deleted here): the runs
    inside the stage folders, then the run layout's entries, each folder's run record last (it is what marks the
    rest as zhiling's)."""
    paths = []
    for stage_dir in (folder / name for name in stage_names):
        check_replaceable(stage_dir, _STAGE_DIR, what="stage folder", flag="output.overwrite")
        if (stage_dir / RUN_FILE).is_file():
            paths += _run_paths(stage_dir)
    entries = [folder / name for name in RUN_ENTRIES if name != RUN_FILE] + [folder / RUN_FILE]
    for path in entries:
        check_replaceable(path, _RUN_ENTRY, what="output.dir entry", flag="output.overwrite")
    return paths + entries


def clear_run(folder: Path, stage_names: list[str] = ()) -> None:
    """Remove what a run wrote (and nothing else) from ``folder``, which holds its run record: the run layout's
    entries, and for each stage of a staged run the run inside OUTPUT/STAGE (that folder too once it is empty).
    Everything is checked before anything is deleted."""
    for path in _run_paths(folder, stage_names):
        remove_owned(path, _RUN_ENTRY, what="output.dir entry", flag="output.overwrite")
    for stage_dir in (folder / name for name in stage_names):
        if stage_dir.is_dir() and not stage_dir.is_symlink() and not any(stage_dir.iterdir()):
            stage_dir.rmdir()


def _in_the_way(folder: Path) -> list[str]:
    return [name for name in RUN_ENTRIES if (folder / name).exists() or (folder / name).is_symlink()]


def claim_output_dir(folder: str | Path, identity: dict, overwrite: bool, resume: bool | str,
                     check_only: bool = False) -> OutputState:
    """Check that ``folder`` is empty or holds this same run; refuse another run's folder unless ``overwrite``.

    ``identity`` names the run (model, method, ...). ``resume: false`` starts this run over in its own folder.
    ``overwrite`` replaces another zhiling run (only what it wrote); in a folder without a run record it lets the run
    write beside the files there, and refuses (``NotOwnedError``) when one of them has a name the run writes.
    ``check_only`` (dry runs) makes the same checks and deletes nothing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ZhilingError(f"output.dir {folder} is a file, not a folder")
    present = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.exists() else []
    if not present:  # absent, empty, or only the run lock this run holds
        return OutputState(None, True)
    record = read_record(folder)
    if record is None:
        entries = ", ".join(present[:5])
        if not overwrite:
            raise ZhilingError(f"output.dir {folder} is not empty ({entries}) and holds no zhiling run; choose "
                               f"another output.dir (or set output.overwrite=true to write beside those files)")
        clash = _in_the_way(folder)
        if clash:
            raise NotOwnedError(f"output.dir {folder} holds no zhiling run ({RUN_FILE}), so its "
                                f"{', '.join(clash)} are not zhiling's and output.overwrite will not delete them; "
                                f"move them away or choose another output.dir")
        return OutputState(None, True)
    if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
        raise NotOwnedError(f"{folder / RUN_FILE} is not a zhiling run record (no 'identity'); zhiling will not "
                            f"replace this folder. Choose another output.dir")
    stage_names = _stage_names(folder, record)
    if record.get("identity") != identity:
        if overwrite:
            if not check_only:
                clear_run(folder, stage_names)
            return OutputState(None, True)
        raise ZhilingError(f"output.dir {folder} holds another run ({_describe_identity(record.get('identity', {}))}"
                           f"); this run is {_describe_identity(identity)}. Choose another output.dir, or set "
                           f"output.overwrite=true to replace it")
    if resume is False:
        if not check_only:
            clear_run(folder, stage_names)
        return OutputState(record, True)
    return OutputState(record, False)


def versions() -> dict:
    import importlib.metadata as metadata

    out = {"python": platform.python_version()}
    for name in ("zhiling", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def save_final(model, tokenizer, template, folder: Path, is_adapter: bool) -> Path:
    """Write ``adapter/`` (PEFT) or ``model/`` (full weights) with the tokenizer and template, atomically."""
    final = folder / ("adapter" if is_adapter else "model")
    tmp = folder / f".{final.name}.tmp"  # one writer per folder (the run lock): a killed save's is replaced here
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    template.apply_to_tokenizer(tokenizer)
    tokenizer.save_pretrained(str(tmp))
    save_template_record(template, tmp)
    remove_owned(final, _RUN_ENTRY, what="output.dir entry", flag=None)
    os.rename(tmp, final)
    return final


def chat_command(model_origin: str | None, final_dir: Path, is_adapter: bool) -> str:
    """The exact command that chats with the result."""
    import shlex

    if not is_adapter:
        return f"zhiling chat --model {shlex.quote(str(final_dir))}"
    model = model_origin or "default"
    return f"zhiling chat --model {shlex.quote(model)} --adapter {shlex.quote(str(final_dir))}"
