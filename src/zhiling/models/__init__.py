"""Model loading: one loader for hub ids, local folders, GGUF files and the embedded default model."""

from zhiling.models.loader import (ModelSource, load_model, load_tokenizer, model_type_of, resolve_device,
                                   resolve_dtype, resolve_source)

__all__ = ["ModelSource", "load_model", "load_tokenizer", "model_type_of", "resolve_device", "resolve_dtype",
           "resolve_source"]
