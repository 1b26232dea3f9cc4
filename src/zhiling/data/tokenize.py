"""Canonical records -> token ids and labels, cut to ``cutoff_len``, cached as an Arrow dataset.

Labels: prompt tokens are -100 unless ``train_on_prompt``; every assistant answer is trained (only the last one with
``mask_history``); every answer ends with the template's end-of-answer token (the tokenizer's EOS unless the template
has its own end-of-turn token such as ``<end_of_turn>``).

Cutting a row longer than ``cutoff_len``: rounds are kept in order while they fit; the round that does not fit is cut,
its prompt first (down to a quarter of the remaining budget, keeping the prompt's head and its last tokens, which
hold the template's assistant cue), then its answer; later rounds are dropped. ``drop_long`` drops such rows instead.
Both are counted and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from zhiling.data.records import turns
from zhiling.errors import ZhilingError
from zhiling.owned import check_replaceable, record_file, remove_owned
from zhiling.paths import cache_root

IGNORE_INDEX = -100  # the label of a token not trained on (torch cross_entropy's default); the one definition
CACHE_VERSION = 3  # bump when the tokenized layout, the cutting rule or how templates encode text changes
_PROMPT_TAIL = 16
TOKENIZED_FOLDER = record_file("zhiling-report.json")  # a finished cache folder; written last


@dataclass(frozen=True)
class TokenizeOptions:
    cutoff_len: int = 1024
    train_on_prompt: bool = False
    mask_history: bool = False
    drop_long: bool = False

    @classmethod
    def from_config(cls, data_cfg) -> "TokenizeOptions":
        return cls(data_cfg.cutoff_len, data_cfg.train_on_prompt, data_cfg.mask_history, data_cfg.drop_long)


def _cut_prompt(ids: list[int], keep: int) -> list[int]:
    if keep >= len(ids):
        return ids
    tail = min(_PROMPT_TAIL, keep // 2)
    return ids[:keep - tail] + (ids[len(ids) - tail:] if tail else [])


def cut_pieces(pieces: list[tuple[list[int], list[int]]], cutoff: int) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """Fit (prompt, answer) rounds into ``cutoff`` tokens by the rule in the module docstring."""
    total = sum(len(p) + len(r) for p, r in pieces)
    if total <= cutoff:
        return pieces, False
    kept = []
    budget = cutoff
    for prompt, answer in pieces:
        if budget <= 0:
            break
        if len(prompt) + len(answer) <= budget:
            kept.append((prompt, answer))
            budget -= len(prompt) + len(answer)
            continue
        floor = min(len(prompt), max(budget // 4, 1))
        prompt_keep = min(len(prompt), max(floor, budget - len(answer)))
        answer_keep = min(len(answer), budget - prompt_keep)
        kept.append((_cut_prompt(prompt, prompt_keep), answer[:answer_keep]))
        break
    return kept, True


def build_example(template, tokenizer, record: dict, options: TokenizeOptions) -> dict:
    """input_ids, labels and bookkeeping for one canonical record."""
    return example_from_pieces(template.encode(tokenizer, record.get("system") or None, turns(record)), options)


def example_from_pieces(pieces: list[tuple[list[int], list[int]]], options: TokenizeOptions) -> dict:
    """Cut (prompt, answer) rounds to the cutoff and lay out input_ids and labels."""
    full_len = sum(len(p) + len(r) for p, r in pieces)
    pieces, truncated = cut_pieces(pieces, options.cutoff_len)
    input_ids: list[int] = []
    labels: list[int] = []
    last = max((i for i, (_, r) in enumerate(pieces) if r), default=-1)
    for index, (prompt, answer) in enumerate(pieces):
        input_ids += prompt + answer
        labels += prompt if options.train_on_prompt else [IGNORE_INDEX] * len(prompt)
        if options.mask_history and index != last:
            labels += [IGNORE_INDEX] * len(answer)
        else:
            labels += answer
    return {"input_ids": input_ids, "labels": labels, "length": len(input_ids), "full_length": full_len,
            "truncated": truncated, "trained_tokens": sum(1 for label in labels if label != IGNORE_INDEX)}


# ----- cache key -----------------------------------------------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how text becomes ids (vocabulary, merges, normalizer, special tokens)."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                              type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None)]).encode())
    return digest.hexdigest()


def records_fingerprint(records: Iterable[dict]) -> str:
    """A hash of the records themselves, for data that does not come from files."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.get("system") or "", record["messages"]], ensure_ascii=False,
                                 sort_keys=True).encode("utf-8"))
    return "records:" + digest.hexdigest()


def cache_key(data_fingerprint: str, template, tokenizer, options: TokenizeOptions) -> str:
    payload = {"version": CACHE_VERSION, "data": data_fingerprint, "template": template.to_dict(),
               "tokenizer": tokenizer_fingerprint(tokenizer), "options": asdict(options)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:24]


# ----- building the dataset ------------------------------------------------------------------------------------------
@dataclass
class TokenizedData:
    dataset: object  # datasets.Dataset with input_ids, labels, length
    report: dict
    cache_path: Path
    from_cache: bool


def _records_generator(make_records: Callable[[], Iterable[dict]]) -> Iterator[dict]:
    for record in make_records():
        yield {"system": record.get("system") or "",
               "messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]}


def _column(dataset, name: str):
    """A column as one Arrow array (reading it through the dataset's row formatter is far slower)."""
    import pyarrow as pa

    table = dataset.with_format("arrow")[:]
    return pa.chunked_array(table.column(name))


def _column_sum(dataset, name: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(_column(dataset, name), "int64")).as_py() or 0)


