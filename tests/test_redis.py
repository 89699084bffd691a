"""Several server instances on one throwaway redis-server: fan-out, isolation, faults, TLS.

The first tests drive RedisBroker directly (no chat core); the rest run whole
servers. Fast paths are on or off as CHATSERVER_FAST_PATHS says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import fast_paths_wanted, fresh_database
from servers import RedisServer
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from wsclient import connect

from chatserver import wire
from chatserver.broker.redis import RedisBroker
from chatserver.compat import FastPaths
from chatserver.compat.txredisapi import CHECKS, PUSH
from chatserver.config import Config
from chatserver.rooms import broker_payload

ensure = pytest_twisted.ensureDeferred
pytestmark = pytest.mark.redis


@pytest.fixture
def redis():
    server = RedisServer(password="s3cret")
    try:
        server.start()
        yield server
    finally:
        server.close()


class Inbox:
    """What a broker hands the core, in the order handed over."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def on_messages(self, batch: list[tuple[str, bytes]]) -> None:
        self.calls.append(("messages", batch))
        self._wake()

    def on_control(self, payload: bytes) -> None:
        self.calls.append(("control", payload))
        self._wake()

    def on_resync(self) -> None:
        self.calls.append(("resync", None))

    def flat(self) -> list[tuple[str, bytes]]:
        """(room, payload) for each room message, ("control", payload) for the others."""
        out: list[tuple[str, bytes]] = []
        for kind, detail in self.calls:
            if kind == "messages":
                out += detail
            elif kind == "control":
                out.append(("control", detail))
        return out

    def reads(self) -> list[Any]:
        """Each room-message list as its payloads, each control message as itself."""
        return [
            [payload for _, payload in detail] if kind == "messages" else detail
            for kind, detail in self.calls
            if kind != "resync"
        ]

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((condition, d))
        self._wake()
        return d.addTimeout(15, reactor)

    def _wake(self) -> None:
        for entry in list(self._waiting):
            condition, d = entry
            if condition():
                self._waiting.remove(entry)
                d.callback(None)


@pytest_twisted.async_yield_fixture
async def make_broker():
    """RedisBrokers driven directly, with fast paths as CHATSERVER_FAST_PATHS says."""
    started: list[RedisBroker] = []

    def make(url: str, **settings: Any) -> tuple[RedisBroker, Inbox]:
        settings.setdefault("redis_keepalive", 0.5)
        fast_paths = FastPaths(fast_paths_wanted(), CHECKS)
        broker = RedisBroker(Config(redis_url=url, **settings), reactor, fast_paths)
        inbox = Inbox()
        broker.start(inbox.on_messages, inbox.on_resync, inbox.on_control)
        started.append(broker)
        return broker, inbox

    yield make
    for broker in started:
        await broker.stop()


@ensure
async def test_messages_from_one_broker_reach_another_in_order(make_broker, redis):
    # One publisher: Redis then handles A's publishes in the order A sent them.
    a, _ = make_broker(redis.url, redis_publishers=1)
    b, inbox = make_broker(redis.url)
    await gatherResults([x.when_connected() for x in (a, b)]).addTimeout(15, reactor)
    await b.subscribe("r")
    for i in range(200):
        a.publish("r", b"%d" % i)
    a.publish_control(b"after them")
    await inbox.until(lambda: len(inbox.flat()) == 201)
    assert inbox.flat() == [("r", b"%d" % i) for i in range(200)] + [("control", b"after them")]
    assert (a.published, a.publish_failures, b.received) == (201, 0, 200)


@ensure
async def test_a_control_message_in_the_middle_of_a_read_keeps_its_place(make_broker, redis):
    broker, inbox = make_broker(redis.url)
    await broker.when_connected().addTimeout(15, reactor)
    await broker.subscribe("r")
    await broker.sync()
    # What Redis sends while the broker does not read arrives in one read.
    broker.pause_reading()
    for payload in (b"1", b"2"):
        assert redis.command("PUBLISH", broker.channel("r"), payload) == 1
    assert redis.command("PUBLISH", broker.control_channel, b"kick") == 1
    for payload in (b"3", b"4"):
        assert redis.command("PUBLISH", broker.channel("r"), payload) == 1
    redis.command("PING")  # Redis has written out everything before it
    broker.resume_reading()
    await inbox.until(lambda: len(inbox.flat()) == 5)
    kick = ("control", b"kick")
    assert inbox.flat() == [("r", b"1"), ("r", b"2"), kick, ("r", b"3"), ("r", b"4")]
    if broker.fast_paths.on(PUSH):  # the room messages before and after the kick, one list each
        assert inbox.reads() == [[b"1", b"2"], b"kick", [b"3", b"4"]]
    else:  # txredisapi's own parser: one message at a time
        assert inbox.reads() == [[b"1"], [b"2"], b"kick", [b"3"], [b"4"]]
    assert broker.received == 4


