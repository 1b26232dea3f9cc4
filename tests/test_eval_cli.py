"""`zhiling eval ...` end to end, and the prediction-file reader behind it."""

import json
import re

import pytest
from judge_server import JudgeServer, answers_in

from zhiling.cli import main
from zhiling.errors import DataError
from zhiling.eval.predictions import read_predictions


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


# ------------------------------------------------------------------------------------------- prediction files


def test_prediction_rows_meta_and_defaults(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"__meta__": {"max_new_tokens": 64}},
        {"id": "a", "prompt": "问", "output": "答", "reference": "答", "task": "qa", "check": {"n": 1}},
        {"prompt": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                    {"role": "user", "content": "再见"}], "output": "", "reference": ["再见", "拜拜"]},
        {"id": 7, "prompt": "问", "output": "答"},
    ])
    (tmp_path / "p.jsonl.meta.json").write_text('{"model": "m", "max_new_tokens": 32}', encoding="utf-8")
    file = read_predictions(path)
    assert file.meta == {"model": "m", "max_new_tokens": 64}  # the header line wins over the side file
    a, b, c = file.rows
    assert (a.id, a.task, a.extra) == ("a", "qa", {"check": {"n": 1}})
    assert b.id == "line-3" and b.output == "" and b.reference == ["再见", "拜拜"]
    assert b.prompt == "user: 你好\nassistant: 你好！\nuser: 再见"
    assert c.id == "7" and c.reference is None


@pytest.mark.parametrize("rows, line, field, message", [
    ([{"id": "a", "prompt": "问"}], 1, "output", "missing field 'output'"),
    ([{"id": "a", "prompt": "问", "output": "答"}, {"id": "a", "prompt": "问", "output": "答"}], 2, "id",
     "duplicate id 'a'"),
    ([{"id": "a", "prompt": "", "output": "答"}], 1, "prompt", "is empty"),
    ([{"id": "a", "prompt": "问", "output": ["答"]}], 1, "output", "expected a string"),
    ([{"id": "a", "prompt": "问", "output": "答", "reference": {"x": 1}}], 1, "reference", "string or an array"),
    ([{"id": "a", "prompt": "问", "output": "答", "reference": ["x", 2]}], 1, "reference", "item 2"),
    ([{"id": "a", "prompt": "问", "output": "答", "reference": []}], 1, "reference", "empty array"),
    ([{"id": True, "prompt": "问", "output": "答"}], 1, "id", "non-empty string or number"),
    ([{"id": "a", "prompt": [{"role": "user"}], "output": "答"}], 1, "prompt", "message 1"),
    (['{"id": "a", "prompt": "问", "output": "答"', ], 1, None, "malformed JSON"),
    (['["a", "b"]'], 1, None, "expected a JSON object"),
    ([{"__meta__": {"model": "m"}}], None, None, "only a header"),
])
def test_bad_prediction_files_name_file_line_field(tmp_path, rows, line, field, message):
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=message) as err:
        read_predictions(path)
    assert err.value.path == str(path)
    assert (err.value.line, err.value.field) == (line, field)


# ------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["metrics", "judge", "suite-prompts", "mc", "compare"])
def test_every_eval_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"zhiling eval {command}" in out


def test_eval_group_lists_its_commands(capsys):
    main(["eval"])
    out = capsys.readouterr().out
    for command in ("metrics", "judge", "suite-prompts", "mc", "compare"):
        assert command in out


# ------------------------------------------------------------------------------------------- metrics


def _bundled_like(tmp_path):
    return _jsonl(tmp_path / "pred.jsonl", [
        {"id": "s1", "task": "sentiment", "prompt": "判断：很好", "output": "积极", "reference": "积极"},
        {"id": "s2", "task": "sentiment", "prompt": "判断：很差", "output": "还行吧", "reference": "消极"},
        {"id": "n1", "task": "ner", "prompt": "找实体：李雷在上海", "output": "李雷_人名\n上海", "reference":
            "李雷_人名\n上海_地名"},
        {"id": "w1", "task": "one_word", "prompt": "一个词", "output": "苹果", "reference": "苹果"},
        {"id": "x1", "task": "rewrite", "prompt": "没有参考", "output": "随便"},
    ])


