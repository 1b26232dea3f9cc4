"""Is a host name or address one that only this machine can reach? Used by the server's exposure and Host-header
checks and by the judge client's plain-http warning, so both draw the line in the same place."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` (and names under ``.localhost``), ``127.0.0.0/8`` and ``::1`` (brackets allowed)."""
    if not host:
        return False
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