@ensure
async def test_a_broker_waits_for_tls_verification(make_broker):
    good = RedisServer(tls=True)
    bad = RedisServer(tls=True, tls_names=("chat.example",))
    try:
        good.start()
        bad.start()
        files = {
            "redis_tls_cert_file": good.client_cert_file,
            "redis_tls_key_file": good.client_key_file,
        }
        a, _ = make_broker(good.url, redis_tls_ca_file=good.ca_file, **files)
        b, inbox = make_broker(good.url, redis_tls_ca_file=good.ca_file, **files)
        await gatherResults([x.when_connected() for x in (a, b)]).addTimeout(15, reactor)
        await b.subscribe("secure")
        a.publish("secure", b"over TLS")
        await inbox.until(lambda: inbox.flat() == [("secure", b"over TLS")])

        wrong, _ = make_broker(bad.url, redis_tls_ca_file=bad.ca_file)
        events: list[tuple[str, Any]] = []
        wrong.observe(lambda event, detail: events.append((event, detail)))
        # Two attempts of each connection, all refused at the handshake: none
        # was ever taken for a connected one (no subscriber, no publisher).
        await until(lambda: events.count(("lost", "subscriber")) >= 2, "two attempts")
        assert [e for e, _ in events if e != "lost"] == []
        assert not wrong.connected and not wrong.subscribed
        assert (wrong.reconnects, wrong.live_connections(), wrong.received) == (0, 0, 0)
    finally:
        good.close()
        bad.close()


def instances(make_server, redis_url: str, n: int, **settings):
    settings.setdefault("redis_keepalive", 0.5)
    return [make_server(redis_url=redis_url, **settings) for _ in range(n)]


async def alice_on_a_bob_on_b(make_server, redis, **settings):
    """Two instances on ``redis``; alice on A and bob on B, both in room "r"."""
    a, b = instances(make_server, redis.url, 2, **settings)
    await ready(a, b)
    ca = await connect(a.port, "alice")
    cb = await connect(b.port, "bob")
    await ca.join("r")
    await cb.join("r")
    return a, b, ca, cb


async def ready(*servers) -> None:
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in servers])


def wait_event(server, name: str) -> Deferred:
    d: Deferred = Deferred()

    def seen(event, detail):
        if event == name and not d.called:
            d.callback(detail)

    server.broker.observe(seen)
    return d.addTimeout(30, reactor)


def numsub(redis, server, room: str) -> int:
    channel = server.broker.channel(room)
    return int(redis.command("PUBSUB", "NUMSUB", channel)[1])


async def messages(client, n: int) -> list[dict]:
    got = []
    while len(got) < n:
        frame = await client.recv()
        if frame["type"] == "message":
            got.append(frame)
    return got


@ensure
async def test_message_sent_on_a_reaches_b_and_c_once_in_order(make_server, redis):
    a, b, c = instances(make_server, redis.url, 3)
    await ready(a, b, c)
    ca = await connect(a.port, "alice")
    cb = await connect(b.port, "bob")
    cc = await connect(c.port, "carol")
    for client in (ca, cb, cc):
        await client.join("lobby")
    for i in range(20):
        ca.send({"type": "send", "room": "lobby", "body": f"m{i}", "ref": i})
    for client in (cb, cc):
        got = await messages(client, 20)
        assert [m["id"] for m in got] == list(range(1, 21))
        assert [m["body"] for m in got] == [f"m{i}" for i in range(20)]
        assert await client.drain_to_pong() == []
    # The sender's own instance delivers once, not again from Redis.
    own = [f for f in [await ca.recv() for _ in range(40)] if f["type"] == "message"]
    assert [m["id"] for m in own] == list(range(1, 21))
    assert await ca.drain_to_pong() == []


