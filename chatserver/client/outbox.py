"""The pending sends of a session: messages, edits and deletes written and not yet
known to be stored.

Sans-IO like the session that owns it: it only keeps the state of each item.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatserver.client.events import Message

QUEUED, SENT, UNCONFIRMED = "queued", "sent", "unconfirmed"
SEND, EDIT, DELETE = "send", "edit", "delete"


def new_cid() -> str:
    """A fresh client id (protocol 1.1): random, so no two messages of a user share
    one, which is what lets the server take a repeat for a retry."""
    return uuid.uuid4().hex


def excerpt(body: str, width: int = 60) -> str:
    """Enough of a body to recognise it in an error line."""
    return body if len(body) <= width else body[: width - 3] + "..."


@dataclass(slots=True)
class Outgoing:
    """Something the user wrote: queued (not sent yet), sent (waiting for its ack), or
    unconfirmed (sent, then the connection dropped before the ack came).

    ``kind`` is the frame: ``send``, or ``edit``/``delete`` of message ``target``.
    ``cid`` is fixed when the item is written and goes with every copy sent, so the
    server stores it once however often it is sent (a ``delete`` has none: it is
    idempotent by nature). ``retried``: sent again after a drop.
    """

    local: int
    room: str
    body: str
    cid: str | None = None
    kind: str = SEND
    target: int | None = None
    state: str = QUEUED
    ref: str | None = None
    retried: bool = False

    def fields(self) -> dict[str, Any]:
        """The frame's fields after ``room``."""
        if self.kind == DELETE:
            return {"id": self.target}
        if self.kind == EDIT:
            return {"id": self.target, "body": self.body, "cid": self.cid}
        return {"body": self.body, "cid": self.cid}

    def summary(self) -> str:
        """What the user would recognise it by, in a "not sent" line."""
        if self.kind == DELETE:
            return f"delete of #{self.target}"
        if self.kind == EDIT:
            return f"edit of #{self.target}: {excerpt(self.body)}"
        return excerpt(self.body)


class Outbox:
    """Our messages (and edits and deletes) not yet known to be stored.

    An item whose ``ack`` was lost with the connection may or may not have been
    stored. After the reconnect, the catch-up (``history after``) shows every
    stored message with its cid: if ours is among them it was stored and counts
    as acked. If not, it is sent again with the same cid; had it been stored
    after all (its commit raced the reconnect), the server answers with the
    stored id (``duplicate: true``) instead of storing a second copy. A delete
    has no cid: its event (``deletes``, by our user) is what proves it.
    """

    def __init__(self) -> None:
        self.items: list[Outgoing] = []
        self._local = itertools.count(1)

    def add(self, room: str, body: str, kind: str = SEND, target: int | None = None) -> Outgoing:
        """A new item, queued; its ``local`` number identifies it until it has an id."""
        cid = None if kind == DELETE else new_cid()
        item = Outgoing(next(self._local), room, body, cid, kind, target)
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

    def match(self, message: Message) -> Outgoing | None:
        """The item a stored message of ours proves stored, removed from the box.

        By cid in any state: a cid is ours alone, so its message is that item's
        (an ack still to come then finds nothing to settle). A delete event only
        settles an unconfirmed delete: while one is sent, its own answer says.
        """
        if message.cid is not None:
            cid = message.cid
            return self._pop(lambda i: i.room == message.room and i.cid == cid)
        if message.deletes is not None:
            target = message.deletes
            return self._pop(
                lambda i: (
                    i.state == UNCONFIRMED
                    and i.kind == DELETE
                    and i.room == message.room
                    and i.target == target
                )
            )
        return None

    def settle(self, room: str) -> list[Outgoing]:
        """After a room's catch-up: unconfirmed items not found in it go back to the
        queue, to be sent again with their cids."""
        again = [i for i in self.items if i.room == room and i.state == UNCONFIRMED]
        for item in again:
            item.state = QUEUED
            item.retried = True
        return again

    def drop_room(self, room: str) -> list[Outgoing]:
        """A room left or lost: its items can no longer be sent; returned to be reported."""
        dropped = [i for i in self.items if i.room == room]
        self.items = [i for i in self.items if i.room != room]
        return dropped

    def waiting(self) -> int:
        """Messages sent on this connection and not yet acked."""
        return sum(1 for i in self.items if i.state == SENT)
