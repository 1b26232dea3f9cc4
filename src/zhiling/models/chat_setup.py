"""The one resolver of "tokenizer → model type → template" for a model, used by every entry point.

Training, dry run, data preview, chat/predict/serve, scoring, merge and GGUF export all ask the same question: which
tokenizer and which prompt template does this model (with this adapter) use? Answering it in one place keeps the
tokens a preview shows identical to the tokens training trains on, and the prompt inference builds identical to the
prompt training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhiling.config import ModelConfig
from zhiling.data.templates import resolve_template
from zhiling.models.loader import ModelSource, load_tokenizer, model_type_of, resolve_source

# The file whose presence means training saved a tokenizer beside the adapter (it may carry added tokens or the
# template written into its chat template). A stray tokenizer.json or tokenizer.model alone is not one: without
# tokenizer_config.json, transformers loads it without its special tokens (no EOS, no pad).
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class ChatSetup:
    """What a model is talked to with: its resolved source, tokenizer, config model type and template."""

    source: ModelSource
    tokenizer: Any
    model_type: str | None
    template: Any  # a data.templates Template or TokenizerTemplate
    template_origin: str  # where the template came from, for the user ("template 'gemma' recorded with the adapter")


def adapter_has_tokenizer(adapter: str | Path | None) -> bool:
    return adapter is not None and (Path(adapter) / TOKENIZER_CONFIG).is_file()


def resolve_chat_setup(model_cfg: ModelConfig, template: str | None = None, *, adapter: str | Path | None = None,
                       system: str | None = None, source: ModelSource | None = None) -> ChatSetup:
    """Tokenizer, model type and template for ``model_cfg`` (+ ``adapter``).

    The tokenizer is the adapter's own when training saved one beside it, else the model's. The template is
    ``template`` when named; else the one recorded with the adapter, then with a local model folder (a merged model);
    else the model's own chat template or its family default (``data.templates.resolve_template``). ``system``
    replaces the chosen template's default system prompt. ``trust_remote_code`` and ``revision`` come from
    ``model_cfg`` for every load (the revision applies to a hub model only). ``source`` skips resolving the model
    again when the caller already has it."""
    source = source or resolve_source(model_cfg)
    if adapter_has_tokenizer(adapter):
        tokenizer = load_tokenizer(model_cfg, ModelSource(str(adapter), "folder", str(adapter)))
    else:
        tokenizer = load_tokenizer(model_cfg, source)
    model_type = model_type_of(source, model_cfg.trust_remote_code, model_cfg.revision)
    model_dir = source.path if source.kind != "hub" else None
    chosen, origin = resolve_template(template, tokenizer, model_type, adapter=adapter, model_dir=model_dir,
                                      system=system)
    return ChatSetup(source, tokenizer, model_type, chosen, origin)
