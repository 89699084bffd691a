"""A minute of connection churn, then the server must be back where it started.

A leak of one object or one descriptor per connection passes every test that
opens a handful of connections; it shows only after thousands have come and
gone by every way out: a leave and a close, a close with rooms still joined,
and peers that vanish without a close frame (after their conversation, with
joins and a send in flight, or in the middle of the opening handshake).

The server runs in this process on Postgres and Redis, so the check can look
inside it: its connections and rooms, the Redis subscriptions it holds, the
file descriptors of this process and the live objects of the server's
connection classes. RSS is not checked here: memory noise belongs in the
benchmark (bench/soak.py), which runs the same churn against a real daemon.

CHATSERVER_SOAK_SECONDS shortens the load for a quick local run.
"""

from __future__ import annotations

import gc
import os
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from wsclient import TIMEOUT, Client, connect

from chatserver.metrics import ServerCollector
from chatserver.rooms import Room
from chatserver.session import Session
from chatserver.transport.protocol import ChatProtocol
from chatserver.web import DeadlineChannel

ensure = pytest_twisted.ensureDeferred
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SOAK_SECONDS = float(os.environ.get("CHATSERVER_SOAK_SECONDS", "60"))
CYCLERS = 10
IDLE_MEMBERS = 6
SHARED_ROOMS = tuple(f"shared{i}" for i in range(3))
EPHEMERAL_ROOMS = tuple(f"eph{i}" for i in range(8))
THINK = 0.02  # mean pause between one client's visits, seconds
MAX_SENDS = 3
POOL_SIZE = 2
PRIME_ROUNDS = 10
PRIME_CLIENTS = 8
PRIME_READS = 5
# Only for what has no event to wait for: descriptors and objects the server
# lets go of after its last close, and rooms whose hosting was still under way.
SETTLE_DEADLINE = 30.0
POLL = 0.05
# Every way a visit can end; the cyclers take them in turn, so each occurs.
ENDINGS = ("leave+close", "close", "abort", "abort-mid-join", "abort-mid-handshake")
# The server's per-connection objects: none may outlive the churn.
SERVER_CLASSES: tuple[type, ...] = (Session, ChatProtocol, Room, DeadlineChannel, tcp.Server)
WATCHED_METRICS = (
    "chatserver_connections",
    "chatserver_rooms_hosted",
    "chatserver_redis_subscribed_rooms",
    "chatserver_store_queue_depth",
)


def server_objects() -> dict[str, int]:
    """Live instances of the server's connection classes, after a full collection."""
    gc.collect()
    counts = dict.fromkeys((cls.__name__ for cls in SERVER_CLASSES), 0)
    for obj in gc.get_objects():
        for cls in SERVER_CLASSES:
            if isinstance(obj, cls):
                counts[cls.__name__] += 1
                break
    return counts


def chatserver_types() -> Counter[str]:
    """Every live object of a chatserver class, by class: evidence when a count is off."""
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        module = type(obj).__module__
        if isinstance(module, str) and module.startswith("chatserver"):  # some are properties
            counts[f"{module}.{type(obj).__qualname__}"] += 1
    return counts


def snapshot(server: Any) -> dict[str, Any]:
    """Everything the churn may leave behind, as one comparable value."""
    metrics = {
        family.name: family.samples[0].value
        for family in ServerCollector(server).collect()
        if family.name in WATCHED_METRICS
    }
    admission = server.chat.admission
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "objects": server_objects(),
        "metrics": metrics,
        "factory.connections": len(server.factory.connections),
        "registry.rooms": sorted(server.registry.rooms),
        "broker.subscribed_rooms": server.broker.subscribed_rooms,
        "chat.users": sorted(server.chat.users),
        "admission": (dict(admission.by_address), dict(admission.by_user)),
    }


