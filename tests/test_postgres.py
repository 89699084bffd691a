"""The Postgres store against a real throwaway PostgreSQL: bounded connections,
gap-free ids in commit order, resume with history, outages."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted
from conftest import fresh_database
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import Clock
from wsclient import connect

from chatserver.config import Config
from chatserver.service import ChatServerService
from chatserver.store import SchemaError, StoreUnavailable
from chatserver.store import postgres as pg
from chatserver.store.open import open_store

ensure = pytest_twisted.ensureDeferred
pytestmark = pytest.mark.postgres


class Sampler:
    """Polls a query from a thread until stopped; keeps every result."""

    def __init__(self, url: str, sql: str, args: tuple = ()) -> None:
        self.url, self.sql, self.args = url, sql, args
        self.results: list[tuple] = []
        self._stop = threading.Event()
        self.done: Deferred | None = None

    def _run(self) -> None:
        conn = psycopg2.connect(self.url, application_name="sampler")
        conn.autocommit = True
        cur = conn.cursor()
        try:
            while not self._stop.is_set():
                cur.execute(self.sql, self.args)
                self.results.append(cur.fetchone())
        finally:
            conn.close()

    def start(self) -> Sampler:
        self.done = threads.deferToThread(self._run)
        return self

    async def stop(self) -> list[tuple]:
        self._stop.set()
        await self.done
        return self.results


def db_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def assert_gap_free(ids: list[int]) -> None:
    assert ids == list(range(ids[0], ids[0] + len(ids))), ids


async def read_all_history(client, room: str) -> list[dict]:
    out, after = [], 0
    while True:
        page = await client.request({"type": "history", "room": room, "after": after, "limit": 100})
        out += page["messages"]
        if not page["more"]:
            return out
        after = out[-1]["id"]


# -- schema -------------------------------------------------------------------


def test_server_refuses_an_unmigrated_or_newer_schema(postgres):
    url = postgres.create_database("unmigrated")
    config = Config(listen=("tcp:0:interface=127.0.0.1",), database_url=url)
    with pytest.raises(SchemaError, match="chatserver-admin migrate"):
        ChatServerService(config, reactor)
    admin = Path(sys.executable).parent / "chatserver-admin"
    done = subprocess.run(
        [str(admin), "migrate", "--database-url", url], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "applied migrations: [1, 2, 3, 4, 5, 6]" in done.stdout
    again = subprocess.run(
        [str(admin), "migrate", "--database-url", url], capture_output=True, text=True
    )
    assert "up to date" in again.stdout
    postgres.query("INSERT INTO schema_version VALUES (99)", database="unmigrated")
    with pytest.raises(SchemaError, match="upgrade chatserver"):
        ChatServerService(config, reactor)


# -- bounded connections -------------------------------------------------------


@ensure
async def test_pool_of_3_never_opens_more_than_3_connections_for_500_senders(make_server, postgres):
    url = fresh_database(postgres)
    server = make_server(database_url=url, db_pool_size=3)
    clients = []
    for chunk in range(0, 500, 50):
        clients += await gatherResults(
            [
                Deferred.fromCoroutine(connect(server.port, f"u{i}"))
                for i in range(chunk, chunk + 50)
            ]
        )
    await gatherResults(
        [Deferred.fromCoroutine(c.join(f"room{i % 10}")) for i, c in enumerate(clients)]
    )
    sampler = Sampler(
        postgres.url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        (db_name(url), "chatserver"),
    ).start()
    acks = await gatherResults(
        [
            Deferred.fromCoroutine(
                c.request({"type": "send", "room": f"room{i % 10}", "body": "x"})
            )
            for i, c in enumerate(clients)
        ]
    )
    counts = [r[0] for r in await sampler.stop()]
    assert all(a["type"] == "ack" for a in acks)
    assert max(counts) <= 3, max(counts)
    assert max(counts) >= 1  # the sampler really saw the server
    # Group commit: far fewer transactions than messages.
    assert server.store.batches < 500
    await gatherResults([Deferred.fromCoroutine(c.close()) for c in clients])


# -- ids ----------------------------------------------------------------------


@ensure
async def test_many_senders_one_room_every_receiver_sees_gap_free_ids(make_server, pg_url):
    server = make_server(database_url=pg_url, db_pool_size=4)
    senders = [await connect(server.port, f"s{i}") for i in range(20)]
    watchers = [await connect(server.port, f"w{i}") for i in range(5)]
    for c in senders + watchers:
        await c.join("hot")
    per_sender = 25
    total = len(senders) * per_sender

    async def send_all(c, n):
        for j in range(per_sender):
            c.send({"type": "send", "room": "hot", "body": f"{n}:{j}", "ref": j})

    for n, c in enumerate(senders):
        await send_all(c, n)

    async def collect(c):
        got = []
        while len(got) < total:
            f = await c.recv()
            if f["type"] == "message":
                got.append(f)
            else:
                assert f["type"] == "ack", f
        return got

    received = await gatherResults([Deferred.fromCoroutine(collect(c)) for c in senders + watchers])
    first = received[0]
    for got in received:
        assert [m["id"] for m in got] == list(range(1, total + 1))
        assert got == first
    history = await read_all_history(watchers[0], "hot")
    assert [{k: m[k] for k in ("id", "user", "body", "ts")} for m in first] == [
        {k: m[k] for k in ("id", "user", "body", "ts")} for m in history
    ]
    # Each sender's own messages keep its order.
    for n in range(len(senders)):
        mine = [m["body"] for m in first if m["user"] == f"s{n}"]
        assert mine == [f"{n}:{j}" for j in range(per_sender)]


@ensure
async def test_two_stores_on_one_room_commit_ids_in_order(pg_url):
    """Two pools, as two server processes have: at every instant the committed ids are 1..max."""
    config = Config(database_url=pg_url, db_pool_size=2, store_batch_max=7)
    stores = [open_store(config, reactor), open_store(config, reactor)]
    sampler = Sampler(
        pg_url, "SELECT count(*), coalesce(max(id), 0) FROM messages WHERE room = %s", ("shared",)
    ).start()
    n = 600
    results = await gatherResults(
        [stores[i % 2].append("shared", f"w{i % 2}", f"m{i}") for i in range(n)]
    )
    snapshots = await sampler.stop()
    assert sorted(m.id for m in results) == list(range(1, n + 1))
    assert len(snapshots) > 10
    for count, top in snapshots:
        assert count == top, "a later id was visible before an earlier one committed"
    # Within one store, the order of appends is the order of ids.
    for w in (0, 1):
        ids = [m.id for m in results if m.user == f"w{w}"]
        assert ids == sorted(ids)
    for s in stores:
        await s.close()


@ensure
async def test_reconnecting_client_gets_exactly_what_it_missed(make_server, pg_url):
    server = make_server(database_url=pg_url)
    a = await connect(server.port, "alice")
    b = await connect(server.port, "bob")
    await a.join("r")
    await b.join("r")
    await a.request({"type": "send", "room": "r", "body": "seen"})
    last_seen = (await b.expect("message"))["id"]
    await b.close()
    missed = []
    for i in range(130):
        missed.append((await a.request({"type": "send", "room": "r", "body": f"missed {i}"}))["id"])
    b = await connect(server.port, "bob")
    await b.join("r")
    got, after = [], last_seen
    while True:
        page = await b.request({"type": "history", "room": "r", "after": after, "limit": 50})
        got += [m["id"] for m in page["messages"]]
        if not page["more"]:
            break
        after = got[-1]
    assert got == missed


# -- outages ------------------------------------------------------------------


class Chatter:
    """Sends one message after another, recording acks and errors, until stopped."""

    def __init__(self, client, room: str) -> None:
        self.client, self.room = client, room
        self.acked: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.running = True
        self._watch: list[tuple[callable, Deferred]] = []

    def when(self, predicate) -> Deferred:
        d: Deferred = Deferred()
        self._watch.append((predicate, d))
        self._check()
        return d.addTimeout(60, reactor)

    def _check(self) -> None:
        for item in list(self._watch):
            if item[0](self):
                self._watch.remove(item)
                item[1].callback(None)

    async def run(self) -> None:
        i = 0
        while self.running:
            body = f"n{i}"
            i += 1
            got = await self.client.request({"type": "send", "room": self.room, "body": body})
            if got["type"] == "ack":
                self.acked.append((got["id"], body))
            else:
                assert got["code"] == "unavailable", got
                self.errors.append(got["message"])
            self._check()


@ensure
async def test_postgres_restart_mid_run_errors_then_recovers_and_loses_nothing(
    make_server, own_postgres
):
    url = fresh_database(own_postgres)
    server = make_server(database_url=url, db_pool_size=2)
    a = await connect(server.port, "alice")
    await a.join("r")
    chatter = Chatter(a, "r")
    running = Deferred.fromCoroutine(chatter.run())
    await chatter.when(lambda c: len(c.acked) >= 20)
    await threads.deferToThread(own_postgres.stop)
    await chatter.when(lambda c: len(c.errors) >= 3)
    acked_before = len(chatter.acked)
    await threads.deferToThread(own_postgres.restart)
    await chatter.when(lambda c: len(c.acked) >= acked_before + 20)
    chatter.running = False
    await running

    # Every ack is in the store, once, under the id it was acked with.
    stored = await read_all_history(a, "r")
    by_id = {m["id"]: m["body"] for m in stored}
    for mid, body in chatter.acked:
        assert by_id[mid] == body
    assert [m["id"] for m in stored] == list(range(1, len(stored) + 1))
    # No leak: the pool has no more than its fixed number of connections.
    count = own_postgres.query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatserver'"
    )[0][0]
    assert count <= 2


@ensure
async def test_store_queue_bound_fails_fast_with_unavailable(pg_url):
    config = Config(database_url=pg_url, db_pool_size=1, store_queue_max=2)
    store = open_store(config, reactor)
    ds = [store.append("q", "u", f"m{i}") for i in range(5)]
    # Appends wait for the end of their reactor turn to start a transaction: two
    # wait, the rest are refused at once.
    results = await DeferredList(ds, consumeErrors=True)
    outcomes = [ok for ok, _ in results]
    assert outcomes == [True, True, False, False, False]
    assert all(r.check(StoreUnavailable) for ok, r in results if not ok)
    await store.close()


@ensure
async def test_two_stores_many_rooms_ids_gap_free_per_room(pg_url):
    """Batches spanning many rooms reserve every room's ids in one statement, in one order."""
    config = Config(database_url=pg_url, db_pool_size=3, store_writers=3, store_batch_max=50)
    stores = [open_store(config, reactor), open_store(config, reactor)]
    rooms = [f"r{i}" for i in range(25)]
    n = 2000
    results = await gatherResults(
        [stores[i % 2].append(rooms[(i * 7) % 25], f"w{i % 2}", f"m{i}") for i in range(n)]
    )
    by_room: dict[str, list[int]] = {}
    for m in results:
        by_room.setdefault(m.room, []).append(m.id)
    assert sorted(by_room) == sorted(rooms)
    for ids in by_room.values():
        assert sorted(ids) == list(range(1, len(ids) + 1))
    assert any(s.batches < n / 2 for s in stores), "nothing was batched"
    for s in stores:
        await s.close()


