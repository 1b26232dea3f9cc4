"""Input format registry: every raw format converts rows into canonical records (see ``zhiling.data.records``).

A format module registers a ``FormatSpec`` with ``register``. ``convert`` takes one raw row (already parsed) and the
format's options and returns a list of canonical records (usually one; PsyQA with every answer gives several). It
raises ``DataError`` naming the field on a bad row; the caller adds the file and line.

Auto-detection looks at the first rows of a file and picks the first format, in ``FORMAT_MODULES`` order, whose
``detect`` recognises at least one of them and that can read all of them (``detect`` or ``accepts``: a COIG file may
mix exam rows with plain instruction/output rows); formats that read whole files (couplets, COIG archives) detect from the files
instead (their names and, for ``.txt`` files, their content).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from zhiling.data.reader import RawRow, iter_json_rows
from zhiling.errors import DataError
from zhiling.names import raise_unknown, suggestion, unknown_name

Converter = Callable[[Any, dict], list[dict]]
Reader = Callable[[list[str], dict], Iterator["RawRow | DataError"]]

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "resources" / "examples" / "formats"


class OptionError(DataError):
    """A format option has a bad value: a problem with the whole run, never skipped as a bad row."""


def read_json_files(paths: list[str], options: dict) -> Iterator[RawRow | DataError]:
    for path in paths:
        yield from iter_json_rows(path)


@dataclass
class FormatSpec:
    name: str
    description: str
    convert: Converter
    detect: Callable[[Any], bool] | None = None
    read: Reader = read_json_files
    options: dict[str, str] = field(default_factory=dict)  # option name -> help text
    defaults: dict[str, Any] = field(default_factory=dict)
    example: str | None = None  # file (or folder) name under resources/examples/formats
    signature: str = ""  # what detection looks for, in words (shown when a file is detected as this format)
    detect_files: Callable[[list[str]], bool] | None = None  # file-level detection (formats with their own reader)
    validate: Callable[[dict], Any] | None = None  # checks option values up front (raises OptionError)
    accepts: Callable[[Any], bool] | None = None  # rows it can read besides detected ones (default: detect)

    def can_read(self, row: Any) -> bool:
        return bool(self.detect and self.detect(row)) or bool(self.accepts and self.accepts(row))

    def check_options(self, options: dict | None) -> dict:
        options = dict(options or {})
        for key in options:
            if key not in self.options:
                hint = suggestion(key, self.options, otherwise="valid options") if self.options else \
                    "; it takes no options"
                raise OptionError(f"unknown option '{key}' for format '{self.name}'{hint}")
        merged = {**self.defaults, **options}
        if self.validate is not None:
            self.validate(merged)
        return merged

    @property
    def example_path(self) -> Path | None:
        return EXAMPLES_DIR / self.example if self.example else None


# ----- option values (strings from the command line, or YAML values from a registry) -----------------------------
def option_choice(options: dict, key: str, choices: tuple[str, ...]) -> str:
    value = str(options.get(key)).strip().lower()
    if value not in choices:
        raise OptionError(f"option {key}={options.get(key)!r} is not one of: {', '.join(choices)}")
    return value


# The option of formats that can also carry prompts without answers (what `zhiling predict` reads).
ANSWER_OPTION = {"require_answer": "true (default): every row needs its answer; false: prompt-only rows (for "
                                   "predict) may leave it out"}


def option_bool(options: dict, key: str) -> bool:
    value = options.get(key)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise OptionError(f"option {key}={value!r} must be true or false")


def option_mapping(options: dict, key: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """A ``name=column,name=column`` string (or a YAML mapping) -> {name: column}, names checked against ``allowed``.

    An empty column (``instruction=``) is kept as ``""``: the caller decides what it means (usually "no column").
    """
    value = options.get(key)
    if isinstance(value, dict):
        pairs = {str(k).strip(): str(v).strip() for k, v in value.items()}
    else:
        pairs = {}
        for part in str(value or "").split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise OptionError(f"option {key}: '{part.strip()}' is not of the form name=column "
                                f"(for example {key}=instruction=instruct,input=query,output=answer)")
            name, column = part.split("=", 1)
            pairs[name.strip()] = column.strip()
    for name, column in pairs.items():
        if name not in allowed:
            raise OptionError(f"option {key}: {unknown_name('name', name, allowed, label='names')}")
    return pairs


FORMATS: dict[str, FormatSpec] = {}

# Modules that register formats; the order is the auto-detection order (most specific first).
FORMAT_MODULES = [
    "zhiling.data.formats.couplets",
    "zhiling.data.formats.coig",
    "zhiling.data.formats.psyqa",
    "zhiling.data.formats.firefly",
    "zhiling.data.formats.vicuna_chat",
    "zhiling.data.formats.vicuna_chitchat",
    "zhiling.data.formats.baize",
    "zhiling.data.formats.sharegpt",
    "zhiling.data.formats.canonical",
    "zhiling.data.formats.instruct",
    "zhiling.data.formats.belle",
    "zhiling.data.formats.alpaca",
]


def register(spec: FormatSpec) -> FormatSpec:
    FORMATS[spec.name] = spec
    return spec


def _load_all() -> None:
    for name in FORMAT_MODULES:
        importlib.import_module(name)


def get_format(name: str) -> FormatSpec:
    _load_all()
    if name not in FORMATS:
        raise_unknown("format", name, all_formats(), error=DataError, tail=", or auto")
    return FORMATS[name]


def all_formats() -> dict[str, FormatSpec]:
    """Every format, in detection order (the order of their modules in ``FORMAT_MODULES``)."""
    _load_all()

    def rank(spec: FormatSpec) -> int:
        module = spec.convert.__module__
        return FORMAT_MODULES.index(module) if module in FORMAT_MODULES else len(FORMAT_MODULES)

    return {spec.name: spec for spec in sorted(FORMATS.values(), key=rank)}
