"""Where zhiling keeps what it builds once and reuses (converted models, tokenized data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ZHILING_CACHE`` if set, else ``~/.cache/zhiling``."""
    root = os.environ.get("ZHILING_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "zhiling"


def resources_dir() -> Path:
    return Path(__file__).parent / "resources"
