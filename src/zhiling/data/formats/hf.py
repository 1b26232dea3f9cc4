"""``hf:NAME`` inputs: rows of a Hugging Face dataset, converted with the given (or detected) row format.

``hf:NAME`` or ``hf:NAME:SPLIT``; NAME is a hub id (``BelleGroup/train_0.5M_CN``, needs the network or the local
hub cache), a local dataset folder (data files that ``datasets.load_dataset`` understands: json, jsonl, csv,
parquet, or a saved ``save_to_disk`` folder), or a single local data file. Without SPLIT, ``train`` is used, or the
only split there is. This is a source of rows, not a row format: ``--format`` (or auto-detection) still says how to
read each row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from zhiling.data.reader import RawRow
from zhiling.errors import DataError

PREFIX = "hf:"
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
             ".arrow": "arrow"}


def is_hf(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_hf(spec: str) -> tuple[str, str | None]:
    """``hf:NAME[:SPLIT]`` -> (NAME, SPLIT or None). A last ``:part`` holding no ``/`` is the split."""
    body = spec[len(PREFIX):] if is_hf(spec) else spec
    name, split = body, None
    if ":" in body:
        head, tail = body.rsplit(":", 1)
        if tail and "/" not in tail and "\\" not in tail and head:
            name, split = head, tail
    if not name.strip():
        raise DataError(f"'{spec}' names no dataset (expected hf:NAME or hf:NAME:SPLIT)")
    return name.strip(), split


def _pick_split(dataset_dict, name: str, split: str | None):
    splits = list(dataset_dict)
    if split is None:
        if "train" in dataset_dict:
            return dataset_dict["train"], "train"
        if len(splits) == 1:
            return dataset_dict[splits[0]], splits[0]
        raise DataError(f"the dataset has several splits and none is 'train': {', '.join(splits)}; "
                        f"name one as hf:{name}:SPLIT")
    if split not in dataset_dict:
        raise DataError(f"no split '{split}' (splits: {', '.join(splits)})", f"hf:{name}")
    return dataset_dict[split], split


def _load(name: str, config: str | None):
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"cannot load '{path.suffix}' files as a dataset (use one of: "
                                f"{', '.join(sorted(_BUILDERS))})", str(path))
            return datasets.load_dataset(builder, data_files=str(path))
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
                              and (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        return datasets.load_dataset(str(path) if path.is_dir() else name, config)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds: not found, offline, bad files
        local = path.exists()
        hint = "" if local else (" (a hub dataset needs the network, or the local hub cache when "
                                 "HF_HUB_OFFLINE=1; check the name)")
        raise DataError(f"could not load the dataset: {type(exc).__name__}: {exc}{hint}", f"hf:{name}") from None


def read_hf(spec: str, config: str | None = None, split: str | None = None) -> Iterator[RawRow]:
    """Rows of ``hf:NAME[:SPLIT]``; each row's ``line`` is its 1-based row number in the split."""
    name, spec_split = parse_hf(spec)
    loaded = _load(name, config)
    dataset, split = _pick_split(loaded, name, split or spec_split)
    if len(dataset) == 0:
        raise DataError(f"split '{split}' is empty", f"hf:{name}")
    label = f"hf:{name}:{split}"
    for index, row in enumerate(dataset, start=1):
        raw = json.dumps(row, ensure_ascii=False, default=str)  # plain JSON values (no numpy scalars, dates ...)
        yield RawRow(label, index, json.loads(raw), raw)
