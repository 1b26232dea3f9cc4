"""``torch.compile`` as an option (``training.compile``), with a fallback that never stops a run.

The repeated decoder layers are compiled in place (``nn.Module.compile``), not the whole model: one graph serves
every layer, compiling takes seconds instead of minutes, and it works whichever way the model is called (the
label-only loss calls the model body directly, which a compiled top-level module would bypass). Shapes are
dynamic, so packed micro-batches of changing length do not recompile.

A short forward and backward pass right away compiles the graphs; if that fails (no C++ compiler on a CPU machine,
an unsupported operator, an old torch), the layers are restored and training goes on uncompiled, with a warning.
The probe leaves the random number generators and gradients as it found them, so resume stays exact.
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
from torch import nn

from zhiling.models.lm import unwrap_model


def decoder_layers(model) -> list[nn.Module]:
    """The repeated blocks: the longest ``nn.ModuleList`` (its length equal to ``num_hidden_layers`` if known)."""
    base = unwrap_model(model)
    wanted = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [m for m in lists if wanted is None or len(m) == wanted]
    if not matching:
        return []
    return list(max(matching, key=len))


def is_compiled(model) -> bool:
    layers = decoder_layers(model)
    return bool(layers) and all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)


def _compiler_missing(device: torch.device) -> str | None:
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if not any(shutil.which(name) for name in (compiler, "c++", "clang++")):
            return "no C++ compiler found (torch.compile on CPU needs one: install g++ or set CXX)"
    return None


def _compile_layer(layer: nn.Module, dynamic: bool) -> None:
    layer.compile(dynamic=dynamic)


def _uncompile(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer._compiled_call_impl = None


def _probe(model, example_batch=None) -> None:
    """One training forward + backward, so compilation (and any failure) happens now. With ``example_batch`` (a
    collated micro-batch like the training ones) the graphs fit the training inputs and do not recompile later."""
    from zhiling.train.loss import model_inputs

    base = unwrap_model(model)
    device = next(base.parameters()).device
    if example_batch is not None:
        inputs = {key: _to(value, device) for key, value in model_inputs(example_batch).items()}
    else:
        vocab = int(getattr(base.config, "vocab_size", 8))
        inputs = {"input_ids": torch.arange(8, device=device)[None] % max(vocab, 1)}
    grads = {p: p.grad for p in model.parameters() if p.requires_grad}
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        output = model(**inputs, use_cache=False)
        loss = output.logits.float().mean()
        if loss.requires_grad:
            loss.backward()
    finally:
        for param, grad in grads.items():
            param.grad = grad
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def _to(value, device):
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value.to(device) if hasattr(value, "to") else value


def maybe_compile(model, enabled: bool, dynamic: bool = True, example_batch=None):
    """Compile the decoder layers of ``model`` in place when ``enabled``; returns the model either way.

    Call it before the training loop (and before restoring RNG states on resume); ``example_batch``: a collated
    micro-batch, so the compiled graphs match the training inputs (packed masks, position ids)."""
    if not enabled:
        return model
    layers = decoder_layers(model)
    if not layers:
        warnings.warn("training.compile: no repeated decoder layers found; training uncompiled", stacklevel=2)
        return model
    device = next(unwrap_model(model).parameters()).device
    missing = _compiler_missing(device)
    if missing:
        warnings.warn(f"training.compile is on but {missing}; training uncompiled", stacklevel=2)
        return model
    try:
        for layer in layers:
            _compile_layer(layer, dynamic)
        _probe(model, example_batch)
    except Exception as exc:  # noqa: BLE001 - any compile failure: fall back, do not stop the run
        _uncompile(layers)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(f"training.compile failed ({type(exc).__name__}: {first_line[:300]}); training uncompiled",
                      stacklevel=2)
    return model
