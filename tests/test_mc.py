"""Multiple choice: file conventions, prompts, and scoring/aggregation with fake scorers."""

import json
import math

import pytest

from zhiling.errors import DataError, ZhilingError
from zhiling.eval import mc


def _write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


# ------------------------------------------------------------------------------------------- reading


def test_bundled_sample_reads_with_names_and_categories():
    subjects = mc.read_mc([mc.bundled_sample_dir()])
    assert set(subjects) == {"basic_science", "chinese_history", "chinese_language", "elementary_math", "geography"}
    assert all(len(s.questions) == 10 for s in subjects.values())
    assert subjects["geography"].title("zh") == "地理" and subjects["geography"].category == "Social Science"
    assert subjects["basic_science"].title("en") == "Basic Science"
    # every answer letter is used somewhere, so no position bias is built in
    letters = {q.answer for s in subjects.values() for q in s.questions}
    assert letters == {"A", "B", "C", "D"}


QUESTION = ("中国最大的淡水湖是哪个？", "洞庭湖", "鄱阳湖", "太湖", "青海湖", "B")


@pytest.mark.parametrize("name, text", [
    ("lakes_val.csv", "id,question,A,B,C,D,answer,explanation\n7,{0},{1},{2},{3},{4},{5},鄱阳湖最大\n"),   # C-Eval
    ("lakes.csv", ",Question,A,B,C,D,Answer\n7,{0},{1},{2},{3},{4},{5}\n"),                              # CMMLU
    ("lakes_test.csv", "{0},{1},{2},{3},{4},{5}\n"),                                                     # MMLU
    ("lakes_dev.jsonl", '{{"id": 7, "question": "{0}", "A": "{1}", "B": "{2}", "C": "{3}", "D": "{4}", '
                        '"answer": "{5}"}}\n'),
    ("lakes.jsonl", '{{"id": 7, "question": "{0}", "choices": ["{1}", "{2}", "{3}", "{4}"], "answer": 1}}\n'),
])
def test_column_conventions_give_the_same_question(tmp_path, name, text):
    path = _write(tmp_path / name, text.format(*QUESTION))
    [question] = mc.read_mc_file(path)
    assert question.subject == "lakes"
    assert question.question == QUESTION[0]
    assert question.options == (("A", "洞庭湖"), ("B", "鄱阳湖"), ("C", "太湖"), ("D", "青海湖"))
    assert question.answer == "B"


def test_csv_line_numbers_follow_quoted_newlines(tmp_path):
    path = _write(tmp_path / "x_val.csv", 'id,question,A,B,answer\n1,"第一行\n第二行",甲,乙,A\n2,问题,甲,乙,C\n')
    with pytest.raises(DataError) as err:
        mc.read_mc_file(path)
    assert (err.value.line, err.value.field) == (4, "answer")
    assert "'C' is not one of the options A, B" in str(err.value)


@pytest.mark.parametrize("name, text, line, field, message", [
    ("a_val.csv", "id,question,A,B,C,D,answer\n1,问,甲,乙,丙,丁,\n", 2, "answer", "no answer"),
    ("a_val.csv", "id,question,A,B,C,D,answer\n1,问,甲,乙,丙,丁\n", 2, None, "has 6 columns"),
    ("a_val.csv", "id,question,A,C,answer\n1,问,甲,乙,A\n", 1, None, "A, B, C, ... in order"),
    ("a_val.csv", "id,question,A,B\n1,问,甲,乙\n", 1, None, "no answer column"),
    ("a_val.csv", "id,question,A,B,answer\n1,,甲,乙,A\n", 2, "question", "empty"),
    ("a_val.csv", "id,question,A,B,answer\n1,问,甲,,A\n", 2, "B", "option is empty"),
    ("a_test.csv", "问,甲,乙\n", 1, None, "found 3 column"),
    ("a.jsonl", '{"question": "问", "choices": ["甲", "乙"], "answer": 2}\n', 1, "answer", "out of range"),
    ("a.jsonl", '{"question": "问", "A": "甲", "B": ["乙"], "answer": "A"}\n', 1, "B", "expected a string"),
    ("a.jsonl", '{"A": "甲", "B": "乙", "answer": "A"}\n', 1, "question", "missing"),
    ("a.txt", "问\n", None, None, "expected a .csv or .jsonl"),
])
def test_bad_files_name_file_line_field(tmp_path, name, text, line, field, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=message) as err:
        mc.read_mc_file(path)
    assert err.value.path == str(path)
    assert (err.value.line, err.value.field) == (line, field)


