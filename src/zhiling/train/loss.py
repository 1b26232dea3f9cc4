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

The body / head split of a causal LM (``head_parts``, ``body_hidden``, ``head_logits``) is ``zhiling.models.lm``,
shared with evaluation's log-likelihoods; what is here is the training loss on top of it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from zhiling.data.tokenize import IGNORE_INDEX
from zhiling.models.lm import HeadParts, body_hidden, default_chunk_size, head_parts, transform_logits, unwrap_model

_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch", "length")


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean over label tokens (0 when the micro-batch has none)
    loss_sum: torch.Tensor
    n_tokens: int


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[..., t] = labels[..., t + 1]: the token that position t predicts (-100 at the end)."""
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


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
        logits = transform_logits(head(piece).float(), scale, softcap)
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
