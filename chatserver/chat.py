"""The chat core: what each client frame does.

It sees connections only through the small ``Connection`` interface and
storage and fan-out only through ``Store`` and ``RoomRegistry``, so the same
code runs on SQLite or Postgres, in one process or behind Redis.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver import wire
from chatserver.broker import Broker
from chatserver.config import Config
from chatserver.rooms import RoomRegistry
from chatserver.store import EVERYWHERE, Access, Store, StoredMessage, StoreUnavailable

CLOSE_POLICY = 1008
CLOSE_BANNED = 4003


class AccessDenied(Exception):
    """A join the access rules refuse; answered with ``forbidden``."""


class Connection(Protocol):
    """What the core needs of one client connection."""

    user: str
    # Private rooms the user's token grants.
    granted: frozenset[str]
    # room -> None once joined, or the Deferred of a join still in progress.
    rooms: dict[str, Deferred[int] | None]
    bad_frames: int
    chat_open: bool  # the WebSocket is open: frames may be sent
    # Token bucket for the frame rate, and rate-limited frames in a row.
    tokens: float
    tokens_at: float
    strikes: int

    def send_frame(self, data: bytes) -> None: ...

    def deliver(self, frame: bytes) -> None: ...

    def close_with(self, code: int, reason: str) -> None: ...


class Chat:
    log = Logger()

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: RoomRegistry,
        broker: Broker,
        clock: IReactorTime,
    ) -> None:
        self._config = config
        self._store = store
        self._broker = broker
        self._clock = clock
        self.registry = registry
        self.users: dict[str, list[Connection]] = {}  # a list: most users have one
        self.errors: Counter[str] = Counter()
        self.frames = 0
        self.sends = 0
        self.joins = 0
        self.kicks = 0
        self.policy_closes = 0

    # -- entry points from the transport ---------------------------------------

    def connections_of(self, user: str) -> int:
        return len(self.users.get(user, ()))

    def connect(self, conn: Connection) -> None:
        conn.tokens = float(self._config.rate_burst)
        conn.tokens_at = self._clock.seconds()
        conn.strikes = 0
        self.users.setdefault(conn.user, []).append(conn)

    def _rate_ok(self, conn: Connection) -> bool:
        now = self._clock.seconds()
        c = self._config
        conn.tokens = min(float(c.rate_burst), conn.tokens + (now - conn.tokens_at) * c.rate_limit)
        conn.tokens_at = now
        if conn.tokens >= 1.0:
            conn.tokens -= 1.0
            conn.strikes = 0
            return True
        return False

    def _rate_limited(self, conn: Connection, payload: bytes) -> None:
        conn.strikes += 1
        ref = None
        try:
            obj = wire.decode_json(payload)
            if isinstance(obj, dict) and isinstance(obj.get("ref"), str | int):
                ref = obj["ref"] if not isinstance(obj["ref"], bool) else None
        except (ValueError, UnicodeDecodeError):
            pass
        self._error(conn, wire.RATE_LIMITED, "too many frames; slow down", ref)
        if conn.strikes >= self._config.rate_limit_strikes:
            self.policy_closes += 1
            conn.close_with(CLOSE_POLICY, "rate limit exceeded")

    def handle(self, conn: Connection, payload: bytes, is_binary: bool) -> None:
        self.frames += 1
        if not self._rate_ok(conn):
            self._rate_limited(conn, payload)
            return
        try:
            frame = wire.parse(payload, is_binary, self._config.max_body_chars)
        except wire.FrameError as e:
            self._error(conn, e.code, e.message, e.ref)
            if e.code in (wire.BAD_FRAME, wire.BAD_REQUEST):
                conn.bad_frames += 1
                if conn.bad_frames >= self._config.max_bad_frames:
                    self.policy_closes += 1
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
        same_user = self.users.get(conn.user)
        if same_user is not None and conn in same_user:
            same_user.remove(conn)
            if not same_user:
                del self.users[conn.user]

    # -- kick and ban: local at once, and on every other instance via the broker --

    def kick(self, room: str, user: str, reason: str = "kicked") -> None:
        """Remove ``user`` from ``room`` (or, with room EVERYWHERE, disconnect them) everywhere."""
        self._apply_kick(room, user, reason)
        payload = {"op": "kick", "room": room, "user": user, "reason": reason}
        self._broker.publish_control(wire.encode(payload))

    def post(self, room: str, user: str, body: str) -> Deferred[StoredMessage]:
        """A message from the server side (admin API): stored, then delivered like any other."""
        d = self._store.append(room, user, body)

        def stored(message: StoredMessage) -> StoredMessage:
            self.registry.publish(message)
            return message

        return d.addCallback(stored)

    def on_control(self, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            op, room, user, reason = msg["op"], msg["room"], msg["user"], msg["reason"]
        except (ValueError, KeyError, TypeError):
            self.log.warn("ignored a malformed control message")
            return
        if op == "kick" and isinstance(room, str) and isinstance(user, str):
            self._apply_kick(room, user, str(reason))

    async def recheck_bans(self) -> None:
        """After a broker outage: apply bans whose control message may have been lost.

        Kicks and bans travel on the control channel; what was published while
        Redis was away is kept and published again, up to redis_republish_max,
        and is lost if the instance that issued it stopped. Bans are stored, so
        the store is the authority: every local user's bans are applied again.
        """
        users = list(self.users)
        if not users:
            return
        try:
            bans = await self._store.bans_of(users)
        except StoreUnavailable:
            self.log.warn("could not re-check bans after a broker outage: store unavailable")
            return
        for room, user in bans:
            self._apply_kick(room, user, "banned")

    def _apply_kick(self, room: str, user: str, reason: str) -> None:
        for conn in list(self.users.get(user, ())):
            if room == EVERYWHERE:
                self.kicks += 1
                conn.close_with(CLOSE_BANNED, reason)
            elif room in conn.rooms:
                self.kicks += 1
                del conn.rooms[room]
                self.registry.leave(conn, room)
                conn.send_frame(wire.encode({"type": "kicked", "room": room, "reason": reason}))

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
            elif conn.chat_open:
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
        d = self._store.access(room, conn.user)
        d.addCallback(self._check_access, conn, room)
        conn.rooms[room] = d
        d.addBoth(self._joined, conn, frame)

    def _check_access(self, access: Access, conn: Connection, room: str) -> Deferred[int]:
        if access.banned:
            raise AccessDenied(f"you are banned from {room}")
        if access.private and not access.member and room not in conn.granted:
            raise AccessDenied(f"{room} is private")
        if room not in conn.rooms or not conn.chat_open:
            return None  # left (or gone) meanwhile; _joined sorts it out
        return self.registry.join(conn, room)

    def _last_id(self, room: str) -> int | None:
        hosted = self.registry.rooms.get(room)
        return (hosted.last_id or None) if hosted is not None else None

    def _joined(self, result: Any, conn: Connection, frame: wire.Join) -> Any:
        room = frame.room
        if isinstance(result, Failure):
            if conn.rooms.get(room) is not None:
                del conn.rooms[room]
            if result.check(AccessDenied):
                self._error(conn, wire.FORBIDDEN, str(result.value), frame.ref)
            else:
                self._error(conn, wire.UNAVAILABLE, f"could not join {room}; try again", frame.ref)
            return None
        if room not in conn.rooms or not conn.chat_open:
            # Left (or gone) while the join was under way.
            self.registry.leave(conn, room)
            if conn.chat_open:
                self._error(
                    conn, wire.NOT_MEMBER, f"left {room} before the join completed", frame.ref
                )
            return result
        conn.rooms[room] = None
        self.joins += 1
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
        if conn.chat_open:
            conn.send_frame(
                wire.reply("ack", frame.ref, room=message.room, id=message.id, ts=message.ts)
            )
        self.registry.publish(message)

    def _not_stored(self, failure: Failure, conn: Connection, frame: wire.Send) -> None:
        if not failure.check(StoreUnavailable):
            self.log.failure("storing a message failed", failure)
        if conn.chat_open:
            reason = str(failure.value) if failure.check(StoreUnavailable) else "storage failed"
            self._error(conn, wire.UNAVAILABLE, reason, frame.ref)

    def _history(self, conn: Connection, frame: wire.History) -> None:
        d = self._store.history(frame.room, frame.before, frame.after, frame.limit)

        def done(result: tuple[list[StoredMessage], bool]) -> None:
            messages, more = result
            if conn.chat_open:
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
            if conn.chat_open:
                self._error(conn, wire.UNAVAILABLE, "history is unavailable; try again", frame.ref)

        d.addCallbacks(done, failed)
