"""Couplets (对联): paired ``in.txt`` (上联) / ``out.txt`` (下联) files, line i of one pairs with line i of the other.

The characters in these files are usually separated by spaces; all whitespace inside a line is removed. The prompt
asks for the 下联 of the 上联 (``prompt`` option, ``{first}`` stands for the 上联); the answer is the 下联.

Inputs: a folder holding ``in.txt`` and ``out.txt``, or the two files themselves (in.txt first). Several folders or
pairs may be given. Trailing blank lines at the end of a file are ignored; line counts that still differ are an error
naming both files. Auto-detection takes ``.txt`` files for couplets only when their content is plain text: a ``.txt``
file of JSON rows (one object per line, like baichuan-QLoRA-Tuning's ``data/msra/train.txt``) is read as JSON, and
the format of its rows is detected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from zhiling.data.formats import FormatSpec, OptionError, register
from zhiling.data.reader import RawRow, check_file, looks_like_json
from zhiling.data.records import get_str, make_record, pairs_to_messages
from zhiling.errors import DataError

DEFAULT_PROMPT = "请为下面的上联对出下联。\n上联：{first}"
_SPACES = re.compile(r"\s+")


def pair_files(paths: list[str]) -> list[tuple[Path, Path]]:
    pairs: list[tuple[Path, Path]] = []
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            first, second = path / "in.txt", path / "out.txt"
            missing = [p.name for p in (first, second) if not p.is_file()]
            if missing:
                raise DataError(f"a couplets folder must hold in.txt and out.txt; missing {' and '.join(missing)}",
                                str(path))
            pairs.append((first, second))
        else:
            files.append(path)
    if len(files) % 2:
        raise DataError(f"couplets needs in.txt / out.txt files in pairs (in first), got {len(files)} file(s): "
                        f"{', '.join(map(str, files))}")
    for first, second in zip(files[::2], files[1::2]):
        if "out" in first.stem.lower() and "in" in second.stem.lower() and "out" not in second.stem.lower():
            raise DataError(f"give the 上联 file (in.txt) before the 下联 file (out.txt): got {first} then {second}")
        pairs.append((first, second))
    return pairs


def _line_count(path: Path) -> int:
    """Number of lines up to the last one that is not blank."""
    count = last = 0
    with check_file(path).open("rb") as handle:
        for count, data in enumerate(handle, start=1):
            if data.strip():
                last = count
    return last


def _lines(path: Path, limit: int) -> Iterator[tuple[int, str | DataError, str]]:
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number > limit:
                return
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            raw = data.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                yield number, data.decode("utf-8").rstrip("\r\n"), raw
            except UnicodeDecodeError as exc:
                yield number, DataError(f"not valid UTF-8: byte 0x{data[exc.start]:02x} at column {exc.start + 1}",
                                        str(path), number), raw


def read_couplets(paths: list[str], options: dict) -> Iterator[RawRow | DataError]:
    for first, second in pair_files(paths):
        count_in, count_out = _line_count(first), _line_count(second)
        if count_in == 0:
            raise DataError("file has no lines", str(first))
        if count_in != count_out:
            raise DataError(f"line counts differ: {first} has {count_in} lines but {second} has {count_out}; line i "
                            f"of the 上联 file must pair with line i of the 下联 file")
        for (number, upper, raw_upper), (_, lower, raw_lower) in zip(_lines(first, count_in),
                                                                     _lines(second, count_out)):
            for part in (upper, lower):
                if isinstance(part, DataError):
                    part.raw = f"{raw_upper}\t{raw_lower}"
                    yield part
                    break
            else:
                yield RawRow(str(first), number, {"first": upper, "second": lower, "out_file": str(second)},
                             f"{raw_upper}\t{raw_lower}")


def _prompt(options: dict) -> str:
    template = str(options.get("prompt") or DEFAULT_PROMPT)
    if "{first}" not in template:
        raise OptionError("option prompt must contain {first} where the 上联 goes")
    return template


def _convert(row, options: dict) -> list[dict]:
    template = _prompt(options)
    upper = _SPACES.sub("", get_str(row, "first", allow_empty=True))
    lower = _SPACES.sub("", get_str(row, "second", allow_empty=True))
    if not upper:
        raise DataError("the 上联 line is empty", field="in.txt")
    if not lower:
        raise DataError(f"the 下联 line is empty (in {row.get('out_file', 'out.txt')})", field="out.txt")
    return [make_record(pairs_to_messages([(template.replace("{first}", upper), lower)]))]


def _plain_text(path: Path) -> bool:
    """A ``.txt`` file of text lines; a missing one counts (reading it names it), one of JSON rows does not."""
    return path.suffix.lower() == ".txt" and not (path.is_file() and looks_like_json(path))


def _detect_files(paths: list[str]) -> bool:
    def looks_like(path: Path) -> bool:
        if path.is_dir():
            return (path / "in.txt").is_file() and (path / "out.txt").is_file() and _plain_text(path / "in.txt")
        return _plain_text(path)

    return bool(paths) and all(looks_like(Path(p)) for p in paths)


register(FormatSpec(
    name="couplets",
    description="couplets (对联): paired in.txt (上联) / out.txt (下联) files or a folder holding both",
    convert=_convert, read=read_couplets, detect_files=_detect_files, example="couplets",
    options={"prompt": "the prompt; {first} is replaced by the 上联"},
    defaults={"prompt": DEFAULT_PROMPT},
    signature="paired in.txt / out.txt files",
    validate=lambda o: _prompt(o),
))
