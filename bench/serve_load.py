"""Load test of `zhiling serve`: N concurrent streaming clients x M requests each, on loopback.

Every request streams a chat completion with the official `openai` client. The run checks that every request
completes (a finish_reason and [DONE]), that none is lost (the server counted exactly as many completions), and
that every streamed answer equals the greedy answer computed beforehand for its prompt (no mixed-up streams).
It prints p50 / p99 latency (request start to end of stream), time to first token, and throughput.

Then it sends one huge prompt (``--huge-prompt-mb``, a raw completion of that many megabytes of Chinese text) and
polls ``GET /health`` while the server receives, parses and tokenizes it: the /health latencies before and during
show whether a huge prompt stalls the server for everyone else (it must not: tokenizing runs off the event loop).

    python bench/serve_load.py                          # the embedded default model (Gemma 3 270M) on CPU
    python bench/serve_load.py --model Qwen/Qwen2.5-0.5B-Instruct --max-concurrency 4
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key K --model-name NAME   # a running server

Needs: pip install 'zhiling[serve]' openai
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

PROMPTS = ["你好，请介绍一下你自己。", "今天天气怎么样？", "请写一句关于春天的诗。", "把这句话翻译成英文：我喜欢学习。",
           "1 加 1 等于几？", "推荐一本好书。", "什么是机器学习？", "请列出三种水果。"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class LoadReport:
    clients: int
    requests_per_client: int
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0
    server_completed: int | None = None

    @property
    def expected(self) -> int:
        return self.clients * self.requests_per_client

    @property
    def ok(self) -> bool:
        lost = self.server_completed is not None and self.server_completed != self.expected
        return self.completed == self.expected and not self.failures and not self.mismatches and not lost

    def percentile(self, values: list[float], q: float) -> float:
        return percentile(values, q)

    def summary(self) -> str:
        lines = [f"{self.clients} clients x {self.requests_per_client} streaming requests: {self.completed}/"
                 f"{self.expected} completed, {len(self.failures)} failed, {len(self.mismatches)} wrong answers"
                 + (f", server counted {self.server_completed}" if self.server_completed is not None else "")]
        if self.latencies:
            lines.append(f"latency p50 {self.percentile(self.latencies, 50):.3f}s  p99 "
                         f"{self.percentile(self.latencies, 99):.3f}s  mean {statistics.mean(self.latencies):.3f}s")
            lines.append(f"first token p50 {self.percentile(self.first_token, 50):.3f}s  p99 "
                         f"{self.percentile(self.first_token, 99):.3f}s")
            lines.append(f"{self.expected / self.seconds:.2f} requests/s, {self.chunks} chunks in {self.seconds:.1f}s")
        for problem in (self.failures + self.mismatches)[:5]:
            lines.append("  " + problem)
        return "\n".join(lines)


async def _client(number: int, report: LoadReport, client, model: str, max_tokens: int,
                  expected: dict[str, str] | None) -> None:
    for request in range(report.requests_per_client):
        prompt = PROMPTS[(number + request) % len(PROMPTS)]
        started = time.perf_counter()
        first = None
        parts: list[str] = []
        reason = None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=max_tokens,
                temperature=0)
            async for chunk in stream:
                report.chunks += 1
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.delta.content:
                    if first is None:
                        first = time.perf_counter() - started
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    reason = choice.finish_reason
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            report.failures.append(f"client {number} request {request}: {type(exc).__name__}: {exc}")
            continue
        if reason is None:
            report.failures.append(f"client {number} request {request}: stream ended without a finish_reason")
            continue
        report.latencies.append(time.perf_counter() - started)
        report.first_token.append(first if first is not None else report.latencies[-1])
        report.completed += 1
        text = "".join(parts)
        if expected is not None and text != expected[prompt]:
            report.mismatches.append(f"client {number} request {request}: {text!r} != {expected[prompt]!r}")


async def run_load_async(base_url: str, api_key: str, model: str, clients: int = 16, requests_per_client: int = 4,
                         max_tokens: int = 16, expected: dict[str, str] | None = None) -> LoadReport:
    import httpx
    from openai import AsyncOpenAI

    report = LoadReport(clients, requests_per_client)
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600,
                           http_client=httpx.AsyncClient(limits=limits, timeout=600)) as client:
        before = await _server_completed(base_url, api_key)
        started = time.perf_counter()
        await asyncio.gather(*(_client(n, report, client, model, max_tokens, expected) for n in range(clients)))
        report.seconds = time.perf_counter() - started
        after = await _server_completed(base_url, api_key)
    if before is not None and after is not None:
        report.server_completed = after - before
    return report


async def _server_completed(base_url: str, api_key: str) -> int | None:
    import httpx

    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:
            return (await http.get(base_url.rstrip("/") + "/health")).json().get("completed")
    except (httpx.HTTPError, ValueError):
        return None


def run_load(*args, **kwargs) -> LoadReport:
    return asyncio.run(run_load_async(*args, **kwargs))


@dataclass
class HealthReport:
    megabytes: float
    idle: list[float] = field(default_factory=list)  # /health latencies with nothing else going on
    during: list[float] = field(default_factory=list)  # while the huge prompt was in the server
    status: int | None = None  # the huge request's answer
    seconds: float = 0.0  # the huge request, sent to answered

    def summary(self) -> str:
        def ms(values: list[float], q: float) -> str:
            return f"{percentile(values, q) * 1000:.1f} ms"

        lines = [f"/health idle: {len(self.idle)} polls, p50 {ms(self.idle, 50)}, max {ms(self.idle, 100)}",
                 f"/health during a {self.megabytes:g} MB prompt (answered {self.status} in {self.seconds:.2f}s): "
                 f"{len(self.during)} polls, p50 {ms(self.during, 50)}, max {ms(self.during, 100)}"]
        return "\n".join(lines)


async def health_during_huge_prompt_async(base_url: str, api_key: str, model: str, megabytes: float = 4.0,
                                          interval: float = 0.02) -> HealthReport:
    """Poll /health (idle, then while one request with a ``megabytes`` MB prompt is in the server)."""
    import httpx

    report = HealthReport(megabytes)
    text = "春眠不觉晓，处处闻啼鸟。"
    prompt = text * max(1, int(megabytes * 1024 * 1024 / len(text.encode())))
    headers = {"Authorization": f"Bearer {api_key}"}
    base = base_url.rstrip("/")
    async with httpx.AsyncClient(timeout=600, headers=headers) as http:
        async def poll() -> float:
            started = time.perf_counter()
            (await http.get(base + "/health")).raise_for_status()
            return time.perf_counter() - started

        for _ in range(10):
            report.idle.append(await poll())
            await asyncio.sleep(interval)
        started = time.perf_counter()
        huge = asyncio.ensure_future(http.post(base + "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}))
        while not huge.done():
            report.during.append(await poll())
            await asyncio.sleep(interval)
        report.status = (await huge).status_code
        report.seconds = time.perf_counter() - started
    return report


def health_during_huge_prompt(*args, **kwargs) -> HealthReport:
    return asyncio.run(health_during_huge_prompt_async(*args, **kwargs))


def expected_answers(engine, max_tokens: int) -> dict[str, str]:
    """The greedy answer to every prompt, computed directly with the engine (what each stream must equal)."""
    from zhiling.config import GenerationConfig
    from zhiling.infer.engine import ChatRequest

    params = GenerationConfig(max_new_tokens=max_tokens)
    return {prompt: engine.generate([ChatRequest(prompt)], params)[0].text for prompt in PROMPTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to serve in-process (default: the embedded default)")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--url", default=None, help="load an already running server instead")
    parser.add_argument("--api-key", default="bench-key")
    parser.add_argument("--model-name", default=None, help="model id on a running server (--url)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--huge-prompt-mb", type=float, default=4.0,
                        help="size of the one huge prompt sent while /health is polled (0: skip)")
    args = parser.parse_args(argv)

    if args.url:
        report = run_load(args.url, args.api_key, args.model_name or "zhiling", args.clients, args.requests,
                          args.max_tokens)
        health = (health_during_huge_prompt(args.url, args.api_key, args.model_name or "zhiling",
                                            args.huge_prompt_mb) if args.huge_prompt_mb > 0 else None)
    else:
        from zhiling.config import GenerationConfig
        from zhiling.infer.engine import load_engine
        from zhiling.serve.app import create_app
        from zhiling.serve.runner import ServerThread

        engine = load_engine(args.model, adapter=args.adapter)
        expected = expected_answers(engine, args.max_tokens)
        app = create_app(engine, GenerationConfig(max_new_tokens=args.max_tokens), api_key=args.api_key,
                         max_concurrency=args.max_concurrency, max_queue=args.clients * args.requests)
        with ServerThread(app) as server:
            print(f"serving {engine.model_id} at {server.url} (max concurrency {args.max_concurrency})",
                  file=sys.stderr)
            report = run_load(server.url, args.api_key, app.state.model_name, args.clients, args.requests,
                              args.max_tokens, expected)
            health = (health_during_huge_prompt(server.url, args.api_key, app.state.model_name,
                                                args.huge_prompt_mb) if args.huge_prompt_mb > 0 else None)
    print(report.summary())
    if health is not None:
        print(health.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
