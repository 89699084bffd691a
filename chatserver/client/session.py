"""The client's session logic, sans I/O: no sockets, no reactor, no terminal, no timers.

Why sans I/O: resuming after a drop is the part of the client that must be
right (nothing missing, nothing doubled, nothing out of order), and it is easy
to get wrong in the corners (a live message overtaking a catch-up page, an ack
lost with the connection). Here it is a plain object that takes frames (dicts)
and user actions in and gives frames to send and events to show out, so tests
drive every such corner with dicts and no server. The policies the driver
applies over time, ``Backoff`` (reconnects), ``TokenBucket`` (pacing) and
``Throttle`` (status lines), take the time or the randomness as parameters for
the same reason; the session reads the time from the ``clock`` it is given
(the driver's reactor, or a fake one in tests) and schedules nothing itself.

Resuming after a drop (server restart, network loss): the client reconnects
with exponential backoff and jitter (so a restarted server is not hit by every
client in the same instant), rejoins its rooms and asks ``history`` ``after``
the newest id it has shown in each room, paging until ``more`` is false. Live
messages that arrive meanwhile are held and merged in id order, and every
message is shown at most once per (room, id), so nothing goes missing or
doubles however the catch-up and the live stream overlap. Messages written
meanwhile wait in the ``Outbox`` (``chatserver.client.outbox``).

Every send carries a ``cid`` (protocol 1.1), kept across retries: a message
whose ack was lost is recognised by its cid if the catch-up has it, and sent
again with the same cid if not, which the server never stores twice. Edits and
deletes go the same way. They are events with ids of their own in the room's
sequence, so they count as seen like messages do.

Read markers (protocol 1.1): what was shown live, in a backlog or in a catch-up
(not ``/history``, which is scroll-back) is marked read with a ``read`` frame
carrying the newest id shown in the room, so the user's other devices and the
next ``joined`` (``last_read``, ``unread``) know. Markers are coalesced: one per
room per ``READ_INTERVAL`` at most, and only past the marker the server has or
was sent. They go when the driver calls ``send_reads`` (``read_delay`` says
when), with a budget, so that they use the spare part of the client's pacing
and never hold up what the user sends.

Presence (protocol 1.1): every room is joined with ``presence: true`` (again
after each reconnect), so ``joined`` carries who is online (``online``, at most
the server's ``presence_list_max`` names, and the exact ``online_count``) and
``presence`` events follow, one per user coming online or going offline in the
room on any instance. A ``presence`` frame with a list (the server's answer to
a burst of joins, or to ``who``) replaces what was known without a word, so a
burst cannot flood the terminal. Only changes in the current room are shown,
never our own user's; ``who`` asks the server for a fresh list of the current
room and shows it when the answer (matched by its ref) comes.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chatserver.client.events import (
    Acked,
    Event,
    Frame,
    Message,
    Notice,
    Problem,
    Resync,
    int_field,
    make_frame,
)
from chatserver.client.outbox import DELETE, EDIT, SEND, Outbox, Outgoing
from chatserver.wire import HISTORY_LIMIT_MAX, is_valid_name

DEFAULT_BACKLOG = 20
DEFAULT_OLDER = 20
CATCHUP_PAGE = HISTORY_LIMIT_MAX
READ_INTERVAL = 1.0  # seconds between two read markers of one room
TYPING_INTERVAL = 5.0  # seconds between two "is typing" lines of one user in one room
TYPING_TRACKED_MAX = 1024  # (room, user) pairs the typing throttle keeps before pruning
# Read errors worth a retry (with a later marker or after the interval); others
# would only repeat, so the marker is taken as sent.
READ_RETRY_CODES = {"unavailable", "rate_limited"}


# --- the policies over time: time and randomness come in as parameters --------------


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
        """Seconds to wait before the next attempt; each call counts as one attempt.
        The exponent is bounded so a client that stays offline for days cannot
        overflow the float before ``cap`` applies."""
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
        """A frame goes now. Callers ask ``delay`` first; the bucket does not refuse,
        so that it never has to decide what happens to a frame."""
        self._refill(now)
        self._tokens -= 1

    def available(self, now: float) -> float:
        """Frames that could go now without waiting (whole or not)."""
        self._refill(now)
        return self._tokens


class Throttle:
    """At most one event per key per ``interval``: a status line that would repeat
    what was said a moment ago (bob is typing, and typing, and typing) is dropped.
    A clock that went back counts as the interval having passed, so a wall-clock
    correction cannot silence a key for the length of the jump."""

    def __init__(self, interval: float, tracked_max: int = TYPING_TRACKED_MAX) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._prune_at = tracked_max
        self._tracked_max = tracked_max

    def allow(self, key: Hashable, now: float) -> bool:
        """True (and counted) if ``key`` was not allowed within the interval before now."""
        last = self._last.get(key)
        if last is not None and 0 <= now - last < self.interval:
            return False
        if len(self._last) >= self._prune_at:
            # Bounded memory; amortised: the next sweep waits until live keys double.
            self._last = {k: t for k, t in self._last.items() if 0 <= now - t < self.interval}
            self._prune_at = max(self._tracked_max, 2 * len(self._last))
        self._last[key] = now
        return True


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
    ``newest``: the newest id shown live, in a backlog or in a catch-up, which is
    what a read marker says was read (``/history`` pages are scroll-back).
    ``read``: the marker the server is known to have (``joined``, ``read``);
    ``read_sent``: the last one sent on this connection; ``read_at``: when.
    ``online``: the users known online in the room (the server's list, perhaps
    partial, kept up by events), and ``online_count`` the exact count; None
    while unknown (offline, or the server's presence state unavailable).
    ``who``: a ``who`` asked for before the room was joined, sent once it is.
    """

    name: str
    cursor: int | None = None
    oldest: int | None = None
    seen: set[int] = field(default_factory=set)
    phase: str = OFFLINE
    held: list[Message] = field(default_factory=list)
    older: int = 0
    newest: int | None = None
    read: int | None = None
    read_sent: int | None = None
    read_at: float | None = None
    online: set[str] | None = None
    online_count: int | None = None
    who: bool = False

    def unmarked(self) -> bool:
        """Something was shown past every marker the server has or was sent."""
        marker = max(self.read or 0, self.read_sent or 0)
        return self.newest is not None and self.newest > marker

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

    def set_online(self, names: Any, count: Any) -> None:
        """A presence list (``joined``, or a ``presence`` frame): it replaces what was
        known. Names that are not valid user names are left out; a count below the
        names listed cannot be right and is raised to it. Nulls: unknown."""
        if not isinstance(names, list):
            self.online = self.online_count = None
            return
        self.online = {n for n in names if isinstance(n, str) and is_valid_name(n)}
        known = int_field(count)
        self.online_count = None if known is None else max(known, len(self.online))

    def went(self, user: str, online: bool) -> bool:
        """A presence event; True if it tells something new (and then counts it).

        An event is a change (first connection in, last one out), so while the
        state is unknown every event is news. Else an event that changes nothing
        (it crossed a list that already had it) is not: bob is not announced
        twice, nor is the count moved twice. A user going offline who is not
        listed may still be one of those the list left out (``online_count``
        above the names): then the count goes down."""
        known = self.online
        if known is None:
            return True
        count = self.online_count
        if online:
            if user in known:
                return False
            known.add(user)
            if count is not None:
                self.online_count = count + 1
            return True
        if user in known:
            known.discard(user)
            if count is not None:
                self.online_count = max(len(known), count - 1)
            return True
        if count is not None and count > len(known):
            self.online_count = count - 1
            return True
        return False

    def who_line(self) -> str:
        """``[room] 3 online: alice, bob, carol``, sorted, ``, and N more`` when the
        list is partial (just ``[room] 3 online`` when it names nobody)."""
        if self.online is None or self.online_count is None:
            return f"[{self.name}] online: unknown"
        if not self.online:
            return f"[{self.name}] {self.online_count} online"
        names = sorted(self.online)
        more = self.online_count - len(names)
        if more > 0:
            names.append(f"and {more} more")
        return f"[{self.name}] {self.online_count} online: {', '.join(names)}"


