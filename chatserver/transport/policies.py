"""Who may open a WebSocket, and which address a connection counts as."""

from __future__ import annotations

import ipaddress
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(origin: str) -> str | None:
    """scheme://host:port, with the default port made explicit."""
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.hostname:
        return None
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return f"{parts.scheme}://{parts.hostname}:{port}"


class OriginPolicy:
    """Cross-site WebSocket hijacking: only listed browser origins may connect."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._any = "*" in patterns
        self._patterns = []
        for p in patterns:
            if p == "*":
                continue
            scheme, _, rest = p.lower().partition("://")
            if ":" not in rest.rsplit("]", 1)[-1]:
                rest = f"{rest}:{_DEFAULT_PORTS.get(scheme, '*')}"
            self._patterns.append(f"{scheme}://{rest}")

    def allows(self, origin: str | None) -> bool:
        if origin is None or self._any:
            return True  # non-browser clients send no Origin
        key = _origin_key(origin)
        return key is not None and any(fnmatchcase(key, p) for p in self._patterns)


class ProxyPolicy:
    """Which address a connection counts as: the peer, or X-Forwarded-For from a trusted proxy."""

    def __init__(self, trusted: tuple[str, ...]) -> None:
        self._networks = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        if not forwarded_for or not self._trusted(peer):
            return peer
        # Right to left: the first address not of our own proxies is the client.
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer
