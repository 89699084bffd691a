"""Protocol 1.1, presence: who is online in a room, on every instance.

Real clients throughout; across instances a real Redis (killed and restarted
here), and an instance in a process of its own for the kill -9.
"""

from __future__ import annotations

import os
import resource
from typing import Any

import pytest
import pytest_twisted
from test_twistd import BIN
from test_workers import Server
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from wsclient import TIMEOUT, connect, http_json

ensure = pytest_twisted.ensureDeferred
KEY = "admin-key-for-tests-at-least-32-bytes"


@pytest.fixture(params=["redis", "redis_cluster"])
def shared(request: Any) -> tuple[dict[str, Any], list[str]]:
    """Where the instances share presence: one Redis, or a Redis Cluster (the
    settings for an instance here, and the arguments for one in a process)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis").url
        return {"redis_url": url}, ["--redis-url", url]
    seeds = tuple(request.getfixturevalue("redis_cluster").seed_urls())
    return {"redis_cluster": seeds, "redis_keepalive": 0.5}, ["--redis-cluster", seeds[0]]


async def watch(port: int, user: str, room: str = "r") -> tuple[Any, dict[str, Any]]:
    client = await connect(port, user)
    joined = await client.request({"type": "join", "room": room, "presence": True})
    assert joined["type"] == "joined", joined
    return client, joined


async def next_presence(client: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next presence frame (others, such as messages, are skipped)."""
    while (got := await client.recv(timeout))["type"] != "presence":
        pass
    return got


