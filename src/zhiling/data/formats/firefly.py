"""Firefly: {"kind": "Couplet", "input": ..., "target": ...}. The task kind is kept in the record as ``kind``,
so a converted file can be split into shards with the same mix of kinds (``zhiling data convert --shards N``)."""

from __future__ import annotations

from zhiling.data.formats import FormatSpec, register
from zhiling.data.records import get_str, make_record, pairs_to_messages


def _convert(row, options: dict) -> list[dict]:
    kind = get_str(row, "kind")
    prompt, answer = get_str(row, "input"), get_str(row, "target")
    return [make_record(pairs_to_messages([(prompt, answer)]), kind=kind)]


def _detect(row) -> bool:
    return isinstance(row, dict) and {"kind", "input", "target"} <= row.keys()


register(FormatSpec(
    name="firefly",
    description="Firefly: {kind, input, target}; kind is kept as the record's 'kind' (stratified --shards)",
    convert=_convert, detect=_detect, example="firefly.jsonl",
    signature="keys kind + input + target",
))