# Small batches are stored by one statement (text arrays), large ones by COPY
# (its text format): each path is forced in turn.
BOTH_WRITE_PATHS = pytest.mark.parametrize(
    "one_statement_max", [1000, 0], ids=["one-statement", "copy"]
)


@BOTH_WRITE_PATHS
@ensure
async def test_bodies_with_tabs_newlines_and_backslashes_round_trip(
    pg_url, monkeypatch, one_statement_max
):
    """Array literals and COPY's text format both have special characters that must survive."""
    monkeypatch.setattr(pg, "ONE_STATEMENT_MAX", one_statement_max)
    store = open_store(Config(database_url=pg_url, db_pool_size=1), reactor)
    bodies = ["a\tb", "line1\nline2\r\n", "back\\slash \\N \\.", "\\", "emoji \U0001f600 é", ""]
    bodies += ['"quoted"', "{braces}, commas", "NULL", "it's", '} ,{\\"']
    users = ["tab\tuser", "back\\slash", "NULL", '{"u"}']
    stored = await gatherResults(
        [store.append("r\t1", users[i % 4], b) for i, b in enumerate(bodies)]
    )
    page, more = await store.history("r\t1", None, 0, 100)
    assert [(m.id, m.user, m.body) for m in page] == [(m.id, m.user, m.body) for m in stored]
    assert [m.body for m in page] == bodies and not more
    await store.close()


