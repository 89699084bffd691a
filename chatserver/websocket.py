"""The WebSocket transport: Autobahn's protocol, adapted to the chat core's ``Connection``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from chatserver import auth, wire
from chatserver.chat import Chat
from chatserver.config import Config

CLOSE_GOING_AWAY = 1001
CLOSE_TOKEN_EXPIRED = 4001


# Module-level: Autobahn's own ``self.log`` is a level-filtered txaio logger,
# which a twisted Logger class attribute would replace.
log = Logger()


class ChatProtocol(WebSocketServerProtocol):
    user = ""
    connected = False
    bad_frames = 0
    _expiry: IDelayedCall | None = None

    def onConnect(self, request: Any) -> str | None:
        factory: ChatFactory = self.factory
        try:
            identity = auth.authenticate(factory.config, request.params)
        except auth.AuthError as e:
            factory.rejected[e.reason] += 1
            log.info(
                "handshake from {peer} refused ({status}): {reason}",
                peer=request.peer,
                status=e.status,
                reason=e.reason,
            )
            status = "Unauthorized" if e.status == 401 else "Forbidden"
            raise ConnectionDeny(e.status, status) from None
        self.user = identity.user
        self.rooms: dict[str, Deferred[int] | None] = {}
        if identity.expires is not None:
            delay = max(0.0, identity.expires - factory.clock.seconds())
            self._expiry = factory.clock.callLater(delay, self._token_expired)
        if wire.SUBPROTOCOL in request.protocols:
            return wire.SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        self.connected = True
        self.factory.connections.add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.chat.handle(self, payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        if not self.connected:
            return
        self.connected = False
        self.factory.connections.discard(self)
        self.factory.chat.disconnect(self)
        for waiter in self.factory.pop_close_waiters(self):
            waiter.callback(None)

    def _token_expired(self) -> None:
        self.close_with(CLOSE_TOKEN_EXPIRED, "token expired")

    # -- chat.Connection ------------------------------------------------------

    def send_frame(self, data: bytes) -> None:
        if self.connected:
            self.sendMessage(data)

    def deliver(self, prepared: Any) -> None:
        if self.connected:
            self.sendPreparedMessage(prepared)

    def close_with(self, code: int, reason: str) -> None:
        # sendClose() only takes application codes; 1001/1008 are protocol-level.
        if self.connected and self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)


class ChatFactory(WebSocketServerFactory):
    protocol = ChatProtocol

    def __init__(self, config: Config, clock: IReactorTime, url: str = "ws://localhost/ws") -> None:
        # Autobahn formats its debug lines eagerly; below info they cost CPU per frame.
        txaio.set_global_log_level("info")
        super().__init__(url)
        self.config = config
        self.clock = clock
        self.chat: Chat | None = None
        self.connections: set[ChatProtocol] = set()
        self.rejected: Counter[str] = Counter()
        self._close_waiters: dict[ChatProtocol, list[Deferred[None]]] = {}
        # Every Autobahn default that matters is set here on purpose.
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=config.max_frame_bytes,
            maxMessagePayloadSize=config.max_frame_bytes,
            failByDrop=False,  # close frames with 1009/1002/1007, not a silent TCP drop
            allowNullOrigin=True,
            perMessageCompressionAccept=lambda offers: None,
        )

    def pop_close_waiters(self, proto: ChatProtocol) -> list[Deferred[None]]:
        return self._close_waiters.pop(proto, [])

    def close_all(self, code: int, reason: str, timeout: float) -> Deferred[Any]:
        """Close every open connection; fires when all have closed or ``timeout`` passed."""
        waits = []
        for proto in list(self.connections):
            d: Deferred[None] = Deferred()
            self._close_waiters.setdefault(proto, []).append(d)
            proto.close_with(code, reason)
            waits.append(d)
        done = DeferredList(waits, consumeErrors=True)

        def abort_rest(_: Any) -> None:
            for proto in list(self.connections):
                proto.dropConnection(abort=True)

        timer = self.clock.callLater(timeout, abort_rest, None)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done
