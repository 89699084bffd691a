"""The broker over Redis Cluster: each room's channel on the shard that owns its slot.

Sharded pub/sub (SSUBSCRIBE / SPUBLISH, Redis 7.0+) keeps a room's traffic in
one shard, where plain PUBLISH in a cluster is copied to every node: the
fan-out between server instances then grows with the cluster. The price is
that the client routes: it hashes each channel to its slot (CRC16, as for
keys: chatserver.broker.cluster_slots), keeps the cluster's slot map, and
talks to the master that owns the slot. txredisapi has no cluster support and
does not understand shard pushes, so this runs on a RESP protocol of our own
(chatserver.broker.resp; its docstring says why).

Connections. Per master, one subscriber connection (SSUBSCRIBE one channel per
command, pipelined, only for the rooms this instance hosts, and the control
channel ``chat:0:control`` on whichever master owns its slot) and one
publisher connection: one, so this instance's messages to a room keep their
order (the same room is always the same connection). Connections to nodes
that stop being masters are closed.

The slot map comes from CLUSTER SLOTS, asked of a live publisher connection
first, else of any seed or node we know (a temporary connection). It is
refreshed every ``redis_cluster_refresh`` seconds, and at once on MOVED, on a
lost connection or failed connect, and on an unsolicited ``sunsubscribe``;
while anything we want has no live owner it is refreshed every
``DEGRADED_REFRESH`` seconds, which is what notices a failover.

Failover (a master killed, its replica promoted): the dead master's
connections go, its channels are marked lost, and publishes for its slots are
kept (bounded, ``redis_republish_max``). Subscriptions do not replicate, so
when the map shows the promoted replica, the channels are subscribed there,
the kept publishes are sent there, and once the subscriptions are confirmed
the core is asked to resync (``on_resync``: every hosted room re-reads the
store, which holds everything acked). Resharding (a slot moved): the old
owner drops our subscription with an unsolicited ``sunsubscribe``, and
answers SPUBLISH with MOVED; the map is patched from the MOVED at once and
refreshed, the channel is subscribed on the new owner, the publish is resent
there (a bounded number of redirects), and the core resyncs. ASK (a slot
half-migrated) is followed for that one command, after ASKING.

What the single-Redis broker guarantees, this does too: resubscribe after
every loss, then resync; PING on a timer; drop a connection that has replies
outstanding and has heard nothing for ``redis_timeout``; never block or fail a
publisher; verify TLS. One thing differs: a control message keeps its place
among the room messages of its own shard's connection only, as shards are
independent streams (a kick still reaches every instance within a second).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import endpoints, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver.broker import ControlHandler, MessagesHandler, ResyncHandler
from chatserver.broker.cluster_slots import SLOTS, Node, SlotMap, key_slot
from chatserver.broker.events import BrokerEvents
from chatserver.broker.redis_url import parse_redis_url
from chatserver.broker.resp import (
    AskError,
    ConnectionLostError,
    MovedError,
    Redirect,
    ReplyError,
    RespProtocol,
    SMessage,
    encode_command,
    spublish_command,
)
from chatserver.config import Config

log = Logger()

PREFIX = b"chat:0:room:"  # a cluster has database 0 only
CONTROL = b"chat:0:control"
SUBSCRIBER = "subscriber"
PUBLISHER = "publisher"

# Redirects followed for one publish or subscription before it waits for a
# refreshed map instead (a map in flux must not bounce a message forever).
MAX_REDIRECTS = 5
# Seconds between map refreshes while a wanted channel or a kept publish has
# no live owner: how soon a failover is noticed once the cluster has done it.
DEGRADED_REFRESH = 0.05
# Seconds at least between two refreshes (a burst of MOVED asks for many).
MIN_REFRESH_GAP = 0.05
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 2.0
# Channel slots remembered for publishing (CRC16 in Python costs microseconds).
SLOT_CACHE_MAX = 100_000
# SPUBLISHes awaiting their reply on one connection before more are kept for
# later instead: a master that is alive but not keeping up must not grow our
# memory without bound.
MAX_IN_FLIGHT = 100_000


class _Sub:
    """One channel we want: where its SSUBSCRIBE went, and whether it is confirmed."""

    __slots__ = ("attempt", "channel", "confirmed", "conn", "link", "lost", "redirects", "slot")

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self.slot = key_slot(channel)
        self.link: _Link | None = None
        self.conn: RespProtocol | None = None  # the subscriber connection it was sent on
        self.confirmed = False
        # Messages may have been missed while it was not subscribed: resync once it is.
        self.lost = False
        self.redirects = 0
        self.attempt = 0


class _Connection:
    """One connection of one role to one master, remade after a loss until closed."""

    def __init__(self, broker: RedisClusterBroker, link: _Link, role: str) -> None:
        self.broker = broker
        self.link = link
        self.role = role
        self.proto: RespProtocol | None = None  # ready: authenticated (and verified)
        self._current: RespProtocol | None = None  # connected, maybe not ready yet
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._delay = RECONNECT_FIRST_DELAY
        self._failing = False
        self.closed = False
        self.ever_ready = False
        self._gone: list[Deferred[None]] = []

    def connect(self) -> None:
        if self._retry is not None:
            if self._retry.active():
                self._retry.cancel()  # sooner than the backoff said: the map changed
            self._retry = None
        if self.closed or self._attempt is not None or self._current is not None:
            return
        factory = _Factory(self.broker, self)
        d = self.broker.endpoint(self.link.node).connect(factory)
        self._attempt = d
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, proto: RespProtocol) -> None:
        self._attempt = None
        if self.closed:
            proto.transport.abortConnection()
        if not proto.lost:
            self._current = proto

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if self.closed:
            return
        self._report_failure(failure.getErrorMessage())
        self._schedule()

    def _report_failure(self, error: str) -> None:
        self.broker.last_error = error
        if not self._failing:  # once per streak, not every retry
            self._failing = True
            log.warn(
                "redis cluster: {role} connection to {host}:{port} failed: {error}",
                role=self.role,
                host=self.link.node.host,
                port=self.link.node.port,
                error=error,
            )
        self.broker.refresh_soon()

    def _schedule(self) -> None:
        if self.closed or (self._retry is not None and self._retry.active()):
            return
        self._retry = self.broker.clock.callLater(self._delay, self.connect)
        self._delay = min(self._delay * 2, RECONNECT_MAX_DELAY)

    # -- RespHandler --------------------------------------------------------------

    def connection_ready(self, proto: RespProtocol) -> None:
        # Without AUTH this comes from connectionMade, before _connected.
        if self.closed:
            return
        self._current = self.proto = proto
        self._delay = RECONNECT_FIRST_DELAY
        if self._failing:
            log.info(
                "redis cluster: {role} connection to {host}:{port} is back",
                role=self.role,
                host=self.link.node.host,
                port=self.link.node.port,
            )
        self._failing = False
        again = self.ever_ready
        self.ever_ready = True
        self.broker.connection_ready(self, proto, again)

    def connection_lost(self, proto: RespProtocol, reason: Failure) -> None:
        if proto is self._current:
            self._current = None
        was_ready = proto is self.proto
        if was_ready:
            self.proto = None
        if self.closed:
            gone, self._gone = self._gone, []
            for d in gone:
                d.callback(None)
            return
        error = proto.error or reason.getErrorMessage()
        if was_ready:
            self.broker.last_error = error
            log.warn(
                "redis cluster: {role} connection to {host}:{port} lost: {error}",
                role=self.role,
                host=self.link.node.host,
                port=self.link.node.port,
                error=error,
            )
            self.broker.connection_lost(self, proto)
        else:
            self._report_failure(error)
        self._schedule()

    def pushes_received(self, proto: RespProtocol, pushes: list[SMessage]) -> None:
        self.broker.pushes_received(pushes)

    def unsubscribed(self, proto: RespProtocol, channel: bytes) -> None:
        self.broker.shard_unsubscribed(self.link, proto, channel)

    # -- closing ------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Stop reconnecting and close; fires once the connection is gone."""
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        proto = self._current
        if proto is None or proto.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._gone.append(d)
        proto.transport.loseConnection()
        # A peer that does not answer the close must not hold up a stop.
        abort = self.broker.clock.callLater(self.broker.timeout, proto.transport.abortConnection)
        d.addBoth(_cancel_call, abort)
        return d


