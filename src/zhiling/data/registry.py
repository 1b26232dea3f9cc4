"""The dataset registry: names for datasets (files or Hugging Face datasets, with their format and options), and the
loader that mixes several of them for training.

A registry is a YAML mapping ``name -> entry``; the built-in one is ``resources/datasets.yaml`` and a user file
(config key ``data.registry``) is merged over it (a user entry replaces a built-in entry of the same name).
Relative paths in an entry resolve against the folder of the registry file that defines it.

Mixing (``load_records``): each dataset gives its rows (with ``dedup``, rows repeating one given before are removed
first; then the first ``max_samples`` when set), then its ``weight`` decides how many rows it contributes:
``round(rows x weight)`` (halves round up). A weight below 1 takes a seeded random sample of the rows without repeats;
a weight above 1 repeats every row ``floor(weight)`` times and adds a seeded sample for the fractional part. Repeated copies get ``-repN`` appended to their id. Rows keep their file order within
a dataset and datasets follow in the order given; the trainer shuffles. The sample depends only on the seed and the
dataset's name, so adding a dataset to the mix does not change what another contributes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zhiling.config.loader import read_yaml
from zhiling.data.convert import ConvertReport, Rejected, iter_records
from zhiling.data.formats import get_format
from zhiling.data.formats.hf import PREFIX as HF_PREFIX, is_hf, parse_hf
from zhiling.errors import ConfigError, DataError
from zhiling.names import raise_unknown, suggestion

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
BUILTIN_REGISTRY = RESOURCES / "datasets.yaml"
PATH_SUFFIXES = (".json", ".jsonl", ".txt", ".tar.gz", ".tgz", ".tar")


class DatasetEntry(BaseModel):
    """One registry entry. Exactly one of ``path`` and ``hf``."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    path: list[str] | None = Field(None, description="file(s) or folder(s), relative to the registry file's folder")
    hf: str | None = Field(None, description="Hugging Face dataset id, or a local dataset folder / data file")
    hf_config: str | None = Field(None, description="configuration (subset) name of the hf dataset")
    split: str | None = Field(None, description="hf split (default: train, or the only split)")
    format: str = Field("auto", description="row format (see `zhiling data formats`), auto detects it")
    options: dict[str, Any] = Field(default_factory=dict, description="format options, e.g. columns for instruct")
    max_samples: int | None = Field(None, ge=1, description="use at most the first N rows")
    weight: float = Field(1.0, gt=0, description="rows taken = round(rows x weight); >1 repeats rows")
    source: str | None = Field(None, description="'source' written into the records (default: the dataset name)")

    @field_validator("path", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.path) == bool(self.hf):
            raise ValueError("give exactly one of 'path' and 'hf'")
        return self


@dataclass
class ResolvedDataset:
    """A dataset ready to read: absolute paths (or an hf name), format, options, sampling settings."""

    name: str
    paths: list[str] = field(default_factory=list)
    hf: str | None = None
    hf_config: str | None = None
    split: str | None = None
    format: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    max_samples: int | None = None
    weight: float = 1.0
    source: str | None = None
    registry: str | None = None  # the registry file that defined it (None: a plain path or hf: name)

    @property
    def inputs(self) -> list[str]:
        return [f"{HF_PREFIX}{self.hf}"] if self.hf else list(self.paths)

    def files(self) -> list[Path]:
        """The local files behind this dataset (for hashing into cache keys); empty for a hub dataset."""
        roots = [Path(self.hf)] if self.hf and Path(self.hf).exists() else [Path(p) for p in self.paths]
        found: list[Path] = []
        for root in roots:
            if root.is_dir():
                found.extend(sorted(p for p in root.rglob("*") if p.is_file()))
            else:
                found.append(root)
        return found

    def describe(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "registry"}


