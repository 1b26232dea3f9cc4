"""COIG (BAAI Chinese Open Instruction Generalist), the subsets whose field layout we could confirm:

- translated_instructions.jsonl: ``trans_instruction`` / ``trans_input`` / ``trans_output`` (the Chinese text;
  the prompt is instruction + "\\n" + input, as in alpaca).
- exam_instructions.jsonl (and human_value_alignment_instructions_part2.json, which uses the same fields):
  ``textbox_q_instruction``, ``textbox_q_context``, ``textbox_question``, ``textbox_answer``,
  ``textbox_answer_analysis``. The prompt is instruction, context and question, the non-empty ones joined by "\\n".
  The answer follows the ``analysis`` option.
- human_value_alignment_instructions_part1.json, leetcode_instructions.jsonl: ``instruction`` / ``input`` /
  ``output`` (alpaca layout; the ``alpaca`` format reads them too).
- counterfactural_correction_multi_round_chat.tar.gz: one JSON file per dialogue with ``round_0``, ``round_1``, ...
  each holding ``{"response": "{\\"Q\\": ..., \\"A\\": ...}"}`` (the response is itself JSON, sometimes inside a
  ```json fence). Q is the user's turn, A the assistant's. The archive can be given as it is, unpacked as a folder, or
  as a jsonl file with one dialogue per line. Every file and archive member is read by its content: one dialogue
  object (pretty-printed or not), a JSON array, or JSON lines (one row per line, each with its own line number).

Every record keeps ``subset`` (translated, exam, instructions, counterfactual).
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from zhiling.data.formats import FormatSpec, option_choice, register
from zhiling.data.formats.alpaca import join_instruction
from zhiling.data.reader import RawRow, check_file, iter_json_document, iter_json_rows
from zhiling.data.records import get_str, make_record, pairs_to_messages, type_name
from zhiling.errors import DataError

_ROUND = re.compile(r"^round_(\d+)$")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
JSON_SUFFIXES = (".json", ".jsonl")


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


# ----- reading: archives, folders, json / jsonl files (each read by the shared reader, whatever its layout) --------
def _members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(``ARCHIVE:MEMBER``, bytes) of the .json / .jsonl members of a tar archive."""
    count = 0
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile() or not member.name.lower().endswith(JSON_SUFFIXES):
                    continue
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                name = member.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                count += 1
                yield f"{path}:{name}", data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # a damaged or cut-off archive
        raise DataError(f"cannot read the archive: {exc}", str(path)) from None
    if count == 0:
        raise DataError("the archive holds no .json / .jsonl files", str(path))


def _json_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in JSON_SUFFIXES)


def read_coig(paths: list[str], options: dict) -> Iterator[RawRow | DataError]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = _json_files(path)
            if not files:
                raise DataError("the folder holds no .json / .jsonl files", str(path))
            for file in files:
                yield from iter_json_rows(file)
        elif _is_archive(path):
            check_file(path)
            for name, data in _members(path):
                yield from iter_json_document(data, name)
        else:
            yield from iter_json_rows(path)


