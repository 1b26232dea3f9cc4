"""BELLE: {"input", "target"} (BELLE 1M / 2M), {"instruction", "input", "output"} (BELLE 0.5M, alpaca-like),
and BELLE multi-turn rows whose ``instruction`` holds the earlier turns as ``Human: ...`` / ``Assistant: ...`` lines
(multiturn_chat_0.8M) with the last answer in ``output``.
"""

from __future__ import annotations

import re

from zhiling.data.formats import FormatSpec, register
from zhiling.data.formats.alpaca import join_instruction
from zhiling.data.records import get_str, make_record, pairs_to_messages
from zhiling.errors import DataError

# A speaker tag at the start of a line: "Human:" / "Assistant:" (ASCII or full-width colon).
_SPEAKER = re.compile(r"(?:^|\n)[ \t]*(Human|Assistant)[ \t]*[:：]")


def is_dialogue(text: str) -> bool:
    """Whether the text opens with a ``Human:`` tag and has at least one ``Assistant:`` tag."""
    marks = list(_SPEAKER.finditer(text.lstrip()))
    return bool(marks) and marks[0].start() == 0 and marks[0].group(1) == "Human" and any(
        mark.group(1) == "Assistant" for mark in marks)


def parse_dialogue(text: str, final_answer: str, field: str = "instruction") -> list[tuple[str, str]]:
    """``Human: q1\\nAssistant: a1\\nHuman: q2\\nAssistant:`` + the final answer -> [(q1, a1), (q2, answer)].

    The text must start with a Human turn and alternate. Its last turn is either an empty ``Assistant:`` or a Human
    turn; ``final_answer`` answers it.
    """
    marks = list(_SPEAKER.finditer(text))
    if not marks or text[:marks[0].start()].strip():
        raise DataError("a dialogue must start with 'Human:'", field=field)
    turns = []
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        turns.append((mark.group(1), text[mark.end():end].strip()))
    if turns[-1][0] == "Assistant":
        if turns[-1][1]:
            raise DataError("the last 'Assistant:' turn already has text; it should be empty, with the answer "
                            "in 'output'", field=field)
        turns.pop()
    for number, (speaker, content) in enumerate(turns, start=1):
        expected = "Human" if number % 2 else "Assistant"
        if speaker != expected:
            raise DataError(f"turn {number} is '{speaker}:' but '{expected}:' was expected (turns must alternate "
                            f"Human/Assistant)", field=field)
        if not content:
            raise DataError(f"turn {number} ('{speaker}:') is empty", field=field)
    if turns[-1][0] != "Human":
        raise DataError("the dialogue must end with a 'Human:' turn (or an empty 'Assistant:') for 'output' to "
                        "answer", field=field)
    contents = [content for _, content in turns] + [final_answer]
    return [(contents[i], contents[i + 1]) for i in range(0, len(contents), 2)]


def _convert(row, options: dict) -> list[dict]:
    if isinstance(row, dict) and "target" in row and "output" not in row:
        return [make_record(pairs_to_messages([(get_str(row, "input"), get_str(row, "target"))]))]
    instruction = get_str(row, "instruction")
    extra = get_str(row, "input", required=False)
    output = get_str(row, "output")
    if is_dialogue(instruction):
        pairs = parse_dialogue(instruction, output)
        if extra.strip():
            last_question, answer = pairs[-1]
            pairs[-1] = (join_instruction(last_question, extra), answer)
        return [make_record(pairs_to_messages(pairs))]
    return [make_record(pairs_to_messages([(join_instruction(instruction, extra), output)]))]


def _detect(row) -> bool:
    if not isinstance(row, dict):
        return False
    if "input" in row and "target" in row and "kind" not in row:
        return isinstance(row["input"], str)
    instruction = row.get("instruction")
    return isinstance(instruction, str) and "output" in row and is_dialogue(instruction)


register(FormatSpec(
    name="belle",
    description="BELLE: {input, target}, {instruction, input, output}, and multi-turn rows whose instruction holds "
                "'Human: ...' / 'Assistant: ...' turns",
    convert=_convert, detect=_detect, example="belle.jsonl",
    signature="keys input + target, or an instruction made of 'Human:' / 'Assistant:' turns",
    accepts=lambda row: isinstance(row, dict) and "instruction" in row and "output" in row,
))
