"""The seeds' own evaluation layout: a folder of per-category JSON arrays (DreamerGPT's test_data/) as a judge suite,
and people's scores (per prompt, or per-category totals as DreamerGPT published them) beside the judge's, with
their Spearman agreement per category. No model: a scripted judge server and hand-written prediction files."""

import json
import math
import re

import pytest
from judge_server import JudgeServer, answers_in

from zhiling.cli import main
from zhiling.errors import DataError
from zhiling.eval import human_scores as H
from zhiling.eval import judge as J
from zhiling.eval.report import build_report, to_html, to_markdown
from zhiling.eval.rundir import read_run
from zhiling.eval.suite import SuiteItem, load_suite

# ------------------------------------------------------------------------------------------- folder suite


def _write(folder, files: dict):
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=4)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


DREAMER = {  # DreamerGPT's test_data/ layout: NNname.json, each a pretty-printed JSON array of prompt strings
    "01qa.json": ["天空为什么是蓝的", "李白是什么人", "列举太阳系的行星"],
    "02translate.json": [{"instruction": "把下面的句子翻译成英文", "input": "今天天气很好"},
                         {"prompt": "“谢谢”用日语怎么说？", "reference": "ありがとう"},
                         {"instruction": "把“你好”翻译成法语", "output": "Bonjour"}],
    "07code.json": ["用 Python 写一个快速排序"],
}


def test_folder_suite_categories_ids_and_prompts(tmp_path):
    items = load_suite(_write(tmp_path / "test_data", DREAMER))
    assert [(i.id, i.category) for i in items] == [
        ("qa-01", "qa"), ("qa-02", "qa"), ("qa-03", "qa"),
        ("translate-01", "translate"), ("translate-02", "translate"), ("translate-03", "translate"),
        ("code-01", "code")]
    assert items[0] == SuiteItem("qa-01", "qa", "天空为什么是蓝的", None)
    # an instruction's input is joined as in training data; reference or output is the judge's reference
    assert items[3].prompt == "把下面的句子翻译成英文\n今天天气很好" and items[3].reference is None
    assert items[4] == SuiteItem("translate-02", "translate", "“谢谢”用日语怎么说？", "ありがとう")
    assert items[5].reference == "Bonjour"
    assert load_suite(tmp_path / "test_data", categories=["qa"], limit=2) == items[:2]


def test_folder_suite_ids_are_stable_and_names_kept_as_written(tmp_path):
    first = {i.id: i.prompt for i in load_suite(_write(tmp_path / "a", DREAMER))}
    # another file added in front, another file's prompts re-ordered, a README beside them: same ids, same prompts
    changed = dict(DREAMER, **{"00Extra-Cases.json": ["额外的问题"], "01qa.json": DREAMER["01qa.json"],
                               "07code.json": ["用 Python 写一个快速排序"], "README.md": "# 说明"})
    changed["02translate.json"] = list(reversed(DREAMER["02translate.json"]))
    second = {i.id: i.prompt for i in load_suite(_write(tmp_path / "b", changed))}
    assert {k: second[k] for k in ("qa-01", "qa-02", "qa-03", "code-01")} == \
        {k: first[k] for k in ("qa-01", "qa-02", "qa-03", "code-01")}
    assert second["Extra-Cases-01"] == "额外的问题"  # numeric prefix and separator stripped, case kept
    chinese = load_suite(_write(tmp_path / "c", {"06_中文特色.json": ["对对联：海阔凭鱼跃"]}))
    assert [(i.id, i.category) for i in chinese] == [("中文特色-01", "中文特色")]


