"""The layout of an evaluation run folder (RUN_DIR), shared by every ``zhiling eval`` command.

::

    RUN_DIR/
      run.json       {"kind": "metrics" | "judge" | "mc", "name": ..., "created": ISO time, "inputs": [...],
                      "options": {...}, "zhiling_version": ...}
      summary.json   the numbers: {"overall": {...}, "groups": {GROUP: {...}}, ...} (shape depends on kind)
      rows.jsonl     one object per scored row (prompt, output(s), reference, per-row scores)
      summary.md     the same tables as Markdown, for reading without zhiling

``zhiling eval compare`` reads any number of these folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from zhiling import __version__
from zhiling.data.reader import iter_jsonl, read_json_object
from zhiling.errors import DataError, ZhilingError

RUN_KINDS = ("metrics", "judge", "mc")


@dataclass
class Run:
    path: Path
    kind: str
    name: str
    info: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_run(out_dir: str | Path, kind: str, *, summary: dict, rows: list[dict], markdown: str,
              inputs: list[str], options: dict, name: str | None = None) -> Path:
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ZhilingError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    info = {"kind": kind, "name": name or out.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs, "options": options, "zhiling_version": __version__}
    (out / "run.json").write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    write_jsonl(out / "rows.jsonl", rows)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    return out


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise DataError("missing (is this a folder written by `zhiling eval metrics|judge|mc`?)", str(path))
    return read_json_object(path)


def read_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ZhilingError(f"{path}: not a folder (expected a RUN_DIR written by `zhiling eval ...`)")
    info = _read_json(path / "run.json")
    kind = info.get("kind")
    if kind not in RUN_KINDS:
        raise DataError(f"unknown kind {kind!r} (expected one of {', '.join(RUN_KINDS)})", str(path / "run.json"),
                        field="kind")
    summary = _read_json(path / "summary.json")
    rows = []
    for item in iter_jsonl(path / "rows.jsonl"):
        if isinstance(item, DataError):
            raise item
        if not isinstance(item.value, dict):
            raise DataError("expected a JSON object", item.path, item.line)
        rows.append(item.value)
    return Run(path, kind, str(info.get("name") or path.name), info, summary, rows)
