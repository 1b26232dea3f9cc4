"""The causal-LM view of a transformers model: body (tokens -> final hidden states) and head (hidden -> logits).

Training (``train/loss.py``: logits only where labels are) and evaluation (``eval/likelihood.py``: log-likelihood of
chosen tokens) both run the body on every token and the head only on the positions they need, in chunks, so the
[tokens, vocab] logits of a large vocabulary are never built. What a causal LM is made of lives here, below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

LOGITS_PER_CHUNK = 1 << 26  # chunk rows x vocabulary: 64M fp32 logits = 256 MB per chunk buffer


@dataclass(frozen=True)
class HeadParts:
    """The pieces of a causal LM that the label-only loss and the likelihood scorer call separately."""

    body: nn.Module  # input ids -> final hidden states (after the last norm)
    head: nn.Module  # hidden states -> logits
    scale: float | None  # logits multiplied by this (Cohere's logit_scale, 1 / Granite's logits_scaling)
    softcap: float | None  # Gemma 2/3: logits = softcap * tanh(logits / softcap)


def unwrap_model(model):
    """The transformers model under DDP/FSDP (``.module``), torch.compile (``._orig_mod``) and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
                "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            model = model.module
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
    return model


def head_parts(model) -> HeadParts | None:
    """Body, head and logit transforms of a transformers causal LM; None when the model is not split that way."""
    base = unwrap_model(model)
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module) or body is base:
        return None
    config = base.config
    scale = None
    if getattr(config, "logits_scaling", None):
        scale = 1.0 / float(config.logits_scaling)
    elif getattr(config, "logit_scale", None) and "cohere" in str(getattr(config, "model_type", "")):
        scale = float(config.logit_scale)
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadParts(body, head, scale, float(softcap) if softcap else None)


def default_chunk_size(vocab_size: int) -> int:
    return max(16, LOGITS_PER_CHUNK // max(1, vocab_size))


def body_hidden(parts: HeadParts, inputs: Mapping) -> torch.Tensor:
    """Final hidden states [B, L, H] from the model body (output object, tuple, or a bare tensor)."""
    out = parts.body(**inputs, use_cache=False)
    if torch.is_tensor(out):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(parts: HeadParts, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on ``hidden`` with the family's logit scale / softcap applied, in fp32."""
    return transform_logits(parts.head(hidden).float(), parts.scale, parts.softcap)


def transform_logits(logits: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
