"""Input format registry: every raw format converts rows into canonical records (see ``zhiling.data.records``).

A format module registers a ``FormatSpec`` with ``register``. ``convert`` takes one raw row (already parsed) and the
format's options and returns a list of canonical records (usually one; PsyQA with every answer gives several). It
raises ``DataError`` naming the field on a bad row; the caller adds the file and line.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from zhiling.data.reader import RawRow, iter_json_rows
from zhiling.errors import DataError

Converter = Callable[[Any, dict], list[dict]]
Reader = Callable[[list[str], dict], Iterator["RawRow | DataError"]]


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
    example: str | None = None  # file name under resources/examples/formats

    def check_options(self, options: dict | None) -> dict:
        options = dict(options or {})
        for key in options:
            if key not in self.options:
                close = difflib.get_close_matches(key, list(self.options), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else (
                    f"; valid options: {', '.join(self.options)}" if self.options else "; it takes no options")
                raise DataError(f"unknown option '{key}' for format '{self.name}'{hint}")
        return {**self.defaults, **options}


FORMATS: dict[str, FormatSpec] = {}

# Modules that register formats; the order is the auto-detection order (most specific first).
FORMAT_MODULES = [
    "zhiling.data.formats.canonical",
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
        close = difflib.get_close_matches(name, list(FORMATS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown format '{name}'{hint} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def all_formats() -> dict[str, FormatSpec]:
    _load_all()
    return dict(FORMATS)