# --- the session ------------------------------------------------------------------


class Session:
    """The protocol logic of one user across any number of connections, without I/O.

    Call ``connected``/``disconnected`` as the transport comes and goes, ``handle``
    with each frame from the server, and ``join``/``leave``/``say``/``edit``/
    ``delete``/``older`` for what the user does; then ``drain`` returns the frames
    to send and the events to show, in order. Read markers wait for
    ``send_reads``, which the driver calls ``read_delay`` seconds later.

    ``clock``: seconds, monotonic or wall (the driver passes its reactor's); tests
    pass a fake one. ``mark_read``: false for a front end that shows nothing
    (``--send``), whose messages are then not marked read. ``presence``: join
    with ``presence: true`` (false for such a front end too: it would show none).
    """

    def __init__(
        self,
        user: str | None,
        rooms: Iterable[str] = (),
        backlog: int = DEFAULT_BACKLOG,
        page: int = CATCHUP_PAGE,
        clock: Callable[[], float] = time.monotonic,
        mark_read: bool = True,
        read_interval: float = READ_INTERVAL,
        typing_interval: float = TYPING_INTERVAL,
        presence: bool = True,
    ) -> None:
        self.user = user
        self.backlog = backlog
        self.page = page
        self.clock = clock
        self.mark_read = mark_read
        self.read_interval = read_interval
        self.presence = presence
        self.typing_shown = Throttle(typing_interval)
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
        """The frames to send and the events to show since the last drain, in order.
        Collected rather than returned by each call, so that one input (a join answer,
        say) can yield several frames and events without the caller caring which."""
        frames, events = self._frames, self._events
        self._frames, self._events = [], []
        return frames, events

    def _request(self, kind: str, purpose: str, room: str, **fields: Any) -> str:
        ref = f"c{next(self._refs)}"
        self._pending[ref] = (purpose, room)
        self._frames.append(make_frame(kind, ref, room=room, **fields))
        return ref

    def _join(self, room: str) -> None:
        self._request("join", "join", room, presence=True if self.presence else None)

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
            self._join(state.name)

    def disconnected(self) -> None:
        """Held messages are forgotten (the catch-up after the reconnect fetches them
        again); messages sent without an ack become unconfirmed. Who is online is
        unknown until the rejoin says; a ``who`` not answered is asked again then."""
        self.online = False
        for purpose, room in self._pending.values():
            if purpose == "who" and room in self.rooms:
                self.rooms[room].who = True
        self._pending.clear()
        for state in self.rooms.values():
            state.phase = OFFLINE
            state.held.clear()
            state.online = state.online_count = None
        self.outbox.connection_lost()

    def resumed(self) -> bool:
        """Connected, and every room joined and caught up."""
        return self.online and all(s.phase == LIVE for s in self.rooms.values())

    # what the user does

    def join(self, room: str) -> None:
        """Join a room (or make it current if already in it). Offline, the join waits
        for ``connected``, which joins every room the session has."""
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
            self._join(room)

    def leave(self, room: str | None = None) -> None:
        """Leave a room (default: the current one). Its unsent messages are reported
        as not sent: they could only ever be sent to a room we are in."""
        room = room or self.current
        if room is None or room not in self.rooms:
            self._problem("not_member", f"not in room {room}")
            return
        del self.rooms[room]
        for item in self.outbox.drop_room(room):
            self._problem("not_sent", f"left {room} before this was sent: {item.summary()}")
        if self.current == room:
            self.current = next(reversed(self.rooms), None)
        if self.online:
            self._request("leave", "leave", room)
        else:
            self._notice(f"left {room}")

    def say(self, body: str, room: str | None = None) -> Outgoing | None:
        """Post a message to a room (default: the current one); None if not in it.
        It waits in the outbox until the room is live (joined and caught up): before
        the join it would be refused, and the catch-up may show that an unconfirmed
        copy from the last connection was stored, which spares sending it again."""
        return self._post(room, body, SEND)

    def edit(self, target: int, body: str, room: str | None = None) -> Outgoing | None:
        """Replace the body of message ``target`` (one of ours). Through the outbox
        like a message, so that an edit typed offline or right before the end of
        input still goes, and one whose ack was lost is retried with its cid."""
        return self._post(room, body, EDIT, target)

    def delete(self, target: int, room: str | None = None) -> Outgoing | None:
        """Delete message ``target`` (one of ours); through the outbox as ``edit``."""
        return self._post(room, "", DELETE, target)

    def _post(
        self, room: str | None, body: str, kind: str, target: int | None = None
    ) -> Outgoing | None:
        room = room or self.current
        if room is None or room not in self.rooms:
            self._problem("not_member", "join a room first: /join ROOM")
            return None
        item = self.outbox.add(room, body, kind, target)
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

    def who(self) -> None:
        """Who is online in the current room: asked of the server (the state kept from
        events may be partial, or stale after a list was cut short), shown when the
        answer comes. Before the room is joined, asked once it is."""
        room = self.current
        if room is None or room not in self.rooms:
            self._problem("not_member", "join a room first: /join ROOM")
            return
        state = self.rooms[room]
        if state.phase in (OFFLINE, JOINING):
            state.who = True
            if not self.online:
                self._notice("not connected: /who answered once connected")
            return
        self._request("presence", "who", room)

    def _send_item(self, item: Outgoing) -> None:
        ref = self._request(item.kind, "send", item.room, **item.fields())
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
            self._on_joined(room, frame)
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
        elif kind == "read":
            self._on_read(frame)
        elif kind == "typing":
            self._on_typing(frame)
        elif kind == "presence":
            self._on_presence(purpose, frame)
        elif kind == "error" and purpose == "read":
            self._on_read_error(room, frame)
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

    def _on_joined(self, room: str | None, frame: dict[str, Any]) -> None:
        state = self.rooms.get(room or "")
        if state is None:
            return  # left again before the join was answered
        last_id = int_field(frame.get("last_id"))
        # What the server says it has only grows, so the highest heard is kept; what
        # was sent on the last connection may have been lost with it: sent again.
        last_read = int_field(frame.get("last_read"))
        if last_read is not None:
            state.read = last_read if state.read is None else max(state.read, last_read)
        state.read_sent = None
        self._notice(f"joined {state.name}")
        unread = int_field(frame.get("unread"))
        if unread is not None and unread > 0:
            self._notice(f"[{state.name}] {unread} unread")
        state.set_online(frame.get("online"), frame.get("online_count"))
        if state.online_count is not None:
            self._notice(f"[{state.name}] {state.online_count} online")
        if state.who:
            state.who = False
            self._request("presence", "who", state.name)
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
            self._deliver(state, message, purpose == "catchup", purpose == "older")
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

    def _deliver(
        self, state: RoomState, message: Message, stream: bool = True, scroll: bool = False
    ) -> None:
        if not state.accept(message, stream):
            return
        self._events.append(message)
        if not scroll:
            state.newest = message.id if state.newest is None else max(state.newest, message.id)
        if self.user is not None and message.user == self.user:
            item = self.outbox.match(message)
            if item is not None:
                self._events.append(Acked(item.local, message.room, message.id))

    def _on_read(self, frame: dict[str, Any]) -> None:
        """Our marker, moved by us or by another connection of our user: kept (the
        highest), so that what another device has read is not marked again."""
        room = frame.get("room")
        state = self.rooms.get(room) if isinstance(room, str) else None
        marker = int_field(frame.get("id"))
        if state is not None and marker is not None:
            state.read = marker if state.read is None else max(state.read, marker)

    def _on_read_error(self, room: str | None, frame: dict[str, Any]) -> None:
        """Markers are housekeeping the user did not ask for: no error line. A store
        that is down (or a server that is busy) gets the marker again later."""
        state = self.rooms.get(room or "")
        if state is not None and frame.get("code") in READ_RETRY_CODES:
            state.read_sent = None

    def _on_typing(self, frame: dict[str, Any]) -> None:
        room, user = frame.get("room"), frame.get("user")
        if not isinstance(room, str) or room not in self.rooms:
            return
        if not isinstance(user, str) or not is_valid_name(user):
            return
        if user == self.user:
            return  # the server leaves these out; this is for one that comes anyway
        if self.typing_shown.allow((room, user), self.clock()):
            self._notice(f"[{room}] {user} is typing")

    def _on_presence(self, purpose: str | None, frame: dict[str, Any]) -> None:
        room = frame.get("room")
        state = self.rooms.get(room) if isinstance(room, str) else None
        if state is None:
            return  # a room we left, or nonsense
        online = frame.get("online")
        if isinstance(online, bool):
            user = frame.get("user")
            if not isinstance(user, str) or not is_valid_name(user) or user == self.user:
                # Our user is online wherever we are (we are connected): an event of
                # ours would only be another connection's, or one that crossed ours.
                return
            if state.went(user, online) and state.name == self.current:
                change = "is online" if online else "went offline"
                self._notice(f"[{state.name}] {user} {change}")
        elif isinstance(online, list) or "online_count" in frame:
            # A list replaces what was known, silently unless it answers a ``who``.
            state.set_online(online, frame.get("online_count"))
            if purpose == "who":
                self._notice(state.who_line())

    # read markers, on the driver's schedule

    def _read_due(self, state: RoomState) -> float | None:
        if not self.mark_read or state.phase in (OFFLINE, JOINING) or not state.unmarked():
            return None
        return 0.0 if state.read_at is None else state.read_at + self.read_interval

    def read_delay(self) -> float | None:
        """Seconds until ``send_reads`` has a marker to send (0: now), or None while
        every room's marker is up to date. The driver sets its timer by this, as it
        does by ``Backoff.next_delay``."""
        dues = [d for d in map(self._read_due, self.rooms.values()) if d is not None]
        if not dues:
            return None
        now = self.clock()
        # A due time in the future beyond the interval means the clock went back.
        return max(0.0, min(min(dues) - now, self.read_interval))

    def send_reads(self, limit: int | None = None, force: bool = False) -> int:
        """Queue a ``read`` with the newest id shown for each room that is due, at most
        ``limit`` of them (the rooms waiting longest first; the rest stay due).
        ``force``: regardless of the interval (the program is ending). Returns how
        many were queued; ``drain`` gives them."""
        now = self.clock()
        due = []
        for state in self.rooms.values():
            at = self._read_due(state)
            # (now < read_at: the clock went back, which must not hold markers up.)
            if at is not None and (force or at <= now or now < (state.read_at or 0)):
                due.append((at, state))
        due.sort(key=lambda d: d[0])
        if limit is not None:
            due = due[: max(0, limit)]
        for _, state in due:
            state.read_sent = state.newest
            state.read_at = now
            self._request("read", "read", state.name, id=state.newest)
        return len(due)

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
        elif purpose == "who":
            self._problem(code, f"who {room}: {text}")
        elif purpose == "send":
            item = self.outbox.answered(ref)
            if item is not None and item.kind == DELETE and item.retried and code == "not_found":
                return  # the first copy went through before the drop: the message is gone
            sent = f" (not sent: {item.summary()})" if item is not None else ""
            self._problem(code, f"{text}{sent}")
        else:
            self._problem(code, text)
