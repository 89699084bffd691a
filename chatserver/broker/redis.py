"""The scale-out broker: per-room Redis pub/sub channels over txredisapi.

One subscriber connection and a small publisher pool per instance. The
subscriber holds only the channels of rooms with local members. What
txredisapi does not do, this does (each is a production failure otherwise):

- re-subscribe every wanted channel after a reconnect, one channel per
  SUBSCRIBE (a multi-channel SUBSCRIBE misroutes later replies), then ask the
  core to re-read the store for anything published while we were away;
- PING every connection on a timer, so Redis' idle ``timeout`` never closes
  a connection, and drop a connection that has replies outstanding and has
  heard nothing for ``redis_timeout`` (a hung or half-open server), but not
  one that is merely behind;
- never wait for a publisher: with no live connection a publish is counted,
  kept (bounded) and published again once Redis is back;
- rebuild a factory that gave up after a failed AUTH or SELECT;
- verify TLS (server certificate and host name) instead of trusting anything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import txredisapi
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatserver.broker import ControlHandler, MessageHandler, ResyncHandler
from chatserver.broker.redis_url import parse_redis_url
from chatserver.config import Config

RECONNECT_MAX_DELAY = 5.0

log = Logger()


def channel_prefix(db: int) -> bytes:
    # Pub/sub ignores SELECT: the db number in the name keeps deployments that
    # share one Redis (on different dbs) from hearing each other.
    return b"chat:%d:room:" % db


class _HandshakeAware:
    """Knows when TLS verification has passed: before that a connection is not usable."""

    handshake: Deferred[None]

    def handshakeCompleted(self) -> None:
        if not self.handshake.called:
            self.handshake.callback(None)


class _InlineBulk:
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
    _after_bulk = b""

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        if self._after_bulk:
            data, self._after_bulk = self._after_bulk + data, b""
        why = super().dataReceived(data, unpause)  # type: ignore[misc]
        while self._after_bulk and not why and self.connected:
            rest, self._after_bulk = self._after_bulk, b""
            why = super().dataReceived(rest)  # type: ignore[misc]
        return why

    def setLineMode(self, extra: bytes = b"") -> None:
        self.line_mode = 1
        if extra:
            self._after_bulk += extra


_PUSH = b"*3\r\n$7\r\nmessage\r\n$"


def _between_replies(proto: Any) -> bool:
    """txredisapi's parser holds nothing: no partial line, bulk string or array."""
    return not (
        proto._after_bulk
        or proto.line_mode != 1
        or proto.bulk_length
        or proto.multi_bulk.pending
        or proto._LineReceiver__buffer  # txredisapi's line buffer (name-mangled)
    )


class _SlicedFirst:
    """The common replies are cut out of a read by slicing, the rest parsed by txredisapi.

    Slicing starts only while txredisapi's parser is between replies, and
    stops at the first byte it does not recognise as a whole reply of its
    kind: from there on txredisapi reads, as before.
    """

    connected: int

    def _take(self, data: bytes) -> int:
        """Handle the whole replies at the start of ``data``; return the bytes used."""
        raise NotImplementedError

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        pos = self._take(data) if _between_replies(self) else 0
        if pos == len(data) or (pos and not self.connected):
            return None
        return super().dataReceived(data[pos:] if pos else data, unpause)  # type: ignore[misc]


