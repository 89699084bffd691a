"""This instance's side of presence: its connections per room and user, who
watches, and the ``presence`` events they get.

A user's connections here are counted per room; only the first entering and
the last leaving reach the shared state (``PresenceState``), so a join or
leave costs at most one state command, whatever the room's size. When the
state says a user came online or went offline anywhere, the event goes to the
room's watchers on every instance over the room's channel (``RoomRegistry.
announce``), with no id: never stored.

A burst (a room of thousands joining at once) would send each watcher an
event per user. Past ``presence_burst`` events in a room within a second,
watchers here get no more single events that second; at its end they get one
``presence`` frame with the room's list and count instead, read from the
state then, so every list converges exactly without a storm.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver import wire
from chatserver.delivery import Delivery, Sink
from chatserver.presence import PresenceState
from chatserver.rooms import RoomRegistry

WINDOW = 1.0  # seconds over which presence_burst counts a room's events
WINDOWS_TRACKED_MAX = 10_000
REBUILD_RETRY = 1.0  # seconds before a failed rebuild is tried again


class _Window:
    __slots__ = ("count", "flush", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.flush: IDelayedCall | None = None


class _Reading:
    """A room's list being read: who asked for it, and the events held meanwhile."""

    __slots__ = ("held", "next", "now", "overflow")

    def __init__(self) -> None:
        self.now: list[tuple[Sink | None, object]] = []  # (one watcher or all, unless)
        self.next: list[tuple[Sink | None, object]] = []  # asked while this one was read
        self.held: list[bytes] = []
        self.overflow = False

    def hold(self, frame: bytes, most: int) -> None:
        if len(self.held) < most:
            self.held.append(frame)
        else:
            self.overflow = True


