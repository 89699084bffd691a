"""What operators rely on: /readyz following Redis and Postgres, /metrics moving with a
conversation, dead peers dropped by WebSocket pings."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from conftest import fresh_database
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, DeferredList
from wsclient import connect, http_get

ensure = pytest_twisted.ensureDeferred


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    code, body = await http_get(port, "/readyz")
    return code, json.loads(body)


async def metrics(port: int) -> dict[tuple[str, tuple], float]:
    code, body = await http_get(port, "/metrics")
    assert code == 200
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def broker_event(server: Any, name: str) -> Deferred:
    d: Deferred = Deferred()
    server.broker.observe(lambda event, _: d.called or event != name or d.callback(None))
    return d.addTimeout(30, reactor)


@pytest.mark.redis
@ensure
async def test_readyz_follows_redis_down_and_back(make_server, redis):
    server = make_server(redis_url=redis.url, redis_keepalive=0.2, redis_timeout=0.5)
    await server.broker.when_connected().addTimeout(15, reactor)
    assert await readyz(server.port) == (200, {"ready": True})
    redis.kill()
    while server.broker.live_connections():
        await broker_event(server, "lost")
    assert await readyz(server.port) == (503, {"ready": False, "problems": ["broker unreachable"]})
    assert (await http_get(server.port, "/healthz"))[0] == 200  # liveness: the process is fine
    back = server.broker.when_connected()
    redis.restart()
    await back.addTimeout(30, reactor)
    assert await readyz(server.port) == (200, {"ready": True})


@pytest.mark.postgres
@ensure
async def test_readyz_follows_postgres_down_and_back(make_server, own_postgres):
    server = make_server(database_url=fresh_database(own_postgres), db_pool_size=2)
    assert await readyz(server.port) == (200, {"ready": True})
    await threads.deferToThread(own_postgres.stop)
    assert await readyz(server.port) == (
        503,
        {"ready": False, "problems": ["database unreachable"]},
    )
    await threads.deferToThread(own_postgres.restart)
    # The pool's dead connections are retried, so the first check after is ready.
    assert await readyz(server.port) == (200, {"ready": True})


@ensure
async def test_readyz_is_unready_while_draining(make_server):
    server = make_server(drain_seconds=30.0)
    a = await connect(server.port, "alice")
    b = await connect(server.port, "bob")
    assert (await server.readiness())[0] == 200
    stopping = server.stopService()  # closes one now, the other 15 s later
    first, _ = await DeferredList(
        [a.proto.closed, b.proto.closed], fireOnOneCallback=True, consumeErrors=True
    )
    assert first == 1001
    code, body = await server.readiness()
    assert code == 503 and "draining" in body["problems"]
    for client in (a, b):
        await client.close()  # the one still waiting leaves by itself
    await stopping


@ensure
async def test_metrics_move_with_a_scripted_conversation(make_server):
    server = make_server(allowed_origins=("https://chat.example",))
    before = await metrics(server.port)
    a = await connect(server.port, "alice")
    b = await connect(server.port, "bob")
    await a.join("r")
    await b.join("r")
    for i in range(3):
        assert (await a.request({"type": "send", "room": "r", "body": f"m{i}"}))["type"] == "ack"
    for _ in range(3):
        await b.expect("message")
    bad = await a.request({"type": "send", "room": "never-joined", "body": "x"})
    a.send_raw(b"{not json")
    assert (await a.recv())["type"] == "message"  # a's own copies arrive first
    after = await metrics(server.port)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert after[("chatserver_connections", ())] == 2
    assert after[("chatserver_rooms_hosted", ())] == 1
    assert moved("chatserver_joins_total") == 2
    assert moved("chatserver_messages_received_total") == 3
    assert moved("chatserver_messages_stored_total") == 3
    assert moved("chatserver_messages_delivered_total") == 6  # 3 messages x 2 members
    assert moved("chatserver_errors_total", code=bad["code"]) == 1
    assert moved("chatserver_store_batches_total") >= 1
    assert after[("chatserver_store_queue_depth", ())] == 0
    assert after[("chatserver_db_pool_size", ())] == 1

    from wsclient import handshake_status

    assert await handshake_status(server.port, headers={"Origin": "https://evil.example"}) == 403
    final = await metrics(server.port)
    key = ("chatserver_handshake_rejections_total", (("reason", "origin"),))
    assert final[key] - before.get(key, 0.0) == 1


@ensure
async def test_a_peer_that_stops_answering_pings_is_dropped(make_server):
    server = make_server(ping_interval=0.3, ping_timeout=2.0)
    quiet = await connect(server.port, "quiet")
    lively = await connect(server.port, "lively")
    await quiet.join("r")
    await lively.join("r")
    proto = next(p for p in server.factory.connections if p.user == "quiet")
    gone = server.factory.when_closed(proto)
    quiet.proto.transport.pauseProducing()  # reads nothing: no pong goes back
    await gone.addTimeout(30, reactor)
    assert server.factory.ping_timeouts == 1
    # The neighbour answers its pings and stays.
    assert [p.user for p in server.factory.connections] == ["lively"]
    assert (await lively.request({"type": "ping"}))["type"] == "pong"
    values = await metrics(server.port)
    assert values[("chatserver_clients_dropped_total", (("reason", "ping_timeout"),))] == 1
    quiet.proto.transport.abortConnection()


@ensure
async def test_garbage_collection_pauses_are_counted(server):
    import gc

    key = ("chatserver_gc_collections_total", (("generation", "2"),))
    before = await metrics(server.port)
    gc.collect()
    after = await metrics(server.port)
    assert after[key] >= before[key] + 1
    assert after[("chatserver_gc_pause_seconds_total", (("generation", "2"),))] > 0


@ensure
async def test_the_collector_runs_less_often_while_serving_and_as_before_after(make_server):
    import gc

    from chatserver.gcstats import THRESHOLDS

    found = gc.get_threshold()
    server = make_server()
    assert gc.get_threshold() == THRESHOLDS != found
    await server.stopService()
    assert gc.get_threshold() == found
