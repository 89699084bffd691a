"""The chat core: sessions, and what each client frame does.

It sees connections only as ``Session``s with a small ``Transport`` behind
them, and storage and fan-out only through ``Store``, ``RoomRegistry`` and
``Broker``, so the same code runs on SQLite or Postgres, in one process or
behind Redis. The path of a ``send`` reads top to bottom: ``handle`` ->
``_send`` -> the store -> ``on_commit`` (the store reports a committed batch)
-> ``_stored`` (ack, then the registry delivers locally and publishes).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver import wire
from chatserver.admission import HTTP_FORBIDDEN, HTTP_UNAUTHORIZED, Admission, Refused
from chatserver.auth import Identity
from chatserver.broker import Broker
from chatserver.config import Config
from chatserver.delivery import Delivery
from chatserver.presence.memory import MemoryPresence
from chatserver.presence.tracker import PresenceTracker
from chatserver.rooms import RoomRegistry
from chatserver.session import Session, Transport
from chatserver.store import (
    EVERYWHERE,
    Access,
    ChangeRefused,
    MessageNotFound,
    NotAuthor,
    NotYetWritten,
    Store,
    StoredMessage,
    StoreUnavailable,
)

CLOSE_POLICY = 1008
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_BANNED = 4003

# (user, room) pairs the typing throttle remembers before it forgets expired ones.
TYPING_TRACKED_MAX = 10_000

# The reason of the ``kicked`` frame a non-member gets when its room is made private.
KICKED_PRIVATE = "private"


def refusal_code(refused: BaseException) -> str:
    """The protocol's error code for an edit or delete the store refused."""
    if isinstance(refused, MessageNotFound):
        return wire.NOT_FOUND
    if isinstance(refused, NotAuthor):
        return wire.FORBIDDEN
    return wire.BAD_REQUEST  # an id past the room's last


class AccessDenied(Exception):
    """A join the access rules refuse; answered with ``forbidden``."""


class _Joined:
    """What a join's answer carries, gathered before it is sent."""

    __slots__ = ("access", "last_id", "online")

    def __init__(
        self, last_id: int | None, access: Access, online: tuple[list[str], int] | None
    ) -> None:
        self.last_id = last_id
        self.access = access
        self.online = online  # (names, count) when the join asked for presence


