"""zhiling chat: the history budget, the commands, Ctrl-C, and the command line with piped input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pytest

from engine_fakes import ScriptedEngine
from zhiling.config import GenerationConfig, ModelConfig
from zhiling.data.records import validate_record
from zhiling.errors import ZhilingError
from zhiling.infer.chat import ChatLoop, ChatSession
from zhiling.infer.engine import ChatRequest, PromptTooLongError, load_engine


def history_tokens(engine, system, history, query):
    return (engine.count_tokens(ChatRequest(query, history, system))
            - engine.count_tokens(ChatRequest(query, [], system)))


def filled_session(engine, turns=10, budget=120, max_new_tokens=16):
    session = ChatSession(engine, GenerationConfig(max_new_tokens=max_new_tokens), max_history_tokens=budget)
    for number in range(turns):
        session.add(f"第{number}个问题：今天天气怎么样？", f"第{number}个回答：今天天气很好。")
    return session


# ----- history budget --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 40, 120, 300, 10_000])
def test_history_keeps_the_newest_turns_within_budget(tiny_tokenizer, budget):
    engine = ScriptedEngine(tiny_tokenizer, context_length=100_000)
    session = filled_session(engine, budget=budget)
    prepared = session.prepare("新的问题")
    kept = prepared.request.history
    turns = session.turns
    assert kept == turns[len(turns) - len(kept):]  # a suffix: the newest turns
    assert history_tokens(engine, None, kept, "新的问题") <= budget
    assert prepared.history_tokens == history_tokens(engine, None, kept, "新的问题")
    if len(kept) < len(turns):  # one more (older) turn would not have fit
        one_more = turns[len(turns) - len(kept) - 1:]
        assert history_tokens(engine, None, one_more, "新的问题") > budget
    assert prepared.dropped == len(turns) - len(kept)


def test_dropped_turns_never_come_back_and_are_counted_once(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, context_length=100_000)
    session = filled_session(engine, budget=150)
    first = session.prepare("问")
    assert first.dropped > 0
    again = session.prepare("问")
    assert again.dropped == 0 and again.request.history == first.request.history
    session.max_history_tokens = 100_000  # a larger budget later does not bring dropped turns back
    assert session.prepare("问").request.history == first.request.history
    session.reset()
    assert session.prepare("问").request.history == []


def test_history_also_fits_the_context(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, context_length=300)
    session = filled_session(engine, budget=100_000, max_new_tokens=100)
    prepared = session.prepare("问")
    assert engine.count_tokens(prepared.request) + 100 <= 300
    assert 0 < len(prepared.request.history) < 10


def test_a_message_that_cannot_fit_is_refused(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, context_length=60)
    session = ChatSession(engine, GenerationConfig(max_new_tokens=16))
    with pytest.raises(PromptTooLongError):
        session.prepare("很长的问题" * 40)


def test_system_prompt_counts_and_reaches_the_request(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer)
    session = ChatSession(engine, GenerationConfig(max_new_tokens=8), system="你是一个乐于助人的助手。")
    request = session.prepare("你好").request
    assert request.system == "你是一个乐于助人的助手。"
    assert engine.count_tokens(request) > engine.count_tokens(ChatRequest("你好", [], ""))


# ----- the loop --------------------------------------------------------------------------------------------------
def run_loop(engine, lines, **session_kwargs):
    params = session_kwargs.pop("params", GenerationConfig(max_new_tokens=32))
    session = ChatSession(engine, params, **session_kwargs)
    output = io.StringIO()
    code = ChatLoop(session, input=io.StringIO("".join(line + "\n" for line in lines)), output=output,
                    interactive=False).run()
    return code, output.getvalue(), session


def test_commands_undo_retry_reset_system_set(tiny_tokenizer):
    answers = iter(["一", "二", "三", "四", "五"])
    engine = ScriptedEngine(tiny_tokenizer, lambda prompt: next(answers))
    code, out, session = run_loop(engine, [
        "你好", "再问一次", "/retry", "/undo", "/system 你是诗人", "/set temperature 0.3", "/set top_k 5",
        "/set max_history_tokens 77", "/system", "/help", "/exit", "never read"])
    assert code == 0
    assert session.turns == [("你好", "一")]  # /retry replaced "二" by "三", /undo removed that turn
    assert "removed: 再问一次" in out
    assert engine.calls[2]["prompts"] == engine.calls[1]["prompts"]  # /retry asked the same prompt again
    assert session.system == "你是诗人" and "system prompt: '你是诗人'" in out
    assert session.params.temperature == 0.3 and session.params.top_k == 5
    assert session.max_history_tokens == 77
    assert "/retry" in out and "never read" not in out
    last_request = engine.calls[-1]["prompts"][0]
    assert "你是诗人" not in tiny_tokenizer.decode(last_request)  # the system prompt was set after the last answer
    code, out, session = run_loop(engine, ["/reset", "/undo", "/retry"])
    assert "nothing to undo" in out and "nothing to retry" in out


def test_set_reaches_the_backend(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "好")
    run_loop(engine, ["/set max_new_tokens 5", "/set do_sample true", "/set seed 3", "/set stop 。|！", "问"])
    params = engine.calls[-1]["params"]
    assert (params.max_new_tokens, params.do_sample, params.seed, params.stop) == (5, True, 3, ["。", "！"])


@pytest.mark.parametrize("line, message", [
    ("/set temprature 0.5", "did you mean 'temperature'"),
    ("/set top_p 2", "top_p"),
    ("/set max_new_tokens many", "max_new_tokens must be a whole number"),
    ("/set do_sample maybe", "do_sample must be true or false"),
    ("/set min_new_tokens 999", "larger than max_new_tokens"),
    ("/set top_k", "usage: /set KEY VALUE"),
    ("/set max_history_tokens -1", "0 or more"),
    ("/sav x.jsonl", "did you mean /save"),
    ("/save", "usage: /save FILE"),
    ("/save /no/such/folder/chat.jsonl", "does not exist"),
])
def test_bad_commands_are_explained_and_the_chat_goes_on(tiny_tokenizer, line, message):
    engine = ScriptedEngine(tiny_tokenizer, "好")
    _, out, session = run_loop(engine, ["你好", line, "再见"])
    assert message in out
    assert [q for q, _ in session.turns] == ["你好", "再见"]


def test_unsupported_parameter_is_refused_by_set(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "好", unsupported={"num_beams"})
    _, out, session = run_loop(engine, ["/set num_beams 4"])
    assert "cannot honour num_beams" in out and session.params.num_beams == 1


def test_save_appends_a_canonical_row_with_parameters(tiny_tokenizer, tmp_path):
    engine = ScriptedEngine(tiny_tokenizer, "你好！")
    target = tmp_path / "chat.jsonl"
    _, out, _ = run_loop(engine, ["/save " + str(target), "你好", "/set temperature 0.2", f"/save {target}",
                                  "第二句", f"/save {target}"], system="你是助手")
    assert "nothing to save yet" in out
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2
    validate_record(rows[1])
    assert rows[1]["system"] == "你是助手" and rows[1]["source"] == "zhiling-chat"
    assert [m["content"] for m in rows[1]["messages"]] == ["你好", "你好！", "第二句", "你好！"]
    assert rows[1]["generation"]["temperature"] == 0.2
    assert rows[1]["engine"]["model"] == "scripted-model"


def test_double_slash_sends_a_message_starting_with_slash(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "好")
    _, _, session = run_loop(engine, ["//etc/hosts 是什么？"])
    assert session.turns == [("/etc/hosts 是什么？", "好")]


def test_user_is_told_when_turns_are_dropped(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "好的。")
    _, out, session = run_loop(engine, [f"第{i}个问题，请回答。" for i in range(8)], max_history_tokens=40)
    assert "oldest turn" in out and "max_history_tokens=40" in out
    assert len(session.turns) == 8  # everything said is kept for /save


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_tokenizer):
    def interrupt(index):
        if index == 3 and not fired:
            fired.append(True)
            raise KeyboardInterrupt

    fired: list = []
    engine = ScriptedEngine(tiny_tokenizer, "一二三四五六七八九十", on_token=interrupt)
    _, out, session = run_loop(engine, ["第一个", "第二个"])
    assert "stopped" in out
    assert engine.cancelled[0].is_set()
    assert session.turns[0][0] == "第一个" and 0 < len(session.turns[0][1]) < len("一二三四五六七八九十")
    assert session.turns[1] == ("第二个", "一二三四五六七八九十")


def test_ctrl_c_at_the_prompt_does_not_leave(tiny_tokenizer):
    class Interrupting(io.StringIO):
        calls = 0

        def readline(self, *args):
            Interrupting.calls += 1
            if Interrupting.calls == 1:
                raise KeyboardInterrupt
            return super().readline(*args)

    engine = ScriptedEngine(tiny_tokenizer, "好")
    session = ChatSession(engine, GenerationConfig(max_new_tokens=8))
    output = io.StringIO()
    ChatLoop(session, input=Interrupting("你好\n"), output=output, interactive=False).run()
    assert "/exit" in output.getvalue() and session.turns == [("你好", "好")]


def test_ctrl_c_stops_a_real_hf_generation(tiny_model_dir):
    """Ctrl-C in the main thread while the generate thread runs: the answer stops and the thread ends.

    The KeyboardInterrupt is raised from the output's write (where Ctrl-C lands while an answer streams) rather
    than through ``_thread.interrupt_main()``: a pending interrupt is delivered at the next bytecode check, which
    may fall inside a finalizer run by the garbage collector, where Python prints and drops it (a flaky test)."""
    engine = load_engine(ModelConfig(name_or_path=str(tiny_model_dir("llama"))))
    params = GenerationConfig(max_new_tokens=400, min_new_tokens=400)

    class Output(io.StringIO):
        def write(self, text):  # interrupt the main thread once the first answer starts streaming
            if text == "assistant> ":
                state.append("answering")
            elif state == ["answering"] and text:
                state.append("interrupted")
                super().write(text)
                raise KeyboardInterrupt
            return super().write(text)

    state: list = []
    session = ChatSession(engine, params)
    output = Output()
    ChatLoop(session, input=io.StringIO("你好\n/set min_new_tokens 0\n/set max_new_tokens 3\n再见\n"),
             output=output, interactive=False).run()
    assert "stopped" in output.getvalue()
    assert [q for q, _ in session.turns] == ["你好", "再见"]
    assert len(engine.tokenizer.encode(session.turns[0][1], add_special_tokens=False)) < 400
    assert not [t for t in threading.enumerate() if t.name == "zhiling-hf-generate"]


def test_max_history_tokens_must_not_be_negative(tiny_tokenizer):
    with pytest.raises(ZhilingError, match="0 or more"):
        ChatSession(ScriptedEngine(tiny_tokenizer), GenerationConfig(), max_history_tokens=-5)


# ----- command line ----------------------------------------------------------------------------------------------
def test_zhiling_chat_with_piped_input(tiny_model_dir, tmp_path):
    saved = tmp_path / "chat.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "zhiling", "chat", "--model", str(tiny_model_dir("llama")), "--max-new-tokens", "6",
         "--system", "你是助手", "--template", "chatml"],
        input=f"你好\n/set temperature 0.5\n第二个问题\n/save {saved}\n/exit\n", capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
    assert "template 'chatml' (given)" in result.stdout
    row = json.loads(saved.read_text(encoding="utf-8"))
    assert row["system"] == "你是助手" and len(row["messages"]) == 4
    assert row["generation"]["max_new_tokens"] == 6 and row["engine"]["template"] == "chatml"


def test_zhiling_chat_bad_arguments(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from zhiling.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    def run(*args):
        code = main(["chat", *args])
        return code, capsys.readouterr().err

    code, err = run("--model", str(tmp_path / "nowhere"))
    assert code == 1 and "not found" in err
    code, err = run("--model", str(tiny_model_dir("llama")), "--top-p", "3")
    assert code == 1 and "top_p" in err
    code, err = run("--model", str(tiny_model_dir("llama")), "--min-new-tokens", "9", "--max-new-tokens", "3")
    assert code == 1 and "larger than max_new_tokens" in err
    code, err = run("--model", str(tiny_model_dir("llama")), "--template", "chatmll")
    assert code == 1 and "did you mean 'chatml'" in err
    code, err = run("--model", str(tiny_model_dir("llama")), "--backend", "vllm")
    assert code == 1 and "unknown backend 'vllm'" in err
    code, err = run("--model", str(tiny_model_dir("llama")), "--max-history-tokens", "-3")
    assert code == 1 and "0 or more" in err
    code, err = run("--model", str(tiny_model_dir("llama")), "--config", str(tmp_path / "missing.yaml"))
    assert code == 1 and "config file not found" in err
