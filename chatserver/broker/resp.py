"""RESP2 for the cluster broker: an incremental parser and one node connection.

Why our own and not txredisapi: txredisapi 1.6.0 knows no cluster (no MOVED,
no ASK) and its subscriber recognises only ``message`` and ``pmessage``, so
``smessage`` pushes, ``ssubscribe`` confirmations and the *unsolicited*
``sunsubscribe`` that Redis sends when a slot migrates away would all be
misread as replies. The subset of RESP2 a pub/sub client needs is small, and
owning it lets the hot path be what the fast paths of the single-Redis broker
reach into txredisapi for: every ``smessage`` of one read sliced out in one
pass and handed over as one list, and SPUBLISH written as one format with its
reply matched without a Deferred.

``RespParser`` is incremental: whatever a read leaves incomplete waits, and is
parsed again only once as many bytes have arrived as the part that ran out
said it needs (a bulk string's length), so a large reply arriving in many
reads is joined once, not re-scanned per read. Its buffer is bounded: a reply
larger than ``max_reply`` is a ``ReplyTooLarge`` and the connection is dropped.

``RespProtocol`` is one connection to one node: AUTH first, then pipelined
commands whose replies are matched in order against a FIFO, pushes routed to
its handler, and the liveness rule of the single-Redis broker (drop a
connection that has replies outstanding and has heard nothing for
``timeout``; a busy one that is merely behind is kept).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatserver.broker.cluster_slots import key_slot

log = Logger()

# Largest reply accepted: far above anything a pub/sub client is sent (a
# message payload, a CLUSTER SLOTS of a large cluster), far below harm.
MAX_REPLY = 64 * 1024 * 1024
# A type-and-length line (or simple string, error) longer than this is garbage.
MAX_LINE = 64 * 1024
# Arrays nest 3 deep in CLUSTER SLOTS; more than this is garbage, not a reply.
MAX_DEPTH = 16

# (channel, payload) of one ``smessage`` push.
SMessage = tuple[bytes, bytes]

_SMESSAGE_HEAD = b"*3\r\n$8\r\nsmessage\r\n$"
_SMESSAGE = b"smessage"
_SSUBSCRIBE = b"ssubscribe"
_SUNSUBSCRIBE = b"sunsubscribe"


class ProtocolError(Exception):
    """The peer sent something that is not RESP2: the connection cannot continue."""


class ReplyTooLarge(ProtocolError):
    """A reply over the parser's size limit: dropped with its connection."""


class ConnectionLostError(Exception):
    """The connection closed before the command's reply arrived."""


