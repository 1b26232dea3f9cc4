"""The dataset registry: built-in entries, user files merged over them, resolution errors, weighted mixing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from zhiling.data.registry import (BUILTIN_REGISTRY, apply_weight, fingerprint, load_records, load_registry,
                                   read_registry, resolve_datasets, rows_for_weight)
from zhiling.errors import ConfigError, DataError

RESOURCES = BUILTIN_REGISTRY.parent


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_registry(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def alpaca_rows(prefix, count):
    return [{"instruction": f"{prefix}{i}", "output": "答"} for i in range(count)]


# ----- built-in registry --------------------------------------------------------------------------------------------
def test_builtin_entries_load():
    registry = load_registry()
    examples = [name for name in registry if name.startswith("example_")]
    assert len(examples) >= 12 and {"zhiling_zh", "zhiling_zh_test"} <= set(registry)
    for name in examples:
        records = load_records([name], announce=lambda m: None)
        assert records and all(r["source"] == name for r in records), name
    entry = registry["example_alpaca"]
    assert entry.paths == [str(RESOURCES / "examples" / "formats" / "alpaca.json")]
    assert registry["example_hf"].hf == str(RESOURCES / "examples" / "formats" / "hf_dataset")


def test_bundled_chinese_data():
    train = load_records(["zhiling_zh"])
    test = load_records(["zhiling_zh_test"])
    assert train and test
    assert not {r["id"] for r in train} & {r["id"] for r in test}


# ----- user registry ------------------------------------------------------------------------------------------------
def test_user_registry_merges_over_builtin_and_resolves_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "mine.jsonl", alpaca_rows("我的", 3))
    registry_file = write_registry(tmp_path / "datasets.yaml", """
mine:
  path: data/mine.jsonl
  format: alpaca
  max_samples: 2
example_alpaca:
  path: [data/mine.jsonl]
  source: replaced
msra:
  path: data/mine.jsonl
  format: instruct
  options:
    columns: {instruction: instruction, input: "", output: output}
""")
    registry = load_registry(registry_file)
    assert registry["mine"].paths == [str(tmp_path / "data" / "mine.jsonl")]
    assert "zhiling_zh" in registry  # built-in entries stay
    records = load_records(["mine", "example_alpaca", "msra"], str(registry_file))
    assert [r["id"] for r in records] == ["mine-000001", "mine-000002", "replaced-000001", "replaced-000002",
                                          "replaced-000003", "msra-000001", "msra-000002", "msra-000003"]
    assert records[-1]["messages"][0]["content"] == "我的2"


@pytest.mark.parametrize("text, expected", [
    ("mine:\n  pth: a.jsonl\n", "unknown key 'pth'; did you mean 'path'?"),
    ("mine:\n  path: a.jsonl\n  weigth: 2\n", "unknown key 'weigth'; did you mean 'weight'?"),
    ("mine:\n  format: alpaca\n", "give exactly one of 'path' and 'hf'"),
    ("mine:\n  path: a.jsonl\n  hf: x/y\n", "give exactly one of 'path' and 'hf'"),
    ("mine:\n  path: a.jsonl\n  weight: 0\n", "weight"),
    ("mine:\n  path: a.jsonl\n  format: alpacca\n", "unknown format 'alpacca'; did you mean 'alpaca'"),
    ("mine:\n  path: a.jsonl\n  format: psyqa\n  options: {answer: all}\n", "did you mean 'answers'"),
    ("mine:\n  path: a.jsonl\n  format: psyqa\n  options: {answers: most}\n", "not one of: first, all"),
    ("mine: [a.jsonl]\n", "must be a mapping"),
    ("- a\n- b\n", "mapping of dataset names to entries"),
    ("mine:\n  path: [a\n", "not valid YAML"),
    ("'hf:x':\n  path: a.jsonl\n", "invalid dataset name"),
])
def test_bad_registry_files_name_file_and_key(tmp_path, text, expected):
    registry_file = write_registry(tmp_path / "reg.yaml", text)
    with pytest.raises(ConfigError) as info:
        read_registry(registry_file)
    assert str(registry_file) in str(info.value) and expected in str(info.value)


def test_missing_registry_file(tmp_path):
    with pytest.raises(ConfigError, match="dataset registry not found"):
        load_registry(tmp_path / "none.yaml")


# ----- resolving names ----------------------------------------------------------------------------------------------
def test_unknown_name_suggests_closest():
    with pytest.raises(ConfigError, match="unknown dataset 'zhiling_z'; did you mean 'zhiling_zh'"):
        resolve_datasets(["zhiling_z"])
    with pytest.raises(ConfigError, match="unknown dataset 'example_alpacca'; did you mean 'example_alpaca'"):
        resolve_datasets(["example_alpacca"])


def test_paths_and_hf_names_mix_with_registry_names(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "local.jsonl", alpaca_rows("本地", 2))
    folder = tmp_path / "hfdata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"input": "问", "target": "答"}])
    monkeypatch.chdir(tmp_path)
    resolved = resolve_datasets(["example_firefly", "local.jsonl", f"hf:{folder}"])
    assert [d.name for d in resolved] == ["example_firefly", "local", f"hf:{folder}"]
    records = load_records(["example_firefly", "local.jsonl", f"hf:{folder}"])
    sources = [r["source"] for r in records]
    assert sources.count("example_firefly") == 12 and sources.count("local") == 2 and sources[-1] == f"hf:{folder}"
    with pytest.raises(DataError, match="not in the registry and no such file"):
        resolve_datasets(["missing/data.jsonl"])


def test_data_errors_name_the_dataset(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": ""}])
    registry_file = write_registry(tmp_path / "r.yaml", "bad:\n  path: bad.jsonl\n  format: alpaca\n")
    with pytest.raises(DataError) as info:
        load_records(["bad"], registry_file)
    assert info.value.line == 1 and info.value.field == "output" and "dataset 'bad'" in str(info.value)
    rejected = []
    assert load_records(["bad"], registry_file, skip_invalid=True, rejected=rejected.append) == []
    assert len(rejected) == 1


# ----- mixing -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count, weight, expected", [(10, 0.5, 5), (10, 0.25, 3), (4, 2.5, 10), (3, 1.0, 3),
                                                      (7, 0.01, 0)])
def test_rows_for_weight(count, weight, expected):
    assert rows_for_weight(count, weight) == expected


def test_apply_weight_samples_and_repeats():
    records = [{"id": f"r{i}", "messages": []} for i in range(4)]
    half = apply_weight(records, 0.5, random.Random(1))
    assert len(half) == 2 and len({r["id"] for r in half}) == 2 and half == sorted(half, key=lambda r: r["id"])
    more = apply_weight(records, 2.5, random.Random(1))
    ids = [r["id"] for r in more]
    assert ids[:8] == ["r0", "r1", "r2", "r3", "r0-rep1", "r1-rep1", "r2-rep1", "r3-rep1"]
    assert len(ids) == 10 and all(i.endswith("-rep2") for i in ids[8:]) and len(set(ids)) == 10


def test_weights_in_registry_are_seeded(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows("甲", 20))
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows("乙", 4))
    registry_file = write_registry(tmp_path / "r.yaml", """
