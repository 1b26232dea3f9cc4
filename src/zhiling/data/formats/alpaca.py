"""Alpaca: {"instruction", "input", "output"} (also alpaca-GPT4, Guanaco, alpaca-chinese).

Optional ``system`` and ``history`` ([[q, a], ...] earlier turns). ``input`` is joined to the instruction with a
newline, as the Alpaca authors' prompts do.
"""

from __future__ import annotations

from zhiling.data.formats import ANSWER_OPTION, FormatSpec, option_bool, register
from zhiling.data.records import get_str, make_record, pairs_to_messages, type_name
from zhiling.errors import DataError


def join_instruction(instruction: str, extra: str) -> str:
    return f"{instruction}\n{extra}" if extra.strip() else instruction


def _history(row) -> list[tuple[str, str]]:
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"expected an array of [question, answer] pairs, got {type_name(history)}", field="history")
    pairs = []
    for index, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) and x.strip() for x in pair)):
            raise DataError("expected a [question, answer] pair of non-empty strings", field=f"history[{index}]")
        pairs.append((pair[0], pair[1]))
    return pairs


def _convert(row, options: dict) -> list[dict]:
    instruction = get_str(row, "instruction")
    extra = get_str(row, "input", required=False)
    required = option_bool(options, "require_answer")
    output = get_str(row, "output", required=required) or None  # None: a prompt-only row (require_answer=false)
    pairs = _history(row) + [(join_instruction(instruction, extra), output)]
    return [make_record(pairs_to_messages(pairs), system=get_str(row, "system", required=False))]


def _detect(row) -> bool:
    return isinstance(row, dict) and "instruction" in row and "output" in row


register(FormatSpec(
    name="alpaca",
    description="Alpaca / alpaca-GPT4 / Guanaco / alpaca-chinese: {instruction, input, output[, system, history]}",
    convert=_convert, detect=_detect, example="alpaca.json",
    signature="keys instruction + output (input, system, history optional)",
    options=dict(ANSWER_OPTION), defaults={"require_answer": True},
    validate=lambda o: option_bool(o, "require_answer"),
))
