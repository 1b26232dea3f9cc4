"""The bundled Chinese data (zhiling_zh): files, contract, determinism, and the per-task scorer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from zhiling.data.bundled import (bundled_data_path, bundled_task_names, list_check_from_reference, ner_counts,
                                  score_bundled, score_record)
from zhiling.data.bundled_words import ENTITY_TYPES, LIST_CATEGORIES
from zhiling.data.records import validate_record
from zhiling.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "make_bundled_data.py"
EXPECTED_SHARE = {"ner": 0.35, "sentiment": 0.25, "list": 0.15, "one_word": 0.10, "rewrite": 0.15}


def load(split: str) -> list[dict]:
    with open(bundled_data_path(split), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def prompt(row: dict) -> str:
    return row["messages"][0]["content"]


def answer(row: dict) -> str:
    return row["messages"][1]["content"]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return load("train")


@pytest.fixture(scope="module")
def test_rows() -> list[dict]:
    return load("test")


# --------------------------------------------------------------------------------------------- the files

def test_files_exist_and_every_row_validates(train, test_rows):
    assert len(train) >= 400
    assert len(test_rows) >= 100
    for row in train + test_rows:
        validate_record(row)
        assert row["source"] == "zhiling_zh"
        assert row["task"] in bundled_task_names()
        assert len(row["messages"]) == 2


def test_ids_are_unique_across_both_files(train, test_rows):
    ids = [row["id"] for row in train + test_rows]
    assert len(ids) == len(set(ids))
    assert all(row_id.startswith("zhiling_zh-") for row_id in ids)


@pytest.mark.parametrize("split", ["train", "test"])
def test_tasks_are_present_in_the_expected_proportions(split):
    rows = load(split)
    counts = Counter(row["task"] for row in rows)
    assert set(counts) == set(bundled_task_names())
    for task, share in EXPECTED_SHARE.items():
        assert abs(counts[task] / len(rows) - share) <= 0.03, (task, counts[task], len(rows))


def test_no_test_prompt_appears_in_training_and_no_prompt_repeats(train, test_rows):
    train_prompts = [prompt(row) for row in train]
    test_prompts = [prompt(row) for row in test_rows]
    assert not set(train_prompts) & set(test_prompts)
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(test_prompts)) == len(test_prompts)


@pytest.mark.parametrize("split", ["train", "test"])
def test_sentiment_classes_are_balanced_and_ner_has_some_rows_without_entities(split):
    rows = load(split)
    labels = Counter(answer(row) for row in rows if row["task"] == "sentiment")
    assert set(labels) == {"积极", "消极"} and labels["积极"] == labels["消极"]
    ner = [row for row in rows if row["task"] == "ner"]
    share_none = sum(answer(row) == "没有" for row in ner) / len(ner)
    assert 0.15 <= share_none <= 0.25


def test_ner_answers_list_typed_entities_in_order_of_appearance(train, test_rows):
    for row in train + test_rows:
        if row["task"] != "ner" or answer(row) == "没有":
            continue
        sentence = prompt(row).split("：", 1)[1]
        position = -1
        for line in answer(row).split("\n"):
            name, _, kind = line.rpartition("_")
            assert kind in ENTITY_TYPES, line
            found = sentence.find(name, position + 1)
            assert found > position, (row["id"], line)
            position = found


def test_list_rows_carry_their_check_and_match_it(train, test_rows):
    for row in train + test_rows:
        if row["task"] != "list":
            assert "check" not in row
            continue
        check = row["check"]
        items = answer(row).split("、")
        assert len(items) == check["n"]
        assert all(item in LIST_CATEGORIES[check["category"]][1] for item in items)
        assert list_check_from_reference(answer(row)) == check


def test_every_reference_scores_one_against_itself(train, test_rows):
    for row in train + test_rows:
        assert score_record(row, answer(row)) == 1.0, row["id"]


def test_list_categories_are_disjoint():
    owner: dict[str, str] = {}
    for category, (_measure, items) in LIST_CATEGORIES.items():
        assert len(items) >= 8, category  # room for six distinct items with variety
        for item in items:
            assert item not in owner, f"{item} is in both {owner.get(item)} and {category}"
            owner[item] = category


def test_regenerating_gives_identical_bytes(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    for split in ("train", "test"):
        regenerated = (tmp_path / f"zhiling_zh_{split}.jsonl").read_bytes()
        assert regenerated == bundled_data_path(split).read_bytes(), f"{split} differs: re-run the generator"
    for task in bundled_task_names():
        assert task in result.stdout  # per-task counts are printed


def test_bundled_data_path_rejects_an_unknown_split():
    with pytest.raises(DataError, match="unknown split 'dev'"):
        bundled_data_path("dev")


# --------------------------------------------------------------------------------------------- the scorer

@pytest.mark.parametrize("task, prediction, reference, expected", [
    ("sentiment", "积极", "积极", 1.0),
    ("sentiment", " 积极\n", "积极", 1.0),
    ("sentiment", "消极", "积极", 0.0),
    ("sentiment", "积极。", "积极", 0.0),
    ("one_word", "广州", "广州", 1.0),
    ("one_word", "广州市", "广州", 0.0),
    ("rewrite", "他明天去上海吗？", "他明天去上海吗？", 1.0),
    ("rewrite", "他明天去上海吗?", "他明天去上海吗？", 0.0),
    ("rewrite", "他不喜欢吃苹果。 ", "他不喜欢吃苹果。", 1.0),
])
def test_exact_match_tasks(task, prediction, reference, expected):
    assert score_bundled(task, prediction, reference) == expected


REF = "张伟_人名\n北京_地名\n清华大学_机构名"


@pytest.mark.parametrize("prediction, reference, expected", [
    (REF, REF, 1.0),
    ("清华大学_机构名\n张伟_人名\n北京_地名", REF, 1.0),                 # order does not matter
    ("张伟_人名\n张伟_人名\n北京_地名\n清华大学_机构名", REF, 1.0),       # duplicates count once
    ("  张伟_人名 \n\n北京_地名\n清华大学_机构名\n", REF, 1.0),            # blank lines and spaces
    ("张伟_人名", REF, 0.5),                                               # P=1, R=1/3
    ("张伟_人名\n北京_机构名", REF, 0.4),                                  # wrong type is a miss: P=1/2, R=1/3
    ("张伟_人名\n北京_地名\n清华大学_机构名\n上海_地名", REF, 6 / 7),     # P=3/4, R=1
    ("没有", REF, 0.0),
    ("", REF, 0.0),
    ("没有", "没有", 1.0),
    (" 没有\n", "没有", 1.0),
    ("张伟_人名", "没有", 0.0),
    ("没有\n张伟_人名", "张伟_人名", 2 / 3),                               # 没有 beside entities is a wrong line
])
def test_ner_is_entity_set_f1(prediction, reference, expected):
    assert score_bundled("ner", prediction, reference) == pytest.approx(expected)


def test_ner_counts_for_micro_averaging():
    assert ner_counts("张伟_人名\n上海_地名", REF) == (1, 2, 3)
    assert ner_counts("没有", "没有") == (0, 0, 0)


FRUIT = {"category": "水果", "n": 3}


@pytest.mark.parametrize("prediction, check, expected", [
    ("苹果、香蕉、葡萄", FRUIT, 1.0),
    ("苹果、香蕉、葡萄。", FRUIT, 1.0),                 # a closing 。 is fine
    (" 苹果 、香蕉、 葡萄\n", FRUIT, 1.0),
    ("苹果、香蕉", FRUIT, 0.0),                        # too few
    ("苹果、香蕉、葡萄、西瓜", FRUIT, 0.0),            # too many
    ("苹果、香蕉、白菜", FRUIT, 0.0),                  # 白菜 is not a fruit
    ("苹果、苹果、香蕉", FRUIT, 0.0),                  # repeated item
    ("苹果，香蕉，葡萄", FRUIT, 0.0),                  # wrong separator: one item that is not a fruit
    ("苹果、香蕉、", FRUIT, 0.0),                      # empty item
    ("两个城市：北京、上海", {"category": "中国城市", "n": 2}, 0.0),
    ("北京、上海", {"category": "中国城市", "n": 2}, 1.0),
])
def test_list_needs_the_right_count_of_valid_distinct_items(prediction, check, expected):
    assert score_bundled("list", prediction, "西瓜、草莓、桃子", check) == expected


def test_list_without_check_reads_category_and_count_from_the_reference():
    assert score_bundled("list", "苹果、香蕉", "西瓜、草莓") == 1.0
    assert score_bundled("list", "苹果、香蕉、葡萄", "西瓜、草莓") == 0.0
    assert score_bundled("list", "苹果、白菜", "西瓜、草莓") == 0.0
    with pytest.raises(DataError, match="does not belong to any bundled category"):
        score_bundled("list", "苹果", "苹果、白菜")


def test_scorer_rejects_unknown_task_and_category():
    with pytest.raises(DataError, match="unknown bundled task 'poetry'"):
        score_bundled("poetry", "a", "a")
    with pytest.raises(DataError, match="unknown list category '星球'"):
        score_bundled("list", "火星", "火星", {"category": "星球", "n": 1})


def test_task_names_are_stable():
    assert bundled_task_names() == ("ner", "sentiment", "list", "one_word", "rewrite")