def test_non_utf8_and_duplicate_ids(tmp_path):
    path = tmp_path / "gbk_val.csv"
    path.write_bytes("id,question,A,B,answer\n1,问题,甲,乙,A\n".encode("gbk"))
    with pytest.raises(DataError, match="UTF-8"):
        mc.read_mc_file(path)
    folder = tmp_path / "dup"
    folder.mkdir()
    _write(folder / "s_val.csv", "id,question,A,B,answer\n1,问,甲,乙,A\n")
    _write(folder / "s_dev.csv", "id,question,A,B,answer\n1,问,甲,乙,B\n")
    with pytest.raises(DataError, match="duplicate question id 's-1'"):
        mc.read_mc([folder])


def test_subject_filter_and_limit():
    subjects = mc.read_mc([mc.bundled_sample_dir()], subjects=["geography", "elementary_math"], limit=3)
    assert list(subjects) == ["elementary_math", "geography"]
    assert all(len(s.questions) == 3 for s in subjects.values())
    with pytest.raises(ZhilingError, match="physics not found"):
        mc.read_mc([mc.bundled_sample_dir()], subjects=["physics"])


# ------------------------------------------------------------------------------------------- prompts


def _subjects(tmp_path):
    _write(tmp_path / "lakes_val.csv", "id,question,A,B,answer\n1,最大的淡水湖？,鄱阳湖,太湖,A\n"
                                       "2,最大的咸水湖？,洞庭湖,青海湖,B\n3,太湖在哪个省？,山东,江苏,B\n")
    _write(tmp_path / "planets_test.csv", "Closest planet to the Sun?,Mercury,Mars,A\nLargest planet?,Earth,Jupiter,B\n")
    _write(tmp_path / "subject_mapping.json", json.dumps({"lakes": ["Lakes", "湖泊", "Social Science"]}))
    return mc.read_mc([tmp_path])


def test_zero_and_few_shot_prompts(tmp_path):
    subjects = _subjects(tmp_path)
    lakes, planets = subjects["lakes"], subjects["planets"]
    question = lakes.questions[2]
    assert mc.build_prompt(question, lakes, [], "auto") == (
        "以下是关于湖泊的单项选择题，请选出正确答案。\n\n太湖在哪个省？\nA. 山东\nB. 江苏\n答案：")
    shots = mc.pick_shots(question, 1, None, lakes)
    assert shots == [lakes.questions[0]]
    assert mc.build_prompt(question, lakes, shots, "auto") == (
        "以下是关于湖泊的单项选择题，请选出正确答案。\n\n最大的淡水湖？\nA. 鄱阳湖\nB. 太湖\n答案：A\n\n"
        "太湖在哪个省？\nA. 山东\nB. 江苏\n答案：")
    # leave-one-out: the first question's examples skip itself
    assert mc.pick_shots(lakes.questions[0], 2, None, lakes) == lakes.questions[1:3]
    english = mc.build_prompt(planets.questions[1], planets, planets.questions[:1], "auto")
    assert english == ("The following are multiple choice questions (with answers) about planets.\n\n"
                       "Closest planet to the Sun?\nA. Mercury\nB. Mars\nAnswer: A\n\n"
                       "Largest planet?\nA. Earth\nB. Jupiter\nAnswer:")
    assert mc.build_prompt(planets.questions[1], planets, [], "zh").startswith("以下是关于planets的单项选择题")


# ------------------------------------------------------------------------------------------- scoring


def _oracle(subjects, wrong_subjects=(), calls=None):
    """Knows every answer except in ``wrong_subjects``, where it always prefers the first option."""
    by_prompt_end = {}
    for subject in subjects.values():
        for q in subject.questions:
            by_prompt_end[mc.format_question(q, mc.question_lang(q, "auto"))] = q

    def score(prompts, options):
        if calls is not None:
            calls.append((list(prompts), [list(o) for o in options]))
        out = []
        for prompt, opts in zip(prompts, options):
            q = next(q for end, q in by_prompt_end.items() if prompt.endswith(end))
            target = 0 if q.subject in wrong_subjects else q.letters.index(q.answer)
            out.append([-1.0 if i == target else -5.0 for i in range(len(opts))])
        return out

    return score


