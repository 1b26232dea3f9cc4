"""Read JSON data row by row, keeping the line each row starts on: files and in-memory documents (archive members).

The layout is read from the content, never from the name: a JSON array (the first character is ``[``), one JSON
value per line (JSON lines, whatever the extension: ``.json``, ``.jsonl``, ``.txt``), or one object written over
several lines (a pretty-printed dialogue file, up to ``SINGLE_OBJECT_LIMIT`` bytes).

Rows come back as ``RawRow``; a row that cannot be read comes back as a ``DataError`` in its place (with the line's
text, as well as it could be decoded, in its ``raw`` attribute), so a caller can either stop (the default) or record
it and go on (``--skip-invalid``). Problems that make the rest of a document unreadable (an empty file, a JSON array
that breaks off or has data after its closing ``]``) are raised. Nothing else escapes: no ``UnicodeDecodeError``,
``JSONDecodeError`` or ``RecursionError`` reaches the caller, and every row handed out can be written back as UTF-8.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from zhiling.data.records import type_name
from zhiling.errors import DataError

HEAD_BYTES = 4096  # bytes looked at to tell a JSON array from JSON lines
SINGLE_OBJECT_LIMIT = 16 * 1024 * 1024  # documents up to this size may hold one object written over several lines
_BLANK = " \t\r\n"
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


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


def _first_char(head: bytes) -> str:
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff" + _BLANK)
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
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{unreadable}: {_why(exc)}", str(path)) from None
    if not isinstance(value, dict):
        raise DataError(f"{expected}, got {type_name(value)}", str(path))
    return value


# ----- one value ----------------------------------------------------------------------------------------------------
def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    return str(exc)


def _unpaired_surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in the strings of a parsed value (JSON allows ``\\ud800``; UTF-8 cannot hold
    it, so such a row could never be written out)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"\\u{ord(item[exc.start]):04x}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _row(path: str, line: int, value: Any, raw: str) -> RawRow | DataError:
    """A parsed row, or the error that replaces it when its strings cannot be written as UTF-8."""
    if _ESCAPED_SURROGATE.search(raw):
        surrogate = _unpaired_surrogate(value)
        if surrogate is not None:
            err = DataError(f"the text holds an unpaired surrogate {surrogate} (a broken \\u escape), which UTF-8 "
                            f"cannot encode", path, line)
            err.raw = raw
            return err
    return RawRow(path, line, value, raw)


def _parse_line(text: str, path: str, line: int) -> RawRow | DataError:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        err = DataError(f"malformed JSON: {_why(exc)}{where}", path, line)
        err.raw = text
        return err
    return _row(path, line, value, text)


# ----- layouts ------------------------------------------------------------------------------------------------------
def _line_rows(handle: IO[bytes], path: str) -> Iterator[RawRow | DataError]:
    """JSON lines: each non-blank line is one row."""
    seen = False
    for number, data in enumerate(handle, start=1):
        if number == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        if not data.strip():
            continue
        seen = True
        try:
            text = _decode(data, path, number).rstrip("\r\n")
        except DataError as err:
            err.raw = data.decode("utf-8", errors="replace").rstrip("\r\n")
            yield err
            continue
        yield _parse_line(text, path, number)
    if not seen:
        raise DataError("file has no rows (only blank lines)", path)


def _skip_blank(text: str, pos: int, line: int) -> tuple[int, int]:
    while pos < len(text) and text[pos] in _BLANK:
        if text[pos] == "\n":
            line += 1
        pos += 1
    return pos, line


def _array_rows(text: str, path: str) -> Iterator[RawRow | DataError]:
    """The elements of a JSON array, each with the line it starts on; nothing but blanks may follow the ``]``."""
    pos, line = _skip_blank(text, 1 if text.startswith("\ufeff") else 0, 1)
    if not text.startswith("[", pos):
        raise DataError("expected a JSON array starting with '['", path, line)
    decoder = json.JSONDecoder()
    pos += 1
    count = 0
    while True:
        pos, line = _skip_blank(text, pos, line)
        if pos >= len(text):
            raise DataError("malformed JSON: the array is not closed with ']'", path, line)
        if text[pos] == "]":
            break
        if count:
            if text[pos] != ",":
                raise DataError(f"malformed JSON: expected ',' or ']' between rows, found {text[pos]!r}", path, line)
            pos, line = _skip_blank(text, pos + 1, line)
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            at = exc.lineno if isinstance(exc, json.JSONDecodeError) else line
            raise DataError(f"malformed JSON: {_why(exc)} (the rest of the array cannot be read)", path, at) from None
        raw = text[pos:end]
        yield _row(path, line, value, raw)
        line += raw.count("\n")
        pos = end
        count += 1
    end, end_line = _skip_blank(text, pos + 1, line)
    if end < len(text):
        raise DataError(f"malformed JSON: data after the closing ']' of the array (it starts with "
                        f"{text[end:end + 20]!r}); a file holds one array, or one JSON value per line", path, end_line)
    if count == 0:
        raise DataError("the JSON array is empty", path)


def _first_line(handle: IO[bytes]) -> tuple[int, bytes]:
    for number, data in enumerate(handle, start=1):
        if number == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        if data.strip():
            return number, data
    return 0, b""


def _single_object(handle: IO[bytes], path: str) -> RawRow | DataError | None:
    """One JSON object written over several lines, or None when the document is something else (JSON lines)."""
    number, first = _first_line(handle)
    try:
        json.loads(first.decode("utf-8"))
        return None  # the first line is a whole value: JSON lines
    except (ValueError, RecursionError):
        pass
    data = first + handle.read()
    text = data.decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    try:
        _decode(data, path, None)
    except DataError as err:  # one object, with a byte that is not UTF-8: the whole object is the bad row
        located = DataError(err.reason, path, number + err.line - 1)
        located.raw = text.strip()
        return located
    return _row(path, number, value, text.strip())


def _json_rows(path: str, opener: Callable[[], IO[bytes]], size: int) -> Iterator[RawRow | DataError]:
    with opener() as handle:
        first = _first_char(handle.read(HEAD_BYTES))
    if first == "[":
        with opener() as handle:
            yield from _array_rows(_decode(handle.read(), path, None), path)
        return
    if first == "{" and size <= SINGLE_OBJECT_LIMIT:
        with opener() as handle:
            row = _single_object(handle, path)
        if row is not None:
            yield row
            return
    with opener() as handle:
        yield from _line_rows(handle, path)


# ----- public readers -----------------------------------------------------------------------------------------------
def iter_jsonl(path: str | Path) -> Iterator[RawRow | DataError]:
    """Rows of a JSON lines file (streamed: constant memory)."""
    path = check_file(path)

    def rows() -> Iterator[RawRow | DataError]:
        with path.open("rb") as handle:
            yield from _line_rows(handle, str(path))

    return rows()


def iter_json_array(path: str | Path) -> Iterator[RawRow | DataError]:
    """Rows of a JSON array file, each with the line its element starts on."""
    path = check_file(path)
    return _array_rows(_decode(path.read_bytes(), str(path), None), str(path))


def iter_json_rows(path: str | Path) -> Iterator[RawRow | DataError]:
    """Rows of a JSON file, whichever layout its content has (see the module docstring)."""
    path = check_file(path)
    return _json_rows(str(path), lambda: path.open("rb"), path.stat().st_size)


def iter_json_document(data: bytes, name: str) -> Iterator[RawRow | DataError]:
    """Rows of a JSON document held in memory (an archive member named ``name``), read as ``iter_json_rows``
    reads a file."""
    if not data:
        raise DataError("is empty", name)
    return _json_rows(name, lambda: io.BytesIO(data), len(data))


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Lines of a UTF-8 text file with their 1-based numbers (non-UTF-8 bytes raise ``DataError``)."""
    path = check_file(path)
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            yield number, _decode(data, str(path), number).rstrip("\r\n")


def looks_like_json(path: str | Path) -> bool:
    """Whether a text file holds JSON (its first non-blank character opens an object or an array), whatever its
    extension: a ``.txt`` file of JSON lines is data rows, not plain text lines."""
    with Path(path).open("rb") as handle:
        return _first_char(handle.read(HEAD_BYTES)) in ("{", "[")
