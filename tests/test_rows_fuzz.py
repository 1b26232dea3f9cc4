"""Every row accounted for, under fuzzing: for every input format and for the reader itself, damaged input gives
either a ``ZhilingError`` naming the file, or (with --skip-invalid) ``read == written + rejected + duplicates``
exactly, with ``read`` equal to the number of rows the input holds (counted here without the reader).

The damage: random truncation, byte flips, BOMs, CRLF line ends, NUL bytes, data after a JSON array, nested (and
deeply nested) arrays, lone surrogate escapes, repeated, dropped and blank lines, ``.txt`` names for JSON files, and
for COIG, damaged archives and damaged archive members. The seed is printed; set ZHILING_FUZZ_SEED to replay a run.
A failing case names its seed, format and case number, and ``random.Random(f"{seed}:{format}:{case}")`` rebuilds it.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest

from zhiling.data.convert import convert_files, iter_records
from zhiling.data.formats import all_formats
from zhiling.data.reader import HEAD_BYTES, SINGLE_OBJECT_LIMIT, RawRow, iter_json_document, iter_json_rows
from zhiling.errors import DataError, ZhilingError

SEED = int(os.environ.get("ZHILING_FUZZ_SEED", "20261202"))
CASES = 200  # per format
BOM = b"\xef\xbb\xbf"
UNKNOWN = -1  # the input's row count cannot be known (a damaged archive may still unpack, into other bytes)


# ----- an independent count of the rows a document holds (the layout rules of docs/formats.md) --------------------
def _first_char(data: bytes) -> str:
    return data[:HEAD_BYTES].decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")[:1]


def _parses(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
        return True
    except (ValueError, RecursionError):
        return False


def expected_json_rows(data: bytes) -> int | None:
    """Rows in a JSON document, or None when it is broken as a whole (an error must be raised)."""
    if not data:
        return None
    if _first_char(data) == "[":
        try:
            text = data.decode("utf-8")
            value = json.loads(text[1:] if text.startswith("\ufeff") else text)
        except (ValueError, RecursionError):
            return None
        return len(value) if isinstance(value, list) and value else None
    lines = data.split(b"\n")
    if lines[0].startswith(BOM):
        lines[0] = lines[0][3:]
    filled = [index for index, line in enumerate(lines) if line.strip()]
    if not filled:
        return None
    if _first_char(data) == "{" and len(data) <= SINGLE_OBJECT_LIMIT and not _parses(lines[filled[0]]):
        try:
            value = json.loads(b"\n".join(lines[filled[0]:]).decode("utf-8", "replace"))
            if isinstance(value, dict):
                return 1
        except (ValueError, RecursionError):
            pass
    return len(filled)


def expected_text_lines(data: bytes) -> int:
    """Lines up to the last non-blank one (how couplet files are counted)."""
    lines = data.split(b"\n")
    return max((index + 1 for index, line in enumerate(lines) if line.strip()), default=0)


# ----- damage ---------------------------------------------------------------------------------------------------------
def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
    return bytes(out)


def add_bom(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.7:
        return BOM + data
    lines = _lines(data)
    index = rng.randrange(len(lines))
    lines[index] = BOM + lines[index]
    return b"\n".join(lines)


def crlf(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return data.replace(b"\n", b"\r\n")
    return b"\n".join(line + b"\r" if rng.random() < 0.5 else line for line in _lines(data))


def nul_bytes(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + b"\x00" * rng.randint(1, 4) + data[at:]


def trailing_data(data: bytes, rng: random.Random) -> bytes:
    tail = rng.choice([b'\n{"instruction": "x", "output": "y"}\n', b"\n[]\n", b"]", b"garbage", b",\n",
                       b"\n" + data, b"\x00"])
    return data + tail


def nested_arrays(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    index = rng.randrange(len(lines))
    if rng.random() < 0.3:
        depth = rng.choice([50, 3000])
        lines[index] = b"[" * depth + lines[index].rstrip(b",\r") + b"]" * depth + (
            b"," if lines[index].rstrip(b"\r").endswith(b",") else b"")
    elif rng.random() < 0.5:
        return b"[" + data + b"]"
    else:
        stripped = lines[index].rstrip(b"\r")
        comma = stripped.endswith(b",")
        lines[index] = b"[" + stripped.rstrip(b",") + b"]" + (b"," if comma else b"")
    return b"\n".join(lines)


def lone_surrogate(data: bytes, rng: random.Random) -> bytes:
    spots = [i for i in range(len(data)) if data[i:i + 1] == b'"']
    if not spots:
        return data
    at = rng.choice(spots) + 1
    return data[:at] + rng.choice([b"\\ud800", b"\\udfff", b"\\uDBFF"]) + data[at:]


def repeat_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    index = rng.randrange(len(lines))
    lines.insert(index, lines[index])
    return b"\n".join(lines)


def drop_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    del lines[rng.randrange(len(lines))]
    return b"\n".join(lines)


def blank_lines(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    lines.insert(rng.randrange(len(lines) + 1), rng.choice([b"", b"   ", b"\t", b"\r"]))
    return b"\n".join(lines)


DAMAGE = [truncate, flip_bytes, add_bom, crlf, nul_bytes, trailing_data, nested_arrays, lone_surrogate,
          repeat_line, drop_line, blank_lines]


def damage(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    done = []
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        step = rng.choice(DAMAGE)
        data = step(data, rng)
        done.append(step.__name__)
    return data, done


# ----- inputs built from each format's example --------------------------------------------------------------------
def example_rows(name: str) -> list:
    path = all_formats()[name].example_path
    return [row.value for row in iter_json_rows(path) if isinstance(row, RawRow)]


def json_document(rows: list, rng: random.Random) -> bytes:
    picked = [rng.choice(rows) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.5:
        return json.dumps(picked, ensure_ascii=False, indent=rng.choice([None, 1, 2])).encode("utf-8")
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in picked).encode("utf-8")


def counterfactual(rng: random.Random) -> dict:
    rounds = {f"round_{i}": {"response": json.dumps({"Q": f"问题{i}", "A": f"回答{i}"}, ensure_ascii=False)}
              for i in range(rng.randint(1, 3))}
    return rounds


def archive(members: dict[str, bytes], compressed: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compressed else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Case:
    """One fuzz case: input files written to a folder, the format to read them with, and the rows they hold."""

    def __init__(self, folder: Path, fmt: str, rng: random.Random):
        self.folder, self.rng = folder, rng
        self.inputs: list[Path] = []
        self.expected: int | None = 0
        self.damage: list[str] = []
        self.options: dict = {}
        self.format = fmt if rng.random() < 0.5 else "auto"
        getattr(self, f"build_{fmt}", self.build_json)(fmt)

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        self.inputs.append(path)
        return path

    def add_json(self, name: str, data: bytes) -> None:
        data, done = damage(data, self.rng)
        self.damage += done
        self.write(name, data)
        count = expected_json_rows(data)
        self.expected = None if count is None or self.expected is None else self.expected + count

    def build_json(self, fmt: str) -> None:
        rows = example_rows(fmt)
        if fmt == "psyqa" and self.format != "auto" and self.rng.random() < 0.4:
            self.options = {"answers": "all"}
        suffix = self.rng.choice([".json", ".jsonl", ".txt"])
        self.add_json(f"data{suffix}", json_document(rows, self.rng))

    def build_couplets(self, fmt: str) -> None:
        folder = all_formats()["couplets"].example_path
        counts = []
        for name in ("in.txt", "out.txt"):
            data = (folder / name).read_bytes()
            if self.rng.random() < 0.6:
                data, done = damage(data, self.rng)
                self.damage += [f"{name}:{step}" for step in done]
            self.write(name, data)
            counts.append(expected_text_lines(data))
        self.expected = counts[0] if counts[0] == counts[1] and counts[0] else None

    def build_coig(self, fmt: str) -> None:
        if self.rng.random() < 0.4:
            return self.build_json(fmt)
        rows = [row for row in example_rows("coig")]
        members = {}
        for index in range(self.rng.randint(1, 3)):
            kind = self.rng.choice(["dialogue", "jsonl", "array"])
            if kind == "dialogue":
                data = json.dumps(counterfactual(self.rng), ensure_ascii=False, indent=2).encode("utf-8")
                name = f"chats/{index:04d}.json"
            else:
                picked = [self.rng.choice(rows) for _ in range(self.rng.randint(1, 5))]
                data = (json.dumps(picked, ensure_ascii=False).encode("utf-8") if kind == "array" else
                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked).encode("utf-8"))
                name = f"part{index}.{'json' if kind == 'array' else 'jsonl'}"
            if self.rng.random() < 0.5:
                data, done = damage(data, self.rng)
                self.damage += [f"{name}:{step}" for step in done]
            members[name] = data
            count = expected_json_rows(data)
            self.expected = None if count is None or self.expected is None else self.expected + count
        compressed = self.rng.random() < 0.7
        blob = archive(members, compressed)
        if self.rng.random() < 0.3:
            blob = self.rng.choice([truncate, flip_bytes])(blob, self.rng)
            self.damage.append("archive damaged")
            self.expected = UNKNOWN
        self.write("chats.tar.gz" if compressed else "chats.tar", blob)


# ----- the property -------------------------------------------------------------------------------------------------
def names_a_file(err: ZhilingError, case: Case) -> bool:
    return any(str(path) in str(err) for path in case.inputs)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_case(fmt: str, case_number: int, folder: Path) -> str:
    rng = random.Random(f"{SEED}:{fmt}:{case_number}")
    folder.mkdir()
    case = Case(folder, fmt, rng)
    where = (f"seed {SEED}, format {fmt}, case {case_number} (read as {case.format}, damage: "
             f"{', '.join(case.damage) or 'none'})")
    inputs = [str(path) for path in case.inputs]
    if fmt == "couplets" and rng.random() < 0.5:
        inputs = [str(folder)]
    try:
        strict = list(iter_records(inputs, case.format, case.options, announce=None))
    except ZhilingError as err:
        assert names_a_file(err, case) or str(folder) in str(err), f"{where}: the error names no file: {err}"
        strict = None
    except Exception as exc:  # noqa: BLE001 - the property under test: nothing else escapes
        raise AssertionError(f"{where}: strict reading raised {type(exc).__name__}: {exc}") from exc

    out = folder / "out.jsonl"
    dedup = rng.random() < 0.5
    try:
        report = convert_files(inputs, out, case.format, case.options, skip_invalid=True, dedup=dedup,
                               announce=None, progress=False)
    except ZhilingError as err:
        assert names_a_file(err, case) or str(folder) in str(err), f"{where}: the error names no file: {err}"
        assert strict is None, f"{where}: strict reading worked but --skip-invalid raised {err}"
        return "error"
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{where}: --skip-invalid raised {type(exc).__name__}: {exc}") from exc

    account = (report.read, report.written, report.rejected, report.duplicates)
    assert report.read == report.written + report.rejected + report.duplicates, f"{where}: {account}"
    assert case.expected is not None, f"{where}: a broken document was read without an error: {account}"
    if case.expected != UNKNOWN:
        assert report.read == case.expected, f"{where}: {case.expected} rows in the input, {account}"
    assert len(read_lines(out)) == report.records, where
    rejected = read_lines(folder / "out.rejected.jsonl")
    assert len(rejected) == report.rejected, where
    for item in rejected:
        assert item["file"] and item["reason"] and (item["line"] is None or item["line"] >= 1), f"{where}: {item}"
    if strict is not None:
        assert report.rejected == 0, f"{where}: strict reading worked but rows were rejected: {account}"
        assert dedup or len(strict) == report.records, where
    return "rejected" if report.rejected else "clean"


FORMATS = list(all_formats())


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_every_row_accounted_for(fmt, tmp_path, capsys):
    outcomes = {"clean": 0, "rejected": 0, "error": 0}
    for case_number in range(CASES):
        outcomes[run_case(fmt, case_number, tmp_path / f"c{case_number}")] += 1
    with capsys.disabled():
        print(f"\nfuzz seed {SEED}: {fmt}: {CASES} cases ({outcomes['clean']} clean, {outcomes['rejected']} with "
              f"rejected rows, {outcomes['error']} stopped with an error naming the file)")
    assert sum(outcomes.values()) == CASES
    assert outcomes["clean"] and outcomes["rejected"] and outcomes["error"], outcomes


def test_fuzz_reader(tmp_path, capsys):
    """The reader alone, on documents mixing every format's rows: each row comes back (as a row or as its error),
    the count matches the document, every row can be written as UTF-8, and a broken document raises DataError."""
    pool = [row for name in FORMATS if name != "couplets" for row in example_rows(name)]
    errors = 0
    for case_number in range(CASES):
        rng = random.Random(f"{SEED}:reader:{case_number}")
        data, done = damage(json_document(pool, rng), rng)
        where = f"seed {SEED}, reader, case {case_number} (damage: {', '.join(done) or 'none'})"
        expected = expected_json_rows(data)
        path = tmp_path / f"r{case_number}.json"
        path.write_bytes(data)
        for label, read in ((str(path), lambda: iter_json_rows(path)),
                            (f"{path}:member", lambda: iter_json_document(data, f"{path}:member"))):
            try:
                rows = list(read())
            except DataError as err:
                assert err.path == label, f"{where}: {err}"
                assert expected is None, f"{where}: raised {err} for a document of {expected} rows"
                errors += 1
                continue
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
            assert expected is not None and len(rows) == expected, f"{where}: {len(rows)} rows, expected {expected}"
            for row in rows:
                assert row.path == label and row.line >= 1, where
                if isinstance(row, RawRow):
                    json.dumps(row.value, ensure_ascii=False).encode("utf-8")
    with capsys.disabled():
        print(f"\nfuzz seed {SEED}: reader: {CASES} cases x 2 (file, archive member), {errors} documents rejected "
              f"as a whole")
    assert errors
