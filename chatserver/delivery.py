"""Delivery: the one place where frames for clients are held and joined.

A group commit acks a whole batch at once, one read from the broker carries
many messages, a gap fill brings a page: written one by one, each frame costs
a ``send``, and the send (waking the reader) is most of what a frame costs.
Inside ``batch()`` frames are held instead, and at its end each connection
gets its own frames (acks) in one write, then each room's members get the
room's frames in one write. Frames for a room are joined once per room, not
once per member.

What each member gets is exactly what it would have got at once: a change of
a room's members first writes out what is held for the members before it
(``release_room``), and a connection about to be closed first gets what is
held for it (``release_connection``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Protocol


class Sink(Protocol):
    """Where one connection's frames go: whole WebSocket frames, in order."""

    def write(self, data: bytes) -> None: ...


class Audience(Protocol):
    """A room as delivery sees it: who receives its frames now."""

    @property
    def members(self) -> Collection[Sink]: ...


class Delivery:
    """Holds frames inside ``batch()``; writes each connection's and each room's in one write."""

    def __init__(self) -> None:
        self._sinks: dict[Sink, list[bytes]] | None = None
        self._rooms: dict[Audience, list[bytes]] | None = None
        self.coalesced_frames = 0  # frames that left in one write with others
        self.delivered = 0  # room frames written to members

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold what is sent inside; nested batches are written by the outermost."""
        if self._sinks is not None:
            yield
            return
        sinks: dict[Sink, list[bytes]] = {}
        rooms: dict[Audience, list[bytes]] = {}
        self._sinks, self._rooms = sinks, rooms
        try:
            yield
        finally:
            self._sinks = self._rooms = None
            self._flush(sinks, rooms)

    def _flush(self, sinks: dict[Sink, list[bytes]], rooms: dict[Audience, list[bytes]]) -> None:
        """Each connection's own frames (acks) go before its rooms' frames, in the
        same write when it has both: a sender is a member of its room, so in small
        rooms that is one ``send`` in six or seven, and a send is most of a frame's
        cost. Then the room frames of connections with nothing of their own."""
        joined: list[tuple[tuple[Sink, ...], bytes]] = []
        for room, frames in rooms.items():
            members, data = self._joined(room, frames)
            joined.append((members, data))
            if sinks:
                for member in members:
                    own = sinks.get(member)
                    if own is not None:
                        own.append(data)
                        if len(frames) > 1:
                            self.coalesced_frames -= 1  # counted above, frame by frame
        for sink, frames in sinks.items():
            self._write(sink, frames)
        for members, data in joined:
            if sinks:
                for member in members:
                    if member not in sinks:
                        member.write(data)
            else:
                for member in members:
                    member.write(data)

    def to_connection(self, sink: Sink, frame: bytes) -> None:
        held = self._sinks
        if held is None:
            sink.write(frame)
            return
        frames = held.get(sink)
        if frames is None:
            held[sink] = [frame]
        else:
            frames.append(frame)

    def to_room(self, room: Audience, frame: bytes) -> None:
        held = self._rooms
        if held is None:
            self._write_room(room, [frame])
            return
        frames = held.get(room)
        if frames is None:
            held[room] = [frame]
        else:
            frames.append(frame)

    def release_room(self, room: Audience) -> None:
        """Before ``room``'s members change: what is held for it goes to the members now."""
        if self._rooms is not None:
            frames = self._rooms.pop(room, None)
            if frames is not None:
                self._write_room(room, frames)

    def release_connection(self, sink: Sink) -> None:
        """Before ``sink`` is closed: its held frames go first."""
        if self._sinks is not None:
            frames = self._sinks.pop(sink, None)
            if frames is not None:
                self._write(sink, frames)

    def _write(self, sink: Sink, frames: list[bytes]) -> None:
        if len(frames) == 1:
            sink.write(frames[0])
        else:
            self.coalesced_frames += len(frames)
            sink.write(b"".join(frames))

    def _joined(self, room: Audience, frames: list[bytes]) -> tuple[tuple[Sink, ...], bytes]:
        """The room's members now, and its frames as one write (counted for each)."""
        members = tuple(room.members)
        if len(frames) == 1:
            data = frames[0]
        else:
            data = b"".join(frames)
            self.coalesced_frames += len(frames) * len(members)
        self.delivered += len(frames) * len(members)
        return members, data

    def _write_room(self, room: Audience, frames: list[bytes]) -> None:
        members, data = self._joined(room, frames)
        held = self._sinks
        if held is None:
            for member in members:
                member.write(data)
        else:
            # Released mid-batch: behind what each member already has held.
            for member in members:
                self.to_connection(member, data)
