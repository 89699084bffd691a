"""Protocol 1.1, idempotent send: a (room, user, cid) is stored once, whoever repeats it.

A repeat is acked with the stored message's id and ts and ``duplicate: true``,
and nobody receives the message twice. Real stores (SQLite and Postgres), real
clients; two instances over a real Redis for sends that arrive at the same
moment.
"""

from __future__ import annotations

from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from wsclient import connect, in_room

ensure = pytest_twisted.ensureDeferred


def ack_fields(ack: dict[str, Any]) -> tuple[Any, ...]:
    return ack["type"], ack["id"], ack.get("cid"), ack.get("duplicate", False)


@ensure
async def test_a_repeated_cid_is_acked_with_the_first_id_and_delivered_once(
    make_server, database_url
):
    server = make_server(database_url=database_url)
    alice, bob = await in_room(server.port, "r", "alice", "bob")
    first = await alice.request({"type": "send", "room": "r", "body": "hi", "cid": "c-1"})
    assert ack_fields(first) == ("ack", 1, "c-1", False)
    got = await bob.expect("message")
    assert (got["id"], got["body"], got["cid"]) == (1, "hi", "c-1")
    # The retry (its body is not compared) gets the stored message's id and ts.
    again = await alice.request({"type": "send", "room": "r", "body": "hi?", "cid": "c-1"})
    assert ack_fields(again) == ("ack", 1, "c-1", True)
    assert again["ts"] == first["ts"]
    # The same cid from another user, or in another room, is another message.
    other = await bob.request({"type": "send", "room": "r", "body": "me too", "cid": "c-1"})
    assert ack_fields(other) == ("ack", 2, "c-1", False)
    await alice.join("s")
    elsewhere = await alice.request({"type": "send", "room": "s", "body": "x", "cid": "c-1"})
    assert ack_fields(elsewhere) == ("ack", 1, "c-1", False)
    # No gap, and bob saw message 1 once: the next thing he gets is message 2.
    assert (await bob.expect("message"))["id"] == 2
    assert await bob.drain_to_pong() == []
    page = await bob.request({"type": "history", "room": "r"})
    assert [(m["id"], m["body"], m.get("cid")) for m in page["messages"]] == [
        (1, "hi", "c-1"),
        (2, "me too", "c-1"),
    ]
    # A send without a cid is a version 1 send: no cid in its ack or message.
    plain = await bob.request({"type": "send", "room": "r", "body": "v1"})
    assert "cid" not in plain and "duplicate" not in plain
    copy = await bob.expect("message")
    assert copy["id"] == 3 and "cid" not in copy


@ensure
async def test_copies_in_one_batch_and_after_a_restart_are_stored_once(make_server, database_url):
    server = make_server(database_url=database_url)
    alice = await connect(server.port, "alice")
    await alice.join("r")
    # Pipelined: both copies are handled in one reactor turn, so one transaction.
    for ref in (1, 2):
        alice.send({"type": "send", "room": "r", "body": "once", "cid": "same", "ref": ref})
    frames = [await alice.recv() for _ in range(3)]
    acks = sorted((f for f in frames if f["type"] == "ack"), key=lambda f: f["ref"])
    assert [ack_fields(a) for a in acks] == [("ack", 1, "same", False), ("ack", 1, "same", True)]
    assert [f["id"] for f in frames if f["type"] == "message"] == [1]
    await server.stopService()

    again = make_server(database_url=database_url)
    alice = await connect(again.port, "alice")
    await alice.join("r")
    late = await alice.request({"type": "send", "room": "r", "body": "once", "cid": "same"})
    assert ack_fields(late) == ("ack", 1, "same", True)
    fresh = await alice.request({"type": "send", "room": "r", "body": "next", "cid": "new"})
    assert ack_fields(fresh) == ("ack", 2, "new", False)


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_the_same_cid_on_two_instances_at_once_is_stored_once(make_server, pg_url, redis):
    a, b = (
        make_server(database_url=pg_url, redis_url=redis.url, redis_keepalive=0.5) for _ in range(2)
    )
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    on_a = await connect(a.port, "alice")
    on_b = await connect(b.port, "alice")
    for c in (on_a, on_b):
        await c.join("r")
    rounds = 40
    for i in range(rounds):
        cid = f"round-{i}"
        frame = {"type": "send", "room": "r", "body": cid, "cid": cid}
        acks = await gatherResults(
            [Deferred.fromCoroutine(c.request(dict(frame))) for c in (on_a, on_b)]
        )
        assert acks[0]["id"] == acks[1]["id"], (i, acks)
        assert acks[0]["ts"] == acks[1]["ts"], (i, acks)
        assert sorted(a.get("duplicate", False) for a in acks) == [False, True], (i, acks)
    connection = psycopg2.connect(pg_url)
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT id, cid FROM messages WHERE room = 'r' ORDER BY id")
        rows = cursor.fetchall()
    finally:
        connection.close()
    assert rows == [(i + 1, f"round-{i}") for i in range(rounds)]


