"""zhiling serve under hostile clients: auth on every route, Host checks, body limits and a body fuzz, clients that
leave while queued, errors without internals, per-request seeds, a huge prompt, shutdown, and the exposure rule of
`zhiling serve` / `zhiling webui`. Everything runs against a live server on loopback, mostly with the scripted
engine (tests/engine_fakes.py)."""

from __future__ import annotations

import json
import random
import re
import threading

import httpx
import pytest

import fastapi  # noqa: F401 (the server under test)

from engine_fakes import ScriptedEngine
from test_serve import load_bench, wait_until
from zhiling.config import GenerationConfig, ModelConfig
from zhiling.infer.engine import load_engine
from zhiling.serve.app import create_app
from zhiling.serve.runner import ServerThread

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "你好"}]


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """The OpenAI error shape, and no Python internals in it."""
    if status is not None:
        assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text and "Error(" not in response.text
    return body["error"]


def counts(server) -> dict:
    return httpx.get(server.url + "/health", headers=AUTH).json()


@pytest.fixture()
def scripted(tiny_tokenizer):
    return ScriptedEngine(tiny_tokenizer, "好的")


@pytest.fixture()
def keyed_server(scripted):
    with ServerThread(create_app(scripted, GenerationConfig(max_new_tokens=8), api_key=KEY, model_name="s",
                                 max_concurrency=2, max_queue=4)) as server:
        yield server


# ----- auth on every route ---------------------------------------------------------------------------------------
def test_every_route_of_the_app_needs_the_key(scripted):
    """Sweeps app.routes, so a route added later is covered without editing this test."""
    app = create_app(scripted, api_key=KEY, model_name="s")
    paths = {route.path for route in app.routes}
    assert {"/docs", "/redoc", "/openapi.json", "/health", "/v1/chat/completions"} <= paths
    swept = 0
    with ServerThread(app) as server:
        for route in app.routes:
            path = re.sub(r"\{[^}]+\}", "s", route.path)
            for method in sorted(getattr(route, "methods", None) or {"GET"}):
                response = httpx.request(method, server.url + path, json={})
                swept += 1
                if route.path == "/health":
                    assert response.status_code == 200
                    if method == "GET":
                        assert response.json() == {"status": "ok"}  # no model, no local path
                    continue
                wrong = httpx.request(method, server.url + path, json={}, headers={"Authorization": "Bearer no"})
                assert response.status_code == wrong.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":  # a HEAD answer has no body
                    assert_openai_error(response, 401)
                    assert_openai_error(wrong, 401)
                right = httpx.request(method, server.url + path, json={}, headers=AUTH)
                assert right.status_code != 401, (method, path)
        assert_openai_error(httpx.get(server.url + "/no/such/route"), 401)  # unknown paths too
        full = httpx.get(server.url + "/health", headers=AUTH).json()
        assert full["served_model"] == "s" and full["model"] == "scripted-model"
    assert swept >= 8


def test_without_a_key_health_tells_everything(scripted):
    with ServerThread(create_app(scripted, model_name="s")) as server:
        info = httpx.get(server.url + "/health").json()
    assert info["served_model"] == "s" and "running" in info


# ----- DNS rebinding ---------------------------------------------------------------------------------------------
def test_a_loopback_server_answers_only_localhost_host_names(scripted):
    with ServerThread(create_app(scripted, model_name="s")) as server:
        for host in ("localhost", "LOCALHOST:8000", "127.0.0.1", f"127.0.0.1:{server.port}", "[::1]", "[::1]:80"):
            assert httpx.get(server.url + "/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example.com", "evil.example.com:8000", "127.0.0.1.evil.com", "localhost.evil.com:80",
                     "10.0.0.1", ""):
            response = httpx.get(server.url + "/v1/models", headers={"Host": host})
            assert assert_openai_error(response, 400)["code"] == "invalid_host", host
            response = httpx.post(server.url + "/v1/chat/completions", headers={"Host": host},
                                  json={"model": "s", "messages": HELLO})
            assert_openai_error(response, 400)
    # a server bound to every address cannot know its names: the key protects it instead
    with ServerThread(create_app(scripted, model_name="s", api_key=KEY, host="0.0.0.0")) as server:
        assert httpx.get(server.url + "/v1/models", headers={"Host": "my-box.lan", **AUTH}).status_code == 200


