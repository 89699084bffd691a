"""The WebSocket transport: Autobahn's protocol, adapted to the chat core's ``Connection``.

The handshake is where a connection is refused (auth, origin, limits, bans).
After it, every outgoing frame goes through one bounded queue per connection:
the transport tells us (as an ``IPushProducer``) when its buffer is full, we
queue while paused, and a client that stays behind or lets the queue grow past
``max_send_buffer`` is dropped instead of growing the server's memory.
"""

from __future__ import annotations

import ipaddress
import types
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from chatserver import auth, resting, wire
from chatserver.chat import Chat
from chatserver.config import Config
from chatserver.store import Store, StoreUnavailable

CLOSE_GOING_AWAY = 1001
CLOSE_TOKEN_EXPIRED = 4001
_STATE_OPEN = WebSocketServerProtocol.STATE_OPEN
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# Module-level: Autobahn's own ``self.log`` is a level-filtered txaio logger,
# which a twisted Logger class attribute would replace.
log = Logger()


def _origin_key(origin: str) -> str | None:
    """scheme://host:port, with the default port made explicit."""
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.hostname:
        return None
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return f"{parts.scheme}://{parts.hostname}:{port}"


def _text(reason: str | bytes | None) -> str:
    if isinstance(reason, bytes):
        return reason.decode("utf-8", "replace")
    return reason or ""


class OriginPolicy:
    """Cross-site WebSocket hijacking: only listed browser origins may connect."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._any = "*" in patterns
        self._patterns = []
        for p in patterns:
            if p == "*":
                continue
            scheme, _, rest = p.lower().partition("://")
            if ":" not in rest.rsplit("]", 1)[-1]:
                rest = f"{rest}:{_DEFAULT_PORTS.get(scheme, '*')}"
            self._patterns.append(f"{scheme}://{rest}")

    def allows(self, origin: str | None) -> bool:
        if origin is None or self._any:
            return True  # non-browser clients send no Origin
        key = _origin_key(origin)
        return key is not None and any(fnmatchcase(key, p) for p in self._patterns)


class ProxyPolicy:
    """Which address a connection counts as: the peer, or X-Forwarded-For from a trusted proxy."""

    def __init__(self, trusted: tuple[str, ...]) -> None:
        self._networks = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        if not forwarded_for or not self._trusted(peer):
            return peer
        # Right to left: the first address not of our own proxies is the client.
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer


# Frames up to this size are unmasked here; bigger ones by Autobahn's C masker.
INBOUND_FAST_MAX = 8192


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 unmasking as one big-integer XOR: a few C calls, no loop in Python."""
    n = len(payload)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


