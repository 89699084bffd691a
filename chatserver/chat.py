"""The chat core: what each client frame does.

It sees connections only through the small ``Connection`` interface and
storage and fan-out only through ``Store`` and ``RoomRegistry``, so the same
code runs on SQLite or Postgres, in one process or behind Redis.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver import wire
from chatserver.config import Config
from chatserver.rooms import RoomRegistry
from chatserver.store import Store, StoredMessage, StoreUnavailable

CLOSE_POLICY = 1008


class Connection(Protocol):
    """What the core needs of one client connection."""

    user: str
    # room -> None once joined, or the Deferred of a join still in progress.
    rooms: dict[str, Deferred[int] | None]
    bad_frames: int
    connected: bool

    def send_frame(self, data: bytes) -> None: ...

    def deliver(self, prepared: Any) -> None: ...

    def close_with(self, code: int, reason: str) -> None: ...


class Chat:
    log = Logger()

    def __init__(self, config: Config, store: Store, registry: RoomRegistry) -> None:
        self._config = config
        self._store = store
        self.registry = registry
        self.errors: Counter[str] = Counter()
        self.frames = 0
        self.sends = 0

    # -- entry points from the transport ---------------------------------------

    def handle(self, conn: Connection, payload: bytes, is_binary: bool) -> None:
        self.frames += 1
        try:
            frame = wire.parse(payload, is_binary, self._config.max_body_chars)
        except wire.FrameError as e:
            self._error(conn, e.code, e.message, e.ref)
            if e.code in (wire.BAD_FRAME, wire.BAD_REQUEST):
                conn.bad_frames += 1
                if conn.bad_frames >= self._config.max_bad_frames:
                    conn.close_with(CLOSE_POLICY, "too many invalid frames")
            return
        if isinstance(frame, wire.Send):
            self._membership(conn, frame.room, frame.ref, self._send, frame)
        elif isinstance(frame, wire.History):
            self._membership(conn, frame.room, frame.ref, self._history, frame)
        elif isinstance(frame, wire.Join):
            self._join(conn, frame)
        elif isinstance(frame, wire.Leave):
            self._leave(conn, frame)
        else:
            conn.send_frame(wire.reply("pong", frame.ref))

    def disconnect(self, conn: Connection) -> None:
        """A closed connection leaves every room it was in or joining."""
        rooms = list(conn.rooms)
        conn.rooms.clear()
        for room in rooms:
            self.registry.leave(conn, room)

    # -- frames ---------------------------------------------------------------

    def _error(self, conn: Connection, code: str, message: str, ref: Any = None) -> None:
        self.errors[code] += 1
        conn.send_frame(wire.error(code, message, ref))

    def _membership(self, conn: Connection, room: str, ref: Any, action: Any, frame: Any) -> None:
        """Run ``action`` once ``conn`` is in ``room``, keeping the client's frame order."""
        if room not in conn.rooms:
            self._error(conn, wire.NOT_MEMBER, f"join {room} first", ref)
            return
        pending = conn.rooms[room]
        if pending is None:
            action(conn, frame)
            return

        def joined(result: Any) -> Any:
            if conn.rooms.get(room, False) is None:
                action(conn, frame)
            elif conn.connected:
                self._error(conn, wire.NOT_MEMBER, f"join {room} did not complete", ref)
            return result

        pending.addBoth(joined)

    def _join(self, conn: Connection, frame: wire.Join) -> None:
        room = frame.room
        if room in conn.rooms:
            pending = conn.rooms[room]
            if pending is None:
                conn.send_frame(
                    wire.reply("joined", frame.ref, room=room, last_id=self._last_id(room))
                )
            else:
                pending.addBoth(self._joined, conn, frame)
            return
        if len(conn.rooms) >= self._config.max_rooms_per_connection:
            limit = self._config.max_rooms_per_connection
            self._error(
                conn, wire.FORBIDDEN, f"a connection may join at most {limit} rooms", frame.ref
            )
            return
        d = self.registry.join(conn, room)
        conn.rooms[room] = d
        d.addBoth(self._joined, conn, frame)

    def _last_id(self, room: str) -> int | None:
        hosted = self.registry.rooms.get(room)
        return (hosted.last_id or None) if hosted is not None else None

    def _joined(self, result: Any, conn: Connection, frame: wire.Join) -> Any:
        room = frame.room
        if isinstance(result, Failure):
            if conn.rooms.get(room) is not None:
                del conn.rooms[room]
            self._error(conn, wire.UNAVAILABLE, f"could not join {room}; try again", frame.ref)
            return None
        if room not in conn.rooms or not conn.connected:
            # Left (or gone) while the join was under way.
            self.registry.leave(conn, room)
            if conn.connected:
                self._error(
                    conn, wire.NOT_MEMBER, f"left {room} before the join completed", frame.ref
                )
            return result
        conn.rooms[room] = None
        conn.send_frame(wire.reply("joined", frame.ref, room=room, last_id=result or None))
        return result

    def _leave(self, conn: Connection, frame: wire.Leave) -> None:
        if frame.room not in conn.rooms:
            self._error(conn, wire.NOT_MEMBER, f"not in {frame.room}", frame.ref)
            return
        del conn.rooms[frame.room]
        self.registry.leave(conn, frame.room)
        conn.send_frame(wire.reply("left", frame.ref, room=frame.room))

    def _send(self, conn: Connection, frame: wire.Send) -> None:
        self.sends += 1
        d = self._store.append(frame.room, conn.user, frame.body)
        d.addCallbacks(self._stored, self._not_stored, (conn, frame), None, (conn, frame))

    def _stored(self, message: StoredMessage, conn: Connection, frame: wire.Send) -> None:
        # The ack goes out before the message itself reaches anyone.
        if conn.connected:
            conn.send_frame(
                wire.reply("ack", frame.ref, room=message.room, id=message.id, ts=message.ts)
            )
        self.registry.publish(message)

    def _not_stored(self, failure: Failure, conn: Connection, frame: wire.Send) -> None:
        if not failure.check(StoreUnavailable):
            self.log.failure("storing a message failed", failure)
        if conn.connected:
            reason = str(failure.value) if failure.check(StoreUnavailable) else "storage failed"
            self._error(conn, wire.UNAVAILABLE, reason, frame.ref)

    def _history(self, conn: Connection, frame: wire.History) -> None:
        d = self._store.history(frame.room, frame.before, frame.after, frame.limit)

        def done(result: tuple[list[StoredMessage], bool]) -> None:
            messages, more = result
            if conn.connected:
                conn.send_frame(
                    wire.reply(
                        "history",
                        frame.ref,
                        room=frame.room,
                        messages=[
                            wire.message_dict(m.room, m.id, m.user, m.body, m.ts) for m in messages
                        ],
                        more=more,
                    )
                )

        def failed(failure: Failure) -> None:
            if not failure.check(StoreUnavailable):
                self.log.failure("reading history failed", failure)
            if conn.connected:
                self._error(conn, wire.UNAVAILABLE, "history is unavailable; try again", frame.ref)

        d.addCallbacks(done, failed)
