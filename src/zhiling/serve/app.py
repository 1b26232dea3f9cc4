"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health``.

* The front door (``guards.RequestGuard``, before any route): on a loopback bind only requests for localhost /
  127.0.0.1 / [::1] are answered (DNS rebinding); with an API key set, every path but ``/health`` (the API docs
  included) needs ``Authorization: Bearer KEY`` (401 otherwise), and ``/health`` without the key says only
  ``ok``; a body over ``max_body_bytes`` is a 413.
* Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``: 422 for a body that does not
  match the schema (the message names the field), 400 for a body that is well-formed but cannot be served
  (bad turn order, a prompt over the context, an unsupported option, a parameter out of range), 404 for an unknown
  model or route, 405, 503 with ``Retry-After`` when the queue is full. A failure inside the server is a 500 that
  says only that; the details go to the server log.
* Prompts are tokenized in a worker thread, so a huge prompt does not hold up other requests.
* Streaming (``"stream": true``) sends ``data: {chunk}`` server-sent events and ends with ``data: [DONE]``.
  A client that disconnects mid-stream cancels its generation and frees its slot; one that disconnects while
  still queued leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhiling.config import GenerationConfig
from zhiling.errors import ZhilingError
from zhiling.infer.engine import FINISH_CANCELLED, ChatRequest, Engine, PromptTooLongError, Result, TextPrompt
from zhiling.hosts import is_loopback_host
from zhiling.serve.guards import RequestGuard, key_matches
from zhiling.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from zhiling.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest
from zhiling.serve.streaming import AsyncTextStream

RETRY_AFTER_SECONDS = 1
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_REPORTED_ERRORS = 5  # a body with 100,000 bad messages gets a short answer
GENERATION_FAILED = "the generation failed; the details are in the server log"
SHUTTING_DOWN = "the server is shutting down; the answer was cut off"
log = logging.getLogger("zhiling.serve")