class _FastPush(_SlicedFirst):
    """Pub/sub messages by slicing.

    txredisapi parses one as four lines and three bulk strings, one Python
    call each: several times the cost of slicing it.
    """

    messageReceived: Any

    def _batch_scope(self) -> AbstractContextManager[None]:
        """Entered around the messages of one read, so their frames can leave together."""
        return nullcontext()

    def _take(self, data: bytes) -> int:
        if not data.startswith(_PUSH):
            return 0
        with self._batch_scope():
            return self._take_messages(data)

    def _take_messages(self, data: bytes) -> int:
        pos = 0
        while data.startswith(_PUSH, pos):
            i = pos + len(_PUSH)
            j = data.find(b"\r\n", i)
            if j < 0 or not data[i:j].isdigit():
                break  # cut short, or not a length
            channel_end = j + 2 + int(data[i:j])
            if data[channel_end : channel_end + 3] != b"\r\n$":
                break
            k = data.find(b"\r\n", channel_end + 3)
            if k < 0 or not data[channel_end + 3 : k].isdigit():
                break
            payload_end = k + 2 + int(data[channel_end + 3 : k])
            if data[payload_end : payload_end + 2] != b"\r\n":
                break
            pos = payload_end + 2
            self.messageReceived(None, data[j + 2 : channel_end], data[k + 2 : payload_end])
            if not self.connected:
                break
        return pos


class _FastPublish(_SlicedFirst):
    """PUBLISH and its integer reply without txredisapi's per-command machinery.

    ``execute_command`` encodes each argument, chains three Deferreds and a
    closure, and its reply goes through the line parser: about 24 us per
    message in a microbenchmark, 16 % of the reactor's Python time at 1,000
    messages/s. Here the command is one format and the reply one slice. The
    reply still takes its place in txredisapi's queue, so replies to other
    commands (PING) stay matched in order.
    """

    connected: int
    transport: Any
    replyQueue: Any
    _awaiting_reply: Any

    def publish(self, channel: bytes, payload: bytes) -> Deferred[Any]:
        """Fires with Redis' reply: a count of receivers, or an exception instance."""
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        waited = bool(self.replyQueue.waiting)
        self.transport.write(
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
            % (len(channel), channel, len(payload), payload)
        )
        d = self.replyQueue.get()
        self._awaiting_reply(waited)
        return d

    def _take(self, data: bytes) -> int:
        pos = 0
        while data.startswith(b":", pos):  # an integer reply
            eol = data.find(b"\r\n", pos)
            if eol < 0 or not data[pos + 1 : eol].isdigit():
                break
            self.replyQueue.put(int(data[pos + 1 : eol]))
            pos = eol + 2
        return pos


class _Liveness:
    """Drops a connection only when Redis has gone quiet, not when a reply is slow.

    txredisapi's reply timeout counts from when a command was sent, so a PING
    queued behind a subscriber's backlog of messages "times out" on a healthy,
    busy connection. Here a connection is dead when replies are outstanding and
    nothing at all has arrived for ``timeout`` seconds.
    """

    factory: Any
    transport: Any
    replyQueue: Any
    connected: int
    _quiet_since = 0.0
    _watch: Any = None

    def _now(self) -> float:
        return self.factory.broker._reactor.seconds()

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        self._quiet_since = self._now()
        return super().dataReceived(data, unpause)  # type: ignore[misc]

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        waited = bool(self.replyQueue.waiting)
        d = super().execute_command(*args, **kwargs)  # type: ignore[misc]
        self._awaiting_reply(waited)
        return d

    def _awaiting_reply(self, waited: bool) -> None:
        """A command went out: ``waited`` says whether replies were outstanding before it."""
        if not waited:
            self._quiet_since = self._now()  # the wait for a reply starts now
        if self._watch is None:
            self._watch = self.factory.broker._reactor.callLater(
                self.factory.broker.timeout, self._check
            )

    def _check(self) -> None:
        self._watch = None
        if not self.connected or not self.replyQueue.waiting:
            return
        timeout = self.factory.broker.timeout
        quiet = self._now() - self._quiet_since
        if quiet < timeout:
            self._watch = self.factory.broker._reactor.callLater(timeout - quiet, self._check)
            return
        log.warn("redis: no reply for {seconds:.1f}s; dropping the connection", seconds=quiet)
        self.transport.abortConnection()

    def connectionLost(self, why: Failure) -> None:
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None
        super().connectionLost(why)  # type: ignore[misc]


