"""Read JSON-lines and JSON-array files row by row, keeping the line each row starts on.

Rows come back as ``RawRow``; a row that cannot be read comes back as a ``DataError`` in its place (with the line's
text, as well as it could be decoded, in its ``raw`` attribute), so a caller can
either stop (the default) or record it and go on (``--skip-invalid``). Problems that make the rest of a file
unreadable (an empty file, a broken JSON array) are raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from zhiling.data.records import type_name
from zhiling.errors import DataError


@dataclass
class RawRow:
    path: str
    line: int
    value: Any
    raw: str


def _decode(data: bytes, path: str, line: int | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        if line is None:
            line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"not valid UTF-8: byte 0x{data[exc.start]:02x} at column {exc.start - start + 1} "
                        f"(convert the file to UTF-8, e.g. iconv -f GBK -t UTF-8)", path, line) from None


def _first_char(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(4096)
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    return text[:1]


def check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", str(path))
    if path.is_dir():
        raise DataError("is a folder, expected a file", str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty", str(path))
    return path


def read_json_object(path: str | Path, *, unreadable: str = "not valid JSON",
                     expected: str = "expected a JSON object") -> dict:
    """A whole file that holds one JSON object (a side file, a mapping); a ``DataError`` naming the file when it
    cannot be read, is not JSON, or holds something else."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read it: {exc.strerror or exc}", str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{unreadable}: {exc}", str(path)) from None
    if not isinstance(value, dict):
        raise DataError(f"{expected}, got {type_name(value)}", str(path))
    return value


def iter_jsonl(path: str | Path) -> Iterator[RawRow | DataError]:
    path = check_file(path)
    seen = False
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            if not data.strip():
                continue
            seen = True
            try:
                text = _decode(data, str(path), number).rstrip("\r\n")
            except DataError as err:
                err.raw = data.decode("utf-8", errors="replace").rstrip("\r\n")
                yield err
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                err = DataError(f"malformed JSON: {exc.msg} at column {exc.colno}", str(path), number)
                err.raw = text
                yield err
                continue
            yield RawRow(str(path), number, value, text)
    if not seen:
        raise DataError("file has no rows (only blank lines)", str(path))


def iter_json_array(path: str | Path) -> Iterator[RawRow | DataError]:
    """Rows of a JSON array file, each with the line its element starts on."""
    path = check_file(path)
    text = _decode(path.read_bytes(), str(path), None).lstrip("\ufeff")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    count = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            if text[pos] == "\n":
                line += 1
            pos += 1
        if pos >= len(text):
            raise DataError("malformed JSON: the array is not closed with ']'", str(path), line)
        if text[pos] == "]":
            break
        if count:
            if text[pos] != ",":
                raise DataError(f"malformed JSON: expected ',' or ']' between rows, found {text[pos]!r}",
                                str(path), line)
            pos += 1
            while pos < len(text) and text[pos] in " \t\r\n":
                if text[pos] == "\n":
                    line += 1
                pos += 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} (the rest of the array cannot be read)", str(path),
                            exc.lineno) from None
        raw = text[pos:end]
        yield RawRow(str(path), line, value, raw)
        line += raw.count("\n")
        pos = end
        count += 1
    if count == 0:
        raise DataError("the JSON array is empty", str(path))


def iter_json_rows(path: str | Path) -> Iterator[RawRow | DataError]:
    """Rows of a ``.json`` / ``.jsonl`` file, whichever layout it has (a JSON array, or one object per line)."""
    path = check_file(path)
    if _first_char(path) == "[":
        return iter_json_array(path)
    return iter_jsonl(path)


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Lines of a UTF-8 text file with their 1-based numbers (non-UTF-8 bytes raise ``DataError``)."""
    path = check_file(path)
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            yield number, _decode(data, str(path), number).rstrip("\r\n")
