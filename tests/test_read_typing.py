"""Protocol 1.1, read markers and typing: real stores, real clients, and two
instances over a real Redis for what must cross between them."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from wsclient import connect, in_room

ensure = pytest_twisted.ensureDeferred


def read_state(joined: dict[str, Any]) -> tuple[Any, Any]:
    return joined["last_read"], joined["unread"]


async def error_code(client: Any, frame: dict[str, Any]) -> str:
    got = await client.request(frame)
    assert got["type"] == "error", got
    return got["code"]


@ensure
async def test_unread_counts_others_messages_after_the_marker_and_nothing_else(
    make_server, database_url
):
    server = make_server(database_url=database_url)
    alice, bob = await in_room(server.port, "r", "alice", "bob")
    for i in range(4):
        await bob.request({"type": "send", "room": "r", "body": f"b{i}"})  # 1-4
    await alice.request({"type": "send", "room": "r", "body": "mine"})  # 5
    await bob.request({"type": "edit", "room": "r", "id": 1, "body": "b0!"})  # 6
    await bob.request({"type": "delete", "room": "r", "id": 2})  # 7
    await bob.request({"type": "send", "room": "r", "body": "b4"})  # 8

    # Never read: bob's messages 1, 3, 4, 8 (2 is deleted; 5 is hers; 6, 7 are events).
    again = await connect(server.port, "alice")
    assert read_state(await again.join("r")) == (None, 4)
    assert read_state(await bob.join("other")) == (None, 0)

    answer = await alice.request({"type": "read", "room": "r", "id": 3})
    assert (answer["type"], answer["room"], answer["id"]) == ("read", "r", 3)
    # Her other connection hears of it (without the ref); bob does not.
    synced = await again.recv()
    assert synced == {"type": "read", "room": "r", "id": 3}
    assert [f for f in await bob.drain_to_pong() if f["type"] == "read"] == []

    third = await connect(server.port, "alice")
    assert read_state(await third.join("r")) == (3, 2)  # 4 and 8
    # A marker only moves forward: an older one is answered with the stored one,
    # to the sender alone.
    older = await alice.request({"type": "read", "room": "r", "id": 1})
    assert (older["type"], older["id"]) == ("read", 3)
    assert [f for f in await again.drain_to_pong() if f["type"] == "read"] == []
    # An event's id is a fine marker; one past the last id is a mistake.
    assert (await alice.request({"type": "read", "room": "r", "id": 8}))["id"] == 8
    assert await error_code(alice, {"type": "read", "room": "r", "id": 9}) == "bad_request"
    for bad in (0, -1, "3", None, 1.5):
        assert await error_code(alice, {"type": "read", "room": "r", "id": bad}) == "bad_request"
    assert await error_code(alice, {"type": "read", "room": "x", "id": 1}) == "not_member"
    fourth = await connect(server.port, "alice")
    assert read_state(await fourth.join("r")) == (8, 0)
    # A join of a room joined already answers the read state too.
    assert read_state(await fourth.join("r")) == (8, 0)


@ensure
async def test_unread_stops_at_unread_max(make_server):
    server = make_server(unread_max=3)
    bob = await connect(server.port, "bob")
    await bob.join("r")
    for i in range(3):
        await bob.request({"type": "send", "room": "r", "body": f"b{i}"})
    alice = await connect(server.port, "alice")
    assert read_state(await alice.join("r")) == (None, 3)  # at the edge: exact
    await bob.request({"type": "send", "room": "r", "body": "one more"})
    late = await connect(server.port, "alice")
    assert read_state(await late.join("r")) == (None, 3)  # past it: the cap


@ensure
async def test_typing_reaches_the_others_once_per_interval_and_is_never_stored(make_server):
    server = make_server(typing_interval=3600)
    alice = await connect(server.port, "alice")
    bob = await connect(server.port, "bob")
    bob_too = await connect(server.port, "bob")
    for c in (alice, bob, bob_too):
        await c.join("r")
    bob.send({"type": "typing", "room": "r"})
    assert await alice.recv() == {"type": "typing", "room": "r", "user": "bob"}
    # Not to bob's own connections; the extras within the interval are dropped silently.
    bob.send({"type": "typing", "room": "r"})
    bob_too.send({"type": "typing", "room": "r"})
    assert await bob.drain_to_pong() == []
    assert await bob_too.drain_to_pong() == []
    assert await alice.drain_to_pong() == []
    # Per user and room: alice's own typing, or bob's in another room, are relayed.
    alice.send({"type": "typing", "room": "r"})
    assert await bob.recv() == {"type": "typing", "room": "r", "user": "alice"}
    assert await error_code(bob, {"type": "typing", "room": "x"}) == "not_member"
    page = await alice.request({"type": "history", "room": "r"})
    assert page["messages"] == []
    assert server.chat.typing_relayed == 2 and server.chat.typing_dropped == 2


@ensure
async def test_with_no_interval_every_typing_frame_is_relayed_and_costs_a_rate_token(
    make_server,
):
    server = make_server(typing_interval=0, rate_limit=0.01, rate_burst=4)
    alice = await connect(server.port, "alice")
    bob = await connect(server.port, "bob")
    await alice.join("r")
    await bob.join("r")  # bob's token 1
    for _ in range(3):  # tokens 2-4
        bob.send({"type": "typing", "room": "r"})
        assert (await alice.recv())["type"] == "typing"
    bob.send({"type": "typing", "room": "r", "ref": "over"})
    limited = await bob.recv()
    assert (limited["type"], limited["code"], limited["ref"]) == ("error", "rate_limited", "over")


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_read_markers_and_typing_cross_instances(make_server, pg_url, redis):
    a, b = (make_server(database_url=pg_url, redis_url=redis.url) for _ in range(2))
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    alice_a = await connect(a.port, "alice")
    alice_b = await connect(b.port, "alice")
    bob_b = await connect(b.port, "bob")
    for c in (alice_a, alice_b, bob_b):
        await c.join("r")
    await bob_b.request({"type": "send", "room": "r", "body": "hi"})
    await bob_b.request({"type": "send", "room": "r", "body": "there"})
    answer = await alice_a.request({"type": "read", "room": "r", "id": 2})
    assert answer["id"] == 2
    while (got := await alice_b.recv())["type"] != "read":
        assert got["type"] == "message"
    assert got == {"type": "read", "room": "r", "id": 2}
    alice_a.send({"type": "typing", "room": "r"})
    while (got := await bob_b.recv())["type"] != "typing":
        assert got["type"] == "message"  # his own, before
    assert got == {"type": "typing", "room": "r", "user": "alice"}
    # Not to alice's own connection on the other instance.
    assert [f for f in await alice_b.drain_to_pong() if f["type"] == "typing"] == []
    late = await connect(b.port, "alice")
    assert read_state(await late.join("r")) == (2, 0)


@ensure
async def test_changes_reads_and_typing_show_in_the_metrics(make_server):
    from test_operations import metrics

    server = make_server(typing_interval=3600)
    before = await metrics(server.port)
    alice, bob = await in_room(server.port, "r", "alice", "bob")
    await alice.request({"type": "send", "room": "r", "body": "x"})
    await alice.request({"type": "edit", "room": "r", "id": 1, "body": "y"})
    await alice.request({"type": "delete", "room": "r", "id": 1})
    assert await error_code(alice, {"type": "delete", "room": "r", "id": 1}) == "not_found"
    await bob.request({"type": "read", "room": "r", "id": 3})
    await bob.request({"type": "read", "room": "r", "id": 2})  # not forward: not counted
    for _ in range(3):
        bob.send({"type": "typing", "room": "r"})
    await bob.drain_to_pong()
    after = await metrics(server.port)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("chatserver_edits_received_total") == 1
    assert moved("chatserver_deletes_received_total") == 2
    assert moved("chatserver_messages_stored_total") == 3
    assert moved("chatserver_errors_total", code="not_found") == 1
    assert moved("chatserver_read_markers_total") == 1
    assert moved("chatserver_typing_relayed_total") == 1
    assert moved("chatserver_typing_dropped_total") == 2
