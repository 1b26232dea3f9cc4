"""SIGTERM and Ctrl-C (SIGINT) stop a run at the next step boundary, after a checkpoint is saved.

``with StopRequests(say) as stop:`` installs the handlers (in the main thread only; a run in another thread keeps
Python's defaults) and restores the previous ones on exit. The first signal only sets ``stop.signum``; the loop reads
it after each step (summed over all processes, so every rank stops at the same step), saves and raises RunStopped.
A second signal acts at once: SIGINT raises KeyboardInterrupt, SIGTERM terminates the process (the last complete
checkpoint is still there).
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    def __init__(self, say=None):
        self.say = say
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.say is not None:
            self.say(f"{signal.Signals(signum).name}: stopping after this step, once a checkpoint is saved "
                     f"(send it again to stop at once)")

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