@implementer(IHandshakeListener)
class _Subscriber(
    _Liveness, _FastPush, _InlineBulk, _HandshakeAware, txredisapi.SubscriberProtocol
):
    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.broker._received(channel, message)

    def _batch_scope(self) -> AbstractContextManager[None]:
        return self.factory.broker.batch_scope()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.broker._connection_lost("subscriber", self, why)


@implementer(IHandshakeListener)
class _Publisher(_Liveness, _FastPublish, _InlineBulk, _HandshakeAware, txredisapi.RedisProtocol):
    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.broker._connection_lost("publisher", self, why)


class _Factory(txredisapi.RedisFactory):
    """A RedisFactory that knows its broker, reconnects quickly, and keeps bytes as bytes."""

    maxDelay = RECONNECT_MAX_DELAY
    initialDelay = 0.2

    def __init__(self, broker: RedisBroker, protocol: type, poolsize: int) -> None:
        address = broker.address
        super().__init__(
            None,
            address.db if protocol is _Publisher else None,
            poolsize,
            isLazy=True,
            charset=None,  # payloads stay bytes
            password=address.password,
            replyTimeout=None,  # _Liveness decides when Redis is gone
            convertNumbers=False,  # "007" must not arrive as 7
            username=address.username,
        )
        self.protocol = protocol
        self.broker = broker

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        p.handshake = Deferred() if self.broker.address.tls else succeed(None)
        return p

    def _connectionReady(self, conn: Any) -> None:
        # After AUTH/SELECT, and for TLS once the server's certificate verified.
        conn.handshake.addCallback(lambda _: super(_Factory, self)._connectionReady(conn))

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn not in self.pool:
            return
        if self.protocol is _Subscriber:
            self.broker._subscriber_ready(conn)
        else:
            self.broker._publisher_ready(conn)


