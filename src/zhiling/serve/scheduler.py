"""Admission for the server: at most ``max_concurrency`` generations run, at most ``max_queue`` wait; the next
request is refused (the API answers 503 with Retry-After) instead of piling up without bound.

A slot is taken in the request handler and given back when the worker thread running the generation has ended,
so a client that goes away frees its slot as soon as its generation stops (the handler sets its cancel event).
A request still waiting for a slot leaves the queue as soon as its waiting is cancelled (the client went away).
``stop_all`` (server shutdown) cancels every generation that runs and refuses new ones.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class QueueFull(Exception):
    pass


class ShuttingDown(QueueFull):
    pass


class Scheduler:
    def __init__(self, max_concurrency: int = 1, max_queue: int = 16):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be 1 or more")
        if max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        self.completed = 0
        self.stopping = False
        self._semaphore: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="zhiling-serve")
        self._lock = threading.Lock()
        self._cancels: set[threading.Event] = set()

    def state(self) -> dict[str, int]:
        return {"running": self.running, "waiting": self.waiting, "completed": self.completed,
                "max_concurrency": self.max_concurrency, "max_queue": self.max_queue}

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if all are busy; QueueFull when the queue is full too (ShuttingDown
        once the server stops). Cancelling the wait leaves the queue at once."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        if self.stopping:
            raise ShuttingDown
        if self.running + self.waiting >= self.max_concurrency + self.max_queue:
            raise QueueFull
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self.completed += 1
        assert self._semaphore is not None
        self._semaphore.release()

    def submit(self, work: Callable[[], Any], cancel: threading.Event | None = None) -> asyncio.Future:
        """Run ``work`` in a worker thread in the slot already taken; the slot is given back when it ends.
        ``cancel`` (the generation's cancel event) is set by ``stop_all``."""
        loop = asyncio.get_running_loop()
        if cancel is not None:
            with self._lock:
                self._cancels.add(cancel)
                if self.stopping:
                    cancel.set()
        try:
            future = loop.run_in_executor(self._executor, work)
        except BaseException:
            self._forget(cancel)
            self.release()
            raise

        def done(_):
            self._forget(cancel)
            self.release()

        future.add_done_callback(done)
        return future

    def _forget(self, cancel: threading.Event | None) -> None:
        if cancel is not None:
            with self._lock:
                self._cancels.discard(cancel)

    def stop_all(self) -> None:
        """Cancel every running generation and refuse new requests (thread-safe)."""
        with self._lock:
            self.stopping = True
            for cancel in self._cancels:
                cancel.set()

    def shutdown(self) -> None:
        self.stop_all()
        self._executor.shutdown(wait=False, cancel_futures=True)
