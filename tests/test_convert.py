"""The conversion driver: detection, strict and --skip-invalid handling of bad input, dedup, shards, hf: inputs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from zhiling.data.convert import (ConvertReport, StratifiedSharder, convert_files, detect_rows, iter_records,
                                  output_paths)
from zhiling.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def msra_rows(count):
    return [{"instruct": "找出句子中的人名", "query": f"第{i}句：小明{i}号在家。", "answer": f"小明{i}号_人名"}
            for i in range(count)]


# ----- acceptance check ---------------------------------------------------------------------------------------------
def test_acceptance_thousand_rows_one_broken_line(tmp_path):
    good = write_jsonl(tmp_path / "msra.jsonl", msra_rows(1000))
    out = tmp_path / "out.jsonl"
    report = convert_files(str(good), out, "instruct", announce=None)
    records = read_jsonl(out)
    assert (report.read, report.records, len(records)) == (1000, 1000, 1000)
    assert records[0] == {"id": "instruct-000001", "system": "", "messages": [
        {"role": "user", "content": "找出句子中的人名\n第0句：小明0号在家。"},
        {"role": "assistant", "content": "小明0号_人名"}], "source": "instruct"}
    assert records[-1]["id"] == "instruct-001000"

    lines = good.read_text(encoding="utf-8").splitlines()
    lines[456] = '{"instruct": "找出句子中的人名", "query": "坏行", "answer": '  # line 457 is cut short
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out2 = tmp_path / "out2.jsonl"
    with pytest.raises(DataError) as info:
        convert_files(str(broken), out2, "instruct", announce=None)
    assert info.value.path == str(broken) and info.value.line == 457 and "malformed JSON" in info.value.reason
    assert not out2.exists() and not list(tmp_path.glob("out2*"))  # nothing half-written

    report = convert_files(str(broken), out2, "instruct", skip_invalid=True, announce=None)
    assert (report.read, report.records, report.rejected) == (1000, 999, 1)
    rejected = read_jsonl(tmp_path / "out2.rejected.jsonl")
    assert rejected == [{"file": str(broken), "line": 457, "field": None,
                         "reason": rejected[0]["reason"], "raw": lines[456]}]
    assert rejected[0]["reason"].startswith("malformed JSON")
    assert len(read_jsonl(out2)) == 999


# ----- every kind of bad input --------------------------------------------------------------------------------------
GOOD = {"instruction": "问", "output": "答"}


@pytest.mark.parametrize("line, field, reason", [
    (b'{"instruction": "x", "output": "y"', None, "malformed JSON"),
    (b'{"instruction": "x"}', "output", "missing field 'output'"),
    (b'{"instruction": 3.5, "output": true}', "output", "expected a string, got boolean"),
    (b'{"instruction": "x", "output": ""}', "output", "is empty"),
    (b'{"instruction": "\xb2\xe2\xca\xd4", "output": "y"}', None, "not valid UTF-8"),
    (b'["not", "an", "object"]', None, "expected a JSON object"),
])
def test_bad_rows_strict_and_skipped(tmp_path, line, field, reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError) as info:
        list(iter_records(str(path), "alpaca", announce=None))
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 2, field) and reason in err.reason

    rejected = []
    records = list(iter_records(str(path), "alpaca", skip_invalid=True, rejected=rejected.append, announce=None))
    assert len(records) == 2 and [r["id"] for r in records] == ["alpaca-000001", "alpaca-000002"]
    assert len(rejected) == 1
    item = rejected[0]
    assert (item.file, item.line, item.field) == (str(path), 2, field) and reason in item.reason
    assert item.raw == line.decode("utf-8", errors="replace")


def test_non_utf8_file_error_names_line_and_byte(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"instruction": "测试", "output": "好"}'.encode("gbk") + b"\n")
    with pytest.raises(DataError) as info:
        list(iter_records(str(path), "alpaca", announce=None))
    assert info.value.line == 2 and "byte 0xb2" in info.value.reason and "iconv" in info.value.reason


@pytest.mark.parametrize("content, reason", [(b"", "file is empty"), (b"\n\n  \n", "no rows"), (b"[]", "empty")])
def test_empty_files(tmp_path, content, reason):
    path = tmp_path / "empty.json"
    path.write_bytes(content)
    for fmt in ("alpaca", "auto"):
        with pytest.raises(DataError) as info:
            list(iter_records(str(path), fmt, announce=None))
        assert info.value.path == str(path) and reason in info.value.reason


def test_file_not_found_unknown_option_unknown_format(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        list(iter_records(str(missing), "alpaca", announce=None))
    assert info.value.path == str(missing) and info.value.reason == "file not found"
    with pytest.raises(DataError, match="file not found"):
        list(iter_records(str(missing), announce=None))
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(DataError, match="unknown option 'colums' for format 'instruct'; did you mean 'columns'"):
        list(iter_records(str(path), "instruct", {"colums": "x"}, announce=None))
    with pytest.raises(DataError, match="unknown format 'sharegtp'; did you mean 'sharegpt'"):
        list(iter_records(str(path), "sharegtp", announce=None))
    with pytest.raises(DataError, match="no input files"):
        list(iter_records([], announce=None))


def test_option_errors_are_never_skipped(tmp_path):
    path = write_jsonl(tmp_path / "p.json", [{"question": "问", "answers": [{"answer_text": "答"}]}])
    with pytest.raises(DataError, match="not one of"):
        list(iter_records(str(path), "psyqa", {"answers": "many"}, skip_invalid=True, rejected=lambda r: None,
                          announce=None))


def test_broken_json_array_stops_even_with_skip_invalid(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n{"instruction": "问", "output": "答"},\n{"instruction": "问", \n', encoding="utf-8")
    with pytest.raises(DataError, match="rest of the array cannot be read"):
        list(iter_records(str(path), "alpaca", skip_invalid=True, rejected=lambda r: None, announce=None))


@pytest.mark.parametrize("tail", ['\n{"instruction": "问", "output": "答"}\n', '[{"instruction": "问", "output": "答"}]',
                                  "oops"])
def test_data_after_a_json_array_is_an_error(tmp_path, tail):
    path = tmp_path / "a.json"
    path.write_text('[\n{"instruction": "问", "output": "答"}\n]' + tail, encoding="utf-8")
    for skip in (False, True):
        with pytest.raises(DataError) as info:
            list(iter_records(str(path), skip_invalid=skip, rejected=lambda r: None, announce=None))
        assert info.value.path == str(path) and "data after the closing ']'" in info.value.reason
        assert info.value.line == (4 if tail.startswith("\n") else 3)


def test_unpaired_surrogate_is_a_rejected_row(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"instruction": "问", "output": "答"}\n{"instruction": "问\\ud800", "output": "答"}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: the text holds an unpaired surrogate \\ud800"):
        list(iter_records(str(path), announce=None))
    report = convert_files(str(path), tmp_path / "o.jsonl", skip_invalid=True, announce=None)
    assert (report.read, report.written, report.rejected) == (2, 1, 1)
    assert read_jsonl(tmp_path / "o.rejected.jsonl")[0]["line"] == 2


def test_deeply_nested_row_is_a_rejected_row(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"instruction": "问", "output": "答"}\n' + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    rejected = []
    records = list(iter_records(str(path), "alpaca", skip_invalid=True, rejected=rejected.append, announce=None))
    assert len(records) == 1 and [(r.line, r.reason) for r in rejected] == [(2, "malformed JSON: nested too deeply")]
    array = tmp_path / "n.json"
    array.write_text("[" * 5000 + "]" * 5000, encoding="utf-8")
    with pytest.raises(DataError, match="nested too deeply"):
        list(iter_records(str(array), "alpaca", skip_invalid=True, rejected=lambda r: None, announce=None))


def test_txt_file_of_json_lines_is_read_as_json(tmp_path):
    # the layout of baichuan-QLoRA-Tuning's data/msra/train.txt: JSON lines in a .txt file
    rows = [{"instruction": "找出句子中的人名和地名", "input": f"小明{i}号住在杭州。", "output": f"小明{i}号_人名"}
            for i in range(3)]
    path = write_jsonl(tmp_path / "train.txt", rows)
    messages = []
    records = list(iter_records(str(path), announce=messages.append))
    assert [r["source"] for r in records] == ["alpaca"] * 3
    assert records[0]["messages"][0]["content"] == "找出句子中的人名和地名\n小明0号住在杭州。"
    assert messages[0].startswith(f"detected format 'alpaca' for {path}")
    plain = tmp_path / "in.txt"
    plain.write_text("上 联\n", encoding="utf-8")
    (tmp_path / "out.txt").write_text("下 联\n", encoding="utf-8")
    assert len(list(iter_records([str(plain), str(tmp_path / "out.txt")], announce=None))) == 1  # still couplets


# ----- every row accounted for --------------------------------------------------------------------------------------
def test_every_row_is_written_rejected_or_a_duplicate(tmp_path):
    rows = [{"question": "问一", "answers": [{"answer_text": "答一"}, {"answer_text": "答二"}]},
            {"question": "问一", "answers": [{"answer_text": "答一"}, {"answer_text": "答二"}]},
            {"question": "问二", "answers": [{"answer_text": "答一"}, {"answer_text": "答三"}]},
            {"question": "问三", "answers": []}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = convert_files(str(path), tmp_path / "o.jsonl", "psyqa", {"answers": "all"}, skip_invalid=True,
                           dedup=True, announce=None)
    assert (report.read, report.written, report.rejected, report.duplicates, report.records) == (4, 2, 1, 1, 4)
    assert report.summary() == "4 rows read = 2 written + 1 rejected + 1 duplicates (4 records)"
    report.check()


def test_a_broken_account_is_a_bug_not_a_data_error():
    from zhiling.data.accounting import AccountingError, RowAccount

    with pytest.raises(AccountingError, match="3 rows read but 2 accounted for"):
        RowAccount(read=3, written=1, rejected=1).check()
    assert not issubclass(AccountingError, DataError)


# ----- auto-detection -----------------------------------------------------------------------------------------------
def test_detection_message(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"kind": "Couplet", "input": "上", "target": "下"}] * 3)
    messages = []
    records = list(iter_records(str(path), announce=messages.append))
    assert records[0]["kind"] == "Couplet" and records[0]["source"] == "firefly"
    assert messages == [f"detected format 'firefly' for {path}: the first 3 rows have keys kind + input + target "
                        f"(keys seen: input, kind, target)"]


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"instruction": "Human: a\nAssistant:", "output": "b"}, "belle"),
    ({"input": "a", "target": "b"}, "belle"),
    ({"kind": "k", "input": "a", "target": "b"}, "firefly"),
    ({"instruct": "a", "query": "q", "answer": "b"}, "instruct"),
    ({"conversations": []}, "sharegpt"),
    ({"messages": []}, "messages"),
    ({"input": ["a"], "output": ["b"]}, "vicuna_chat"),
    ({"question": "a", "answers": []}, "psyqa"),
    ({"topic": "t", "input": "[|Human|] a [|AI|] b"}, "baize"),
    ({"textbox_question": "q", "textbox_answer": "a"}, "coig"),
    ({"trans_instruction": "q", "trans_output": "a", "instruction": "q", "output": "a"}, "coig"),
    ({"round_0": {}}, "coig"),
    ({"history": [{"input": "a", "output": "b"}], "input": "c", "output": "d"}, "vicuna_chitchat"),
    ({"history": [], "input": "c", "output": "d"}, "vicuna_chitchat"),
    ({"instruction": "a", "output": "b", "history": [["q", "a"]], "input": "c"}, "alpaca"),
])
def test_detect_each_format(row, expected):
    assert detect_rows([row], "x").spec.name == expected


def test_detection_unknown_and_ambiguous(tmp_path):
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as info:
        list(iter_records(str(unknown), announce=None))
    message = str(info.value)
    assert "keys seen: completion, prompt" in message and "alpaca (" in message and "sharegpt (" in message
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"}, {"conversations": []}])
    with pytest.raises(DataError, match="the first rows disagree .row 1 looks like alpaca, row 2 looks like sharegpt"):
        list(iter_records(str(mixed), announce=None))
    scalars = write_jsonl(tmp_path / "s.jsonl", ["text", "more"])
    with pytest.raises(DataError, match="non-object rows: str"):
        list(iter_records(str(scalars), announce=None))


def test_detection_when_first_rows_are_broken(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot detect the format: the first rows cannot be read"):
        list(iter_records(str(path), announce=None))


def test_detection_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "甲", "output": "乙"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"input": ["丙"], "output": ["丁"]}])
    report = ConvertReport()
    records = list(iter_records([str(a), str(b)], report=report, announce=None))
    assert report.formats == {str(a): "alpaca", str(b): "vicuna_chat"}
    assert [r["id"] for r in records] == ["alpaca-000001", "vicuna_chat-000002"]


# ----- ids, sources, limits -----------------------------------------------------------------------------------------
def test_source_and_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"问{i}", "output": "答"} for i in range(5)])
    records = list(iter_records(str(path), source="my_data", max_samples=2, announce=None))
    assert [(r["id"], r["source"]) for r in records] == [("my_data-000001", "my_data"), ("my_data-000002", "my_data")]


def test_dedup_counts_duplicates(tmp_path):
    rows = [{"instruction": "问", "output": "答"}, {"instruction": "问", "output": "答"},
            {"instruction": "问", "output": "答", "system": "你是助手"}, {"instruction": "问", "input": "", "output": "答"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = convert_files(str(path), tmp_path / "o.jsonl", dedup=True, announce=None)
    assert (report.read, report.written, report.records, report.duplicates) == (4, 2, 2, 2)
    assert report.summary() == "4 rows read = 2 written + 0 rejected + 2 duplicates"
    report = convert_files(str(path), tmp_path / "o.jsonl", announce=None)
    assert (report.records, report.duplicates) == (4, 0)


def test_output_may_not_be_an_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(DataError, match="also an input"):
        convert_files(str(path), path, announce=None)


def test_skip_invalid_without_rejections_writes_empty_rejected_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    report = convert_files(str(path), tmp_path / "o.jsonl", skip_invalid=True, announce=None)
    assert report.rejected == 0 and (tmp_path / "o.rejected.jsonl").read_text() == ""


def test_progress_bar_runs(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 50)
    report = convert_files(str(path), tmp_path / "o.jsonl", progress=True, announce=None)
    assert report.records == 50


# ----- shards -------------------------------------------------------------------------------------------------------
def test_firefly_shards_are_stratified_by_kind(tmp_path):
    kinds = {"Couplet": 40, "Translation": 21, "Poetry": 10, "Riddle": 3}
    rows = [{"kind": kind, "input": f"{kind}{i}", "target": "答"} for kind, n in kinds.items() for i in range(n)]
    path = write_jsonl(tmp_path / "firefly.jsonl", rows)
    report = convert_files(str(path), tmp_path / "ff.jsonl", shards=4, seed=7, announce=None)
    assert report.outputs == [str(tmp_path / f"ff-0000{i}-of-00004.jsonl") for i in range(4)]
    shards = [read_jsonl(tmp_path / f"ff-0000{i}-of-00004.jsonl") for i in range(4)]
    assert sum(map(len, shards)) == 74 and report.shard_counts == [len(s) for s in shards]
    for kind, total in kinds.items():
        per_shard = [Counter(r["kind"] for r in shard)[kind] for shard in shards]
        assert sum(per_shard) == total and max(per_shard) - min(per_shard) <= 1, (kind, per_shard)
    assert sorted(r["id"] for s in shards for r in s) == sorted(f"firefly-{i:06d}" for i in range(1, 75))
    again = convert_files(str(path), tmp_path / "ff.jsonl", shards=4, seed=7, announce=None)
    assert [read_jsonl(tmp_path / f"ff-0000{i}-of-00004.jsonl") for i in range(4)] == shards
    assert again.shard_counts == report.shard_counts
    convert_files(str(path), tmp_path / "other.jsonl", shards=4, seed=8, announce=None)
    assert [read_jsonl(tmp_path / f"other-0000{i}-of-00004.jsonl") for i in range(4)] != shards


def test_sharder_balances_every_kind():
    sharder = StratifiedSharder(3, seed=1)
    assignment = Counter((kind, sharder.shard_for(kind)) for kind in ["a"] * 9 + ["b"] * 6 + [None] * 3)
    assert all(assignment[(kind, shard)] == n for kind, n in (("a", 3), ("b", 2), (None, 1)) for shard in range(3))


def test_output_paths_and_bad_shards(tmp_path):
    assert output_paths(tmp_path / "x.jsonl", None) == ([tmp_path / "x.jsonl"], tmp_path / "x.rejected.jsonl")
    assert output_paths(tmp_path / "x.jsonl", 2)[0][1] == tmp_path / "x-00001-of-00002.jsonl"
    with pytest.raises(DataError, match="at least 1"):
        convert_files("a.jsonl", tmp_path / "x.jsonl", shards=0, announce=None)


# ----- hf: inputs ---------------------------------------------------------------------------------------------------
def test_hf_local_dataset_folder_and_split(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"instruction": "你好", "input": "", "output": "你好！"}])
    write_jsonl(folder / "test.jsonl", [{"instruction": "再见", "input": "", "output": "再见！"}])
    messages = []
    records = list(iter_records(f"hf:{folder}", announce=messages.append))
    assert records == [{"id": "alpaca-000001", "system": "", "messages": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}], "source": "alpaca"}]
    assert messages[0].startswith(f"detected format 'alpaca' for hf:{folder}")
    test = list(iter_records(f"hf:{folder}:test", "alpaca", announce=None))
    assert test[0]["messages"][0]["content"] == "再见"
    with pytest.raises(DataError, match="no split 'dev'"):
        list(iter_records(f"hf:{folder}:dev", "alpaca", announce=None))


def test_hf_local_file_and_saved_dataset(tmp_path):
    import datasets

    path = write_jsonl(tmp_path / "rows.jsonl", [{"kind": "Couplet", "input": "上联", "target": "下联"}])
    records = list(iter_records(f"hf:{path}", announce=None))
    assert records[0]["kind"] == "Couplet" and records[0]["messages"][1]["content"] == "下联"
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]}]
                               ).save_to_disk(str(saved))
    records = list(iter_records(f"hf:{saved}", announce=None))
    assert records[0]["source"] == "sharegpt" and records[0]["messages"][1]["content"] == "答"


def test_hf_bad_row_names_row_number(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}])
    with pytest.raises(DataError) as info:
        list(iter_records(f"hf:{folder}", "alpaca", announce=None))
    assert (info.value.path, info.value.line, info.value.field) == (f"hf:{folder}:train", 2, "output")


def test_hf_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not load the dataset"):
        list(iter_records("hf:zhiling-no-such-user/no-such-dataset", "alpaca", announce=None))
    with pytest.raises(DataError, match="names no dataset"):
        list(iter_records("hf:", "alpaca", announce=None))


@pytest.mark.parametrize("content, message", [
    (b"{\"a\": 1", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got array"),
])
def test_read_json_object_names_the_file(tmp_path, content, message):
    from zhiling.data.reader import read_json_object

    path = tmp_path / "side.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_json_object(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="missing.json.*cannot read it: No such file"):
        read_json_object(tmp_path / "missing.json")
    path.write_text('{"a": [1]}', encoding="utf-8")
    assert read_json_object(path) == {"a": [1]}