def back_to(baseline: dict[str, Any], now: dict[str, Any]) -> bool:
    """Everything as before; fds and objects at most as many (what earlier tests in
    this process left may be collected meanwhile: fewer is no leak)."""
    rest = {k: v for k, v in now.items() if k not in ("fds", "objects")}
    if rest != {k: v for k, v in baseline.items() if k not in ("fds", "objects")}:
        return False
    if now["fds"] > baseline["fds"]:
        return False
    return all(count <= baseline["objects"].get(kind, 0) for kind, count in now["objects"].items())


def redis_channels(redis: Any) -> list[str]:
    return sorted(redis.command("PUBSUB", "CHANNELS", "chat:*") or [])


def db_connections(postgres: Any, database: str) -> int:
    rows = postgres.query(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND backend_type = 'client backend'",
        (database,),
    )
    return int(rows[0][0])


async def answered(client: Client, frame: dict[str, Any], expect: str, tally: Counter[str]) -> None:
    """A request whose answer is counted when it is not the one a healthy server gives."""
    got = await client.request(frame)
    if got["type"] != expect:
        tally[f"{frame['type']} answered {got['type']} {got.get('code', '')}".strip()] += 1


async def vanish_mid_handshake(port: int) -> None:
    """Half an upgrade request, then a TCP abort; fires once our side has closed."""
    lost: Deferred[None] = Deferred()

    class Half(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(
                f"GET /ws?user=half HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\n".encode()
            )
            self.transport.abortConnection()

        def connectionLost(self, reason: Any = None) -> None:
            lost.callback(None)

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    await endpoint.connect(Factory.forProtocol(Half)).addTimeout(TIMEOUT, reactor)
    await lost.addTimeout(TIMEOUT, reactor)


async def visit(
    port: int, user: str, ending: str, rooms: list[str], rng: random.Random, tally: Counter[str]
) -> None:
    """One client's visit: connect, join, send, read history, and end as ``ending`` says."""
    tally[ending] += 1
    if ending == "abort-mid-handshake":
        await vanish_mid_handshake(port)
        return
    client = await connect(port, user)
    if ending == "abort-mid-join":
        for room in rooms:
            client.send({"type": "join", "room": room})
        client.send({"type": "send", "room": rooms[0], "body": f"in flight from {user}"})
        client.proto.transport.abortConnection()
        await client.wait_closed()
        return
    for room in rooms:
        await answered(client, {"type": "join", "room": room}, "joined", tally)
    for i in range(rng.randint(1, MAX_SENDS)):
        frame = {"type": "send", "room": rng.choice(rooms), "body": f"{user} says {i}"}
        await answered(client, frame, "ack", tally)
    history = {"type": "history", "room": rng.choice(rooms), "limit": 20}
    await answered(client, history, "history", tally)
    if ending == "abort":
        client.proto.transport.abortConnection()
        await client.wait_closed()
        return
    if ending == "leave+close":
        for room in rooms:
            await answered(client, {"type": "leave", "room": room}, "left", tally)
    await client.close()


async def cycler(port: int, index: int, until: float, tally: Counter[str]) -> None:
    """Visits back to back until ``until`` (reactor time), each ending differently."""
    rng = random.Random(index)  # the same rooms and sends on every run
    n = 0
    while reactor.seconds() < until:
        rooms = sorted({rng.choice(SHARED_ROOMS + EPHEMERAL_ROOMS) for _ in range(3)})
        ending = ENDINGS[(index + n) % len(ENDINGS)]
        await visit(port, f"churn{index}", ending, rooms, rng, tally)
        n += 1
        await deferLater(reactor, rng.uniform(0, 2 * THINK))


async def prime(server: Any, postgres: Any, database: str) -> None:
    """Open every pool connection before the baseline, or they would count as leaked fds.

    adbapi opens a database connection per pool thread on that thread's first
    interaction, and the broker connects its publishers on its own schedule;
    concurrent joins and history reads give every pool thread work.
    """
    port = server.port
    redis_connections = 1 + server.config.redis_publishers

    async def one(i: int) -> None:
        client = await connect(port, f"prime{i}")
        room = SHARED_ROOMS[i % len(SHARED_ROOMS)]
        await client.join(room)
        for _ in range(PRIME_READS):
            client.send({"type": "history", "room": room})
        for _ in range(PRIME_READS):
            assert (await client.recv())["type"] == "history"
        await client.close()

    for _ in range(PRIME_ROUNDS):
        await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(PRIME_CLIENTS)])
        opened = db_connections(postgres, database)
        if opened == POOL_SIZE and server.broker.live_connections() == redis_connections:
            return
    pytest.fail(
        f"the pools did not fill: {opened} of {POOL_SIZE} database connections,"
        f" {server.broker.live_connections()} of {redis_connections} Redis connections"
    )


