"""Batch prediction behind ``zhiling predict``: prompts in, one JSON row per prompt out, resumable.

Inputs: a ``.txt`` file (one prompt per line), a JSON / JSON-lines list of strings, or any supported data format
(``zhiling data formats``). For data records the prompt is the conversation up to its last user turn, and the
reference is the assistant answer that follows it, when the record has one.

Output rows (the format ``zhiling eval`` reads, see ``zhiling.eval.predictions``)::

    {"id": "zhiling_zh-000001", "prompt": "...", "output": "...", "reference": "...", "task": "ner",
     "finish_reason": "stop", "prompt_tokens": 31, "completion_tokens": 12}

``prompt`` is the user's message, or the list of messages for a multi-turn prompt; ``system`` is added when the
record has one; other keys of the record (``task``, ``source`` ...) are kept. The run's identity (model, adapter,
backend, template, generation parameters, input file) is written to ``OUT.jsonl.meta.json``. Re-running the same
command skips the rows already in OUT.jsonl (by id); a different model or parameters is refused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zhiling import __version__
from zhiling.config import GenerationConfig
from zhiling.data.reader import check_file, iter_json_rows, iter_text_lines
from zhiling.data.records import turns, type_name
from zhiling.errors import DataError, ZhilingError
from zhiling.infer.engine import ChatRequest, Engine
from zhiling.owned import Mark, remove_owned

META_SUFFIX = ".meta.json"  # the side file zhiling.eval.predictions reads
_RECORD_KEYS = ("id", "system", "messages")


@dataclass
class PredictItem:
    id: str
    request: ChatRequest
    reference: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # file and line, for error messages

    @property
    def prompt(self) -> str | list[dict]:
        if not self.request.history:
            return self.request.query
        return self.request.messages()


def meta_path(output: str | Path) -> Path:
    return Path(str(output) + META_SUFFIX)


# predictions zhiling wrote have their side file beside them; --overwrite removes no other file
PREDICTIONS_FILE = Mark(lambda path: meta_path(path).is_file(), f"no {META_SUFFIX} side file beside it")


# ----- reading inputs --------------------------------------------------------------------------------------------
def _text_items(path: Path) -> list[PredictItem]:
    items = []
    for number, line in iter_text_lines(path):
        if line.strip():
            items.append(PredictItem(f"line-{number}", ChatRequest(line), where=f"{path}, line {number}"))
    return items


def _item_from_record(record: dict) -> PredictItem:
    pairs = turns(record)
    query, answer = pairs[-1]
    history = [(u, a) for u, a in pairs[:-1]]
    system = record.get("system") or None
    extra = {k: v for k, v in record.items() if k not in _RECORD_KEYS}
    if system:
        extra["system"] = system
    return PredictItem(str(record["id"]), ChatRequest(query, history, system), answer, extra)


def read_items(path: str | Path, format: str = "auto", options: dict | None = None,
               announce: Callable[[str], Any] | None = None) -> list[PredictItem]:
    """Every prompt of ``path``; a bad file or row raises DataError naming the file, line and field."""
    path = check_file(path)
    if format == "auto" and path.suffix.lower() == ".txt":
        items = _text_items(path)
    elif format == "auto" and (strings := _string_list(path)) is not None:
        items = strings
    else:
        items = _record_items(path, format, options, announce)
    if not items:
        raise DataError("no prompts in the file", str(path))
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise DataError(f"duplicate id {item.id!r} (ids must be unique so that a re-run can skip finished rows)",
                            str(path), field="id")
        seen[item.id] = item.where
    return items


def _string_list(path: Path) -> list[PredictItem] | None:
    """Prompts of a JSON array / JSON lines file of strings, or None when its rows are objects."""
    rows = iter_json_rows(path)
    items: list[PredictItem] = []
    for index, row in enumerate(rows, start=1):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row.value, str):
            if not items:
                return None
            raise DataError(f"expected a string like the rows before it, got {type_name(row.value)}",
                            str(path), row.line)
        if not row.value.strip():
            raise DataError("empty prompt", str(path), row.line)
        items.append(PredictItem(f"item-{index}", ChatRequest(row.value), where=f"{path}, line {row.line}"))
    return items


def _record_items(path: Path, format: str, options: dict | None, announce) -> list[PredictItem]:
    from zhiling.data.convert import detect_rows, iter_records
    from zhiling.data.formats import get_format
    from zhiling.data.reader import RawRow

    options = dict(options or {})
    if format == "auto":
        head = []
        for row in iter_json_rows(path):
            if isinstance(row, DataError):
                raise row
            head.append(row)
            if len(head) >= 20:
                break
        detection = detect_rows([r.value for r in head if isinstance(r, RawRow)], str(path))
        spec = detection.spec
        if announce is not None:
            announce(f"detected format '{spec.name}' for {path}: {detection.reason}")
    else:
        spec = get_format(format)
    if "require_answer" in spec.options:  # prompt-only records may end on a user turn
        options.setdefault("require_answer", False)
    return [_item_from_record(record)
            for record in iter_records([str(path)], format=spec.name, options=options, announce=None,
                                       progress=False)]


# ----- resuming --------------------------------------------------------------------------------------------------
def run_identity(engine: Engine, params: GenerationConfig, input_path: str | Path) -> dict:
    description = engine.describe()
    return {"backend": description["backend"], "model": description["model"], "adapter": description["adapter"],
            "template": description["template"], "generation": params.model_dump(),
            "input": str(Path(input_path).resolve())}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in new:
        if key == "generation":
            for name, value in new[key].items():
                before = (old.get(key) or {}).get(name)
                if before != value:
                    out.append(f"generation.{name}: {before!r} then, {value!r} now")
        elif old.get(key) != new[key]:
            out.append(f"{key}: {old.get(key)!r} then, {new[key]!r} now")
    return out


def _row_id(raw: bytes) -> str | None:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return str(row["id"]) if isinstance(row, dict) and "id" in row else None


def finished_ids(output: Path) -> set[str]:
    """Ids already written to ``output``. A last line cut short by a killed run is removed (it is predicted again)."""
    data = output.read_bytes()
    body, newline, tail = data.rpartition(b"\n")
    if tail.strip():
        if _row_id(tail) is None:  # an interrupted write
            with output.open("r+b") as handle:
                handle.truncate(len(body) + len(newline))
        else:  # a complete row without its newline
            with output.open("ab") as handle:
                handle.write(b"\n")
            body += newline + tail
    done: set[str] = set()
    for number, raw in enumerate(body.split(b"\n"), start=1):
        if not raw.strip():
            continue
        row_id = _row_id(raw)
        if row_id is None:
            raise DataError("not a prediction row (expected a JSON object with an 'id'); the file is not output of "
                            "zhiling predict, or it was edited", str(output), number)
        done.add(row_id)
    return done


def prepare_output(output: Path, identity: dict, overwrite: bool) -> set[str]:
    """Check or write the side file; the ids already done (empty for a fresh run)."""
    side = meta_path(output)
    if output.is_dir():
        raise ZhilingError(f"--output {output} is a folder; give a file name such as {output / 'predictions.jsonl'}")
    if not output.parent.exists():
        raise ZhilingError(f"--output {output}: folder {output.parent} does not exist")
    if overwrite and output.exists() and output.stat().st_size > 0:
        remove_owned(output, PREDICTIONS_FILE, what="--output")
        side.unlink(missing_ok=True)
    if output.exists() and output.stat().st_size > 0:
        if not side.is_file():
            raise ZhilingError(f"{output} exists but {side.name} does not, so it cannot be resumed safely; "
                               f"choose another --output or pass --overwrite")
        try:
            old = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ZhilingError(f"{side}: cannot read it ({exc}); pass --overwrite to start again") from None
        differences = _differences(old.get("run", {}), identity)
        if differences:
            raise ZhilingError(f"{output} was written by a different run, so the rows cannot be mixed:\n  "
                               + "\n  ".join(differences)
                               + "\nchoose another --output, or pass --overwrite to start again")
        return finished_ids(output)
    meta = {"run": identity, "zhiling_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    side.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return set()


# ----- running ---------------------------------------------------------------------------------------------------
@dataclass
class PredictReport:
    total: int
    skipped: int
    written: int
    seconds: float
    completion_tokens: int
    output: Path

    def summary(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
        done = f"{self.written} rows predicted" + (f", {self.skipped} already done" if self.skipped else "")
        return f"{done} -> {self.output} ({self.completion_tokens} tokens in {self.seconds:.1f}s, {rate:.1f} tokens/s)"


def output_row(item: PredictItem, result) -> dict:
    row: dict[str, Any] = {"id": item.id, "prompt": item.prompt, "output": result.text}
    if item.reference is not None:
        row["reference"] = item.reference
    for key, value in item.extra.items():
        row.setdefault(key, value)
    row.update(finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
               completion_tokens=result.completion_tokens)
    return row


def check_lengths(engine: Engine, items: list[PredictItem], params: GenerationConfig) -> None:
    """Refuse, before any work, prompts that cannot fit the context (naming the first few)."""
    too_long = []
    for item in items:
        count = engine.count_tokens(item.request)
        if count + params.max_new_tokens > engine.context_length:
            too_long.append(f"{item.id} ({count} tokens)")
    if too_long:
        shown = ", ".join(too_long[:5]) + (f" and {len(too_long) - 5} more" if len(too_long) > 5 else "")
        raise ZhilingError(f"{len(too_long)} prompt(s) do not fit the {engine.context_length}-token context with "
                           f"max_new_tokens={params.max_new_tokens}: {shown}")


def run_predict(engine: Engine, items: list[PredictItem], output: str | Path, params: GenerationConfig, *,
                input_path: str | Path, batch_size: int = 8, overwrite: bool = False,
                progress: bool | None = None) -> PredictReport:
    if batch_size < 1:
        raise ZhilingError("--batch-size must be 1 or more")
    engine.check_params(params)
    output = Path(output)
    if output.exists() and Path(input_path).exists() and output.resolve() == Path(input_path).resolve():
        raise ZhilingError("--output is the input file; choose another file name")
    done = prepare_output(output, run_identity(engine, params, input_path), overwrite)
    todo = [item for item in items if item.id not in done]
    check_lengths(engine, todo, params)
    started = time.perf_counter()
    tokens = 0
    with _progress_bar(len(items), len(items) - len(todo), progress) as bar, \
            output.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            results = engine.generate([item.request for item in batch], params)
            for item, result in zip(batch, results):
                handle.write(json.dumps(output_row(item, result), ensure_ascii=False) + "\n")
                tokens += result.completion_tokens
            handle.flush()
            os.fsync(handle.fileno())
            elapsed = time.perf_counter() - started
            bar.advance(len(batch), f"{tokens / elapsed if elapsed > 0 else 0:.1f} tok/s")
    return PredictReport(len(items), len(items) - len(todo), len(todo), time.perf_counter() - started, tokens,
                         output)


class _progress_bar:
    """A rich progress bar over rows (rate, ETA, tokens/s); silent when disabled."""

    def __init__(self, total: int, completed: int, enabled: bool | None):
        self.total, self.completed = total, completed
        self.enabled = True if enabled is None else enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task("predict", total=self.total, completed=self.completed, rate="")
        return self

    def advance(self, rows: int, rate: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=rows, rate=rate)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
