"""Presence state: who is in which room, across every instance.

The chat core counts its own connections (``tracker.PresenceTracker``) and
tells the state only of a user's first connection entering a room on this
instance and their last one leaving it. The state (in memory for one
process, in Redis across instances) counts instances per user and room, so
it can say when a user came online or went offline anywhere, and who is
online now. The design and its reasons: docs/presence.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred

# Users who went offline or came online without a join or leave here: an
# instance that died was reaped, or the state was rebuilt after an outage.
# Each is (room, user, online).
ChangesHandler = Callable[[list[tuple[str, str, bool]]], None]


class Held(Protocol):
    """What this instance holds now: read at the moment each room is rebuilt, so
    that joins and leaves sent meanwhile are neither lost nor counted twice."""

    def rooms(self) -> set[str]:
        """Rooms where this instance holds a user or has a watcher."""

    def users_in(self, room: str) -> list[str]: ...

    def watches(self, room: str) -> bool: ...


class PresenceUnavailable(Exception):
    """The presence state can't be read or changed now (its Redis is away)."""


class PresenceState(Protocol):
    # Commands sent to the state's backend (metrics; Redis round trips).
    commands: int

    def start(self, on_changes: ChangesHandler, on_lost: Callable[[], object]) -> None:
        """``on_lost``: this instance's part of the state was lost (Redis restarted,
        or it was taken for dead): the caller rebuilds it."""

    def enter(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        """This instance holds ``user`` in ``room`` now: (no instance did before,
        some instance watches the room), the second saying whether an event is
        worth publishing."""

    def leave(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        """This instance no longer does: (no instance does now, the room is watched)."""

    def watch(self, room: str) -> Deferred[None]:
        """This instance has a connection that follows ``room``'s presence."""

    def unwatch(self, room: str) -> Deferred[None]:
        """It has none any more."""

    def online(self, room: str, limit: int) -> Deferred[tuple[list[str], int]]:
        """Up to ``limit`` users online in ``room`` (sorted), and how many there are.
        Ordered after every ``enter`` and ``leave`` asked before it."""

    def rebuild(self, held: Held) -> Deferred[None]:
        """After an outage: make this instance's part of the state what it ``held``s
        again; users who came or went meanwhile go to ``on_changes``."""

    def stop(self) -> Deferred[None]:
        """Say goodbye: this instance's users leave the state at once."""
