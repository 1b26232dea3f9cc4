"""Chinese-Vicuna chit-chat rows: {"history": [{"input": ..., "output": ...}, ...], "input": ..., "output": ...}.

The layout Chinese-Vicuna's chat scripts build their multi-turn prompts from: ``history`` holds the earlier turns,
each an object with the user's ``input`` and the assistant's ``output``; the row's own ``input`` is the last
question and ``output`` its answer. The record is the history turns in order, then the final input / output.
``history`` may be empty (a single turn). With ``require_answer=false`` the final ``output`` may be left out (a
prompt for ``zhiling predict``).
"""

from __future__ import annotations

from zhiling.data.formats import ANSWER_OPTION, FormatSpec, option_bool, register
from zhiling.data.records import get_list, get_str, make_record, pairs_to_messages, type_name
from zhiling.errors import DataError


def _history(row: dict) -> list[tuple[str, str]]:
    if row.get("history") == []:
        return []
    pairs = []
    for index, turn in enumerate(get_list(row, "history")):
        where = f"history[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"expected an object with 'input' and 'output', got {type_name(turn)}", field=where)
        try:
            pairs.append((get_str(turn, "input"), get_str(turn, "output")))
        except DataError as err:
            raise DataError(err.reason, field=f"{where}.{err.field}") from None
    return pairs


def _convert(row, options: dict) -> list[dict]:
    question = get_str(row, "input")
    answer = get_str(row, "output", required=option_bool(options, "require_answer")) or None
    return [make_record(pairs_to_messages(_history(row) + [(question, answer)]))]


def _detect(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("history"), list) and isinstance(row.get("input"), str)
            and "instruction" not in row)


register(FormatSpec(
    name="vicuna_chitchat",
    description="Chinese-Vicuna chit-chat: {history: [{input, output}, ...], input, output}",
    convert=_convert, detect=_detect, example="vicuna_chitchat.jsonl",
    signature="a 'history' array of {input, output} turns and an 'input' string",
    options=dict(ANSWER_OPTION), defaults={"require_answer": True},
    validate=lambda o: option_bool(o, "require_answer"),
))