def _cancel_call(result: Any, call: IDelayedCall) -> Any:
    if call.active():
        call.cancel()
    return result


class _Factory(Factory):
    noisy = False

    def __init__(self, broker: RedisClusterBroker, handler: Any) -> None:
        self.broker = broker
        self.handler = handler

    def buildProtocol(self, addr: Any) -> RespProtocol:
        proto = self.broker.protocol(self.handler)
        proto.factory = self
        return proto


class _Link:
    """A master and our two connections to it."""

    def __init__(self, broker: RedisClusterBroker, node: Node) -> None:
        self.node = node
        self.sub = _Connection(broker, self, SUBSCRIBER)
        self.pub = _Connection(broker, self, PUBLISHER)
        self.channels: set[bytes] = set()  # placed here: SSUBSCRIBE sent on sub.proto
        self.confirmed = 0

    def connect(self) -> None:
        self.sub.connect()
        self.pub.connect()

    def close(self) -> Deferred[Any]:
        return gatherResults([self.sub.close(), self.pub.close()])


class _Probe:
    """A temporary connection that asks one node for the slot map."""

    def __init__(self) -> None:
        self.ready: Deferred[RespProtocol] = Deferred()
        self.proto: RespProtocol | None = None

    def connection_ready(self, proto: RespProtocol) -> None:
        if not self.ready.called:
            self.ready.callback(proto)

    def connection_lost(self, proto: RespProtocol, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(Failure(ConnectionLostError(proto.error or str(reason.value))))

    def pushes_received(self, proto: RespProtocol, pushes: list[SMessage]) -> None:
        return None

    def unsubscribed(self, proto: RespProtocol, channel: bytes) -> None:
        return None


class RedisClusterBroker(BrokerEvents):
    """The Broker over a Redis Cluster with sharded pub/sub (see chatserver.broker.Broker).

    ``fast_paths`` is accepted for the same signature as RedisBroker and not
    used: nothing here reaches into a library's internals.

    Cluster events (``observe``): ``map`` (masters count), ``subscribed``
    (channel), ``publisher`` and ``subscriber`` (node, connection ready),
    ``lost`` (role), ``unsubscribed`` (channel, by Redis), ``resync``,
    ``unanswered`` (no node gave a slot map; the last error).
    """

    def __init__(self, config: Config, reactor: Any, fast_paths: Any = None) -> None:
        if not config.redis_cluster:
            raise ValueError("redis_cluster names no seed node")
        self.seeds = [parse_redis_url(url) for url in config.redis_cluster]
        first = self.seeds[0]
        self._tls = first.tls
        self._username = first.username
        self._password = first.password
        self._config = config
        self.clock = reactor
        self.timeout = config.redis_timeout
        self.control_channel = CONTROL
        self._on_messages: MessagesHandler | None = None
        self._on_control: ControlHandler | None = None
        self._on_resync: ResyncHandler | None = None
        self._map: SlotMap | None = None
        self._by_slot: list[_Link | None] = [None] * SLOTS
        self._links: dict[Node, _Link] = {}
        self._endpoints: dict[Node, IStreamClientEndpoint] = {}
        self._tls_cache: tuple[Any, Any] | None = None
        self._wanted: dict[bytes, _Sub] = {}
        self._waiters: dict[bytes, list[Deferred[None]]] = {}
        self._confirmed = 0
        self._pending = 0  # SSUBSCRIBEs sent, not yet answered
        self._slot_cache: dict[bytes, int] = {}
        self._republish: deque[tuple[bytes, bytes]] = deque(maxlen=config.redis_republish_max)
        self._replay_due = False
        self._keepalive = LoopingCall(self._ping_all)
        self._keepalive.clock = reactor
        self._refresh_timer: IDelayedCall | None = None
        self._refreshing = False
        self._refresh_again = False
        self._last_refresh = -1e9
        self._unanswered = 0  # refreshes in a row that no node answered
        self._probes: set[RespProtocol] = set()
        self._probe_attempts: set[Deferred[Any]] = set()
        self._resync_due = False
        self._resync_call: IDelayedCall | None = None
        self._started = False
        self._stopping = False
        self._observers: list[Callable[[str, Any], None]] = []
        # Counters for metrics.
        self.published = 0
        self.publish_failures = 0
        self.republished = 0
        self.received = 0
        self.reconnects = 0
        self.slot_map_refreshes = 0
        self.moved = 0
        self.asked = 0
        self.last_error: str | None = None

    # -- connections ----------------------------------------------------------------

    def endpoint(self, node: Node) -> IStreamClientEndpoint:
        """TCP to ``node``, or TLS that verifies its certificate and host name.

        Cluster nodes are usually named by IP address (CLUSTER SLOTS): those
        get a plain TCP endpoint, which reports a refused connection at once;
        HostnameEndpoint reports it only at its next attempt tick (0.3 s), a
        delay on every reconnect to a dead master. Under TLS the certificate
        must then hold the IP address (or set ``cluster-preferred-endpoint-type
        hostname`` on the cluster).
        """
        endpoint = self._endpoints.get(node)
        if endpoint is not None:
            return endpoint
        c, clock, host, port = self._config, self.clock, node.host, node.port
        plain: IStreamClientEndpoint
        if isIPAddress(host):
            plain = endpoints.TCP4ClientEndpoint(clock, host, port, timeout=c.redis_timeout)
        elif isIPv6Address(host):
            plain = endpoints.TCP6ClientEndpoint(clock, host, port, timeout=c.redis_timeout)
        else:
            plain = endpoints.HostnameEndpoint(clock, host, port, timeout=c.redis_timeout)
        endpoint = plain
        if self._tls:
            trust, client = self._tls_material()
            options = ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)
            endpoint = endpoints.wrapClientTLS(options, plain)
        self._endpoints[node] = endpoint
        return endpoint

    def _tls_material(self) -> tuple[Any, Any]:
        """The trust root and client certificate, read once (not per connection)."""
        if self._tls_cache is None:
            c = self._config
            trust: Any = ssl.platformTrust()
            if c.redis_tls_ca_file:
                with open(c.redis_tls_ca_file, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            client = None
            if c.redis_tls_cert_file and c.redis_tls_key_file:
                with open(c.redis_tls_cert_file, "rb") as f:
                    cert = f.read()
                with open(c.redis_tls_key_file, "rb") as f:
                    key = f.read()
                client = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
            self._tls_cache = (trust, client)
        return self._tls_cache

    def protocol(self, handler: Any) -> RespProtocol:
        return RespProtocol(
            handler,
            self.clock,
            self.timeout,
            username=self._username,
            password=self._password,
            tls=self._tls,
        )

    # -- lifecycle ----------------------------------------------------------------

    def start(
        self, on_messages: MessagesHandler, on_resync: ResyncHandler, on_control: ControlHandler
    ) -> Deferred[None]:
        self._on_messages = on_messages
        self._on_resync = on_resync
        self._on_control = on_control
        self._started = True
        self._want(CONTROL)
        self._keepalive.start(self._config.redis_keepalive, now=False)
        self.refresh_soon()
        # Serving does not wait for Redis: without it, rooms still work locally.
        return succeed(None)

    async def _stop(self) -> None:
        self._stopping = True
        if self._keepalive.running:
            self._keepalive.stop()
        for call in (self._refresh_timer, self._resync_call):
            if call is not None and call.active():
                call.cancel()
        for attempt in list(self._probe_attempts):
            attempt.cancel()
        for proto in list(self._probes):
            proto.transport.abortConnection()
        links = list(self._links.values())
        self._links.clear()
        await gatherResults([link.close() for link in links])
        for channel in list(self._waiters):
            self._release(channel)

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    # -- state ------------------------------------------------------------------

    @property
    def subscribed_rooms(self) -> int:
        return len(self._wanted) - (CONTROL in self._wanted)

    @property
    def masters_known(self) -> int:
        """Masters in the slot map we use (0 before the first map)."""
        return len(self._links)

    @property
    def connected(self) -> bool:
        if self._map is None or self._confirmed != len(self._wanted):
            return False
        return all(link.pub.proto is not None for link in self._links.values() if link.confirmed)

    def live_connections(self) -> int:
        return sum(
            1 for link in self._links.values() for c in (link.sub, link.pub) if c.proto is not None
        )

    def owner(self, channel: bytes) -> Node | None:
        """The master our map sends ``channel`` to."""
        return self._map.owner(key_slot(channel)) if self._map is not None else None

    def channel(self, room: str) -> bytes:
        """The shard channel of ``room`` (the control channel is ``control_channel``)."""
        return PREFIX + room.encode()

    def sync(self) -> Deferred[Any]:
        """A PING on every subscriber: fires once each has done every command sent before."""
        pings = [
            link.sub.proto.command("PING")
            for link in self._links.values()
            if link.sub.proto is not None
        ]
        return gatherResults(pings, consumeErrors=True)

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, room: str) -> Deferred[None]:
        channel = self.channel(room)
        sub = self._wanted.get(channel)
        if sub is None:
            sub = self._want(channel)
        if sub.confirmed or sub.conn is None:
            # Not subscribable now: subscribed when a master is reachable, and
            # then the resync fills what was missed.
            sub.lost = sub.lost or not sub.confirmed
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(channel, []).append(d)
        return d

    def _want(self, channel: bytes) -> _Sub:
        sub = self._wanted[channel] = _Sub(channel)
        self._place(sub)
        return sub

    def unsubscribe(self, room: str) -> None:
        channel = self.channel(room)
        sub = self._wanted.pop(channel, None)
        if sub is None:
            return
        conn = sub.conn
        self._unplace(sub, dropped=False)
        if conn is not None and not conn.lost:
            conn.sunsubscribe(channel)
        self._release(channel)

    def _place(self, sub: _Sub) -> bool:
        """SSUBSCRIBE on the owner's subscriber unless already there; False if it cannot be."""
        link = self._by_slot[sub.slot]
        if sub.link is not None:
            if sub.link is link and sub.conn is link.sub.proto:
                return True
            old = sub.conn
            self._unplace(sub)
            if old is not None and not old.lost:
                old.sunsubscribe(sub.channel)  # it may still think it owns the slot
        proto = link.sub.proto if link is not None else None
        if proto is None or link is None:
            return False
        sub.link = link
        sub.conn = proto
        sub.attempt += 1
        link.channels.add(sub.channel)
        self._pending += 1
        proto.ssubscribe(sub.channel, self._ssubscribe_replied, (sub, sub.attempt))
        return True

    def _unplace(self, sub: _Sub, dropped: bool = True) -> None:
        """Forget where ``sub`` was sent; ``dropped``: it is still wanted, so mark it lost."""
        link = sub.link
        if link is None:
            return
        link.channels.discard(sub.channel)
        if sub.confirmed:
            sub.confirmed = False
            self._confirmed -= 1
            link.confirmed -= 1
            sub.lost = sub.lost or dropped
        else:
            self._pending -= 1
            if not self._pending:
                self._maybe_resync()  # what did get confirmed need not wait for this one
        sub.link = None
        sub.conn = None

    def _release(self, channel: bytes) -> None:
        """The core stops waiting for ``channel``: subscribed, or given up on for now."""
        waiters = self._waiters.pop(channel, None)
        if not waiters:
            return
        sub = self._wanted.get(channel)
        if sub is not None and not sub.confirmed:
            sub.lost = True  # the core went on without it
        for d in waiters:
            d.callback(None)

    def _ssubscribe_replied(self, reply: Any, arg: tuple[_Sub, int]) -> None:
        sub, attempt = arg
        current = sub.attempt == attempt and self._wanted.get(sub.channel) is sub
        if isinstance(reply, MovedError):
            self.moved += 1
            if not current:
                self.refresh_soon()  # the map was wrong, even if we moved on since
        if not current:
            return  # an answer for an earlier attempt, or the room was left
        if isinstance(reply, ConnectionLostError):
            return  # connection_lost deals with every channel of that connection
        if isinstance(reply, Exception):
            self._unplace(sub)
            if isinstance(reply, MovedError):
                self._learn(reply)
                sub.redirects += 1
                if sub.redirects <= MAX_REDIRECTS and self._place(sub):
                    return
            else:
                log.warn(
                    "redis cluster: SSUBSCRIBE {channel} refused: {error}",
                    channel=sub.channel.decode(errors="replace"),
                    error=str(reply),
                )
                self.refresh_soon()
            self._release(sub.channel)
            return
        self._pending -= 1
        sub.confirmed = True
        sub.redirects = 0
        self._confirmed += 1
        assert sub.link is not None
        sub.link.confirmed += 1
        self._release(sub.channel)
        if sub.lost:
            sub.lost = False
            self._resync_due = True
        self._maybe_resync()
        self._event("subscribed", sub.channel)

    def _maybe_resync(self) -> None:
        """Once no SSUBSCRIBE is outstanding, tell the core about what was lost (once)."""
        if not self._resync_due or self._pending or self._resync_call is not None:
            return
        # One turn later: every confirmation of this read is counted first.
        self._resync_call = self.clock.callLater(0, self._resync)

    def _resync(self) -> None:
        self._resync_call = None
        if self._pending or not self._resync_due or self._stopping:
            return
        self._resync_due = False
        log.info("redis cluster: subscriptions restored; resyncing hosted rooms from the store")
        self._event("resync")
        if self._on_resync is not None:
            self._on_resync()

    def shard_unsubscribed(self, link: _Link, proto: RespProtocol, channel: bytes) -> None:
        """Redis dropped ``channel`` on this node: its slot moved. Find the new owner."""
        self._event("unsubscribed", channel)
        sub = self._wanted.get(channel)
        self.refresh_soon()
        if sub is None or sub.conn is not proto:
            return
        log.info(
            "redis cluster: {host}:{port} dropped {channel} (slot {slot} moved)",
            host=link.node.host,
            port=link.node.port,
            channel=channel.decode(errors="replace"),
            slot=sub.slot,
        )
        self._unplace(sub)
        # The map may still name this node: then it answers MOVED, which
        # names the new owner sooner than a refresh would.
        self._place(sub)

    # -- connection events ----------------------------------------------------------

    def connection_ready(self, conn: _Connection, proto: RespProtocol, again: bool) -> None:
        link = conn.link
        if self._links.get(link.node) is not link:
            return
        if conn.role == SUBSCRIBER:
            placed = lost = 0
            for sub in self._wanted.values():
                if self._by_slot[sub.slot] is link and sub.conn is not proto:
                    lost += sub.lost
                    placed += self._place(sub)
            if again or lost:
                self.reconnects += 1
            log.info(
                "redis cluster: subscriber connected to {host}:{port};"
                " subscribing {count} channels",
                host=link.node.host,
                port=link.node.port,
                count=placed,
            )
            self._event("subscriber", link.node)
        else:
            self._event("publisher", link.node)
            self._replay()

    def connection_lost(self, conn: _Connection, proto: RespProtocol) -> None:
        if self._stopping:
            return
        link = conn.link
        if conn.role == SUBSCRIBER:
            for channel in list(link.channels):
                sub = self._wanted.get(channel)
                if sub is not None and sub.conn is proto:
                    self._unplace(sub)
                    self._release(channel)
        self._event("lost", conn.role)
        self.refresh_soon()

    def pushes_received(self, pushes: list[SMessage]) -> None:
        """The shard messages of one read, in order: room messages as one list each run.

        A control message splits the run, as in the single-Redis broker.
        """
        on_messages = self._on_messages
        if on_messages is None:
            return
        cut = len(PREFIX)
        batch: list[tuple[str, bytes]] = []
        for channel, payload in pushes:
            if channel.startswith(PREFIX):
                batch.append((channel[cut:].decode(), payload))
            elif channel == CONTROL and self._on_control is not None:
                if batch:
                    self.received += len(batch)
                    on_messages(batch)
                    batch = []
                self._on_control(payload)
        if batch:
            self.received += len(batch)
            on_messages(batch)

    # -- publishing ---------------------------------------------------------------

    def publish(self, room: str, payload: bytes) -> None:
        self._publish(PREFIX + room.encode(), payload, 0)

    # A room's channel lives on one node, reached over one connection: in order.
    publish_in_order = publish

    def publish_control(self, payload: bytes) -> None:
        self._publish(CONTROL, payload, 0)

    def command(self, key: bytes, *args: Any) -> Deferred[Any]:
        """One command to the master that owns ``key``'s slot, following MOVED and
        ASK: the presence state's path. Commands with keys of one slot keep their
        order (one connection per master). Errbacks when no master takes it."""
        return Deferred.fromCoroutine(self._command(key, args))

    async def _command(self, key: bytes, args: tuple[Any, ...]) -> Any:
        node: Node | None = None  # an ASK's target, for one try
        for _ in range(MAX_REDIRECTS + 1):
            link = self._links.get(node) if node is not None else self._by_slot[self._slot(key)]
            proto = link.pub.proto if link is not None else None
            if proto is None:
                raise ConnectionLostError("no connection to the master of the key's slot")
            if node is not None:
                proto.send(encode_command((b"ASKING",)), _ignore_reply, None)
            try:
                return await proto.command(*args)
            except MovedError as redirect:
                self.moved += 1
                self._learn(redirect)
                node = None
            except AskError as redirect:
                self.asked += 1
                node = self._redirect_node(redirect)
        raise ConnectionLostError("redirected too many times")

    def _slot(self, channel: bytes) -> int:
        slot = self._slot_cache.get(channel)
        if slot is None:
            if len(self._slot_cache) >= SLOT_CACHE_MAX:
                self._slot_cache.clear()
            slot = self._slot_cache[channel] = key_slot(channel)
        return slot

    def _publish(self, channel: bytes, payload: bytes, redirects: int, count: bool = True) -> None:
        link = self._by_slot[self._slot(channel)]
        proto = link.pub.proto if link is not None else None
        if proto is None or proto.outstanding >= MAX_IN_FLIGHT:
            self._keep(channel, payload, count)
            return
        self.published += 1
        proto.spublish(channel, payload, self._spublish_replied, (channel, payload, redirects))

    def _spublish_replied(self, reply: Any, arg: tuple[bytes, bytes, int]) -> None:
        if type(reply) is int:
            return
        channel, payload, redirects = arg
        if isinstance(reply, MovedError):
            self.moved += 1
            self._learn(reply)
            if redirects < MAX_REDIRECTS:
                self._publish(channel, payload, redirects + 1)
                return
        elif isinstance(reply, AskError):
            self.asked += 1
            if redirects < MAX_REDIRECTS and self._ask(reply, channel, payload, redirects + 1):
                return
        elif isinstance(reply, ReplyError):  # CLUSTERDOWN, TRYAGAIN, ...
            log.warn("redis cluster: SPUBLISH refused: {error}", error=str(reply))
            self.refresh_soon()
        self._keep(channel, payload)

    def _ask(self, redirect: AskError, channel: bytes, payload: bytes, redirects: int) -> bool:
        """This one command to the node a migration sends it to, after ASKING."""
        link = self._links.get(self._redirect_node(redirect))
        proto = link.pub.proto if link is not None else None
        if proto is None:
            return False
        proto.send(encode_command((b"ASKING",)), _ignore_reply, None)
        proto.send(
            spublish_command(channel, payload),
            self._spublish_replied,
            (channel, payload, redirects),
        )
        return True

    def _keep(self, channel: bytes, payload: bytes, count: bool = True) -> None:
        if count:
            self.publish_failures += 1
        if not self._republish.maxlen:
            return
        self._republish.append((channel, payload))
        link = self._by_slot[self._slot(channel)]
        if link is not None and link.pub.proto is not None:
            # The owner takes publishes (this one met a connection closing, a
            # full pipeline, CLUSTERDOWN): try again after the next refresh.
            self._replay_due = True

    def _replay(self) -> None:
        """Publish what was kept, now that a publisher or a map changed."""
        self._replay_due = False
        if not self._republish:
            return
        waiting, self._republish = self._republish, deque(maxlen=self._republish.maxlen)
        before = len(waiting)
        for channel, payload in waiting:
            self._publish(channel, payload, 0, count=False)
        sent = before - len(self._republish)
        if sent:
            self.republished += sent
            log.info("redis cluster: published {count} messages kept meanwhile", count=sent)

    # -- the slot map -------------------------------------------------------------

    def _redirect_node(self, redirect: Redirect) -> Node:
        host = redirect.host or self.seeds[0].host
        return Node(host, redirect.port)

    def _learn(self, redirect: MovedError) -> None:
        """A MOVED names the slot's owner: use it at once, and refresh the whole map."""
        node = self._redirect_node(redirect)
        if self._map is not None and self._map.owner(redirect.slot) != node:
            self._apply(self._map.with_owner(redirect.slot, node))
        self.refresh_soon()

    def refresh_soon(self) -> None:
        """Ask the cluster for its slot map again (coalesced, at most one at a time)."""
        if self._stopping or not self._started:
            return
        if self._refreshing:
            self._refresh_again = True
            return
        wait = self._last_refresh + MIN_REFRESH_GAP - self.clock.seconds()
        if wait > 0:
            self._schedule_refresh(wait)
            return
        if self._refresh_timer is not None and self._refresh_timer.active():
            self._refresh_timer.cancel()
        self._refresh_timer = None
        Deferred.fromCoroutine(self._refresh())

    def _schedule_refresh(self, delay: float) -> None:
        timer = self._refresh_timer
        if timer is not None and timer.active():
            if timer.getTime() <= self.clock.seconds() + delay:
                return
            timer.cancel()
        self._refresh_timer = self.clock.callLater(delay, self._timer_refresh)

    def _timer_refresh(self) -> None:
        self._refresh_timer = None
        self.refresh_soon()

    @property
    def _degraded(self) -> bool:
        return not self.connected or bool(self._republish)

    async def _refresh(self) -> None:
        self._refreshing = True
        self._refresh_again = False
        self._last_refresh = self.clock.seconds()
        try:
            new = await self._ask_for_map()
            self._unanswered = 0 if new is not None else self._unanswered + 1
            if new is not None and not self._stopping:
                self.slot_map_refreshes += 1
                self._apply(new)
                if self._replay_due:
                    self._replay()
        except Exception:
            log.failure("redis cluster: refreshing the slot map failed")
        finally:
            self._refreshing = False
        if self._stopping:
            return
        if self._refresh_again:
            self.refresh_soon()
        elif self._degraded:
            # Nobody answering at all: back off as reconnects do.
            backoff = DEGRADED_REFRESH * 2 ** min(self._unanswered, 5)
            self._schedule_refresh(min(backoff, RECONNECT_MAX_DELAY))
        else:
            self._schedule_refresh(self._config.redis_cluster_refresh)

    async def _ask_for_map(self) -> SlotMap | None:
        """The first complete map a node gives: live publishers first, then any node known."""
        best: SlotMap | None = None
        asked: set[tuple[str, int]] = set()
        for link in list(self._links.values()):
            proto = link.pub.proto
            if proto is None:
                continue
            asked.add((link.node.host, link.node.port))
            found = await self._slots_from(proto, link.node.host)
            if found is not None and found.covers_all():
                return found
            best = _better(best, found)
            if self._stopping:
                return None
        candidates: list[tuple[str, int]] = []
        if self._map is not None:
            candidates += [(n.host, n.port) for n in sorted(self._map.nodes(), key=_by_address)]
        candidates += [(s.host, s.port) for s in self.seeds]
        for host, port in dict.fromkeys(candidates):
            if (host, port) in asked:
                continue
            asked.add((host, port))
            found = await self._ask_node(Node(host, port))
            if found is not None and found.covers_all():
                return found
            best = _better(best, found)
            if self._stopping:
                return None
        if best is None and not self._stopping:
            if not self._unanswered:  # once per streak
                log.warn(
                    "redis cluster: no node answered for the slot map (last: {error})",
                    error=self.last_error,
                )
            self._event("unanswered", self.last_error)
        return best

    async def _slots_from(self, proto: RespProtocol, host: str) -> SlotMap | None:
        try:
            reply = await proto.command("CLUSTER", "SLOTS").addTimeout(self.timeout, self.clock)
        except Exception as e:
            log.debug("redis cluster: CLUSTER SLOTS failed on {host}: {error}", host=host, error=e)
            return None
        try:
            return SlotMap(reply, host)
        except (TypeError, ValueError, IndexError) as e:
            log.warn("redis cluster: a CLUSTER SLOTS reply made no sense: {error}", error=e)
            return None

    async def _ask_node(self, node: Node) -> SlotMap | None:
        """A temporary connection to ``node`` for its slot map."""
        probe = _Probe()
        factory = _Factory(self, probe)
        proto: RespProtocol | None = None
        connecting = self.endpoint(node).connect(factory)
        self._probe_attempts.add(connecting)
        try:
            proto = await connecting.addTimeout(self.timeout, self.clock)
            self._probe_attempts.discard(connecting)
            self._probes.add(proto)
            ready = await probe.ready.addTimeout(self.timeout, self.clock)
            return await self._slots_from(ready, node.host)
        except Exception as e:
            self.last_error = f"{node.host}:{node.port}: {e}"
            log.debug("redis cluster: {error}", error=self.last_error)
            return None
        finally:
            self._probe_attempts.discard(connecting)
            if proto is not None:
                self._probes.discard(proto)
                proto.transport.abortConnection()

    def _apply(self, new: SlotMap) -> None:
        """Use ``new``: connect to new masters, close the rest, move what they served."""
        old = self._map
        self._map = new
        if old is not None and old.same_owners(new) and old.masters() == set(self._links):
            self._place_unplaced()
            return
        masters = new.masters()
        log.info(
            "redis cluster: slot map with {count} masters: {masters}",
            count=len(masters),
            masters=", ".join(f"{n.host}:{n.port}" for n in sorted(masters, key=_by_address)),
        )
        for node in masters:
            if node not in self._links:
                self._links[node] = _Link(self, node)
        by_slot: list[_Link | None] = [None] * SLOTS
        cached: dict[Node | None, _Link | None] = {None: None}
        for slot, owner in enumerate(new.owners()):
            if owner not in cached:
                cached[owner] = self._links[owner]  # type: ignore[index]
            by_slot[slot] = cached[owner]
        self._by_slot = by_slot
        gone = [link for node, link in self._links.items() if node not in masters]
        for link in gone:
            del self._links[link.node]
            for channel in list(link.channels):
                sub = self._wanted.get(channel)
                if sub is not None and sub.link is link:
                    self._unplace(sub)
            link.close()
        for link in self._links.values():
            link.connect()
        for sub in list(self._wanted.values()):
            sub.redirects = 0  # a new map, a new start
            if not self._place(sub):
                self._release(sub.channel)
        self._event("map", len(masters))
        self._replay()

    def _place_unplaced(self) -> None:
        """Subscribe what is wanted and nowhere (its redirects ran out, say) again."""
        if self._confirmed + self._pending == len(self._wanted):
            return  # every wanted channel is placed: nothing to walk through
        for sub in list(self._wanted.values()):
            if sub.link is None:
                sub.redirects = 0
                self._place(sub)

    # -- keepalive ------------------------------------------------------------------

    def _ping_all(self) -> None:
        for link in self._links.values():
            for conn in (link.sub, link.pub):
                if conn.proto is not None:
                    conn.proto.command("PING").addErrback(_ignore_failure)


def _better(best: SlotMap | None, found: SlotMap | None) -> SlotMap | None:
    if found is None:
        return best
    if best is None or found.coverage() > best.coverage():
        return found
    return best


def _by_address(node: Node) -> tuple[str, int]:
    return (node.host, node.port)


def _ignore_reply(reply: Any, arg: Any) -> None:
    return None


def _ignore_failure(failure: Failure) -> None:
    return None