# ----- reading registry files ---------------------------------------------------------------------------------------
def _format_entry_error(path: Path, name: str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid dataset '{name}':"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<entry>"
        if err["type"] == "extra_forbidden":
            hint = suggestion(str(err["loc"][-1]), DatasetEntry.model_fields, otherwise="valid keys")
            lines.append(f"  unknown key '{key}'{hint}")
        else:
            lines.append(f"  {key}: {err['msg']}" + (f" (got {err['input']!r})" if err["loc"] else ""))
    return "\n".join(lines)


def read_registry(path: str | Path) -> dict[str, ResolvedDataset]:
    """Entries of one registry file, with paths resolved against its folder."""
    path = Path(path)
    data = read_yaml(path, "dataset registry",
                     "a mapping of dataset names to entries (name: {path: ..., format: ...})")
    base = path.resolve().parent
    entries = {}
    for name, raw in data.items():
        if not isinstance(name, str) or not name.strip() or is_hf(name):
            raise ConfigError(f"{path}: invalid dataset name {name!r} (a plain name, not starting with '{HF_PREFIX}')")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: dataset '{name}' must be a mapping (path:, format:, ...), "
                              f"not {type(raw).__name__}")
        try:
            entry = DatasetEntry.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format_entry_error(path, name, exc)) from None
        if entry.format != "auto":
            try:
                spec = get_format(entry.format)
                spec.check_options(entry.options)
            except DataError as err:
                raise ConfigError(f"{path}: dataset '{name}': {err.reason}") from None
        hf = entry.hf
        if hf and not Path(hf).is_absolute() and (base / hf).exists():
            hf = str(base / hf)
        entries[name] = ResolvedDataset(
            name=name, paths=[str(base / p) for p in entry.path or []], hf=hf, hf_config=entry.hf_config,
            split=entry.split, format=entry.format, options=dict(entry.options), max_samples=entry.max_samples,
            weight=entry.weight, source=entry.source, registry=str(path))
    return entries


def load_registry(user_registry: str | Path | None = None) -> dict[str, ResolvedDataset]:
    """The built-in registry, with the user's registry file (if any) merged over it."""
    entries = read_registry(BUILTIN_REGISTRY)
    if user_registry:
        entries.update(read_registry(user_registry))
    return entries


# ----- resolving names ----------------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.lower().endswith(PATH_SUFFIXES) or Path(name).exists()


def resolve_dataset(name: str, registry: dict[str, ResolvedDataset], format: str = "auto",
                    base_dir: str | Path | None = None) -> ResolvedDataset:
    """A name from ``data.datasets``: a registry name, ``hf:NAME[:SPLIT]``, or a file / folder path."""
    name = name.strip()
    if name in registry:
        return registry[name]
    if is_hf(name):
        hf, split = parse_hf(name)
        return ResolvedDataset(name=name, hf=hf, split=split, format=format)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.exists():
            raise DataError(f"dataset '{name}' is not in the registry and no such file or folder exists", str(path))
        return ResolvedDataset(name=path.name.split(".")[0] or "data", paths=[str(path)], format=format)
    raise_unknown("dataset", name, sorted(registry), error=ConfigError, label="registered", cutoff=0.5,
                  tail="; or give a file path or hf:NAME")