def readable(errors: list[dict]) -> list[dict]:
    """pydantic's errors with ``param`` (the field path, without pydantic's union tags such as
    ``list[constrained-str]``); for a field that may be a string or a list, only the complaint about the kind of
    value that was sent (a too-long list, not also "should be a string")."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        loc = [p for p in loc if not ("[" in p or "-" in p or p in ("str", "int", "float"))]
        out.append({**err, "param": ".".join(loc)})
    kinds = ("string_type", "list_type", "dict_type", "model_type", "model_attributes_type")
    params_with_other = {e["param"] for e in out if e.get("type") not in kinds}
    kept = [e for e in out if e.get("type") not in kinds or e["param"] not in params_with_other]
    unique, seen = [], set()
    for err in kept:
        key = (err["param"], err.get("type"), err.get("msg"))
        if key not in seen:
            seen.add(key)
            unique.append(err)
    return unique


class ClientGone(Exception):
    """The client disconnected while its request was still waiting for a slot."""


def served_name(engine: Engine) -> str:
    """The model id clients use: the adapter's folder name, else the model's."""
    from pathlib import Path

    source = engine.adapter_id or engine.model_id
    name = Path(source.rstrip("/")).name if source else "zhiling"
    return name or "zhiling"


def create_app(engine: Engine, params: GenerationConfig | None = None, *, api_key: str | None = None,
               max_concurrency: int = 1, max_queue: int = 16, model_name: str | None = None,
               host: str = "127.0.0.1", max_body_bytes: int = MAX_BODY_BYTES):
    """The app; ``host`` is the address it will listen on (a loopback one turns on the Host header check)."""
    defaults = params or GenerationConfig()
    name = model_name or served_name(engine)
    scheduler = Scheduler(max_concurrency, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.shutdown()

    app = FastAPI(title="zhiling", description="OpenAI-compatible API for a zhiling model", version="1",
                  lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.engine = engine
    app.state.model_name = name
    app.state.stop_generations = scheduler.stop_all  # called by the runner as soon as shutdown starts
    app.add_middleware(RequestGuard, api_key=api_key or None, max_body_bytes=max_body_bytes,
                       check_host=is_loopback_host(host))

    # ----- errors ---------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return JSONResponse(ApiError(400, f"the request body is not valid JSON: {errors[0].get('msg')}").body(),
                                status_code=400)
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and errors[0].get("type") in (
                "model_attributes_type", "dict_type"):
            message = "the request body must be a JSON object (send Content-Type: application/json)"
            return JSONResponse(ApiError(400, message).body(), status_code=400)
        parts, first_param = [], None
        errors = readable(errors)
        for err in errors[:MAX_REPORTED_ERRORS]:
            param = err["param"]
            first_param = first_param or param
            if err.get("type") == "extra_forbidden":
                parts.append(f"unknown field '{param}'")
            elif err.get("type") == "missing":
                parts.append(f"missing field '{param}'")
            else:
                parts.append(f"{param or 'body'}: {err.get('msg')}")
        if len(errors) > MAX_REPORTED_ERRORS:
            parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more")
        body = ApiError(422, "invalid request: " + "; ".join(parts), param=first_param or None).body()
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, code = f"no such route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:  # e.g. a body FastAPI could not parse (JSON nested too deeply)
            message, code = (exc.detail if isinstance(exc.detail, str) else "the request failed"), None
        return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(ApiError(500, "internal server error; the details are in the server log",
                                     kind="server_error").body(), status_code=500)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: the connection is closed

    def check_model(requested: str) -> None:
        if requested != name:
            raise ApiError(404, f"model '{requested}' is not served here; this server serves '{name}'",
                           param="model", code="model_not_found")

    # ----- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request):
        if api_key and not key_matches(request.headers.get("authorization", ""), api_key):
            return {"status": "ok"}  # open to load balancers: nothing about the model or the machine
        return {"status": "ok", "served_model": name, **engine.describe(), **scheduler.state()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "zhiling",
                                            "zhiling": engine.describe()}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        check_model(model_id)
        return {"id": name, "object": "model", "created": created, "owned_by": "zhiling"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = body.generation(defaults)
        try:
            chat = ChatRequest.from_messages(body.message_dicts())
        except ZhilingError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return await answer(chat, params, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = body.generation(defaults)
        return await answer(TextPrompt(body.prompt_text()), params, body, request, chat=False)

    # ----- generation -----------------------------------------------------------------------------------------
    def check_request(prompt: ChatRequest | TextPrompt, params: GenerationConfig) -> int:
        try:
            engine.check_params(params)
            count = engine.count_tokens(prompt)
            engine.check_fits(count, params)
        except PromptTooLongError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except ZhilingError as exc:
            raise ApiError(400, str(exc)) from None
        return count

    async def take_slot(request: Request) -> None:
        """Wait for a slot; leave the queue at once if the client disconnects meanwhile (ClientGone)."""
        acquire = asyncio.ensure_future(scheduler.acquire())
        gone = asyncio.ensure_future(wait_disconnected(request))
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.cancelled():
            raise ClientGone
        try:
            acquire.result()
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", kind="server_busy", code="shutting_down") from None
        except QueueFull:
            raise ApiError(503, f"the server is busy ({scheduler.running} running, {scheduler.waiting} waiting); "
                                f"retry later", kind="server_busy", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    async def wait_disconnected(request: Request) -> None:
        """Returns when the client has gone (the body is read already: the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.1)  # a server that repeats the end of the body: look again shortly

    async def answer(prompt, params: GenerationConfig, body, request: Request, chat: bool):
        await asyncio.to_thread(check_request, prompt, params)  # tokenizing a huge prompt takes a while
        await take_slot(request)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = AsyncTextStream(engine, prompt, params, submit=scheduler.submit)
            events = stream_events(stream, ident, chat, include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        cancel = threading.Event()
        future = scheduler.submit(lambda: engine.generate([prompt], params, cancel)[0], cancel)
        result = await wait_watching(future, request, cancel)
        if result.finish_reason == FINISH_CANCELLED and scheduler.stopping:
            raise ApiError(503, SHUTTING_DOWN, kind="server_busy", code="shutting_down")
        return JSONResponse(completion_body(result, ident, chat))

    async def wait_watching(future: asyncio.Future, request: Request, cancel: threading.Event) -> Result:
        """Wait for a non-streamed answer; cancel it if the client goes away meanwhile (or the wait is
        cancelled: the server is shutting down)."""
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    cancel.set()
        finally:
            if not future.done():
                cancel.set()
        try:
            return future.result()
        except ZhilingError as exc:
            raise ApiError(400, str(exc)) from None
        except Exception:  # noqa: BLE001 - logged here, answered without internals
            log.exception("generation failed")
            raise ApiError(500, GENERATION_FAILED, kind="server_error", code="generation_failed") from None

    def completion_body(result: Result, ident: str, chat: bool) -> dict:
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.total_tokens}
        reason = result.finish_reason if result.finish_reason in ("stop", "length") else "stop"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": reason}
            return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason}
        return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [choice], "usage": usage}

    def chunk(ident: str, chat: bool, text: str | None, reason: str | None, first: bool = False,
              usage: dict | None = None) -> str:
        now = int(time.time())
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
            payload = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": name,
                       "choices": choices if usage is None else []}
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]
            payload = {"id": ident, "object": "text_completion", "created": now, "model": name,
                       "choices": choices if usage is None else []}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream_events(stream: AsyncTextStream, ident: str, chat: bool,
                            include_usage: bool) -> AsyncIterator[str]:
        try:
            yield chunk(ident, chat, "" if chat else None, None, first=True)
            try:
                async for delta in stream:
                    yield chunk(ident, chat, delta, None)
            except Exception as exc:  # noqa: BLE001 - the status line is sent already: report in the stream
                if isinstance(exc, ZhilingError):
                    message = str(exc)
                else:
                    log.error("streamed generation failed", exc_info=exc)
                    message = GENERATION_FAILED
                error = ApiError(500, message, kind="server_error", code="generation_failed").body()
                yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
            else:
                result = stream.result
                if result.finish_reason == FINISH_CANCELLED and scheduler.stopping:
                    error = ApiError(503, SHUTTING_DOWN, kind="server_busy", code="shutting_down").body()
                    yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                reason = result.finish_reason if result.finish_reason in ("stop", "length") else "stop"
                yield chunk(ident, chat, None, reason)
                if include_usage:
                    yield chunk(ident, chat, None, None, usage={
                        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                        "total_tokens": result.total_tokens})
            yield "data: [DONE]\n\n"
        finally:
            stream.close()  # a client gone mid-stream: the generation stops and its slot is freed

    return app
