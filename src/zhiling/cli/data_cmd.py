"""``zhiling data ...``: the group; each sub-command lives in its own module."""

from __future__ import annotations

import importlib

from zhiling.cli.common import add_group

DATA_COMMAND_MODULES = [
    "zhiling.cli.data_convert",
    "zhiling.cli.data_inspect",
]


def register(sub) -> None:
    group = add_group(sub, "data", help="convert, inspect and preview instruction data",
                      description="Convert raw instruction data to canonical jsonl, look at its lengths, and see "
                                  "exactly which tokens a training run learns from.")
    for name in DATA_COMMAND_MODULES:
        importlib.import_module(name).register(group)
