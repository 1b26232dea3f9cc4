"""Where the judge's requests go: which API key may be sent there, whether the link is private, and how the URL is
written down.

An API key is a credential for one service. ``$OPENAI_API_KEY`` is sent only to the official OpenAI endpoint
(``https://api.openai.com/...``) unless the user names the variable for this endpoint (``--api-key-env``), so a
typo in ``--judge-url`` or a borrowed command line cannot hand the key to another server. URLs are written to run
folders, caches and messages without their credentials (``user:password@``, ``?api_key=...`` and the like).
"""

from __future__ import annotations

import os
import re
from typing import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from zhiling.hosts import is_loopback_host

OFFICIAL_HOST = "api.openai.com"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
PLACEHOLDER_KEY = "EMPTY"  # sent when no key is: local OpenAI-compatible servers accept any
REDACTED = "REDACTED"

# query parameters that carry credentials (matched on the name, lower-cased, '-' read as '_')
_SECRET_PARAM = re.compile(r"key|token|secret|passw|pwd|auth|credential|signature|^sig$|^code$")


def is_official_openai(url: str) -> bool:
    """``https://api.openai.com`` on the default port, without credentials in the URL."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme.lower() == "https" and (parts.hostname or "") == OFFICIAL_HOST and port in (None, 443)
            and parts.username is None and parts.password is None)


def redact_url(url: str) -> str:
    """``url`` without user info, fragment or the values of credential-like query parameters."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(name, REDACTED if _SECRET_PARAM.search(name.lower().replace("-", "_")) else value)
                           for name, value in pairs], safe="/:,")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def endpoint_id(url: str) -> str:
    """The endpoint a URL names, for cache keys: redacted, scheme and host lower-cased, no trailing slash."""
    parts = urlsplit(redact_url(url))
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, ""))


def plain_http_warning(url: str, sends_key: bool) -> str | None:
    """A warning when requests to ``url`` would cross the network unencrypted (http to a non-loopback host)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "http" or is_loopback_host(parts.hostname):
        return None
    what = "the API key, prompts and answers" if sends_key else "prompts and answers"
    return (f"{redact_url(url)} is plain http to another host: {what} cross the network unencrypted "
            "(use https unless the network is yours)")


def api_key_for(url: str, key_env: str | None, environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The key to send to ``url`` and a one-line note on which key that is (or why none).

    ``key_env`` is the variable the user named (``--api-key-env``), or None. Without it only the official OpenAI
    endpoint gets ``$OPENAI_API_KEY``; any other URL gets no key.
    """
    environ = os.environ if environ is None else environ
    shown = redact_url(url)
    if key_env:
        key = environ.get(key_env) or None
        return key, (f"sending ${key_env} to {shown}" if key else
                     f"${key_env} is not set; sending no API key to {shown}")
    if is_official_openai(url):
        key = environ.get(DEFAULT_KEY_ENV) or None
        return key, (f"sending ${DEFAULT_KEY_ENV} to {shown}" if key else
                     f"${DEFAULT_KEY_ENV} is not set; sending no API key to {shown}")
    if environ.get(DEFAULT_KEY_ENV):
        return None, (f"not sending ${DEFAULT_KEY_ENV} to {shown}: it is not the official OpenAI endpoint "
                      f"(https://{OFFICIAL_HOST}); name the variable holding this server's key with --api-key-env "
                      f"VAR (--api-key-env {DEFAULT_KEY_ENV} to send that one)")
    return None, f"sending no API key to {shown} (name one with --api-key-env VAR if the server needs it)"
