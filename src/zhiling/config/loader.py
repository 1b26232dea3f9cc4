"""YAML files plus ``key=value`` overrides -> a validated ``ZhilingConfig``, with errors that say where and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from zhiling.config.root import ZhilingConfig
from zhiling.errors import ConfigError
from zhiling.names import closest, suggestion

# Shorthands: a plain string where a section is expected means its main field (``model: Qwen/Qwen2.5-7B``).
_SHORTHAND = {"model": "name_or_path", "template": "name", "output": "dir"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (for example training.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in _SHORTHAND:
            child = {_SHORTHAND[part]: child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[path[-1]] = value


def _expand_shorthands(tree: dict) -> dict:
    for section, field in _SHORTHAND.items():
        if isinstance(tree.get(section), str):
            tree[section] = {field: tree[section]}
        elif section in tree and tree[section] is None:
            tree[section] = {}
    return tree


def read_yaml(path: str | Path, what: str = "config file",
              expected: str = "a mapping of sections (model:, data:, training: ...)") -> dict:
    """A YAML file whose top level is a mapping ({} when empty); errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be {expected}, not {type(data).__name__}")
    return data


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (a pydantic error location)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


# Names people bring from other tools, mapped to ours.
ALIASES = {
    "lr": "learning_rate", "epochs": "num_epochs", "num_train_epochs": "num_epochs", "batch_size":
    "per_device_batch_size", "per_device_train_batch_size": "per_device_batch_size", "grad_accum":
    "gradient_accumulation_steps", "r": "rank", "lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "max_length": "cutoff_len", "max_seq_length": "cutoff_len", "model_name_or_path": "name_or_path",
    "output_dir": "dir", "dataset": "datasets", "lora_target": "target_modules",
}


def closest_key(root: type[BaseModel], loc: tuple) -> str | None:
    """Suggest the valid key nearest to an unknown one (``trainig`` -> ``training``, ``lr`` -> ``learning_rate``)."""
    owner = _model_at(root, loc[:-1])
    if owner is None:
        return None
    wrong = str(loc[-1])
    names = list(owner.model_fields)
    match = ALIASES[wrong] if ALIASES.get(wrong) in names else closest(wrong, names, cutoff=0.5)
    if match is None:
        match = next((n for n in names if wrong in n or n in wrong), None)
    if match is None:
        return None
    prefix = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    return f"{prefix}.{match}" if prefix else match


def format_validation_error(exc: ValidationError, root: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            line = f"  unknown key '{key}'" + suggestion(key, owner.model_fields if owner else [],
                                                         match=closest_key(root, loc), otherwise="valid keys here")
        else:
            line = f"  {key} = {err.get('input')!r}: {err['msg']}"
        lines.append(line)
    return "\n".join(lines)


def build_config(tree: dict, source: str = "config", model: type[BaseModel] = ZhilingConfig):
    try:
        return model.model_validate(_expand_shorthands(tree))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> ZhilingConfig:
    """Load a YAML config (optional), apply ``key=value`` overrides, validate."""
    tree: dict = dict(base or {})
    sources = []
    if path is not None:
        tree.update(read_yaml(path))
        sources.append(str(path))
    tree = _expand_shorthands(tree)
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(tree, keys, value)
    if overrides:
        sources.append("command line: " + " ".join(overrides))
    return build_config(tree, " + ".join(sources) or "defaults")


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
