"""The conversion driver: raw input files (or ``hf:NAME``) -> canonical records, for the CLI and for training.

``iter_records`` streams records (constant memory for jsonl input; a set of 16-byte digests with ``dedup``).
It is strict by default: the first bad row raises ``DataError`` with file, line, field and reason. With
``skip_invalid`` every bad row goes to the ``rejected`` callback instead (and is counted); nothing is dropped
without a trace: every row read is written, rejected or counted as a duplicate, and the report checks it
(``zhiling.data.accounting``). ``convert_files`` writes OUT.jsonl (or N stratified shards) and OUT.rejected.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from zhiling.data.accounting import RowAccount
from zhiling.data.formats import FormatSpec, OptionError, all_formats, get_format, option_bool, read_json_files
from zhiling.data.formats.hf import is_hf, read_hf
from zhiling.data.reader import RawRow
from zhiling.data.records import validate_record
from zhiling.errors import DataError

DETECT_ROWS = 20  # rows looked at to detect a format
PROGRESS_MIN_BYTES = 16 * 1024 * 1024  # inputs at least this big get a progress bar
RECORD_KEYS = ("id", "system", "messages", "source")


@dataclass
class Rejected:
    """A row that could not be converted (written to OUT.rejected.jsonl with --skip-invalid)."""

    file: str | None
    line: int | None
    field: str | None
    reason: str
    raw: str | None

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason, "raw": self.raw}


@dataclass
class ConvertReport(RowAccount):
    """The row account (read = written + rejected + duplicates, in rows) and what was written where."""

    records: int = 0  # canonical records written (PsyQA answers=all gives several per row)
    formats: dict[str, str] = field(default_factory=dict)  # input -> format used
    outputs: list[str] = field(default_factory=list)
    shard_counts: list[int] = field(default_factory=list)
    rejected_path: str | None = None
    kinds: Counter = field(default_factory=Counter)  # records per 'kind' (firefly) where rows have one

    def summary(self) -> str:
        """``1000 rows read = 997 written + 2 rejected + 1 duplicates``, and the records when they differ."""
        text = self.equation()
        return text + (f" ({self.records} records)" if self.records != self.written else "")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ----- detection ----------------------------------------------------------------------------------------------------
@dataclass
class Detection:
    spec: FormatSpec
    reason: str


def _keys_seen(values: list[Any]) -> str:
    keys = sorted({str(k) for v in values if isinstance(v, dict) for k in v})
    kinds = sorted({type(v).__name__ for v in values if not isinstance(v, dict)})
    text = ", ".join(keys) or "none"
    return text + (f" (and non-object rows: {', '.join(kinds)})" if kinds else "")


def _known_formats() -> str:
    return "; ".join(f"{spec.name} ({spec.signature})" for spec in all_formats().values())


def detect_files(paths: list[str]) -> Detection | None:
    """Formats that read whole files (couplets, COIG archives) recognise their inputs by name."""
    for spec in all_formats().values():
        if spec.detect_files is not None and spec.detect_files(paths):
            return Detection(spec, f"the input{'s are' if len(paths) > 1 else ' is'} {spec.signature}")
    return None


def detect_rows(values: list[Any], where: str) -> Detection:
    """The first format (in detection order) that recognises some sampled row and can read all of them; an error
    when no format fits or the rows look like different formats."""
    specs = [spec for spec in all_formats().values() if spec.detect is not None]
    total = len(values)
    for spec in specs:
        hits = sum(1 for value in values if spec.detect(value))
        if hits and all(spec.can_read(value) for value in values):
            rows = f"the first {total} rows" if hits == total else f"{hits} of the first {total} rows"
            if total == 1:
                rows = "the first row"
            verb = "has" if hits == 1 and total == 1 else "have"
            return Detection(spec, f"{rows} {verb} {spec.signature} (keys seen: {_keys_seen(values)})")
    firsts = {}
    for number, value in enumerate(values, start=1):
        match = next((spec.name for spec in specs if spec.detect(value)), None)
        firsts.setdefault(match, number)
    if any(firsts):
        looks = ", ".join(f"row {number} looks like {name or 'no known format'}" for name, number in firsts.items())
        raise DataError(f"cannot detect the format: the first rows disagree ({looks}); keys seen: "
                        f"{_keys_seen(values)}. Give --format explicitly. Known formats: {_known_formats()}", where)
    raise DataError(f"cannot detect the format: no known format matches the rows (keys seen: {_keys_seen(values)}). "
                    f"Give --format explicitly (the instruct format with --option columns=... maps any column "
                    f"names). Known formats: {_known_formats()}", where)


# ----- reading inputs -----------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """Inputs read together with one format (one file, one hf dataset, or all files of a whole-file format)."""

    label: str
    rows: Iterator[RawRow | DataError]
    spec: FormatSpec
    detection: str | None = None


def _peek(rows: Iterator, count: int) -> tuple[list, Iterator]:
    head = list(islice(rows, count))
    return head, chain(head, rows)


def _detect_group(label: str, rows: Iterator) -> tuple[FormatSpec, str, Iterator]:
    head, rows = _peek(rows, DETECT_ROWS)
    values = [row.value for row in head if isinstance(row, RawRow)]
    if not values:
        first = next((row for row in head if isinstance(row, DataError)), None)
        if first is not None:
            raise DataError(f"cannot detect the format: the first rows cannot be read ({first})", label)
        raise DataError("cannot detect the format: no rows", label)
    detection = detect_rows(values, label)
    return detection.spec, detection.reason, rows


def _groups(inputs: list[str], format: str, options: dict, hf_split: str | None,
            hf_config: str | None) -> Iterator[_Group]:
    hf_inputs = [item for item in inputs if is_hf(item)]
    paths = [item for item in inputs if not is_hf(item)]
    if format != "auto":
        spec = get_format(format)
        if paths:
            yield _Group(", ".join(paths), iter(spec.read(paths, options)), spec)
        for item in hf_inputs:
            yield _Group(item, read_hf(item, hf_config, hf_split), spec)
        return
    if paths:
        whole = detect_files(paths)
        if whole is not None:
            yield _Group(", ".join(paths), iter(whole.spec.read(paths, options)), whole.spec, whole.reason)
        else:
            for path in paths:
                spec, reason, rows = _detect_group(path, read_json_files([path], options))
                yield _Group(path, rows, spec, reason)
    for item in hf_inputs:
        spec, reason, rows = _detect_group(item, read_hf(item, hf_config, hf_split))
        yield _Group(item, rows, spec, reason)


# ----- progress -----------------------------------------------------------------------------------------------------
class _Progress:
    """A rich progress bar over input bytes (rate, ETA), or nothing for small inputs."""

    def __init__(self, inputs: list[str], enabled: bool | None):
        sizes = []
        for item in inputs:
            path = Path(item)
            if not is_hf(item) and path.is_file():
                sizes.append(path.stat().st_size)
            elif not is_hf(item) and path.is_dir():
                sizes.extend(p.stat().st_size for p in path.rglob("*") if p.is_file())
        self.total = sum(sizes)
        self.enabled = self.total >= PROGRESS_MIN_BYTES if enabled is None else enabled
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("convert", total=self.total or None)
        return self

    def advance(self, raw: str | None) -> None:
        if self.bar is not None and raw is not None:
            self.bar.advance(self.task, len(raw.encode("utf-8", errors="replace")) + 1)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----- records ------------------------------------------------------------------------------------------------------
def _ordered(record: dict) -> dict:
    out = {key: record.get(key) for key in RECORD_KEYS}
    out.update((key, value) for key, value in record.items() if key not in RECORD_KEYS)
    return out


def record_digest(record: dict) -> bytes:
    """What makes two records duplicates: the same system prompt and the same messages."""
    text = json.dumps([record.get("system") or "", record["messages"]], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _as_list(inputs: str | os.PathLike | Iterable) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        return [str(inputs)]
    return [str(item) for item in inputs]


def iter_records(inputs: str | Iterable[str], format: str = "auto", options: dict | None = None, *,
                 skip_invalid: bool = False, source: str | None = None, default_source: str | None = None,
                 rejected: Callable[[Rejected], Any] | None = None, dedup: bool = False,
                 max_samples: int | None = None, report: ConvertReport | None = None,
                 announce: Callable[[str], Any] | None = _stderr, progress: bool | None = None,
                 hf_split: str | None = None, hf_config: str | None = None,
                 seen: set[bytes] | None = None) -> Iterator[dict]:
    """Canonical records from raw inputs (file paths, folders for couplets / COIG, or ``hf:NAME[:SPLIT]``).

    Records get ``id`` = ``"{source}-{n:06d}"`` (n counts the records of this call from 1) unless the row has its
    own id, and ``source`` = ``source`` (forced), else the row's own, else ``default_source``, else the format
    name. ``report`` (if given) is filled in as records stream: every row read is counted as written (at least one
    of its records was given out), rejected, or a duplicate (all of its records were), and the account is checked
    when the stream ends. ``dedup`` drops records seen before; ``seen`` (a set of digests, implies ``dedup``)
    carries them across calls. ``max_samples`` counts the records given out, after dedup. ``announce`` receives
    the auto-detection messages and, with ``skip_invalid`` but no ``rejected`` callback, one line per skipped row
    (None: silent).
    """
    inputs = _as_list(inputs)
    if not inputs:
        raise DataError("no input files given")
    format = (format or "auto").strip()
    report = report if report is not None else ConvertReport()
    if format != "auto":
        options = get_format(format).check_options(options)
    dedup = dedup or seen is not None
    seen = seen if seen is not None else set()
    count = 0
    with _Progress(inputs, progress) as bar:
        for group in _groups(inputs, format, options or {}, hf_split, hf_config):
            group_options = group.spec.check_options(options) if format == "auto" else options
            report.formats[group.label] = group.spec.name
            if group.detection and announce is not None:
                announce(f"detected format '{group.spec.name}' for {group.label}: {group.detection}")
            require_answer = option_bool(group_options, "require_answer") if "require_answer" in group_options else True
            for row in group.rows:
                report.read += 1
                bar.advance(getattr(row, "raw", None))
                try:
                    if isinstance(row, DataError):
                        raise row
                    produced = [validate_record(record, require_answer=require_answer)
                                for record in group.spec.convert(row.value, group_options)]
                    if not produced:
                        raise DataError("the row gives no records")
                except OptionError:
                    raise
                except DataError as err:
                    path, line = (row.path, row.line) if isinstance(row, RawRow) else (None, None)
                    located = err.located(path, line)
                    if not skip_invalid:
                        raise located from None
                    report.rejected += 1
                    item = Rejected(located.path, located.line, located.field, located.reason,
                                    row.raw if isinstance(row, RawRow) else getattr(err, "raw", None))
                    if rejected is not None:
                        rejected(item)
                    elif announce is not None:
                        announce(f"skipped invalid row: {located}")
                    continue
                row_written = False
                for record in produced:
                    if dedup:
                        digest = record_digest(record)
                        if digest in seen:
                            continue
                        seen.add(digest)
                    if not row_written:
                        report.written += 1
                        row_written = True
                    count += 1
                    record_source = source or record.get("source") or default_source or group.spec.name
                    own_id = record.get("id")
                    record["id"] = str(own_id) if own_id not in (None, "") else f"{record_source}-{count:06d}"
                    record["source"] = record_source
                    report.records += 1
                    if record.get("kind") is not None:
                        report.kinds[str(record["kind"])] += 1
                    yield _ordered(record)
                    if max_samples is not None and count >= max_samples:
                        report.check()
                        return
                if not row_written:
                    report.duplicates += 1
    report.check()


# ----- writing ------------------------------------------------------------------------------------------------------
class StratifiedSharder:
    """Assigns records to N shards so that every shard gets the same share of each ``kind``.

    Within a kind, each run of N consecutive records goes to the N shards in a fresh seeded random order, so each
    shard holds floor(c/N) or ceil(c/N) of a kind with c records. Streaming, deterministic for a seed and an input.
    """

    def __init__(self, shards: int, seed: int = 42):
        self.shards = shards
        self.seed = seed
        self.state: dict[str, tuple[random.Random, list[int]]] = {}

    def shard_for(self, kind: Any) -> int:
        key = "" if kind is None else str(kind)
        if key not in self.state:
            self.state[key] = (random.Random(f"{self.seed}:{key}"), [])
        rng, order = self.state[key]
        if not order:
            order.extend(rng.sample(range(self.shards), self.shards))
        return order.pop()


def output_paths(output: str | Path, shards: int | None) -> tuple[list[Path], Path]:
    """(data files, rejected file) for OUT.jsonl: OUT.jsonl or OUT-00000-of-00004.jsonl ..., OUT.rejected.jsonl."""
    output = Path(output)
    stem = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.stem
    rejected = output.with_name(f"{stem}.rejected.jsonl")
    if not shards or shards == 1:
        return [output], rejected
    return [output.with_name(f"{stem}-{i:05d}-of-{shards:05d}.jsonl") for i in range(shards)], rejected


def _same_file(a: Path, b: str) -> bool:
    try:
        return not is_hf(b) and Path(b).exists() and a.exists() and a.resolve() == Path(b).resolve()
    except OSError:
        return False


def convert_files(inputs: str | Iterable[str], output: str | Path, format: str = "auto", options: dict | None = None,
                  *, skip_invalid: bool = False, dedup: bool = False, shards: int | None = None, seed: int = 42,
                  source: str | None = None, max_samples: int | None = None,
                  announce: Callable[[str], Any] | None = _stderr, progress: bool | None = None,
                  hf_split: str | None = None, hf_config: str | None = None) -> ConvertReport:
    """Convert inputs into OUT.jsonl (or ``shards`` files stratified by kind). Files appear only when every row
    was handled: they are written under temporary names and renamed at the end."""
    inputs = _as_list(inputs)
    if shards is not None and shards < 1:
        raise DataError(f"--shards must be at least 1, got {shards}")
    targets, rejected_path = output_paths(output, shards)
    for target in [*targets, rejected_path]:
        for item in inputs:
            if _same_file(target, item):
                raise DataError(f"the output {target} is also an input; choose another output name")
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    temps = [target.with_name(target.name + ".tmp") for target in targets]
    rejected_temp = rejected_path.with_name(rejected_path.name + ".tmp")
    report = ConvertReport()
    handles: list = []
    rejected_handle = None
    try:
        handles = [temp.open("w", encoding="utf-8") for temp in temps]
        rejected_handle = rejected_temp.open("w", encoding="utf-8") if skip_invalid else None
        sharder = StratifiedSharder(len(targets), seed)
        counts = [0] * len(targets)

        def write_rejected(item: Rejected) -> None:
            rejected_handle.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")

        records = iter_records(inputs, format, options, skip_invalid=skip_invalid, source=source,
                               rejected=write_rejected if skip_invalid else None, dedup=dedup,
                               max_samples=max_samples, report=report, announce=announce, progress=progress,
                               hf_split=hf_split, hf_config=hf_config)
        for record in records:
            index = sharder.shard_for(record.get("kind")) if len(targets) > 1 else 0
            handles[index].write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[index] += 1
        for handle in handles:
            handle.close()
        if rejected_handle is not None:
            rejected_handle.close()
        report.check()
    except BaseException:
        for handle in handles:
            handle.close()
        for temp in [*temps, rejected_temp]:
            temp.unlink(missing_ok=True)
        raise
    for temp, target in zip(temps, targets):
        os.replace(temp, target)
    if skip_invalid:
        os.replace(rejected_temp, rejected_path)
        report.rejected_path = str(rejected_path)
    report.outputs = [str(target) for target in targets]
    report.shard_counts = counts
    return report