@ensure
async def test_an_instance_without_members_in_a_room_receives_nothing_for_it(make_server, redis):
    # One publisher: Redis then handles A's publishes in the order A sent them.
    a, b = instances(make_server, redis.url, 2, redis_publishers=1)
    await ready(a, b)
    ca = await connect(a.port, "alice")
    await ca.join("x")
    await ca.join("y")
    cb = await connect(b.port, "bob")
    await cb.join("y")
    await gatherResults([Deferred.fromCoroutine(_sync(s)) for s in (a, b)])
    assert numsub(redis, a, "x") == 1
    assert numsub(redis, a, "y") == 2
    for i in range(10):
        await ca.request({"type": "send", "room": "x", "body": f"x{i}"})
    await ca.request({"type": "send", "room": "y", "body": "for y"})
    # B got y's message after every x publish was handled: none reached B.
    assert (await cb.expect("message"))["body"] == "for y"
    assert b.broker.received == 1
    assert a.broker.published == 11
    # The last member leaving unsubscribes.
    await ca.request({"type": "leave", "room": "x"})
    await a.broker.sync()
    assert numsub(redis, a, "x") == 0
    assert a.broker.subscribed_rooms == 1


async def _sync(server) -> None:
    await server.broker.sync()


@ensure
async def test_many_senders_on_two_instances_gap_free_with_postgres(make_server, redis, postgres):
    url = fresh_database(postgres)
    a, b = instances(make_server, redis.url, 2, database_url=url, db_pool_size=4)
    await ready(a, b)
    senders = [await connect((a, b)[i % 2].port, f"s{i}") for i in range(10)]
    watchers = [await connect((a, b)[i % 2].port, f"w{i}") for i in range(4)]
    for client in senders + watchers:
        await client.join("hot")
    per_sender = 30
    total = per_sender * len(senders)
    for j in range(per_sender):
        for n, client in enumerate(senders):
            client.send({"type": "send", "room": "hot", "body": f"{n}:{j}"})
    received = await gatherResults(
        [Deferred.fromCoroutine(messages(c, total)) for c in senders + watchers]
    )
    for got in received:
        assert [m["id"] for m in got] == list(range(1, total + 1))
        assert got == received[0]
    for n in range(len(senders)):
        mine = [m["body"] for m in received[0] if m["user"] == f"s{n}"]
        assert mine == [f"{n}:{j}" for j in range(per_sender)]
    history, after = [], 0
    while True:
        page = await watchers[1].request(
            {"type": "history", "room": "hot", "after": after, "limit": 100}
        )
        history += page["messages"]
        if not page["more"]:
            break
        after = history[-1]["id"]
    assert [(m["id"], m["body"]) for m in history] == [(m["id"], m["body"]) for m in received[0]]


@ensure
async def test_redis_killed_and_restarted_flow_resumes_without_reconnecting(make_server, redis):
    a, b = instances(make_server, redis.url, 2)
    await ready(a, b)
    ca = await connect(a.port, "alice")
    ca2 = await connect(a.port, "amy")
    cb = await connect(b.port, "bob")
    for client in (ca, ca2, cb):
        await client.join("r")
    await ca.request({"type": "send", "room": "r", "body": "before"})
    assert (await cb.expect("message"))["body"] == "before"

    redis.kill()
    await all_lost(a)
    await all_lost(b)
    # During the outage: stored, acked, and delivered on the same instance.
    for i in range(3):
        ack = await ca.request({"type": "send", "room": "r", "body": f"during {i}"})
        assert ack["type"] == "ack", ack
    local = await messages(ca2, 4)
    assert [m["body"] for m in local] == ["before", "during 0", "during 1", "during 2"]

    back = b.broker.when_connected()
    redis.restart()
    await back.addTimeout(30, reactor)
    await a.broker.when_connected().addTimeout(30, reactor)
    # B's member gets what it missed, in order, once, on the same connection.
    missed = await messages(cb, 3)
    assert [m["body"] for m in missed] == ["during 0", "during 1", "during 2"]
    await ca.request({"type": "send", "room": "r", "body": "after"})
    assert (await cb.expect("message"))["body"] == "after"
    assert await cb.drain_to_pong() == []
    assert b.broker.reconnects >= 1


