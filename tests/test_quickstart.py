"""zhiling quickstart: the pieces (held-out rows, scoring, report) fast; the whole run on the real default model slow."""

import json

import pytest

from zhiling.cli import main
from zhiling.data.bundled import BUNDLED_TASKS
from zhiling.quickstart import (QuickstartOptions, QuickstartReport, Scores, held_out_rows, report_markdown,
                                score_answers, shown_rows, training_config)


def test_held_out_rows_cover_every_task():
    rows = held_out_rows(None)
    assert len(rows) == 120 and {row["task"] for row in rows} == set(BUNDLED_TASKS)
    few = held_out_rows(20)
    assert 15 <= len(few) <= 25 and {row["task"] for row in few} == set(BUNDLED_TASKS)
    assert [row["task"] for row in shown_rows(rows)] == ["sentiment", "ner", "rewrite"]


def test_scores_of_perfect_and_empty_answers():
    rows = held_out_rows(None)
    perfect, per_row = score_answers(rows, [row["messages"][-1]["content"] for row in rows], 1.0)
    assert perfect.overall == 1.0 and perfect.exact_match == 1.0 and all(v == 1.0 for v in perfect.per_task.values())
    empty, _ = score_answers(rows, [""] * len(rows), 1.0)
    no_entity_rows = sum(1 for row in rows if row["task"] == "ner" and row["messages"][-1]["content"] == "没有")
    assert empty.overall == pytest.approx(no_entity_rows / len(rows))  # an empty answer is right only for "没有"
    assert len(per_row) == 120


def test_report_markdown(tmp_path):
    scores = Scores({"ner": 0.1, "sentiment": 0.5}, 0.3, 0.2, 0.4, 120, 10.0)
    better = Scores({"ner": 0.6, "sentiment": 0.9}, 0.75, 0.7, 0.8, 120, 8.0)
    report = QuickstartReport(tmp_path, scores, better,
                              [{"task": "ner", "prompt": "找出…", "reference": "张三_人名\n北京_地名", "before": "",
                                "after": "张三_人名"}], 100.0, 200.0, 0.5, tmp_path / "adapter",
                              "zhiling chat --model default --adapter x", {"train": 100.0})
    text = report_markdown(report, training_config(QuickstartOptions(output_dir=str(tmp_path))))
    assert "| ner | 0.100 | 0.600 |" in text and "| **overall** | **0.300** | **0.750** |" in text
    assert "reference: `张三_人名 / 北京_地名`" in text and "before: `(empty)`" in text
    assert "zhiling chat --model default --adapter x" in text and "![loss](loss.png)" in text


def test_quickstart_training_config_is_valid(tmp_path):
    cfg = training_config(QuickstartOptions(output_dir=str(tmp_path), max_steps=7))
    assert cfg.training.max_steps == 7 and cfg.training.method == "lora" and cfg.data.datasets == ["zhiling_zh"]
    assert cfg.model.name_or_path is None  # the embedded default model


@pytest.mark.slow
def test_quickstart_on_the_default_model(tmp_path):
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--output", str(out), "--no-progress"]) == 0
    for name in ("report.md", "scores.json", "answers.jsonl", "loss.png", "metrics.jsonl", "zhiling.json",
                 "adapter/adapter_model.safetensors", "adapter/zhiling_template.json", "eval/report/report.html",
                 "eval/report/report.md", "eval/base/summary.json", "eval/lora/summary.json"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "scores.json").read_text())
    before, after = scores["before"]["overall"], scores["after"]["overall"]
    print(f"quickstart held-out score: before {before:.3f}, after {after:.3f}; "
          f"total {scores['total_seconds']:.0f} s, training {scores['train_seconds']:.0f} s")
    assert after > before + 0.2
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 120 and sum(a["score_after"] for a in answers) > sum(a["score_before"] for a in answers)


def test_eval_report_compares_base_and_fine_tuned(tmp_path):
    """OUTPUT/eval: both prediction files, a metrics run each, and the eval-compare HTML report."""
    from zhiling.eval.rundir import read_run
    from zhiling.quickstart import write_eval_report

    rows = held_out_rows(20)
    references = [row["messages"][-1]["content"] for row in rows]
    page = write_eval_report(tmp_path / "eval", rows, [""] * len(rows), references)
    html = page.read_text(encoding="utf-8")
    assert page.name == "report.html" and "base model" in html and "fine-tuned" in html
    assert "data:image/png;base64," in html  # the per-task chart is embedded
    assert (page.parent / "report.md").is_file()
    base, lora = read_run(tmp_path / "eval" / "base"), read_run(tmp_path / "eval" / "lora")
    assert base.kind == lora.kind == "metrics"
    assert lora.summary["overall"]["bundled"] == pytest.approx(1.0)
    assert base.summary["overall"]["bundled"] < 0.5
    assert len((tmp_path / "eval" / "lora.pred.jsonl").read_text(encoding="utf-8").splitlines()) == len(rows)
