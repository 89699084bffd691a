"""The server's configuration: one frozen object, built once at start.

Sources, later ones winning: built-in defaults, a TOML file (``--config``),
``CHATSERVER_<KEY>`` environment variables, the command line. Every setting is
checked before anything starts, so a typo stops the server with a message that
names the setting instead of surfacing later as a strange failure.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "CHATSERVER_"
MIN_SECRET_BYTES = 32  # HS256's own key size; an API key as hard to guess


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names it."""


def _default_listen() -> tuple[str, ...]:
    # PaaS hosts hand the port over in $PORT. A deep backlog: after a deploy,
    # thousands of clients reconnect at once (Twisted's default is 50).
    return (f"tcp:{os.environ.get('PORT') or 8080}:backlog=1024",)


def _setting(default: Any, doc: str, **extra: Any) -> Any:
    meta = {"doc": doc, **extra}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Every setting of the server; see ``config/chatserver.toml`` for a commented example."""

    listen: tuple[str, ...] = _setting(
        _default_listen,
        "Twisted endpoint strings to serve on (WebSocket at /ws, HTTP beside it).",
    )
    auth: str = _setting("none", "'none' (?user=NAME, for development) or 'token' (?token=JWT).")
    jwt_secret: str | None = _setting(None, "HS256 secret for auth = 'token'.")
    jwt_public_key_file: str | None = _setting(
        None, "PEM public key for RS256/ES256 tokens (auth = 'token'), instead of a secret."
    )
    jwt_leeway: float = _setting(30.0, "Seconds of clock skew allowed on exp and nbf.")
    jwt_require_exp: bool = _setting(
        True,
        "auth = 'token': refuse tokens without exp (one without would be valid for ever,"
        " and its connection never ended).",
    )
    jwt_issuer: str | None = _setting(
        None, "auth = 'token': when set, a token's iss must equal it; unset = iss not checked."
    )
    jwt_audience: str | None = _setting(
        None,
        "auth = 'token': when set, a token's aud must be or contain it. Unset: tokens that"
        " carry any aud are refused (they were issued for some other service).",
    )
    admin_api_key: str | None = _setting(
        None, "Bearer key for the admin HTTP API at /admin; unset = no admin API."
    )
    admin_listen: tuple[str, ...] = _setting(
        (), "Endpoints that serve the admin API; empty = the main port serves it."
    )
    admin_auth_failures: int = _setting(
        5,
        "Wrong admin API keys one client address (IPv6: one /64) may send within"
        " admin_auth_lockout seconds; then it gets 429, whatever the key, for"
        " admin_auth_lockout seconds.",
    )
    admin_auth_lockout: float = _setting(
        60.0, "Seconds that count wrong admin keys, and that a client address stays locked out."
    )
    allowed_origins: tuple[str, ...] = _setting(
        ("*",),
        "Origins allowed to open a WebSocket (scheme://host[:port], * wildcards);"
        " requests without Origin are allowed.",
    )
    trusted_proxies: tuple[str, ...] = _setting(
        (), "Proxy addresses or networks whose X-Forwarded-For is believed."
    )
    max_connections_per_user: int = _setting(20, "Open WebSockets one user may have.")
    max_connections_per_ip: int = _setting(
        200,
        "Connections from one client address, in one count: WebSockets (from their"
        " handshake's admission) and plain HTTP requests (from their head until their"
        " answer is written). One more gets 429.",
    )
    handshake_timeout: float = _setting(
        5.0,
        "Seconds from connecting (or the previous answer) to a complete request head,"
        " and for a WebSocket upgrade on to the open WebSocket.",
    )
    http_request_timeout: float = _setting(
        30.0,
        "Seconds a plain HTTP request may take as a whole, from connecting (or the"
        " previous answer) to our answer written: body and answer included, however"
        " steadily the client trickles. Its head must still come within handshake_timeout.",
    )
    max_request_body: int = _setting(
        1048576,
        "Largest HTTP request body, in bytes, held in memory (never spooled to disk); only"
        " the admin API's POSTs take one. Larger (by Content-Length, or as a chunked"
        " body streams) gets 413 before the rest is read; elsewhere any body gets 413.",
    )
    rate_limit: float = _setting(20.0, "Frames per second a connection may send, sustained.")
    rate_burst: int = _setting(40, "Frames a connection may send at once above rate_limit.")
    rate_limit_strikes: int = _setting(
        20, "Rate-limited frames in a row before the connection is closed with 1008."
    )
    history_bytes_per_second: int = _setting(
        1048576,
        "Bytes of history pages a connection may read per second, sustained (a frame"
        " costs the same whatever page it asks for; this bounds what the pages carry).",
    )
    history_burst_bytes: int = _setting(
        4194304,
        "Bytes of history pages a connection may read at once above"
        " history_bytes_per_second (catching up on many rooms after a reconnect). A page"
        " is never cut: one asked for with budget left is sent whole, the next waits.",
    )
    ping_interval: float = _setting(
        30.0, "Seconds between WebSocket pings to each client (under proxies' idle timeouts)."
    )
    ping_timeout: float = _setting(
        20.0, "Seconds a client has to answer a ping before it is dropped."
    )
    drain_seconds: float = _setting(
        10.0, "On shutdown, WebSockets are closed (1001) spread over this many seconds."
    )
    metrics_listen: tuple[str, ...] = _setting(
        (), "Endpoints that serve /metrics; empty = the main port serves it."
    )
    max_send_buffer: int = _setting(
        1048576, "Bytes queued for a client that does not read before it is dropped."
    )
    slow_client_timeout: float = _setting(
        30.0, "Seconds a client may leave its queue unread before it is dropped."
    )
    send_buffer_grace: float = _setting(
        1.0,
        "Seconds a client's queue may stay over max_send_buffer (a burst) before it is"
        " dropped; 0 drops at once.",
    )
    database_url: str = _setting(
        "sqlite:///chatserver.sqlite3",
        "sqlite:///PATH (relative to the working directory) or postgresql://...",
    )
    db_pool_size: int = _setting(4, "Database connections (fixed; SQLite always uses 1).")
    store_writers: int = _setting(
        1,
        "Transactions storing messages at once, out of db_pool_size; the rest serve reads."
        " Raise it when commits wait on a slow disk or a distant database.",
    )
    redis_url: str | None = _setting(None, "redis:// or rediss:// URL; unset = in-memory broker.")
    redis_cluster: tuple[str, ...] = _setting(
        (),
        "Seed node URLs of a Redis Cluster (redis:// or rediss://, comma-separated in the"
        " environment): rooms use sharded pub/sub. Exclusive with redis_url.",
    )
    redis_cluster_refresh: float = _setting(
        30.0,
        "Seconds between slot-map refreshes from the cluster (also refreshed on MOVED, ASK"
        " and lost connections).",
    )
    redis_tls_ca_file: str | None = _setting(
        None, "PEM CA bundle to verify the Redis server (rediss://); unset = system CAs."
    )
    redis_tls_cert_file: str | None = _setting(None, "PEM client certificate for Redis TLS.")
    redis_tls_key_file: str | None = _setting(None, "PEM key of redis_tls_cert_file.")
    redis_publishers: int = _setting(2, "Redis connections used to publish (one more subscribes).")
    redis_keepalive: float = _setting(
        10.0, "Seconds between PINGs on every Redis connection (keep under Redis' timeout)."
    )
    redis_timeout: float = _setting(
        5.0, "Seconds a Redis reply may take before the connection is dropped and remade."
    )
    redis_republish_max: int = _setting(
        10000, "Messages kept to publish again once Redis is back after an outage."
    )
    max_body_chars: int = _setting(4000, "Longest message body, in characters.")
    max_frame_bytes: int = _setting(65536, "Largest WebSocket message accepted, in bytes.")
    max_rooms_per_connection: int = _setting(100, "Rooms one connection may be joined to.")
    max_bad_frames: int = _setting(
        20, "Bad frames tolerated on one connection before it is closed with 1008."
    )
    unread_max: int = _setting(
        1000, "Most unread messages counted for 'joined' (the count stops there)."
    )
    presence_list_max: int = _setting(
        100,
        "Most names in a presence list (joined's online, a presence answer); the count is exact.",
    )
    presence_timeout: float = _setting(
        10.0,
        "Seconds after which an instance that stopped answering has its users reported offline.",
    )
    presence_burst: int = _setting(
        50,
        "Presence events per room per second a watcher gets one by one; past it, one list"
        " at the end of the second instead.",
    )
    typing_interval: float = _setting(
        2.0, "Seconds between two typing relays of one user in one room; extras are dropped."
    )
    store_queue_max: int = _setting(
        10000, "Messages waiting to be stored before sends get 'unavailable'."
    )
    store_batch_max: int = _setting(500, "Most messages written in one transaction.")
    store_gather: float = _setting(
        0.003,
        "Seconds a transaction storing messages starts after the previous one started, at"
        " the soonest, so that messages gather into fewer transactions; 0 = at once.",
    )
    gap_timeout: float = _setting(
        0.5, "Seconds to wait for a missing message id before reading it from the store."
    )
    workers: int = _setting(
        1,
        "Worker processes that all serve the listen ports (SO_REUSEPORT); 'auto' = the CPUs"
        " this process may run on. More than 1 needs redis_url or redis_cluster, and Postgres.",
    )
    fast_paths: bool = _setting(
        True,
        "Take the shortcuts through Twisted's, Autobahn's and txredisapi's internals"
        " (checked at start; each falls back to the public API if its library changed)."
        " false: the public API everywhere, slower.",
    )

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:")


_RANGES: dict[str, tuple[float, float]] = {
    "db_pool_size": (1, 1000),
    "store_writers": (1, 1000),
    "max_body_chars": (1, 1_000_000),
    "max_frame_bytes": (256, 64 * 1024 * 1024),
    "max_rooms_per_connection": (1, 100_000),
    "max_bad_frames": (1, 1_000_000),
    "store_queue_max": (1, 10_000_000),
    "store_batch_max": (1, 100_000),
    "unread_max": (1, 1_000_000),
    "typing_interval": (0, 3600),
    "store_gather": (0, 1),
    "presence_list_max": (0, 100_000),
    "presence_timeout": (1, 3600),
    "presence_burst": (1, 1_000_000),
    "gap_timeout": (0.001, 60),
    "redis_publishers": (1, 64),
    "jwt_leeway": (0, 3600),
    "admin_auth_failures": (1, 1_000_000),
    "admin_auth_lockout": (1, 86400),
    "max_connections_per_user": (1, 1_000_000),
    "max_connections_per_ip": (1, 10_000_000),
    "handshake_timeout": (0.1, 600),
    "http_request_timeout": (0.1, 3600),
    "max_request_body": (1024, 64 * 1024 * 1024),
    "rate_limit": (0.01, 1_000_000),
    "rate_burst": (1, 1_000_000),
    "rate_limit_strikes": (1, 1_000_000),
    "history_bytes_per_second": (1024, 1 << 34),
    "history_burst_bytes": (1024, 1 << 36),
    "max_send_buffer": (1024, 1 << 34),
    "slow_client_timeout": (0.1, 3600),
    "send_buffer_grace": (0, 60),
    "ping_interval": (0, 86400),
    "ping_timeout": (1, 3600),  # pings are checked on a shared tick of up to 1 s
    "drain_seconds": (0, 3600),
    "redis_keepalive": (0.05, 3600),
    "redis_timeout": (0.05, 600),
    "redis_republish_max": (0, 10_000_000),
    "redis_cluster_refresh": (0.1, 86400),
    "workers": (1, 1024),
}


def _validate(c: Config) -> None:
    for name, (lo, hi) in _RANGES.items():
        value = getattr(c, name)
        if not lo <= value <= hi:
            raise ConfigError(f"{name} = {value!r}: must be between {lo:g} and {hi:g}")
    if c.auth not in ("none", "token"):
        raise ConfigError(f"auth = {c.auth!r}: must be 'none' or 'token'")
    if c.auth == "token" and not (c.jwt_secret or c.jwt_public_key_file):
        raise ConfigError("auth = 'token' needs jwt_secret or jwt_public_key_file")
    if c.jwt_secret and c.jwt_public_key_file:
        raise ConfigError("give jwt_secret or jwt_public_key_file, not both")
    for name in ("jwt_secret", "admin_api_key"):
        secret = getattr(c, name)
        if secret and len(secret.encode()) < MIN_SECRET_BYTES:
            # The length only: a secret must never reach a log.
            raise ConfigError(
                f"{name}: {len(secret.encode())} bytes is too short; use at least"
                f" {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`)"
            )
    for proxy in c.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies: {proxy!r} is not an address or network") from None
    for origin in c.allowed_origins:
        if origin != "*" and "://" not in origin:
            raise ConfigError(f"allowed_origins: {origin!r} must look like https://host[:port]")
    if not c.listen:
        raise ConfigError("listen: at least one endpoint is needed")
    if c.store_writers > c.db_pool_size:
        raise ConfigError(
            f"store_writers = {c.store_writers}: must not exceed db_pool_size ({c.db_pool_size})"
        )
    scheme = urlsplit(c.database_url).scheme
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(
            f"database_url = {c.database_url!r}: must start with sqlite:/// or postgresql://"
        )
    if c.is_sqlite and not c.database_url.startswith("sqlite:///"):
        raise ConfigError(f"database_url = {c.database_url!r}: write sqlite:///PATH")
    if c.redis_url is not None:
        from chatserver.broker.redis_url import RedisURLError, parse_redis_url

        try:
            parse_redis_url(c.redis_url)
        except RedisURLError as e:
            raise ConfigError(f"redis_url: {e}") from None
    if c.redis_cluster:
        _validate_cluster(c)
    if c.workers > 1:
        if c.redis_url is None and not c.redis_cluster:
            raise ConfigError(
                f"workers = {c.workers}: the workers need a broker that links them;"
                " set redis_url or redis_cluster (or use workers = 1)"
            )
        if c.is_sqlite:
            raise ConfigError(
                f"workers = {c.workers}: SQLite belongs to one process; use Postgres"
                " (database_url = postgresql://...) with several workers, or workers = 1"
            )
    if (c.redis_tls_cert_file is None) != (c.redis_tls_key_file is None):
        raise ConfigError("redis_tls_cert_file and redis_tls_key_file go together")
    for name in (
        "redis_tls_ca_file",
        "redis_tls_cert_file",
        "redis_tls_key_file",
        "jwt_public_key_file",
    ):
        path = getattr(c, name)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{name} = {path!r}: no such file")
    if c.jwt_public_key_file is not None:
        from chatserver.auth import KeyFileError, load_public_key

        try:
            load_public_key(c.jwt_public_key_file)
        except KeyFileError as e:
            raise ConfigError(f"jwt_public_key_file = {c.jwt_public_key_file!r}: {e}") from None


def _validate_cluster(c: Config) -> None:
    from chatserver.broker.redis_url import RedisURLError, parse_redis_url

    if c.redis_url is not None:
        raise ConfigError("give redis_url or redis_cluster, not both")
    schemes = set()
    for url in c.redis_cluster:
        try:
            address = parse_redis_url(url)
        except RedisURLError as e:
            raise ConfigError(f"redis_cluster: {e}") from None
        if address.db != 0:
            raise ConfigError(f"redis_cluster: {url!r}: a cluster has only database 0")
        schemes.add(address.tls)
    if len(schemes) > 1:
        raise ConfigError("redis_cluster: use rediss:// for every seed or for none")


def cpus_available() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


SETTINGS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, raw: Any) -> Any:
    """Turn a value from TOML, the environment or the command line into the field's type."""
    kind = SETTINGS[name].type
    try:
        if kind == "tuple[str, ...]":
            if isinstance(raw, str):
                raw = [p for p in raw.replace(",", " ").split() if p]
            if not isinstance(raw, list | tuple) or not all(isinstance(p, str) for p in raw):
                raise TypeError
            return tuple(raw)
        if name == "workers" and isinstance(raw, str) and raw.strip().lower() == "auto":
            return cpus_available()
        if kind == "int":
            if isinstance(raw, bool):
                raise TypeError
            if isinstance(raw, float) and not raw.is_integer():
                raise TypeError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise TypeError
        if kind == "str | None":
            if raw is None or raw == "":
                return None
            if not isinstance(raw, str):
                raise TypeError
            return raw
        if not isinstance(raw, str):
            raise TypeError
        return raw
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {raw!r}: expected {kind}") from None


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config from file, environment and command-line overrides, in that order."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        for key, raw in data.items():
            if key not in SETTINGS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw)
    environ = os.environ if environ is None else environ
    for key in SETTINGS:
        if env_name(key) in environ:
            values[key] = _coerce(key, environ[env_name(key)])
    for key, raw in (overrides or {}).items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown setting {key!r}")
        if raw is not None:
            values[key] = _coerce(key, raw)
    return Config(**values)


def describe() -> list[tuple[str, str]]:
    """(name, doc) of every setting, in declaration order: for --help."""
    return [(name, f.metadata["doc"]) for name, f in SETTINGS.items()]
