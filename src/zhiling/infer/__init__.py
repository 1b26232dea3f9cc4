"""Inference: one engine interface (``engine.py``) with backends (``hf_engine``, ``llamacpp_engine``), and the
chat session, batch prediction and generation-parameter helpers built on it."""

from zhiling.infer.engine import (BACKENDS, ChatRequest, Engine, PromptTooLongError, Result, TextPrompt, TextStream,
                                  load_engine)

__all__ = ["BACKENDS", "ChatRequest", "Engine", "PromptTooLongError", "Result", "TextPrompt", "TextStream",
           "load_engine"]