a: {path: a.jsonl, weight: 0.5}
b: {path: b.jsonl, weight: 1.5}
""")
    report = []
    first = load_records(["a", "b"], registry_file, seed=3, mix_report=report)
    assert [(m.name, m.rows, m.taken) for m in report] == [("a", 20, 10), ("b", 4, 6)]
    assert load_records(["a", "b"], registry_file, seed=3) == first
    assert load_records(["a", "b"], registry_file, seed=4) != first
    # adding a dataset does not change what another contributes
    alone = load_records(["a"], registry_file, seed=3)
    assert [r for r in first if r["source"] == "a"] == alone


def test_max_samples_and_dedup_across_datasets(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows("同", 5))
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows("同", 3) + alpaca_rows("异", 2))
    registry_file = write_registry(tmp_path / "r.yaml", "a: {path: a.jsonl, max_samples: 4}\nb: {path: b.jsonl}\n")
    report = []
    records = load_records(["a", "b"], registry_file, dedup=True, mix_report=report)
    assert [(m.name, m.rows, m.report.duplicates) for m in report] == [("a", 4, 0), ("b", 2, 3)]
    assert len(records) == 6
    capped = load_records(["a", "b"], registry_file, max_samples=2)
    assert [r["source"] for r in capped] == ["a", "a", "b", "b"]
    # duplicates go first, then max_samples takes the first rows left; every row read is accounted for
    report = []
    both = load_records(["a", "b"], registry_file, max_samples=2, dedup=True, mix_report=report)
    assert [r["messages"][0]["content"] for r in both] == ["同0", "同1", "同2", "异0"]
    assert [(m.report.read, m.report.written, m.report.duplicates) for m in report] == [(2, 2, 0), (4, 2, 2)]


def test_fingerprint_follows_file_content_and_settings(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("甲", 2))
    registry_file = write_registry(tmp_path / "r.yaml", "a: {path: a.jsonl, format: alpaca}\n")
    resolved = resolve_datasets(["a"], registry_file)
    assert resolved[0].files() == [path]
    assert resolved[0].describe()["format"] == "alpaca"
    first = fingerprint(resolved, seed=1)
    assert fingerprint(resolve_datasets(["a"], registry_file), seed=1) == first
    assert fingerprint(resolved, seed=2) != first
    write_jsonl(path, alpaca_rows("乙", 2))
    assert fingerprint(resolve_datasets(["a"], registry_file), seed=1) != first
    couplets = resolve_datasets(["example_couplets"])[0]
    assert [Path(p).name for p in couplets.files()] == ["in.txt", "out.txt"]
