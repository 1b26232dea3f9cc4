"""zhiling serve: the OpenAI-compatible API tested with the official `openai` client against a live server."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import pytest

import openai
import fastapi  # noqa: F401
import httpx

from engine_fakes import ScriptedEngine  # noqa: E402
from zhiling.config import GenerationConfig, ModelConfig  # noqa: E402
from zhiling.infer.engine import ChatRequest, TextPrompt, load_engine  # noqa: E402
from zhiling.serve.app import create_app  # noqa: E402
from zhiling.serve.runner import ServerThread  # noqa: E402

KEY = "test-key"
DEFAULTS = GenerationConfig(max_new_tokens=12)


def wait_until(condition, what: str, seconds: float = 30.0):
    """Poll ``condition`` (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return load_engine(ModelConfig(name_or_path=str(tiny_model_dir("llama"))))


@pytest.fixture(scope="module")
def server(hf_engine):
    app = create_app(hf_engine, DEFAULTS, api_key=KEY, max_concurrency=2, max_queue=8, model_name="tiny")
    with ServerThread(app) as running:
        yield running


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat(client, content="你好", **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kwargs)


# ----- the happy paths -------------------------------------------------------------------------------------------
def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_completion_matches_the_engine(client, hf_engine):
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "今天天气怎么样？"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    [expected] = hf_engine.generate([ChatRequest("今天天气怎么样？", [("你好", "你好！")], "你是助手")],
                                    GenerationConfig(max_new_tokens=10))
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.model == "tiny" and response.id.startswith("chatcmpl-")


def test_streamed_chat_equals_the_whole_answer(client):
    whole = chat(client, max_tokens=10).choices[0]
    stream = chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.message.content and reasons == [whole.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_text_completions(client, hf_engine):
    [expected] = hf_engine.generate([TextPrompt("春眠不觉晓")], GenerationConfig(max_new_tokens=6))
    response = client.completions.create(model="tiny", prompt="春眠不觉晓", max_tokens=6)
    assert response.choices[0].text == expected.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="春眠不觉晓", max_tokens=6, stream=True) if c.choices)
    assert streamed == expected.text


def test_health_needs_no_key(server):
    assert health(server) == {"status": "ok"}  # without the key: nothing about the model or the machine
    info = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["status"] == "ok" and info["served_model"] == "tiny" and info["backend"] == "hf"


# ----- errors ----------------------------------------------------------------------------------------------------
def test_401_without_or_with_a_wrong_key(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError, match="API key"):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            chat(bad)


@pytest.mark.parametrize("body, status, message", [
    ({"model": "tiny"}, 422, "missing field 'messages'"),
    ({"model": "tiny", "messages": []}, 422, "messages"),
    ({"model": "tiny", "messages": [{"role": "bot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 422,
     "unknown field 'frobnicate'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 422, "missing field 'model'"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "expected role 'user'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
     "last message must be the user's"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "only n=1"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tool and function calling"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "min_tokens": 50, "max_tokens": 5}, 400,
     "larger than max_new_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "must not be empty"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "serves 'tiny'"),
])
def test_bad_chat_bodies(server, body, status, message):
    response = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"]


def test_bad_json_and_bad_completion_bodies(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]},
                          headers=headers)
    assert response.status_code == 400 and "one prompt" in response.json()["error"]["message"]
    response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "echo": True},
                          headers=headers)
    assert response.status_code == 400 and "echo" in response.json()["error"]["message"]


