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

Messages go one way, to the core: the room messages of one read from Redis
as one list (``on_messages``), control messages one at a time in their place
among them (``on_control``). Everything here uses txredisapi's public API;
its internals, taken for speed where the start-up checks allow, live in
chatserver.compat.txredisapi.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver.broker import ControlHandler, MessagesHandler, ResyncHandler
from chatserver.broker.events import BrokerEvents
from chatserver.broker.redis_connection import (
    PUBLISHER,
    SUBSCRIBER,
    BrokerFactory,
    HandshakeAware,
    Liveness,
    PublisherHooks,
    SubscriberHooks,
    client_endpoint,
)
from chatserver.broker.redis_url import parse_redis_url
from chatserver.compat import FastPaths
from chatserver.compat.txredisapi import REQUIRED, Pushes, publisher_class, subscriber_class
from chatserver.config import Config

log = Logger()


def channel_prefix(db: int) -> bytes:
    # Pub/sub ignores SELECT: the db number in the name keeps deployments that
    # share one Redis (on different dbs) from hearing each other.
    return b"chat:%d:room:" % db


class RedisTLSUnavailable(ValueError):
    """rediss:// cannot be used safely with the installed txredisapi."""


class RedisBroker(BrokerEvents):
    """The Broker over Redis (see chatserver.broker.Broker).

    ``fast_paths`` decides which of txredisapi's internals the connections
    reach into (chatserver.compat.txredisapi); the protocol classes are built
    once here from what is enabled. Without a fast path, that part is
    txredisapi's own behaviour.

    Connection events (``observe``): ``subscribed`` (rooms count),
    ``publisher``, ``lost`` (role), ``restart``.
    """

    def __init__(self, config: Config, reactor: Any, fast_paths: FastPaths) -> None:
        self.address = parse_redis_url(config.redis_url or "")
        if self.address.tls:
            problems = [name for check in REQUIRED.values() for name in check()]
            if problems:
                raise RedisTLSUnavailable(
                    "rediss:// is refused: the installed txredisapi cannot be made to wait"
                    " for TLS verification before using a connection (changed: "
                    + ", ".join(problems)
                    + "). Install the txredisapi version chatserver was tested with,"
                    " or use redis:// on a trusted network."
                )
        self.timeout = config.redis_timeout
        self.publishers = config.redis_publishers
        self.clock = reactor
        self.fast_paths = fast_paths
        # Built per broker from the enabled fast paths: no per-message choice.
        self.subscriber_protocol = subscriber_class(
            "RedisSubscriber", (SubscriberHooks, Liveness, HandshakeAware), fast_paths
        )
        self.publisher_protocol = publisher_class(
            "RedisPublisher", (PublisherHooks, Liveness, HandshakeAware), fast_paths
        )
        self._config = config
        self._prefix = channel_prefix(self.address.db)
        self.control_channel = b"chat:%d:control" % self.address.db
        self._on_messages: MessagesHandler | None = None
        self._on_control: ControlHandler | None = None
        self._on_resync: ResyncHandler | None = None
        self._rooms: set[str] = set()
        self._subscriber: Any = None
        self._sub_factory: BrokerFactory | None = None
        self._pub_factory: BrokerFactory | None = None
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

    def _endpoint(self) -> IStreamClientEndpoint:
        return client_endpoint(self.address, self._config, self.clock)

    def _start_factories(self) -> None:
        endpoint = self._endpoint()
        self._sub_factory = BrokerFactory(self, SUBSCRIBER)
        self._pub_factory = BrokerFactory(self, PUBLISHER)
        self._sub_factory.startConnecting(endpoint)
        self._pub_factory.startConnecting(endpoint)
        # Failures are reported through connectionLost and the watchdog.
        for f in (self._sub_factory, self._pub_factory):
            f.deferred.addErrback(self._factory_failed)

    def _factory_failed(self, failure: Failure) -> None:
        self.last_error = failure.getErrorMessage()
        log.warn("redis: {error}", error=self.last_error)

    def start(
        self, on_messages: MessagesHandler, on_resync: ResyncHandler, on_control: ControlHandler
    ) -> Deferred[None]:
        self._on_messages = on_messages
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

    @property
    def subscribed_rooms(self) -> int:
        return len(self._rooms)

    @property
    def subscribed(self) -> bool:
        """The subscriber is connected and has (re)subscribed every wanted channel."""
        return self._subscriber is not None and self._subscriber.connected and self._subscribed

    @property
    def connected(self) -> bool:
        return self.subscribed and self._live_publisher() is not None

    def live_connections(self) -> int:
        return sum(
            1
            for f in (self._sub_factory, self._pub_factory)
            if f is not None
            for conn in f.live
            if conn.connected
        )

    def sync(self) -> Deferred[Any]:
        """A PING on the subscriber: fires once Redis has done every (UN)SUBSCRIBE sent before."""
        sub = self._subscriber
        if sub is None or not sub.connected:
            return succeed(None)
        return sub.ping()

    def pause_reading(self) -> None:
        """Stop reading the subscriber's socket: what Redis sends meanwhile waits there.

        For tests that need several pushes taken in one read.
        """
        self._subscriber_transport().pauseProducing()

    def resume_reading(self) -> None:
        """Read the subscriber's socket again (after ``pause_reading``)."""
        self._subscriber_transport().resumeProducing()

    def _subscriber_transport(self) -> Any:
        if not self.subscribed:
            raise RuntimeError("the Redis subscriber is not connected")
        return self._subscriber.transport

    # -- subscriptions --------------------------------------------------------

    def channel(self, room: str) -> bytes:
        """The Redis channel of ``room`` (the control channel is ``control_channel``)."""
        return self._prefix + room.encode()

    def subscribe(self, room: str) -> Deferred[None]:
        self._rooms.add(room)
        sub = self._subscriber
        if sub is None or not sub.connected:
            # Subscribed when Redis is back; the resync then fills what was missed.
            return succeed(None)
        d = sub.subscribe([self.channel(room)])
        d.addCallbacks(lambda _: None, self._subscribe_failed, errbackArgs=(room,))
        return d

    def _subscribe_failed(self, failure: Failure, room: str) -> None:
        # The connection went away; _subscriber_ready re-subscribes everything.
        log.warn("redis: subscribing {room} failed: {error}", room=room, error=failure.value)

    def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        sub = self._subscriber
        if sub is not None and sub.connected:
            sub.unsubscribe([self.channel(room)]).addErrback(lambda _: None)

    def connection_ready(self, role: str, conn: Any) -> None:
        if role == SUBSCRIBER:
            self._subscriber_ready(conn)
        else:
            self._publisher_ready(conn)

    def _subscriber_ready(self, proto: Any) -> None:
        self._subscriber = proto
        self._subscribed = False
        rooms = list(self._rooms)
        # One channel per SUBSCRIBE: pipelined in one write, replies routed right.
        pending = [proto.subscribe([self.control_channel])]
        pending += [proto.subscribe([self.channel(r)]) for r in rooms]
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
            if self._subscriber is not proto:
                return  # lost meanwhile; the next connection subscribes again
            self._subscribed = True
            self._event("subscribed", len(rooms))
            if self._on_resync is not None:
                self._on_resync()

        gatherResults(pending, consumeErrors=True).addCallbacks(subscribed, lambda _: None)

    def pushes_received(self, pushes: Pushes) -> None:
        """The pub/sub messages of one read, in order: room messages as one list each run.

        A control message splits the run: the room messages before it are
        handed over first, then it, then the rest, so a kick neither overtakes
        an earlier message nor is overtaken by a later one.
        """
        on_messages = self._on_messages
        if on_messages is None:
            return
        prefix = self._prefix
        cut = len(prefix)
        batch: list[tuple[str, bytes]] = []
        for channel, payload in pushes:
            if channel.startswith(prefix):
                batch.append((channel[cut:].decode(), payload))
            elif channel == self.control_channel and self._on_control is not None:
                if batch:
                    self.received += len(batch)
                    on_messages(batch)
                    batch = []
                self._on_control(payload)
        if batch:
            self.received += len(batch)
            on_messages(batch)

    def connection_lost(self, role: str, proto: Any, why: Failure) -> None:
        if role == SUBSCRIBER and self._subscriber is proto:
            self._subscriber = None
            self._subscribed = False
        if self._stopping:
            return
        self.last_error = why.getErrorMessage()
        log.warn("redis: {role} connection lost: {error}", role=role, error=self.last_error)
        self._event("lost", role)

    # -- publishing -----------------------------------------------------------

    def _live_publisher(self) -> Any:
        pool = self._pub_factory.live if self._pub_factory else []
        for _ in range(len(pool)):
            self._next_publisher = (self._next_publisher + 1) % len(pool)
            conn = pool[self._next_publisher]
            if conn.connected:
                return conn
        return None

    def _first_live(self) -> Any:
        pool = self._pub_factory.live if self._pub_factory else []
        return next((conn for conn in pool if conn.connected), None)

    def command(self, key: bytes, *args: Any) -> Deferred[Any]:
        """A command on the first live publisher connection: one connection, so the
        commands of one caller are run in the order they were sent. Fails at once
        with ``ConnectionError`` while Redis is away. ``key`` (the slot a cluster
        would route by) does not matter to one Redis."""
        conn = self._first_live()
        if conn is None:
            raise txredisapi.ConnectionError("no live Redis connection")
        return conn.execute_command(*args)

    def publish(self, room: str, payload: bytes) -> None:
        self._publish(self.channel(room), payload)

    def publish_in_order(self, room: str, payload: bytes) -> None:
        self._publish(self.channel(room), payload, in_order=True)

    def publish_control(self, payload: bytes) -> None:
        self._publish(self.control_channel, payload)

    def _publish(self, channel: bytes, payload: bytes, in_order: bool = False) -> None:
        # In order: always the first live connection (commands keep their order
        # on one connection, not across the pool).
        conn = self._first_live() if in_order else self._live_publisher()
        if conn is None:
            self._keep_for_later(channel, payload)
            return
        try:
            d = conn.publish(channel, payload)
        except txredisapi.ConnectionError:
            self._keep_for_later(channel, payload)
            return
        self.published += 1
        d.addBoth(self._publish_replied, channel, payload)

    def _publish_replied(self, reply: Any, channel: bytes, payload: bytes) -> None:
        # An error reply or a lost connection: an exception instance from the
        # fast path, a Failure from txredisapi's execute_command.
        if isinstance(reply, (Exception, Failure)):
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
        if any(f.gave_up and not f.closing for f in factories) and not self._stopping:
            log.warn("redis: a connection gave up (failed AUTH or SELECT?); starting over")
            self._event("restart", None)
            for f in factories:
                f.disconnect()
            self._subscriber = None
            self._subscribed = False
            self._start_factories()
            return
        for f in factories:
            for conn in list(f.live):
                if conn.connected:
                    conn.ping().addErrback(self._ping_failed, conn)

    def _ping_failed(self, failure: Failure, conn: Any) -> None:
        # Lost or dropped by Liveness: the factory reconnects, already logged.
        return None