class PresenceTracker:
    log = Logger()

    def __init__(
        self,
        state: PresenceState,
        registry: RoomRegistry,
        delivery: Delivery,
        clock: IReactorTime,
        list_max: int,
        burst: int,
    ) -> None:
        self.state = state
        self._registry = registry
        self._delivery = delivery
        self._clock = clock
        self._list_max = list_max
        self._burst = burst
        self._local: dict[str, dict[str, int]] = {}  # room -> user -> connections here
        self._watchers: dict[str, set[Sink]] = {}
        self._windows: dict[str, _Window] = {}
        self._reading: dict[str, _Reading] = {}  # rooms whose list is being read
        registry.on_presence = self.on_event
        self.events = 0  # presence events written to watchers here
        self.snapshots = 0  # lists sent instead of a burst's events
        self.failures = 0  # state commands that failed (a rebuild follows the outage)
        self.rebuilds = 0
        self._rebuild_waiters: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        self._stopped = False

    # -- what the core tells it ---------------------------------------------------

    def start(self) -> None:
        self.state.start(self._changed, self.rebuild)

    def stop(self) -> Deferred[None]:
        """Timers off; this instance's users leave the state at once (goodbye)."""
        self._stopped = True
        for call in [self._retry, *(w.flush for w in self._windows.values())]:
            if call is not None and call.active():
                call.cancel()
        self._windows.clear()
        return self.state.stop()

    def entered(self, room: str, user: str) -> Deferred[None]:
        """A connection of ``user`` joined ``room`` here (sent before any ``online``
        asked after it, so that answer includes them)."""
        users = self._local.setdefault(room, {})
        users[user] = users.get(user, 0) + 1
        if users[user] > 1:
            return succeed(None)
        d = self.state.enter(room, user)
        return d.addCallbacks(self._first_in, self._failed, (room, user))

    def _first_in(self, result: tuple[bool, bool], room: str, user: str) -> None:
        became, watched = result
        if became:
            self.announce(room, user, True, publish=watched)

    def left(self, room: str, user: str) -> None:
        users = self._local.get(room)
        if users is None or user not in users:
            return
        users[user] -= 1
        if users[user] > 0:
            return
        del users[user]
        if not users:
            del self._local[room]
        d = self.state.leave(room, user)
        d.addCallbacks(self._last_out, self._failed, (room, user))

    def _last_out(self, result: tuple[bool, bool], room: str, user: str) -> None:
        gone, watched = result
        if gone:
            self.announce(room, user, False, publish=watched)

    def _failed(self, failure: Failure, *_: object) -> None:
        """A state command failed (Redis away, or a connection dropped with it in
        flight): whether it was applied is unknown, so this instance's part is
        rebuilt soon, which also sends its watchers fresh lists."""
        self.failures += 1
        self.log.debug("presence state: {error}", error=failure.getErrorMessage())
        self._rebuild_soon()

    def _rebuild_soon(self) -> None:
        if self._stopped:
            return  # commands failing as the broker closes: nothing to rebuild for
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(REBUILD_RETRY, self.rebuild)

    def watch(self, room: str, sink: Sink) -> None:
        watchers = self._watchers.get(room)
        if watchers is None:
            watchers = self._watchers[room] = set()
            self.state.watch(room).addErrback(self._failed)
        watchers.add(sink)

    def unwatch(self, room: str, sink: Sink) -> None:
        watchers = self._watchers.get(room)
        if watchers is not None and sink in watchers:
            watchers.discard(sink)
            if not watchers:
                del self._watchers[room]
                self.state.unwatch(room).addErrback(self._failed)

    def online(self, room: str) -> Deferred[tuple[list[str], int]]:
        return self.state.online(room, self._list_max)

    def rebuild(self) -> Deferred[None]:
        """The broker is back after an outage: our part of the state is made true again."""
        d = self.state.rebuild(self)
        return d.addCallbacks(self._rebuilt, self._rebuild_failed)

    def _rebuild_failed(self, failure: Failure) -> None:
        """Redis came back for the subscriber before the publishers: try again soon."""
        self._failed(failure)

    def _rebuilt(self, _: object) -> None:
        self.rebuilds += 1
        self.log.info("presence: state rebuilt, {held} users held here", held=self.local_users)
        # Events published while the broker was away never reached our watchers:
        # each watched room gets its list afresh.
        for room in list(self._watchers):
            self.read_list(room, None)
        waiters, self._rebuild_waiters = self._rebuild_waiters, []
        for w in waiters:
            w.callback(None)

    def when_rebuilt(self) -> Deferred[None]:
        """Fires after the next rebuild (tests: the state is whole again)."""
        d: Deferred[None] = Deferred()
        self._rebuild_waiters.append(d)
        return d

    def _changed(self, changes: list[tuple[str, str, bool]]) -> None:
        for room, user, online in changes:
            self.announce(room, user, online)

    # -- events ---------------------------------------------------------------------

    def announce(self, room: str, user: str, online: bool, publish: bool = True) -> None:
        """To the room's watchers here, and (``publish``: some instance watches it)
        on every instance hosting it."""
        frame = wire.encode({"type": "presence", "room": room, "user": user, "online": online})
        self._registry.announce(room, frame, publish)

    def on_event(self, room: str, frame: bytes) -> None:
        """A presence event for ``room``, from here or another instance."""
        watchers = self._watchers.get(room)
        if not watchers:
            return
        reading = self._reading.get(room)
        if reading is not None:
            reading.hold(frame, self._burst)
            return
        now = self._clock.seconds()
        window = self._windows.get(room)
        if window is None or now - window.start >= WINDOW:
            if window is None and len(self._windows) >= WINDOWS_TRACKED_MAX:
                self._forget_windows(now)
            window = self._windows[room] = _Window(now)
        window.count += 1
        if window.count <= self._burst:
            data = wire.text_frame(frame)
            for sink in watchers:
                self._delivery.to_connection(sink, data)
            self.events += len(watchers)
            return
        if window.flush is None:
            delay = max(0.0, window.start + WINDOW - now)
            window.flush = self._clock.callLater(delay, self._flush, room, window)

    def _forget_windows(self, now: float) -> None:
        self._windows = {
            room: w
            for room, w in self._windows.items()
            if w.flush is not None or now - w.start < WINDOW
        }

    def _flush(self, room: str, window: _Window) -> None:
        if self._windows.get(room) is window:
            del self._windows[room]
        self.read_list(room, None)

    def read_list(self, room: str, to: Sink | None, unless: object = None) -> None:
        """Send ``room``'s list to its watchers (``to`` one of them alone, and only
        if the list is not ``unless``).

        Events that arrive while the list is read are held and delivered after
        it: one published after the read would otherwise come first and be
        undone by a list that predates it. Held events that predate the read
        repeat what the list says, which is harmless."""
        reading = self._reading.get(room)
        if reading is not None:
            reading.next.append((to, unless))
            return
        reading = self._reading[room] = _Reading()
        reading.now.append((to, unless))
        self.online(room).addBoth(self._list_read, room, reading)

    def _list_read(self, result: object, room: str, reading: _Reading) -> None:
        del self._reading[room]
        if isinstance(result, Failure):
            self._failed(result)
        else:
            self._send_list(room, result, reading.now)  # type: ignore[arg-type]
        if reading.next:
            again = self._reading[room] = _Reading()
            again.now, again.held, again.overflow = reading.next, reading.held, reading.overflow
            self.online(room).addBoth(self._list_read, room, again)
            return
        if reading.overflow:
            self.read_list(room, None)  # too much happened meanwhile: one more list
            return
        with self._delivery.batch():
            for frame in reading.held:
                self.on_event(room, frame)

    def _send_list(
        self, room: str, result: tuple[list[str], int], asked: list[tuple[Sink | None, object]]
    ) -> None:
        watchers = self._watchers.get(room)
        if not watchers:
            return
        names, count = result
        frame = wire.text_frame(
            wire.encode({"type": "presence", "room": room, "online": names, "online_count": count})
        )
        with self._delivery.batch():
            if any(to is None for to, _ in asked):
                for sink in watchers:
                    self._delivery.to_connection(sink, frame)
                self.snapshots += 1
                return
            for to, unless in asked:
                if to in watchers and result != unless:
                    self._delivery.to_connection(to, frame)

    # -- what this instance holds (``Held``, for a rebuild) ---------------------------

    def rooms(self) -> set[str]:
        return set(self._local) | set(self._watchers)

    def users_in(self, room: str) -> list[str]:
        return list(self._local.get(room, ()))

    def watches(self, room: str) -> bool:
        return room in self._watchers

    # -- metrics --------------------------------------------------------------------

    @property
    def local_users(self) -> int:
        """(room, user) pairs this instance holds in the state."""
        return sum(len(users) for users in self._local.values())

    @property
    def watchers(self) -> int:
        return sum(len(w) for w in self._watchers.values())
