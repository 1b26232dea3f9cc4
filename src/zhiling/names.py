"""One way to say "unknown name; did you mean ...?".

Every place that checks a name against a closed set (formats, templates, datasets, backends, config keys, chat
commands, generation parameters, optimizers) builds its message here, so the wording and the matching agree.
It sits below ``zhiling.config`` and imports nothing from zhiling but ``errors``, so any layer may use it.

Two shapes, both with the closest choice first when one is close enough:

* ``unknown_name(...)``: ``unknown format 'alpacca'; did you mean 'alpaca'? (known: alpaca, sharegpt, ...)``
  (the choices are always listed);
* ``suggestion(..., otherwise="valid keys")``: only the hint, for callers that compose their own line
  (``; did you mean 'rank'?``, or ``; valid keys: rank, alpha`` when nothing is close).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from zhiling.errors import ZhilingError

CUTOFF = 0.6  # difflib's default similarity ratio; short names (datasets, parameters) pass 0.5


def closest(name: str, choices: Iterable[str], cutoff: float = CUTOFF) -> str | None:
    """The choice nearest to ``name``, or None when none is at least ``cutoff`` similar."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=cutoff)
    return match[0] if match else None


def suggestion(name: str, choices: Iterable[str], *, cutoff: float = CUTOFF, quote: str = "'",
               prefix: str = "", otherwise: str | None = None, match: str | None = None) -> str:
    """``; did you mean 'x'?`` for the closest choice; else ``; {otherwise}: a, b`` (or '' without ``otherwise``).

    ``prefix`` is put before the suggested name (a section such as ``training.``); ``quote`` surrounds it
    (chat commands are shown bare: ``did you mean /save?``). ``match`` is a caller's own nearest choice (config
    keys also know aliases such as ``lr``); without it the nearest is found by :func:`closest`.
    """
    choices = [str(c) for c in choices]
    match = match if match is not None else closest(name, choices, cutoff)
    if match is not None:
        return f"; did you mean {quote}{prefix}{match}{quote}?"
    if otherwise and choices:
        return f"; {otherwise}: {', '.join(choices)}"
    return ""


def unknown_name(what: str, name: str, choices: Iterable[str], *, label: str = "known", cutoff: float = CUTOFF,
                 tail: str = "") -> str:
    """``unknown {what} '{name}'; did you mean 'x'? ({label}: a, b{tail})`` -- the choices always listed."""
    choices = [str(c) for c in choices]
    return f"unknown {what} '{name}'{suggestion(name, choices, cutoff=cutoff)} ({label}: {', '.join(choices)}{tail})"


def raise_unknown(what: str, name: str, choices: Iterable[str], *, error: type[Exception] = ZhilingError,
                  **options) -> None:
    """Raise ``error(unknown_name(...))``; ``options`` as for :func:`unknown_name`."""
    raise error(unknown_name(what, name, choices, **options))