@pytest.mark.parametrize("files, bad_file, line, field, message", [
    ({"01qa.json": {"prompts": ["问"]}}, "01qa.json", 1, None, "expected a JSON array"),
    ({"01qa.json": "[\"问\", "}, "01qa.json", 1, None, "malformed JSON"),
    ({"01qa.json": []}, "01qa.json", None, None, "the JSON array is empty"),
    ({"01qa.json": ["好", 3]}, "01qa.json", 3, None, "item 2 of the array: expected a prompt string"),
    ({"01qa.json": ["好", ["问"]]}, "01qa.json", 3, None, "item 2 of the array: expected a prompt string.*array"),
    ({"01qa.json": ["好", "  "]}, "01qa.json", 3, None, "item 2 of the array: the prompt is empty"),
    ({"01qa.json": [{"question": "问"}]}, "01qa.json", 2, "prompt", "item 1 .*exactly one of 'prompt' or "
                                                                      "'instruction' \\(has: question\\)"),
    ({"01qa.json": [{"prompt": "问", "instruction": "问"}]}, "01qa.json", 2, "prompt", "exactly one of"),
    ({"01qa.json": [{"prompt": ""}]}, "01qa.json", 2, "prompt", "item 1 of the array: is empty"),
    ({"01qa.json": [{"prompt": "问", "reference": ["a"]}]}, "01qa.json", 2, "reference", "expected a string"),
    ({"01qa.json": [{"prompt": "问", "reference": "a", "output": "b"}]}, "01qa.json", 2, "output", "not both"),
    ({"01qa.json": ["问"], "09qa.json": ["问"]}, "09qa.json", None, None, "category 'qa' again \\(also from 01qa"),
    ({"01.json": ["问"]}, "01.json", None, None, "only a number"),
])
def test_folder_suite_bad_input_names_file_item_field(tmp_path, files, bad_file, line, field, message):
    folder = _write(tmp_path / "suite", files)
    with pytest.raises(DataError, match=message) as err:
        load_suite(folder)
    assert (err.value.path, err.value.line, err.value.field) == (str(folder / bad_file), line, field)


def test_folder_suite_without_json_files(tmp_path):
    for folder in (tmp_path / "empty", _write(tmp_path / "notes", {"README.md": "说明", "01qa.jsonl": "{}"})):
        folder.mkdir(exist_ok=True)
        with pytest.raises(DataError, match="the folder has no .json files") as err:
            load_suite(folder)
        assert err.value.path == str(folder)


def test_suite_prompts_and_judge_accept_a_folder(tmp_path, capsys):
    folder = _write(tmp_path / "test_data", DREAMER)
    out = tmp_path / "prompts.jsonl"
    assert main(["eval", "suite-prompts", "--suite", str(folder), "--limit", "2", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["category"]) for r in rows] == [("qa-01", "qa"), ("qa-02", "qa"), ("translate-01", "translate"),
                                                      ("translate-02", "translate"), ("code-01", "code")]
    assert rows[2]["messages"] == [{"role": "user", "content": "把下面的句子翻译成英文\n今天天气很好"}]
    assert "wrote 5 prompt(s) in 3 categories" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- human score files

SUITE = [SuiteItem(f"qa-0{n}", "qa", f"问题{n}") for n in (1, 2, 3)] + \
        [SuiteItem(f"translate-0{n}", "translate", f"翻译{n}") for n in (1, 2)]
SYSTEMS = ["a", "b", "c"]


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_per_prompt_scores_and_category_totals(tmp_path):
    csv_path = _file(tmp_path, "human.csv", "\ufeffid,category,index,system,score,rater\n"
                                            "qa-01,,,a,10,张三\n"
                                            ",qa,1,a,8,李四\n"
                                            ",qa,3,b,7.5,\n")
    human = H.read_human_scores(csv_path, SUITE, SYSTEMS)
    assert [(s.line, s.id, s.system, s.score, s.rater) for s in human.scores] == [
        (2, "qa-01", "a", 10.0, "张三"), (3, "qa-01", "a", 8.0, "李四"), (4, "qa-03", "b", 7.5, "")]
    assert human.raters == ["张三", "李四"]
    jsonl = _file(tmp_path, "totals.jsonl", '{"category": "translate", "system": "a", "total": 12, "count": 2}\n'
                                            '{"category": "translate", "system": "b", "total": 16, "count": 2, '
                                            '"rater": "ChatGPT"}\n')
    human = H.read_human_scores(jsonl, SUITE, SYSTEMS)
    assert [(t.line, t.category, t.system, t.total, t.count, t.rater) for t in human.totals] == [
        (1, "translate", "a", 12.0, 2, ""), (2, "translate", "b", 16.0, 2, "ChatGPT")]
    totals_csv = _file(tmp_path, "totals.csv", "category,system,total,count\nqa,c,85,10\n")
    assert H.read_human_scores(totals_csv, SUITE, SYSTEMS).totals[0].total == 85


