"""Wiring: build the store, broker, chat core and listeners into one service tree.

Start order: broker, then listeners. Stop order is the reverse, with the
connections closed (1001) in between, then the store flushes what is queued
and closes its pool. Nothing that is acked is lost on a clean stop.

As one of several worker processes (``chatserver.workers``) the same service
is given how to make its endpoints (ports shared with the other workers) and
a view of the whole server that answers /healthz, /readyz and /metrics for
all workers; alone, it answers for itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from chatserver import store as store_api
from chatserver.admin_api import AdminAPI
from chatserver.admission import Admission
from chatserver.broker import Broker
from chatserver.broker.memory import MemoryBroker, MemoryHub
from chatserver.chat import Chat
from chatserver.compat import FastPaths
from chatserver.compat import twisted as twisted_compat
from chatserver.config import Config
from chatserver.delivery import Delivery
from chatserver.gcstats import GCPauses
from chatserver.metrics import MetricsResource, registry
from chatserver.presence import PresenceState
from chatserver.presence.memory import MemoryPresence
from chatserver.presence.tracker import PresenceTracker
from chatserver.rooms import RoomRegistry
from chatserver.store.open import open_store, prepare
from chatserver.transport import CLOSE_GOING_AWAY
from chatserver.transport.factory import ChatFactory
from chatserver.transport.policies import ProxyPolicy
from chatserver.web import (
    AsyncJSONResource,
    AsyncTextResource,
    ChatSite,
    JSONResource,
    Root,
    StaticPage,
    UpgradeResource,
)

if TYPE_CHECKING:
    from chatserver.workers.whole import WholeServer

CLOSE_TIMEOUT = 5.0
READY_TIMEOUT = 2.0


class ListenService(Service):
    """Listens on one endpoint; binding happens in privilegedStartService, errors at once."""

    log = Logger()

    def __init__(
        self, description: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
    ) -> None:
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        d = self._endpoint.listen(self._factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def _site(root: Resource, clock: IReactorTime, config: Config, addresses: Admission) -> ChatSite:
    """Every site (main, metrics, admin) counts its requests in the one per-address
    count the WebSockets are admitted against."""
    return ChatSite(
        root,
        clock,
        config.handshake_timeout,
        config.http_request_timeout,
        addresses,
        ProxyPolicy(config.trusted_proxies),
    )


def parse_endpoint(reactor: IReactorTime, description: str) -> IStreamServerEndpoint:
    return endpoints.serverFromString(reactor, description)


class ChatServerService(MultiService):
    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        hub: MemoryHub | None = None,
        clock: IReactorTime | None = None,
        endpoint: Callable[[str], IStreamServerEndpoint] | None = None,
        whole: Callable[[ChatServerService], WholeServer] | None = None,
    ) -> None:
        """``clock`` times the connections (handshake deadlines, pings, send-buffer
        grace, token expiry); tests pass a ``task.Clock``. Default: the reactor.

        A worker passes ``endpoint`` (an endpoint string to an endpoint whose
        port the other workers share) and ``whole`` (builds the view that answers
        the health, readiness and metrics resources for the whole server)."""
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = clock = clock or reactor
        self._broker_started = False
        self.draining = False
        prepare(config)
        self.fast_paths = FastPaths(config.fast_paths)
        self.store = open_store(config, reactor)
        self.broker = self._make_broker(hub)
        self.gc_pauses = GCPauses()
        # A committed batch, a read of messages from the bus, or a page read to
        # fill a gap: each connection's frames (acks) leave as one write, then
        # each room's frames as one write per member.
        self.delivery = Delivery()
        self.registry = RoomRegistry(
            self.store, self.broker, self.delivery, reactor, config.gap_timeout
        )
        self.presence = PresenceTracker(
            self._make_presence(),
            self.registry,
            self.delivery,
            clock,
            config.presence_list_max,
            config.presence_burst,
        )
        self.chat = Chat(
            config, self.store, self.registry, self.broker, self.delivery, clock, self.presence
        )
        self.factory = ChatFactory(config, clock, self.chat, self.fast_paths)
        self._metrics_registry = registry(self)
        self.whole = whole(self) if whole is not None else None
        healthz: Resource
        metrics: Resource
        if self.whole is None:
            healthz = JSONResource(self.health)
            readyz = AsyncJSONResource(self.readiness)
            metrics = MetricsResource(self.metrics_text)
        else:
            answered_by = {b"x-chatserver-worker": str(self.whole.index).encode()}
            healthz = AsyncJSONResource(self.whole.health)
            readyz = AsyncJSONResource(self.whole.readiness)
            metrics = AsyncTextResource(
                self.whole.metrics, CONTENT_TYPE_LATEST.encode(), answered_by
            )
        children: dict[bytes, Resource] = {
            b"ws": UpgradeResource(self.factory),
            b"healthz": healthz,
            b"readyz": readyz,
            b"app.js": StaticPage("app.js", b"text/javascript; charset=utf-8"),
            b"app.css": StaticPage("app.css", b"text/css; charset=utf-8"),
        }
        admission = self.chat.admission
        side_sites: list[tuple[str, ChatSite]] = []
        if config.metrics_listen:
            metrics_site = _site(Root({b"metrics": metrics}, None), clock, config, admission)
            side_sites += [(desc, metrics_site) for desc in config.metrics_listen]
        else:
            children[b"metrics"] = metrics
        self.admin = AdminAPI(config, self.store, self.chat) if config.admin_api_key else None
        if self.admin is not None:
            if config.admin_listen:
                admin_site = _site(Root({b"admin": self.admin}, None), clock, config, admission)
                side_sites += [(desc, admin_site) for desc in config.admin_listen]
            else:
                children[b"admin"] = self.admin
        self.site = _site(
            Root(children, StaticPage("index.html", b"text/html; charset=utf-8")),
            clock,
            config,
            admission,
        )
        # Each site's counters (handshake_timeouts, request_timeouts, http_refusals).
        self.sites = [self.site, *dict.fromkeys(site for _, site in side_sites)]
        make_endpoint = endpoint or (lambda desc: parse_endpoint(reactor, desc))
        self.listeners = [
            ListenService(desc, make_endpoint(desc), self.site) for desc in config.listen
        ]
        self.side_listeners = [
            ListenService(desc, make_endpoint(desc), site) for desc, site in side_sites
        ]
        for listener in self.listeners + self.side_listeners:
            listener.setServiceParent(self)

    def _make_broker(self, hub: MemoryHub | None) -> Broker:
        if self.config.redis_cluster:
            from chatserver.broker.cluster import RedisClusterBroker

            return RedisClusterBroker(self.config, self.reactor, self.fast_paths)
        if self.config.redis_url is None:
            return MemoryBroker(hub or MemoryHub(self.reactor))
        from chatserver.broker.redis import RedisBroker

        return RedisBroker(self.config, self.reactor, self.fast_paths)

    def _make_presence(self) -> PresenceState:
        if isinstance(self.broker, MemoryBroker):
            return MemoryPresence(self.broker.hub.presence)
        from chatserver.presence.redis import RedisPresence

        return RedisPresence(self.broker, self.reactor, self.config.presence_timeout)

    @property
    def coalesced_frames(self) -> int:
        """Frames that left in one write with others: acks per connection, messages per room."""
        return self.delivery.coalesced_frames

    def health(self) -> tuple[int, dict[str, object]]:
        return 200, {
            "status": "ok",
            "connections": len(self.factory.connections),
            "rooms": len(self.registry.rooms),
            "store_queue": self.store.queue_depth(),
        }

    def metrics_text(self) -> bytes:
        """This process's own metrics in the Prometheus text format."""
        return generate_latest(self._metrics_registry)

    async def readiness(self) -> tuple[int, dict[str, object]]:
        """For load balancers: serving, and both backends answer."""
        problems = []
        if self.draining:
            problems.append("draining")
        if not self.broker.connected:
            problems.append("broker unreachable")
        try:
            await self.store.ping().addTimeout(READY_TIMEOUT, self.reactor)
        except Exception:
            problems.append("database unreachable")
        if problems:
            return 503, {"ready": False, "problems": problems}
        return 200, {"ready": True}

    def ports(self) -> list[int]:
        return [lst.port.getHost().port for lst in self.listeners if lst.port is not None]

    def _resync(self) -> None:
        """The broker is back after an outage: catch up on messages, then on bans."""
        self.registry.resync()
        Deferred.fromCoroutine(self.chat.recheck_bans())
        self.presence.rebuild()

    def _start_broker(self) -> None:
        if not self._broker_started:
            self._broker_started = True
            self.store.start(self.chat.on_commit)
            self.broker.start(self.registry.on_broker_messages, self._resync, self.chat.on_control)
            self.presence.start()

    def privilegedStartService(self) -> None:
        self._start_broker()
        super().privilegedStartService()

    def startService(self) -> None:
        self._start_broker()
        super().startService()
        self.factory.start_pings()
        self.gc_pauses.install()
        if self.fast_paths.on(twisted_compat.LEAN_POLL):
            twisted_compat.install_lean_poll(self.reactor, self.fast_paths.runs)
        names = list(self.fast_paths.names())
        off = sorted(name for name in names if not self.fast_paths.on(name))
        self.log.info(
            "fast paths: {on} of {total} on{off}",
            on=len(names) - len(off),
            total=len(names),
            off=f" (off: {', '.join(off)})" if off else "",
        )
        for listener in self.listeners:
            if listener.port is not None:
                self.log.info(
                    "chatserver listening on {endpoint}: open http://localhost:{port}/",
                    endpoint=listener.description,
                    port=getattr(listener.port.getHost(), "port", None),
                )

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.draining = True
        self.factory.stop_pings()
        self.gc_pauses.uninstall()
        if self.fast_paths.on(twisted_compat.LEAN_POLL):
            twisted_compat.uninstall_lean_poll(self.reactor)
        await super().stopService()  # listeners stop accepting
        count = len(self.factory.connections)
        spread = self.config.drain_seconds if count > 1 else 0.0
        self.log.info(
            "draining: closing {count} connections over {spread:.0f}s", count=count, spread=spread
        )
        await self.factory.close_all(
            CLOSE_GOING_AWAY, "server shutting down", CLOSE_TIMEOUT, spread
        )
        # Store what is queued while the broker is still up, so other instances
        # get those messages live too; then close the broker, then the pool.
        await self.store.flush()
        # Goodbye: this instance's users leave presence now, not after the timeout.
        await self.presence.stop()
        await self.broker.stop()
        try:
            await self.store.close()
        except store_api.StoreUnavailable:
            pass
        self.log.info("chatserver stopped")
