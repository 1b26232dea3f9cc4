"""``zhiling data convert`` / ``formats`` / ``datasets`` through the command line entry point."""

from __future__ import annotations

import json

import pytest

from zhiling.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_convert_with_options(tmp_path, capsys):
    src = write_jsonl(tmp_path / "msra.jsonl", [{"指令": "找出地名", "句子": "我住在杭州。", "答案": "杭州_地名"}])
    out = tmp_path / "out.jsonl"
    code = main(["data", "convert", "--format", "instruct", str(src), "-o", str(out), "--source", "msra",
                 "--option", "columns=instruction=指令,input=句子,output=答案", "--no-progress"])
    assert code == 0
    assert read_jsonl(out) == [{"id": "msra-000001", "system": "", "messages": [
        {"role": "user", "content": "找出地名\n我住在杭州。"}, {"role": "assistant", "content": "杭州_地名"}],
        "source": "msra"}]
    assert f"wrote 1 records to {out}" in capsys.readouterr().err


def test_convert_detects_and_reports(tmp_path, capsys):
    src = write_jsonl(tmp_path / "belle.jsonl", [{"input": "问", "target": "答"}] * 3)
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "o.jsonl"), "--dedup"]) == 0
    err = capsys.readouterr().err
    assert f"detected format 'belle' for {src}" in err
    assert "3 rows read = 1 written + 0 rejected + 2 duplicates" in err


def test_convert_strict_error_exit_code(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "问", "output": "答"}\n{"instruction": "问"}\n', encoding="utf-8")
    assert main(["data", "convert", "--format", "alpaca", str(src), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert f"error: {src}, line 2, field 'output': missing field 'output'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_convert_skip_invalid(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "问", "output": "答"}\nnot json\n', encoding="utf-8")
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "o.jsonl"), "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "2 rows read = 1 written + 1 rejected + 0 duplicates" in err and str(tmp_path / "o.rejected.jsonl") in err
    rejected = read_jsonl(tmp_path / "o.rejected.jsonl")
    assert rejected[0]["line"] == 2 and rejected[0]["raw"] == "not json"


def test_convert_txt_of_json_lines_accounts_for_every_row(tmp_path, capsys):
    src = tmp_path / "train.txt"  # baichuan-QLoRA-Tuning's data/msra/train.txt layout
    src.write_text('{"instruction": "找出人名", "input": "张三来了。", "output": "张三_人名"}\n'
                   '{"instruction": "找出人名", "input": "张三来了。", "output": "张三_人名"}\n'
                   '{"instruction": "找出人名", "input": "李四走了。", "output": ""}\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert main(["data", "convert", str(src), "-o", str(out), "--skip-invalid", "--dedup", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"detected format 'alpaca' for {src}" in err
    assert "3 rows read = 1 written + 1 rejected + 1 duplicates" in err
    assert len(read_jsonl(out)) == 1 and read_jsonl(tmp_path / "o.rejected.jsonl")[0]["line"] == 3


def test_convert_shards_and_bad_arguments(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ff.jsonl", [{"kind": k, "input": f"{k}{i}", "target": "答"}
                                              for k in ("甲", "乙") for i in range(4)])
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "shards.jsonl"), "--shards", "2"]) == 0
    err = capsys.readouterr().err
    assert "kinds: 甲 4, 乙 4" in err
    for index in range(2):
        shard = read_jsonl(tmp_path / f"shards-0000{index}-of-00002.jsonl")
        assert sorted(r["kind"] for r in shard) == ["乙", "乙", "甲", "甲"]
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "x.jsonl"), "--option", "oops"]) == 1
    assert "not of the form KEY=VALUE" in capsys.readouterr().err
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "x.jsonl"), "--max-samples", "0"]) == 1
    assert main(["data", "convert", str(src), "-o", str(tmp_path / "x.jsonl"), "--format", "firefly",
                 "--option", "kind=x"]) == 1
    assert "unknown option 'kind' for format 'firefly'; it takes no options" in capsys.readouterr().err


def test_formats_listing_and_detail(capsys):
    assert main(["data", "formats"]) == 0
    out = capsys.readouterr().out
    for name in ("alpaca", "belle", "instruct", "sharegpt", "messages", "vicuna_chat", "firefly", "psyqa",
                 "couplets", "baize", "coig", "hf:NAME"):
        assert name in out
    assert "--option answers=..." in out
    assert main(["data", "formats", "psyqa"]) == 0
    out = capsys.readouterr().out
    assert "options (--option KEY=VALUE)" in out and "first record:" in out and "psyqa-000001" in out
    assert main(["data", "formats", "psyqaa"]) == 1


def test_datasets_listing(capsys):
    assert main(["data", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "zhiling_zh " in out and "example_couplets" in out


@pytest.mark.parametrize("command", ["convert", "formats", "datasets"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit):
        main(["data", command, "--help"])
    assert "examples:" in capsys.readouterr().out
