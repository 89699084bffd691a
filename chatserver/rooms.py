"""The room registry: local membership, per-room ordering and fan-out.

Every message reaches local members through one door, ``offer``, whether it was
stored by this instance or arrived over the broker. Each hosted room remembers
the last id it delivered; an id that is next is delivered at once, an older one
is a duplicate (our own message echoed back, a replay) and dropped, and a newer
one waits until the ids before it arrive. If they don't arrive within
``gap_timeout`` (two instances' publishes crossed, or the broker lost them),
they are read from the store. So members see every message of a room once, in
id order, however the broker behaves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from chatserver import wire
from chatserver.broker import Broker
from chatserver.delivery import Delivery, Sink
from chatserver.store import Store, StoredMessage

# Buffered out-of-order messages per room before a gap is filled at once.
MAX_BUFFERED = 1000
FILL_PAGE = 100


class Room:
    __slots__ = ("buffer", "filling", "gap_timer", "last_id", "members", "name", "ready", "waiters")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[Sink] = set()
        self.last_id = 0
        self.ready = False
        self.waiters: list[Deferred[int]] = []
        self.buffer: dict[int, bytes] = {}
        self.gap_timer: IDelayedCall | None = None
        self.filling = False


def broker_payload(message_id: int, frame: bytes) -> bytes:
    """The id travels in front of the frame so receivers need not parse the JSON."""
    return b"%d " % message_id + frame


def split_payload(payload: bytes) -> tuple[int, bytes]:
    head, _, frame = payload.partition(b" ")
    return int(head), frame


# A frame with no id (typing): not stored, not ordered, never filled from the
# store. Its head is this mark, the publishing instance (which delivered it
# already and skips its own echo) and the sender's name (whose connections it skips).
RELAY = b"~"
RELAY_HEAD = RELAY + b" "


def relay_payload(origin: bytes, user: str, frame: bytes) -> bytes:
    return b"%s %s %s %s" % (RELAY, origin, user.encode(), frame)


# A presence event, for the room's watchers (not its members): no id either.
ANNOUNCE = b"^"
ANNOUNCE_HEAD = ANNOUNCE + b" "


def _nobody_watches(room: str, frame: bytes) -> None:
    pass


def _no_sinks(user: str) -> Collection[Sink]:
    return ()


class RoomRegistry:
    log = Logger()

    def __init__(
        self,
        store: Store,
        broker: Broker,
        delivery: Delivery,
        clock: IReactorTime,
        gap_timeout: float,
    ) -> None:
        self._store = store
        self._broker = broker
        self.delivery = delivery
        self._clock = clock
        self._gap_timeout = gap_timeout
        self.rooms: dict[str, Room] = {}
        self.gap_fills = 0
        self.dropped_broker_frames = 0
        self.relayed = 0  # relay frames written to local members
        # Names this instance in what it publishes with no id (and on the control
        # channel), so that it skips its own echo.
        self.origin = os.urandom(8).hex().encode()
        # The connections of a user here, whom a relay of theirs skips (set by the core).
        self.sinks_of: Callable[[str], Collection[Sink]] = _no_sinks
        # Takes presence events to the room's watchers here (set by the presence tracker).
        self.on_presence: Callable[[str, bytes], None] = _nobody_watches

    # -- membership -----------------------------------------------------------

    def join(self, member: Sink, name: str) -> Deferred[int]:
        """Fires with the room's last delivered id once ``member`` receives its messages.

        Between this firing and the caller's next yield to the reactor nothing
        is delivered, so a ``joined`` frame sent right away precedes every message.
        """
        room = self.rooms.get(name)
        d: Deferred[int] = Deferred()
        if room is not None and room.ready:
            self.delivery.release_room(room)
            room.members.add(member)
            d.callback(room.last_id)
            return d
        fresh = room is None
        if room is None:
            room = self.rooms[name] = Room(name)
        d.addCallback(self._add_member, room, member)
        room.waiters.append(d)
        if fresh:
            Deferred.fromCoroutine(self._host(room))
        return d

    def _add_member(self, last_id: int, room: Room, member: Sink) -> int:
        self.delivery.release_room(room)
        room.members.add(member)
        return last_id

    def leave(self, member: Sink, name: str) -> None:
        room = self.rooms.get(name)
        if room is None:
            return
        self.delivery.release_room(room)
        room.members.discard(member)
        if room.ready and not room.members:
            self._unhost(room)

    async def _host(self, room: Room) -> None:
        """Subscribe first, then read the last id: nothing committed in between is missed."""
        try:
            await self._broker.subscribe(room.name)
            last = await self._store.last_id(room.name)
        except Exception as e:
            self.log.warn("hosting room {room} failed: {error}", room=room.name, error=repr(e))
            waiters, room.waiters = room.waiters, []
            if self.rooms.get(room.name) is room and not room.members:
                self._unhost(room)
            for w in waiters:
                w.errback(e)
            return
        room.last_id = max(room.last_id, last or 0)
        room.ready = True
        waiters, room.waiters = room.waiters, []
        for w in waiters:
            w.callback(room.last_id)
        if not room.members:
            self._unhost(room)
            return
        self._drain(room)

    def _unhost(self, room: Room) -> None:
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            self._broker.unsubscribe(room.name)
        if room.gap_timer is not None and room.gap_timer.active():
            room.gap_timer.cancel()
        room.gap_timer = None
        room.buffer.clear()

    # -- delivery -------------------------------------------------------------

    def publish(self, message: StoredMessage) -> None:
        """A message this instance stored: deliver locally, then tell the other instances."""
        frame = wire.message_frame(message)
        self.offer(message.room, message.id, frame)
        self._broker.publish(message.room, broker_payload(message.id, frame))

    def on_broker_messages(self, messages: list[tuple[str, bytes]]) -> None:
        """The room messages of one read from the broker: their frames leave together."""
        with self.delivery.batch():
            for room, payload in messages:
                self.on_broker_message(room, payload)

    def relay(self, room: str, user: str, frame: bytes) -> None:
        """A frame for the other members of ``room`` (not ``user``'s connections)
        on every instance, with no id: it is not stored and never filled."""
        self._relay_here(room, user, frame)
        self._broker.publish(room, relay_payload(self.origin, user, frame))

    def announce(self, room: str, frame: bytes, publish: bool = True) -> None:
        """A presence event: to the watchers of ``room`` here and, with ``publish``,
        on every instance that hosts it (whether or not this one does)."""
        self.on_presence(room, frame)
        if publish:
            self._broker.publish_in_order(room, b"%s %s %s" % (ANNOUNCE, self.origin, frame))

    def _relay_here(self, name: str, user: str, frame: bytes) -> None:
        room = self.rooms.get(name)
        if room is None or not room.ready or not room.members:
            return
        own = self.sinks_of(user)
        data = wire.text_frame(frame)
        for member in room.members:
            if member not in own:
                self.delivery.to_connection(member, data)
                self.relayed += 1

    def on_broker_message(self, room: str, payload: bytes) -> None:
        if payload.startswith(ANNOUNCE_HEAD):
            origin, _, frame = payload[2:].partition(b" ")
            if not frame:
                self.dropped_broker_frames += 1
            elif origin != self.origin:
                self.on_presence(room, frame)
            return
        if payload.startswith(RELAY_HEAD):
            try:
                origin, user, frame = payload[2:].split(b" ", 2)
            except ValueError:
                self.dropped_broker_frames += 1
                return
            if origin != self.origin:
                self._relay_here(room, user.decode("utf-8", "replace"), frame)
            return
        try:
            message_id, frame = split_payload(payload)
        except ValueError:
            self.dropped_broker_frames += 1
            self.log.warn("dropped a malformed broker payload for room {room}", room=room)
            return
        self.offer(room, message_id, frame)

    def offer(self, name: str, message_id: int, frame: bytes) -> None:
        room = self.rooms.get(name)
        if room is None or message_id <= room.last_id:
            return
        if room.ready and message_id == room.last_id + 1 and not room.buffer:
            self._deliver(room, message_id, frame)
            return
        room.buffer[message_id] = frame
        if room.ready:
            self._drain(room)

    def _deliver(self, room: Room, message_id: int, frame: bytes) -> None:
        room.last_id = message_id
        if room.members:
            self.delivery.to_room(room, wire.text_frame(frame))

    def _drain(self, room: Room) -> None:
        buffer = room.buffer
        for stale in [i for i in buffer if i <= room.last_id]:
            del buffer[stale]
        while room.last_id + 1 in buffer:
            nxt = room.last_id + 1
            self._deliver(room, nxt, buffer.pop(nxt))
        if not buffer:
            if room.gap_timer is not None and room.gap_timer.active():
                room.gap_timer.cancel()
            room.gap_timer = None
            return
        if len(buffer) >= MAX_BUFFERED:
            self._start_fill(room)
        elif room.gap_timer is None or not room.gap_timer.active():
            room.gap_timer = self._clock.callLater(self._gap_timeout, self._start_fill, room)

    def _start_fill(self, room: Room) -> None:
        if room.filling or self.rooms.get(room.name) is not room:
            return
        if room.gap_timer is not None and room.gap_timer.active():
            room.gap_timer.cancel()
        room.gap_timer = None
        room.filling = True
        Deferred.fromCoroutine(self._fill(room))

    async def _fill(self, room: Room) -> None:
        """Read what the broker did not bring from the store, up to the newest id seen."""
        self.gap_fills += 1
        try:
            while self.rooms.get(room.name) is room:
                target = max(room.buffer, default=None)
                start = room.last_id
                messages, more = await self._store.history(room.name, None, start, FILL_PAGE)
                if self.rooms.get(room.name) is not room:
                    return
                with self.delivery.batch():
                    for m in messages:
                        if m.id == room.last_id + 1:
                            self._deliver(room, m.id, wire.message_frame(m))
                # Page on to the end of the store (a resync has no target), unless
                # what was buffered is reached or a page made no progress.
                if not more or room.last_id == start:
                    break
                if target is not None and room.last_id >= target:
                    break
        except Exception as e:
            self.log.warn("filling a gap in room {room} failed: {error}", room=room.name, error=e)
        finally:
            room.filling = False
        if self.rooms.get(room.name) is room:
            with self.delivery.batch():
                self._drain(room)

    def resync(self) -> None:
        """The broker may have lost messages: read every hosted room's news from the store."""
        for room in tuple(self.rooms.values()):
            if room.ready:
                self._start_fill(room)
