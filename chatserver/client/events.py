"""What the session exchanges with its driver: frames to send, events to show.

Plain data, no I/O: a frame is the dict that goes on the wire as JSON; an event
is something the front end shows (or, for ``Resync``, acts on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Frame = dict[str, Any]


def make_frame(kind: str, ref: str | int | None = None, **fields: Any) -> Frame:
    """A client frame; fields that are None are left out (the protocol has no nulls in
    requests: a missing ``before`` means "newest", a null one would be a bad_request)."""
    frame: Frame = {"type": kind, **{k: v for k, v in fields.items() if v is not None}}
    if ref is not None:
        frame["ref"] = ref
    return frame


def int_field(value: Any) -> int | None:
    """An integer field of a server frame (an id, a count), or None if it is not one.
    bool is an int in Python, never an id on the wire."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Message:
    """A chat message as the server stored it, or (protocol 1.1) an event in the
    room's sequence: ``edits`` or ``deletes`` names the message it changes. Events
    are messages here because they take ids like messages, so resuming and
    de-duplication treat them alike. ``edited`` (the ts of the last edit) and
    ``deleted`` come only from history, which folds changes into the message."""

    room: str
    id: int
    user: str
    body: str
    ts: int
    cid: str | None = None
    edits: int | None = None
    deletes: int | None = None
    edited: int | None = None
    deleted: bool = False

    @classmethod
    def from_frame(cls, obj: dict[str, Any]) -> Message:
        """From a ``message`` frame or an entry of a ``history`` page (same fields);
        raises KeyError or TypeError if one is missing, so callers can skip it. The
        1.1 fields are optional: a malformed one is dropped rather than the message."""
        cid = obj.get("cid")
        return cls(
            obj["room"],
            obj["id"],
            obj["user"],
            obj["body"],
            obj.get("ts", 0),
            cid if isinstance(cid, str) else None,
            int_field(obj.get("edits")),
            int_field(obj.get("deletes")),
            int_field(obj.get("edited")),
            obj.get("deleted") is True,
        )


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should know that is not a message (joined, left, offline)."""

    text: str


@dataclass(frozen=True, slots=True)
class Problem:
    """An error frame from the server, or a request the client refused itself."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Acked:
    """One of our messages (or edits or deletes) is stored: by its ``ack``, or found by
    its cid in what arrived after a drop. ``id`` is the stored message's or event's."""

    local: int
    room: str
    id: int


@dataclass(frozen=True, slots=True)
class Resync:
    """The connection cannot be trusted to be complete (a catch-up failed): drop it and
    reconnect later, which redoes the joins and the catch-up."""

    reason: str


Event = Message | Notice | Problem | Acked | Resync
