"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health``.

* Auth: with an API key set, every ``/v1`` route needs ``Authorization: Bearer KEY`` (401 otherwise);
  ``/health`` stays open for load balancers.
* Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``: 422 for a body that does not
  match the schema (the message names the field), 400 for a body that is well-formed but cannot be served
  (bad turn order, a prompt over the context, an unsupported option), 404 for an unknown model, 503 with
  ``Retry-After`` when the queue is full.
* Streaming (``"stream": true``) sends ``data: {chunk}`` server-sent events and ends with ``data: [DONE]``.
  A client that disconnects mid-stream cancels its generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from zhiling.config import GenerationConfig
from zhiling.errors import ZhilingError
from zhiling.infer.engine import ChatRequest, Engine, PromptTooLongError, Result, TextPrompt
from zhiling.serve.scheduler import QueueFull, Scheduler
from zhiling.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest
from zhiling.serve.streaming import AsyncTextStream

RETRY_AFTER_SECONDS = 1


def served_name(engine: Engine) -> str:
    """The model id clients use: the adapter's folder name, else the model's."""
    from pathlib import Path

    source = engine.adapter_id or engine.model_id
    name = Path(source.rstrip("/")).name if source else "zhiling"
    return name or "zhiling"


def create_app(engine: Engine, params: GenerationConfig | None = None, *, api_key: str | None = None,
               max_concurrency: int = 1, max_queue: int = 16, model_name: str | None = None):
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
        for err in errors:
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            param = ".".join(loc)
            first_param = first_param or param
            if err.get("type") == "extra_forbidden":
                parts.append(f"unknown field '{param}'")
            elif err.get("type") == "missing":
                parts.append(f"missing field '{param}'")
            else:
                parts.append(f"{param or 'body'}: {err.get('msg')}")
        body = ApiError(422, "invalid request: " + "; ".join(parts), param=first_param or None).body()
        return JSONResponse(body, status_code=422)

    # ----- auth -----------------------------------------------------------------------------------------------
    async def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(requested: str) -> None:
        if requested != name:
            raise ApiError(404, f"model '{requested}' is not served here; this server serves '{name}'",
                           param="model", code="model_not_found")

    # ----- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "served_model": name, **engine.describe(), **scheduler.state()}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "zhiling",
                                            "zhiling": engine.describe()}]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(check_key)])
    async def model(model_id: str):
        check_model(model_id)
        return {"id": name, "object": "model", "created": created, "owned_by": "zhiling"}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = body.generation(defaults)
        try:
            chat = ChatRequest.from_messages(body.message_dicts())
        except ZhilingError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return await answer(chat, params, body, request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
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

    async def take_slot() -> None:
        try:
            await scheduler.acquire()
        except QueueFull:
            raise ApiError(503, f"the server is busy ({scheduler.running} running, {scheduler.waiting} waiting); "
                                f"retry later", kind="server_busy", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    async def answer(prompt, params: GenerationConfig, body, request: Request, chat: bool):
        check_request(prompt, params)
        await take_slot()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = AsyncTextStream(engine, prompt, params, submit=scheduler.submit)
            events = stream_events(stream, ident, chat, include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        cancel = threading.Event()
        future = scheduler.submit(lambda: engine.generate([prompt], params, cancel)[0])
        result = await wait_watching(future, request, cancel)
        return JSONResponse(completion_body(result, ident, chat))

    async def wait_watching(future: asyncio.Future, request: Request, cancel: threading.Event) -> Result:
        """Wait for a non-streamed answer; cancel it if the client goes away meanwhile."""
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                try:
                    return future.result()
                except ZhilingError as exc:
                    raise ApiError(400, str(exc)) from None
            if await request.is_disconnected():
                cancel.set()

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
                message = str(exc) if isinstance(exc, ZhilingError) else f"generation failed: {exc!r}"
                yield f"data: {json.dumps(ApiError(500, message, kind='server_error').body())}\n\n"
            else:
                result = stream.result
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
