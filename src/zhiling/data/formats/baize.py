"""Baize transcripts: {"topic": ..., "input": "<header>\\n[|Human|] ...\\n[|AI|] ...\\n[|Human|] "}.

The text before the first ``[|Human|]`` (the fixed "The conversation between human and AI assistant." header) is
dropped, and so is the empty ``[|Human|]`` that ends every transcript. Turns must alternate Human / AI; a transcript
with no complete (Human, AI) turn is an error. ``topic`` is kept in the record.
"""

from __future__ import annotations

import re

from zhiling.data.formats import FormatSpec, option_choice, register
from zhiling.data.records import get_str, make_record
from zhiling.errors import DataError

_MARK = re.compile(r"\[\|(Human|AI)\|\]")
ROLES = {"Human": "user", "AI": "assistant"}


def parse_transcript(text: str, trailing_user: str = "error") -> list[dict]:
    marks = list(_MARK.finditer(text))
    turns = []
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        turns.append((mark.group(1), text[mark.end():end].strip()))
    if turns and turns[-1] == ("Human", ""):
        turns.pop()
    if trailing_user == "drop" and turns and turns[-1][0] == "Human":
        turns.pop()
    if len(turns) < 2:
        raise DataError("the transcript has no complete [|Human|] / [|AI|] turn", field="input")
    messages = []
    for number, (speaker, content) in enumerate(turns, start=1):
        expected = "Human" if number % 2 else "AI"
        if speaker != expected:
            raise DataError(f"turn {number} is [|{speaker}|] but [|{expected}|] was expected (turns must alternate)",
                            field="input")
        if not content:
            raise DataError(f"turn {number} ([|{speaker}|]) is empty", field="input")
        messages.append({"role": ROLES[speaker], "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataError("the transcript ends with an unanswered [|Human|] turn (option trailing_user=drop drops it)",
                        field="input")
    return messages


def _convert(row, options: dict) -> list[dict]:
    messages = parse_transcript(get_str(row, "input"), option_choice(options, "trailing_user", ("error", "drop")))
    topic = get_str(row, "topic", required=False)
    return [make_record(messages, **({"topic": topic} if topic.strip() else {}))]


def _detect(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("input"), str) and "[|Human|]" in row["input"]


register(FormatSpec(
    name="baize",
    description="Baize transcripts: {topic, input: '... [|Human|] ... [|AI|] ... [|Human|] '}",
    convert=_convert, detect=_detect, example="baize.json",
    options={"trailing_user": "error (default): a transcript ending on a non-empty unanswered [|Human|] turn is an "
                              "error; drop: drop that turn (the final empty [|Human|] is always dropped)"},
    defaults={"trailing_user": "error"},
    signature="an 'input' transcript with [|Human|] / [|AI|] turns",
    validate=lambda o: option_choice(o, "trailing_user", ("error", "drop")),
))
