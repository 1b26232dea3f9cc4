"""The server's front door, as one ASGI middleware that runs before any route: the Host header on a loopback bind
(DNS rebinding), the API key on every path but ``/health`` (so a route added later is covered without anyone
remembering to), and the body size (read here, up to the limit, before the app parses anything).

Refusals are answered in the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(header: str) -> str:
    """The name part of a Host header: ``localhost:8000`` -> ``localhost``, ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def key_matches(authorization: str, api_key: str) -> bool:
    """``Authorization: Bearer KEY`` with the right key (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestGuard:
    """ASGI middleware: Host check (when ``check_host``), API key (when ``api_key``; ``open_paths`` are exempt),
    body at most ``max_body_bytes`` (413 otherwise; the app then sees the body as one message)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, check_host: bool,
                 open_paths: frozenset[str] = frozenset({"/health"})):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.check_host = check_host
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.check_host and host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
            return await _reply(send, 400, error_body(
                "this server listens on a loopback address and only answers requests for localhost, 127.0.0.1 "
                "or [::1] (Host header refused)", code="invalid_host"))
        if self.api_key and scope.get("path") not in self.open_paths \
                and not key_matches(headers.get("authorization", ""), self.api_key):
            return await _reply(send, 401, error_body("missing or wrong API key (send Authorization: Bearer KEY)",
                                                      code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
        if scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        too_big = error_body(f"the request body is larger than the server's limit of {self.max_body_bytes} bytes",
                             code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _reply(send, 413, too_big, {"Connection": "close"})
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _reply(send, 413, too_big, {"Connection": "close"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.app(scope, replay, send)


async def _reply(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