# ----- hostile bodies --------------------------------------------------------------------------------------------
def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def hostile_bodies(kind: str = "chat") -> list[tuple[str, bytes | dict, int]]:
    """(name, body, expected status) for /v1/chat/completions (``chat``) or /v1/completions (``text``): raw
    bytes are sent as they are, dicts as JSON."""
    def with_text(text=None, many=None, parts=None, **extra):
        if kind == "chat":
            if many is not None:
                messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * (many // 2)
            elif parts is not None:
                messages = [{"role": "user", "content": [{"type": "text", "text": "a"}] * parts}]
            else:
                messages = [{"role": "user", "content": "你好" if text is None else text}]
            return {"model": "s", "messages": messages, **extra}
        prompt = ["a"] * (many or parts) if (many or parts) else ("你好" if text is None else text)
        return {"model": "s", "prompt": prompt, **extra}

    field = "messages" if kind == "chat" else "prompt"
    small = b'[{"role": "user", "content": "hi"}]' if kind == "chat" else b'"hi"'
    return [
        ("oversized body", with_text("长" * (1536 * 1024)), 413),  # 9 MiB of JSON ("\\u957f" each)
        ("100,000 messages", with_text(many=100_000), 422),
        ("10,000 content parts", with_text(parts=10_000), 422),
        ("10,000 stop strings", with_text(stop=[f"s{i}" for i in range(10_000)]), 422),
        ("5 stop strings", with_text(stop=["a", "b", "c", "d", "e"]), 422),
        ("a 10,000-character stop string", with_text(stop="x" * 10_000), 422),
        ("num_beams 1000", with_text(num_beams=1000), 422),
        ("seed 2**70", with_text(seed=2 ** 70), 400),
        ("seed -1", with_text(seed=-1), 400),
        ("deeply nested JSON", f'{{"model": "s", "{field}": '.encode() + nested(100_000).encode() + b"}", 400),
        ("nested JSON in logprobs", f'{{"model": "s", "{field}": '.encode() + small + b', "logprobs": '
         + nested(800).encode() + b"}", 400),
        ("a 5,000,000-character text", with_text("a" * 5_000_000), 422),
        ("a 10,000-character model name", {**with_text(), "model": "m" * 10_000}, 422),
        ("a JSON array", b"[1, 2, 3]", 400),
        ("a JSON string", b'"hello"', 400),
        ("not JSON", b"\xff\xfe{{{", 400),
        ("temperature NaN", f'{{"model": "s", "{field}": '.encode() + small + b', "temperature": NaN}', 422),
        ("max_tokens 2**70", with_text(max_tokens=2 ** 70), 400),
    ] + ([("100,000 bad messages", {"model": "s", "messages": [{"role": "robot", "content": "a"}] * 100_000}, 422)]
         if kind == "chat" else [])


def post(server, body: bytes | dict, path: str = "/v1/chat/completions", http: httpx.Client | None = None,
         ) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body  # bytes, or chunks (no length)
    headers = {**AUTH, "Content-Type": "application/json"}
    if http is not None:
        return http.post(server.url + path, content=content, headers=headers)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=120)


def test_hostile_bodies_get_4xx_in_the_openai_shape(keyed_server, capsys):
    tried = 0
    for name, body, status in hostile_bodies():
        error = assert_openai_error(post(keyed_server, body), status)
        tried += 1
        if name.startswith("seed"):
            assert error["param"] == "seed" and "seed" in error["message"]
        if name == "100,000 bad messages":
            assert len(error["message"]) < 2000  # a short answer, not 100,000 complaints
        if name.endswith("stop strings") or "stop string" in name:
            assert "stop" in error["message"]
        if name == "num_beams 1000":
            assert error["param"] == "num_beams"
    # a body without Content-Length (chunked) is counted as it arrives
    chunked = post(keyed_server, iter([b'{"model": "s", "messages": ['] + [b'{"role": "user", "content": "'
                                                                           + b"a" * 65536 + b'"},'] * 200))
    assert_openai_error(chunked, 413)
    tried += 1
    # the same attacks on /v1/completions
    for name, body, status in hostile_bodies("text"):
        assert_openai_error(post(keyed_server, body, "/v1/completions"), status)
        tried += 1
    tried += fuzz_random_bodies(keyed_server, 400)
    assert counts(keyed_server)["status"] == "ok"  # the server still answers
    assert counts(keyed_server)["running"] == 0
    with capsys.disabled():
        print(f"\nhostile bodies tried: {tried}")
    assert tried >= 400


