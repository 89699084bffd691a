"""The store interface: what the chat core needs from durable storage.

Implementations (SQLite, Postgres) live beside this module and share their SQL
in ``sql.py``; the core only ever sees ``Store``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred


class StoreUnavailable(Exception):
    """The store cannot take or serve this request now; the client may retry later."""


class ChangeRefused(Exception):
    """An edit or delete the store refuses; the message says why, for the client."""


class MessageNotFound(ChangeRefused):
    """The target does not exist, is deleted, or is itself an edit or a delete."""


class NotAuthor(ChangeRefused):
    """Only a message's author may change it (and the admin API may delete it)."""


class NotYetWritten(ChangeRefused):
    """The target's id is past the room's last id: a client's mistake, not a race."""


class SchemaError(Exception):
    """The database's schema is not the one this server knows; it must not run against it."""


EVERYWHERE = ""  # the room of a global ban

# Called once per finished write batch with a function that fires the batch's
# appends, in order: the caller runs it where their results may leave together.
CommitHandler = Callable[[Callable[[], None]], None]


@dataclass(frozen=True, slots=True)
class Access:
    """What decides whether a user may join a room."""

    private: bool
    member: bool
    banned: bool
    # Removed by the admin API and not added again: outranks the token's rooms claim.
    removed: bool = False
    # The user's read marker in the room (None: never read), and how many messages
    # of others after it (edit and delete events and deleted messages not counted),
    # at most the ``unread_max`` asked for.
    last_read: int | None = None
    unread: int = 0


@dataclass(frozen=True, slots=True)
class StoredMessage:
    room: str
    id: int
    user: str
    body: str
    ts: int
    cid: str | None = None  # the client's id of its send (protocol 1.1)
    # An append whose (room, user, cid) was stored before: this is that message.
    duplicate: bool = False
    # An edit or delete event: the id of the message it changes.
    edits: int | None = None
    deletes: int | None = None
    # Read back from history: the ts of the message's last edit; deleted (body "").
    edited: int | None = None
    deleted: bool = False


class Store(Protocol):
    """Durable, per-room ordered message storage.

    Ids in a room start at 1, have no gaps and increase in commit order, even with
    several writers; ``append`` fires only once the message is committed.
    """

    # Counters for metrics.
    batches: int
    stored: int
    failed: int
    rejected: int
    last_batch_size: int
    busy: int  # interactions handed to the pool and not finished

    @property
    def pool_size(self) -> int: ...

    def start(self, on_commit: CommitHandler) -> None:
        """Report each finished write batch to ``on_commit`` (before: appends fire at once)."""

    def append(
        self, room: str, user: str, body: str, cid: str | None = None
    ) -> Deferred[StoredMessage]:
        """Fires once stored. With a ``cid`` that ``room`` and ``user`` already stored
        (now or long ago, from any instance), nothing is stored: it fires with that
        message's id and ts, ``duplicate`` set (the body is this append's: a repeat's
        body is not compared, and a duplicate is acked, never delivered)."""

    def edit(
        self, room: str, user: str, target: int, body: str, cid: str | None = None
    ) -> Deferred[StoredMessage]:
        """Fires with the edit event, stored with the room's next id, once the
        target's body is replaced; fails with a ``ChangeRefused``. A ``cid`` makes
        it idempotent as for ``append``."""

    def delete(
        self, room: str, user: str, target: int, by_admin: bool = False
    ) -> Deferred[StoredMessage]:
        """Fires with the delete event (the room's next id, body "") once the target's
        text and its edits' texts are overwritten; ``user`` must be the author unless
        ``by_admin``. Fails with a ``ChangeRefused``."""

    def last_id(self, room: str) -> Deferred[int | None]: ...

    def history(
        self, room: str, before: int | None, after: int | None, limit: int
    ) -> Deferred[tuple[list[StoredMessage], bool]]: ...

    def access(self, room: str, user: str, unread_max: int = 0) -> Deferred[Access]:
        """What a join needs, in one round trip: whether ``user`` may join ``room``,
        and, with ``unread_max``, where they stopped reading it."""

    def set_read(self, room: str, user: str, id: int) -> Deferred[tuple[int, bool]]:
        """Move ``user``'s read marker in ``room`` forward to ``id``; fires with the
        marker now stored and whether it moved. Fails ``NotYetWritten`` for an id
        past the room's last."""

    def banned_everywhere(self, user: str) -> Deferred[bool]: ...

    def bans_of(self, users: list[str]) -> Deferred[list[tuple[str, str]]]:
        """(room, user) for every ban of these users; room EVERYWHERE is global."""

    def set_room(self, room: str, private: bool) -> Deferred[None]: ...

    def set_member(self, room: str, user: str, member: bool) -> Deferred[None]:
        """Add (a membership row) or remove (a removal, until added again) ``user``."""

    def memberships(self, room: str, users: list[str]) -> Deferred[dict[str, bool]]:
        """What is stored of ``users`` in ``room``: True for a member, False for one
        removed; users with neither are left out (a token's claim decides for them)."""

    def set_ban(self, room: str, user: str, banned: bool) -> Deferred[None]:
        """``room`` is ``EVERYWHERE`` for a ban from every room and from connecting."""

    def queue_depth(self) -> int: ...

    def ping(self) -> Deferred[None]:
        """Fires once the database answered a trivial query."""

    def flush(self) -> Deferred[None]:
        """Fires once every queued message has been written (or has failed)."""

    def close(self) -> Deferred[None]: ...
