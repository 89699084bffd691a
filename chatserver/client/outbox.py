"""The pending sends of a session: messages written and not yet known to be stored.

Sans-IO like the session that owns it: it only keeps the state of each message.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

QUEUED, SENT, UNCONFIRMED = "queued", "sent", "unconfirmed"


@dataclass(slots=True)
class Outgoing:
    """A message the user wrote: queued (not sent yet), sent (waiting for its ack), or
    unconfirmed (sent, then the connection dropped before the ack came)."""

    local: int
    room: str
    body: str
    state: str = QUEUED
    ref: str | None = None


class Outbox:
    """Our messages not yet known to be stored.

    A message whose ``ack`` was lost with the connection may or may not have been
    stored. After the reconnect, the catch-up (``history after``) shows every
    stored message: if ours is among them (same room, our user, same body) it was
    stored and counts as acked; if not, it was not, and it is sent again. So it
    is neither lost nor posted twice.
    """

    def __init__(self) -> None:
        self.items: list[Outgoing] = []
        self._local = itertools.count(1)

    def add(self, room: str, body: str) -> Outgoing:
        """A new message, queued; its ``local`` number identifies it until it has an id."""
        item = Outgoing(next(self._local), room, body)
        self.items.append(item)
        return item

    def queued(self, room: str) -> list[Outgoing]:
        """What waits to be sent to a room, in the order it was written."""
        return [i for i in self.items if i.room == room and i.state == QUEUED]

    def mark_sent(self, item: Outgoing, ref: str) -> None:
        """Sent with this ref: the ``ack`` or ``error`` that echoes it settles the item."""
        item.state = SENT
        item.ref = ref

    def _pop(self, pred: Callable[[Outgoing], bool]) -> Outgoing | None:
        for i, item in enumerate(self.items):
            if pred(item):
                return self.items.pop(i)
        return None

    def answered(self, ref: str) -> Outgoing | None:
        """The item an ``ack`` or ``error`` with this ref settles, removed from the box."""
        return self._pop(lambda i: i.state == SENT and i.ref == ref)

    def connection_lost(self) -> None:
        """Sent items whose answer was lost with the connection: stored or not, the
        catch-up will tell (``match`` or ``settle``); their refs mean nothing any more."""
        for item in self.items:
            if item.state == SENT:
                item.state = UNCONFIRMED
                item.ref = None

    def match(self, room: str, body: str) -> Outgoing | None:
        """An unconfirmed item that a stored message of ours (room, body) proves stored."""
        return self._pop(lambda i: i.state == UNCONFIRMED and i.room == room and i.body == body)

    def settle(self, room: str) -> list[Outgoing]:
        """After a room's catch-up: unconfirmed items not found in it were not stored;
        they go back to the queue, to be sent again."""
        again = [i for i in self.items if i.room == room and i.state == UNCONFIRMED]
        for item in again:
            item.state = QUEUED
        return again

    def drop_room(self, room: str) -> list[Outgoing]:
        """A room left or lost: its items can no longer be sent; returned to be reported."""
        dropped = [i for i in self.items if i.room == room]
        self.items = [i for i in self.items if i.room != room]
        return dropped

    def waiting(self) -> int:
        """Messages sent on this connection and not yet acked."""
        return sum(1 for i in self.items if i.state == SENT)