HOSTILE_VALUES = [None, True, -1, 0, 2 ** 70, -(2 ** 70), 1e308, -1e308, "", "x" * 300, [], {}, [[[[]]]],
                  {"a": {"b": {"c": []}}}, ["s"] * 50, "\u0000", "\ud800", 0.5, "NaN"]
FIELDS = ["model", "messages", "stream", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "top_k",
          "num_beams", "min_tokens", "repetition_penalty", "no_repeat_ngram_size", "do_sample", "logprobs", "tools",
          "stream_options", "user", "response_format", "metadata", "frobnicate"]


def fuzz_random_bodies(server, count: int) -> int:
    """Valid bodies with 1-3 fields replaced by hostile values: never a 5xx, errors always in the OpenAI shape."""
    rng = random.Random(20261202)
    http = httpx.Client(timeout=120)
    for _ in range(count):
        body = {"model": "s", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
        for name in rng.sample(FIELDS, rng.randint(1, 3)):
            body[name] = rng.choice(HOSTILE_VALUES)
        response = post(server, json.dumps(body).encode(), http=http)
        assert response.status_code < 500, (body, response.text[:300])
        if response.status_code >= 400:
            assert_openai_error(response)
        elif body.get("stream") is True:
            assert response.text.rstrip().endswith("data: [DONE]")
    http.close()
    return count


# ----- clients that leave while queued ---------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_the_queue_frees_its_place(tiny_tokenizer, stream):
    gate = threading.Event()
    engine = ScriptedEngine(tiny_tokenizer, "好", gate=gate)
    app = create_app(engine, model_name="s", max_concurrency=1, max_queue=1)
    with ServerThread(app) as server:
        holder = threading.Thread(target=lambda: httpx.post(server.url + "/v1/chat/completions", timeout=60,
                                                            json={"model": "s", "messages": HELLO}))
        holder.start()
        try:
            wait_until(lambda: counts(server)["running"] == 1, "the first request to run")
            with pytest.raises(httpx.ReadTimeout):  # queued behind it; the client gives up and disconnects
                httpx.post(server.url + "/v1/chat/completions", timeout=1.0,
                           json={"model": "s", "messages": HELLO, "stream": stream})
            wait_until(lambda: counts(server)["waiting"] == 0, "the queued request to leave the queue")
            assert counts(server)["running"] == 1  # the first one still runs
            # its place is free: another request can queue (the queue holds one)
            waiter = threading.Thread(target=lambda: httpx.post(server.url + "/v1/chat/completions", timeout=60,
                                                                json={"model": "s", "messages": HELLO}))
            waiter.start()
            wait_until(lambda: counts(server)["waiting"] == 1, "a new request to queue")
        finally:
            gate.set()
        holder.join(30)
        waiter.join(30)
        wait_until(lambda: counts(server)["completed"] == 2, "both requests to complete")
        assert len(engine.calls) == 2  # the one that left never reached the engine


# ----- failures in the OpenAI shape, without internals -----------------------------------------------------------
class Exploding(ScriptedEngine):
    """Raises an exception full of internals where the test says."""

    SECRET = "/home/secret/model/path RuntimeError"

    def __init__(self, tokenizer, where: str):
        super().__init__(tokenizer, "好的世界")
        self.where = where

    def count_tokens(self, request):
        if self.where == "count":
            raise RuntimeError(self.SECRET)
        return super().count_tokens(request)

    def _generate_ids(self, prompts, params, cancel):
        if self.where == "generate":
            raise RuntimeError(self.SECRET)
        return super()._generate_ids(prompts, params, cancel)

    def _stream_ids(self, prompt, params, cancel):
        for index, token in enumerate(super()._stream_ids(prompt, params, cancel)):
            if self.where == "stream" and index == 1:
                raise RuntimeError(self.SECRET)
            yield token


def test_404_405_and_500_are_openai_errors_without_internals(tiny_tokenizer, caplog):
    with ServerThread(create_app(ScriptedEngine(tiny_tokenizer), model_name="s")) as server:
        assert assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)["code"] == "not_found"
        assert assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)["code"] == \
            "method_not_allowed"
        assert_openai_error(httpx.delete(server.url + "/health"), 405)
        assert_openai_error(httpx.post(server.url + "/v1/models/s"), 405)
    for where in ("count", "generate"):
        with ServerThread(create_app(Exploding(tiny_tokenizer, where), model_name="s")) as server:
            response = httpx.post(server.url + "/v1/chat/completions", json={"model": "s", "messages": HELLO})
            error = assert_openai_error(response, 500)
            assert "secret" not in response.text and error["type"] == "server_error"
            assert "server log" in error["message"]
            assert httpx.get(server.url + "/health").json()["running"] == 0
    assert Exploding.SECRET in caplog.text  # the details are in the server log