@implementer(IPushProducer)
class ChatProtocol(WebSocketServerProtocol):
    user = ""
    address = ""
    admitted = False  # counted against the per-user and per-address limits
    joined_chat = False  # known to the chat core
    gone = False  # the TCP connection is closed
    opened_at = 0.0
    chat_open = False  # the WebSocket is open (Twisted's own `connected` means TCP)
    bad_frames = 0
    granted: frozenset[str] = frozenset()
    _expiry: IDelayedCall | None = None
    _paused_since: float | None = None
    _slow_timer: IDelayedCall | None = None
    _over_timer: IDelayedCall | None = None
    _writable = False  # open, and not dropped
    ping_due = 0.0  # when the next WebSocket ping is sent
    pong_deadline = 0.0  # when an unanswered ping counts as a dead peer; 0: none out
    _queue: deque[bytes] | None = None  # made when the transport first pushes back
    _direct = False  # plain TCP: deliveries may go straight to the socket
    _queued = 0
    handshake_channel: Any = None  # the HTTP channel whose deadline covers our handshake

    # -- handshake ----------------------------------------------------------

    def onConnect(self, request: Any) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._admit(request))

    def _deny(self, status: int, reason: str, request: Any) -> ConnectionDeny:
        factory: ChatFactory = self.factory
        factory.rejected[reason] += 1
        log.info(
            "handshake from {address} refused ({status}): {reason}",
            address=self.address or request.peer,
            status=status,
            reason=reason,
        )
        text = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests"}.get(status)
        return ConnectionDeny(status, text or "Refused")

    async def _admit(self, request: Any) -> str | None:
        factory: ChatFactory = self.factory
        peer = self.transport.getPeer()
        self.address = factory.proxies.client_address(
            getattr(peer, "host", ""), request.headers.get("x-forwarded-for")
        )
        if not factory.origins.allows(request.headers.get("origin")):
            raise self._deny(403, "origin not allowed", request)
        try:
            identity = factory.authenticator.authenticate(request.params)
        except auth.AuthError as e:
            raise self._deny(e.status, e.reason, request) from None
        config = factory.config
        if factory.by_address[self.address] >= config.max_connections_per_ip:
            raise self._deny(429, "too many connections from this address", request)
        if factory.by_user[identity.user] >= config.max_connections_per_user:
            raise self._deny(429, "too many connections for this user", request)
        # Counted before the first await, so a burst of handshakes can't overshoot.
        self._hold(identity.user)
        try:
            banned = await factory.store.banned_everywhere(identity.user)
        except StoreUnavailable:
            self._release()
            raise ConnectionDeny(503, "Service Unavailable") from None
        if banned:
            self._release()
            raise self._deny(403, "user is banned", request)
        if self.gone:
            # Hung up while we checked: its slot is free again, nothing else to undo.
            self._release()
            raise ConnectionDeny(400, "Gone")
        self.granted = identity.rooms
        self.rooms: dict[str, Deferred[int] | None] = {}
        factory.chat.connect(self)
        self.joined_chat = True
        if identity.expires is not None:
            delay = max(0.0, identity.expires - factory.clock.seconds())
            self._expiry = factory.clock.callLater(delay, self._token_expired)
        if wire.SUBPROTOCOL in request.protocols:
            return wire.SUBPROTOCOL
        return None

    def _hold(self, user: str) -> None:
        factory: ChatFactory = self.factory
        self.user = user
        factory.by_address[self.address] += 1
        factory.by_user[user] += 1
        self.admitted = True

    def _release(self) -> None:
        if not self.admitted:
            return
        self.admitted = False
        factory: ChatFactory = self.factory
        for counter, key in ((factory.by_address, self.address), (factory.by_user, self.user)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def connectionLost(self, reason: Any) -> None:
        self.gone = True
        super().connectionLost(reason)
        self._release()  # also when Autobahn skips onClose for a half-done handshake

    def onOpen(self) -> None:
        self.chat_open = True
        self.opened_at = self.factory.clock.seconds()
        self.ping_due = self.opened_at + self.factory.config.ping_interval
        log.info("connection open: {user} from {address}", user=self.user, address=self.address)
        self.factory.connections.add(self)
        self._writable = True
        channel, self.handshake_channel = self.handshake_channel, None
        if channel is not None:
            channel.upgraded()  # its deadline is met: the HTTP side can go now
        # Whoever had the transport before (the HTTP channel) lets go of it first.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        self._direct = isinstance(self.transport, tcp.Connection)
        # The handshake's leftovers and every attribute at its resting value go.
        resting.forget_handshake(self)
        self.data = b""
        # Autobahn counts octets and frames per connection, always; nothing reads them.
        self.trafficStats = self.factory.traffic
        # Twisted's transport dict grew during the HTTP exchange; a copy is
        # sized to what it holds now: about 0.4 KB less.
        self.transport.__dict__ = dict(self.transport.__dict__)
        self.compact()

    def compact(self) -> None:
        """Called when the connection opens and before each ping, never mid-frame."""
        resting.compact(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.chat.handle(self, payload, isBinary)

    # -- incoming, the common case first -------------------------------------

    _inbound_limit = 0  # largest frame read here; set per factory

    def dataReceived(self, data: bytes) -> None:
        """Whole, small, masked text frames go straight to ``onMessage``.

        Autobahn takes about 18 us to turn an 80-byte frame into a message
        (a frame header object, a masker object, UTF-8 validator calls and
        five hooks); this takes a few. Anything else -- a frame cut by the
        read, a control or binary frame, fragments, a frame over the limits,
        bad UTF-8, an unmasked frame -- goes to Autobahn from its first byte,
        with nothing read ahead of it, so its checks and close codes are as
        before.
        """
        if (
            self.state != _STATE_OPEN
            or self.data
            or self.current_frame is not None
            or self.inside_message
        ):
            self._dataReceived(data)
            return
        end_of_data = len(data)
        limit = self._inbound_limit
        pos = 0
        while pos + 6 <= end_of_data and data[pos] == 0x81:  # FIN, no RSV, text
            length = data[pos + 1]
            if length < 0x80 or length == 0xFF:
                break  # unmasked, or a 64-bit length
            length &= 0x7F
            head = pos + 6
            if length == 126:
                head = pos + 8
                if head > end_of_data:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not the shortest encoding: Autobahn refuses it
            if length > limit or head + length > end_of_data:
                break
            end = head + length
            mask = data[head - 4 : head]
            payload = _unmask(data[head:end], mask)
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break
            pos = end
            self.onMessage(payload, False)
            if self.state != _STATE_OPEN:
                break  # closing: Autobahn reads what follows
        if pos < end_of_data:
            self._dataReceived(data[pos:] if pos else data)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        for timer in (self._slow_timer, self._over_timer):
            self._cancel(timer)
        self._writable = False
        self._queue = None
        factory: ChatFactory = self.factory
        self._release()
        if self.joined_chat:
            self.joined_chat = False
            factory.chat.disconnect(self)
        if not self.chat_open:
            return
        self.chat_open = False
        factory.connections.discard(self)
        # Our own close code when we closed (1001, 1008, 4001, ...), else the peer's.
        log.info(
            "connection closed: {user} from {address} after {duration:.1f}s, {code} {reason}",
            user=self.user,
            address=self.address,
            duration=factory.clock.seconds() - self.opened_at,
            code=self.localCloseCode if self.closedByMe and self.localCloseCode else code,
            reason=_text(self.localCloseReason if self.closedByMe else reason),
        )
        for waiter in factory.pop_close_waiters(self):
            waiter.callback(None)

    def onPong(self, payload: bytes) -> None:
        self.pong_deadline = 0.0
        self.ping_due = self.factory.clock.seconds() + self.factory.config.ping_interval

    def _token_expired(self) -> None:
        self.close_with(CLOSE_TOKEN_EXPIRED, "token expired")

    # -- outgoing, bounded ------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Send ``data`` now if nothing is queued ahead of it, else queue it (bounded).

        This runs once per member per message, so the common case is kept to
        one call and a few lookups. Twisted's ``write`` buffers and registers
        for writability, then sends on the next loop pass and unregisters: two
        ``epoll_ctl`` calls around each ``send``, most of a delivery's cost.
        When Twisted has nothing buffered, the socket gets the frame at once;
        what it doesn't take goes through ``write`` as before, after anything
        already buffered, so order is kept.
        """
        if not self._writable or self.state != _STATE_OPEN:
            return
        held = self.factory.held
        if held is not None:  # inside coalesced(): one write per connection at its end
            frames = held.get(self)
            if frames is None:
                held[self] = [data]
            else:
                frames.append(data)
            return
        if self._queue is None and self._paused_since is None:
            t = self.transport
            if self._direct and not t._tempDataLen and not t.dataBuffer and t.connected:
                if t.disconnecting or t._writeDisconnected:
                    return
                try:
                    sent = t.socket.send(data)
                except OSError:  # EAGAIN and EINTR too; Twisted's write reports real errors
                    sent = 0
                if sent == len(data):
                    return
                data = data[sent:]
            t.write(data)
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(data)
        self._queued += len(data)
        config = self.factory.config
        if self._queued > config.max_send_buffer and self._over_timer is None:
            # A burst (one group commit, a history page) passes if the client
            # drains it within the grace; one that stays over is dropped.
            if config.send_buffer_grace <= 0:
                self._drop_slow("send buffer full")
            else:
                self._over_timer = self.factory.clock.callLater(
                    config.send_buffer_grace, self._still_over
                )

    def _still_over(self) -> None:
        self._over_timer = None
        if self._queued > self.factory.config.max_send_buffer:
            self._drop_slow("send buffer full")

    def pauseProducing(self) -> None:
        if self._paused_since is None:
            clock = self.factory.clock
            self._paused_since = clock.seconds()
            self._slow_timer = clock.callLater(
                self.factory.config.slow_client_timeout, self._drop_slow, "not reading"
            )

    def resumeProducing(self) -> None:
        self._paused_since = None
        if self._slow_timer is not None and self._slow_timer.active():
            self._slow_timer.cancel()
        self._slow_timer = None
        queue = self._queue
        while queue and self._paused_since is None:
            data = queue.popleft()
            self._queued -= len(data)
            self.transport.write(data)  # may pause us again
        if queue is not None and not queue:
            self._queue = None  # an empty deque is still most of a KB
        if self._queued <= self.factory.config.max_send_buffer:
            self._cancel(self._over_timer)
            self._over_timer = None

    @staticmethod
    def _cancel(timer: IDelayedCall | None) -> None:
        if timer is not None and timer.active():
            timer.cancel()

    def stopProducing(self) -> None:
        self._writable = False
        self._queue = None

    def _drop_slow(self, why: str) -> None:
        if not self._writable:
            return
        self._writable = False
        self._queue = None
        self.factory.dropped_slow += 1
        log.info("dropping {user} at {peer}: {why}", user=self.user, peer=self.peer, why=why)
        # Not a close handshake: a peer that doesn't read would never finish it.
        self.transport.abortConnection()

    # -- chat.Connection ------------------------------------------------------

    def send_frame(self, data: bytes) -> None:
        self._write(self.factory.wire_frame(data))

    # A message's frame, built once for all members: straight to _write, one
    # call per member (_writable implies chat_open).
    deliver = _write

    def close_with(self, code: int, reason: str) -> None:
        held = self.factory.held
        if held and self in held:  # frames sent before the close go before it
            frames = held.pop(self)
            self.factory.held = None
            try:
                self._write(b"".join(frames))
            finally:
                self.factory.held = held
        # sendClose() only takes application codes; 1001/1008 are protocol-level.
        if self.chat_open and self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)


resting.install(ChatProtocol)


class ChatFactory(WebSocketServerFactory):
    protocol = ChatProtocol

    def __init__(
        self, config: Config, clock: IReactorTime, store: Store, url: str = "ws://localhost/ws"
    ) -> None:
        # Autobahn formats its debug lines eagerly; below info they cost CPU per frame.
        txaio.set_global_log_level("info")
        super().__init__(url)
        self.config = config
        self.clock = clock
        self.store = store
        self.authenticator = auth.Authenticator(config)
        self.origins = OriginPolicy(config.allowed_origins)
        self.proxies = ProxyPolicy(config.trusted_proxies)
        self.chat: Chat | None = None
        self.connections: set[ChatProtocol] = set()
        self.by_address: Counter[str] = Counter()
        self.by_user: Counter[str] = Counter()  # handshakes in progress and open connections
        self.rejected: Counter[str] = Counter()
        self.dropped_slow = 0
        # While coalesced() runs: each connection's frames, to be written at its end.
        self.held: dict[ChatProtocol, list[bytes]] | None = None
        self.coalesced_frames = 0
        self.traffic = TrafficStats()  # shared by all connections, see onOpen
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
        # Autobahn copies each of its ~30 options onto every connection when it
        # opens. As class attributes of a per-factory subclass they are shared:
        # about 1.5 KB less per connection.
        options = {
            # A function as a class attribute would become a method: keep it plain.
            name: staticmethod(value) if isinstance(value, types.FunctionType) else value
            for name in ChatProtocol.CONFIG_ATTRS
            for value in (getattr(self, name),)
        }
        # The factory and the shared traffic counter are class attributes too,
        # so compact() drops the copies Twisted and onOpen put on each connection.
        shared = {
            "CONFIG_ATTRS": (),
            "factory": self,
            "trafficStats": self.traffic,
            "_inbound_limit": min(
                (INBOUND_FAST_MAX, self.maxFramePayloadSize, self.maxMessagePayloadSize),
                key=lambda n: n if n > 0 else INBOUND_FAST_MAX,  # 0: no limit
            ),
        }
        self.protocol = type("ChatProtocol", (ChatProtocol,), {**options, **shared})

    @contextmanager
    def coalesced(self) -> Iterator[None]:
        """Hold every frame written inside, then give each connection its frames in one write.

        A group commit acks a whole batch at once: a sender with 50 messages
        in it would otherwise cost 50 sends, and the send (waking the reader)
        is most of what a frame costs. The room's messages themselves are
        held per room by the registry, which enters this inside its own
        batch, so the acks go first. Order per connection is kept: every
        frame written inside is held, in order, and written whole.
        """
        if self.held is not None:  # nested: the outermost writes
            yield
            return
        held: dict[ChatProtocol, list[bytes]] = {}
        self.held = held
        try:
            yield
        finally:
            self.held = None
            for proto, frames in held.items():
                if len(frames) == 1:
                    proto._write(frames[0])
                else:
                    self.coalesced_frames += len(frames)
                    proto._write(b"".join(frames))

    def wire_frame(self, payload: bytes) -> bytes:
        """The text frame carrying ``payload``, built once and written raw to every member."""
        return self.prepareMessage(payload).payloadHybi

    def start_pings(self) -> None:
        """One timer for every connection's pings, instead of one per connection."""
        config = self.config
        if config.ping_interval <= 0 or self._pinger.running:
            return
        tick = max(0.05, min(1.0, config.ping_interval / 4, config.ping_timeout / 4))
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

    def pop_close_waiters(self, proto: ChatProtocol) -> list[Deferred[None]]:
        return self._close_waiters.pop(proto, [])

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
            d: Deferred[None] = Deferred()
            self._close_waiters.setdefault(proto, []).append(d)
            if step:
                self.clock.callLater(i * step, proto.close_with, code, reason)
            else:
                proto.close_with(code, reason)
            waits.append(d)
        done = DeferredList(waits, consumeErrors=True)
        timeout += spread

        def abort_rest(_: Any) -> None:
            for proto in list(self.connections):
                proto.dropConnection(abort=True)

        timer = self.clock.callLater(timeout, abort_rest, None)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done
