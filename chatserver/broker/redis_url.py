"""Parse redis:// and rediss:// URLs (user, password, host, port, db)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


class RedisURLError(ValueError):
    pass


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    tls: bool
    username: str | None
    password: str | None


def parse_redis_url(url: str) -> RedisAddress:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(f"{url!r} must start with redis:// or rediss://")
    if not parts.hostname:
        raise RedisURLError(f"{url!r} has no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise RedisURLError(f"{url!r} has a bad port") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise RedisURLError(f"{url!r}: the path must be a database number")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path) if path else 0,
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