@ensure
async def test_a_batch_of_many_cids_with_a_repeat_is_looked_up_in_chunks(database_url):
    # 900 new cids and a repeat in one transaction: the repeat sends the batch down
    # the lookup path, whose queries take the cids a chunk at a time.
    from chatserver.config import Config
    from chatserver.store.open import open_store, prepare

    config = Config(database_url=database_url, store_batch_max=1000)
    prepare(config)
    store = open_store(config, reactor)
    first = await store.append("r", "u", "first", "c0")
    cids = [f"c{i}" for i in range(1, 901)]
    results = await gatherResults(
        [store.append(f"r{i % 450}", "u", "m", cid) for i, cid in enumerate(cids)]
        + [store.append("r", "u", "again", "c0")]
    )
    await store.close()
    assert store.batches == 2  # the first message, then everything else together
    *fresh, repeat = results
    assert not any(m.duplicate for m in fresh)
    assert sorted((m.room, m.id) for m in fresh) == sorted(
        (f"r{r}", n) for r in range(450) for n in (1, 2)
    )
    assert (repeat.id, repeat.ts, repeat.duplicate) == (first.id, first.ts, True)


def _terminate(connection: Any, url: str) -> None:
    """Cut ``connection`` from the server's side, as a network failure would."""
    killer = psycopg2.connect(url)
    killer.autocommit = True
    killer.cursor().execute("SELECT pg_terminate_backend(%s)", (connection.get_backend_pid(),))
    killer.close()


@pytest.mark.parametrize("committed", [True, False], ids=["reply-lost", "commit-lost"])
@ensure
async def test_a_send_cut_off_at_commit_is_retried_with_its_cid_and_stored_once(
    make_server, pg_url, monkeypatch, committed
):
    """The connection breaks during COMMIT: whether the message was stored cannot be
    known, so the client gets ``unavailable``. Sent again with the same cid, it is
    stored exactly once either way: acked as the duplicate it is if the first
    COMMIT went through, stored now if it did not."""
    from chatserver.store import postgres as pg

    real = pg.PostgresDialect.store_batch
    cuts: list[int] = []

    def cut_once(self, cursor, entries, ts):
        result = real(self, cursor, entries, ts)
        if not cuts:
            cuts.append(len(entries))
            if committed:
                # The COMMIT went through and its reply is lost: the batch is
                # committed here, and the COMMIT that follows meets a dead connection.
                cursor.connection.commit()
                cursor.execute("SELECT 1")
            _terminate(cursor.connection, pg_url)
        return result

    monkeypatch.setattr(pg.PostgresDialect, "store_batch", cut_once)
    server = make_server(database_url=pg_url, db_pool_size=1)
    alice = await connect(server.port, "alice")
    await alice.join("r")
    frame = {"type": "send", "room": "r", "body": "once", "cid": "k1"}
    first = await alice.request(dict(frame))
    assert (first["type"], first["code"]) == ("error", "unavailable")
    assert cuts == [1]
    again = await alice.request(dict(frame))
    assert (again["type"], again["id"], again.get("duplicate", False)) == ("ack", 1, committed)
    connection = psycopg2.connect(pg_url)
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT id, body, cid FROM messages WHERE room = 'r'")
        assert cursor.fetchall() == [(1, "once", "k1")]
    finally:
        connection.close()
    # The sequence goes on from there, with no gap.
    nxt = await alice.request({"type": "send", "room": "r", "body": "next", "cid": "k2"})
    assert nxt["id"] == 2
