"""``zhiling data stats`` and ``zhiling data preview``."""

from __future__ import annotations


def register(group) -> None:
    # filled in by the stats / preview commands
    return None