def resolve_datasets(names: Iterable[str], registry_path: str | Path | None = None, format: str = "auto",
                     base_dir: str | Path | None = None) -> list[ResolvedDataset]:
    """The files / hf name + format + options behind each name (hash these into cache keys with ``fingerprint``)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ConfigError("no datasets given (data.datasets is empty)")
    registry = load_registry(registry_path)
    return [resolve_dataset(name, registry, format, base_dir) for name in names]


def fingerprint(datasets: list[ResolvedDataset], **settings: Any) -> str:
    """A hash of everything that decides the loaded rows: entry settings, every local file's bytes, ``settings``.

    A hub dataset (``hf:`` with a hub id) is identified by its name, config and split only.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for dataset in datasets:
        digest.update(json.dumps(dataset.describe(), sort_keys=True, default=str).encode())
        for file in dataset.files():
            digest.update(str(file).encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


# ----- mixing -------------------------------------------------------------------------------------------------------
@dataclass
class MixEntry:
    """What one dataset contributed to a mix."""

    name: str
    rows: int  # records available after max_samples (and dedup)
    taken: int  # records contributed after weighting
    weight: float
    report: ConvertReport


def rows_for_weight(count: int, weight: float) -> int:
    return int(math.floor(count * weight + 0.5))


def apply_weight(records: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """``round(len x weight)`` records: a sample (weight < 1) or whole copies plus a sample (weight > 1)."""
    count = len(records)
    take = rows_for_weight(count, weight)
    if count == 0 or take == count:
        return list(records)
    copies, rest = divmod(take, count)
    out = list(records)[:0]
    for copy in range(copies):
        out.extend(records if copy == 0 else [{**r, "id": f"{r['id']}-rep{copy}"} for r in records])
    picked = sorted(rng.sample(range(count), rest))
    suffix = f"-rep{copies}" if copies else ""
    out.extend({**records[i], "id": f"{records[i]['id']}{suffix}"} if suffix else records[i] for i in picked)
    return out


def load_records(names: Iterable[str], registry_path: str | Path | None = None, format: str = "auto",
                 max_samples: int | None = None, seed: int = 42, **kwargs: Any) -> list[dict]:
    """``iter_mixed_records`` as a list (for small data; training streams)."""
    return list(iter_mixed_records(names, registry_path, format, max_samples, seed, **kwargs))


def iter_mixed_records(names: Iterable[str], registry_path: str | Path | None = None, format: str = "auto",
                       max_samples: int | None = None, seed: int = 42, *, dedup: bool = False,
                       skip_invalid: bool = False, rejected: Callable[[Rejected], Any] | None = None,
                       base_dir: str | Path | None = None, mix_report: list[MixEntry] | None = None,
                       announce: Callable[[str], Any] | None = None) -> Iterator[dict]:
    """Canonical records of several datasets mixed by weight (see the module docstring), streamed.

    A dataset with weight 1 streams row by row (constant memory); one with another weight is held in memory to be
    sampled. ``max_samples`` caps every dataset (the smaller of it and the entry's own). ``dedup`` removes exact
    duplicates (same system + messages) across all datasets before ``max_samples`` and weighting (each row read is
    then written, rejected or a duplicate in the dataset's report). ``mix_report`` (a list) receives one
    ``MixEntry`` per dataset once that dataset has been read.
    """
    announce = announce if announce is not None else (lambda message: print(message, file=sys.stderr))
    seen: set[bytes] = set()
    for dataset in resolve_datasets(names, registry_path, format, base_dir):
        caps = [cap for cap in (dataset.max_samples, max_samples) if cap is not None]
        report = ConvertReport()
        stream = iter_records(
            dataset.inputs, dataset.format, dataset.options, skip_invalid=skip_invalid, source=dataset.source,
            default_source=dataset.name, rejected=rejected, max_samples=min(caps) if caps else None,
            report=report, announce=announce, hf_split=dataset.split, hf_config=dataset.hf_config,
            seen=seen if dedup else None)
        stream = _located(stream, dataset)
        if dataset.weight == 1:
            count = 0
            for record in stream:
                count += 1
                yield record
            taken = count
        else:
            records = list(stream)
            chosen = apply_weight(records, dataset.weight, random.Random(f"{seed}:{dataset.name}"))
            count, taken = len(records), len(chosen)
            if records and not chosen:
                announce(f"warning: dataset '{dataset.name}' contributes no rows (weight {dataset.weight} x "
                         f"{len(records)} rows rounds to 0)")
            yield from chosen
        if mix_report is not None:
            mix_report.append(MixEntry(dataset.name, count, taken, dataset.weight, report))


def _located(stream: Iterator[dict], dataset: ResolvedDataset) -> Iterator[dict]:
    """Name the dataset (and the registry that defined it) in any data error."""
    try:
        yield from stream
    except DataError as err:
        where = f" from {dataset.registry}" if dataset.registry else ""
        raise DataError(f"{err.reason} [dataset '{dataset.name}'{where}]", err.path, err.line, err.field) from None

