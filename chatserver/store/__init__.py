"""The store interface: what the chat core needs from durable storage.

Implementations (SQLite, Postgres) live beside this module and share their SQL
in ``sql.py``; the core only ever sees ``Store``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred


class StoreUnavailable(Exception):
    """The store cannot take or serve this request now; the client may retry later."""


class SchemaError(Exception):
    """The database's schema is not the one this server knows; it must not run against it."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    room: str
    id: int
    user: str
    body: str
    ts: int


class Store(Protocol):
    """Durable, per-room ordered message storage.

    Ids in a room start at 1, have no gaps and increase in commit order, even with
    several writers; ``append`` fires only once the message is committed.
    """

    def append(self, room: str, user: str, body: str) -> Deferred[StoredMessage]: ...

    def last_id(self, room: str) -> Deferred[int | None]: ...

    def history(
        self, room: str, before: int | None, after: int | None, limit: int
    ) -> Deferred[tuple[list[StoredMessage], bool]]: ...

    def queue_depth(self) -> int: ...

    def close(self) -> Deferred[None]: ...