def test_accuracy_per_subject_overall_macro_and_category(tmp_path):
    subjects = _subjects(tmp_path)
    calls = []
    result = mc.evaluate_mc(subjects, _oracle(subjects, wrong_subjects={"lakes"}, calls=calls), batch_size=2)
    # lakes: always A; answers A, B, B -> 1/3. planets: all right.
    assert result.summary["subjects"]["lakes"]["accuracy"] == pytest.approx(1 / 3)
    assert result.summary["subjects"]["planets"]["accuracy"] == 1.0
    assert result.summary["overall"]["accuracy"] == pytest.approx(3 / 5)           # micro: 3 of 5 questions
    assert result.summary["overall"]["macro_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert result.summary["categories"] == {"Social Science": {"subjects": ["lakes"], "accuracy": pytest.approx(1 / 3)}}
    assert [len(prompts) for prompts, _ in calls] == [2, 2, 1]
    # letters as continuations: no space after 答案：, a space after Answer:
    assert calls[0][1][0] == ["A", "B"]
    assert calls[-1][1][0] == [" A", " B"]
    rows = {row["id"]: row for row in result.rows}
    assert rows["lakes-2"]["output"] == "A" and rows["lakes-2"]["reference"] == "B" and rows["lakes-2"]["score"] == 0
    assert rows["lakes-2"]["logprobs"] == {"A": -1.0, "B": -5.0}


def test_bundled_sample_with_a_perfect_and_a_first_option_scorer():
    subjects = mc.read_mc([mc.bundled_sample_dir()])
    assert mc.evaluate_mc(subjects, _oracle(subjects)).summary["overall"]["accuracy"] == 1.0
    always_a = mc.evaluate_mc(subjects, _oracle(subjects, wrong_subjects=set(subjects)), shots=2)
    # count of A answers in the sample: history 2, geography 3, math 2, language 2, science 2 -> 11 of 50
    assert always_a.summary["overall"]["accuracy"] == pytest.approx(11 / 50)
    assert always_a.summary["subjects"]["geography"]["accuracy"] == pytest.approx(3 / 10)


def test_option_text_scoring_is_length_normalized(tmp_path):
    _write(tmp_path / "t_val.csv", "id,question,A,B,answer\n1,哪个更长？,短,很长很长的选项,B\n")
    subjects = mc.read_mc([tmp_path / "t_val.csv"])
    seen = []

    def scorer(prompts, options):
        seen.append(options[0])
        if options[0] == ["A", "B"]:
            return [[-1.0, -1.0]]  # a tie on letters goes to the earlier option
        # sums: 短 -2.0 (per char -2.0); 很长很长的选项 -7.0 (per char -1.0): raw sum prefers A, per char B
        return [[-2.0, -7.0]]

    result = mc.evaluate_mc(subjects, scorer, option_text=True)
    row = result.rows[0]
    assert seen == [["A", "B"], ["短", "很长很长的选项"]]
    assert row["output"] == "A" and row["output_text"] == "B"
    assert row["scores"] == {"accuracy": 0.0, "accuracy_text": 1.0}
    assert row["text_scores"] == {"A": -2.0, "B": -1.0}
    assert result.summary["overall"]["accuracy_text"] == 1.0


def test_few_shot_from_dev_and_errors(tmp_path):
    subjects = _subjects(tmp_path)
    dev_dir = tmp_path / "dev"
    dev_dir.mkdir()
    _write(dev_dir / "lakes_dev.csv", "id,question,A,B,answer\nd1,洞庭湖在哪个省？,湖南,湖北,A\n")
    dev = mc.read_mc([dev_dir])
    calls = []
    only_lakes = {"lakes": subjects["lakes"]}
    mc.evaluate_mc(only_lakes, _oracle(only_lakes, calls=calls), shots=1, dev=dev)
    assert all("洞庭湖在哪个省？\nA. 湖南\nB. 湖北\n答案：A\n\n" in p for p in calls[0][0])
    with pytest.raises(ZhilingError, match="no questions for subject"):
        mc.evaluate_mc(subjects, _oracle(subjects), shots=1, dev=dev)
    with pytest.raises(ZhilingError, match="5-shot needs 5"):
        mc.evaluate_mc(subjects, _oracle(subjects), shots=5)


@pytest.mark.parametrize("bad, message", [
    (lambda prompts, options: [[0.0, 0.0]], "rows for"),
    (lambda prompts, options: [[0.0] for _ in prompts], "1 scores for prompt 1"),
    (lambda prompts, options: [[math.nan, 0.0] for _ in prompts], "NaN"),
])
def test_bad_scorer_output_is_an_error(tmp_path, bad, message):
    subjects = _subjects(tmp_path)
    with pytest.raises(ZhilingError, match=message):
        mc.evaluate_mc(subjects, bad)


def test_tables():
    subjects = mc.read_mc([mc.bundled_sample_dir()], limit=2)
    result = mc.evaluate_mc(subjects, _oracle(subjects))
    tables = mc.mc_tables(result.summary)
    assert tables[0].rows[-2] == ["overall", "10", "100.0"]
    assert {row[0] for row in tables[1].rows} == {"Humanities", "STEM", "Social Science"}