@pytest.mark.parametrize("name, text, line, field, message", [
    ("h.csv", "id,system,scroe\nqa-01,a,5\n", 1, None, "unknown column\\(s\\) 'scroe'"),
    ("h.csv", "id,system,score\nqa-01,a,5,9\n", 2, None, "more cells than the 3 columns"),
    ("h.csv", "id,score\nqa-01,5\n", 2, "system", "missing 'system'"),
    ("h.csv", "id,system,score\nqa-01,d,5\n", 2, "system", "unknown system 'd' \\(judged here: a, b, c\\)"),
    ("h.csv", "id,system,score\nqa-01,a,5\nqa-09,a,5\n", 3, "id", "unknown id 'qa-09'"),
    ("h.csv", "category,index,system,score\npoetry,1,a,5\n", 2, "category", "unknown category 'poetry'"),
    ("h.csv", "category,index,system,score\nqa,4,a,5\n", 2, "index", "index 4 is past the end.*3 prompt"),
    ("h.csv", "category,index,system,score\nqa,0,a,5\n", 2, "index", "whole number of at least 1"),
    ("h.csv", "category,index,system,score\nqa,1.5,a,5\n", 2, "index", "whole number"),
    ("h.csv", "category,system,score\nqa,a,5\n", 2, "index", "needs 'id', or 'category' and 'index'"),
    ("h.csv", "id,category,index,system,score\nqa-01,qa,1,a,5\n", 2, "id", "not both"),
    ("h.csv", "id,system,score\nqa-01,a,11\n", 2, "score", "score 11 is out of range 0-10"),
    ("h.csv", "id,system,score\nqa-01,a,-1\n", 2, "score", "out of range"),
    ("h.csv", "id,system,score\nqa-01,a,八\n", 2, "score", "expected a number, got '八'"),
    ("h.csv", "id,system,score\nqa-01,a,nan\n", 2, "score", "expected a number"),
    ("h.csv", "id,system,rater\nqa-01,a,张三\n", 2, "score", "needs 'score' \\(one prompt\\) or 'total'"),
    ("h.csv", "id,system,score,total\nqa-01,a,5,50\n", 2, "total", "'total' does not belong"),
    ("h.csv", "id,system,score,rater\nqa-01,a,5,张三\nqa-01,a,6,张三\n", 3, "score",
     "prompt qa-01, system 'a' by rater '张三' is scored again \\(first on line 2\\)"),
    ("h.csv", "category,system,total,count\nqa,a,101,10\n", 2, "total", "total 101 is out of range 0-100"),
    ("h.csv", "category,system,total,count\nqa,a,50,0\n", 2, "count", "whole number of at least 1"),
    ("h.csv", "category,system,total\nqa,a,50\n", 2, "count", "needs 'category', 'total' and 'count'"),
    ("h.csv", "category,index,system,total,count\nqa,1,a,5,1\n", 2, "index", "'index' does not belong"),
    ("h.csv", "category,system,total,count\nqa,a,50,10\nqa,a,60,10\n", 3, "total", "scored again"),
    ("h.csv", "id,category,system,score,total,count\nqa-01,,a,5,,\n,qa,a,,50,10\n", 3, "total",
     "both per-prompt scores and a total \\(line 2\\)"),
    ("h.csv", "id,system,score\n", None, None, "the file has no scores"),
    ("h.csv", "", None, None, "the file is empty"),
    ("h.jsonl", '["qa-01", "a", 5]\n', 1, None, "expected a JSON object, got array"),
    ("h.jsonl", '{"id": "qa-01", "system": "a", "score": 5, "note": "好"}\n', 1, "note", "unknown field"),
    ("h.jsonl", '{"id": "qa-01", "system": "a", "score": "5"}\n{"id": "qa-02", "system": "a", "score": true}\n',
     2, "score", "expected a number, got true"),
    ("h.jsonl", '{"id": "qa-01", "system": "a", "score": 5}\n{"id": "qa-01"\n', 2, None, "malformed JSON"),
    ("h.txt", "qa-01 a 5\n", None, None, "expected a .csv or .jsonl file"),
])
def test_bad_human_score_rows_name_line_and_field(tmp_path, name, text, line, field, message):
    path = _file(tmp_path, name, text)
    with pytest.raises(DataError, match=message) as err:
        H.read_human_scores(path, SUITE, SYSTEMS)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)


# ------------------------------------------------------------------------------------------- agreement


def test_ranks_and_spearman_against_hand_computed_values():
    assert H.ranks([3, 1, 2, 2]) == [4, 1, 2.5, 2.5]
    assert H.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert H.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert H.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # a tie: ranks (1, 2, 3) vs (1.5, 1.5, 3); Pearson on them = 1.5 / sqrt(2 * 1.5)
    assert H.spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert H.spearman([1, 2, 3], [5, 5, 5]) is None  # one side constant
    assert H.spearman([1], [2]) is None and H.spearman([], []) is None


def _judged(rows_scores):
    return [{"id": item_id, "category": item_id.split("-")[0], "status": "ok", "scores": scores}
            for item_id, scores in rows_scores.items()]


