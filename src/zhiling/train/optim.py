"""Optimizer and learning-rate schedule from the training section (names checked before training starts)."""

from __future__ import annotations

import math

from zhiling.config import TrainingConfig
from zhiling.errors import ConfigError, ZhilingError
from zhiling.names import unknown_name

OPTIMIZERS = ("adamw_torch", "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


def _unknown(kind: str, name: str, known: tuple[str, ...]) -> ConfigError:
    return ConfigError(f"training.{kind}: {unknown_name('name', name, known)}")


def check_names(training: TrainingConfig) -> None:
    if training.optimizer not in OPTIMIZERS:
        raise _unknown("optimizer", training.optimizer, OPTIMIZERS)
    if training.lr_scheduler not in SCHEDULERS:
        raise _unknown("lr_scheduler", training.lr_scheduler, SCHEDULERS)


def _no_decay(name: str, param) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters; biases and norm weights get no weight decay."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model, training: TrainingConfig):
    import torch

    check_names(training)
    groups = parameter_groups(model, training.weight_decay)
    name, lr = training.optimizer, training.learning_rate
    if name in ("adamw_torch", "adamw"):
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ZhilingError(f"training.optimizer={name} needs bitsandbytes: pip install 'zhiling[qlora]'") from exc
    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return classes[name](groups, lr=lr)


def warmup_steps(training: TrainingConfig, total_steps: int) -> int:
    if training.warmup_steps:
        return min(training.warmup_steps, total_steps)
    return int(math.ceil(training.warmup_ratio * total_steps))


def build_scheduler(optimizer, training: TrainingConfig, total_steps: int):
    from transformers import get_scheduler

    check_names(training)
    kwargs = {}
    if training.lr_scheduler == "cosine_with_min_lr":
        kwargs["scheduler_specific_kwargs"] = {"min_lr_rate": 0.1}
    if training.lr_scheduler == "warmup_stable_decay":
        kwargs["scheduler_specific_kwargs"] = {"num_decay_steps": max(1, total_steps // 10)}
    return get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(training, total_steps),
                         num_training_steps=total_steps, **kwargs)
