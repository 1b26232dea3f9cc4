"""Model loading: one loader for hub ids, local folders, GGUF files and the embedded default model."""

from zhiling.models.chat_setup import ChatSetup, resolve_chat_setup
from zhiling.models.loader import (ModelSource, load_model, load_tokenizer, model_type_of, resolve_device,
                                   resolve_dtype, resolve_source)

__all__ = ["ChatSetup", "ModelSource", "load_model", "load_tokenizer", "model_type_of", "resolve_chat_setup",
           "resolve_device", "resolve_dtype", "resolve_source"]