def test_a_failure_mid_stream_is_reported_without_internals(tiny_tokenizer, caplog):
    with ServerThread(create_app(Exploding(tiny_tokenizer, "stream"), model_name="s")) as server:
        with httpx.stream("POST", server.url + "/v1/chat/completions",
                          json={"model": "s", "messages": HELLO, "stream": True}) as response:
            events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "server log" in error["message"]
    assert "secret" not in "".join(events)
    assert Exploding.SECRET in caplog.text


# ----- a huge prompt does not stall the server -------------------------------------------------------------------
def test_tokenizing_a_huge_prompt_does_not_block_health(tiny_tokenizer):
    started, release = threading.Event(), threading.Event()

    class SlowTokenizer(ScriptedEngine):
        def count_tokens(self, request):
            if len(getattr(request, "text", "")) > 100_000:
                started.set()
                release.wait(60)  # a tokenization that takes as long as the test wants
            return super().count_tokens(request)

    engine = SlowTokenizer(tiny_tokenizer, context_length=10_000_000)
    with ServerThread(create_app(engine, model_name="s")) as server:
        answers = []
        huge = threading.Thread(target=lambda: answers.append(httpx.post(
            server.url + "/v1/completions", json={"model": "s", "prompt": "长" * 200_000, "max_tokens": 2},
            timeout=120)))
        huge.start()
        try:
            assert started.wait(60), "the huge prompt never reached tokenization"
            # while that prompt is being tokenized, the server answers others (10 s: a deadline, not a timing)
            assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
            reply = httpx.post(server.url + "/v1/chat/completions", timeout=10, json={"model": "s", "messages": HELLO})
            assert reply.status_code == 200
        finally:
            release.set()
        huge.join(60)
    assert answers and answers[0].status_code == 200


def test_the_bench_measures_health_during_a_huge_prompt(tiny_tokenizer, capsys):
    bench = load_bench()
    engine = ScriptedEngine(tiny_tokenizer)
    with ServerThread(create_app(engine, api_key=KEY, model_name="s")) as server:
        report = bench.health_during_huge_prompt(server.url, KEY, "s", megabytes=1.0)
    print(report.summary())
    assert report.status == 400 and len(report.idle) == 10  # the prompt does not fit the 512-token context
    assert "/health during a 1 MB prompt" in capsys.readouterr().out


# ----- seeds -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return load_engine(ModelConfig(name_or_path=str(tiny_model_dir("llama"))))


