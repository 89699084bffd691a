"""chatserver-client: a terminal chat client that survives server restarts.

    chatserver-client ws://localhost:8080/ws --user alice --room lobby [--room ops]

Lines typed on stdin go to the current room; messages print as
``[room] #id user: body``; ``/join``, ``/leave``, ``/history [N]``, ``/quit``.
``--send TEXT`` posts one message, prints its id once acked and exits.

The protocol logic is pure and separate from I/O so that tests can drive it
with plain dicts: ``Session`` turns user actions and server frames into frames
to send and events to show; ``Outbox``, ``RoomState``, ``Backoff`` and
``TokenBucket`` are its parts. ``Client`` is the Twisted/Autobahn driver that
connects, reconnects, paces frames and renders events; ``Keyboard`` reads
stdin. Importing this module installs no reactor.

Resuming after a drop (server restart, network loss): the client reconnects
with exponential backoff and jitter (so a restarted server is not hit by every
client in the same instant), rejoins its rooms and asks ``history`` ``after``
the newest id it has shown in each room, paging until ``more`` is false. Live
messages that arrive meanwhile are held and merged in id order, and every
message is shown at most once per (room, id), so nothing goes missing or
doubles however the catch-up and the live stream overlap.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from chatserver.wire import HISTORY_LIMIT_MAX, SUBPROTOCOL, is_valid_name

Frame = dict[str, Any]

DEFAULT_BACKLOG = 20
DEFAULT_OLDER = 20
CATCHUP_PAGE = HISTORY_LIMIT_MAX
QUIT_GRACE = 5.0  # seconds /quit waits for acks of messages already sent
CONNECT_TIMEOUT = 10.0

# Close codes after which reconnecting with the same credentials cannot help.
FATAL_CLOSE_CODES = {
    4001: "token expired: get a new token",
    4003: "banned from this server",
}
# Handshake statuses that mean the same (a 429 or 503 is worth retrying).
FATAL_HANDSHAKE = {400: "bad request", 401: "not authenticated", 403: "forbidden", 404: "no /ws"}


# --- frames -------------------------------------------------------------------


def make_frame(kind: str, ref: str | int | None = None, **fields: Any) -> Frame:
    """A client frame; fields that are None are left out (the protocol has no nulls in
    requests: a missing ``before`` means "newest", a null one would be a bad_request)."""
    frame: Frame = {"type": kind, **{k: v for k, v in fields.items() if v is not None}}
    if ref is not None:
        frame["ref"] = ref
    return frame


@dataclass(frozen=True, slots=True)
class Message:
    """A chat message as the server stored it."""

    room: str
    id: int
    user: str
    body: str
    ts: int

    @classmethod
    def from_frame(cls, obj: dict[str, Any]) -> Message:
        return cls(obj["room"], obj["id"], obj["user"], obj["body"], obj.get("ts", 0))


# --- events the session asks the front end to show ------------------------------


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
    """One of our messages is stored: by its ``ack``, or found in history after a drop."""

    local: int
    room: str
    id: int


@dataclass(frozen=True, slots=True)
class Resync:
    """The connection cannot be trusted to be complete (a catch-up failed): drop it and
    reconnect later, which redoes the joins and the catch-up."""

    reason: str


Event = Message | Notice | Problem | Acked | Resync


# --- small parts ------------------------------------------------------------------


class Backoff:
    """Exponential backoff with "equal jitter": the n-th retry waits between half and
    all of ``min(cap, base * 2**n)``. The growth keeps a dead server from being
    hammered; the jitter spreads thousands of clients that lost the same server in
    the same instant over the window instead of reconnecting in one burst; the
    lower half-bound keeps a client from spinning on immediate retries."""

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """After a connection opened: the next drop starts from short delays again."""
        self.attempt = 0


class TokenBucket:
    """Client-side pacing under the server's rate limit (20 frames/s, burst 40 by
    default). A client in many rooms rejoins and catches up with two or more frames
    per room at once; unpaced, that burst would be answered ``rate_limited``."""

    def __init__(self, rate: float = 10.0, burst: int = 20) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay(self, now: float) -> float:
        """Seconds until a frame may go (0: now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1


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
        item = Outgoing(next(self._local), room, body)
        self.items.append(item)
        return item

    def queued(self, room: str) -> list[Outgoing]:
        return [i for i in self.items if i.room == room and i.state == QUEUED]

    def mark_sent(self, item: Outgoing, ref: str) -> None:
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
        dropped = [i for i in self.items if i.room == room]
        self.items = [i for i in self.items if i.room != room]
        return dropped

    def waiting(self) -> int:
        """Messages sent on this connection and not yet acked."""
        return sum(1 for i in self.items if i.state == SENT)


OFFLINE, JOINING, BACKLOG, CATCHUP, LIVE = "offline", "joining", "backlog", "catchup", "live"


@dataclass(slots=True)
class RoomState:
    """What the client knows of one room it is in.

    ``cursor``: every message of the room up to this id has been shown, or predates
    the first join (its ``last_id``); a reconnect asks ``history after cursor``.
    ``oldest``: the oldest id shown, where ``/history`` continues backwards.
    ``seen``: ids shown, the de-duplication key with the room name.
    ``held``: live messages that came while the catch-up was still running, shown
    after it in id order. ``older``: a ``/history`` page asked for meanwhile.
    """

    name: str
    cursor: int | None = None
    oldest: int | None = None
    seen: set[int] = field(default_factory=set)
    phase: str = OFFLINE
    held: list[Message] = field(default_factory=list)
    older: int = 0

    def accept(self, message: Message, stream: bool = True) -> bool:
        """True the first time a message id is offered; then it counts as shown.

        ``stream``: the message came live or from a catch-up page, which together
        have no gaps, so the cursor may move up to it. A backlog or ``/history``
        page does not move it: a newer message on such a page may have overtaken
        its live copy, and a gap below it must still be fetched after a drop.
        """
        if stream:
            self.cursor = message.id if self.cursor is None else max(self.cursor, message.id)
        if message.id in self.seen:
            return False
        self.seen.add(message.id)
        self.oldest = message.id if self.oldest is None else min(self.oldest, message.id)
        return True


# --- the session ------------------------------------------------------------------


class Session:
    """The protocol logic of one user across any number of connections, without I/O.

    Call ``connected``/``disconnected`` as the transport comes and goes, ``handle``
    with each frame from the server, and ``join``/``leave``/``say``/``older`` for
    what the user does; then ``drain`` returns the frames to send and the events
    to show, in order.
    """

    def __init__(
        self,
        user: str | None,
        rooms: Iterable[str] = (),
        backlog: int = DEFAULT_BACKLOG,
        page: int = CATCHUP_PAGE,
    ) -> None:
        self.user = user
        self.backlog = backlog
        self.page = page
        self.rooms: dict[str, RoomState] = {}
        for room in rooms:
            self.rooms.setdefault(room, RoomState(room))
        self.current: str | None = next(iter(self.rooms), None)
        self.outbox = Outbox()
        self.online = False
        self._refs = itertools.count(1)
        self._pending: dict[str, tuple[str, str]] = {}  # ref -> (purpose, room)
        self._frames: list[Frame] = []
        self._events: list[Event] = []

    # outputs

    def drain(self) -> tuple[list[Frame], list[Event]]:
        frames, events = self._frames, self._events
        self._frames, self._events = [], []
        return frames, events

    def _request(self, kind: str, purpose: str, room: str, **fields: Any) -> str:
        ref = f"c{next(self._refs)}"
        self._pending[ref] = (purpose, room)
        self._frames.append(make_frame(kind, ref, room=room, **fields))
        return ref

    def _problem(self, code: str, message: str) -> None:
        self._events.append(Problem(code, message))

    def _notice(self, text: str) -> None:
        self._events.append(Notice(text))

    # the transport

    def connected(self) -> None:
        """A new connection is open: rejoin every room; each catches up once joined."""
        self.online = True
        self._pending.clear()
        for state in self.rooms.values():
            state.phase = JOINING
            state.held.clear()
            self._request("join", "join", state.name)

    def disconnected(self) -> None:
        """Held messages are forgotten (the catch-up after the reconnect fetches them
        again); messages sent without an ack become unconfirmed."""
        self.online = False
        self._pending.clear()
        for state in self.rooms.values():
            state.phase = OFFLINE
            state.held.clear()
        self.outbox.connection_lost()

    def resumed(self) -> bool:
        """Connected, and every room joined and caught up."""
        return self.online and all(s.phase == LIVE for s in self.rooms.values())

    # what the user does

    def join(self, room: str) -> None:
        if not is_valid_name(room):
            self._problem("bad_request", "room must be 1-64 characters of A-Z a-z 0-9 _ . : -")
            return
        self.current = room
        if room in self.rooms:
            self._notice(f"now in {room}")
            return
        state = self.rooms[room] = RoomState(room)
        if self.online:
            state.phase = JOINING
            self._request("join", "join", room)

    def leave(self, room: str | None = None) -> None:
        room = room or self.current
        if room is None or room not in self.rooms:
            self._problem("not_member", f"not in room {room}")
            return
        del self.rooms[room]
        for item in self.outbox.drop_room(room):
            self._problem("not_sent", f"left {room} before this was sent: {_excerpt(item.body)}")
        if self.current == room:
            self.current = next(reversed(self.rooms), None)
        if self.online:
            self._request("leave", "leave", room)
        else:
            self._notice(f"left {room}")

    def say(self, body: str, room: str | None = None) -> Outgoing | None:
        room = room or self.current
        if room is None or room not in self.rooms:
            self._problem("not_member", "join a room first: /join ROOM")
            return None
        item = self.outbox.add(room, body)
        if self.rooms[room].phase == LIVE:
            self._send_item(item)
        elif not self.online:
            self._notice("not connected: queued until connected")
        return item

    def older(self, limit: int = DEFAULT_OLDER) -> None:
        """The page of messages before the oldest one shown in the current room."""
        room = self.current
        if room is None or room not in self.rooms:
            self._problem("not_member", "join a room first: /join ROOM")
            return
        state = self.rooms[room]
        if state.phase != LIVE:
            state.older = limit  # asked once the room is joined and caught up
            return
        self._request("history", "older", room, before=state.oldest, limit=limit)

    def _send_item(self, item: Outgoing) -> None:
        ref = self._request("send", "send", item.room, body=item.body)
        self.outbox.mark_sent(item, ref)

    # frames from the server

    def handle(self, frame: Any) -> None:
        """One frame from the server. Unknown types are ignored, as the protocol asks."""
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        ref = frame.get("ref")
        purpose, room = (
            self._pending.pop(ref, (None, None)) if isinstance(ref, str) else (None, None)
        )
        if kind == "message":
            self._on_message(frame)
        elif kind == "joined" and purpose == "join":
            self._on_joined(room, frame.get("last_id"))
        elif kind == "history" and purpose in ("backlog", "catchup", "older"):
            self._on_history(purpose, room, frame)
        elif kind == "ack":
            item = self.outbox.answered(ref) if isinstance(ref, str) else None
            if item is not None:
                self._events.append(Acked(item.local, item.room, frame["id"]))
        elif kind == "left":
            self._notice(f"left {frame.get('room')}")
        elif kind == "kicked":
            self._on_kicked(frame)
        elif kind == "error":
            self._on_error(purpose, room, ref, frame)

    def _on_message(self, obj: dict[str, Any]) -> None:
        try:
            message = Message.from_frame(obj)
        except (KeyError, TypeError):
            return
        state = self.rooms.get(message.room)
        if state is None:
            return  # a room we just left
        if state.phase == LIVE:
            self._deliver(state, message)
        elif state.phase != OFFLINE:
            state.held.append(message)

    def _on_joined(self, room: str | None, last_id: Any) -> None:
        state = self.rooms.get(room or "")
        if state is None:
            return  # left again before the join was answered
        if not isinstance(last_id, int):
            last_id = None
        self._notice(f"joined {state.name}")
        if state.cursor is None:
            # First join: everything up to last_id is the past, shown as a backlog
            # and reachable with /history; only what is newer must not be missed.
            state.cursor = last_id or 0
            if self.backlog and last_id:
                state.phase = BACKLOG
                self._request("history", "backlog", state.name, limit=self.backlog)
                return
        elif last_id is not None and last_id > state.cursor:
            state.phase = CATCHUP
            self._request("history", "catchup", state.name, after=state.cursor, limit=self.page)
            return
        self._go_live(state)

    def _on_history(self, purpose: str, room: str | None, frame: dict[str, Any]) -> None:
        state = self.rooms.get(room or "")
        if state is None:
            return
        try:
            messages = [Message.from_frame(m) for m in frame.get("messages") or []]
        except (KeyError, TypeError):
            messages = []
        for message in messages:
            self._deliver(state, message, stream=purpose == "catchup")
        if purpose == "older":
            if not frame.get("more"):
                self._notice(f"no older messages in {state.name}")
            return
        if purpose == "catchup" and frame.get("more") and messages:
            self._request("history", "catchup", state.name, after=messages[-1].id, limit=self.page)
            return
        self._go_live(state)

    def _go_live(self, state: RoomState) -> None:
        state.phase = LIVE
        held, state.held = sorted(state.held, key=lambda m: m.id), []
        for message in held:
            self._deliver(state, message)
        self.outbox.settle(state.name)
        for item in self.outbox.queued(state.name):
            self._send_item(item)
        if state.older:
            limit, state.older = state.older, 0
            self._request("history", "older", state.name, before=state.oldest, limit=limit)

    def _deliver(self, state: RoomState, message: Message, stream: bool = True) -> None:
        if not state.accept(message, stream):
            return
        self._events.append(message)
        if self.user is not None and message.user == self.user:
            item = self.outbox.match(message.room, message.body)
            if item is not None:
                self._events.append(Acked(item.local, message.room, message.id))

    def _on_kicked(self, frame: dict[str, Any]) -> None:
        room = frame.get("room")
        if isinstance(room, str) and self.rooms.pop(room, None) is not None:
            self.outbox.drop_room(room)
            if self.current == room:
                self.current = next(reversed(self.rooms), None)
            self._problem("kicked", f"removed from {room} ({frame.get('reason')})")

    def _on_error(
        self, purpose: str | None, room: str | None, ref: Any, frame: dict[str, Any]
    ) -> None:
        code = str(frame.get("code"))
        text = str(frame.get("message"))
        if purpose == "join" and room in self.rooms:
            if code in ("unavailable", "rate_limited"):
                self._events.append(Resync(f"join {room}: {code}"))
            else:
                del self.rooms[room]  # refused for good: not rejoined on reconnect
                self.outbox.drop_room(room)
                if self.current == room:
                    self.current = next(reversed(self.rooms), None)
            self._problem(code, f"join {room}: {text}")
        elif purpose in ("backlog", "catchup"):
            self._problem(code, f"history of {room}: {text}")
            self._events.append(Resync(f"catch-up of {room}: {code}"))
        elif purpose == "send":
            item = self.outbox.answered(ref)
            sent = f" (not sent: {_excerpt(item.body)})" if item is not None else ""
            self._problem(code, f"{text}{sent}")
        else:
            self._problem(code, text)


# --- pure helpers for the front end -------------------------------------------------


def _excerpt(body: str, width: int = 60) -> str:
    """Enough of a body to recognise it in an error line."""
    return body if len(body) <= width else body[: width - 3] + "..."


_UNSAFE = {"Cc", "Cs"}
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences could move the
    cursor, rewrite earlier lines or set the window title) and bidi overrides (which
    could make a line read as something else) are shown escaped, not interpreted."""
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if ch in _BIDI or unicodedata.category(ch) in _UNSAFE
        else ch
        for ch in text
    )


def format_message(message: Message) -> str:
    return f"[{message.room}] #{message.id} {message.user}: {printable(message.body)}"


def close_verdict(code: int | None, reason: str | None) -> str | None:
    """Why reconnecting cannot help, or None when it can (a restart, a network drop,
    a busy server). Autobahn reports a refused handshake as an abnormal close whose
    reason carries the HTTP status."""
    if code in FATAL_CLOSE_CODES:
        return FATAL_CLOSE_CODES[code]
    found = re.search(r"upgrade failed \[(\d{3})\]", reason or "")
    if found and int(found.group(1)) in FATAL_HANDSHAKE:
        status = int(found.group(1))
        return f"handshake refused: {status} {FATAL_HANDSHAKE[status]}"
    return None


def with_credentials(url: str, user: str | None, token: str | None) -> str:
    """The WebSocket URL with ``token=`` (token mode) or ``user=`` (development mode)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url}")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("user", "token")]
    query.append(("token", token) if token else ("user", user or ""))
    return urlunsplit(parts._replace(query=urlencode(query), path=parts.path or "/ws"))


