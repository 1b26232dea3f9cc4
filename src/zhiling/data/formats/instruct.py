"""Instruct / query / answer rows with configurable columns.

The MSRA entity-extraction data (used for the Baichuan QLoRA project) looks like
``{"instruct": "找出句子中的人名和地名", "query": "...", "answer": "..."}``. ``columns`` maps our names
(instruction, input, output, system) onto a file's own column names, so any flat question/answer file fits.
The prompt is the instruction and the input joined by a newline (either may be absent, not both).
"""

from __future__ import annotations

from zhiling.data.formats import FormatSpec, OptionError, option_mapping, register
from zhiling.data.formats.alpaca import join_instruction
from zhiling.data.records import get_str, make_record, pairs_to_messages

NAMES = ("instruction", "input", "output", "system")
DEFAULT_COLUMNS = "instruction=instruct,input=query,output=answer"


def columns(options: dict) -> dict[str, str]:
    mapping = option_mapping({"columns": DEFAULT_COLUMNS}, "columns", NAMES)
    mapping.update(option_mapping(options, "columns", NAMES))
    mapping = {name: column for name, column in mapping.items() if column}
    if "output" not in mapping:
        raise OptionError("option columns: 'output' must name the answer column")
    if "instruction" not in mapping and "input" not in mapping:
        raise OptionError("option columns: name at least one of 'instruction' and 'input'")
    return mapping


def _convert(row, options: dict) -> list[dict]:
    mapping = columns(options)
    instruction = get_str(row, mapping["instruction"]) if "instruction" in mapping else ""
    query = get_str(row, mapping["input"], required="instruction" not in mapping) if "input" in mapping else ""
    output = get_str(row, mapping["output"])
    system = get_str(row, mapping["system"], required=False) if "system" in mapping else ""
    prompt = join_instruction(instruction, query) if instruction else query
    return [make_record(pairs_to_messages([(prompt, output)]), system=system)]


def _detect(row) -> bool:
    return isinstance(row, dict) and "instruct" in row and "answer" in row


register(FormatSpec(
    name="instruct",
    description="instruct / query / answer (MSRA entity extraction), with configurable column names",
    convert=_convert, detect=_detect, example="instruct.jsonl",
    options={"columns": "which columns hold instruction, input, output (and system): name=column pairs, comma "
                        f"separated; default {DEFAULT_COLUMNS}; names you leave out keep their default, "
                        "an empty column (instruction=) means the file has none"},
    defaults={"columns": ""},
    signature="keys instruct + answer (query optional)",
    validate=columns,
))