@ensure
async def test_bans_of_many_users_in_one_read(pg_url):
    """What an instance re-reads after a broker outage: every ban of its local users."""
    store = open_store(Config(database_url=pg_url, db_pool_size=1), reactor)
    await store.set_ban("r", "u3", True)
    await store.set_ban("", "u700", True)  # everywhere
    await store.set_ban("r", "not-local", True)
    users = [f"u{i}" for i in range(1200)]  # more than one chunk of the IN list
    assert sorted(await store.bans_of(users)) == [("", "u700"), ("r", "u3")]
    assert await store.bans_of([]) == []
    await store.close()


@ensure
async def test_reads_do_not_queue_behind_writes(pg_url):
    """One writer in a pool of two: history answers while every write waits on a lock."""
    store = open_store(Config(database_url=pg_url, db_pool_size=2, store_writers=1), reactor)
    await gatherResults([store.append("a", "u", "first"), store.append("b", "u", "first")])
    locker = psycopg2.connect(pg_url)
    locker.cursor().execute("SELECT 1 FROM rooms WHERE name IN ('a', 'b') FOR UPDATE")
    try:
        writes = [store.append("a", "u", "second"), store.append("b", "u", "second")]
        # With both connections writing, this read would wait for the lock too.
        page, _ = await store.history("a", None, 0, 10).addTimeout(10, reactor)
        assert [m.body for m in page] == ["first"]
        assert not any(w.called for w in writes)
    finally:
        locker.rollback()
        locker.close()
    stored = await gatherResults(writes)
    assert [(m.room, m.id) for m in stored] == [("a", 2), ("b", 2)]
    await store.close()


