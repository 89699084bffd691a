"""One Redis connection of the broker: TLS verified before use, quiet links dropped,
and a factory that tells the broker what happens to its connections.

Public txredisapi API only; the fast paths' mixins come from
chatserver.compat.txredisapi and are combined with these in ``RedisBroker``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import txredisapi
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatserver.broker.redis_url import RedisAddress
from chatserver.compat.txredisapi import Pushes
from chatserver.config import Config

if TYPE_CHECKING:
    from chatserver.broker.redis import RedisBroker

log = Logger()

RECONNECT_MAX_DELAY = 5.0
# The first retry after a lost connection: soon, a Redis restart takes about this long.
RECONNECT_FIRST_DELAY = 0.2


@implementer(IHandshakeListener)
class HandshakeAware:
    """Holds back txredisapi's ``connectionMade`` until TLS verification has passed.

    txredisapi sends AUTH/SELECT and declares a connection usable in
    ``connectionMade``; for rediss:// that must wait until the server's
    certificate and host name have verified (``handshakeCompleted``), or an
    unverified server would count as connected. Public API only; that
    txredisapi does nothing before ``connectionMade`` is checked at start-up
    (chatserver.compat.txredisapi.REQUIRED).
    """

    handshake: Deferred[None]
    connected: int

    def connectionMade(self) -> None:
        self.handshake.addCallback(self._verified)

    def _verified(self, _: object) -> None:
        super().connectionMade()  # type: ignore[misc]

    def handshakeCompleted(self) -> None:
        if not self.handshake.called:
            self.handshake.callback(None)


class Liveness:
    """Drops a connection only when Redis has gone quiet, not when a reply is slow.

    txredisapi's reply timeout counts from when a command was sent, so a PING
    queued behind a subscriber's backlog of messages "times out" on a healthy,
    busy connection. Here a connection is dead when replies are outstanding and
    nothing at all has arrived for ``timeout`` seconds.

    Replies outstanding are counted from the Deferreds of the commands sent
    (``execute_command``, and the fast PUBLISH through ``reply_expected``), not
    read from txredisapi's queue: this works whichever fast paths are on.
    """

    factory: BrokerFactory
    transport: Any
    connected: int
    _quiet_since = 0.0
    _outstanding = 0
    _watch: IDelayedCall | None = None

    def dataReceived(self, data: bytes, *rest: Any) -> Any:
        # ``rest``: txredisapi's own re-entry flag, passed on untouched.
        self._quiet_since = self.factory.broker.clock.seconds()
        return super().dataReceived(data, *rest)  # type: ignore[misc]

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = super().execute_command(*args, **kwargs)  # type: ignore[misc]
        self.reply_expected(d)
        return d

    def reply_expected(self, d: Deferred[Any]) -> None:
        """A command went out; ``d`` fires with its reply (or the connection's loss)."""
        broker = self.factory.broker
        if not self._outstanding:
            self._quiet_since = broker.clock.seconds()  # the wait for a reply starts now
        self._outstanding += 1
        d.addBoth(self._replied)
        if self._watch is None:
            self._watch = broker.clock.callLater(broker.timeout, self._check)

    def _replied(self, result: Any) -> Any:
        self._outstanding -= 1
        return result

    def _check(self) -> None:
        self._watch = None
        if not self.connected or not self._outstanding:
            return
        broker = self.factory.broker
        quiet = broker.clock.seconds() - self._quiet_since
        if quiet < broker.timeout:
            self._watch = broker.clock.callLater(broker.timeout - quiet, self._check)
            return
        log.warn("redis: no reply for {seconds:.1f}s; dropping the connection", seconds=quiet)
        self.transport.abortConnection()

    def connectionLost(self, why: Failure) -> None:
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None
        super().connectionLost(why)  # type: ignore[misc]


class SubscriberHooks:
    """What the broker's subscriber adds in front of txredisapi (and the fast paths)."""

    factory: BrokerFactory

    def pushes_received(self, pushes: Pushes) -> None:
        """The messages of one read, sliced by the ``redis_push`` fast path."""
        self.factory.broker.pushes_received(pushes)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        # txredisapi's own parser: one message at a time.
        self.factory.broker.pushes_received([(channel, message)])

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)  # type: ignore[misc]
        self.factory.connection_lost(self, why)


class PublisherHooks:
    factory: BrokerFactory

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)  # type: ignore[misc]
        self.factory.connection_lost(self, why)


SUBSCRIBER = "subscriber"
PUBLISHER = "publisher"


class BrokerFactory(txredisapi.RedisFactory):
    """A RedisFactory that knows its broker, reconnects quickly, and keeps bytes as bytes.

    It keeps its own list of usable connections (``live``) and notes when
    txredisapi gave up (``stopTrying`` after a failed AUTH or SELECT) or was
    told to close (``disconnect``), rather than reading txredisapi's pool and
    flags.
    """

    maxDelay = RECONNECT_MAX_DELAY
    initialDelay = RECONNECT_FIRST_DELAY

    def __init__(self, broker: RedisBroker, role: str) -> None:
        address = broker.address
        publisher = role == PUBLISHER
        super().__init__(
            None,
            address.db if publisher else None,
            broker.publishers if publisher else 1,
            isLazy=True,
            charset=None,  # payloads stay bytes
            password=address.password,
            replyTimeout=None,  # Liveness decides when Redis is gone
            convertNumbers=False,  # "007" must not arrive as 7
            username=address.username,
        )
        self.protocol = broker.publisher_protocol if publisher else broker.subscriber_protocol
        self.broker = broker
        self.role = role
        self.live: list[Any] = []
        self.gave_up = False
        self.closing = False

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        p.handshake = Deferred() if self.broker.address.tls else succeed(None)
        return p

    def addConnection(self, conn: Any) -> None:
        # After AUTH/SELECT (and, under TLS, verification), one reactor turn later.
        super().addConnection(conn)
        if self.closing or not conn.connected:
            return  # txredisapi closed it, or it died meanwhile
        self.live.append(conn)
        self.broker.connection_ready(self.role, conn)

    def connection_lost(self, conn: Any, why: Failure) -> None:
        if conn in self.live:
            self.live.remove(conn)
        self.broker.connection_lost(self.role, conn, why)

    def stopTrying(self) -> Deferred[Any]:
        # txredisapi stops for good after one failed AUTH or SELECT.
        self.gave_up = True
        return super().stopTrying()

    def disconnect(self) -> Deferred[Any]:
        self.closing = True
        return super().disconnect()


def client_endpoint(address: RedisAddress, c: Config, clock: Any) -> IStreamClientEndpoint:
    """TCP to Redis, or TLS that verifies the server's certificate and host name."""
    a = address
    plain = endpoints.HostnameEndpoint(clock, a.host, a.port, timeout=c.redis_timeout)
    if not a.tls:
        return plain
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
