"""Which settings decide a run's result: compared on resume, hashed to recognise a finished run.

Every key of the config is part of the fingerprint except those in ``NOT_RESULT`` (each with the reason it cannot
change the trained weights), so a key added to a config section later is fingerprinted without anyone remembering
to. Values the run resolves at start (number of processes, packing on or off, packing length, mixed precision, the
content key of the training rows) are added by the trainer under ``run.*``.

A resume with a changed key is refused with the list of changed keys, unless every changed key is one of
``RESUMABLE`` and named in ``training.resume_changes``: those are read again at every start, and the trainer applies
the new values from the checkpoint's step on (optimizer hyperparameters, the learning-rate schedule, the length of
the run, how the same arithmetic is computed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from zhiling.errors import ConfigError

FINGERPRINT_VERSION = 2

NOT_RESULT = {
    "training.resume": "which checkpoint to start from",
    "training.resume_changes": "which changes a resume accepts",
    "training.logging_steps": "how often the loss is logged",
    "training.eval_steps": "how often the eval loss is computed (in eval mode, without random numbers or updates)",
    "training.save_steps": "how often checkpoints are written",
    "training.save_total_limit": "how many checkpoints are kept",
    "training.report_to": "where metrics are also sent",
    "data.datasets": "where the data lives: the content of the training rows is fingerprinted as run.data",
    "data.eval_datasets": "held-out rows for the eval loss; they train nothing",
    "data.registry": "where dataset names are looked up: the rows themselves are fingerprinted as run.data",
    "data.num_proc": "how many processes tokenize (the tokens are the same)",
    "data.cache_dir": "where tokenized data is cached",
    "model.cache_dir": "where converted models are cached",
    "model.device": "where the run computes: the precision it implies is fingerprinted as run.mixed_precision",
    "model.trust_remote_code": "a permission to load the model's own code, not a choice of model",
    "generation": "decoding settings for chat, predict and serve; training does not use them",
    "output": "where the run writes (a checkpoint may be resumed into another folder) and whether it may overwrite",
    "stages": "each stage is a run of its own with its own fingerprint",
}

RESUMABLE = (
    "training.learning_rate", "training.weight_decay", "training.max_grad_norm", "training.lr_scheduler",
    "training.warmup_steps", "training.warmup_ratio", "training.max_steps", "training.num_epochs",
    "training.gradient_checkpointing", "training.compile",
)


def _excluded(key: str) -> bool:
    return any(key == skip or key.startswith(skip + ".") for skip in NOT_RESULT)


def result_settings(config: dict) -> dict[str, Any]:
    """``{"section.key": value}`` for every config key that decides the result (``config``: a JSON-mode dump)."""
    flat: dict[str, Any] = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[section] = values
    return {key: value for key, value in sorted(flat.items()) if not _excluded(key)}


def settings_hash(config: dict) -> str:
    """A short hash of ``result_settings(config)``."""
    payload = json.dumps(result_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def build(config: dict, resolved: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint stored in a checkpoint: the result settings plus the values resolved at start (``run.*``)."""
    out = {"version": FINGERPRINT_VERSION, **result_settings(config)}
    out.update({f"run.{key}": value for key, value in resolved.items()})
    return out


def accepted_changes(names: list[str]) -> set[str]:
    """``training.resume_changes`` as full dotted keys; a name that cannot be applied mid-run is a ConfigError."""
    accepted = set()
    for name in names:
        key = name if "." in name else f"training.{name}"
        if key not in RESUMABLE:
            raise ConfigError(f"training.resume_changes: '{name}' cannot change in the middle of a run (it decides "
                              f"the data order, the model's shape or the saved state); the keys a resume can "
                              f"apply are {', '.join(k.split('.', 1)[1] for k in RESUMABLE)}")
        accepted.add(key)
    return accepted


def differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, this run's value)}`` for every key that differs."""
    return {key: (saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
            if key != "version" and saved.get(key) != current.get(key)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    parts = []
    for key, (old, new) in changes.items():
        if key == "run.data":
            parts.append("run.data (the training rows: files, template, tokenizer, cutoff or validation split)")
        else:
            parts.append(f"{key}: {old!r} -> {new!r}")
    return "; ".join(parts)
