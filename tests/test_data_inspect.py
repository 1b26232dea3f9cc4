"""`zhiling data stats` and `zhiling data preview`: numbers, the histogram, and the trained-token markers."""

import json

import pytest

from zhiling.cli import main
from zhiling.data.stats import collect, describe
from zhiling.data.templates import TEMPLATES

ROWS = [
    {"instruction": "判断情感：这家店很好吃", "input": "", "output": "积极"},
    {"instruction": "判断情感：服务太差了", "input": "", "output": "消极"},
    {"instruction": "判断情感：这家店很好吃", "input": "", "output": "积极"},
    {"instruction": "列出三种水果", "input": "用顿号分隔", "output": "苹果、香蕉、橙子"},
]


@pytest.fixture()
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    return path


def test_describe_percentiles():
    out = describe([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert out["count"] == 10 and out["mean"] == 5.5 and out["min"] == 1 and out["max"] == 10
    assert out["50"] == 5.5 and out["25"] == 3.25 and out["90"] == pytest.approx(9.1)
    assert describe([]) == {"count": 0}


def test_collect_counts_chars_tokens_cutoff_and_duplicates(tiny_tokenizer):
    records = [{"system": "", "messages": [{"role": "user", "content": r["instruction"]},
                                           {"role": "assistant", "content": r["output"]}]} for r in ROWS]
    stats = collect(records, tiny_tokenizer, TEMPLATES["belle"], cutoff=12)
    assert stats.rows == 4 and stats.duplicates == 1
    assert stats.prompt_chars == [11, 10, 11, 6] and stats.response_chars == [2, 2, 2, 8]
    pieces = TEMPLATES["belle"].encode(tiny_tokenizer, None, [("列出三种水果", "苹果、香蕉、橙子")])
    assert stats.total_tokens[3] == len(pieces[0][0]) + len(pieces[0][1])
    assert stats.over_cutoff == sum(1 for t in stats.total_tokens if t > 12)


def test_stats_command_json_and_plot(alpaca_file, tmp_path, tiny_model_dir, capsys):
    plot = tmp_path / "hist.png"
    assert main(["data", "stats", str(alpaca_file), "--model", str(tiny_model_dir("llama")), "--template", "belle",
                 "--cutoff", "20", "--json", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["rows"] == 4 and summary["duplicates"] == 1 and summary["template"] == "belle"
    assert summary["prompt_chars"]["max"] == 12  # instruction + "\n" + input and summary["total_tokens"]["count"] == 4
    assert "over_cutoff" in summary and summary["cutoff_len"] == 20
    assert "detected format 'alpaca'" in captured.err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_table_without_model(alpaca_file, capsys):
    assert main(["data", "stats", str(alpaca_file)]) == 0
    out = capsys.readouterr().out
    assert "4 rows, 1 exact duplicates" in out and "prompt chars" in out and "add --model" in out


def test_stats_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', encoding="utf-8")
    assert main(["data", "stats", str(bad)]) == 1
    assert f"{bad}, line 2: malformed JSON" in capsys.readouterr().err


def test_preview_marks_trained_tokens_when_piped(alpaca_file, tiny_model_dir, capsys):
    assert main(["data", "preview", "--data", str(alpaca_file), "--model", str(tiny_model_dir("llama")),
                 "--template", "belle", "--rows", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "Human: 判断情感：这家店很好吃\n\nAssistant: [[积极<eos>]]" in out
    assert "[[消极<eos>]]" in out and "row 3" not in out
    assert "Text inside [[ ]] is trained" in out


def test_preview_from_config_with_overrides(alpaca_file, tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir('llama')}\ntemplate: alpaca_zh\ndata:\n  datasets: ['{alpaca_file}']\n",
                      encoding="utf-8")
    # key=value overrides may also come after the flags
    assert main(["data", "preview", str(config), "--rows", "1", "--color", "never", "data.train_on_prompt=true"]) == 0
    out = capsys.readouterr().out
    assert "prompt tokens trained too" in out
    body = out.split("Text inside")[0]
    assert body.count("[[") == 1 and "[[<bos>下面是一条描述任务的指令" in body


def test_preview_colour_output(alpaca_file, tiny_model_dir, capsys):
    assert main(["data", "preview", "--data", str(alpaca_file), "--model", str(tiny_model_dir("llama")),
                 "--template", "belle", "--rows", "1", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out and "[[" not in out


def test_preview_needs_data_or_config(capsys):
    assert main(["data", "preview"]) == 1
    assert "give a CONFIG.yaml, or --data" in capsys.readouterr().err