@ensure
async def test_a_long_outage_is_filled_from_the_store_page_by_page(make_server, redis):
    """No republish: only the store can bring B's member what it missed, over many pages."""
    a, b, ca, cb = await alice_on_a_bob_on_b(make_server, redis, redis_republish_max=0)
    redis.kill()
    await all_lost(a)
    await all_lost(b)
    n = 250  # more than two pages of a store fill
    for i in range(n):
        ack = await ca.request({"type": "send", "room": "r", "body": f"during {i}"})
        assert ack["type"] == "ack", ack
    back = b.broker.when_connected()
    redis.restart()
    await back.addTimeout(30, reactor)
    missed = await messages(cb, n)
    assert [m["id"] for m in missed] == list(range(1, n + 1))
    assert await cb.drain_to_pong() == []


@ensure
async def test_idle_timeout_never_surfaces(make_server, redis):
    redis.command("CONFIG", "SET", "timeout", "1")
    a, b, ca, cb = await alice_on_a_bob_on_b(make_server, redis, redis_keepalive=0.3)
    # Idle for longer than Redis' timeout: every connection of ours has lived
    # two seconds (one dropped by Redis would be new, and younger).
    await until(lambda: len(ages_at_least(redis, 2)) >= 6, "6 connections 2 s old")
    await ca.request({"type": "send", "room": "r", "body": "after a quiet spell"})
    assert (await cb.expect("message"))["body"] == "after a quiet spell"
    for server in (a, b):
        assert server.broker.reconnects == 0
        assert server.broker.publish_failures == 0
    # 2 instances x (1 subscriber + 2 publishers), none of them remade.
    assert len(ages_at_least(redis, 2)) >= 6


def ages_at_least(redis, seconds: int) -> list[int]:
    """The ages of Redis' client connections at least ``seconds`` old."""
    ages = [
        int(field.split("=")[1])
        for line in redis.command("CLIENT", "LIST").splitlines()
        for field in line.split()
        if field.startswith("age=")
    ]
    return [age for age in ages if age >= seconds]


