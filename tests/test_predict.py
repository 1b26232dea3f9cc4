"""zhiling predict: every input kind, output rows and side file, resuming, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_fakes import ScriptedEngine
from zhiling.config import GenerationConfig
from zhiling.errors import DataError, ZhilingError
from zhiling.infer.predict import meta_path, read_items, run_predict
from zhiling.paths import resources_dir

EXAMPLES = resources_dir() / "examples" / "formats"
PARAMS = GenerationConfig(max_new_tokens=16)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def echo_engine(tokenizer, **kwargs):
    """Answers with the last line of the prompt text it was given (so rows can be matched to prompts)."""
    return ScriptedEngine(tokenizer, lambda prompt: "答：" + prompt.strip().splitlines()[-1][-6:], **kwargs)


# ----- inputs ----------------------------------------------------------------------------------------------------
def test_text_file_one_prompt_per_line(tmp_path):
    items = read_items(write(tmp_path / "p.txt", "你好\n\n今天天气怎么样？\n"))
    assert [(i.id, i.prompt, i.reference) for i in items] == [("line-1", "你好", None),
                                                              ("line-3", "今天天气怎么样？", None)]


@pytest.mark.parametrize("text", ['["你好", "再见"]', '"你好"\n"再见"\n'])
def test_json_list_of_strings(tmp_path, text):
    items = read_items(write(tmp_path / "p.json", text))
    assert [(i.id, i.prompt) for i in items] == [("item-1", "你好"), ("item-2", "再见")]


def test_data_format_gives_references_and_keeps_task():
    items = read_items(resources_dir() / "data" / "zhiling_zh_test.jsonl")
    first = items[0]
    assert first.id == "zhiling_zh-000601" and first.extra["task"] == "sentiment"
    assert first.reference == "消极" and first.prompt.startswith("判断这条评论的情感倾向")


def test_alpaca_example_is_detected(tmp_path):
    announced = []
    items = read_items(EXAMPLES / "alpaca.json", announce=announced.append)
    assert "detected format 'alpaca'" in announced[0]
    assert items[0].prompt == "用一句话解释什么是光合作用。" and items[0].reference.startswith("光合作用是")


def test_prompt_only_and_multi_turn_messages(tmp_path):
    rows = [{"id": "a", "system": "你是助手", "messages": [{"role": "user", "content": "你好"}]},
            {"id": "b", "messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                                     {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"}]}]
    path = write(tmp_path / "m.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    a, b = read_items(path)
    assert (a.prompt, a.reference, a.request.system, a.extra["system"]) == ("你好", None, "你是助手", "你是助手")
    assert b.reference == "再见！" and b.request.history == [("你好", "你好！")]
    assert b.prompt == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                        {"role": "user", "content": "再见"}]


def test_explicit_format_with_options(tmp_path):
    path = write(tmp_path / "q.jsonl", json.dumps({"q": "北京是哪国的首都？", "a": "中国"}, ensure_ascii=False))
    [item] = read_items(path, "instruct", {"columns": "instruction=q,output=a"})
    assert (item.prompt, item.reference) == ("北京是哪国的首都？", "中国")


@pytest.mark.parametrize("name, text, message", [
    ("missing.txt", None, "file not found"),
    ("empty.txt", "", "file is empty"),
    ("blank.txt", "\n\n  \n", "no prompts"),
    ("mixed.json", '["你好", 3]', "expected a string like the rows before it"),
    ("blank.json", '["你好", "  "]', "empty prompt"),
    ("broken.jsonl", '{"messages": [{"role": "user", "content": "你好"}]}\n{"messages": [\n', "malformed JSON"),
    ("unknown.jsonl", '{"foo": 1}\n', "cannot detect the format"),
    ("dup.jsonl", '{"id": "x", "messages": [{"role": "user", "content": "a"}]}\n'
                  '{"id": "x", "messages": [{"role": "user", "content": "b"}]}\n', "duplicate id 'x'"),
    ("badrole.jsonl", '{"messages": [{"role": "bot", "content": "a"}]}\n', "role must be"),
])
def test_bad_inputs_name_the_problem(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        write(path, text)
    with pytest.raises(DataError, match=message) as info:
        read_items(path)
    assert name in str(info.value)


def test_bad_row_names_the_line(tmp_path):
    path = write(tmp_path / "m.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'
                                        '{"messages": [{"role": "user", "content": ""}]}\n')
    with pytest.raises(DataError, match="line 2"):
        read_items(path)


# ----- running ---------------------------------------------------------------------------------------------------
def test_rows_side_file_and_eval_can_read_them(tiny_tokenizer, tmp_path):
    from zhiling.eval.predictions import read_predictions

    engine = echo_engine(tiny_tokenizer)
    source = resources_dir() / "data" / "zhiling_zh_test.jsonl"
    items = read_items(source)[:5]
    out = tmp_path / "preds.jsonl"
    report = run_predict(engine, items, out, PARAMS, input_path=source, batch_size=2, progress=False)
    assert (report.written, report.skipped) == (5, 0)
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [i.id for i in items]
    assert all(r["output"].startswith("答：") and r["reference"] and r["task"] for r in rows)
    assert rows[0]["finish_reason"] == "stop" and rows[0]["prompt_tokens"] > 0
    meta = json.loads(meta_path(out).read_text(encoding="utf-8"))
    assert meta["run"]["generation"]["max_new_tokens"] == 16 and meta["run"]["model"] == "scripted-model"
    assert meta["run"]["template"] == "alpaca"
    assert [len(c["prompts"]) for c in engine.calls] == [2, 2, 1]  # batches of --batch-size
    loaded = read_predictions(out)
    assert len(loaded.rows) == 5 and loaded.meta["run"]["generation"]["max_new_tokens"] == 16
    assert loaded.rows[0].reference == "消极"


def test_generation_parameters_reach_the_engine(tiny_tokenizer, tmp_path):
    engine = echo_engine(tiny_tokenizer)
    source = write(tmp_path / "p.txt", "你好\n")
    params = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.4, seed=9, stop=["。"])
    run_predict(engine, read_items(source), tmp_path / "o.jsonl", params, input_path=source, progress=False)
    assert engine.calls[0]["params"] == params


def test_resume_skips_finished_rows(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "p.txt", "\n".join(f"第{n}个问题" for n in range(7)))
    items = read_items(source)
    out = tmp_path / "o.jsonl"

    class Killed(Exception):
        pass

    crashing = echo_engine(tiny_tokenizer)
    original = crashing._generate_ids

    def crash_on_third_batch(prompts, params, cancel):
        if len(crashing.calls) == 2:
            raise Killed
        return original(prompts, params, cancel)

    crashing._generate_ids = crash_on_third_batch
    with pytest.raises(Killed):
        run_predict(crashing, items, out, PARAMS, input_path=source, batch_size=2, progress=False)
    assert len(rows_of(out)) == 4
    # a killed process may leave half a line behind: it is dropped and predicted again
    with out.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "line-5", "prompt": "第4')
    engine = echo_engine(tiny_tokenizer)
    report = run_predict(engine, items, out, PARAMS, input_path=source, batch_size=2, progress=False)
    assert (report.skipped, report.written) == (4, 3)
    assert [p for c in engine.calls for p in c["prompts"]] == [engine.prompt_ids(i.request) for i in items[4:]]
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [i.id for i in items]
    again = run_predict(echo_engine(tiny_tokenizer), items, out, PARAMS, input_path=source, progress=False)
    assert (again.skipped, again.written) == (7, 0) and len(rows_of(out)) == 7


def test_resume_refuses_different_parameters_or_model(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "p.txt", "你好\n再见\n")
    items = read_items(source)
    out = tmp_path / "o.jsonl"
    run_predict(echo_engine(tiny_tokenizer), items[:1], out, PARAMS, input_path=source, progress=False)
    with pytest.raises(ZhilingError, match="generation.max_new_tokens: 16 then, 32 now"):
        run_predict(echo_engine(tiny_tokenizer), items, out, GenerationConfig(max_new_tokens=32), input_path=source,
                    progress=False)
    other = echo_engine(tiny_tokenizer, template="chatml")
    with pytest.raises(ZhilingError, match="template: 'alpaca' then, 'chatml' now"):
        run_predict(other, items, out, PARAMS, input_path=source, progress=False)
    report = run_predict(other, items, out, PARAMS, input_path=source, overwrite=True, progress=False)
    assert report.written == 2 and len(rows_of(out)) == 2


@pytest.mark.parametrize("setup, message", [
    (lambda out: out.write_text('{"id": "x"}\n'), "cannot be resumed safely"),
    (lambda out: (out.write_text('{"id": "x"}\n'), meta_path(out).write_text("{broken")), "cannot read it"),
    (lambda out: out.mkdir(), "is a folder"),
])
def test_bad_output_files(tiny_tokenizer, tmp_path, setup, message):
    source = write(tmp_path / "p.txt", "你好\n")
    out = tmp_path / "o.jsonl"
    setup(out)
    with pytest.raises(ZhilingError, match=message):
        run_predict(echo_engine(tiny_tokenizer), read_items(source), out, PARAMS, input_path=source, progress=False)


def test_edited_output_is_refused(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "p.txt", "你好\n再见\n")
    out = tmp_path / "o.jsonl"
    run_predict(echo_engine(tiny_tokenizer), read_items(source)[:1], out, PARAMS, input_path=source, progress=False)
    out.write_text("not json\n" + out.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(DataError, match="line 1"):
        run_predict(echo_engine(tiny_tokenizer), read_items(source), out, PARAMS, input_path=source, progress=False)


def test_prompts_over_the_context_are_refused_before_any_work(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "p.txt", "你好\n" + "很长" * 200 + "\n")
    engine = echo_engine(tiny_tokenizer, context_length=100)
    with pytest.raises(ZhilingError, match="1 prompt\\(s\\) do not fit the 100-token context.*line-2"):
        run_predict(engine, read_items(source), tmp_path / "o.jsonl", PARAMS, input_path=source, progress=False)
    assert engine.calls == []


def test_other_bad_arguments(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "p.txt", "你好\n")
    items = read_items(source)
    with pytest.raises(ZhilingError, match="batch-size"):
        run_predict(echo_engine(tiny_tokenizer), items, tmp_path / "o.jsonl", PARAMS, input_path=source,
                    batch_size=0)
    with pytest.raises(ZhilingError, match="is the input file"):
        run_predict(echo_engine(tiny_tokenizer), items, source, PARAMS, input_path=source, progress=False)
    with pytest.raises(ZhilingError, match="does not exist"):
        run_predict(echo_engine(tiny_tokenizer), items, tmp_path / "no" / "o.jsonl", PARAMS, input_path=source)
    with pytest.raises(ZhilingError, match="cannot honour num_beams"):
        run_predict(echo_engine(tiny_tokenizer, unsupported={"num_beams"}), items, tmp_path / "o.jsonl",
                    GenerationConfig(num_beams=2), input_path=source)


# ----- command line on a tiny model ------------------------------------------------------------------------------
def test_zhiling_predict_command(tiny_model_dir, tmp_path, capsys):
    from zhiling.cli import main

    source = write(tmp_path / "p.json", '["你好", "今天天气怎么样？", "再见"]')
    out = tmp_path / "o.jsonl"
    base = ["predict", "--model", str(tiny_model_dir("llama")), "--input", str(source), "--output", str(out),
            "--no-progress"]
    args = base + ["--batch-size", "2", "--max-new-tokens", "5"]
    assert main(args) == 0
    assert "3 rows predicted" in capsys.readouterr().err
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ["item-1", "item-2", "item-3"]
    assert all(r["completion_tokens"] <= 5 for r in rows)
    assert main(args) == 0 and "0 rows predicted, 3 already done" in capsys.readouterr().err
    assert main(base + ["--max-new-tokens", "6"]) == 1
    assert "different run" in capsys.readouterr().err
    assert main(["predict", "--model", str(tiny_model_dir("llama")), "--input", str(tmp_path / "none.txt"),
                 "--output", str(out)]) == 1
    assert "file not found" in capsys.readouterr().err
    assert main(base + ["--batch-size", "0"]) == 1
    assert "--batch-size must be 1 or more" in capsys.readouterr().err
