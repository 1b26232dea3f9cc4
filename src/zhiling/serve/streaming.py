"""An engine stream for asyncio code (the API server, the web UI): the engine runs in a worker thread, deltas
arrive through an ``asyncio.Queue``. Leaving the ``async for`` early, or the task being cancelled (a client gone, a
Stop button), sets the cancel event, so the generation stops and its thread ends."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable

from zhiling.config import GenerationConfig
from zhiling.infer.engine import ChatRequest, Engine, Result, TextPrompt

_DELTA, _DONE, _ERROR = "delta", "done", "error"


class AsyncTextStream:
    """Start with ``AsyncTextStream(engine, request, params)`` inside a running loop; iterate with ``async for``.

    ``submit(work, cancel)`` runs the worker function (default: the loop's thread pool); the server passes its
    scheduler's, so the slot is held until the worker ends (and shutdown can set ``cancel``). ``result`` is set once
    the stream is exhausted."""

    def __init__(self, engine: Engine, request: ChatRequest | TextPrompt, params: GenerationConfig,
                 submit: Callable[[Callable[[], None], threading.Event], Any] | None = None):
        self.cancel = threading.Event()
        self.result: Result | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._engine, self._request, self._params = engine, request, params
        if submit is None:
            self._loop.run_in_executor(None, self._work)
        else:
            submit(self._work, self.cancel)

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (shutting down): nobody is listening any more
            self.cancel.set()

    def _work(self) -> None:
        try:
            stream = self._engine.stream(self._request, self._params, self.cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the async side
            self._put((_ERROR, exc))
            return
        try:
            for delta in stream:
                self._put((_DELTA, delta))
            self._put((_DONE, stream.result))
        except BaseException as exc:  # noqa: BLE001
            self._put((_ERROR, exc))
        finally:
            stream.close()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                kind, value = await self._queue.get()
                if kind == _DELTA:
                    if value:
                        yield value
                elif kind == _DONE:
                    self.result = value
                    return
                else:
                    raise value
        finally:
            self.cancel.set()

    def close(self) -> None:
        self.cancel.set()