def _column_max(dataset, name: str) -> int:
    import pyarrow.compute as pc

    return int(pc.max(_column(dataset, name)).as_py() or 0)


def _read_records(make_records: Callable[[], Iterable[dict]], folder: Path, key: str):
    """Records streamed into an Arrow dataset; a bad row's error reaches the user as itself (``datasets`` wraps
    exceptions raised inside a generator in its own ``DatasetGenerationError``).

    ``fingerprint`` is given so that ``datasets`` does not try to hash ``make_records`` (a closure that may hold
    anything, a console or a lock, which cannot be pickled)."""
    import datasets

    try:
        return datasets.Dataset.from_generator(_records_generator, gen_kwargs={"make_records": make_records},
                                               cache_dir=str(folder), keep_in_memory=False, fingerprint=key)
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, ZhilingError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None and cause is not exc:
            raise cause from None
        raise


class _Tokenize:
    """A picklable batch function for ``Dataset.map`` (runs in worker processes with ``num_proc``)."""

    def __init__(self, template, tokenizer, options: TokenizeOptions):
        self.template, self.tokenizer, self.options = template, tokenizer, options

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "full_length": [], "truncated": [],
                                "trained_tokens": []}
        conversations = [(system or None, turns({"messages": messages}))
                         for system, messages in zip(batch["system"], batch["messages"])]
        for pieces in self.template.encode_many(self.tokenizer, conversations):
            example = example_from_pieces(pieces, self.options)
            for key in out:
                out[key].append(example[key])
        return out


def tokenize_records(make_records: Callable[[], Iterable[dict]], data_fingerprint: str | None, template, tokenizer,
                     options: TokenizeOptions, num_proc: int = 1, cache_dir: str | Path | None = None,
                     description: str = "data") -> TokenizedData:
    """Tokenize canonical records (``make_records()`` yields them, streamed) into a cached Arrow dataset.

    ``data_fingerprint`` identifies the input (file hashes, format, options); ``None`` hashes the records themselves.
    """
    import datasets

    datasets.disable_progress_bars()
    root = Path(cache_dir) if cache_dir else cache_root() / "tokenized"
    if data_fingerprint is None:
        data_fingerprint = records_fingerprint(make_records())
    key = cache_key(data_fingerprint, template, tokenizer, options)
    final = root / key
    if TOKENIZED_FOLDER.test(final):
        report = json.loads((final / "zhiling-report.json").read_text(encoding="utf-8"))
        return TokenizedData(datasets.load_from_disk(str(final)), report, final, True)
    # an empty folder is replaced at the end; one holding anything else is not zhiling's: refused before any work
    check_replaceable(final, TOKENIZED_FOLDER, what="tokenized-data cache folder", flag=None)

    root.mkdir(parents=True, exist_ok=True)
    work = root / f".work-{os.getpid()}-{key}"
    staging = root / f".staging-{os.getpid()}-{key}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        raw = _read_records(make_records, work / "raw", key)
        if len(raw) == 0:
            raise ZhilingError(f"{description}: no rows to train on")
        tokenized = raw.map(_Tokenize(template, tokenizer, options), batched=True, batch_size=500,
                            num_proc=num_proc if num_proc > 1 else None, remove_columns=raw.column_names,
                            desc=f"tokenizing {description}", cache_file_name=str(work / "tok" / "data.arrow"),
                            new_fingerprint=key)
        truncated = _column_sum(tokenized, "truncated")
        report = {"rows": len(tokenized), "truncated": 0 if options.drop_long else truncated,
                  "dropped_long": truncated if options.drop_long else 0, "cutoff_len": options.cutoff_len}
        if options.drop_long and truncated:
            tokenized = tokenized.filter(lambda flags: [not f for f in flags], input_columns="truncated",
                                         batched=True, cache_file_name=str(work / "tok" / "kept.arrow"))
            if len(tokenized) == 0:
                raise ZhilingError(f"{description}: every row is longer than cutoff_len={options.cutoff_len}; "
                                   f"raise data.cutoff_len or set data.drop_long=false")
        report["kept"] = len(tokenized)
        report["tokens"] = _column_sum(tokenized, "length")
        report["label_tokens"] = _column_sum(tokenized, "trained_tokens")
        report["max_length"] = _column_max(tokenized, "length")
        shutil.rmtree(staging, ignore_errors=True)
        tokenized.save_to_disk(str(staging))
        (staging / "zhiling-report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        if not TOKENIZED_FOLDER.test(final):  # else another process finished the same data meanwhile: keep it
            remove_owned(final, TOKENIZED_FOLDER, what="tokenized-data cache folder", flag=None)
            staging.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return TokenizedData(datasets.load_from_disk(str(final)), report, final, False)


def describe_report(report: dict) -> str:
    """One line for the screen: rows, tokens, and what was cut or dropped."""
    parts = [f"{report['kept']:,} rows", f"{report['tokens']:,} tokens ({report['label_tokens']:,} trained)"]
    if report.get("truncated"):
        parts.append(f"{report['truncated']:,} rows cut to cutoff_len={report['cutoff_len']}")
    if report.get("dropped_long"):
        parts.append(f"{report['dropped_long']:,} rows longer than cutoff_len={report['cutoff_len']} dropped "
                     f"(data.drop_long)")
    return ", ".join(parts)
