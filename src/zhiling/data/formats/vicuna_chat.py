"""Chinese-Vicuna chat data: {"input": [user turns...], "output": [assistant turns...]}, turn i answers turn i.

An optional ``instruction`` string (some rows carry one) becomes the system prompt.
"""

from __future__ import annotations

from zhiling.data.formats import FormatSpec, register
from zhiling.data.records import get_list, get_str, make_record, pairs_to_messages, type_name
from zhiling.errors import DataError


def _strings(row: dict, key: str) -> list[str]:
    values = get_list(row, key)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"expected a string, got {type_name(value)}", field=f"{key}[{index}]")
        if not value.strip():
            raise DataError("is empty", field=f"{key}[{index}]")
    return values


def _convert(row, options: dict) -> list[dict]:
    inputs, outputs = _strings(row, "input"), _strings(row, "output")
    if len(inputs) != len(outputs):
        raise DataError(f"'input' has {len(inputs)} turns but 'output' has {len(outputs)}; they must match",
                        field="output")
    system = get_str(row, "instruction", required=False)
    return [make_record(pairs_to_messages(list(zip(inputs, outputs))), system=system)]


def _detect(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("input"), list) and isinstance(row.get("output"), list)


register(FormatSpec(
    name="vicuna_chat",
    description="Chinese-Vicuna chat: {input: [user turns], output: [assistant turns]} of equal length",
    convert=_convert, detect=_detect, example="vicuna_chat.jsonl",
    signature="'input' and 'output' arrays",
))
