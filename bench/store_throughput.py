"""Store write throughput: how many messages per second ``SQLStore.append`` commits.

For each configuration (Postgres with 1, 2 and 4 connections, SQLite for
reference; each with group commit and with one row per transaction) the script
opens a store on an empty, migrated database, keeps a window of appends
outstanding (topping it up as acks arrive, so the store's queue never
overflows), and measures the wall time until the last append is acknowledged,
that is committed. It prints a markdown table and a line describing the machine.

    python bench/store_throughput.py [--database-url URL] [--messages N] [--rooms R]

Without ``--database-url`` a throwaway PostgreSQL cluster is started with
``fsync=on`` and ``synchronous_commit=on`` (the test clusters run with fsync off)
and removed at the end. With ``--database-url`` the database is migrated and
its ``messages`` and ``rooms`` tables are emptied between runs and at the end:
point it at a scratch database. The script refuses one that already holds
messages.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react
from twisted.python.failure import Failure

from chatserver.config import Config
from chatserver.store import StoredMessage
from chatserver.store import postgres as pg_store
from chatserver.store import sqlite as sqlite_store
from chatserver.store.open import open_store, prepare
from chatserver.store.sql import SQLStore

REPO = Path(__file__).resolve().parent.parent

BATCH_MAX = 500  # store_batch_max of the batched runs (the server's default)
QUEUE_MAX = 1_000_000  # far above the window: appends must never be rejected
POOL_SIZES = (1, 2, 4)
BODY_CHARS = 100
USERS = 50


@dataclass(frozen=True)
class Setup:
    """One configuration to measure."""

    store: str  # "postgres" or "sqlite"
    pool: int
    batch_max: int
    messages: int


@dataclass(frozen=True)
class Result:
    setup: Setup
    stored: int
    seconds: float
    transactions: int
    capped: bool  # the time cap stopped it before all messages were sent

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0


def body(i: int) -> str:
    head = f"message {i:08d} "
    return head + "x" * (BODY_CHARS - len(head))


class Driver:
    """Keeps ``window`` appends outstanding until ``total`` are acked (or time runs out)."""

    def __init__(
        self,
        store: SQLStore,
        rooms: list[str],
        total: int,
        window: int,
        max_seconds: float,
        cids: bool = False,
    ) -> None:
        self.store = store
        self.cids = cids  # every append carries a cid of its own, as protocol 1.1 clients send
        self.rooms = rooms
        self.total = total
        self.window = window
        self.stop_at = time.perf_counter() + max_seconds
        self.issued = 0
        self.acked = 0
        self.failed = 0
        self.capped = False
        self.first_error: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._top_up()
        return self.done

    def _top_up(self) -> None:
        # Appends only ever fail synchronously, and a failure stops topping up,
        # so this never recurses.
        while (
            not self.capped
            and self.failed == 0
            and self.issued < self.total
            and self.issued - self.acked < self.window
        ):
            if time.perf_counter() >= self.stop_at:
                self.capped = True
                break
            i = self.issued
            self.issued += 1
            cid = f"c{i}" if self.cids else None
            d = self.store.append(self.rooms[i % len(self.rooms)], f"user{i % USERS}", body(i), cid)
            d.addCallbacks(self._acked, self._failed)
        self._check_done()

    def _acked(self, _: StoredMessage) -> None:
        self.acked += 1
        self._top_up()

    def _failed(self, failure: Failure) -> None:
        self.failed += 1
        if self.first_error is None:
            self.first_error = failure
        self._check_done()

    def _check_done(self) -> None:
        if self.acked + self.failed == self.issued and not self.done.called:
            if self.issued == self.total or self.capped or self.failed:
                self.done.callback(None)


def database_url_for(setup: Setup, postgres_url: str, scratch: Path) -> str:
    if setup.store == "postgres":
        return postgres_url
    name = f"{setup.pool}-{setup.batch_max}.sqlite3"
    return f"sqlite:///{scratch / name}"


def blocking_connection(config: Config) -> Any:
    if config.is_sqlite:
        return sqlite_store.connect(config.database_url)
    return pg_store.connect(config.database_url)


def query(config: Config, sql: str) -> list[tuple[Any, ...]]:
    connection = blocking_connection(config)
    try:
        cursor = connection.cursor()
        cursor.execute(sql)
        rows = list(cursor.fetchall()) if cursor.description is not None else []
        connection.commit()
        return rows
    finally:
        connection.close()


def empty_tables(config: Config) -> None:
    query(config, "TRUNCATE messages, rooms")


async def measure(
    reactor: IReactorTime, setup: Setup, config: Config, args: argparse.Namespace
) -> Result:
    rooms = [f"room-{r}" for r in range(args.rooms)]
    store = open_store(config, reactor)
    try:
        # Warm-up, not timed: one message per room opens the pool's connections.
        await gatherResults([store.append(room, "warmup", body(0)) for room in rooms])
        batches_before, stored_before = store.batches, store.stored
        window = min(args.window, setup.messages)
        driver = Driver(store, rooms, setup.messages, window, args.max_seconds, args.cids)
        started = time.perf_counter()
        await driver.start()
        seconds = time.perf_counter() - started
        if driver.first_error is not None:
            raise RuntimeError(
                f"{driver.failed} appends failed in {setup}; first: "
                f"{driver.first_error.getErrorMessage()}"
            )
        stored = store.stored - stored_before
        transactions = store.batches - batches_before
    finally:
        await store.close()
    (count,) = query(config, "SELECT COUNT(*) FROM messages")[0]
    if count != stored + len(rooms):
        raise RuntimeError(f"{setup}: {count} rows in messages, expected {stored + len(rooms)}")
    return Result(setup, stored, seconds, transactions, driver.capped)


def postgres_settings(url: str) -> str:
    rows = query(
        Config(database_url=url),
        "SELECT current_setting('server_version'), current_setting('fsync'),"
        " current_setting('synchronous_commit'), current_setting('wal_sync_method')",
    )
    version, fsync, sync_commit, wal_sync = rows[0]
    return (
        f"PostgreSQL {version.split()[0]} (fsync={fsync}, synchronous_commit={sync_commit}, "
        f"wal_sync_method={wal_sync})"
    )


def describe_machine(postgres_url: str, throwaway: bool) -> str:
    where = "throwaway local cluster" if throwaway else "--database-url"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"Machine: nproc={cpus}, {platform.machine()}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; "
        f"{postgres_settings(postgres_url)}, {where}; "
        f"SQLite {sqlite3.sqlite_version} (journal_mode=WAL, synchronous=FULL)"
    )


def report(results: list[Result], machine: str, args: argparse.Namespace) -> str:
    lines = [
        "| store | pool | batching | messages | seconds | messages/s | transactions |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r.setup
        batching = f"batched (≤{s.batch_max}/txn)" if s.batch_max > 1 else "1 row/txn"
        messages = f"{r.stored}{'*' if r.capped else ''}"
        lines.append(
            f"| {s.store} | {s.pool} | {batching} | {messages} | {r.seconds:.2f} | "
            f"{r.rate:,.0f} | {r.transactions} |"
        )
    lines.append("")
    lines.append(
        f"{args.rooms} rooms, {BODY_CHARS}-char bodies, up to {args.window} appends "
        f"outstanding{', every message with a cid' if args.cids else ''}; seconds = first append to"
        " last ack."
    )
    if any(r.capped for r in results):
        lines.append(f"Rows marked * stopped sending at the {args.max_seconds:g}s cap per run.")
    lines.append(machine)
    return "\n".join(lines)


async def run(reactor: IReactorTime, args: argparse.Namespace, postgres_url: str) -> None:
    throwaway = args.database_url is None
    setups: list[Setup] = []
    for pool in POOL_SIZES:
        setups.append(Setup("postgres", pool, BATCH_MAX, args.messages))
        setups.append(Setup("postgres", pool, 1, max(1, args.messages // 10)))
    setups.append(Setup("sqlite", 1, BATCH_MAX, args.messages))
    setups.append(Setup("sqlite", 1, 1, max(1, args.messages // 10)))

    pg_store.migrate_database(postgres_url)
    pg_config = Config(database_url=postgres_url)
    prepare(pg_config)
    if not throwaway:
        (count,) = query(pg_config, "SELECT COUNT(*) FROM messages")[0]
        if count:
            raise SystemExit(
                f"the messages table at --database-url holds {count} rows; "
                "use a scratch database (this benchmark empties it)"
            )
    machine = describe_machine(postgres_url, throwaway)

    scratch = Path(tempfile.mkdtemp(prefix="chatserver-bench-"))
    results: list[Result] = []
    try:
        for setup in setups:
            config = Config(
                database_url=database_url_for(setup, postgres_url, scratch),
                db_pool_size=setup.pool,
                store_writers=setup.pool,  # every connection writes: the pool's ceiling
                store_batch_max=setup.batch_max,
                store_queue_max=QUEUE_MAX,
            )
            prepare(config)  # migrates a new SQLite file; checks the Postgres schema
            if not config.is_sqlite:
                empty_tables(config)
            results.append(await measure(reactor, setup, config, args))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not throwaway:
            empty_tables(pg_config)
    print(report(results, machine, args))


def start_postgres() -> Any:
    """A throwaway cluster like the tests' one, but durable: fsync and synchronous commit on."""
    sys.path.insert(0, str(REPO / "tests"))
    import servers

    server = servers.PostgresServer(durable=True)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="postgresql://... of a scratch database (emptied!); default: a throwaway cluster",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=20000,
        help="messages per batched run; one-row-per-transaction runs send a tenth (default 20000)",
    )
    parser.add_argument("--rooms", type=int, default=10, help="rooms to spread over (default 10)")
    parser.add_argument(
        "--cids",
        action="store_true",
        help="every message carries a cid (protocol 1.1's idempotent send), each its own",
    )
    parser.add_argument(
        "--window", type=int, default=2000, help="appends kept outstanding (default 2000)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=12.0,
        help="stop sending after this long in one run and report what was stored (default 12)",
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.rooms < 1 or args.window < 1 or args.max_seconds <= 0:
        parser.error("--messages, --rooms, --window and --max-seconds must be positive")
    if args.database_url is not None and not args.database_url.startswith(
        ("postgresql:", "postgres:")
    ):
        parser.error("--database-url must be a postgresql:// URL")
    return args


def main() -> None:
    args = parse_args()
    server = None
    try:
        if args.database_url is None:
            server = start_postgres()
            url = server.create_database("store_bench")
        else:
            url = args.database_url

        async def entry(reactor: IReactorTime) -> None:
            try:
                await run(reactor, args, url)
            except SystemExit:
                raise
            except BaseException:
                traceback.print_exc()
                raise SystemExit(1) from None

        react(entry)
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
