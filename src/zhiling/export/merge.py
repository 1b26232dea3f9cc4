"""Base model + LoRA adapter -> one merged safetensors folder that plain transformers (and vLLM) loads.

The folder carries everything inference needs: sharded weights, the tokenizer with the training template written
as its chat template, ``zhiling_template.json`` (so zhiling itself reads the template back), and a
``generation_config.json`` whose EOS ids are the template's stop tokens (so ``model.generate`` stops where the
training answers ended).

A QLoRA adapter is merged into the full-precision base: the base is always loaded unquantized (float32 while
merging), the adapter applied, and the low-rank product added into the weights. The merged model therefore
differs from the 4-bit training model only by the base's quantization error, not by the adapter's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from zhiling.config import ModelConfig
from zhiling.data.templates import save_template_record
from zhiling.errors import ZhilingError
from zhiling.models.chat_setup import resolve_chat_setup
from zhiling.models.loader import ModelSource, load_model, resolve_source
from zhiling.owned import check_replaceable, record_file, remove_owned

console = Console(stderr=True)

OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
MERGE_RECORD = "zhiling_merge.json"


@dataclass(frozen=True)
class MergeResult:
    folder: Path
    template: object  # Template | TokenizerTemplate
    template_origin: str
    dtype: str


MERGED_FOLDER = record_file(MERGE_RECORD)  # a folder merge / export --format hf wrote


def model_inputs(model_cfg: ModelConfig, adapter: str | Path | None, source: ModelSource | None = None) -> dict:
    """The paths a merge or export reads (an output may not be, hold or lie inside one)."""
    inputs = {"the base model": model_cfg.name_or_path, "the adapter": adapter}
    if source is not None and source.kind != "hub":
        inputs["the base model's folder"] = source.path
    return inputs


def check_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: dict | None = None) -> Path:
    """Refuse a file in the way, an output that is or holds an input, a non-empty folder that merge / export did not
    write (``NotOwnedError``), and one it did write unless ``overwrite``."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ZhilingError(f"output: {out} exists and is not a folder")
    return check_replaceable(out, MERGED_FOLDER, inputs=inputs, what="output: folder", overwrite=overwrite)


def check_adapter_dir(adapter: str | Path) -> Path:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ZhilingError(f"adapter: folder not found: {adapter}")
    if not (path / "adapter_config.json").is_file():
        hint = (" (it looks like a merged model: pass it as --model)" if (path / "config.json").is_file() else "")
        raise ZhilingError(f"adapter: {adapter} has no adapter_config.json{hint}")
    return path


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ZhilingError(f"shard size: '{text}' is not a size such as 2GB, 500MB or 1.5GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ZhilingError(f"shard size: '{text}' must be more than 0 bytes")
    return size


def stored_dtype(source: ModelSource, cfg: ModelConfig) -> str:
    """The dtype the base checkpoint is stored in (config ``dtype`` / ``torch_dtype``), float32 when unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=cfg.trust_remote_code,
                                            revision=cfg.revision if source.kind == "hub" else None)
    except (OSError, ValueError):
        return "float32"
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else ""
    return name if name in OUTPUT_DTYPES[1:] else "float32"


def write_model_folder(model_cfg: ModelConfig, out_dir: str | Path, *, adapter: str | Path | None = None,
                       template: str | None = None, system: str | None = None, dtype: str = "auto",
                       shard_size: str = "2GB", overwrite: bool = False) -> MergeResult:
    """Load the base (+ ``adapter``, merged), write weights, tokenizer, chat template and records to ``out_dir``.

    The folder is written aside and renamed into place, so a killed run never leaves a half folder that looks
    complete."""
    import torch

    if dtype not in OUTPUT_DTYPES:
        raise ZhilingError(f"dtype: '{dtype}' is not one of {', '.join(OUTPUT_DTYPES)}")
    shard_bytes = parse_size(shard_size)
    out = check_output_dir(out_dir, overwrite, model_inputs(model_cfg, adapter))
    adapter_dir = check_adapter_dir(adapter) if adapter is not None else None
    source = resolve_source(model_cfg)
    inputs = model_inputs(model_cfg, adapter_dir, source)
    check_output_dir(out, overwrite, inputs)
    target = stored_dtype(source, model_cfg) if dtype == "auto" else dtype

    # the adapter's own tokenizer when training saved one (it may have added tokens), else the base's
    setup = resolve_chat_setup(model_cfg, template, adapter=adapter_dir, system=system, source=source)
    tokenizer, chosen, origin = setup.tokenizer, setup.template, setup.template_origin

    merge_cfg = model_cfg.model_copy(update={"dtype": "float32",
                                             "device": "cpu" if model_cfg.device == "auto" else model_cfg.device})
    with console.status(f"Loading {source.origin}" + (f" + adapter {adapter_dir}" if adapter_dir else "")):
        model = load_model(merge_cfg, None, adapter=str(adapter_dir) if adapter_dir else None, source=source)
    if adapter_dir is not None:
        with console.status("Merging the adapter into the weights"):
            model = model.merge_and_unload()
    model = model.to(getattr(torch, target))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ZhilingError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                           f"{model.get_input_embeddings().weight.shape[0]} rows; the adapter's tokenizer does not "
                           f"belong to this base model")

    chosen.apply_to_tokenizer(tokenizer)
    stop_ids = chosen.stop_token_ids(tokenizer)
    if stop_ids:
        model.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "quantization_config", None) is not None:  # never claim a quantization we undid
        delattr(model.config, "quantization_config")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with console.status(f"Writing {out} ({target}, shards of at most {shard_size})"):
        model.save_pretrained(str(tmp), max_shard_size=shard_bytes)
        tokenizer.save_pretrained(str(tmp))
        save_template_record(chosen, tmp)
        record = {"base_model": source.origin, "adapter": str(adapter_dir) if adapter_dir else None,
                  "dtype": target, "template": getattr(chosen, "name", None), "template_origin": origin,
                  "stop_token_ids": stop_ids}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    remove_owned(out, MERGED_FOLDER, inputs=inputs, what="output: folder")
    tmp.rename(out)
    return MergeResult(out, chosen, origin, target)


def merge_adapter(model_cfg: ModelConfig, adapter: str | Path, out_dir: str | Path, **kwargs) -> MergeResult:
    """``zhiling merge``: base + adapter -> merged folder (see ``write_model_folder`` for the options)."""
    return write_model_folder(model_cfg, out_dir, adapter=adapter, **kwargs)