async def next_event(client: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next presence event; lists (a refresh after the state was rebuilt) are
    skipped."""
    while "user" not in (got := await next_presence(client, timeout)):
        pass
    return got


def event(user: str, online: bool, room: str = "r") -> dict[str, Any]:
    return {"type": "presence", "room": room, "user": user, "online": online}


@ensure
async def test_watchers_see_first_connections_enter_and_last_ones_leave(make_server):
    server = make_server(admin_api_key=KEY)
    alice, joined = await watch(server.port, "alice")
    assert (joined["online"], joined["online_count"]) == (["alice"], 1)
    # Version 1's join (no presence) counts as online, and gets no list.
    bob = await connect(server.port, "bob")
    plain = await bob.join("r")
    assert "online" not in plain and "online_count" not in plain
    assert await next_event(alice) == event("bob", True)
    bob_too = await connect(server.port, "bob")
    await bob_too.join("r")
    await bob.request({"type": "leave", "room": "r"})
    # bob is still in through his second connection: nothing to say.
    assert await alice.drain_to_pong() == []
    answer = await alice.request({"type": "presence", "room": "r"})
    assert (answer["online"], answer["online_count"]) == (["alice", "bob"], 2)
    status, body = await http_json(server.port, "GET", "/admin/rooms/r/presence", key=KEY)
    assert (status, body) == (200, {"room": "r", "online": ["alice", "bob"], "online_count": 2})
    await bob_too.close()
    assert await next_event(alice) == event("bob", False)
    # Watching is per room and per connection: bob never asked, so he hears nothing.
    carol = await connect(server.port, "carol")
    await carol.join("r")
    assert await next_event(alice) == event("carol", True)
    assert [f for f in await bob.drain_to_pong() if f["type"] == "presence"] == []


@ensure
async def test_presence_list_max_caps_the_names_not_the_count(make_server):
    server = make_server(presence_list_max=2)
    for user in ("u1", "u2"):
        await (await connect(server.port, user)).join("r")
    watcher, joined = await watch(server.port, "u0")
    assert (len(joined["online"]), joined["online_count"]) == (2, 3)
    _, at_edge = await watch(server.port, "u0", "other")
    assert (at_edge["online"], at_edge["online_count"]) == (["u0"], 1)
    answer = await watcher.request({"type": "presence", "room": "r"})
    assert (len(answer["online"]), answer["online_count"]) == (2, 3)
    assert set(answer["online"]) < {"u0", "u1", "u2"}


@ensure
async def test_past_presence_burst_events_a_second_watchers_get_one_list(make_server):
    second = task.Clock()  # the server's windows: one second is when the test says
    server = make_server(presence_burst=2, clock=second)
    alice, _ = await watch(server.port, "alice")
    others = []
    for user in ("u1", "u2", "u3", "u4"):
        others.append(await connect(server.port, user))
        await others[-1].join("r")
    # At the edge: two events one by one; past it, nothing more this second.
    assert await next_presence(alice) == event("u1", True)
    assert await next_presence(alice) == event("u2", True)
    assert [f for f in await alice.drain_to_pong() if f["type"] == "presence"] == []
    second.advance(1)
    listed = await next_presence(alice)
    assert listed == {
        "type": "presence",
        "room": "r",
        "online": ["alice", "u1", "u2", "u3", "u4"],
        "online_count": 5,
    }
    assert server.presence.snapshots == 1
    # A new second: events one by one again.
    await others[0].close()
    assert await next_presence(alice) == event("u1", False)


@ensure
async def test_presence_frames_are_checked(make_server):
    server = make_server()
    alice = await connect(server.port, "alice")
    for bad in ("yes", 1, None):
        got = await alice.request({"type": "join", "room": "r", "presence": bad})
        assert (got["type"], got["code"]) == ("error", "bad_request"), bad
    got = await alice.request({"type": "presence", "room": "r"})
    assert (got["type"], got["code"]) == ("error", "not_member")
    got = await alice.request({"type": "presence"})
    assert (got["type"], got["code"]) == ("error", "bad_request")


@pytest.mark.redis
@ensure
async def test_presence_across_two_instances(make_server, shared, tmp_path):
    a, b = (
        make_server(database_url=f"sqlite:///{tmp_path / name}.sqlite3", **shared[0])
        for name in ("a", "b")
    )
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    # Two instances' commands reach Redis on two connections, in no set order:
    # a presence join is answered after its user is counted, so what follows
    # each step is decided (a version 1 join is counted a moment later).
    bob_b, _ = await watch(b.port, "bob")
    alice, joined = await watch(a.port, "alice")
    assert (joined["online"], joined["online_count"]) == (["alice", "bob"], 2)
    carol, joined = await watch(b.port, "carol")
    assert joined["online_count"] == 3
    assert await next_event(alice) == event("carol", True)
    # bob on both instances: offline only when both connections are gone.
    bob_a, _ = await watch(a.port, "bob")
    await bob_b.close()
    answer = await alice.request({"type": "presence", "room": "r"})
    assert answer["online"] == ["alice", "bob", "carol"]
    await bob_a.close()
    assert await next_event(alice) == event("bob", False)
    assert await next_event(carol) == event("bob", False)
    # An instance that stops cleanly says goodbye at once.
    await b.stopService()
    assert await next_event(alice) == event("carol", False)


@pytest.mark.redis
@ensure
async def test_a_killed_instance_has_its_users_offline_within_the_timeout(
    make_server, shared, tmp_path
):
    timeout = 2.0
    here = make_server(presence_timeout=timeout, **shared[0])
    await here.broker.when_connected().addTimeout(15, reactor)
    other = Server()
    reactor.spawnProcess(
        other,
        str(BIN / "twistd"),
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "chatserver",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            *shared[1],
            "--presence-timeout",
            str(timeout),
        ],
        env={k: v for k, v in os.environ.items() if k != "PORT"},
        path=str(tmp_path),
    )
    port = await other.listening.addTimeout(30, reactor)
    await other.wait_for(rb"presence: state rebuilt")  # its Redis is connected
    try:
        # A presence join: its answer comes after dave is counted in Redis.
        await watch(port, "dave")
        alice, joined = await watch(here.port, "alice")
        assert joined["online"] == ["alice", "dave"]
        other.transport.signalProcess("KILL")
        # No goodbye: the heartbeat stops, and within the timeout (plus a sweep)
        # the instance here reaps it.
        # (A list may come first: this instance rebuilt its part meanwhile.)
        while (got := await next_presence(alice, timeout + 5)) != event("dave", False):
            assert got["online"] == ["alice", "dave"], got
        assert here.presence.state.reaped == 1
    finally:
        if other.transport.pid is not None:
            other.transport.signalProcess("KILL")
        await other.ended


@pytest.mark.redis
@ensure
async def test_after_a_redis_restart_presence_is_rebuilt_without_stale_users(make_server, redis):
    a, b = (make_server(redis_url=redis.url, redis_keepalive=0.2) for _ in range(2))
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    alice, _ = await watch(a.port, "alice")
    bob, _ = await watch(b.port, "bob")
    carol = await connect(b.port, "carol")
    await carol.join("r")
    while (await next_event(alice))["user"] != "carol":
        pass
    rebuilt = gatherResults([s.presence.when_rebuilt() for s in (a, b)])
    redis.kill()
    await carol.close()  # leaves while Redis is away
    redis.restart()
    await rebuilt.addTimeout(30, reactor)
    for client in (alice, bob):
        answer = await client.request({"type": "presence", "room": "r"})
        assert (answer["online"], answer["online_count"]) == (["alice", "bob"], 2)


def _burst_size(wanted: int) -> int:
    """Each member is two sockets in this process (client and server side): as
    many as the open-file limit allows, up to ``wanted``, after raising it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    members = min(wanted, (soft - 1000) // 2)
    assert members >= 500, f"open-file limit {soft} is too low for a burst test"
    return members


async def _join_all(port: int, users: list[str]) -> list[Any]:
    clients = []
    for start in range(0, len(users), 100):
        chunk = await gatherResults(
            [Deferred.fromCoroutine(connect(port, u)) for u in users[start : start + 100]]
        )
        answers = await gatherResults(
            [Deferred.fromCoroutine(c.request({"type": "join", "room": "big"})) for c in chunk]
        )
        assert all(answer["type"] == "joined" for answer in answers), answers
        clients += chunk
    return clients


class _View:
    """What a watcher knows from its frames: a list replaces, an event adds or removes."""

    def __init__(self, joined: dict[str, Any]) -> None:
        self.online = set(joined["online"])

    def apply(self, frame: dict[str, Any]) -> None:
        if "online_count" in frame:
            assert frame["online_count"] == len(frame["online"])  # the list is whole here
            self.online = set(frame["online"])
        elif frame["online"]:
            self.online.add(frame["user"])
        else:
            self.online.discard(frame["user"])


@pytest.mark.redis
@ensure
async def test_a_room_joining_in_a_burst_converges_without_a_storm(make_server, redis, tmp_path):
    members = _burst_size(int(os.environ.get("CHATSERVER_PRESENCE_BURST_MEMBERS", "5000")))
    settings = {"redis_url": redis.url, "presence_list_max": members + 10, "presence_burst": 20}
    # A store each: SQLite belongs to one instance (two on one file lock each other out).
    a, b = (
        make_server(database_url=f"sqlite:///{tmp_path / name}.sqlite3", **settings)
        for name in ("a", "b")
    )
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    watchers = []
    for i, server in enumerate((a, b, a)):
        client, joined = await watch(server.port, f"w{i}", "big")
        watchers.append((client, _View(joined)))
    commands = sum(s.presence.state.commands for s in (a, b))
    published = sum(s.broker.published for s in (a, b))
    users = [f"m{i}" for i in range(members)]
    half = members // 2
    joined_clients = await gatherResults(
        [
            Deferred.fromCoroutine(_join_all(a.port, users[:half])),
            Deferred.fromCoroutine(_join_all(b.port, users[half:])),
        ]
    )
    expected = {f"w{i}" for i in range(3)} | set(users)
    frames = 0
    for client, view in watchers:
        while view.online != expected:
            view.apply(await next_presence(client))
            frames += 1
    # One state command per join (its first connection in the room here), and
    # at most one publish: not one per member.
    used = sum(s.presence.state.commands for s in (a, b)) - commands
    assert used <= members * 1.05, used
    assert sum(s.broker.published for s in (a, b)) - published <= members
    # Coalesced: each watcher got its first events one by one, then lists.
    assert frames < members * len(watchers) / 2, frames
    assert all(s.presence.snapshots >= 1 for s in (a, b))  # a list per instance, not per event
    for group in joined_clients:
        for client in group:
            await client.close()


@pytest.mark.redis
@ensure
async def test_a_join_during_a_rebuild_is_counted_once(make_server, redis):
    """A rebuild reads each room's users as it sends that room's script, on the
    connection the joins use: a join sent before the script is in it, one sent
    after applies after it. (Read once at the rebuild's start, the users joined
    while it waited for its first reply were taken out again.)"""
    server = make_server(redis_url=redis.url)
    await server.broker.when_connected().addTimeout(15, reactor)
    await server.presence.rebuild()
    first = [await watch(server.port, f"u{i}") for i in range(3)]
    tracker = server.presence
    rebuilt = tracker.rebuild()  # sends its first command and waits for the reply
    joined = tracker.entered("r", "late")  # a join handled meanwhile
    await gatherResults([rebuilt, joined])
    _, count = await tracker.online("r")
    assert count == len(first) + 1
    assert redis.command("HGET", "presence:{r}:users", "late") == "1"
    assert sorted(set(redis.command("HVALS", "presence:{r}:users"))) == ["1"]
    tracker.left("r", "late")


@pytest.mark.redis
@ensure
async def test_presence_degrades_while_redis_is_away_and_recovers_by_itself(make_server, redis):
    from test_operations import broker_event

    server = make_server(redis_url=redis.url, redis_keepalive=0.2, admin_api_key=KEY)
    await server.broker.when_connected().addTimeout(15, reactor)
    bob = await connect(server.port, "bob")
    await bob.join("r")
    carol, joined = await watch(server.port, "carol")
    assert joined["online_count"] == 2
    lost = broker_event(server, "lost")
    redis.kill()
    await lost.addTimeout(15, reactor)
    # Chat goes on; presence says it cannot answer, not something wrong.
    alice, joined = await watch(server.port, "alice")
    assert (joined["online"], joined["online_count"]) == (None, None)
    got = await alice.request({"type": "presence", "room": "r"})
    assert (got["type"], got["code"]) == ("error", "unavailable")
    status, body = await http_json(server.port, "GET", "/admin/rooms/r/presence", key=KEY)
    assert status == 503 and "unavailable" in body["error"]
    sent = await alice.request({"type": "send", "room": "r", "body": "still here"})
    assert sent["type"] == "ack"
    # Back: the instance writes its part again and its watchers get fresh lists.
    rebuilt = server.presence.when_rebuilt()
    redis.restart()
    await rebuilt.addTimeout(30, reactor)
    for client in (alice, carol):
        while "online_count" not in (got := await next_presence(client)):
            pass
        assert (got["online"], got["online_count"]) == (["alice", "bob", "carol"], 3)
