"""Causal-LM loss computed only where labels exist, without ever building the [tokens, vocab] logits.

The model body runs on every token; the LM head runs only on positions whose *next* label is trained, in chunks.
With large vocabularies (Gemma 262k, Qwen 152k) the head is most of the compute, and prompt tokens are often most
of the tokens, so this is the largest single saving in instruction tuning.

For a plain linear head (LoRA without a head adapter, tied or untied embeddings) the gradient of each chunk is
computed right after its loss, inside one autograd function: backward never stores a chunk's logits and never
recomputes them. Any other head (a LoRA-wrapped ``lm_head``, ``modules_to_save``) runs chunk by chunk under
activation checkpointing: only the chunk's inputs are kept, its logits are recomputed in backward.

``loss`` is the mean over the micro-batch's label tokens, exactly like ``model(..., labels=...)``; ``loss_sum`` and
``n_tokens`` let gradient accumulation and several processes normalise over the whole accumulated batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

IGNORE_INDEX = -100
LOGITS_PER_CHUNK = 1 << 26  # chunk rows x vocabulary: 64M fp32 logits = 256 MB per chunk buffer
_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch", "length")


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean over label tokens (0 when the micro-batch has none)
    loss_sum: torch.Tensor
    n_tokens: int


@dataclass(frozen=True)
class HeadParts:
    """The pieces of a causal LM that the label-only loss calls separately."""

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


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[..., t] = labels[..., t + 1]: the token that position t predicts (-100 at the end)."""
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


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
    return _transform(parts.head(hidden).float(), parts.scale, parts.softcap)


def _transform(logits: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_logits(piece: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor) -> torch.Tensor:
    """The head on one chunk of positions, written into the fp32 buffer ``out`` (a separate function so tests can
    check chunk sizes)."""
    if piece.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(piece, weight.t(), out=out)
        if bias is not None:
            out.add_(bias)
    else:
        out.copy_(nn.functional.linear(piece, weight, bias))
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``transform(hidden @ weight.T + bias)``; gradients made chunk by chunk in forward.

    One fp32 buffer of [chunk, vocab] serves every chunk, and the softmax and its gradient are computed in place:
    fresh buffers of this size would be new memory pages for every chunk (slow to fault in, above all in VMs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, scale, softcap, want_grads):
        want_hidden, want_weight, want_bias = want_grads
        rows, device = hidden.shape[0], hidden.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        size = min(chunk, rows)
        buffer = torch.empty((size, weight.shape[0]), dtype=torch.float32, device=device)
        tanh_buffer = torch.empty_like(buffer) if softcap is not None else None
        for start in range(0, rows, chunk):
            piece = hidden[start:start + chunk]
            target = targets[start:start + chunk]
            count = piece.shape[0]
            logits = _chunk_logits(piece, weight, bias, buffer[:count])
            if scale is not None:
                logits.mul_(scale)
            tanh = None
            if softcap is not None:
                tanh = tanh_buffer[:count]
                torch.tanh(logits.div_(softcap), out=tanh)
                logits.copy_(tanh).mul_(softcap)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # softmax, in place
            norm = probs.sum(dim=1, keepdim=True)
            probs.div_(norm)
            total += (peak.squeeze(1) + norm.squeeze(1).log() - picked).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            grad = probs
            grad[torch.arange(count, device=device), target] -= 1.0
            if tanh is not None:
                grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))
            if scale is not None:
                grad.mul_(scale)
            if want_hidden:
                if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
                    torch.mm(grad, weight, out=grad_hidden[start:start + count])
                else:
                    grad_hidden[start:start + count] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight.addmm_(grad.t(), piece.float())
            if want_bias:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.wants = (want_hidden, want_weight, want_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = list(ctx.saved_tensors)
        grads = []
        for want, dtype in zip(ctx.wants, ctx.dtypes):
            grads.append((saved.pop(0) * grad_output).to(dtype) if want else None)
        return grads[0], grads[1], grads[2], None, None, None, None, None


def _linear_head_loss(hidden, targets, head: nn.Linear, chunk, scale, softcap) -> torch.Tensor:
    weight, bias = head.weight, head.bias
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, scale, softcap, wants)


