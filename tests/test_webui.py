"""zhiling webui: the form helpers, and the page in a real headless Chromium (Debian's, driven by Playwright).

The browser tests are marked ``browser``. They need /usr/bin/chromium (scripts/install_system_deps.sh) and the pip
package ``playwright`` (its own browser download is never used). Without Chromium they are skipped, except under
CI (``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from engine_fakes import ScriptedEngine
from zhiling.config import GenerationConfig, ModelConfig
from zhiling.errors import ZhilingError
from zhiling.infer.engine import ChatRequest, load_engine

import gradio  # noqa: F401 (the web UI under test)

from zhiling.serve.webui import FORM_PARAMS, build_webui, form_params, launch_webui, new_state, save_chat  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ANSWER = "你好！我是一个测试助手，很高兴认识你。"


# ----- form helpers (no browser) ---------------------------------------------------------------------------------
def test_form_values_become_generation_parameters():
    values = dict(zip(FORM_PARAMS, [64.0, 2.0, True, 0.5, 0.8, 20.0, 1.0, 1.1, 3.0, 42.0]))
    params = form_params(GenerationConfig(), values, "###\n\nUser:")
    assert (params.max_new_tokens, params.min_new_tokens, params.do_sample, params.top_k) == (64, 2, True, 20)
    assert (params.repetition_penalty, params.no_repeat_ngram_size, params.seed) == (1.1, 3, 42)
    assert params.stop == ["###", "User:"]
    assert form_params(GenerationConfig(), {"seed": -1}, "").seed is None


def test_bad_form_values_are_errors():
    with pytest.raises(ZhilingError, match="larger than max_new_tokens"):
        form_params(GenerationConfig(), {"max_new_tokens": 4, "min_new_tokens": 9}, "")
    with pytest.raises(ZhilingError, match="top_p"):
        form_params(GenerationConfig(), {"top_p": 0}, "")


def test_save_chat_writes_a_canonical_row(tiny_tokenizer, tmp_path):
    from zhiling.data.records import validate_record

    engine = ScriptedEngine(tiny_tokenizer)
    state = {"turns": [["你好", "你好！"], ["再见", "再见！"]], "first_kept": 0}
    also = tmp_path / "all.jsonl"
    path = save_chat(engine, state, GenerationConfig(temperature=0.3), "你是助手", tmp_path, also)
    row = json.loads(path.read_text(encoding="utf-8"))
    validate_record(row)
    assert row["system"] == "你是助手" and len(row["messages"]) == 4 and row["generation"]["temperature"] == 0.3
    assert json.loads(also.read_text(encoding="utf-8"))["messages"] == row["messages"]
    with pytest.raises(ZhilingError, match="nothing to save"):
        save_chat(engine, new_state(), GenerationConfig(), "", tmp_path, None)


def test_two_people_saving_in_the_same_second_get_their_own_files(tiny_tokenizer, tmp_path, monkeypatch):
    import zhiling.serve.webui as webui

    monkeypatch.setattr(webui.time, "strftime", lambda fmt: "20261202-120000")
    engine = ScriptedEngine(tiny_tokenizer)
    first = save_chat(engine, {"turns": [["我是甲", "好"]], "first_kept": 0}, GenerationConfig(), "", tmp_path, None)
    second = save_chat(engine, {"turns": [["我是乙", "好"]], "first_kept": 0}, GenerationConfig(), "", tmp_path, None)
    assert first != second
    assert "我是甲" in first.read_text(encoding="utf-8") and "我是乙" in second.read_text(encoding="utf-8")


def respond_function(demo):
    [respond] = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "respond"][:1]
    return respond


def test_an_unexpected_failure_shows_no_internals(tiny_tokenizer, caplog):
    import asyncio

    class Broken(ScriptedEngine):
        def _stream_ids(self, prompt, params, cancel):
            raise RuntimeError("/home/secret/path: CUDA error")
            yield  # noqa: unreachable - a generator

    demo = build_webui(Broken(tiny_tokenizer), GenerationConfig(max_new_tokens=8))
    respond = respond_function(demo)
    values = [8, 0, False, 0.7, 0.9, 50, 1, 1.0, 0, -1]

    async def run():
        return [update async for update in respond("你好", new_state(), "", 2048, "", *values)]

    updates = asyncio.run(run())
    status = updates[-1][3]
    assert "failed" in status and "secret" not in status and "CUDA" not in status
    assert updates[-1][2] == "你好"  # the question is back in the box
    assert "/home/secret/path" in caplog.text  # the details are in the log


def test_the_save_folder_is_removed_at_exit(tiny_tokenizer_dir, tmp_path):
    import os
    import subprocess
    import sys

    script = f"""
