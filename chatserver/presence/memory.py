"""Presence for the embedded default: the state is a dict in this process.

Instances that share a ``MemoryHub`` (tests run several on one) share its
dict, as instances on one Redis share its keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from chatserver.presence import ChangesHandler, Held


class MemoryPresence:
    def __init__(self, shared: dict[str, Any]) -> None:
        # room -> user -> how many instances hold them there
        self._counts: dict[str, dict[str, int]] = shared.setdefault("rooms", {})
        # room -> how many instances watch it
        self._watched: dict[str, int] = shared.setdefault("watched", {})
        self._mine: set[tuple[str, str]] = set()
        self._watching: set[str] = set()
        self.commands = 0

    def start(self, on_changes: ChangesHandler, on_lost: Callable[[], object]) -> None:
        pass  # an instance here can't die without its process, and the state with it

    def enter(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        self._mine.add((room, user))
        users = self._counts.setdefault(room, {})
        users[user] = users.get(user, 0) + 1
        return succeed((users[user] == 1, room in self._watched))

    def leave(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        self._mine.discard((room, user))
        return succeed((self._drop(room, user), room in self._watched))

    def _drop(self, room: str, user: str) -> bool:
        users = self._counts.get(room)
        if users is None or user not in users:
            return False
        users[user] -= 1
        if users[user] > 0:
            return False
        del users[user]
        if not users:
            del self._counts[room]
        return True

    def watch(self, room: str) -> Deferred[None]:
        if room not in self._watching:
            self._watching.add(room)
            self._watched[room] = self._watched.get(room, 0) + 1
        return succeed(None)

    def unwatch(self, room: str) -> Deferred[None]:
        if room in self._watching:
            self._watching.discard(room)
            self._watched[room] -= 1
            if not self._watched[room]:
                del self._watched[room]
        return succeed(None)

    def online(self, room: str, limit: int) -> Deferred[tuple[list[str], int]]:
        users = self._counts.get(room, {})
        return succeed((sorted(users)[:limit], len(users)))

    def rebuild(self, held: Held) -> Deferred[None]:
        return succeed(None)  # nothing here is ever lost

    def stop(self) -> Deferred[None]:
        for room, user in self._mine:
            self._drop(room, user)
        self._mine.clear()
        for room in list(self._watching):
            self.unwatch(room)
        return succeed(None)