async def poll(check: Callable[[], bool], deadline: float) -> bool:
    """True once ``check()`` holds; False at the deadline (for states with no event)."""
    give_up = reactor.seconds() + deadline
    while not check():
        if reactor.seconds() > give_up:
            return False
        await deferLater(reactor, POLL)
    return True


@ensure
async def test_churn_leaves_the_server_as_it_found_it(
    make_server: Callable[..., Any], redis: Any, postgres: Any, pg_url: str
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    server = make_server(redis_url=redis.url, database_url=pg_url, db_pool_size=POOL_SIZE)
    port = server.port
    await server.broker.when_connected().addTimeout(TIMEOUT, reactor)
    await prime(server, postgres, database)
    # The priming clients closed; their rooms may still be on their way out.
    assert await poll(lambda: not server.registry.rooms, SETTLE_DEADLINE)
    await server.broker.sync()
    baseline = snapshot(server)
    channels_before = redis_channels(redis)
    types_before = chatserver_types()
    assert baseline["factory.connections"] == 0 and baseline["registry.rooms"] == []

    # Members that stay for the whole run keep the shared rooms hosted.
    members: list[Client] = []
    for i in range(IDLE_MEMBERS):
        member = await connect(port, f"idle{i}")
        for room in (SHARED_ROOMS[i % 3], SHARED_ROOMS[(i + 1) % 3]):
            await member.join(room)
        members.append(member)

    tally: Counter[str] = Counter()
    until = reactor.seconds() + SOAK_SECONDS
    await gatherResults(
        [Deferred.fromCoroutine(cycler(port, i, until, tally)) for i in range(CYCLERS)]
    )

    # Every message a member got came in id order, once, with no gap.
    for member in members:
        seen: dict[str, list[int]] = {}
        for frame in await member.drain_to_pong():
            assert frame["type"] == "message", frame
            seen.setdefault(frame["room"], []).append(frame["id"])
        for room, ids in seen.items():
            assert ids == list(range(ids[0], ids[0] + len(ids))), (room, ids[:20])
    for member in members:
        await member.close()
    # The server's side of every connection has closed (aborted peers included).
    await gatherResults([server.factory.when_closed(p) for p in list(server.factory.connections)])

    settled = await poll(lambda: back_to(baseline, snapshot(server)), SETTLE_DEADLINE)
    after = snapshot(server)
    if not settled:
        leaked = chatserver_types() - types_before
        pytest.fail(
            f"not back to the baseline {SETTLE_DEADLINE:g} s after the last close:\n"
            f"  before: {baseline}\n  after:  {after}\n"
            f"  chatserver objects added: {dict(leaked.most_common(20))}"
        )
    await server.broker.sync()  # Redis has done every UNSUBSCRIBE the server sent
    assert redis_channels(redis) == channels_before
    rooms = [server.broker.channel(r).decode() for r in SHARED_ROOMS + EPHEMERAL_ROOMS]
    numsub = redis.command("PUBSUB", "NUMSUB", *rooms)
    assert [int(n) for n in numsub[1::2]] == [0] * len(rooms), numsub
    assert db_connections(postgres, database) == POOL_SIZE

    # The churn happened, every way out was taken, and the server answered everything.
    problems = {k: v for k, v in tally.items() if k not in ENDINGS}
    assert problems == {}
    assert all(tally[ending] > 0 for ending in ENDINGS), tally
