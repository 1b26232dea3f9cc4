"""Prediction files: what ``zhiling predict`` writes and every ``zhiling eval`` command reads.

One JSON object per line::

    {"id": "ner-0001", "prompt": "找出句子中的人名：李雷在上海工作。", "output": "李雷_人名",
     "reference": "李雷_人名", "task": "ner"}

``prompt`` (a string, or a list of ``{"role", "content"}`` messages) and ``output`` (a string, may be empty) are
required. ``reference`` (a string, or a non-empty list of acceptable strings), ``task`` and ``id`` are optional;
a row without ``id`` gets ``line-N`` after its line number. Other keys are kept in ``extra``.

Generation parameters live beside the rows, either in a first header line ``{"__meta__": {...}}`` or in a side
file named ``PRED.jsonl.meta.json``; ``read_predictions`` returns them as ``meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhiling.data.reader import iter_jsonl, read_json_object
from zhiling.data.records import get_str, type_name
from zhiling.errors import DataError

META_KEY = "__meta__"
META_SUFFIX = ".meta.json"
_KNOWN = {"id", "prompt", "output", "reference", "task"}


@dataclass
class Prediction:
    id: str
    prompt: str
    output: str
    reference: str | list[str] | None = None
    task: str | None = None
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        row = {"id": self.id, "prompt": self.prompt, "output": self.output}
        if self.reference is not None:
            row["reference"] = self.reference
        if self.task is not None:
            row["task"] = self.task
        return row


@dataclass
class PredictionFile:
    path: str
    rows: list[Prediction]
    meta: dict[str, Any]

    def by_id(self) -> dict[str, Prediction]:
        return {row.id: row for row in self.rows}


def meta_path(path: str | Path) -> Path:
    return Path(str(path) + META_SUFFIX)


def _prompt_text(row: dict) -> str:
    value = row.get("prompt")
    if isinstance(value, list):
        if not value:
            raise DataError("is an empty array", field="prompt")
        parts = []
        for index, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataError(f"message {index + 1} must be an object with a string 'content'", field="prompt")
            parts.append(f"{message.get('role', 'user')}: {message['content']}")
        return "\n".join(parts)
    return get_str(row, "prompt")


def _reference(row: dict) -> str | list[str] | None:
    value = row.get("reference")
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            raise DataError("is an empty array (leave the field out when there is no reference)", field="reference")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise DataError(f"item {index + 1} is a {type_name(item)}, expected a string", field="reference")
        return list(value)
    raise DataError(f"expected a string or an array of strings, got {type_name(value)}", field="reference")


def parse_prediction(value: Any, line: int) -> Prediction:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type_name(value)}")
    raw_id = value.get("id")
    if raw_id is None:
        row_id = f"line-{line}"
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip():
        row_id = str(raw_id)
    else:
        raise DataError(f"expected a non-empty string or number, got {type_name(raw_id)}", field="id")
    task = get_str(value, "task", required=False) or None
    return Prediction(id=row_id, prompt=_prompt_text(value), output=get_str(value, "output", allow_empty=True),
                      reference=_reference(value), task=task, line=line,
                      extra={k: v for k, v in value.items() if k not in _KNOWN})


def read_predictions(path: str | Path) -> PredictionFile:
    """Read and check every row; the first bad row raises a ``DataError`` naming file, line and field."""
    path = Path(path)
    rows: list[Prediction] = []
    meta: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for item in iter_jsonl(path):
        if isinstance(item, DataError):
            raise item
        if not rows and not meta and isinstance(item.value, dict) and META_KEY in item.value:
            if not isinstance(item.value[META_KEY], dict):
                raise DataError("expected a JSON object", str(path), item.line, META_KEY)
            meta = dict(item.value[META_KEY])
            continue
        try:
            row = parse_prediction(item.value, item.line)
        except DataError as err:
            raise err.located(str(path), item.line) from None
        if row.id in seen:
            raise DataError(f"duplicate id {row.id!r} (first on line {seen[row.id]})", str(path), item.line, "id")
        seen[row.id] = item.line
        rows.append(row)
    if not rows:
        raise DataError("no prediction rows (only a header)", str(path))
    side = meta_path(path)
    if side.exists():
        meta = {**read_json_object(side, unreadable="cannot read the generation-parameters file"), **meta}
    return PredictionFile(str(path), rows, meta)