async def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` (where no event says it became true), with a bounded deadline."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await task.deferLater(reactor, 0.1, lambda: None)


@ensure
async def test_rediss_verifies_the_server(make_server):
    good = RedisServer(tls=True)
    bad = RedisServer(tls=True, tls_names=("chat.example",))
    try:
        good.start()
        bad.start()
        a, b = instances(
            make_server,
            good.url,
            2,
            redis_tls_ca_file=good.ca_file,
            redis_tls_cert_file=good.client_cert_file,
            redis_tls_key_file=good.client_key_file,
        )
        await ready(a, b)
        ca = await connect(a.port, "alice")
        cb = await connect(b.port, "bob")
        await ca.join("secure")
        await cb.join("secure")
        await ca.request({"type": "send", "room": "secure", "body": "over TLS"})
        assert (await cb.expect("message"))["body"] == "over TLS"

        wrong = make_server(redis_url=bad.url, redis_tls_ca_file=bad.ca_file)
        await wait_event(wrong, "lost")
        assert not wrong.broker.connected
        assert not wrong.broker.subscribed
        assert wrong.broker.received == 0
        # Still serves locally, storing and acking.
        cw = await connect(wrong.port, "wendy")
        await cw.join("local")
        assert (await cw.request({"type": "send", "room": "local", "body": "x"}))["type"] == "ack"
    finally:
        good.close()
        bad.close()


@ensure
async def test_a_burst_of_subscriptions_is_routed_right_and_resubscribed(make_server, redis):
    (a,) = instances(make_server, redis.url, 1)
    await ready(a)
    rooms = [f"burst{i}" for i in range(3000)]
    # All SUBSCRIBEs leave in one turn of the reactor: pipelined, one channel each.
    await gatherResults([a.broker.subscribe(r) for r in rooms]).addTimeout(30, reactor)
    assert a.broker.subscribed_rooms == 3000
    assert numsub(redis, a, "burst0") == 1 and numsub(redis, a, "burst2999") == 1
    for r in rooms[:1000]:
        a.broker.unsubscribe(r)
    assert await a.broker.sync() is not None  # replies stayed aligned: PING got its pong
    assert numsub(redis, a, "burst0") == 0 and numsub(redis, a, "burst1000") == 1
    redis.kill()
    await all_lost(a)
    subscribed = wait_event(a, "subscribed")
    redis.restart()
    assert await subscribed == 2000
    channels = redis.command("PUBSUB", "CHANNELS", "chat:0:room:burst*")
    assert len(channels) == 2000


@ensure
async def test_a_hung_redis_is_noticed_and_left_behind(make_server, redis):
    import os
    import signal

    a, b, ca, cb = await alice_on_a_bob_on_b(
        make_server, redis, redis_keepalive=0.2, redis_timeout=0.5
    )
    lost = wait_event(b, "lost")
    os.kill(redis.pid, signal.SIGSTOP)  # like a network cut: no FIN, no RST
    try:
        await lost
        back = b.broker.when_connected()
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    await back.addTimeout(30, reactor)
    await a.broker.when_connected().addTimeout(30, reactor)
    await ca.request({"type": "send", "room": "r", "body": "after the cut"})
    assert (await cb.expect("message"))["body"] == "after the cut"


@ensure
async def test_a_failed_auth_does_not_stop_reconnecting_for_good(make_server, redis):
    (a,) = instances(make_server, redis.url, 1, redis_keepalive=0.2)
    await ready(a)
    ca = await connect(a.port, "alice")
    await ca.join("r")
    redis.kill()
    await all_lost(a)
    # Redis comes back without our user's password: AUTH fails, txredisapi gives up.
    good = redis.password
    redis.password = "someone-else"
    gave_up = wait_event(a, "restart")
    redis.restart()
    await gave_up
    redis.kill()
    await all_lost(a)
    redis.password = good
    back = a.broker.when_connected()
    redis.restart()
    await back.addTimeout(30, reactor)
    await ca.request({"type": "send", "room": "r", "body": "auth is back"})
    assert (await ca.expect("message"))["body"] == "auth is back"
    assert numsub(redis, a, "r") == 1


async def all_lost(server) -> None:
    while server.broker.live_connections():
        await wait_event(server, "lost")


@ensure
async def test_a_message_stored_during_shutdown_still_reaches_the_other_instance(
    make_server, redis
):
    """Stopping flushes the store before it stops the broker, so what is stored last is
    published too, live, to members on other instances."""
    a, _, ca, cb = await alice_on_a_bob_on_b(make_server, redis)
    await ca.close()
    posted = a.chat.post("r", "system", "said as A stops")  # queued, not yet stored
    stopping = a.stopService()
    message = await posted
    got = await cb.expect("message")
    assert (got["id"], got["body"]) == (message.id, "said as A stops")
    await stopping


@ensure
async def test_the_messages_of_one_read_from_redis_reach_each_member_in_one_write(
    make_server, redis
):
    (b,) = instances(make_server, redis.url, 1)
    await ready(b)
    members = [await connect(b.port, f"m{i}") for i in range(2)]
    for m in members:
        await m.join("r")
    # B stops reading its subscriber socket; what Redis sends meanwhile waits
    # there and is taken in one read when B reads again.
    b.broker.pause_reading()
    n = 5
    channel = b.broker.channel("r")
    for i in range(1, n + 1):
        frame = wire.encode_message("r", i, "ghost", f"b{i}", 0)
        assert redis.command("PUBLISH", channel, broker_payload(i, frame)) == 1
    redis.command("PING")  # Redis has written out everything before it
    before = b.coalesced_frames
    b.broker.resume_reading()
    for m in members:
        got = await messages(m, n)
        assert [(f["id"], f["body"]) for f in got] == [(i, f"b{i}") for i in range(1, n + 1)]
    if b.fast_paths.on(PUSH):  # txredisapi's own parser hands over one message at a time
        assert b.coalesced_frames - before == n * len(members)


@ensure
async def test_a_kick_read_with_a_message_before_it_reaches_the_member_after_the_message(
    make_server, redis
):
    (b,) = instances(make_server, redis.url, 1)
    await ready(b)
    kicked, stays = await connect(b.port, "kicked"), await connect(b.port, "stays")
    for m in (kicked, stays):
        await m.join("r")
    # A message, then a kick from another instance, taken by B in one read.
    b.broker.pause_reading()
    frame = wire.encode_message("r", 1, "ghost", "before the kick", 0)
    assert redis.command("PUBLISH", b.broker.channel("r"), broker_payload(1, frame)) == 1
    kick = {"op": "kick", "room": "r", "user": "kicked", "reason": "bye"}
    assert redis.command("PUBLISH", b.broker.control_channel, wire.encode(kick)) == 1
    redis.command("PING")  # Redis has written out everything before it
    b.broker.resume_reading()
    first, second = await kicked.recv(), await kicked.recv()
    assert (first["type"], first.get("id")) == ("message", 1)
    assert second == {"type": "kicked", "room": "r", "reason": "bye"}
    assert [f["id"] for f in await messages(stays, 1)] == [1]
    for m in (kicked, stays):
        await m.close()