@ensure
async def test_store_gather_holds_the_next_transaction_on_postgres(pg_url):
    """The setting reaches the store: what comes inside the gather goes in one
    transaction, once it has passed (the store's clock is a fake one)."""
    clock = Clock()
    store = open_store(Config(database_url=pg_url, db_pool_size=1, store_gather=0.5), clock)
    first = store.append("g", "u", "one")
    clock.advance(0)  # nothing started lately: at once
    assert (await first).id == 1 and store.batches == 1
    later = [store.append("g", "u", "two"), store.append("h", "u", "three")]
    clock.advance(0.25)
    assert store.queue_depth() == 2 and store.batches == 1  # gathering
    clock.advance(0.25)
    stored = await gatherResults(later)
    assert [(m.room, m.id) for m in stored] == [("g", 2), ("h", 1)]
    assert store.batches == 2  # both in one transaction
    await store.close()


def database_now(url: str):
    """The database server's clock, now."""
    conn = psycopg2.connect(url)
    try:
        cur = conn.cursor()
        cur.execute("SELECT clock_timestamp()")
        return cur.fetchone()[0]
    finally:
        conn.close()


def store_backends(url: str, since) -> set[int]:
    """The server processes behind a store's connections to ``url``'s database: those
    with the store's application_name, connected after ``since`` (``database_now``)."""
    conn = psycopg2.connect(url)  # our own application_name is empty: not counted
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'chatserver' AND backend_start > %s",
            (since,),
        )
        return {pid for (pid,) in cur.fetchall()}
    finally:
        conn.close()


@BOTH_WRITE_PATHS
@ensure
async def test_a_batch_the_database_refuses_takes_no_ids(pg_url, monkeypatch, one_statement_max):
    """A refused batch rolls back its id reservation too: the next message gets the next id."""
    monkeypatch.setattr(pg, "ONE_STATEMENT_MAX", one_statement_max)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    admin.cursor().execute("ALTER TABLE messages ADD CONSTRAINT no_boom CHECK (body <> 'boom')")
    admin.close()
    since = database_now(pg_url)  # older connections (the migration's) are not the store's
    store = open_store(Config(database_url=pg_url, db_pool_size=1), reactor)
    first = await store.append("r", "u", "one")
    backends = store_backends(pg_url, since)
    assert len(backends) == 1, backends  # a pool of one
    with pytest.raises(StoreUnavailable):
        await store.append("r", "u", "boom")
    after = await gatherResults([store.append("r", "u", f"m{i}") for i in range(3)])
    # The failed transaction was ended on its own connection, not by replacing it.
    assert store_backends(pg_url, since) == backends
    assert [first.id, *(m.id for m in after)] == [1, 2, 3, 4]
    assert store.failed == 1
    page, _ = await store.history("r", None, 0, 100)
    assert [m.body for m in page] == ["one", "m0", "m1", "m2"]
    await store.close()


class _CommitCutter:
    """A cursor whose connection is cut by the server just before COMMIT goes out."""

    def __init__(self, cursor, url: str) -> None:
        self._cursor, self._url = cursor, url
        self.statements = 0

    def execute(self, sql, args=None):
        if sql == "COMMIT":
            pid = self._cursor.connection.get_backend_pid()
            killer = psycopg2.connect(self._url)
            killer.autocommit = True
            killer.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
            killer.close()
        else:
            self.statements += 1
        return self._cursor.execute(sql, args)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


@ensure
async def test_a_connection_lost_at_commit_fails_the_batch_and_is_not_retried(pg_url, monkeypatch):
    """Whether a batch whose COMMIT was cut off is stored cannot be known: retrying
    could store it twice, so the senders get an error and nothing is retried."""
    monkeypatch.setattr(pg, "ONE_STATEMENT_MAX", 1000)
    cutters: list[_CommitCutter] = []
    real = pg.PostgresDialect.store_batch

    calls = []

    def cut_once(self, cursor, entries, ts):
        calls.append(entries)
        if cutters:
            return real(self, cursor, entries, ts)
        cutters.append(_CommitCutter(cursor, pg_url))
        return real(self, cutters[0], entries, ts)

    monkeypatch.setattr(pg.PostgresDialect, "store_batch", cut_once)
    store = open_store(Config(database_url=pg_url, db_pool_size=1), reactor)
    with pytest.raises(StoreUnavailable):
        await store.append("r", "u", "cut")
    assert len(calls) == 1 and cutters[0].statements == 1, "the batch was sent again"
    assert store.failed == 1
    # The pool replaces the connection; the message never committed, so no gap.
    stored = await store.append("r", "u", "next")
    assert stored.id == 1
    await store.close()