class RedisBroker:
    def __init__(self, config: Config, reactor: Any) -> None:
        self.address = parse_redis_url(config.redis_url or "")
        self.timeout = config.redis_timeout
        self._config = config
        self._reactor = reactor
        self._prefix = channel_prefix(self.address.db)
        self._control_channel = b"chat:%d:control" % self.address.db
        self._on_message: MessageHandler | None = None
        self._on_control: ControlHandler | None = None
        self._on_resync: ResyncHandler | None = None
        self.batch_scope: Callable[[], AbstractContextManager[None]] = nullcontext
        self._rooms: set[str] = set()
        self._subscriber: _Subscriber | None = None
        self._sub_factory: _Factory | None = None
        self._pub_factory: _Factory | None = None
        self._next_publisher = 0
        self._republish: deque[tuple[bytes, bytes]] = deque(maxlen=config.redis_republish_max)
        self._keepalive = LoopingCall(self._ping_all)
        self._keepalive.clock = reactor
        self._stopping = False
        self._ever_subscribed = False
        self._subscribed = False
        self._observers: list[Callable[[str, Any], None]] = []
        # Counters for metrics.
        self.published = 0
        self.publish_failures = 0
        self.republished = 0
        self.received = 0
        self.reconnects = 0
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------

    def _endpoint(self) -> Any:
        a = self.address
        plain = endpoints.HostnameEndpoint(self._reactor, a.host, a.port, timeout=self.timeout)
        if not a.tls:
            return plain
        c = self._config
        trust = (
            ssl.Certificate.loadPEM(open(c.redis_tls_ca_file, "rb").read())
            if c.redis_tls_ca_file
            else ssl.platformTrust()
        )
        client = None
        if c.redis_tls_cert_file and c.redis_tls_key_file:
            cert = open(c.redis_tls_cert_file, "rb").read()
            key = open(c.redis_tls_key_file, "rb").read()
            client = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
        options = ssl.optionsForClientTLS(a.host, trustRoot=trust, clientCertificate=client)
        return endpoints.wrapClientTLS(options, plain)

    def _start_factories(self) -> None:
        endpoint = self._endpoint()
        self._sub_factory = _Factory(self, _Subscriber, 1)
        self._pub_factory = _Factory(self, _Publisher, self._config.redis_publishers)
        self._sub_factory.startConnecting(endpoint)
        self._pub_factory.startConnecting(endpoint)
        # Failures are reported through connectionLost and the watchdog.
        for f in (self._sub_factory, self._pub_factory):
            f.deferred.addErrback(self._factory_failed)

    def _factory_failed(self, failure: Failure) -> None:
        self.last_error = failure.getErrorMessage()
        log.warn("redis: {error}", error=self.last_error)

    def start(
        self, on_message: MessageHandler, on_resync: ResyncHandler, on_control: ControlHandler
    ) -> Deferred[None]:
        self._on_message = on_message
        self._on_resync = on_resync
        self._on_control = on_control
        self._start_factories()
        self._keepalive.start(self._config.redis_keepalive, now=False)
        # Serving does not wait for Redis: without it, rooms still work locally.
        return succeed(None)

    async def _stop(self) -> None:
        self._stopping = True
        if self._keepalive.running:
            self._keepalive.stop()
        for f in (self._sub_factory, self._pub_factory):
            if f is not None:
                await f.disconnect()

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def observe(self, callback: Callable[[str, Any], None]) -> None:
        """Call ``callback(event, detail)`` on connection events (for tests and logs)."""
        self._observers.append(callback)

    def _event(self, event: str, detail: Any = None) -> None:
        for callback in list(self._observers):
            callback(event, detail)

    @property
    def subscribed_rooms(self) -> int:
        return len(self._rooms)

    @property
    def connected(self) -> bool:
        return (
            self._subscriber is not None
            and self._subscriber.connected
            and self._subscribed
            and self._live_publisher() is not None
        )

    def live_connections(self) -> int:
        return sum(
            1
            for f in (self._sub_factory, self._pub_factory)
            if f is not None
            for conn in f.pool
            if conn.connected
        )

    def when_connected(self) -> Deferred[None]:
        """Fires once the subscriber has (re)subscribed and a publisher is up."""
        d: Deferred[None] = Deferred()
        if self.connected:
            d.callback(None)
            return d

        def check(event: str, detail: Any) -> None:
            if self.connected and not d.called:
                self._observers.remove(check)
                d.callback(None)

        self._observers.append(check)
        return d

    def sync(self) -> Deferred[Any]:
        """A PING on the subscriber: fires once Redis has done every (UN)SUBSCRIBE sent before."""
        sub = self._subscriber
        if sub is None or not sub.connected:
            return succeed(None)
        return sub.ping()

    # -- subscriptions --------------------------------------------------------

    def _channel(self, room: str) -> bytes:
        return self._prefix + room.encode()

    def subscribe(self, room: str) -> Deferred[None]:
        self._rooms.add(room)
        sub = self._subscriber
        if sub is None or not sub.connected:
            # Subscribed when Redis is back; the resync then fills what was missed.
            return succeed(None)
        d = sub.subscribe([self._channel(room)])
        d.addCallbacks(lambda _: None, self._subscribe_failed, errbackArgs=(room,))
        return d

    def _subscribe_failed(self, failure: Failure, room: str) -> None:
        # The connection went away; _subscriber_ready re-subscribes everything.
        log.warn("redis: subscribing {room} failed: {error}", room=room, error=failure.value)

    def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        sub = self._subscriber
        if sub is not None and sub.connected:
            sub.unsubscribe([self._channel(room)]).addErrback(lambda _: None)

    def _subscriber_ready(self, proto: _Subscriber) -> None:
        self._subscriber = proto
        self._subscribed = False
        rooms = list(self._rooms)
        # One channel per SUBSCRIBE: pipelined in one write, replies routed right.
        pending = [proto.subscribe([self._control_channel])]
        pending += [proto.subscribe([self._channel(r)]) for r in rooms]
        if self._ever_subscribed:
            self.reconnects += 1
        log.info(
            "redis: subscriber connected to {host}:{port}, subscribing {count} rooms",
            host=self.address.host,
            port=self.address.port,
            count=len(rooms),
        )
        self._ever_subscribed = True

        def subscribed(_: Any) -> None:
            self._subscribed = True
            self._event("subscribed", len(rooms))
            if self._on_resync is not None:
                self._on_resync()

        gatherResults(pending, consumeErrors=True).addCallbacks(subscribed, lambda _: None)

    def _received(self, channel: bytes, message: bytes) -> None:
        if isinstance(message, str):
            message = message.encode()
        if channel == self._control_channel:
            if self._on_control is not None:
                self._on_control(message)
            return
        if not channel.startswith(self._prefix) or self._on_message is None:
            return
        self.received += 1
        room = channel[len(self._prefix) :].decode()
        self._on_message(room, message)

    def _connection_lost(self, role: str, proto: Any, why: Failure) -> None:
        if role == "subscriber" and self._subscriber is proto:
            self._subscriber = None
            self._subscribed = False
        if self._stopping:
            return
        self.last_error = why.getErrorMessage()
        log.warn("redis: {role} connection lost: {error}", role=role, error=self.last_error)
        self._event("lost", role)

    # -- publishing -----------------------------------------------------------

    def _live_publisher(self) -> Any:
        pool = self._pub_factory.pool if self._pub_factory else []
        for _ in range(len(pool)):
            self._next_publisher = (self._next_publisher + 1) % len(pool)
            conn = pool[self._next_publisher]
            if conn.connected:
                return conn
        return None

    def publish(self, room: str, payload: bytes) -> None:
        self._publish(self._channel(room), payload)

    def publish_control(self, payload: bytes) -> None:
        self._publish(self._control_channel, payload)

    def _publish(self, channel: bytes, payload: bytes) -> None:
        conn = self._live_publisher()
        if conn is None:
            self._keep_for_later(channel, payload)
            return
        try:
            d = conn.publish(channel, payload)
        except txredisapi.ConnectionError:
            self._keep_for_later(channel, payload)
            return
        self.published += 1
        d.addCallback(self._publish_replied, channel, payload)

    def _publish_replied(self, reply: Any, channel: bytes, payload: bytes) -> None:
        if isinstance(reply, Exception):  # an error reply, or the connection was lost
            self._keep_for_later(channel, payload)

    def _keep_for_later(self, channel: bytes, payload: bytes) -> None:
        self.publish_failures += 1
        if self._republish.maxlen:
            self._republish.append((channel, payload))

    def _publisher_ready(self, conn: Any) -> None:
        self._event("publisher", None)
        if not self._republish:
            return
        waiting, self._republish = self._republish, deque(maxlen=self._republish.maxlen)
        log.info("redis: publishing {count} messages kept during the outage", count=len(waiting))
        self.republished += len(waiting)
        for channel, payload in waiting:
            self._publish(channel, payload)

    # -- keepalive and watchdog -----------------------------------------------

    def _ping_all(self) -> None:
        factories = [f for f in (self._sub_factory, self._pub_factory) if f is not None]
        if any(f.stopped and not f.disconnectCalled for f in factories) and not self._stopping:
            # txredisapi stops for good after one failed AUTH/SELECT.
            log.warn("redis: a connection gave up (failed AUTH or SELECT?); starting over")
            self._event("restart", None)
            for f in factories:
                f.disconnect()
            self._subscriber = None
            self._start_factories()
            return
        for f in factories:
            for conn in list(f.pool):
                if conn.connected:
                    conn.ping().addErrback(self._ping_failed, conn)

    def _ping_failed(self, failure: Failure, conn: Any) -> None:
        # Lost or dropped by _Liveness: the factory reconnects, already logged.
        return None
