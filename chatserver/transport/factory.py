"""The WebSocket factory: Autobahn's options set on purpose, pings, and the drain."""

from __future__ import annotations

from collections import Counter
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from chatserver import auth
from chatserver.chat import Chat
from chatserver.compat import FastPaths
from chatserver.config import Config
from chatserver.transport.fast import protocol_class
from chatserver.transport.policies import OriginPolicy, ProxyPolicy
from chatserver.transport.protocol import ChatProtocol

log = Logger()

# The shared ping tick: often enough for the timeout, at most once a second.
PING_TICK_MIN = 0.05
PING_TICK_MAX = 1.0
PING_TICKS_PER_INTERVAL = 4


class ChatFactory(WebSocketServerFactory):
    protocol = ChatProtocol

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        chat: Chat,
        fast_paths: FastPaths,
        url: str = "ws://localhost/ws",
    ) -> None:
        # Autobahn formats its debug lines eagerly; below info they cost CPU per frame.
        txaio.set_global_log_level("info")
        super().__init__(url)
        self.config = config
        self.clock = clock
        self.chat = chat
        self.fast_paths = fast_paths
        self.authenticator = auth.Authenticator(config)
        self.origins = OriginPolicy(config.allowed_origins)
        self.proxies = ProxyPolicy(config.trusted_proxies)
        self.connections: set[ChatProtocol] = set()
        self.rejected: Counter[str] = Counter()
        self.dropped_slow = 0
        self.direct_writes = 0  # writes that went straight to the socket (fast path)
        self.ping_timeouts = 0
        self._pinger = LoopingCall(self._sweep_pings)
        self._pinger.clock = clock
        self._close_waiters: dict[ChatProtocol, list[Deferred[None]]] = {}
        # Every Autobahn default that matters is set here on purpose.
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=config.max_frame_bytes,
            maxMessagePayloadSize=config.max_frame_bytes,
            failByDrop=False,  # close frames with 1009/1002/1007, not a silent TCP drop
            allowNullOrigin=True,  # our OriginPolicy decides
            # The site's DeadlineChannel bounds the whole handshake, request
            # included; Autobahn's timer would start late and round short values.
            openHandshakeTimeout=0,
            # Pings are ours (see _sweep_pings): Autobahn's own keep a timer
            # object per connection, about 0.6 KB each.
            autoPingInterval=0,
            perMessageCompressionAccept=lambda offers: None,
        )
        self.protocol = protocol_class(self, fast_paths)

    # -- pings: one timer for every connection, instead of one per connection ----

    def start_pings(self) -> None:
        config = self.config
        if config.ping_interval <= 0 or self._pinger.running:
            return
        tick = max(
            PING_TICK_MIN,
            min(
                PING_TICK_MAX,
                config.ping_interval / PING_TICKS_PER_INTERVAL,
                config.ping_timeout / PING_TICKS_PER_INTERVAL,
            ),
        )
        self._pinger.start(tick, now=False)

    def stop_pings(self) -> None:
        if self._pinger.running:
            self._pinger.stop()

    def _sweep_pings(self) -> None:
        now = self.clock.seconds()
        timeout = self.config.ping_timeout
        for proto in tuple(self.connections):
            if proto.pong_deadline:
                if now >= proto.pong_deadline:
                    self.ping_timeouts += 1
                    log.info(
                        "dropping {user} at {peer}: no answer to a ping in {timeout}s",
                        user=proto.user,
                        peer=proto.peer,
                        timeout=timeout,
                    )
                    proto.pong_deadline = 0.0
                    proto.transport.abortConnection()
            elif now >= proto.ping_due and proto.state == proto.STATE_OPEN:
                proto.compact()  # what its last frames left behind
                proto.pong_deadline = now + timeout
                proto.sendPing()

    # -- closing -------------------------------------------------------------------

    def when_closed(self, proto: ChatProtocol) -> Deferred[None]:
        """Fires once ``proto``'s WebSocket has closed."""
        d: Deferred[None] = Deferred()
        if not proto.ws_open:
            d.callback(None)
        else:
            self._close_waiters.setdefault(proto, []).append(d)
        return d

    def closed(self, proto: ChatProtocol) -> None:
        for waiter in self._close_waiters.pop(proto, []):
            waiter.callback(None)

    def close_all(
        self, code: int, reason: str, timeout: float, spread: float = 0.0
    ) -> Deferred[Any]:
        """Close every connection, spread evenly over ``spread`` seconds so that
        clients don't all reconnect in the same instant; fires when all have
        closed, or ``spread + timeout`` seconds have passed."""
        waits = []
        protos = list(self.connections)
        step = spread / len(protos) if protos else 0.0
        for i, proto in enumerate(protos):
            waits.append(self.when_closed(proto))
            # Through the core, which then acts on nothing more the client sends.
            if step:
                self.clock.callLater(i * step, self.chat.disconnect, proto.session, code, reason)
            else:
                self.chat.disconnect(proto.session, code, reason)
        done = DeferredList(waits, consumeErrors=True)
        timeout += spread

        def abort_rest(_: Any) -> None:
            for proto in list(self.connections):
                proto.dropConnection(abort=True)

        timer = self.clock.callLater(timeout, abort_rest, None)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done
