"""A tiny OpenAI-compatible chat-completions server for judge tests (http.server in a thread, 127.0.0.1, free port).

``respond(request_body) -> str | tuple[int, dict]`` scripts the answers: a string becomes the assistant message,
a (status, body) tuple an HTTP error. Every request body is kept in ``server.requests`` and its headers (names
lower-cased) in ``server.headers``. Requests without ``Authorization: Bearer <key>`` get 401, unless ``key`` is None.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

ANSWER = re.compile(r"\[回答 ([A-Z])\]\n(.*?)\n\[回答 \1 结束\]", re.DOTALL)


def answers_in(body: dict) -> dict[str, str]:
    """label -> answer text, read back from the judge prompt the client sent."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return dict(ANSWER.findall(user))


class JudgeServer:
    def __init__(self, respond: Callable[[dict], "str | tuple[int, dict]"], key: str | None = "test-key"):
        self.respond = respond
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with server._lock:
                    server.requests.append(body)
                    server.headers.append({name.lower(): value for name, value in self.headers.items()})
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                    return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                answer = server.respond(body)
                if isinstance(answer, tuple):
                    return self._send(*answer)
                self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                                 "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