import sys, tempfile
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from transformers import AutoTokenizer
from engine_fakes import ScriptedEngine
from zhiling.serve.webui import build_webui
demo = build_webui(ScriptedEngine(AutoTokenizer.from_pretrained({str(tiny_tokenizer_dir)!r})))
print(len(list(Path(tempfile.gettempdir()).glob("zhiling-webui-*"))))
"""
    env = dict(os.environ, TMPDIR=str(tmp_path), GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1"  # the folder existed while the page was up
    assert list(tmp_path.glob("zhiling-webui-*")) == []


# ----- in the browser --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run scripts/install_system_deps.sh (or deselect with -m 'not browser')")
    import playwright.sync_api as playwright_api
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """One web UI served on a free port, opened in a fresh browser page."""

    def __init__(self, browser, engine, params, **kwargs):
        self.demo = build_webui(engine, params, **kwargs)
        _, self.url = launch_webui(self.demo, "127.0.0.1", free_port(), block=False)
        self.page = browser.new_page(viewport={"width": 1100, "height": 900})
        self.page.goto(self.url)
        self.page.wait_for_selector("#zhiling-message textarea", timeout=60_000)

    def send(self, text: str) -> None:
        self.page.fill("#zhiling-message textarea", text)
        self.page.click("#zhiling-send")

    def chat_text(self) -> str:
        return self.page.inner_text("#zhiling-chat")

    def status(self) -> str:
        return self.page.inner_text("#zhiling-status")

    def wait_for(self, condition, what: str, seconds: float = 60.0):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            self.page.wait_for_timeout(50)
        raise AssertionError(f"gave up waiting for {what}; chat shows {self.chat_text()!r}")

    def close(self) -> None:
        self.page.close()
        self.demo.close()


@pytest.mark.browser
def test_page_streams_an_answer(browser, tiny_tokenizer, tmp_path):
    """Tokens are released a few at a time: the page must show the answer growing, then complete."""
    released = threading.Semaphore(0)
    engine = ScriptedEngine(tiny_tokenizer, ANSWER, on_token=lambda index: released.acquire(timeout=60))
    page = Page(browser, engine, GenerationConfig(max_new_tokens=64))
    try:
        page.send("你好，请介绍一下你自己。")
        page.wait_for(lambda: "你好，请介绍一下你自己。" in page.chat_text(), "the question to show")
        released.release(8)
        page.wait_for(lambda: "你好！" in page.chat_text(), "the first part of the answer")
        partial = page.chat_text()
        assert ANSWER not in partial  # only part of the answer has been generated so far
        page.page.screenshot(path=str(tmp_path / "webui-streaming.png"))
        released.release(1000)
        page.wait_for(lambda: ANSWER in page.chat_text(), "the whole answer")
        page.page.screenshot(path=str(tmp_path / "webui-answer.png"), full_page=True)
        assert (tmp_path / "webui-answer.png").stat().st_size > 10_000
        assert engine.calls[0]["kind"] == "stream"
    finally:
        page.close()


@pytest.mark.browser
def test_page_with_a_real_model_matches_the_engine(browser, tiny_model_dir, tmp_path):
    engine = load_engine(ModelConfig(name_or_path=str(tiny_model_dir("llama"))))
    params = GenerationConfig(max_new_tokens=12)
    [expected] = engine.generate([ChatRequest("今天天气很好。")], params)
    saved_to = tmp_path / "chats.jsonl"
    page = Page(browser, engine, params, save_to=str(saved_to))
    try:
        page.send("今天天气很好。")
        page.wait_for(lambda: "max_new_tokens=12" in page.status(), "the answer to finish")
        page.page.screenshot(path=str(tmp_path / "webui-tiny-model.png"), full_page=True)
        page.page.click("#zhiling-save")
        page.wait_for(lambda: "saved" in page.status(), "the saved notice")
        row = json.loads(saved_to.read_text(encoding="utf-8"))
        assert row["messages"] == [{"role": "user", "content": "今天天气很好。"},
                                   {"role": "assistant", "content": expected.text}]
        assert row["engine"]["backend"] == "hf" and row["generation"]["max_new_tokens"] == 12
    finally:
        page.close()


@pytest.mark.browser
def test_stop_undo_clear_and_save(browser, tiny_tokenizer, tmp_path):
    released = threading.Semaphore(0)
    engine = ScriptedEngine(tiny_tokenizer, ANSWER, on_token=lambda index: released.acquire(timeout=60))
    saved_to = tmp_path / "chats.jsonl"
    page = Page(browser, engine, GenerationConfig(max_new_tokens=64), save_to=str(saved_to))
    try:
        page.send("第一个问题")
        released.release(8)
        page.wait_for(lambda: "你好！" in page.chat_text(), "the answer to start")
        page.page.click("#zhiling-stop")
        page.wait_for(lambda: engine.cancelled and engine.cancelled[0].is_set(), "the generation to be cancelled")
        page.wait_for(lambda: "stopped" in page.status(), "the stopped notice")
        released.release(1000)
        assert ANSWER not in page.chat_text() and "你好！" in page.chat_text()  # the partial answer stays

        engine.on_token = None
        page.send("第二个问题")
        page.wait_for(lambda: page.chat_text().count(ANSWER) == 1, "the second answer")
        page.page.click("#zhiling-save")
        page.wait_for(lambda: "saved" in page.status(), "the saved notice")
        row = json.loads(saved_to.read_text(encoding="utf-8"))
        assert [m["content"] for m in row["messages"]][::2] == ["第一个问题", "第二个问题"]
        assert row["messages"][3]["content"] == ANSWER and row["source"] == "zhiling-chat"

        page.page.click("#zhiling-undo")
        page.wait_for(lambda: "第二个问题" not in page.chat_text(), "undo")
        assert page.page.input_value("#zhiling-message textarea") == "第二个问题"
        assert "第一个问题" in page.chat_text()
        page.page.click("#zhiling-clear")
        page.wait_for(lambda: "第一个问题" not in page.chat_text(), "clear")
        page.page.screenshot(path=str(tmp_path / "webui-cleared.png"))
    finally:
        page.close()


@pytest.mark.browser
def test_history_and_system_prompt_reach_the_engine(browser, tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "好的。")
    page = Page(browser, engine, GenerationConfig(max_new_tokens=16), system="你是一个诗人。")
    try:
        page.send("第一句")
        page.wait_for(lambda: page.chat_text().count("好的。") == 1, "the first answer")
        page.send("第二句")
        page.wait_for(lambda: page.chat_text().count("好的。") == 2, "the second answer")
        prompt = tiny_tokenizer.decode(engine.calls[-1]["prompts"][0])
        assert "你是一个诗人。" in prompt and "第一句" in prompt and "好的。" in prompt and "第二句" in prompt
    finally:
        page.close()