def test_a_seeded_request_repeats_beside_another_and_leaves_the_global_rng_alone(hf_engine):
    import torch

    body = {"model": "tiny", "messages": HELLO, "max_tokens": 16, "temperature": 1.5, "top_p": 1.0, "seed": 11,
            "top_k": 0}
    app = create_app(hf_engine, GenerationConfig(max_new_tokens=16), model_name="tiny", max_concurrency=2)
    with ServerThread(app) as server:
        def ask(extra: dict) -> str:
            response = httpx.post(server.url + "/v1/chat/completions", json={**body, **extra}, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        alone = ask({})
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        for _ in range(3):
            answers: dict[str, str] = {}
            threads = [threading.Thread(target=lambda: answers.__setitem__("seeded", ask({}))),
                       threading.Thread(target=lambda: answers.__setitem__("other", ask({"seed": None})))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert answers["seeded"] == alone
        assert torch.equal(torch.get_rng_state(), state)  # no request reseeded or drew from the global generator


# ----- shutdown --------------------------------------------------------------------------------------------------
def test_shutdown_cancels_generations_in_flight(tiny_tokenizer):
    gate = threading.Event()  # never set: without cancellation the generations would never end
    engine = ScriptedEngine(tiny_tokenizer, "好", gate=gate)
    server = ServerThread(create_app(engine, model_name="s", max_concurrency=2)).__enter__()
    replies: list = []

    def ask(stream: bool):
        try:
            replies.append(httpx.post(server.url + "/v1/chat/completions", timeout=60,
                                      json={"model": "s", "messages": HELLO, "stream": stream}))
        except httpx.HTTPError as exc:
            replies.append(exc)

    clients = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
    try:
        for client in clients:
            client.start()
        wait_until(lambda: len(engine.cancelled) == 2, "both generations to start")
        server.server.should_exit = True
        server.thread.join(5)
        assert not server.thread.is_alive(), "the server did not stop within 5 seconds"
        assert all(cancel.is_set() for cancel in engine.cancelled)
        for client in clients:
            client.join(30)
        answers = sorted(replies, key=lambda r: r.headers.get("content-type", ""))  # JSON first, then the stream
        assert [r.status_code for r in answers] == [503, 200]
        assert assert_openai_error(answers[0])["code"] == "shutting_down"
        events = [line for line in answers[1].text.splitlines() if line]
        assert events[-1] == "data: [DONE]" and '"shutting_down"' in events[-2]  # told, not a silent "stop"
    finally:
        gate.set()
        server.__exit__(None, None, None)
        for client in clients:
            client.join(30)


# ----- exposure: zhiling serve and zhiling webui -----------------------------------------------------------------
@pytest.fixture()
def no_serving(monkeypatch, tiny_tokenizer):
    """`zhiling serve` / `webui` up to the point where they would listen; what they would serve is recorded."""
    import zhiling.cli.serve_cmd as serve_cmd
    import zhiling.serve.runner as runner

    served: list[dict] = []
    engine = ScriptedEngine(tiny_tokenizer)
    monkeypatch.setattr(serve_cmd, "load_engine_from_args", lambda args: (engine, GenerationConfig()))
    monkeypatch.setattr(runner, "serve_forever", lambda app, host, port, **kw: served.append(
        {"app": app, "host": host}))
    monkeypatch.delenv("ZHILING_API_KEY", raising=False)
    monkeypatch.delenv("ZHILING_WEBUI_AUTH", raising=False)
    return served


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "my-box.lan"])
def test_serve_refuses_a_public_host_without_a_key(no_serving, capsys, host):
    from zhiling.cli import main

    assert main(["serve", "--model", "m", "--host", host]) == 1
    err = capsys.readouterr().err
    assert "--api-key" in err and "--allow-no-key" in err
    assert no_serving == []


@pytest.mark.parametrize("args", [["--host", "0.0.0.0", "--api-key", "k"], ["--host", "0.0.0.0", "--allow-no-key"],
                                  ["--host", "127.0.0.1"], ["--host", "localhost"], ["--host", "::1"]])
def test_serve_starts_with_a_key_an_explicit_opt_out_or_on_loopback(no_serving, args):
    from zhiling.cli import main

    assert main(["serve", "--model", "m", *args]) == 0
    assert len(no_serving) == 1


def test_serve_takes_the_key_from_the_environment_and_the_body_limit_from_the_flag(no_serving, monkeypatch):
    from zhiling.cli import main

    monkeypatch.setenv("ZHILING_API_KEY", "env-key")
    assert main(["serve", "--model", "m", "--host", "0.0.0.0", "--max-body-mb", "0.001"]) == 0
    with ServerThread(no_serving[0]["app"]) as server:
        assert_openai_error(httpx.get(server.url + "/v1/models"), 401)
        response = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": "Bearer env-key"},
                              json={"model": "x", "messages": [{"role": "user", "content": "a" * 2000}]})
        assert_openai_error(response, 413)


@pytest.fixture()
def no_webui(monkeypatch, no_serving):
    import zhiling.serve.webui as webui

    launched: list[dict] = []
    monkeypatch.setattr("zhiling.cli.serve_cmd._need", lambda module, extra: None)
    monkeypatch.setattr(webui, "build_webui", lambda engine, params, **kwargs: "demo")
    monkeypatch.setattr(webui, "launch_webui", lambda demo, host, port, **kwargs: launched.append(
        {"host": host, **kwargs}))
    return launched


def test_webui_refuses_a_public_host_without_auth(no_webui, capsys):
    from zhiling.cli import main

    assert main(["webui", "--model", "m", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "--auth" in err and "--allow-no-auth" in err and no_webui == []
    assert main(["webui", "--model", "m", "--host", "0.0.0.0", "--auth", "nopassword"]) == 1
    assert main(["webui", "--model", "m", "--host", "0.0.0.0", "--auth", "alice:s3cret"]) == 0
    assert no_webui[-1]["auth"] == ("alice", "s3cret")
    assert main(["webui", "--model", "m", "--host", "0.0.0.0", "--allow-no-auth"]) == 0
    assert no_webui[-1]["auth"] is None
    assert main(["webui", "--model", "m"]) == 0  # loopback: no log-in needed

