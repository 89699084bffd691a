"""Prometheus metrics, read from the server's own counters at scrape time.

Nothing is counted twice and nothing costs anything per message beyond the
plain integer increments the components already do: this collector turns them
into metric families only when /metrics is fetched.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.server import Request

from chatserver import wire
from chatserver.web import HTTP_REFUSALS, GetOnly

if TYPE_CHECKING:
    from chatserver.service import ChatServerService

PREFIX = "chatserver_"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


class ServerCollector:
    def __init__(self, server: ChatServerService) -> None:
        self._server = server

    def describe(self) -> list[Metric]:
        return []  # collected lazily; no fixed description

    def collect(self) -> Iterator[Metric]:
        s = self._server
        chat, factory, registry, store, broker = (
            s.chat,
            s.factory,
            s.registry,
            s.store,
            s.broker,
        )
        yield _gauge("connections", "Open WebSocket connections.", len(factory.connections))
        yield _gauge("rooms_hosted", "Rooms with local members.", len(registry.rooms))
        yield _counter("joins", "Rooms joined.", chat.joins)
        yield _counter("frames_received", "Frames received from clients.", chat.frames)
        yield _counter("messages_received", "send frames accepted for storage.", chat.sends)
        yield _counter("edits_received", "edit frames accepted for storage.", chat.edits)
        yield _counter("deletes_received", "delete frames accepted for storage.", chat.deletes)
        yield _counter(
            "messages_stored", "Messages and edit/delete events committed.", store.stored
        )
        yield _counter("typing_relayed", "typing frames relayed to a room.", chat.typing_relayed)
        yield _counter(
            "typing_dropped", "typing frames dropped by typing_interval.", chat.typing_dropped
        )
        yield _counter("read_markers", "Read markers moved forward.", chat.reads_stored)
        presence = chat.presence
        yield _gauge(
            "presence_members",
            "(room, user) pairs this instance holds online.",
            presence.local_users,
        )
        yield _gauge(
            "presence_watchers", "Connections following a room's presence.", presence.watchers
        )
        yield _counter("presence_events", "presence events written to watchers.", presence.events)
        yield _counter(
            "presence_lists",
            "presence lists sent instead of a second's burst of events.",
            presence.snapshots,
        )
        yield _counter(
            "presence_commands",
            "Commands sent to the presence state (Redis).",
            presence.state.commands,
        )
        yield _counter(
            "presence_failures", "Presence state commands that failed.", presence.failures
        )
        yield _counter(
            "messages_delivered", "Message frames written to local members.", s.delivery.delivered
        )
        yield _counter(
            "frames_coalesced",
            "Frames that left in one write with others for the same connection (batches).",
            s.coalesced_frames,
        )
        yield _counter(
            "gap_fills", "Times missing ids were read from the store.", registry.gap_fills
        )
        errors = CounterMetricFamily(
            PREFIX + "errors", "Error frames sent to clients, by code.", labels=["code"]
        )
        for code in wire.ERROR_CODES:
            errors.add_metric([code], chat.errors[code])
        yield errors
        yield _counter(
            "rate_limited",
            "Frames refused by the per-connection rate limit.",
            chat.errors[wire.RATE_LIMITED],
        )
        dropped = CounterMetricFamily(
            PREFIX + "clients_dropped",
            "Connections the server dropped, by reason.",
            labels=["reason"],
        )
        dropped.add_metric(["slow"], factory.dropped_slow)
        dropped.add_metric(["policy"], chat.policy_closes)
        dropped.add_metric(["ping_timeout"], factory.ping_timeouts)
        yield dropped
        yield _counter(
            "kicks", "Connections removed from a room or closed by kick or ban.", chat.kicks
        )
        rejected = CounterMetricFamily(
            PREFIX + "handshake_rejections",
            "Refused opening handshakes, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(factory.rejected.items()):
            rejected.add_metric([reason], count)
        sites = getattr(s, "sites", [s.site])
        rejected.add_metric(["timeout"], sum(site.handshake_timeouts for site in sites))
        yield rejected
        yield _counter(
            "http_request_timeouts",
            "Plain HTTP requests cut off at http_request_timeout (body, answer or close).",
            sum(site.request_timeouts for site in sites),
        )
        refusals = CounterMetricFamily(
            PREFIX + "http_refusals",
            "HTTP requests refused before their body was read, by reason.",
            labels=["reason"],
        )
        for reason in HTTP_REFUSALS:
            refusals.add_metric([reason], sum(site.http_refusals[reason] for site in sites))
        yield refusals
        yield _gauge("store_queue_depth", "Messages waiting to be stored.", store.queue_depth())
        yield _counter("store_batches", "Write transactions committed.", store.batches)
        yield _gauge(
            "store_last_batch_size", "Messages in the last committed batch.", store.last_batch_size
        )
        yield _counter("store_failed", "Messages that could not be stored.", store.failed)
        yield _counter(
            "store_rejected", "Sends refused because the store queue was full.", store.rejected
        )
        yield _gauge("db_pool_size", "Database connections in the pool.", store.pool_size)
        yield _gauge(
            "db_pool_in_use",
            "Pool connections busy with an interaction.",
            min(store.busy, store.pool_size),
        )
        yield _gauge(
            "db_interactions_waiting",
            "Interactions waiting for a pool connection.",
            max(0, store.busy - store.pool_size),
        )
        yield _counter("broker_published", "Messages published to the broker.", broker.published)
        yield _counter(
            "broker_received", "Room messages received from the broker.", broker.received
        )
        yield _counter(
            "redis_reconnects", "Redis subscriber reconnections.", getattr(broker, "reconnects", 0)
        )
        yield _counter(
            "redis_publish_failures",
            "Publishes that found Redis unreachable (kept to retry).",
            getattr(broker, "publish_failures", 0),
        )
        yield _gauge(
            "redis_subscribed_rooms",
            "Room channels this instance subscribes to.",
            getattr(broker, "subscribed_rooms", len(getattr(broker, "rooms", ()))),
        )
        yield from _cluster_metrics(broker)
        fast = s.fast_paths
        fast_on = GaugeMetricFamily(
            PREFIX + "fast_path_enabled",
            "1 if a shortcut through a library's internals is on (checked at start).",
            labels=["path"],
        )
        fast_runs = CounterMetricFamily(
            PREFIX + "fast_path_runs",
            "Times each shortcut ran (frames, messages, compactions).",
            labels=["path"],
        )
        for name in sorted(fast.names()):
            fast_on.add_metric([name], 1.0 if fast.on(name) else 0.0)
            fast_runs.add_metric([name], fast.runs[name])
        yield fast_on
        yield fast_runs
        yield _counter(
            "direct_writes", "Writes that went straight to the socket.", factory.direct_writes
        )
        pauses = s.gc_pauses
        gc_seconds = CounterMetricFamily(
            PREFIX + "gc_pause_seconds",
            "Time the process stood still in garbage collection, by generation.",
            labels=["generation"],
        )
        gc_count = CounterMetricFamily(
            PREFIX + "gc_collections", "Garbage collections, by generation.", labels=["generation"]
        )
        for generation in range(3):
            gc_seconds.add_metric([str(generation)], pauses.seconds[generation])
            gc_count.add_metric([str(generation)], pauses.collections[generation])
        yield gc_seconds
        yield gc_count
        yield _gauge(
            "gc_longest_pause_seconds", "Longest garbage collection pause.", pauses.longest
        )
        yield _gauge(
            "gc_frozen_objects",
            "Objects from start-up kept out of garbage collection.",
            gc.get_freeze_count(),
        )
        admin = getattr(s, "admin", None)
        if admin is not None:
            requests = CounterMetricFamily(
                PREFIX + "admin_requests", "Admin API requests, by status.", labels=["status"]
            )
            for status, count in sorted(admin.requests.items()):
                requests.add_metric([str(status)], count)
            yield requests


def _cluster_metrics(broker: object) -> Iterator[Metric]:
    """The Redis Cluster broker's own numbers; nothing for other brokers."""
    if not hasattr(broker, "slot_map_refreshes"):
        return
    yield _counter(
        "redis_cluster_slot_map_refreshes",
        "Slot maps read from the cluster (periodic, and after MOVED or a lost node).",
        getattr(broker, "slot_map_refreshes", 0),
    )
    yield _counter(
        "redis_cluster_moved",
        "MOVED redirects received (a slot served elsewhere than our map said).",
        getattr(broker, "moved", 0),
    )
    yield _counter(
        "redis_cluster_ask",
        "ASK redirects followed (a slot in migration).",
        getattr(broker, "asked", 0),
    )
    yield _gauge(
        "redis_cluster_masters",
        "Masters in the slot map in use.",
        getattr(broker, "masters_known", 0),
    )


def registry(server: ChatServerService) -> CollectorRegistry:
    """The one registry of a server: /metrics and the workers' channel both read it."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ServerCollector(server))
    return reg


class MetricsResource(GetOnly):
    def __init__(self, text: Callable[[], bytes]) -> None:
        super().__init__()
        self._text = text

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self._text()