def test_metrics_command_writes_run_folder(tmp_path, capsys):
    pred = _bundled_like(tmp_path)
    out = tmp_path / "run"
    code = main(["eval", "metrics", "--pred", str(pred), "--by", "task", "--metrics",
                 "em,f1,ner:entity,sentiment:accuracy", "--labels", "sentiment=积极,消极", "--worst-first", "-q",
                 "-o", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "Reference metrics" in captured.out
    assert "1 row(s) have no reference" in captured.err
    assert "1 prediction(s) are not in the label set" in captured.err
    assert "1 malformed entity line(s)" in captured.err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["overall"]["rows"] == 5 and summary["overall"]["without_reference"] == 1
    assert summary["groups"]["sentiment"]["accuracy"] == 0.5 and summary["groups"]["sentiment"]["out_of_set"] == 1
    # ner: predicted {李雷_人名} + 1 malformed, gold 2 -> P 1/2, R 1/2
    assert summary["groups"]["ner"]["entity_f1"] == 0.5
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["id"] == "s2" and rows[-1]["id"] == "x1"  # worst first, unscored last
    assert rows[0]["notes"] == ["prediction is not in the label set"]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["kind"] == "metrics"
    assert "| sentiment |" in (out / "summary.md").read_text(encoding="utf-8")


def test_metrics_command_bundled_scorer(tmp_path):
    pred = _jsonl(tmp_path / "pred.jsonl", [
        {"id": "l1", "task": "list", "prompt": "列举", "output": "袋鼠、长颈鹿", "reference": "熊猫、老虎",
         "check": {"category": "动物", "n": 2}},
        {"id": "n1", "task": "ner", "prompt": "找", "output": "没有", "reference": "没有"},
    ])
    out = tmp_path / "run"
    assert main(["eval", "metrics", "--pred", str(pred), "--metrics", "em,bundled", "-q", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    from zhiling.data.bundled import score_bundled

    expected = (score_bundled("list", "袋鼠、长颈鹿", "熊猫、老虎", {"category": "动物", "n": 2}) + 1.0) / 2
    assert summary["overall"]["bundled"] == expected
    assert summary["overall"]["em"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["--metrics", "em,meteor"], "unknown metric 'meteor'"),
    (["--metrics", "em,rougel"], "unknown metric 'rougel'; did you mean 'rouge_l'? (choose from"),
    (["--metrics", "accuracy"], "needs a label set"),
    (["--labels", "积极"], "at least two labels"),
    (["--metrics", "accuracy", "--labels", "积极,中性"], "line 2, field 'reference': reference '消极' is not one"),
    (["--metrics", "entity"], "line 1, field 'reference': reference has malformed entity line"),
])
def test_metrics_command_errors(tmp_path, capsys, args, message):
    pred = _jsonl(tmp_path / "pred.jsonl", [
        {"id": "s1", "prompt": "判断", "output": "积极", "reference": "积极"},
        {"id": "s2", "prompt": "判断", "output": "消极", "reference": "消极"},
    ])
    assert main(["eval", "metrics", "--pred", str(pred), *args, "-q", "-o", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err


def test_metrics_command_bad_file_and_no_references(tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "问", "output": "答"}, {"id": "b", "prompt": "问"}])
    assert main(["eval", "metrics", "--pred", str(bad), "-q", "-o", str(tmp_path / "o")]) == 1
    assert f"{bad}, line 2, field 'output': missing field 'output'" in capsys.readouterr().err
    none = _jsonl(tmp_path / "none.jsonl", [{"id": "a", "prompt": "问", "output": "答"}])
    assert main(["eval", "metrics", "--pred", str(none), "-q", "-o", str(tmp_path / "o")]) == 1
    assert "no row has a 'reference'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- judge


def _answer_suite(tmp_path, name, answer):
    prompts = tmp_path / "suite.jsonl"
    if not prompts.exists():
        assert main(["eval", "suite-prompts", "--categories", "culture,safety", "--limit", "2", "-o",
                     str(prompts)]) == 0
    rows = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    # what `zhiling predict` writes: id, prompt, output
    return _jsonl(tmp_path / f"{name}.jsonl", [{"id": r["id"], "prompt": r["messages"][0]["content"],
                                                "output": answer} for r in rows])


def _length_judge(body):
    return json.dumps({label: min(10, len(text)) for label, text in answers_in(body).items()})


def test_judge_command_end_to_end_with_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    base = _answer_suite(tmp_path, "base", "不知道")
    lora = _answer_suite(tmp_path, "lora", "天高任鸟飞，这是下联。")
    args = ["eval", "judge", "--answers", f"base={base}", "--answers", f"lora={lora}", "--api-key-env", "JUDGE_KEY",
            "--categories", "culture,safety", "--limit", "2", "--cache-dir", str(tmp_path / "cache"), "-q"]
    with JudgeServer(_length_judge) as server:
        out = tmp_path / "judge"
        code = main([*args, "--judge-url", server.url, "--judge-model", "judge-test", "-o", str(out)])
        assert code == 0
        assert len(server.requests) == 4
        printed = capsys.readouterr().out
        assert "4 judge request(s) sent, 0 of 4 prompt(s) answered from the cache" in printed
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        board = summary["leaderboard"]
        assert board["overall"]["base"]["mean"] == 3 and board["overall"]["lora"]["mean"] == 10
        assert set(board["categories"]) == {"culture", "safety"}
        assert summary["counts"] == {"items": 4, "requests": 4, "cached": 0, "ok": 4}
        markdown = (out / "summary.md").read_text(encoding="utf-8")
        assert "| culture (语言与文化) | 3.00 | 10.00 | 2/2 |" in markdown
        rows = [json.loads(line) for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
        assert rows[0]["answers"] == {"base": "不知道", "lora": "天高任鸟飞，这是下联。"}

        # the same command again costs nothing
        assert main([*args, "--judge-url", server.url, "--judge-model", "judge-test", "-o", str(tmp_path / "j2")]) == 0
        assert len(server.requests) == 4
        assert "0 judge request(s) sent, 4 of 4 prompt(s) answered from the cache" in capsys.readouterr().out

        # a report over the judge run
        assert main(["eval", "compare", str(out), "-o", str(tmp_path / "report"), "--samples", "2"]) == 0
        page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
        assert "data:image/png;base64," in page and "天高任鸟飞" in page


def test_judge_command_failures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    base = _answer_suite(tmp_path, "base", "不知道")

    def flaky(body):
        if "守株待兔" in body["messages"][1]["content"]:
            return 500, {"error": {"message": "boom", "type": "server_error"}}
        return json.dumps({label: 5 for label in answers_in(body)})

    args = ["eval", "judge", "--answers", str(base), "--api-key-env", "JUDGE_KEY", "--http-retries", "0",
            "--categories", "culture,safety", "--limit", "2", "--no-cache", "-q", "-o", str(tmp_path / "j")]
    with JudgeServer(flaky) as server:
        assert main([*args, "--judge-url", server.url, "--judge-model", "m"]) == 1
        err = capsys.readouterr().err
        assert "1 judge request(s) failed" in err and "run the same command again" in err
        assert (tmp_path / "j" / "rows.jsonl").exists()
        monkeypatch.setenv("JUDGE_KEY", "wrong")
        assert main([*args, "--judge-url", server.url, "--judge-model", "m"]) == 1
        assert "rejected the API key" in capsys.readouterr().err
    partial = _jsonl(tmp_path / "partial.jsonl", [{"id": "culture-01", "prompt": "x", "output": "y"}])
    assert main(["eval", "judge", "--answers", f"p={partial}", "--judge-url", "http://127.0.0.1:9/v1",
                 "--judge-model", "m", "-q", "-o", str(tmp_path / "k")]) == 1
    assert "has no answer for 89 suite prompt(s)" in capsys.readouterr().err


def test_suite_prompts_export(tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    assert main(["eval", "suite-prompts", "-o", str(out)]) == 0
    assert "wrote 90 prompt(s) in 9 categories" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 90 and rows[0]["messages"][0]["role"] == "user"
    assert len({r["id"] for r in rows}) == 90


# ------------------------------------------------------------------------------------------- mc and compare


def test_mc_command_prompts_and_scoring_seam(tmp_path, capsys, monkeypatch):
    assert main(["eval", "mc", "--print-prompts", "1", "--subjects", "geography", "--shots", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("===== geography-0 (answer C; options scored: ['A', 'B', 'C', 'D'])")
    assert "以下是关于地理的单项选择题" in out and out.rstrip().endswith("答案：")

    def always_b(**model_options):
        return lambda prompts, options: [[0.0 if i == 1 else -1.0 for i in range(len(o))] for o in options]

    monkeypatch.setattr("zhiling.eval.scoring.load_option_scorer", always_b)
    assert main(["eval", "mc", "--limit", "4", "-q", "-o", str(tmp_path / "mc")]) == 0
    summary = json.loads((tmp_path / "mc" / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (tmp_path / "mc" / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and all(r["output"] == "B" for r in rows)
    assert summary["overall"]["accuracy"] == sum(r["reference"] == "B" for r in rows) / 20
    assert main(["eval", "mc", "-q"]) == 1
    assert "-o OUT_DIR is required" in capsys.readouterr().err


def test_compare_command(tmp_path, capsys):
    pred = _bundled_like(tmp_path)
    for name in ("base", "lora"):
        assert main(["eval", "metrics", "--pred", str(pred), "--by", "task", "-q", "-o", str(tmp_path / name)]) == 0
    capsys.readouterr()
    report = tmp_path / "report"
    assert main(["eval", "compare", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(report),
                 "--chart-metric", "f1"]) == 0
    assert "compared 2 run(s)" in capsys.readouterr().out
    markdown = (report / "report.md").read_text(encoding="utf-8")
    assert re.search(r"!\[F1 by task\]\(charts/metrics_f1_by_task\.png\)", markdown)
    assert (report / "charts" / "metrics_f1_by_task.png").read_bytes().startswith(b"\x89PNG")
    assert main(["eval", "compare", str(tmp_path / "missing"), "-o", str(report)]) == 1
    assert "not a folder" in capsys.readouterr().err
