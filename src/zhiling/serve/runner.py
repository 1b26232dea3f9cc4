"""Run an ASGI app with uvicorn: in the foreground (``zhiling serve``) or in a background thread (tests, benches).

Shutdown (Ctrl-C, SIGTERM, leaving ``ServerThread``) first calls the app's ``state.stop_generations`` when it has
one, so answers in flight end at once (as cancelled) instead of holding the server until they finish; uvicorn then
gives open connections at most ``GRACE_SECONDS`` before it cancels them.
"""

from __future__ import annotations

import threading
import time

GRACE_SECONDS = 3


def _server(app, host: str, port: int, log_level: str):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            stop = getattr(getattr(app, "state", None), "stop_generations", None)
            if stop is not None:
                stop()
            await super().shutdown(sockets=sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=GRACE_SECONDS))


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    try:
        _server(app, host, port, log_level).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled (as uvicorn.run does, end quietly)
        pass


class ServerThread:
    """``with ServerThread(app) as server: ... server.url ...`` (port 0 picks a free port)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.server = _server(app, host, port, log_level)
        self.thread = threading.Thread(target=self.server.run, name="zhiling-uvicorn", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
