"""Run folders and the comparison report (Markdown + self-contained HTML with embedded PNG charts)."""

import base64
import html
import json
import re

import pytest

from zhiling.errors import DataError, ZhilingError
from zhiling.eval import judge as J
from zhiling.eval import mc
from zhiling.eval import reference_eval as R
from zhiling.eval.predictions import read_predictions
from zhiling.eval.report import build_report, to_markdown, write_report
from zhiling.eval.rundir import read_run, write_run
from zhiling.eval.suite import SuiteItem, answers_from_generate

ROWS = [  # id, task, prompt, reference, base output, tuned output
    ("r1", "sentiment", "判断情感：服务太差了。", "消极", "积极", "消极"),
    ("r2", "sentiment", "判断情感：非常满意。", "积极", "积极", "积极"),
    ("r3", "ner", "找出人名：李雷在上海。", "李雷_人名\n上海_地名", "没有", "李雷_人名\n上海_地名"),
    ("r4", "ner", "找出人名：今天下雨。", "没有", "没有", "今天_人名"),
]


def _metrics_run(tmp_path, name, column):
    pred = tmp_path / f"{name}.jsonl"
    with open(pred, "w", encoding="utf-8") as handle:
        for row in ROWS:
            handle.write(json.dumps({"id": row[0], "task": row[1], "prompt": row[2], "reference": row[3],
                                     "output": row[column]}, ensure_ascii=False) + "\n")
    specs = R.parse_metric_specs("em,f1,ner:entity,sentiment:accuracy")
    result = R.evaluate(read_predictions(pred), specs, R.parse_label_specs(["sentiment=积极,消极"]), by="task")
    return write_run(tmp_path / "runs" / name, "metrics", summary=result.summary, rows=result.rows,
                     markdown="", inputs=[str(pred)], options={})


class FakeJudge:
    model = "fake-judge"
    endpoint = "fake://judge"

    def complete(self, messages):
        answers = dict(re.findall(r"\[回答 ([A-Z])\]\n(.*?)\n\[回答 \1 结束\]", messages[1]["content"], re.DOTALL))
        return json.dumps({label: len(text) % 11 for label, text in answers.items()})


def _judge_run(tmp_path):
    suite = [SuiteItem("code-01", "code", "写一个函数。"), SuiteItem("math-01", "math", "1+1=?", "2"),
             SuiteItem("math-02", "math", "2+2=?", "4")]
    systems = [answers_from_generate("base", suite, lambda ps: ["答" for _ in ps]),
               answers_from_generate("lora", suite, lambda ps: ["答" * 6 for _ in ps])]
    run = J.run_judge(FakeJudge(), suite, systems, cache=J.JudgeCache(None), concurrency=1)
    summary = {"judge_model": "fake-judge", "systems": [{"name": "base"}, {"name": "lora"}],
               "leaderboard": J.leaderboard(run.items, run.systems), "counts": {"items": 3}}
    return write_run(tmp_path / "runs" / "judge", "judge", summary=summary, rows=run.items, markdown="",
                     inputs=[], options={})


def _mc_run(tmp_path, name, right):
    subjects = mc.read_mc([mc.bundled_sample_dir()], limit=2)

    def scorer(prompts, options):
        return [[0.0 if i == right else -1.0 for i in range(len(o))] for o in options]

    result = mc.evaluate_mc(subjects, scorer)
    return write_run(tmp_path / "runs" / name, "mc", summary=result.summary, rows=result.rows, markdown="",
                     inputs=[], options={})


def test_run_folder_round_trip_and_errors(tmp_path):
    folder = _metrics_run(tmp_path, "base", 4)
    run = read_run(folder)
    assert run.kind == "metrics" and run.name == "base" and len(run.rows) == 4
    assert {p.name for p in folder.iterdir()} == {"run.json", "summary.json", "rows.jsonl", "summary.md"}
    (folder / "run.json").write_text('{"kind": "other"}', encoding="utf-8")
    with pytest.raises(DataError, match="unknown kind 'other'"):
        read_run(folder)
    (folder / "run.json").unlink()
    with pytest.raises(DataError, match="run.json: missing"):
        read_run(folder)
    with pytest.raises(ZhilingError, match="not a folder"):
        read_run(tmp_path / "nowhere")