def test_agreement_per_category_matches_hand_computation(tmp_path):
    # the judge saw qa-01, qa-02 (qa-03 left out, as with --limit 2) and both translate prompts
    rows = _judged({"qa-01": {"a": 9, "b": 5, "c": 1}, "qa-02": {"a": 7, "b": 6, "c": 2},
                    "translate-01": {"a": 8, "b": 8, "c": 4}, "translate-02": {"a": 6, "b": 2, "c": 0}})
    board = J.leaderboard(rows, SYSTEMS)
    path = _file(tmp_path, "human.csv", "id,category,index,system,score,total,count,rater\n"
                                        "qa-01,,,a,10,,,r1\n"
                                        "qa-01,,,a,8,,,r2\n"
                                        "qa-01,,,b,4,,,\n"
                                        ",qa,1,c,3,,,\n"
                                        ",qa,2,a,6,,,\n"
                                        ",qa,2,b,7,,,\n"
                                        ",qa,2,c,1,,,\n"
                                        ",qa,3,c,9,,,\n"           # not judged in this run: ignored
                                        ",translate,,a,,12,2,\n"
                                        ",translate,,b,,16,2,\n"
                                        ",translate,,c,,6,2,r1\n"
                                        ",translate,,c,,2,2,r2\n")
    human = H.read_human_scores(path, SUITE, SYSTEMS)
    result = H.compare_with_judge(human, rows, board, SYSTEMS)
    qa, translate = result["categories"]["qa"], result["categories"]["translate"]
    # qa: judge means 8 / 5.5 / 1.5; human means (raters averaged per prompt) (9 + 6) / 2, (4 + 7) / 2, (3 + 1) / 2
    assert {s: (c["judge"], c["human"], c["from"]) for s, c in qa["systems"].items()} == {
        "a": (8, 7.5, "prompts"), "b": (5.5, 5.5, "prompts"), "c": (1.5, 2, "prompts")}
    assert qa["over_systems"] == {"rho": pytest.approx(1.0), "n": 3}
    # six (prompt, system) pairs, no ties: d = 0, 0, -1, 1, -1, 1 -> 1 - 6 * 4 / (6 * 35)
    assert qa["over_prompts"] == {"rho": pytest.approx(1 - 24 / 210), "n": 6}
    # translate: totals / count, the two raters of c averaged: 6, 8, (3 + 1) / 2; judge 7, 5, 2
    assert {s: (c["judge"], c["human"], c["from"]) for s, c in translate["systems"].items()} == {
        "a": (7, 6, "total"), "b": (5, 8, "total"), "c": (2, 2, "total")}
    assert translate["over_systems"] == {"rho": pytest.approx(0.5), "n": 3}  # ranks 3,2,1 vs 2,3,1
    assert translate["over_prompts"] == {"rho": None, "n": 0}
    # all six (category, system) means: judge ranks 6,4,1,5,3,2 vs human 5,3,1.5,4,6,1.5 -> 11 / sqrt(17.5 * 17)
    assert result["all"]["over_cells"] == {"rho": pytest.approx(11 / math.sqrt(17.5 * 17)), "n": 6}
    assert result["all"]["over_prompts"] == qa["over_prompts"]
    assert result["ignored"] == 1 and result["raters"] == ["r1", "r2"]
    assert H.human_rows(human, rows)["qa-01"] == {"a": 9, "b": 4, "c": 3}

    table = H.human_table(result, SYSTEMS)
    assert table.columns == ["category", "a judge", "a human", "b judge", "b human", "c judge", "c human",
                             "ρ over systems", "ρ over prompts"]
    assert table.rows[0] == ["qa (知识问答)", "8.00", "7.50", "5.50", "5.50", "1.50", "2.00", "+1.00 (n=3)", "+0.89 (n=6)"]
    assert table.rows[1] == ["translate (翻译)", "7.00", "6.00 (total)", "5.00", "8.00 (total)", "2.00", "2.00 (total)",
                             "+0.50 (n=3)", "- (n=0)"]
    assert table.rows[2][0] == "all categories" and table.rows[2][-2:] == ["+0.64 (n=6)", "+0.89 (n=6)"]
    assert "1 human score row(s) are for prompts not judged" in table.note


# ------------------------------------------------------------------------------------------- end to end


def _score_judge(body):
    """Each answer carries its score as SCORE=N."""
    return json.dumps({label: int(re.search(r"SCORE=(\d+)", text).group(1)) for label, text in answers_in(body).items()})


def _predictions(path, items, score_of):
    with open(path, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps({"id": item.id, "prompt": item.prompt, "output": f"SCORE={score_of(item)} 回答"},
                                    ensure_ascii=False) + "\n")
    return path


