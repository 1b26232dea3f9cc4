"""Generation parameters from the command line, a config file, ``/set KEY VALUE`` and web forms.

Every path ends in ``update_params``, which builds a new validated ``GenerationConfig`` and turns a pydantic error
into a ``ZhilingError`` that names the parameter and the closest valid name.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from zhiling.config import GenerationConfig
from zhiling.errors import ZhilingError
from zhiling.names import suggestion

PARAM_NAMES = list(GenerationConfig.model_fields)
SAMPLING_ONLY = ("temperature", "top_p", "top_k")


class InvalidParams(ZhilingError):
    """A parameter value out of range; ``names`` are the parameters at fault."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def _describe_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{key} = {err.get('input')!r}: {message}" if key else message)
    return "; ".join(parts)


def check_param_name(key: str) -> str:
    name = key.strip().replace("-", "_")
    if name not in GenerationConfig.model_fields:
        raise ZhilingError(f"unknown generation parameter '{key}'{suggestion(name, PARAM_NAMES, cutoff=0.5)} "
                           f"(parameters: {', '.join(PARAM_NAMES)})")
    return name


def update_params(params: GenerationConfig, **changes: Any) -> GenerationConfig:
    """A new GenerationConfig with ``changes`` applied and validated (``params`` is left as it was)."""
    for key in changes:
        check_param_name(key)
    try:
        return GenerationConfig.model_validate({**params.model_dump(), **changes})
    except ValidationError as exc:
        names = [str(err["loc"][0]) for err in exc.errors() if err.get("loc")]
        raise InvalidParams(f"invalid generation parameter: {_describe_error(exc)}", names) from None


def parse_value(key: str, text: str) -> Any:
    """The typed value of ``text`` for parameter ``key`` (``/set`` and the web form give strings)."""
    name = check_param_name(key)
    text = text.strip()
    if name == "stop":
        # /set stop "###" "User:"  ->  several stop strings separated by |, or none
        return [s for s in text.split("|") if s] if text and text.lower() != "none" else []
    if name == "seed" and text.lower() in ("", "none", "null"):
        return None
    if name == "do_sample":
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ZhilingError(f"do_sample must be true or false, got {text!r}")
    annotation = GenerationConfig.model_fields[name].annotation
    number = int if annotation in (int, "int") or name in ("seed",) else float
    try:
        return number(text)
    except ValueError:
        kind = "a whole number" if number is int else "a number"
        raise ZhilingError(f"{name} must be {kind}, got {text!r}") from None


def set_param(params: GenerationConfig, key: str, text: str) -> GenerationConfig:
    """``/set KEY VALUE``."""
    name = check_param_name(key)
    return update_params(params, **{name: parse_value(name, text)})


def format_params(params: GenerationConfig) -> str:
    return "  ".join(f"{key}={value!r}" if isinstance(value, (str, list)) else f"{key}={value}"
                     for key, value in params.model_dump().items())


# ----- command line ----------------------------------------------------------------------------------------------
def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every GenerationConfig field; a flag left out keeps the config file's (or the default) value."""
    group = parser.add_argument_group("generation parameters (same meaning for every backend)")
    defaults = GenerationConfig()
    group.add_argument("--max-new-tokens", type=int, help=f"most tokens per answer (default {defaults.max_new_tokens})")
    group.add_argument("--min-new-tokens", type=int, help="fewest tokens before EOS may end the answer (default 0)")
    sampling = group.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_const", const=True,
                          help="sample (with --temperature, --top-p, --top-k)")
    sampling.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                          help="greedy or beam search (the default)")
    group.add_argument("--temperature", type=float, help=f"sampling temperature (default {defaults.temperature})")
    group.add_argument("--top-p", type=float, help=f"nucleus sampling mass (default {defaults.top_p})")
    group.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens, 0 = all (default {defaults.top_k})")
    group.add_argument("--num-beams", type=int, help="beam search width (hf backend; default 1)")
    group.add_argument("--repetition-penalty", type=float, help="penalise repeated tokens, 1 = off (default 1.0)")
    group.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size (hf backend)")
    group.add_argument("--stop", action="append", metavar="TEXT",
                       help="extra stop string (repeatable); the template's stops always apply")
    group.add_argument("--seed", type=int, help="seed for sampling")


def params_from_args(args: argparse.Namespace, base: GenerationConfig | None = None,
                     warn=None) -> GenerationConfig:
    """``base`` (a config file's generation section, or the defaults) with the flags that were given applied."""
    base = base or GenerationConfig()
    changes = {name: getattr(args, name) for name in PARAM_NAMES if getattr(args, name, None) is not None}
    params = update_params(base, **changes)
    given_sampling = [n for n in SAMPLING_ONLY if n in changes]
    if given_sampling and not params.do_sample and warn is not None:
        flags = ", ".join("--" + n.replace("_", "-") for n in given_sampling)
        warn(f"{flags} only take effect with --do-sample (decoding is greedy)")
    return params