class ReplyError(Exception):
    """An error reply (``-ERR ...``); ``code`` is its first word (ERR, MOVED, CLUSTERDOWN)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
        self.code = text.split(" ", 1)[0]

    @staticmethod
    def parse(text: str) -> ReplyError:
        """The error for ``text``: a ``MovedError`` or ``AskError`` when it redirects."""
        code, _, rest = text.partition(" ")
        if code in ("MOVED", "ASK"):
            slot, _, where = rest.partition(" ")
            host, sep, port = where.rpartition(":")
            if slot.isdigit() and sep and port.isdigit():
                cls = MovedError if code == "MOVED" else AskError
                return cls(text, int(slot), host, int(port))
        return ReplyError(text)


class Redirect(ReplyError):
    """The slot is served elsewhere: ``host`` (may be empty: "the node you asked") and ``port``."""

    def __init__(self, text: str, slot: int, host: str, port: int) -> None:
        super().__init__(text)
        self.slot = slot
        self.host = host
        self.port = port


class MovedError(Redirect):
    """The slot belongs to another master now, for good: update the slot map."""


class AskError(Redirect):
    """The slot is migrating: ask that node this once (after ASKING), keep the map."""


class _Incomplete(Exception):
    """The data ran out; ``need`` is the smallest total length that could complete it."""

    def __init__(self, need: int) -> None:
        self.need = need


def _int(data: bytes, start: int, end: int) -> int:
    try:
        return int(data[start:end])
    except ValueError:
        raise ProtocolError(f"not an integer: {data[start:end][:40]!r}") from None


def _parse(data: bytes, pos: int, depth: int, limit: int) -> tuple[Any, int]:
    """One value starting at ``pos``: (value, position after it)."""
    eol = data.find(b"\r\n", pos)
    if eol < 0:
        if len(data) - pos > MAX_LINE:
            raise ProtocolError(f"a line longer than {MAX_LINE} bytes")
        raise _Incomplete(len(data) + 1)
    kind = data[pos]
    if kind == 0x24:  # $ bulk string
        length = _int(data, pos + 1, eol)
        if length < 0:
            return None, eol + 2
        if length > limit:
            raise ReplyTooLarge(f"a bulk string of {length} bytes")
        end = eol + 2 + length
        if len(data) < end + 2:
            raise _Incomplete(end + 2)
        if data[end : end + 2] != b"\r\n":
            raise ProtocolError("a bulk string not followed by CRLF")
        return data[eol + 2 : end], end + 2
    if kind == 0x2A:  # * array
        count = _int(data, pos + 1, eol)
        if count < 0:
            return None, eol + 2
        if count * 3 > limit:  # each element takes 3 bytes at least
            raise ReplyTooLarge(f"an array of {count} elements")
        if depth >= MAX_DEPTH:
            raise ProtocolError(f"arrays nested deeper than {MAX_DEPTH}")
        items = []
        p = eol + 2
        for _ in range(count):
            item, p = _parse(data, p, depth + 1, limit)
            items.append(item)
        return items, p
    if kind == 0x3A:  # : integer
        return _int(data, pos + 1, eol), eol + 2
    if kind == 0x2B:  # + simple string
        return data[pos + 1 : eol], eol + 2
    if kind == 0x2D:  # - error
        return ReplyError.parse(data[pos + 1 : eol].decode("utf-8", "replace")), eol + 2
    raise ProtocolError(f"unexpected type byte {bytes([kind])!r}")


class RespParser:
    """Turns reads into RESP2 values, in order.

    Values: bytes (bulk and simple strings), int, None (null bulk or array),
    list (array), ``ReplyError`` instances (error replies, returned, not
    raised), and for each ``smessage`` push a tuple ``(channel, payload)``:
    arrays are lists, so a tuple is always a push.
    """

    def __init__(self, max_reply: int = MAX_REPLY) -> None:
        self.max_reply = max_reply
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete value."""
        return self._have

    def feed(self, data: bytes) -> list[Any]:
        """The values completed by ``data``; raises ``ProtocolError`` on garbage."""
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                if self._have > self.max_reply:
                    raise ReplyTooLarge(f"a reply over {self.max_reply} bytes")
                return []
            data = b"".join(self._parts)
            self._parts = []
            self._have = self._need = 0
        out: list[Any] = []
        append = out.append
        pos = 0
        end = len(data)
        head = _SMESSAGE_HEAD
        skip = len(head)
        limit = self.max_reply
        while pos < end:
            if data.startswith(head, pos):
                # The hot path: slice a whole push; anything unusual (cut
                # short, odd lengths) falls through to the general parser.
                i = pos + skip
                j = data.find(b"\r\n", i)
                if j > 0 and data[i:j].isdigit():
                    channel_end = j + 2 + int(data[i:j])
                    if data[channel_end : channel_end + 3] == b"\r\n$":
                        k = data.find(b"\r\n", channel_end + 3)
                        if k > 0 and data[channel_end + 3 : k].isdigit():
                            payload_end = k + 2 + int(data[channel_end + 3 : k])
                            if data[payload_end : payload_end + 2] == b"\r\n":
                                append((data[j + 2 : channel_end], data[k + 2 : payload_end]))
                                pos = payload_end + 2
                                continue
            elif data[pos] == 0x3A:  # an integer reply (SPUBLISH's), inline
                eol = data.find(b"\r\n", pos)
                if eol > 0:
                    append(_int(data, pos + 1, eol))
                    pos = eol + 2
                    continue
            try:
                value, after = _parse(data, pos, 0, limit)
            except _Incomplete as short:
                rest = data[pos:]
                need = short.need - pos
                if need > limit:
                    raise ReplyTooLarge(f"a reply of at least {need} bytes") from None
                self._parts = [rest]
                self._have = len(rest)
                self._need = need
                break
            if (
                type(value) is list
                and len(value) == 3
                and value[0] == _SMESSAGE
                and isinstance(value[1], bytes)
                and isinstance(value[2], bytes)
            ):
                value = (value[1], value[2])
            append(value)
            pos = after
        return out


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def spublish_command(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$8\r\nSPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


# Called with the reply (a value, a ReplyError, or a ConnectionLostError) and ``arg``.
ReplySink = Callable[[Any, Any], None]


def _fire(reply: Any, d: Deferred[Any]) -> None:
    if d.called:
        return  # cancelled (a timeout) before the reply came
    if isinstance(reply, Exception):
        d.errback(Failure(reply))
    else:
        d.callback(reply)


class RespHandler(Protocol):
    """What a connection reports, in the order it happens."""

    def connection_ready(self, proto: RespProtocol) -> None:
        """AUTH (if any) passed, and TLS verified: commands may be sent."""

    def connection_lost(self, proto: RespProtocol, reason: Failure) -> None: ...

    def pushes_received(self, proto: RespProtocol, pushes: list[SMessage]) -> None:
        """The ``smessage`` pushes of one read that came together, in order."""

    def unsubscribed(self, proto: RespProtocol, channel: bytes) -> None:
        """Redis dropped a shard subscription by itself (its slot moved away)."""


@implementer(IHandshakeListener)
class RespProtocol(TwistedProtocol):
    """One connection to one Redis node: pipelined commands, pushes, liveness.

    Replies are matched to commands in order (a FIFO of sinks). In subscribed
    mode Redis also sends what no command asked for: ``smessage`` pushes, and
    a ``sunsubscribe`` when it drops a shard channel whose slot moved away.
    A ``sunsubscribe`` is the reply to our SUNSUBSCRIBE only if that is the
    command at the head of the FIFO, for that channel; otherwise it is
    reported to the handler as unsolicited.

    One case stays ambiguous: our SUNSUBSCRIBE of a channel at the head while
    Redis drops that channel by itself. Then the push comes first and Redis,
    no longer owning the slot, answers the command with MOVED. So a
    ``sunsubscribe`` at the head for a channel still subscribed is taken as
    the reply, and a redirect for that slot right after it is swallowed as
    the late answer. Should that guess ever be wrong, the replies of
    SSUBSCRIBE and SUNSUBSCRIBE name their channel and are checked against
    the command at the head: a mismatch drops the connection, and the broker
    resubscribes on a fresh one, rather than misrouting replies.
    """

    def __init__(
        self,
        handler: RespHandler,
        clock: IReactorTime,
        timeout: float,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        max_reply: int = MAX_REPLY,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.timeout = timeout
        self._username = username
        self._password = password
        self._tls = tls
        self.parser = RespParser(max_reply)
        # (sink, arg, tag), one per command sent; the tag of SSUBSCRIBE and
        # SUNSUBSCRIBE is the reply they expect: (kind, channel).
        self._replies: deque[tuple[ReplySink, Any, tuple[bytes, bytes] | None]] = deque()
        # Shard channels Redis confirmed on this connection and has not dropped.
        self.subscribed: set[bytes] = set()
        self._stray_slot: int | None = None
        self.ready = False
        self.lost = False
        self.dropping = False
        self.error: str | None = None
        self._quiet_since = 0.0
        self._watch: IDelayedCall | None = None

    # -- connecting -------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self._tls:
            self._authenticate()

    def handshakeCompleted(self) -> None:
        # rediss://: the certificate and host name verified; only now is it Redis.
        self._authenticate()

    def _authenticate(self) -> None:
        if self._password is None:
            self._authenticated(None)
            return
        args: list[bytes | str | int] = ["AUTH"]
        if self._username is not None:
            args.append(self._username)
        args.append(self._password)
        self.command(*args).addCallbacks(self._authenticated, self._auth_failed)

    def _authenticated(self, _: Any) -> None:
        if self.lost:
            return
        self.ready = True
        self.handler.connection_ready(self)

    def _auth_failed(self, failure: Failure) -> None:
        if failure.check(ConnectionLostError):
            return
        # Reported by whoever opened the connection (once per streak).
        self._drop(f"AUTH failed: {failure.getErrorMessage()}", quiet=True)

    # -- sending ----------------------------------------------------------------

    def send(
        self,
        data: bytes,
        sink: ReplySink,
        arg: Any,
        tag: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Write one command; ``sink(reply, arg)`` is called with its reply, in order."""
        if self.lost or self.dropping:
            sink(ConnectionLostError("not connected"), arg)
            return
        if not self._replies:
            self._quiet_since = self.clock.seconds()  # the wait for a reply starts now
        self._replies.append((sink, arg, tag))
        self.transport.write(data)
        if self._watch is None:
            self._watch = self.clock.callLater(self.timeout, self._check)

    def command(self, *args: bytes | str | int) -> Deferred[Any]:
        """Fires with the reply; errbacks with ``ReplyError`` or ``ConnectionLostError``."""
        d: Deferred[Any] = Deferred()
        self.send(encode_command(args), _fire, d)
        return d

    def spublish(self, channel: bytes, payload: bytes, sink: ReplySink, arg: Any) -> None:
        """SPUBLISH without a Deferred: ``sink`` gets the receiver count or an exception."""
        self.send(spublish_command(channel, payload), sink, arg)

    def ssubscribe(self, channel: bytes, sink: ReplySink, arg: Any) -> None:
        """One channel per command: the reply is then unambiguous, even pipelined."""
        self.send(encode_command((b"SSUBSCRIBE", channel)), sink, arg, (_SSUBSCRIBE, channel))

    def sunsubscribe(self, channel: bytes) -> None:
        self.send(
            encode_command((b"SUNSUBSCRIBE", channel)), _ignore, None, (_SUNSUBSCRIBE, channel)
        )

    @property
    def outstanding(self) -> int:
        """Commands sent whose replies have not arrived."""
        return len(self._replies)

    # -- receiving --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.dropping:
            return
        self._quiet_since = self.clock.seconds()
        try:
            values = self.parser.feed(data)
        except ProtocolError as e:
            self._drop(f"protocol error: {e}")
            return
        pushes: list[SMessage] = []
        for value in values:
            if type(value) is tuple:
                pushes.append(value)
                continue
            if pushes:  # what came before a reply is handed over before it
                self.handler.pushes_received(self, pushes)
                pushes = []
            self._reply(value)
            if self.dropping:
                return
        if pushes:
            self.handler.pushes_received(self, pushes)

    def _reply(self, value: Any) -> None:
        replies = self._replies
        tag = replies[0][2] if replies else None
        if type(value) is list and len(value) == 3 and value[0] in (_SSUBSCRIBE, _SUNSUBSCRIBE):
            kind, channel = value[0], value[1]
            if kind == _SUNSUBSCRIBE and tag != (kind, channel):
                self.subscribed.discard(channel)  # dropped by Redis, not asked for
                self.handler.unsubscribed(self, channel)
                return
            if tag != (kind, channel):
                self._desync(value)
                return
            self._stray_slot = None
            if kind == _SSUBSCRIBE:
                self.subscribed.add(channel)
            elif channel in self.subscribed:
                # Our SUNSUBSCRIBE's reply, or Redis dropping the channel just
                # before it: then a redirect for this slot answers the command.
                self.subscribed.discard(channel)
                self._stray_slot = key_slot(channel)
        else:
            stray, self._stray_slot = self._stray_slot, None
            if stray is not None and isinstance(value, Redirect) and value.slot == stray:
                return
            if tag is not None and not isinstance(value, ReplyError):
                self._desync(value)
                return
        if not replies:
            self._desync(value)
            return
        sink, arg, _ = replies.popleft()
        sink(value, arg)

    def _desync(self, value: Any) -> None:
        expected = self._replies[0][2] if self._replies else None
        self._drop(f"reply {value!r:.80} does not answer {expected!r:.80}")

    def _drop(self, error: str, quiet: bool = False) -> None:
        """Close at once; nothing more of what this connection reads is used."""
        if self.dropping:
            return
        self.dropping = True
        self.error = error
        if not quiet:
            log.warn("redis cluster: {error}; dropping the connection", error=error)
        self.transport.abortConnection()

    # -- liveness ---------------------------------------------------------------

    def _check(self) -> None:
        self._watch = None
        if self.lost or not self._replies:
            return
        quiet = self.clock.seconds() - self._quiet_since
        if quiet < self.timeout:
            self._watch = self.clock.callLater(self.timeout - quiet, self._check)
            return
        self._drop(f"no reply for {quiet:.1f}s")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.ready = False
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None
        replies, self._replies = self._replies, deque()
        gone = ConnectionLostError(self.error or reason.getErrorMessage())
        for sink, arg, _ in replies:
            sink(gone, arg)
        self.handler.connection_lost(self, reason)


def _ignore(reply: Any, arg: Any) -> None:
    return None
