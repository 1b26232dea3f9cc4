"""One run per output folder: an exclusive ``flock`` on ``OUTPUT/.zhiling.lock`` for as long as a run trains there.

The kernel drops the lock when its holder dies, however it dies (kill -9 included), so a killed run never leaves a
lock behind: the next run simply takes it (the file a killed run leaves is only a name). The file holds the pid and
start time of its holder for the refusal message. A run that ends deletes it while still holding the lock; whoever
locks a file checks that it is still the one at that path, and tries again if not, so a deletion never lets two runs
in. A folder the lock created is removed again if the run left nothing in it (a run that failed before it wrote).
Where ``fcntl`` does not exist (Windows) there is no lock.
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
        self.created = False

    def acquire(self) -> "RunLock":
        if fcntl is None or self.handle is not None:
            return self
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created = True
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(handle)
                os.close(handle)
                raise ZhilingError(f"output.dir {self.folder} is in use by another zhiling train{holder}; wait for "
                                   f"it to finish, stop it (Ctrl-C or SIGTERM saves a checkpoint first), or choose "
                                   f"another output.dir") from None
            if _same_file(handle, self.path):
                break
            os.close(handle)  # its holder deleted it as we locked it: lock the file now at the path
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self.path.unlink()  # still locked: a process that opened it meanwhile sees it is gone, and retries
        except OSError:
            pass
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        os.close(self.handle)
        self.handle = None
        if self.created:
            try:
                self.folder.rmdir()  # only if the run left nothing in it
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except OSError:
        return False


def _read_holder(handle: int) -> str:
    try:
        info = json.loads(os.pread(handle, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict) or "pid" not in info:
        return ""
    return f" (pid {info['pid']} on {info.get('host', '?')}, since {info.get('since', '?')})"
