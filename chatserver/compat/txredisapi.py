"""txredisapi's internals, reached into for speed, checked at start-up.

What counts as txredisapi's public API here: its classes (``RedisFactory``,
``RedisProtocol``, ``SubscriberProtocol``), their constructor arguments, and
their methods without a leading underscore: ``startConnecting``,
``stopTrying``, ``disconnect``, ``addConnection`` and ``buildProtocol`` on the
factory; ``execute_command`` (every command method goes through it),
``publish``, ``ping``, ``subscribe``, ``unsubscribe``, ``whenConnected``,
``messageReceived``, ``connectionMade`` and ``connectionLost`` on the
protocols. chatserver.broker.redis uses only those.

Private, and used only in this module: the parser's state (``line_mode``,
``bulk_length``, ``multi_bulk``, ``paused`` and LineReceiver's name-mangled
line buffer), the reply queue (``replyQueue`` with ``get`` and ``put``), and
the way the parser re-enters itself after a bulk string (``setLineMode(extra)``,
then ``dataReceived(data, unpause)`` one reactor turn later).

Three fast paths, each a mixin that the broker puts in front of txredisapi's
protocol class only when its check passed (``subscriber_class`` and
``publisher_class`` choose once per broker, so no message pays for an ``if``):

- ``redis_push`` (``SlicedPushes``): pub/sub messages sliced out of a read and
  handed over as one list, instead of four lines and three bulk strings each
  through txredisapi's parser;
- ``redis_publish`` (``SlicedPublish``): PUBLISH written as one format and its
  integer reply sliced, instead of ``execute_command``'s machinery;
- ``redis_inline_bulk`` (``InlineBulk``): what follows a bulk string parsed in
  the same pass, instead of txredisapi pausing the socket for a reactor turn.

Each fast path counts its own uses in ``FastPaths.runs`` (messages sliced,
PUBLISHes sent, bulk continuations), one increment per read or publish.

One more check is not a fast path but a correctness requirement:
``REQUIRED["redis_tls_handshake_wait"]``. A rediss:// connection must not count
as usable before the server's certificate has verified, so the broker holds
back txredisapi's ``connectionMade`` (which sends AUTH/SELECT and declares the
connection ready) until the TLS handshake completes. That is public API, but it
relies on txredisapi doing nothing before ``connectionMade``. If a release
changes that, there is no other public way to wait, and the broker refuses
rediss:// at start-up with an error naming what changed (plain redis:// still
works): a readiness probe that says "connected" to an unverified server is
worse than not starting.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from chatserver.compat import Check, FastPaths, missing_attributes

PUSH = "redis_push"
PUBLISH = "redis_publish"
INLINE_BULK = "redis_inline_bulk"

# The start of every pub/sub message (RESP2), up to its channel's length.
_PUSH_HEAD = b"*3\r\n$7\r\nmessage\r\n$"

# (channel, payload) of each pub/sub message in one read, in order.
Pushes = list[tuple[bytes, bytes]]


class InlineBulk:
    """Parses what follows a bulk string in the same pass, not one reactor turn later.

    txredisapi stops reading the socket and re-enters through ``callLater(0)``
    after every bulk string that has data behind it. A pub/sub message is three
    bulk strings, so a burst of N messages took 3N reactor turns and 6N
    ``epoll_ctl`` calls: an instance receiving its rooms' traffic over Redis
    fell behind with its CPU half idle. Here the rest waits in ``_after_bulk``
    and ``dataReceived`` loops over it.
    """

    connected: int
    line_mode: int
    fast_path_runs: Counter[str]
    _after_bulk = b""

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        if self._after_bulk:
            data, self._after_bulk = self._after_bulk + data, b""
        why = super().dataReceived(data, unpause)  # type: ignore[misc]
        turns = 0
        while self._after_bulk and not why and self.connected:
            rest, self._after_bulk = self._after_bulk, b""
            turns += 1
            why = super().dataReceived(rest)  # type: ignore[misc]
        if turns:
            self.fast_path_runs[INLINE_BULK] += turns
        return why

    def setLineMode(self, extra: bytes = b"") -> None:
        self.line_mode = 1
        if extra:
            self._after_bulk += extra


def parser_idle(proto: Any) -> bool:
    """txredisapi's parser holds nothing: no partial line, bulk string or array, no re-entry due.

    ``paused`` is set while txredisapi waits a reactor turn to parse the rest
    of a read (when ``InlineBulk`` is off): data sliced before that rest would
    overtake it.
    """
    return not (
        proto._after_bulk
        or proto.paused
        or proto.line_mode != 1
        or proto.bulk_length
        or proto.multi_bulk.pending
        or proto._LineReceiver__buffer  # LineReceiver's line buffer (name-mangled)
    )


# A reply cut short at the end of a read is held for the next one up to this
# size; past it, or once it can't be one of ours, txredisapi's parser takes it.
HELD_MAX = 1 << 20


class SlicedReplies:
    """The common replies are cut out of a read by slicing, the rest parsed by txredisapi.

    Slicing starts only while txredisapi's parser is idle, and stops at the
    first byte it does not recognise as a whole reply of its kind: from there
    on txredisapi reads, as before. A reply of its kind that the read cut
    short is held and read again in front of the next read: handed to
    txredisapi, it left the parser busy, and a busy parser kept every later
    read off the fast path, so under load (where reads end anywhere) most
    messages went the slow way. txredisapi's own re-entries (``unpause``) go
    straight to it: it resumes the socket it paused.
    """

    connected: int
    fast_path_runs: Counter[str]
    _after_bulk = b""
    _held = b""

    def _take(self, data: bytes) -> tuple[int, bool]:
        """Handle the whole replies at the start of ``data``; return the bytes used,
        and whether what is left is the start of one more (cut short by the read)."""
        raise NotImplementedError

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        if self._held:
            data, self._held = self._held + data, b""
        if unpause or not parser_idle(self):
            return super().dataReceived(data, unpause)  # type: ignore[misc]
        pos, cut_short = self._take(data)
        if pos == len(data) or (pos and not self.connected):
            return None
        if cut_short and len(data) - pos <= HELD_MAX:
            self._held = data[pos:]
            return None
        return super().dataReceived(data[pos:] if pos else data, unpause)  # type: ignore[misc]


def _cut_short(data: bytes, pos: int, head: bytes) -> bool:
    """``data[pos:]`` is shorter than ``head`` and could still become it."""
    return len(data) - pos < len(head) and head.startswith(data[pos:])


def _number_so_far(rest: bytes) -> bool:
    """``rest`` could be the start of a length or an integer and its CRLF."""
    digits = rest[:-1] if rest.endswith(b"\r") else rest
    return not digits or digits.isdigit()


class SlicedPushes(SlicedReplies):
    """Pub/sub messages by slicing, handed over as one list per read.

    txredisapi parses one as four lines and three bulk strings, one Python
    call each: several times the cost of slicing it. The class this is mixed
    into defines ``pushes_received(pushes)``; txredisapi's own parser reports
    the messages it parses through ``messageReceived``, one at a time.
    """

    def pushes_received(self, pushes: Pushes) -> None:
        raise NotImplementedError

    def _take(self, data: bytes) -> tuple[int, bool]:
        pushes: Pushes = []
        pos = 0
        cut_short = False
        n = len(data)
        while True:
            if not data.startswith(_PUSH_HEAD, pos):
                cut_short = _cut_short(data, pos, _PUSH_HEAD)
                break
            i = pos + len(_PUSH_HEAD)
            j = data.find(b"\r\n", i)
            if j < 0:
                cut_short = _number_so_far(data[i:])
                break
            if not data[i:j].isdigit():
                break  # not a length: txredisapi's to judge
            channel_end = j + 2 + int(data[i:j])
            if data[channel_end : channel_end + 3] != b"\r\n$":
                cut_short = channel_end + 3 > n and b"\r\n$".startswith(data[channel_end:])
                break
            k = data.find(b"\r\n", channel_end + 3)
            if k < 0:
                cut_short = _number_so_far(data[channel_end + 3 :])
                break
            if not data[channel_end + 3 : k].isdigit():
                break
            payload_end = k + 2 + int(data[channel_end + 3 : k])
            if data[payload_end : payload_end + 2] != b"\r\n":
                cut_short = payload_end + 2 > n and b"\r\n".startswith(data[payload_end:])
                break
            pos = payload_end + 2
            pushes.append((data[j + 2 : channel_end], data[k + 2 : payload_end]))
        if pushes:
            self.fast_path_runs[PUSH] += len(pushes)
            self.pushes_received(pushes)
        return pos, cut_short and pos < n


class SlicedPublish(SlicedReplies):
    """PUBLISH and its integer reply without txredisapi's per-command machinery.

    ``execute_command`` encodes each argument, chains three Deferreds and a
    closure, and its reply goes through the line parser: about 24 us per
    message in a microbenchmark, 16 % of the reactor's Python time at 1,000
    messages/s. Here the command is one format and the reply one slice. The
    reply still takes its place in txredisapi's queue, so replies to other
    commands (PING) stay matched in order.
    """

    transport: Any
    replyQueue: Any

    def reply_expected(self, d: Deferred[Any]) -> None:
        """A command went out whose reply will fire ``d`` (the broker watches these)."""

    def publish(self, channel: bytes, payload: bytes) -> Deferred[Any]:
        """Fires with Redis' reply: a count of receivers, or an exception instance.

        Unlike ``execute_command``, an error reply or a lost connection fires
        the callback with the exception, not the errback.
        """
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        self.transport.write(
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
            % (len(channel), channel, len(payload), payload)
        )
        d: Deferred[Any] = self.replyQueue.get()
        self.fast_path_runs[PUBLISH] += 1
        self.reply_expected(d)
        return d

    def _take(self, data: bytes) -> tuple[int, bool]:
        pos = 0
        while data.startswith(b":", pos):  # an integer reply
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return pos, _number_so_far(data[pos + 1 :])
            if not data[pos + 1 : eol].isdigit():
                break
            self.replyQueue.put(int(data[pos + 1 : eol]))
            pos = eol + 2
        return pos, False


# -- building the protocol classes ---------------------------------------------


def _build(
    name: str, head: tuple[type, ...], mixins: list[type], base: type, fast_paths: FastPaths
) -> type:
    return type(name, (*head, *mixins, base), {"fast_path_runs": fast_paths.runs})


def subscriber_class(name: str, head: tuple[type, ...], fast_paths: FastPaths) -> type:
    """``head`` + the enabled fast paths + txredisapi's SubscriberProtocol.

    ``head`` comes first in the MRO, so it sees every read (liveness) and
    defines ``pushes_received`` and ``messageReceived``. With every fast path
    off this is txredisapi's SubscriberProtocol behind ``head``, nothing else.
    """
    mixins: list[type] = []
    if fast_paths.on(PUSH):
        mixins.append(SlicedPushes)
    if fast_paths.on(INLINE_BULK):
        mixins.append(InlineBulk)
    return _build(name, head, mixins, txredisapi.SubscriberProtocol, fast_paths)


def publisher_class(name: str, head: tuple[type, ...], fast_paths: FastPaths) -> type:
    """``head`` + the enabled fast paths + txredisapi's RedisProtocol.

    Without ``redis_publish``, ``publish`` is txredisapi's own
    (``execute_command("PUBLISH", ...)``), whose Deferred errbacks on an error.
    """
    mixins: list[type] = []
    if fast_paths.on(PUBLISH):
        mixins.append(SlicedPublish)
    if fast_paths.on(INLINE_BULK):
        mixins.append(InlineBulk)
    return _build(name, head, mixins, txredisapi.RedisProtocol, fast_paths)


# -- checks ----------------------------------------------------------------------

_PARSER_STATE = ("line_mode", "bulk_length", "multi_bulk", "paused", "_LineReceiver__buffer")


def _label(cls: type) -> str:
    return f"txredisapi.{cls.__name__}"


def _connected(cls: type) -> Any:
    """A protocol as the broker's factory makes it, on a transport that records writes.

    Its ``callLater`` only records (in ``proto.later``): nothing a probe does
    reaches the reactor; ``_feed`` runs what txredisapi deferred.
    """
    proto = cls(charset=None, convertNumbers=False)
    later: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    proto.later = later
    proto.callLater = lambda _delay, f, *args: later.append((f, args))
    proto.transport = StringTransport()
    proto.connected = 1
    return proto


def _feed(proto: Any, data: bytes) -> None:
    """One read, then every re-entry txredisapi deferred to a later reactor turn."""
    proto.dataReceived(data)
    while proto.later:
        f, args = proto.later.pop(0)
        f(*args)


def _takes(proto: Any, method: str, argument: str, label: str) -> list[str]:
    """``[]`` if ``proto.method`` still has the parameter ``argument``."""
    try:
        parameters = inspect.signature(getattr(proto, method)).parameters
    except (AttributeError, TypeError, ValueError):
        return [f"{label}.{method}"]
    return [] if argument in parameters else [f"{label}.{method}({argument})"]


def _probe(label: str, run: Callable[[], list[str]]) -> list[str]:
    """Run a behavioural probe; an exception is reported as a changed name."""
    try:
        return run()
    except Exception as e:
        return [f"{label} (probe failed: {type(e).__name__}: {e})"]


def _never_raises(check: Check) -> Check:
    """A check whose set-up itself fails (a constructor changed) reports that, not raises."""

    @functools.wraps(check)
    def run() -> list[str]:
        try:
            return check()
        except Exception as e:
            return [f"txredisapi ({check.__name__} failed: {type(e).__name__}: {e})"]

    return run


def _parser_state_problems(cls: type) -> list[str]:
    """What ``parser_idle`` reads, present on a real instance and meaning what it meant."""
    label = _label(cls)
    proto = _connected(cls)
    missing = missing_attributes(proto, _PARSER_STATE, label)
    missing += _takes(proto, "dataReceived", "unpause", label)
    if missing:
        return missing
    if not hasattr(proto.multi_bulk, "pending"):
        return [f"{label}.multi_bulk.pending"]

    def run() -> list[str]:
        problems = []
        # Each read leaves exactly one piece of state set; an idle parser none.
        for data, state in (
            (b"", "idle state"),
            (b"+PO", "_LineReceiver__buffer"),
            (b"*2\r\n", "multi_bulk.pending"),
            (b"$5\r\nab", "bulk_length"),
        ):
            p = _connected(cls)
            p._after_bulk = b""  # InlineBulk's part of the state, not txredisapi's
            p.dataReceived(data)
            if parser_idle(p) != (not data):
                problems.append(f"{label}.{state} (meaning changed)")
        return problems

    return _probe(label, run)


@_never_raises
def check_push() -> list[str]:
    """``redis_push``: parser state as ``parser_idle`` reads it, and a burst sliced right."""
    cls = txredisapi.SubscriberProtocol
    missing = _parser_state_problems(cls)
    if missing:
        return missing

    class Probe(SlicedPushes, cls):  # type: ignore[misc, valid-type]
        fast_path_runs: Counter[str] = Counter()

        def pushes_received(self, pushes: Pushes) -> None:
            self.got.append(pushes)

        def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
            self.got.append([(channel, message)])

    def run() -> list[str]:
        proto = _connected(Probe)
        proto.got = []
        msg = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$%d\r\n%b\r\n"
        pong = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
        replies: list[Any] = []
        proto.execute_command("PING").addBoth(replies.append)
        # Two sliced, then the PONG (an array) to txredisapi, then the cut-short
        # message, completed by the next read, and one more after it: both
        # txredisapi's to parse, as slicing waits for its parser to be idle.
        data = msg % (1, b"1") + msg % (1, b"2") + pong + msg % (1, b"3")
        _feed(proto, data[:-3])
        _feed(proto, data[-3:] + msg % (1, b"4"))
        if proto.got != [[(b"c", b"1"), (b"c", b"2")], [(b"c", b"3")], [(b"c", b"4")]]:
            return [f"{_label(cls)}.messageReceived (messages came out wrong)"]
        if replies != [[b"pong", b""]]:
            return [f"{_label(cls)}.replyReceived (a reply between messages went astray)"]
        return []

    return _probe(_label(cls), run)


@_never_raises
def check_publish() -> list[str]:
    """``redis_publish``: parser state, the reply queue, and replies matched in order."""
    cls = txredisapi.RedisProtocol
    label = _label(cls)
    missing = _parser_state_problems(cls)
    missing += missing_attributes(_connected(cls), ("replyQueue",), label)
    if missing:
        return missing
    missing = missing_attributes(_connected(cls).replyQueue, ("get", "put"), f"{label}.replyQueue")
    if missing:
        return missing

    class Probe(SlicedPublish, cls):  # type: ignore[misc, valid-type]
        fast_path_runs: Counter[str] = Counter()

    def run() -> list[str]:
        proto = _connected(Probe)
        got: list[Any] = []
        proto.publish(b"c", b"x").addBoth(got.append)
        proto.execute_command("PING").addBoth(got.append)
        proto.publish(b"c", b"y").addBoth(got.append)
        proto.dataReceived(b":1\r\n+PONG\r\n:0\r\n")
        if got != [1, "PONG", 0]:
            return [f"{label}.replyQueue (replies came out wrong: {got!r})"]
        return []

    return _probe(label, run)


@_never_raises
def check_inline_bulk() -> list[str]:
    """``redis_inline_bulk``: the re-entry it replaces still goes through ``setLineMode(extra)``."""
    cls = txredisapi.RedisProtocol
    label = _label(cls)
    proto = _connected(cls)
    missing = missing_attributes(proto, ("line_mode",), label)
    missing += _takes(proto, "setLineMode", "extra", label)
    missing += _takes(proto, "dataReceived", "unpause", label)
    if missing:
        return missing

    class Probe(InlineBulk, cls):  # type: ignore[misc, valid-type]
        fast_path_runs: Counter[str] = Counter()

    def run() -> list[str]:
        p = _connected(Probe)
        got: list[Any] = []
        for key in ("a", "b", "c"):
            p.execute_command("GET", key).addBoth(got.append)
        p.dataReceived(b"$3\r\none\r\n$-1\r\n$5\r\nthree\r\n")
        if got != [b"one", None, b"three"] or p.later or p.paused:
            return [f"{label}.setLineMode (the rest of a read still waits a turn)"]
        return []

    return _probe(label, run)


@_never_raises
def check_tls_handshake_wait() -> list[str]:
    """txredisapi does nothing before ``connectionMade`` and is usable only after it.

    The broker delays ``connectionMade`` until the TLS handshake (certificate
    and host name) has completed; this holds only if AUTH/SELECT and the
    readiness txredisapi declares (``whenConnected``) come from there.
    """
    cls = txredisapi.RedisProtocol
    label = _label(cls)

    class Held(cls):  # type: ignore[misc, valid-type]
        def connectionMade(self) -> None:
            pass  # as if waiting for the TLS handshake

    def run() -> list[str]:
        proto = Held(charset=None, password="probe", convertNumbers=False)
        proto.callLater = None  # nothing here may wait for the reactor
        proto.factory = _ProbeFactory()
        transport = StringTransport()
        proto.makeConnection(transport)
        ready: list[Any] = []
        proto.whenConnected().addCallback(ready.append)
        if transport.value() or ready:
            return [f"{label}.makeConnection (acts before connectionMade)"]
        cls.connectionMade(proto)
        if b"AUTH" not in transport.value():
            return [f"{label}.connectionMade (sends no AUTH)"]
        proto.dataReceived(b"+OK\r\n")
        if ready != [proto]:
            return [f"{label}.whenConnected (not fired by connectionMade)"]
        return []

    return _probe(label, run)


class _ProbeFactory:
    """What txredisapi's connectionMade may call on its factory if AUTH failed."""

    isLazy = True

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        pass


# One per fast path; FastPaths runs them at start-up (not with fast_paths = false).
CHECKS: dict[str, Check] = {
    PUSH: check_push,
    PUBLISH: check_publish,
    INLINE_BULK: check_inline_bulk,
}

# Not shortcuts: what correctness needs of txredisapi, checked whatever fast_paths says.
REQUIRED: dict[str, Check] = {
    "redis_tls_handshake_wait": check_tls_handshake_wait,
}