# ----- converting ---------------------------------------------------------------------------------------------------
def _decode_response(value, field: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(_FENCE.sub("", value.strip()))
        except json.JSONDecodeError as exc:
            raise DataError(f"the response is not valid JSON ({exc.msg})", field=field) from None
    if not isinstance(value, dict):
        raise DataError(f"expected an object with Q and A, got {type_name(value)}", field=field)
    return value


def _counterfactual(row: dict) -> dict:
    rounds = sorted((int(m.group(1)), key) for key in row if (m := _ROUND.match(key)))
    pairs = []
    for _, key in rounds:
        turn = row[key]
        if not isinstance(turn, dict):
            raise DataError(f"expected an object with 'response', got {type_name(turn)}", field=key)
        if "response" not in turn:
            raise DataError("missing field 'response'", field=key)
        response = _decode_response(turn["response"], f"{key}.response")
        try:
            pairs.append((get_str(response, "Q"), get_str(response, "A")))
        except DataError as err:
            raise DataError(err.reason, field=f"{key}.response.{err.field}") from None
    return make_record(pairs_to_messages(pairs), subset="counterfactual")


def _exam(row: dict, analysis_mode: str) -> dict:
    parts = [get_str(row, "textbox_q_instruction", required=False), get_str(row, "textbox_q_context", required=False),
             get_str(row, "textbox_question")]
    prompt = "\n".join(part.strip() for part in parts if part.strip())
    answer = get_str(row, "textbox_answer", required=False).strip()
    analysis = get_str(row, "textbox_answer_analysis", required=False).strip()
    if analysis_mode == "drop" or not analysis:
        if not answer:
            raise DataError("is empty" if "textbox_answer" in row else "missing field 'textbox_answer'",
                            field="textbox_answer")
        output = answer
    elif not answer:
        output = analysis
    else:
        output = f"{answer}\n\n{analysis}" if analysis_mode == "append" else f"{analysis}\n\n{answer}"
    extra = {"subject": row["subject"]} if isinstance(row.get("subject"), str) and row["subject"].strip() else {}
    return make_record(pairs_to_messages([(prompt, output)]), subset="exam", **extra)


def _convert(row, options: dict) -> list[dict]:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type_name(row)}")
    if any(_ROUND.match(key) for key in row):
        return [_counterfactual(row)]
    if "textbox_question" in row or "textbox_q_instruction" in row:
        return [_exam(row, option_choice(options, "analysis", ("append", "prepend", "drop")))]
    if "trans_instruction" in row or "trans_output" in row:
        prompt = join_instruction(get_str(row, "trans_instruction"), get_str(row, "trans_input", required=False))
        return [make_record(pairs_to_messages([(prompt, get_str(row, "trans_output"))]), subset="translated")]
    if "instruction" in row and "output" in row:
        prompt = join_instruction(get_str(row, "instruction"), get_str(row, "input", required=False))
        return [make_record(pairs_to_messages([(prompt, get_str(row, "output"))]), subset="instructions")]
    raise DataError(f"not a COIG row: expected round_N (counterfactual chat), textbox_* (exam), trans_* "
                    f"(translated) or instruction/output fields; row has: {', '.join(map(str, row)) or 'no fields'}")


def _detect(row) -> bool:
    return isinstance(row, dict) and ("trans_instruction" in row or "textbox_question" in row
                                      or any(_ROUND.match(str(key)) for key in row))


def _folder_looks_like_coig(folder: Path) -> bool:
    """A folder whose first .json / .jsonl file starts with a COIG row (an unpacked counterfactual archive)."""
    first = next(iter(_json_files(folder)), None)
    if first is None:
        return False
    try:
        row = next(iter_json_rows(first), None)
    except DataError:
        return False
    return isinstance(row, RawRow) and _detect(row.value)


def _detect_files(paths: list[str]) -> bool:
    return bool(paths) and all(_is_archive(Path(p)) or (Path(p).is_dir() and _folder_looks_like_coig(Path(p)))
                               for p in paths)


register(FormatSpec(
    name="coig",
    description="COIG: translated (trans_*), exam / value alignment (textbox_*), instruction/output, and the "
                "counterfactual correction chats (round_N, .tar.gz or folder)",
    convert=_convert, read=read_coig, detect=_detect, detect_files=_detect_files, example="coig.jsonl",
    options={"analysis": "exam rows: append (default): answer, blank line, analysis; prepend: analysis, blank line, "
                         "answer; drop: the answer alone"},
    defaults={"analysis": "append"},
    signature="trans_instruction, textbox_question or round_N keys (or a .tar.gz / folder of dialogues)",
    validate=lambda o: option_choice(o, "analysis", ("append", "prepend", "drop")),
    accepts=lambda row: isinstance(row, dict) and "instruction" in row and "output" in row,
))