def _module_head_loss(hidden, targets, head: nn.Module, chunk, scale, softcap) -> torch.Tensor:
    """Any head module (e.g. LoRA on lm_head): per-chunk activation checkpointing keeps one chunk's logits alive."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(piece, target):
        logits = _transform(head(piece).float(), scale, softcap)
        return nn.functional.cross_entropy(logits, target, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        piece, target = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, piece, target, use_reentrant=False)
        else:
            total = total + chunk_loss(piece, target)
    return total


def head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, parts: HeadParts,
                  chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the head on ``hidden`` [P, H] against ``targets`` [P] (all valid), chunked."""
    vocab = getattr(parts.head, "out_features", None) or getattr(getattr(parts.head, "weight", None), "shape", [0])[0]
    chunk = chunk_size or default_chunk_size(int(vocab or 1))
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if type(parts.head) is nn.Linear:
        return _linear_head_loss(hidden, targets, parts.head, chunk, parts.scale, parts.softcap)
    return _module_head_loss(hidden, targets, parts.head, chunk, parts.scale, parts.softcap)


def model_inputs(batch: Mapping) -> dict:
    return {key: value for key, value in batch.items() if key not in _NOT_MODEL_INPUTS}


def _finish(loss_sum: torch.Tensor, n_tokens: int) -> LossOutput:
    mean = loss_sum / n_tokens if n_tokens else loss_sum * 0.0
    return LossOutput(mean, loss_sum, n_tokens)


def label_only_loss(model, batch: Mapping, chunk_size: int | None = None, parts: HeadParts | None = None) -> LossOutput:
    """The loss of ``model`` on ``batch`` with the LM head run only at positions that predict a label."""
    parts = parts or head_parts(model)
    if parts is None:
        raise ValueError("label-only loss: this model has no separate body and LM head (use plain_loss)")
    labels = batch["labels"]
    hidden = body_hidden(parts, model_inputs(batch))
    targets = shifted_targets(labels.to(hidden.device)).reshape(-1)
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    loss_sum = head_loss_sum(selected, targets.index_select(0, positions), parts, chunk_size)
    return _finish(loss_sum, int(positions.numel()))


def plain_loss(model, batch: Mapping) -> LossOutput:
    """The reference: full logits from the model's own forward, cross-entropy over every labelled position."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    targets = shifted_targets(batch["labels"].to(logits.device)).reshape(-1)
    loss_sum = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                                           ignore_index=IGNORE_INDEX, reduction="sum")
    return _finish(loss_sum, int((targets != IGNORE_INDEX).sum()))


def _probe_batch(model, length: int = 12) -> dict:
    base = unwrap_model(model)
    vocab = int(base.config.vocab_size)
    device = next(base.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, length), generator=generator)
    labels = ids.clone()
    labels[0, : length // 3] = IGNORE_INDEX
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def check_label_only(model, tolerance: float | None = None) -> tuple[bool, str]:
    """Compare the label-only loss with the plain loss on a short random row (eval mode, no gradients)."""
    parts = head_parts(model)
    if parts is None:
        return False, "the model has no separate body and LM head"
    batch = _probe_batch(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = plain_loss(model, batch).loss.item()
            got = label_only_loss(model, batch, parts=parts).loss.item()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use this path
        return False, f"label-only forward failed: {type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    dtype = next(unwrap_model(model).parameters()).dtype
    tolerance = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    if not math.isfinite(got) or abs(got - expected) > tolerance * max(1.0, abs(expected)):
        return False, f"label-only loss {got:.6f} differs from the model's own loss {expected:.6f}"
    return True, "ok"


class CausalLMLoss(nn.Module):
    """A module whose forward is the training loss, so DDP / accelerate can wrap the loss computation as a whole.

    ``label_only=None`` checks once whether the label-only path reproduces the model's own loss and falls back to
    the plain path (with a warning) when it does not, e.g. for remote-code models with unusual heads.
    """

    def __init__(self, model: nn.Module, label_only: bool | None = None, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        if label_only is None:
            label_only, reason = check_label_only(model)
            if not label_only:
                warnings.warn(f"logits only where labels exist is off for this model: {reason}", stacklevel=2)
        self.label_only = bool(label_only)
        self._parts = head_parts(model) if self.label_only else None

    def forward(self, **batch) -> LossOutput:
        if self.label_only:
            return label_only_loss(self.model, batch, self.chunk_size, self._parts)
        return plain_loss(self.model, batch)


LossFunction = Callable[[nn.Module, Mapping], LossOutput]
