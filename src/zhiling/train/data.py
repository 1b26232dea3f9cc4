"""Training data for a run: datasets from the registry -> tokenized Arrow datasets, a validation split, hashes.

Everything that decides which token ids the run sees is hashed (file bytes, formats, options, template, tokenizer,
cutting rule), so a resumed run can refuse data that changed underneath it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from zhiling.config import ZhilingConfig
from zhiling.data.registry import MixEntry, fingerprint, iter_mixed_records, resolve_datasets
from zhiling.data.tokenize import TokenizedData, TokenizeOptions, file_digest, tokenize_records
from zhiling.errors import ConfigError, ZhilingError


@dataclass
class TrainData:
    train: object  # datasets.Dataset with input_ids, labels, length
    eval: object | None
    report: dict  # tokenization report of the training rows (before the validation split)
    key: str  # identifies the exact training rows (cache key + split); part of the resume fingerprint
    sources: list[dict] = field(default_factory=list)  # per dataset: name, files with sha256, rows taken
    eval_sources: list[dict] = field(default_factory=list)

    @property
    def train_rows(self) -> int:
        return len(self.train)

    @property
    def eval_rows(self) -> int:
        return len(self.eval) if self.eval is not None else 0


def _describe_sources(datasets, mix: list[MixEntry]) -> list[dict]:
    taken = {entry.name: entry for entry in mix}
    out = []
    for dataset in datasets:
        entry = {"name": dataset.name, "inputs": dataset.inputs, "format": dataset.format,
                 "files": [{"path": str(path), "sha256": file_digest(path)} for path in dataset.files()
                           if path.is_file()]}
        if dataset.name in taken:
            entry.update(rows=taken[dataset.name].rows, taken=taken[dataset.name].taken)
        out.append(entry)
    return out


def tokenize_datasets(names: list[str], cfg: ZhilingConfig, template, tokenizer, description: str,
                      announce=None) -> tuple[TokenizedData, list[dict]]:
    """Resolve, mix and tokenize ``names`` (cached by content); missing files and bad rows raise before training."""
    data = cfg.data
    datasets = resolve_datasets(names, data.registry, data.format)
    settings = dict(names=list(names), max_samples=data.max_samples, seed=data.seed, dedup=data.dedup)
    mix: list[MixEntry] = []

    def make_records():
        mix.clear()
        return iter_mixed_records(names, data.registry, data.format, data.max_samples, data.seed, dedup=data.dedup,
                                  mix_report=mix, announce=announce)

    tokenized = tokenize_records(make_records, fingerprint(datasets, **settings), template, tokenizer,
                                 TokenizeOptions.from_config(data), num_proc=data.num_proc, cache_dir=data.cache_dir,
                                 description=description)
    return tokenized, _describe_sources(datasets, mix)


def validation_count(val_size: float, rows: int) -> int:
    """Rows held out for ``val_size`` (a fraction below 1, or a row count)."""
    if val_size <= 0:
        return 0
    count = int(round(val_size * rows)) if val_size < 1 else int(val_size)
    if val_size < 1:
        count = max(count, 1)
    if count >= rows:
        raise ConfigError(f"data.val_size={val_size} holds out {count} of {rows} rows, leaving none to train on")
    return count


def split_validation(dataset, count: int, seed: int):
    """(train, validation): a seeded random ``count`` rows held out; both keep the original row order."""
    import numpy as np

    if count == 0:
        return dataset, None
    order = np.random.default_rng(seed).permutation(len(dataset))
    held = np.sort(order[:count])
    kept = np.sort(order[count:])
    return dataset.select(kept.tolist()), dataset.select(held.tolist())


def load_train_data(cfg: ZhilingConfig, template, tokenizer, announce=None) -> TrainData:
    data = cfg.data
    train, sources = tokenize_datasets(data.datasets, cfg, template, tokenizer, "training data", announce)
    if train.report.get("label_tokens", 0) == 0:
        raise ZhilingError("the training data has no trained tokens (every answer was cut away or empty); "
                           "check data.cutoff_len and the data")
    held = validation_count(data.val_size, len(train.dataset))
    train_set, eval_set = split_validation(train.dataset, held, data.seed)
    eval_sources: list[dict] = []
    if data.eval_datasets:
        extra, eval_sources = tokenize_datasets(data.eval_datasets, cfg, template, tokenizer, "eval data", announce)
        if eval_set is None:
            eval_set = extra.dataset
        else:
            import datasets

            eval_set = datasets.concatenate_datasets([eval_set, extra.dataset])
    key = hashlib.sha256(json.dumps([train.cache_path.name, held, data.seed]).encode()).hexdigest()[:24]
    return TrainData(train_set, eval_set, train.report, key, sources, eval_sources)