def test_judge_command_with_folder_suite_and_human_scores(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    folder = _write(tmp_path / "test_data", DREAMER)
    items = load_suite(folder)
    base = _predictions(tmp_path / "base.jsonl", items, lambda item: 3)
    lora = _predictions(tmp_path / "lora.jsonl", items, lambda item: 8 if item.category != "code" else 2)
    human = _file(tmp_path, "human.csv", "category,index,system,score,total,count,rater\n"
                                         "qa,1,base,2,,,张三\nqa,1,lora,9,,,张三\n"
                                         "qa,2,base,4,,,张三\nqa,2,lora,7,,,张三\n"
                                         "code,,base,,40,10,\ncode,,lora,,70,10,\n")
    args = ["eval", "judge", "--suite", str(folder), "--answers", f"base={base}", "--answers", f"lora={lora}",
            "--human-scores", str(human), "--api-key-env", "JUDGE_KEY", "--no-cache", "-q"]
    with JudgeServer(_score_judge) as server:
        out = tmp_path / "judge"
        assert main([*args, "--judge-url", server.url, "--judge-model", "judge-test", "-o", str(out)]) == 0
        assert len(server.requests) == len(items) == 7
        assert any("[类别] qa (知识问答)" in r["messages"][1]["content"] for r in server.requests)
    printed = capsys.readouterr().out
    assert "Human vs judge (0-10, mean per category)" in printed
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["leaderboard"]["categories"]) == {"qa", "translate", "code"}
    human_summary = summary["human"]
    # qa pairs (judge, human): (3, 2), (8, 9), (3, 4), (8, 7): ranks 1.5,3.5,1.5,3.5 vs 1,4,2,3 -> 4 / sqrt(4 * 5)
    assert human_summary["categories"]["qa"]["over_prompts"] == {"rho": pytest.approx(4 / math.sqrt(20)), "n": 4}
    # qa: judge base 3 / lora 8 vs human base 3 / lora 8 -> the same order; code: judge 3 > 2, human 4 < 7
    assert human_summary["categories"]["qa"]["over_systems"] == {"rho": pytest.approx(1.0), "n": 2}
    assert human_summary["categories"]["code"]["over_systems"] == {"rho": pytest.approx(-1.0), "n": 2}
    assert "translate" not in human_summary["categories"]  # no human scores there
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "| qa (知识问答) | 3.00 | 3.00 | 8.00 | 8.00 | +1.00 (n=2) |" in markdown
    assert "| code (代码) | 3.00 | 4.00 (total) | 2.00 | 7.00 (total) | -1.00 (n=2) | - (n=0) |" in markdown
    rows = {json.loads(line)["id"]: json.loads(line) for line in (out / "rows.jsonl").read_text("utf-8").splitlines()}
    assert rows["qa-01"]["human"] == {"base": 2, "lora": 9} and "human" not in rows["translate-01"]
    assert json.loads((out / "run.json").read_text("utf-8"))["options"]["human_scores"] == str(human)

    # the comparison report shows the same table and the human score beside the judge's in the samples
    report = build_report([read_run(out)], samples=7)
    page, md = to_html(report), to_markdown(report)
    assert "Human vs judge" in md and "Human vs judge" in page
    assert "**lora** (score 8, human 9)" in md and "(score 8, human 9)" in page


def test_bad_human_scores_stop_before_any_judge_request(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    folder = _write(tmp_path / "test_data", DREAMER)
    base = _predictions(tmp_path / "base.jsonl", load_suite(folder), lambda item: 3)
    human = _file(tmp_path, "human.csv", "id,system,score\nqa-01,base,12\n")
    with JudgeServer(_score_judge) as server:
        assert main(["eval", "judge", "--suite", str(folder), "--answers", f"base={base}", "--human-scores",
                     str(human), "--api-key-env", "JUDGE_KEY", "--no-cache", "-q", "--judge-url", server.url,
                     "--judge-model", "m", "-o", str(tmp_path / "j")]) == 1
        assert server.requests == []
    assert f"{human}, line 2, field 'score': score 12 is out of range 0-10" in capsys.readouterr().err


def test_shipped_examples_load(tmp_path):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples" / "eval"
    items = load_suite(examples / "dreamergpt_style")
    assert sorted({i.category for i in items}) == ["alignment", "qa", "translate"]
    assert all(re.search(r"[\u4e00-\u9fff]", i.prompt) for i in items)
    human = H.read_human_scores(examples / "human_scores.csv", items, ["base", "lora"])
    assert human.scores and human.totals and human.raters