def test_metrics_comparison_tables_chart_and_side_by_side(tmp_path):
    base, tuned = read_run(_metrics_run(tmp_path, "base", 4)), read_run(_metrics_run(tmp_path, "lora", 5))
    report = build_report([base, tuned], samples=2, pick="diff")
    [section] = report.sections
    overall = section.tables[0]
    assert overall.columns == ["run", "rows", "EM", "F1", "entity F1", "accuracy"]
    # base: EM 2/4 (r2, r4); lora: EM 3/4 (r1, r2, r3)
    assert overall.rows[0][:3] == ["base", "4", "50.0"] and overall.rows[1][:3] == ["lora", "4", "75.0"]
    by_task_em = next(t for t in section.tables if t.title == "By task: EM (%)")
    assert by_task_em.rows == [["ner", "50.0", "50.0"], ["sentiment", "50.0", "100.0"]]
    assert [c.name for c in section.charts] == ["metrics_em_by_task"]
    assert section.charts[0].png.startswith(b"\x89PNG")
    # diff: row scores (mean of the row's metrics) move by 1 on r3 and r4; on r1 by 5/6 only, because
    # 积极 / 消极 share a character (char F1 of the base answer is 0.5)
    assert [s.id for s in section.samples] == ["r3", "r4"]
    sample = section.samples[0]
    assert sample.prompt == "找出人名：李雷在上海。" and sample.reference == "李雷_人名\n上海_地名"
    assert [(a.label, a.text) for a in sample.answers] == [("base", "没有"), ("lora", "李雷_人名\n上海_地名")]


def test_random_pick_is_seeded_and_names_are_unique(tmp_path):
    base = read_run(_metrics_run(tmp_path, "base", 4))
    first = build_report([base, base], samples=2, seed=3)
    again = build_report([base, base], samples=2, seed=3)
    assert [s.id for s in first.sections[0].samples] == [s.id for s in again.sections[0].samples]
    assert [a.label for a in first.sections[0].samples[0].answers] == ["base", "base#2"]
    assert build_report([base], samples=0).sections[0].samples == []
    with pytest.raises(ZhilingError, match="chart-metric 'bleu4'"):
        build_report([base], chart_metric="bleu4")


def test_judge_and_mc_sections(tmp_path):
    judge = read_run(_judge_run(tmp_path))
    mc_a, mc_b = read_run(_mc_run(tmp_path, "mc-a", 0)), read_run(_mc_run(tmp_path, "mc-b", 1))
    report = build_report([judge, mc_a, mc_b], samples=1)
    judge_section, mc_section = report.sections
    leaderboard = judge_section.tables[1]
    # fake judge: score = answer length % 11 -> base 1, lora 6
    assert leaderboard.rows[0] == ["code (代码)", "1.00", "6.00", "1/1"]
    assert judge_section.tables[0].rows[0][1] == "lora"
    assert [a.label for a in judge_section.samples[0].answers] == ["base", "lora"]
    assert [a.score for a in judge_section.samples[0].answers] == ["1", "6"]
    # always option A vs always option B on the first two questions of each subject
    overall = next(row for row in mc_section.tables[0].rows if row[0] == "overall")
    expected_a = sum(q.answer == "A" for s in mc.read_mc([mc.bundled_sample_dir()], limit=2).values()
                     for q in s.questions) / 10 * 100
    assert overall[1] == f"{expected_a:.1f}"
    assert mc_section.charts[0].png.startswith(b"\x89PNG")


def test_written_report_is_self_contained(tmp_path):
    runs = [read_run(_metrics_run(tmp_path, "base", 4)), read_run(_metrics_run(tmp_path, "lora", 5)),
            read_run(_judge_run(tmp_path))]
    report = build_report(runs, samples=3)
    markdown_path, html_path = write_report(report, tmp_path / "report")
    page = html_path.read_text(encoding="utf-8")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing loaded from outside
    assert "<script" not in page
    for sample in report.sections[0].samples:
        assert f"<pre>{html.escape(sample.prompt)}</pre>" in page
        assert all(f"<pre>{html.escape(a.text)}</pre>" in page for a in sample.answers)
    markdown = markdown_path.read_text(encoding="utf-8")
    for chart in re.findall(r"\]\((charts/[^)]+\.png)\)", markdown):
        assert (tmp_path / "report" / chart).read_bytes().startswith(b"\x89PNG")
    assert "| lora | 4 | 75.0 |" in markdown
    assert "### Side by side" in markdown


def _one_row_run(tmp_path, row: dict):
    """A metrics run folder (exact match) over a single prediction row."""
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    result = R.evaluate(read_predictions(pred), R.parse_metric_specs("em"))
    return write_run(tmp_path / "run", "metrics", summary=result.summary, rows=result.rows, markdown="",
                     inputs=[], options={})


def test_markdown_fences_survive_backticks(tmp_path):
    folder = _one_row_run(tmp_path, {"id": "c1", "prompt": "写代码", "output": "```python\nprint(1)\n```",
                                     "reference": "print(1)"})
    markdown = to_markdown(build_report([read_run(folder)], samples=1))
    assert "````text\n```python\nprint(1)\n```\n````" in markdown


def test_html_escapes_model_output(tmp_path):
    folder = _one_row_run(tmp_path, {"id": "x1", "prompt": "写网页", "output": "<script>alert(1)</script>",
                                     "reference": "<b>好</b>"})
    _, page_path = write_report(build_report([read_run(folder)], samples=1), tmp_path / "report")
    page = page_path.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "&lt;b&gt;好&lt;/b&gt;" in page
