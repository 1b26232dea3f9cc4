"""One run per output folder: an exclusive ``flock`` on ``OUTPUT/.zhiling.lock`` for as long as a run trains there.

The kernel drops the lock when its holder dies, however it dies (kill -9 included), so a killed run never leaves a
lock behind: the next run simply takes it. The file itself stays (deleting a lock file while another process waits
on it would let two runs in); it holds the pid and start time of the last holder for the refusal message. Where
``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from zhiling.errors import ZhilingError

LOCK_FILE = ".zhiling.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock, or raises ZhilingError when another run holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.handle: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None or self.handle is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(handle)
            os.close(handle)
            raise ZhilingError(f"output.dir {self.folder} is in use by another zhiling train{holder}; wait for it "
                               f"to finish, stop it (Ctrl-C or SIGTERM saves a checkpoint first), or choose another "
                               f"output.dir") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            os.close(self.handle)
            self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(handle: int) -> str:
    try:
        info = json.loads(os.pread(handle, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict) or "pid" not in info:
        return ""
    return f" (pid {info['pid']} on {info.get('host', '?')}, since {info.get('since', '?')})"
