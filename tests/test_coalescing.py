"""A committed batch leaves in one write per connection, in order, acks first.

The batch is made real: a lock held on the room's row in Postgres stops the
first transaction, the sends behind it queue, and all of them commit together
once the lock goes.
"""

from __future__ import annotations

import psycopg2
import pytest
import pytest_twisted
from wsclient import connect, http_get

from chatserver import wire
from chatserver.chat import CLOSE_BANNED
from chatserver.store import EVERYWHERE

ensure = pytest_twisted.ensureDeferred


@pytest.mark.postgres
@ensure
async def test_a_batch_reaches_each_connection_in_one_write_in_order(make_server, pg_url):
    server = make_server(database_url=pg_url)
    sender = await connect(server.port, "sender")
    members = [await connect(server.port, f"m{i}") for i in range(2)]
    for c in (sender, *members):
        await c.join("room")
    first = await sender.request({"type": "send", "room": "room", "body": "m0"})
    assert first["type"] == "ack" and first["id"] == 1
    await sender.expect("message")
    for m in members:
        assert (await m.expect("message"))["id"] == 1

    locker = psycopg2.connect(pg_url)
    try:
        locker.cursor().execute("SELECT 1 FROM rooms WHERE name = 'room' FOR UPDATE")
        n = 20
        # The first send's transaction starts (at the end of its reactor turn) and
        # waits on the lock; frames are handled in order, so once the pong is back
        # it is in flight, and once the second pong is back the other n - 1 sends
        # are queued behind it (nothing is acked yet).
        sender.send({"type": "send", "room": "room", "body": "m1", "ref": 1})
        assert await sender.drain_to_pong() == []
        for i in range(2, n + 1):
            sender.send({"type": "send", "room": "room", "body": f"m{i}", "ref": i})
        assert await sender.drain_to_pong() == []
        before = server.coalesced_frames
    finally:
        locker.rollback()
        locker.close()

    got = [await sender.recv() for _ in range(2 * n)]
    # The first queued send went alone; the other n - 1 formed one batch, whose
    # acks went out together before its messages (each ack before its message).
    assert [(f["type"], f.get("ref"), f.get("id")) for f in got] == [
        ("ack", 1, 2),
        ("message", None, 2),
        *[("ack", i, i + 1) for i in range(2, n + 1)],
        *[("message", None, i + 1) for i in range(2, n + 1)],
    ]
    for m in members:
        assert [(await m.recv())["id"] for _ in range(n)] == list(range(2, n + 2))
    # The first send's ack and message left the sender in one write (2 frames); the
    # batch's n - 1 acks with its n - 1 messages to the sender in one write, and its
    # n - 1 messages to each of the two others in one write each.
    assert server.coalesced_frames - before == 2 + (n - 1) * (1 + 3)
    code, body = await http_get(server.port, "/metrics")
    assert code == 200
    assert f"chatserver_frames_coalesced_total {float(server.coalesced_frames)}" in body.decode()
    for c in (sender, *members):
        await c.close()


@ensure
async def test_frames_held_for_a_connection_go_out_before_its_close(make_server):
    server = make_server()
    client = await connect(server.port, "alice")
    await client.join("room")
    (session,) = server.chat.users["alice"]
    with server.delivery.batch():
        server.delivery.to_connection(
            session.transport, wire.text_frame(wire.reply("pong", "held"))
        )
        server.chat.kick(EVERYWHERE, "alice", "banned")  # closes the connection
    assert await client.recv() == {"type": "pong", "ref": "held"}
    assert await client.wait_closed() == CLOSE_BANNED


@ensure
async def test_a_page_read_to_fill_a_gap_leaves_in_one_write(make_server):
    server = make_server()
    members = [await connect(server.port, f"m{i}") for i in range(2)]
    for m in members:
        await m.join("room")
    # Stored behind the registry's back: only a read from the store brings them.
    n = 5
    for i in range(n):
        await server.store.append("room", "ghost", f"b{i}")
    before = server.coalesced_frames
    server.registry.resync()
    for m in members:
        got = [await m.expect("message") for _ in range(n)]
        assert [(f["id"], f["body"]) for f in got] == [(i + 1, f"b{i}") for i in range(n)]
    assert server.coalesced_frames - before == n * len(members)
    for m in members:
        await m.close()