def token_user(token: str) -> str | None:
    """The ``sub`` of a JWT, unverified: only to recognise our own messages in history
    (the server verifies the token; the client cannot and need not)."""
    import jwt

    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None
    return sub if isinstance(sub, str) else None


HELP = (
    "commands: /join ROOM, /leave [ROOM], /history [N], /rooms, /quit;"
    " other lines are sent to the current room (start with // to send a line beginning with /)"
)


def parse_line(line: str) -> tuple[str, str]:
    """A typed line as (command, argument); command "say" for a message."""
    if line.startswith("//"):
        return "say", line[1:]
    if line.startswith("/"):
        command, _, arg = line[1:].partition(" ")
        return command.lower(), arg.strip()
    return "say", line


# --- the Twisted driver: connection, reconnects, pacing, terminal ----------------


class ChatClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.factory.client.received(self, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client.closed(self, code, reason)


class Client:
    """Connects, reconnects with backoff, paces frames, shows what the session says.

    ``script`` (``--send``): no reconnect; the first ack or error ends the program.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        session: Session,
        write: Callable[[str], None],
        write_err: Callable[[str], None],
        script: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.url = url
        self.session = session
        self.write = write
        self.write_err = write_err
        self.script = script
        self.backoff = Backoff(rng=rng)
        self.bucket = TokenBucket()
        self.proto: Any = None
        self.exit_code: int | None = None
        self.quitting = False
        self._closing = False
        self._queue: deque[bytes] = deque()
        self._pump_call: Any = None
        self._retry_call: Any = None
        self._quit_call: Any = None
        self._script_item: Outgoing | None = None
        self._resumed = False

    # connecting

    def start(self) -> None:
        if self.script is not None:
            self._script_item = self.session.say(self.script)
            self.session.drain()
        self._connect()

    def _endpoint(self) -> Any:

        secure, host, port, *_ = parse_url(self.url)
        tcp = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        if secure:
            return endpoints.wrapClientTLS(ssl.optionsForClientTLS(host), tcp)
        return tcp

    def _connect(self) -> None:
        self._retry_call = None
        factory = WebSocketClientFactory(self.url, protocols=[SUBPROTOCOL])
        factory.protocol = ChatClientProtocol
        factory.client = self
        factory.setProtocolOptions(
            # Our own pings find a dead network (no RST ever comes) within ~25 s.
            autoPingInterval=15,
            autoPingTimeout=10,
            openHandshakeTimeout=CONNECT_TIMEOUT,
            closeHandshakeTimeout=5,
        )
        self.log.info("connecting to {url}", url=self.url)
        d = self._endpoint().connect(factory)
        d.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Any) -> None:
        reason = failure.getErrorMessage()
        self.log.info("connection failed: {reason}", reason=reason)
        self._lost(f"cannot connect ({reason})", None)

    def opened(self, proto: Any) -> None:
        self.proto = proto
        self._resumed = False
        self.bucket = TokenBucket()
        self._show([Notice(f"connected to {self.url.split('?')[0]}")])
        self.session.connected()
        self._flush()

    def received(self, proto: Any, payload: bytes) -> None:
        if proto is not self.proto:
            return
        try:
            frame = json.loads(payload)
        except ValueError:
            self.log.warn("ignoring a frame that is not JSON: {payload!r}", payload=payload)
            return
        self.log.debug("< {frame}", frame=frame)
        self.session.handle(frame)
        self._flush()

    def closed(self, proto: Any, code: int | None, reason: str | None) -> None:
        was_open = proto is self.proto
        if was_open:
            self.proto = None
            self._queue.clear()
            self.session.disconnected()
            self.session.drain()
        verdict = close_verdict(code, reason)
        if self._closing:
            self._stop(self.exit_code or 0)
        elif verdict is not None:
            self.write_err(f"! {verdict}")
            self._stop(1)
        else:
            what = f"connection closed ({code} {reason or ''})".replace(" )", ")")
            self._lost(what if was_open else f"cannot connect ({reason or code})", code)

    def _lost(self, what: str, code: int | None) -> None:
        if self.quitting and not self.session.outbox.items:
            self._stop(self.exit_code or 0)
            return
        if self.script is not None:
            self.write_err(f"! {what}: the message may not have been stored")
            self._stop(1)
            return
        delay = self.backoff.next_delay()
        self._show([Notice(f"{what}; reconnecting in {delay:.1f}s")])
        self._retry_call = self.reactor.callLater(delay, self._connect)

    # sending, paced

    def _flush(self) -> None:
        frames, events = self.session.drain()
        for frame in frames:
            self.log.debug("> {frame}", frame=frame)
            self._queue.append(json.dumps(frame, ensure_ascii=False).encode())
        self._pump()
        if self.proto is not None and not self._resumed and self.session.resumed():
            # Only a connection that got every room back live counts as a success:
            # one whose catch-up keeps failing must keep backing off.
            self._resumed = True
            self.backoff.reset()
        self._show(events)
        if self.quitting and not self._closing and not self.session.outbox.items:
            self._close()

    def _pump(self) -> None:
        self._pump_call = None
        while self._queue and self.proto is not None:
            wait = self.bucket.delay(self.reactor.seconds())
            if wait > 0:
                self._pump_call = self.reactor.callLater(wait, self._pump)
                return
            self.bucket.take(self.reactor.seconds())
            self.proto.sendMessage(self._queue.popleft())

    # showing

    def _show(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Message):
                if self.script is None:
                    self.write(format_message(event))
            elif isinstance(event, Notice):
                if self.script is None:
                    self.write(f"* {event.text}")
            elif isinstance(event, Problem):
                self.write_err(f"! {event.code}: {printable(event.message)}")
                if self.script is not None:
                    self._finish(1)
            elif isinstance(event, Acked):
                if self._script_item is not None and event.local == self._script_item.local:
                    self.write(str(event.id))
                    self._finish(0)
            elif isinstance(event, Resync) and self.proto is not None:
                self.log.warn("reconnecting: {reason}", reason=event.reason)
                self.proto.sendClose(1000, event.reason[:100])

    # the user

    def line(self, text: str) -> None:
        command, arg = parse_line(text)
        if command == "say":
            if arg.strip():
                self.session.say(arg)
        elif command == "join" and arg:
            self.session.join(arg)
        elif command == "leave":
            self.session.leave(arg or None)
        elif command == "history":
            limit = int(arg) if arg.isdigit() else DEFAULT_OLDER
            self.session.older(max(1, min(HISTORY_LIMIT_MAX, limit)))
        elif command == "rooms":
            names = ", ".join(self.session.rooms) or "none"
            self._show([Notice(f"rooms: {names}; current: {self.session.current}")])
        elif command == "quit":
            self.quit()
            return
        elif command == "help":
            self._show([Notice(HELP)])
        else:
            self._show([Problem("usage", HELP)])
        self._flush()

    def quit(self) -> None:
        """Leave once every message written is acked, or after QUIT_GRACE seconds; so
        ``printf 'hi\\n' | chatserver-client ...`` posts its lines before it exits,
        even if stdin ends before the connection is up."""
        if self.quitting:
            return
        self.quitting = True
        if not self.session.outbox.items:
            self._close()
        else:
            self._quit_call = self.reactor.callLater(QUIT_GRACE, self._give_up)

    def _give_up(self) -> None:
        self._quit_call = None
        for item in self.session.outbox.items:
            self.write_err(f"! not sent: {_excerpt(item.body)}")
        self.exit_code = 1
        self._close()

    def _finish(self, code: int) -> None:
        """Script mode is done: close cleanly, then stop with this exit code."""
        if self.exit_code is None:
            self.exit_code = code
            self.quitting = True
            self._close()

    def _close(self) -> None:
        self._closing = True
        if self.proto is not None:
            self.proto.sendClose(1000)
        else:
            self._stop(self.exit_code or 0)

    def _stop(self, code: int) -> None:
        if self.exit_code is None or self.exit_code == 0:
            self.exit_code = code
        for call in (self._pump_call, self._retry_call, self._quit_call):
            if call is not None and call.active():
                call.cancel()
        if self.reactor.running:
            self.reactor.stop()


@implementer(IHalfCloseableProtocol)
class Keyboard(LineReceiver):
    """Stdin lines to the client; stdout for what it shows. End of input is /quit,
    with stdout kept open (half-close) so the last messages and acks still print."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 16

    def __init__(self, client: Client) -> None:
        self.client = client

    def lineReceived(self, line: bytes) -> None:
        self.client.line(line.decode("utf-8", errors="replace").rstrip("\r"))

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would close stdin and stdout; a long paste is not worth that.
        self.client.write_err("! line too long: not sent")

    def readConnectionLost(self) -> None:
        self.client.quit()

    def writeConnectionLost(self) -> None:
        self.client.quit()

    def connectionLost(self, reason: Any = None) -> None:
        self.client.quit()

    def show(self, text: str) -> None:
        if self.transport is not None:
            self.transport.write(text.encode("utf-8", errors="replace") + b"\n")


# --- the program -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chatserver-client",
        description="Terminal chat client for chatserver (protocol v1). Lines on stdin go"
        " to the current room; " + HELP + ".",
    )
    parser.add_argument("url", help="WebSocket URL, e.g. ws://localhost:8080/ws")
    parser.add_argument("--user", help="user name (auth = none); with --token, defaults to its sub")
    parser.add_argument("--token", help="JWT (auth = token)")
    parser.add_argument(
        "--room",
        action="append",
        default=[],
        help="room to join (repeatable; the first is current)",
    )
    parser.add_argument("--send", metavar="TEXT", help="send TEXT to the first room, print its id")
    parser.add_argument(
        "--backlog",
        type=int,
        default=DEFAULT_BACKLOG,
        help=f"recent messages shown when joining a room (0-{HISTORY_LIMIT_MAX})",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: frames)")
    args = parser.parse_args(argv)
    if not args.user and not args.token:
        parser.error("give --user NAME (development mode) or --token JWT")
    if args.user and not is_valid_name(args.user):
        parser.error("--user must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    for room in args.room:
        if not is_valid_name(room):
            parser.error(f"bad room name {room!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    if args.send is not None and not args.room:
        parser.error("--send needs a --room")
    if args.send == "":
        parser.error("--send needs a non-empty TEXT")
    if not 0 <= args.backlog <= HISTORY_LIMIT_MAX:
        parser.error(f"--backlog must be 0-{HISTORY_LIMIT_MAX}")
    try:
        args.url = with_credentials(args.url, args.user, args.token)
    except ValueError as e:
        parser.error(str(e))
    return args


def _start_logging(verbose: int) -> None:
    level = [LogLevel.warn, LogLevel.info, LogLevel.debug][min(verbose, 2)]
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    # stdout is the chat itself: logs must not be mixed into it.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _start_logging(args.verbose)

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    user = args.user or (token_user(args.token) if args.token else None)
    script = args.send
    session = Session(
        user,
        args.room[:1] if script is not None else args.room,
        backlog=0 if script is not None else args.backlog,
    )

    def write_err(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    if script is not None:

        def write(text: str) -> None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

        client = Client(reactor, args.url, session, write, write_err, script=script)
    else:
        keyboard: Any = None
        client = Client(reactor, args.url, session, lambda t: keyboard.show(t), write_err)
        keyboard = Keyboard(client)
        StandardIO(keyboard, reactor=reactor)
    reactor.callWhenRunning(client.start)
    reactor.run()
    return client.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
