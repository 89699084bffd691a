"""The scale-out store: Postgres through a fixed-size adbapi pool.

The pool's size is the number of connections this process ever opens
(``cp_min == cp_max``); load changes how much each batch carries, not how many
connections there are.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorTime

from chatserver.store import SchemaError
from chatserver.store.sql import Dialect, Row, SQLStore, check_schema, migrate

CONNECT_TIMEOUT = 5
_MIGRATION_LOCK = 0x63686174  # "chat": one advisory lock id for schema changes


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """A value in COPY's text format: backslash, tab, newline, CR escaped."""
    return value.translate(_COPY_ESCAPES)


class PostgresDialect(Dialect):
    name = "postgres"
    connection_errors = (psycopg2.OperationalError, psycopg2.InterfaceError)
    database_errors = (psycopg2.DatabaseError,)

    def insert_messages(self, cursor: Any, rows: Sequence[Row]) -> None:
        # COPY: one round trip for the batch, and no per-row parameter quoting
        # in Python (execute_values spends most of a batch's time there).
        data = "".join(
            f"{_copy_text(room)}\t{mid}\t{_copy_text(user)}\t{_copy_text(body)}\t{ts}\n"
            for room, mid, user, body, ts in rows
        )
        cursor.copy_expert(
            "COPY messages (room, id, username, body, ts) FROM STDIN", io.StringIO(data)
        )

    def reserve_ids(self, cursor: Any, counts: dict[str, int]) -> dict[str, int]:
        # Every room of the batch in one round trip. Rows are locked in name
        # order (the ORDER BY), the same order in every writer: no deadlock cycle.
        rooms = sorted(counts)
        cursor.execute(
            "INSERT INTO rooms (name, last_id)"
            " SELECT name, n FROM unnest(%s::text[], %s::bigint[]) AS t(name, n) ORDER BY name"
            " ON CONFLICT (name) DO UPDATE SET last_id = rooms.last_id + excluded.last_id"
            " RETURNING name, last_id",
            (rooms, [counts[r] for r in rooms]),
        )
        return dict(cursor.fetchall())

    def lock_schema(self, cursor: Any) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))


def _dsn(url: str) -> str:
    params = psycopg2.extensions.parse_dsn(url)
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT))
    params.setdefault("application_name", "chatserver")
    return psycopg2.extensions.make_dsn(**params)


def connect(url: str) -> Any:
    return psycopg2.connect(_dsn(url))


def check(url: str) -> None:
    """Blocking: refuse to serve against a schema this server does not know."""
    try:
        connection = connect(url)
    except psycopg2.OperationalError as e:
        # At start there is nothing to degrade to: say so in one line and exit
        # (systemd or the orchestrator restarts us).
        reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise SchemaError(f"cannot reach the database to check its schema: {reason}") from None
    try:
        check_schema(connection, PostgresDialect())
    finally:
        connection.close()


def migrate_database(url: str, log: Any = None) -> list[int]:
    connection = connect(url)
    try:
        return migrate(connection, PostgresDialect(), log)
    finally:
        connection.close()


def open_store(
    url: str, clock: IReactorTime, pool_size: int, writers: int, **limits: Any
) -> SQLStore:
    """A store on ``pool_size`` connections, ``writers`` of which may store at once.

    One writer is the default: while its transaction commits, new messages
    gather and the next transaction takes them all. More writers start more,
    smaller transactions, each with its own commit, thread hand-off and
    round trips: measured on a fast disk, one writer gave lower latency at
    lower CPU. The connections not writing keep joins and history reads from
    queueing behind writes.
    """
    pool = adbapi.ConnectionPool(
        "psycopg2",
        _dsn(url),
        cp_min=pool_size,
        cp_max=pool_size,
        cp_reconnect=True,
        cp_noisy=False,
    )
    return SQLStore(pool, PostgresDialect(), clock, writers=min(writers, pool_size), **limits)
