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

from zhiling.data.templates import save_template_record
from zhiling.errors import ZhilingError
from zhiling.train.runlock import LOCK_FILE

RUN_FILE = "zhiling.json"
RUN_ENTRIES = ("adapter", "model", "checkpoints", "metrics.jsonl", "loss.png", "runs", RUN_FILE)


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


def clear_run(folder: Path, extra: list[str] = ()) -> None:
    """Remove what a run wrote (and nothing else) from ``folder``."""
    for name in [*RUN_ENTRIES, *extra]:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def claim_output_dir(folder: str | Path, identity: dict, overwrite: bool, resume: bool | str,
                     check_only: bool = False) -> OutputState:
    """Check that ``folder`` is empty or holds this same run; refuse another run's folder unless ``overwrite``.

    ``identity`` names the run (model, method, ...). ``resume: false`` starts this run over in its own folder.
    ``check_only`` (dry runs) makes the same checks and deletes nothing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ZhilingError(f"output.dir {folder} is a file, not a folder")
    if not folder.exists() or not any(p.name != LOCK_FILE for p in folder.iterdir()):
        return OutputState(None, True)
    record = read_record(folder)
    stage_names = [stage.get("name") for stage in (record or {}).get("stages", []) if stage.get("name")]
    if record is None:
        if overwrite:
            if not check_only:
                clear_run(folder)
            return OutputState(None, True)
        entries = ", ".join(sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)[:5])
        raise ZhilingError(f"output.dir {folder} is not empty ({entries}) and holds no zhiling run; choose another "
                           f"output.dir (or set output.overwrite=true to write into it anyway)")
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
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def chat_command(model_origin: str | None, final_dir: Path, is_adapter: bool) -> str:
    """The exact command that chats with the result."""
    import shlex

    if not is_adapter:
        return f"zhiling chat --model {shlex.quote(str(final_dir))}"
    model = model_origin or "default"
    return f"zhiling chat --model {shlex.quote(model)} --adapter {shlex.quote(str(final_dir))}"