class Chat:
    log = Logger()

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: RoomRegistry,
        broker: Broker,
        delivery: Delivery,
        clock: IReactorTime,
        presence: PresenceTracker | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._broker = broker
        self._delivery = delivery
        self._clock = clock
        self.registry = registry
        self.admission = Admission(config, store)
        self.presence = presence or PresenceTracker(
            MemoryPresence({}),
            registry,
            delivery,
            clock,
            config.presence_list_max,
            config.presence_burst,
        )
        # Every session's history bucket starts full: this one float, shared.
        self._history_full = float(config.history_burst_bytes)
        # Sessions from the start of their handshake's ban check until the connection
        # ends, so that no ban misses one; a list: most users have one.
        self.users: dict[str, list[Session]] = {}
        self.errors: Counter[str] = Counter()
        # (user, room) -> when its last typing frame was relayed from here.
        self._typing: dict[tuple[str, str], float] = {}
        self._typing_prune_at = TYPING_TRACKED_MAX
        self.typing_relayed = 0
        self.typing_dropped = 0
        self.reads_stored = 0  # read markers moved forward
        # This instance on the control channel: it applies its own at once.
        self._origin = registry.origin.decode()
        registry.sinks_of = self._sinks_of
        self.frames = 0
        self.sends = 0
        self.edits = 0
        self.deletes = 0
        self.joins = 0
        self.kicks = 0
        self.policy_closes = 0

    # -- sessions: admitted at the handshake, open with the WebSocket ------------

    async def admit(self, identity: Identity, address: str) -> Session:
        """A session for a handshake, or ``admission.Refused``. End it with ``close``.

        The session is registered before the store is asked about bans: a ban
        stored after that read is applied to it by its kick (stored first, then
        published), so none falls between the check and the connection's opening.
        """
        session = Session(
            identity.user,
            address,
            identity.rooms,
            float(self._config.rate_burst),
            self._clock.seconds(),
            self._history_full,
        )
        self._register(session)
        try:
            await self.admission.admit(identity.user, address)
        except BaseException:
            session.counted = False  # admission counted nothing
            self._unregister(session)
            raise
        if session.closing is not None:  # banned while the store was asked
            code, reason = session.closing
            self.close(session)
            if code == CLOSE_TOKEN_EXPIRED:
                raise Refused(HTTP_UNAUTHORIZED, reason)
            raise Refused(HTTP_FORBIDDEN, "user is banned" if code == CLOSE_BANNED else reason)
        if identity.expires is not None:
            delay = max(0.0, identity.expires - self._clock.seconds())
            session.expiry = self._clock.callLater(delay, self._expired, session)
        return session

    def open(self, session: Session, transport: Transport) -> None:
        """The WebSocket is open: frames may flow, unless it was closed meanwhile."""
        session.attach(transport, self._clock.seconds())
        if session.closing is not None:
            transport.close(*session.closing)

    def _register(self, session: Session) -> None:
        self.users.setdefault(session.user, []).append(session)

    def _unregister(self, session: Session) -> None:
        same_user = self.users.get(session.user)
        if same_user is not None and session in same_user:
            same_user.remove(session)
            if not same_user:
                del self.users[session.user]

    def close(self, session: Session) -> None:
        """The connection ended (or its handshake failed): leave every room, uncount it."""
        session.detach()
        rooms = list(session.rooms.items())
        session.rooms.clear()
        if session.transport is not None:
            for room, joining in rooms:
                self._out_of(session, room, joined=joining is None)
        self._unregister(session)
        if session.counted:
            session.counted = False
            self.admission.release(session.user, session.address)

    def disconnect(self, session: Session, code: int, reason: str) -> None:
        """Close for a reason of the server's own (shutting down), as the core closes:
        its held frames first, and nothing the client sends after it counts."""
        self._close(session, code, reason)

    def _expired(self, session: Session) -> None:
        session.expiry = None
        self._close(session, CLOSE_TOKEN_EXPIRED, "token expired")

    def _close(self, session: Session, code: int, reason: str) -> bool:
        """Close ``session`` with ``code``; False if it was already closing."""
        if session.closing is not None:
            return False
        if session.transport is not None:  # frames sent before the close go first
            self._delivery.release_connection(session.transport)
        return session.close(code, reason)

    def _send_frame(self, session: Session, payload: bytes) -> None:
        if session.open:
            self._delivery.to_connection(session.transport, wire.text_frame(payload))

    # -- entry points from the transport ---------------------------------------

    def _rate_ok(self, session: Session) -> bool:
        now = self._clock.seconds()
        c = self._config
        session.tokens = min(
            float(c.rate_burst), session.tokens + (now - session.tokens_at) * c.rate_limit
        )
        session.tokens_at = now
        if session.tokens >= 1.0:
            session.tokens -= 1.0
            session.strikes = 0
            return True
        return False

    def _rate_limited(self, session: Session, payload: bytes | None) -> None:
        session.strikes += 1
        ref = None
        if payload is not None:
            try:
                obj = wire.decode_json(payload)
                if isinstance(obj, dict) and isinstance(obj.get("ref"), str | int):
                    ref = obj["ref"] if not isinstance(obj["ref"], bool) else None
            except (ValueError, UnicodeDecodeError):
                pass
        self._error(session, wire.RATE_LIMITED, "too many frames; slow down", ref)
        if session.strikes >= self._config.rate_limit_strikes:
            self._policy_close(session, "rate limit exceeded")

    def _policy_close(self, session: Session, reason: str) -> None:
        if self._close(session, CLOSE_POLICY, reason):
            self.policy_closes += 1  # connections, not the frames that follow

    def allow_frame(self, session: Session) -> bool:
        """A frame that is not a whole message: a ping, a pong, or a message's
        fragment after its first (the message itself is charged in ``handle``).

        Each costs a token like a message, or a flood of them would cost CPU
        and output without limit; False: ignore it.
        """
        if not session.open:
            self._after_close(session)
            return False
        self.frames += 1
        if self._rate_ok(session):
            return True
        self._rate_limited(session, None)
        return False

    def _after_close(self, session: Session) -> None:
        """A frame after the close decision: nothing counts. Frames in flight are
        normal; one past the client's rate means it is not winding down."""
        if session.transport is not None and not self._rate_ok(session):
            session.transport.stop_reading()

    def handle(self, session: Session, payload: bytes, is_binary: bool) -> None:
        if not session.open:
            self._after_close(session)
            return
        self.frames += 1
        if not self._rate_ok(session):
            self._rate_limited(session, payload)
            return
        try:
            frame = wire.parse(payload, is_binary, self._config.max_body_chars)
        except wire.FrameError as e:
            self._error(session, e.code, e.message, e.ref)
            if e.code in (wire.BAD_FRAME, wire.BAD_REQUEST):
                session.bad_frames += 1
                if session.bad_frames >= self._config.max_bad_frames:
                    self._policy_close(session, "too many invalid frames")
            return
        if isinstance(frame, wire.Send):
            self._membership(session, frame.room, frame.ref, self._send, frame)
        elif isinstance(frame, wire.Edit | wire.Delete):
            self._membership(session, frame.room, frame.ref, self._change, frame)
        elif isinstance(frame, wire.Read):
            self._membership(session, frame.room, frame.ref, self._read, frame)
        elif isinstance(frame, wire.Typing):
            self._membership(session, frame.room, frame.ref, self._typing_frame, frame)
        elif isinstance(frame, wire.PresenceQuery):
            self._membership(session, frame.room, frame.ref, self._presence_query, frame)
        elif isinstance(frame, wire.History):
            self._membership(session, frame.room, frame.ref, self._history, frame)
        elif isinstance(frame, wire.Join):
            self._join(session, frame)
        elif isinstance(frame, wire.Leave):
            self._leave(session, frame)
        else:
            self._send_frame(session, wire.reply("pong", frame.ref))

    def on_commit(self, fire: Callable[[], None]) -> None:
        """The store committed (or failed) a batch: its acks and messages leave together."""
        with self._delivery.batch():
            fire()

    # -- kick and ban: local at once, and on every other instance via the broker --

    def kick(self, room: str, user: str, reason: str = "kicked") -> None:
        """Remove ``user`` from ``room`` (or, with room EVERYWHERE, disconnect them) everywhere."""
        self._apply_kick(room, user, reason)
        payload = {"op": "kick", "room": room, "user": user, "reason": reason}
        self._broker.publish_control(wire.encode(payload))

    def post(self, room: str, user: str, body: str) -> Deferred[StoredMessage]:
        """A message from the server side (admin API): stored, then delivered like any other."""
        return self._store.append(room, user, body).addCallback(self._published)

    def remove(self, room: str, target: int, user: str) -> Deferred[StoredMessage]:
        """Delete message ``target`` whoever wrote it (admin API), as ``user``: the
        delete event is stored, then delivered like any other."""
        return self._store.delete(room, user, target, by_admin=True).addCallback(self._published)

    def _published(self, message: StoredMessage) -> StoredMessage:
        self.registry.publish(message)
        return message

    def room_privacy_changed(self, room: str, private: bool) -> Deferred[None]:
        """The store now says whether ``room`` is private (admin API). Made private, it
        loses every non-member at once, here and on every other instance: access was
        checked at their join, when the room was public. Fires once this instance's
        are out (each instance asks the store who its own are)."""
        if not private:
            return succeed(None)
        payload = {"op": "private", "room": room, "user": "", "reason": KICKED_PRIVATE}
        self._broker.publish_control(wire.encode(payload))
        return Deferred.fromCoroutine(self._apply_private(room))

    def on_control(self, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            op, room, user, reason = msg["op"], msg["room"], msg["user"], msg["reason"]
        except (ValueError, KeyError, TypeError):
            self.log.warn("ignored a malformed control message")
            return
        if op == "kick" and isinstance(room, str) and isinstance(user, str):
            self._apply_kick(room, user, str(reason))
        elif op == "read" and isinstance(user, str) and msg.get("from") != self._origin:
            marker = msg.get("id")
            if wire.is_valid_name(room) and isinstance(marker, int):
                self._tell_read(room, user, marker)
        elif op == "private" and wire.is_valid_name(room):
            Deferred.fromCoroutine(self._apply_private(room))

    async def _apply_private(self, room: str) -> None:
        """Kick the local sessions in ``room`` (joined, or joining: their access may have
        been read before the change) that are not its members now.

        A change that is rare and may cost: one store read for the users here. Sessions
        that start joining after that read was asked for read the room private
        themselves. If the store can't answer, everyone here goes (fail closed); a
        member may simply join again.
        """
        users = [u for u, sessions in self.users.items() if any(room in s.rooms for s in sessions)]
        if not users:
            return
        try:
            stored = await self._store.memberships(room, users)
        except StoreUnavailable:
            self.log.warn(
                "room {room} made private: the store could not say who its members are;"
                " removing everyone here",
                room=room,
            )
            stored = dict.fromkeys(users, False)
        for user in users:
            decided = stored.get(user)
            for session in list(self.users.get(user, ())):
                # A stored removal outranks the token's claim; a membership row is enough.
                if decided is True or (decided is None and room in session.granted):
                    continue
                self._kick_session(session, room, KICKED_PRIVATE)

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
        for session in list(self.users.get(user, ())):
            if room == EVERYWHERE:
                # Also a session still in its handshake: it is refused, or closed on opening.
                if self._close(session, CLOSE_BANNED, reason):
                    self.kicks += 1
            else:
                self._kick_session(session, room, reason)

    def _kick_session(self, session: Session, room: str, reason: str) -> None:
        """Out of ``room``, joined or joining (a join under way then ends not_member)."""
        if session.open and room in session.rooms:
            self.kicks += 1
            joined = session.rooms.pop(room) is None
            self._out_of(session, room, joined)
            self._send_frame(
                session, wire.encode({"type": "kicked", "room": room, "reason": reason})
            )

    # -- frames ---------------------------------------------------------------

    def _error(self, session: Session, code: str, message: str, ref: Any = None) -> None:
        self.errors[code] += 1
        self._send_frame(session, wire.error(code, message, ref))

    def _membership(self, session: Session, room: str, ref: Any, action: Any, frame: Any) -> None:
        """Run ``action`` once ``session`` is in ``room``, keeping the client's frame order."""
        if room not in session.rooms:
            self._error(session, wire.NOT_MEMBER, f"join {room} first", ref)
            return
        pending = session.rooms[room]
        if pending is None:
            action(session, frame)
            return

        def joined(result: Any) -> Any:
            if not session.open:
                pass  # closing: not even what it sent before
            elif session.rooms.get(room, False) is None:
                action(session, frame)
            else:
                self._error(session, wire.NOT_MEMBER, f"join {room} did not complete", ref)
            return result

        pending.addBoth(joined)

    def _join(self, session: Session, frame: wire.Join) -> None:
        room = frame.room
        if room in session.rooms:
            pending = session.rooms[room]
            if pending is None:
                # Joined already: nothing changes, but the answer is as fresh as a
                # first join's, read state included.
                d = self._store.access(room, session.user, self._config.unread_max)
                d.addCallback(self._joined_again, room, frame.presence)
                d.addBoth(self._joined, session, frame)
            else:
                pending.addBoth(self._joined, session, frame)
            return
        if len(session.rooms) >= self._config.max_rooms_per_connection:
            limit = self._config.max_rooms_per_connection
            self._error(
                session, wire.FORBIDDEN, f"a connection may join at most {limit} rooms", frame.ref
            )
            return
        d = self._store.access(room, session.user, self._config.unread_max)
        session.rooms[room] = d  # joining, before any callback (a store may answer at once)
        d.addCallback(self._check_access, session, frame)
        d.addBoth(self._joined, session, frame)

    def _joined_again(self, access: Access, room: str, presence: bool) -> Deferred[_Joined]:
        online = self._online(room) if presence else succeed(None)
        return online.addCallback(lambda names: _Joined(self._last_id(room), access, names))

    def _online(self, room: str) -> Deferred[tuple[list[str], int] | None]:
        """Who is online in ``room``, or None when the presence state can't say now."""

        def unavailable(failure: Failure) -> None:
            self.log.warn(
                "presence of {room} unavailable: {error}",
                room=room,
                error=failure.getErrorMessage(),
            )

        return self.presence.online(room).addErrback(unavailable)

    def _check_access(
        self, access: Access, session: Session, frame: wire.Join
    ) -> Deferred[_Joined] | None:
        room = frame.room
        if access.banned:
            raise AccessDenied(f"you are banned from {room}")
        # The token's claim admits, unless the admin API removed the user since.
        if access.private and not access.member and (room not in session.granted or access.removed):
            raise AccessDenied(f"{room} is private")
        if room not in session.rooms or not session.open:
            return None  # left (or gone) meanwhile; _joined sorts it out
        # Counted before the list is read, so the list includes the joiner; the
        # list before the room's messages start, so joined precedes them.
        self.presence.entered(room, session.user)
        online = self._online(room) if frame.presence else succeed(None)

        def member(names: tuple[list[str], int] | None) -> Deferred[_Joined]:
            d = self.registry.join(session.transport, room)
            return d.addCallback(lambda last_id: _Joined(last_id, access, names))

        def failed(failure: Failure) -> Failure:
            self.presence.left(room, session.user)
            return failure

        return online.addCallback(member).addErrback(failed)

    def _last_id(self, room: str) -> int | None:
        hosted = self.registry.rooms.get(room)
        return (hosted.last_id or None) if hosted is not None else None

    def _joined(self, result: Any, session: Session, frame: wire.Join) -> Any:
        room = frame.room
        if isinstance(result, Failure):
            if session.rooms.get(room) is not None:
                del session.rooms[room]
            if result.check(AccessDenied):
                self._error(session, wire.FORBIDDEN, str(result.value), frame.ref)
            else:
                self._error(
                    session, wire.UNAVAILABLE, f"could not join {room}; try again", frame.ref
                )
            return None
        if room not in session.rooms or not session.open:
            # Left (or gone) while the join was under way.
            self.registry.leave(session.transport, room)
            if isinstance(result, _Joined):  # counted in presence already
                self.presence.left(room, session.user)
            if session.open:
                self._error(
                    session, wire.NOT_MEMBER, f"left {room} before the join completed", frame.ref
                )
            return result
        fresh = session.rooms[room] is not None
        if fresh:
            session.rooms[room] = None
            self.joins += 1
        fields: dict[str, Any] = {
            "room": room,
            "last_id": result.last_id or None,
            "last_read": result.access.last_read,
            "unread": result.access.unread,
        }
        if frame.presence:
            self.presence.watch(room, session.transport)
            names, count = result.online if result.online is not None else (None, None)
            fields["online"] = names
            fields["online_count"] = count
        self._send_frame(session, wire.reply("joined", frame.ref, **fields))
        if frame.presence and fresh and result.online is not None:
            # The list was read before this instance's subscription to the room
            # may have started: an event published in between was missed. Read
            # once more now that events flow, and send the list if it moved.
            self.presence.read_list(room, session.transport, unless=result.online)
        return result

    def _leave(self, session: Session, frame: wire.Leave) -> None:
        if frame.room not in session.rooms:
            self._error(session, wire.NOT_MEMBER, f"not in {frame.room}", frame.ref)
            return
        joined = session.rooms.pop(frame.room) is None
        self._out_of(session, frame.room, joined)
        self._send_frame(session, wire.reply("left", frame.ref, room=frame.room))

    def _out_of(self, session: Session, room: str, joined: bool) -> None:
        """``session`` is no longer in ``room``: no messages, and, if it had
        joined, no longer counted (nor watching) there."""
        self.registry.leave(session.transport, room)
        if joined:
            self.presence.unwatch(room, session.transport)
            self.presence.left(room, session.user)

    def _send(self, session: Session, frame: wire.Send) -> None:
        self.sends += 1
        d = self._store.append(frame.room, session.user, frame.body, frame.cid)
        d.addCallbacks(self._stored, self._not_stored, (session, frame), None, (session, frame))

    def _change(self, session: Session, frame: wire.Edit | wire.Delete) -> None:
        """An edit or delete: stored as the room's next event, then acked and
        delivered as a send is; the store decides whether it is allowed."""
        if isinstance(frame, wire.Edit):
            self.edits += 1
            d = self._store.edit(frame.room, session.user, frame.id, frame.body, frame.cid)
        else:
            self.deletes += 1
            d = self._store.delete(frame.room, session.user, frame.id)
        d.addCallbacks(self._stored, self._not_stored, (session, frame), None, (session, frame))

    def _read(self, session: Session, frame: wire.Read) -> None:
        """Stored first; then every connection of the user hears of it, here at once
        and on the other instances over the control channel."""
        d = self._store.set_read(frame.room, session.user, frame.id)

        def stored(result: tuple[int, bool]) -> None:
            marker, moved = result
            if moved:
                self.reads_stored += 1
                self._tell_read(frame.room, session.user, marker, session, frame.ref)
                payload = {
                    "op": "read",
                    "room": frame.room,
                    "user": session.user,
                    "reason": "",
                    "id": marker,
                    "from": self._origin,
                }
                self._broker.publish_control(wire.encode(payload))
            elif session.open:  # not forward of what is stored: the sender learns where it is
                self._send_frame(session, wire.reply("read", frame.ref, room=frame.room, id=marker))

        def failed(failure: Failure) -> None:
            if not session.open:
                return
            if failure.check(NotYetWritten):
                self._error(session, wire.BAD_REQUEST, str(failure.value), frame.ref)
            else:
                if not failure.check(StoreUnavailable):
                    self.log.failure("storing a read marker failed", failure)
                self._error(
                    session, wire.UNAVAILABLE, "read marker not stored; try again", frame.ref
                )

        d.addCallbacks(stored, failed)

    def _tell_read(
        self,
        room: str,
        user: str,
        marker: int,
        sender: Session | None = None,
        ref: str | int | None = None,
    ) -> None:
        """``read`` to every open connection of ``user`` here; the sender's carries its ref."""
        for session in self.users.get(user, ()):
            if session.open:
                mine = ref if session is sender else None
                self._send_frame(session, wire.reply("read", mine, room=room, id=marker))

    def online_in(self, room: str) -> Deferred[tuple[list[str], int]]:
        """Who is online in ``room`` (admin API); fails while presence is unavailable."""
        return self.presence.online(room)

    def _presence_query(self, session: Session, frame: wire.PresenceQuery) -> None:
        def answer(online: tuple[list[str], int] | None) -> None:
            if not session.open:
                return
            if online is None:
                self._error(
                    session, wire.UNAVAILABLE, "presence is unavailable; try again", frame.ref
                )
                return
            names, count = online
            self._send_frame(
                session,
                wire.reply(
                    "presence", frame.ref, room=frame.room, online=names, online_count=count
                ),
            )

        self._online(frame.room).addCallback(answer)

    def _typing_frame(self, session: Session, frame: wire.Typing) -> None:
        """Relayed at most once per ``typing_interval`` per user and room from this
        instance; extras are dropped without an answer (the protocol's choice)."""
        now = self._clock.seconds()
        key = (session.user, frame.room)
        last = self._typing.get(key)
        if last is not None and now - last < self._config.typing_interval:
            self.typing_dropped += 1
            return
        if len(self._typing) >= self._typing_prune_at:
            self._forget_typing(now)
        self._typing[key] = now
        self.typing_relayed += 1
        self.registry.relay(
            frame.room,
            session.user,
            wire.encode({"type": "typing", "room": frame.room, "user": session.user}),
        )

    def _forget_typing(self, now: float) -> None:
        """Bound the throttle's memory: entries past their interval decide nothing."""
        interval = self._config.typing_interval
        self._typing = {k: t for k, t in self._typing.items() if now - t < interval}
        # Amortised: the next sweep waits until the live entries have doubled.
        self._typing_prune_at = max(TYPING_TRACKED_MAX, 2 * len(self._typing))

    def _sinks_of(self, user: str) -> list[Transport]:
        return [s.transport for s in self.users.get(user, ()) if s.transport is not None]

    def _stored(
        self, message: StoredMessage, session: Session, frame: wire.Send | wire.Edit | wire.Delete
    ) -> None:
        # The ack goes out before the message itself reaches anyone.
        if session.open:
            self._send_frame(
                session,
                wire.ack(
                    frame.ref, message.room, message.id, message.ts, message.cid, message.duplicate
                ),
            )
        if not message.duplicate:  # a repeat was delivered when it was first stored
            self.registry.publish(message)

    def _not_stored(
        self, failure: Failure, session: Session, frame: wire.Send | wire.Edit | wire.Delete
    ) -> None:
        if failure.check(ChangeRefused):
            if session.open:
                self._error(session, refusal_code(failure.value), str(failure.value), frame.ref)
            return
        if not failure.check(StoreUnavailable):
            self.log.failure("storing a message failed", failure)
        if session.open:
            reason = str(failure.value) if failure.check(StoreUnavailable) else "storage failed"
            self._error(session, wire.UNAVAILABLE, reason, frame.ref)

    def _history_allowed(self, session: Session) -> bool:
        """The connection's history budget (bytes) is not spent.

        A frame costs one rate token whatever page it asks for, up to 100 bodies of
        4000 characters: the frame rate alone let one connection read tens of MB/s.
        Pages are charged what they carry once encoded; a page asked for while any
        budget is left is sent whole, so the budget may end below zero, and the
        next page waits until the refill has paid that back.
        """
        now = self._clock.seconds()
        refilled = (
            session.history_budget
            + (now - session.history_at) * self._config.history_bytes_per_second
        )
        session.history_budget = min(self._history_full, refilled)
        session.history_at = now
        return session.history_budget > 0

    def _history(self, session: Session, frame: wire.History) -> None:
        reading = session.history_read
        if reading is not None:
            # One page at a time: each is charged before the next is let through, so
            # a burst of requests can't all pass the budget before the first is paid.
            reading.addCallback(self._history_next, session, frame)
            return
        if not session.open:
            return
        if frame.room not in session.rooms:  # kicked while it waited its turn
            self._error(session, wire.NOT_MEMBER, f"not in {frame.room}", frame.ref)
            return
        if not self._history_allowed(session):
            self._error(
                session,
                wire.RATE_LIMITED,
                "history pages over this connection's byte budget; try again shortly",
                frame.ref,
            )
            return
        read: Deferred[None] = Deferred()
        session.history_read = read
        d = self._store.history(frame.room, frame.before, frame.after, frame.limit)

        def done(result: tuple[list[StoredMessage], bool]) -> None:
            messages, more = result
            if not session.open:
                return
            if frame.room not in session.rooms:
                # Kicked (the room made private, say) while the page was read.
                self._error(session, wire.NOT_MEMBER, f"not in {frame.room}", frame.ref)
                return
            payload = wire.reply(
                "history",
                frame.ref,
                room=frame.room,
                messages=[wire.message_fields(m) for m in messages],
                more=more,
            )
            session.history_budget -= len(payload)
            self._send_frame(session, payload)

        def failed(failure: Failure) -> None:
            if not failure.check(StoreUnavailable):
                self.log.failure("reading history failed", failure)
            if session.open:
                self._error(
                    session, wire.UNAVAILABLE, "history is unavailable; try again", frame.ref
                )

        def finished(result: Any) -> None:
            if isinstance(result, Failure):
                self.log.failure("answering a history request failed", result)
            session.history_read = None
            read.callback(None)

        d.addCallbacks(done, failed)
        d.addBoth(finished)

    def _history_next(self, _: None, session: Session, frame: wire.History) -> None:
        self._history(session, frame)