def test_422_through_the_openai_client(client):
    with pytest.raises(openai.UnprocessableEntityError, match="messages.0.role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "你好"}])


def test_prompt_over_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens") as info:
        chat(client, "你好" * 400)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(client, "你好" * 400, stream=True)


# ----- parameters reach the engine -------------------------------------------------------------------------------
def test_request_parameters_reach_the_engine(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "好的")
    app = create_app(engine, GenerationConfig(max_new_tokens=20, stop=["###"]), model_name="s")
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        client.chat.completions.create(
            model="s", messages=[{"role": "user", "content": "你好"}], max_tokens=7, temperature=0.4, top_p=0.8,
            seed=5, stop=["。"], extra_body={"top_k": 3, "repetition_penalty": 1.2, "min_tokens": 2,
                                           "no_repeat_ngram_size": 3})
        params = engine.calls[-1]["params"]
        assert (params.max_new_tokens, params.do_sample, params.temperature, params.top_p) == (7, True, 0.4, 0.8)
        assert (params.seed, params.top_k, params.repetition_penalty, params.min_new_tokens) == (5, 3, 1.2, 2)
        assert params.no_repeat_ngram_size == 3 and params.stop == ["###", "。"]
        client.chat.completions.create(model="s", messages=[{"role": "user", "content": "你好"}], temperature=0)
        params = engine.calls[-1]["params"]
        assert params.do_sample is False and params.max_new_tokens == 20  # the server's default
        client.chat.completions.create(model="s", messages=[{"role": "user", "content": "你好"}],
                                       max_completion_tokens=3)
        assert engine.calls[-1]["params"].max_new_tokens == 3


def test_unsupported_backend_parameter_is_400(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, unsupported={"num_beams"})
    with ServerThread(create_app(engine, model_name="s")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="cannot honour num_beams"):
            client.chat.completions.create(model="s", messages=[{"role": "user", "content": "你好"}],
                                           extra_body={"num_beams": 4})


# ----- queueing and disconnects ----------------------------------------------------------------------------------
def test_503_with_retry_after_when_the_queue_is_full(tiny_tokenizer):
    gate = threading.Event()
    engine = ScriptedEngine(tiny_tokenizer, "一二三", gate=gate)
    app = create_app(engine, model_name="s", max_concurrency=1, max_queue=1)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        results: dict[str, str] = {}

        def ask(label):
            results[label] = chat_s(client).choices[0].message.content

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        wait_until(lambda: health(server)["running"] == 1, "the first request to run")
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        wait_until(lambda: health(server)["waiting"] == 1, "the second request to wait")
        with pytest.raises(openai.APIStatusError) as info:
            chat_s(client)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"
        assert "busy" in info.value.message
        gate.set()
        first.join(30)
        second.join(30)
        assert results == {"first": "一二三", "second": "一二三"}
        assert health(server)["running"] == 0


def chat_s(client, **kwargs):
    return client.chat.completions.create(model="s", messages=[{"role": "user", "content": "你好"}], **kwargs)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(tiny_tokenizer):
    tokens = threading.Semaphore(0)

    def one_token_at_a_time(index):
        tokens.acquire(timeout=30)

    engine = ScriptedEngine(tiny_tokenizer, "一二三四五六七八九十" * 5, eos=False, on_token=one_token_at_a_time)
    app = create_app(engine, GenerationConfig(max_new_tokens=200), model_name="s", max_concurrency=1, max_queue=0)
    with ServerThread(app) as server:
        body = {"model": "s", "messages": [{"role": "user", "content": "你好"}], "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            assert next(lines) == ""
            tokens.release(3)  # one character may take several byte-level tokens
            assert '"content"' in next(lines)
            assert health(server)["running"] == 1
        # the connection is closed here, with most of the answer still to come
        wait_until(lambda: engine.cancelled and engine.cancelled[0].is_set(), "the generation to be cancelled")
        tokens.release(1000)
        wait_until(lambda: health(server)["running"] == 0, "the slot to be freed")
        engine.on_token = None
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert chat_s(client, max_tokens=3).choices[0].finish_reason == "length"  # the only slot is free again


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(tiny_tokenizer):
    gate = threading.Event()
    engine = ScriptedEngine(tiny_tokenizer, "好", gate=gate)
    with ServerThread(create_app(engine, model_name="s", max_concurrency=1, max_queue=0)) as server:
        body = {"model": "s", "messages": [{"role": "user", "content": "你好"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
        wait_until(lambda: engine.cancelled and engine.cancelled[0].is_set(), "the generation to be cancelled")
        wait_until(lambda: health(server)["running"] == 0, "the slot to be freed")


# ----- load ------------------------------------------------------------------------------------------------------
def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_concurrent_streaming_clients_all_complete(hf_engine, capsys):
    bench = load_bench()
    expected = bench.expected_answers(hf_engine, max_tokens=8)
    app = create_app(hf_engine, GenerationConfig(max_new_tokens=8), api_key=KEY, max_concurrency=4, max_queue=64,
                     model_name="tiny")
    with ServerThread(app) as server:
        report = bench.run_load(server.url, KEY, "tiny", clients=8, requests_per_client=2, max_tokens=8,
                                expected=expected)
    print(report.summary())
    assert report.failures == [] and report.mismatches == []
    assert report.completed == 16 and report.server_completed == 16
    assert "p50" in capsys.readouterr().out


# ----- command line ----------------------------------------------------------------------------------------------
def test_zhiling_serve_command(tiny_model_dir):
    import os
    import signal
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, ZHILING_API_KEY="env-key")
    process = subprocess.Popen(
        [sys.executable, "-m", "zhiling", "serve", "--model", str(tiny_model_dir("llama")), "--port", str(port),
         "--model-name", "cli-tiny", "--max-new-tokens", "4", "--max-concurrency", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, process.communicate()[1]
                return False

        wait_until(up, "the server to start", seconds=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["cli-tiny"]
        reply = client.chat.completions.create(model="cli-tiny", messages=[{"role": "user", "content": "你好"}])
        assert reply.usage.completion_tokens <= 4  # the --max-new-tokens default
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="other", max_retries=0).models.list()
        assert health_at(port)["max_concurrency"] == 2
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "API key required" in err


def health_at(port: int, key: str = "env-key") -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {key}"}).json()


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--max-queue", "-1"], "--max-queue must be 0 or more"),
    (["--max-concurrency", "0"], "--max-concurrency must be 1 or more"),
    (["--temperature", "0"], "temperature"),
])
def test_zhiling_serve_bad_arguments(tiny_model_dir, capsys, args, message):
    from zhiling.cli import main

    assert main(["serve", "--model", str(tiny_model_dir("llama")), *args]) == 1
    assert message in capsys.readouterr().err
