"""One WebSocket connection: Autobahn's protocol, adapted to the chat core's ``Session``.

The handshake is where a connection is refused: origin and authentication
here, limits and bans by the core (``Chat.admit``). After it, frames go to
``Chat.handle`` and the core writes back through ``write``/``close``; this
class keeps only what a connection needs (its outbound queue, its pings),
nothing of the chat.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from chatserver import auth, wire
from chatserver.admission import Refused
from chatserver.session import Session
from chatserver.transport.outbound import Outbound

log = Logger()

# Seconds a peer that sent its close frame has to read our last frames before the
# connection is aborted: one round trip and a close frame, with a wide margin.
CLOSE_FLUSH_TIMEOUT = 5.0

_STATUS_TEXT = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests"}

# Labels of refused handshakes (``factory.rejected``, and the metric's ``reason``):
# few and fixed whatever clients send, so a flood of distinct bad tokens can't grow
# the metric by a series each. The detail (PyJWT's message, say) goes to the log.
# ``timeout`` is the site's: a handshake that did not finish in time.
ORIGIN = "origin"
TIMEOUT = "timeout"
REFUSED = "refused"  # a refusal of the core's with a status none of the others has
# The core's refusals (``admission.Refused``), by HTTP status.
_REFUSED_LABELS = {401: "expired", 403: "banned", 429: "too_many", 503: "unavailable"}
REJECTION_LABELS = frozenset({*auth.LABELS, ORIGIN, TIMEOUT, REFUSED, *_REFUSED_LABELS.values()})


_WebSocket = WebSocketServerProtocol


def _text(reason: str | bytes | None) -> str:
    if isinstance(reason, bytes):
        return reason.decode("utf-8", "replace")
    return reason or ""


class ChatProtocol(Outbound, WebSocketServerProtocol):
    # Module-level logger: Autobahn's own ``self.log`` is a level-filtered txaio
    # logger, which a twisted Logger class attribute would replace.
    # Set once the core admitted the handshake; kept after the close for the logs.
    session: Session | None = None
    gone = False  # the TCP connection is closed
    ws_open = False  # the WebSocket is open (Twisted's own `connected` means TCP)
    ping_due = 0.0  # when the next WebSocket ping is sent
    pong_deadline = 0.0  # when an unanswered ping counts as a dead peer; 0: none out
    handshake_channel: Any = None  # the HTTP channel whose deadline covers our handshake
    # Autobahn is reading a message's first frame (paid for with the whole
    # message, in Chat.handle); each later fragment is charged as it begins.
    _first_frame = False
    # Autobahn is acting on the peer's close frame (see dropConnection).
    _reading_close = False
    # Closing with our last frames still being written: the abort if they never leave.
    _flush_timer: IDelayedCall | None = None

    @property
    def user(self) -> str:
        return self.session.user if self.session is not None else ""

    @property
    def address(self) -> str:
        return self.session.address if self.session is not None else ""

    # -- handshake ----------------------------------------------------------

    def onConnect(self, request: Any) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._admit(request))

    def _deny(self, status: int, label: str, reason: str, address: str) -> ConnectionDeny:
        self.factory.rejected[label if label in REJECTION_LABELS else REFUSED] += 1
        log.info(
            "handshake from {address} refused ({status}, {label}): {reason}",
            address=address,
            status=status,
            label=label,
            reason=reason,
        )
        return ConnectionDeny(status, _STATUS_TEXT.get(status, "Refused"))

    async def _admit(self, request: Any) -> str | None:
        factory = self.factory
        peer = self.transport.getPeer()
        address = factory.proxies.client_address(
            getattr(peer, "host", ""), request.headers.get("x-forwarded-for")
        )
        if not factory.origins.allows(request.headers.get("origin")):
            raise self._deny(403, ORIGIN, "origin not allowed", address)
        try:
            identity = factory.authenticator.authenticate(request.params)
        except auth.AuthError as e:
            raise self._deny(e.status, e.label, e.reason, address) from None
        try:
            session = await factory.chat.admit(identity, address)
        except Refused as e:
            label = _REFUSED_LABELS.get(e.status, REFUSED)
            raise self._deny(e.status, label, e.reason, address) from None
        if self.gone:
            # Hung up while the core checked: its slot is free again, nothing else to undo.
            factory.chat.close(session)
            raise ConnectionDeny(400, "Gone")
        self.session = session
        if wire.SUBPROTOCOL in request.protocols:
            return wire.SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        factory = self.factory
        self.ws_open = True
        self.ping_due = factory.clock.seconds() + factory.config.ping_interval
        log.info("connection open: {user} from {address}", user=self.user, address=self.address)
        factory.connections.add(self)
        self.start_writing()
        channel, self.handshake_channel = self.handshake_channel, None
        if channel is not None:
            channel.upgraded()  # its deadline is met: the HTTP side can go now
        # Whoever had the transport before (the HTTP channel) lets go of it first.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        self.opened()
        factory.chat.open(self.session, self)

    def opened(self) -> None:
        """For the fast paths' mixins: the connection is open and nothing is being parsed."""

    def compact(self) -> None:
        """For the fast paths' mixins: called before each ping, never mid-frame."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Autobahn reads on after a close frame of ours; the core decided that close
        # and ignores what follows (Autobahn's own, for protocol errors, stop it itself).
        self.factory.chat.handle(self.session, payload, isBinary)

    # -- every other frame costs a token too (Chat.allow_frame) ------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        self._first_frame = True
        _WebSocket.onMessageBegin(self, isBinary)  # not super(): once per message, measurable

    def onMessageFrameBegin(self, length: int) -> None:
        if self._first_frame:
            self._first_frame = False
        else:
            # Even an empty fragment: Autobahn reads it whatever we answer.
            self.factory.chat.allow_frame(self.session)
        _WebSocket.onMessageFrameBegin(self, length)

    def onPing(self, payload: bytes) -> None:
        if self.factory.chat.allow_frame(self.session):
            self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        if self.factory.chat.allow_frame(self.session):
            self.pong_deadline = 0.0
            self.ping_due = self.factory.clock.seconds() + self.factory.config.ping_interval

    def connectionLost(self, reason: Any) -> None:
        self.gone = True
        if self._flush_timer is not None:
            if self._flush_timer.active():
                self._flush_timer.cancel()
            self._flush_timer = None
        super().connectionLost(reason)
        self._end_session()  # also when Autobahn skips onClose for a half-done handshake

    def _end_session(self) -> None:
        if self.session is not None:
            self.factory.chat.close(self.session)  # idempotent: onClose, then connectionLost

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.stop_writing()
        self._end_session()
        if not self.ws_open:
            return
        self.ws_open = False
        factory = self.factory
        factory.connections.discard(self)
        # Our own close code when we closed (1001, 1008, 4001, ...), else the peer's.
        log.info(
            "connection closed: {user} from {address} after {duration:.1f}s, {code} {reason}",
            user=self.user,
            address=self.address,
            duration=factory.clock.seconds() - self.session.opened_at,
            code=self.localCloseCode if self.closedByMe and self.localCloseCode else code,
            reason=_text(self.localCloseReason if self.closedByMe else reason),
        )
        factory.closed(self)

    # -- session.Transport: write (Outbound) and close ----------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's own frames (pongs, pings, close frames) join the send queue once
        open: bounded by ``max_send_buffer`` like ours, and behind what waits."""
        if self.ws_open and not sync and not chopsize:
            self.write(data)
        else:
            super().sendData(data, sync, chopsize)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        self._reading_close = True
        try:
            return super().onCloseFrame(code, reasonRaw)
        finally:
            self._reading_close = False

    def dropConnection(self, abort: bool = False) -> None:
        if abort and self._reading_close and self.wasClean:
            # The peer's close frame ended the handshake, and Autobahn aborts. When that
            # frame was itself invalid, our answer (1002, 1007) was written only just
            # now, and an abort would throw it away: the peer would see a TCP reset
            # instead of the close frame RFC 6455 (7.1.7) asks for. So it ends like a
            # clean close: what is written goes first, then a FIN; a peer that stops
            # reading has CLOSE_FLUSH_TIMEOUT to take it before the abort after all.
            abort = False
            self._flush_timer = self.factory.clock.callLater(
                CLOSE_FLUSH_TIMEOUT, self._abort_unflushed
            )
        elif abort and self.state == self.STATE_CLOSED and not self.gone:
            # Closing already (see above), but told to abort now (the drain's deadline).
            self.transport.abortConnection()
            return
        if not abort:
            self.hand_over()  # a clean close: what is queued (our close frame too) goes first
        super().dropConnection(abort)

    def _abort_unflushed(self) -> None:
        self._flush_timer = None
        if not self.gone:
            self.transport.abortConnection()

    def stop_reading(self) -> None:
        self.transport.pauseProducing()  # a TCP (or TLS) transport: stops reading

    def close(self, code: int, reason: str) -> None:
        # sendClose() only takes application codes; 1001/1008 are protocol-level.
        if self.ws_open and self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)
