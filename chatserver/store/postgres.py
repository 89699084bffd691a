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
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorTime

from chatserver.store import SchemaError
from chatserver.store.sql import (
    CommitUnknown,
    Dialect,
    Entry,
    Row,
    SQLStore,
    Stored,
    check_schema,
    migrate,
)

CONNECT_TIMEOUT = 5
# Batches up to this size are stored by one statement, larger ones by COPY
# (measured: COPY's cheaper rows win from a few dozen rows on).
ONE_STATEMENT_MAX = 32
_MIGRATION_LOCK = 0x63686174  # "chat": one advisory lock id for schema changes


_COPY_NULL = "\\N"  # COPY's text format for NULL
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """A value in COPY's text format: backslash, tab, newline, CR escaped."""
    return value.translate(_COPY_ESCAPES)


class PostgresDialect(Dialect):
    name = "postgres"
    connection_errors = (psycopg2.OperationalError, psycopg2.InterfaceError)
    database_errors = (psycopg2.DatabaseError,)
    conflict_errors = (psycopg2.errors.UniqueViolation,)

    def insert_messages(self, cursor: Any, rows: Sequence[Row]) -> None:
        # COPY: one round trip for the batch, and no per-row parameter quoting
        # in Python (execute_values spends most of a batch's time there).
        data = "".join(
            f"{_copy_text(room)}\t{mid}\t{_copy_text(user)}\t{_copy_text(body)}\t{ts}"
            f"\t{_copy_text(cid) if cid is not None else _COPY_NULL}"
            f"\t{_COPY_NULL if edits is None else edits}"
            f"\t{_COPY_NULL if deletes is None else deletes}\n"
            for room, mid, user, body, ts, cid, edits, deletes in rows
        )
        cursor.copy_expert(
            "COPY messages (room, id, username, body, ts, cid, edits, deletes) FROM STDIN",
            io.StringIO(data),
        )

    def find_cids(
        self, cursor: Any, keys: set[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], tuple[int, int]]:
        # One statement, each key looked up in the unique index.
        rooms, users, cids = (list(column) for column in zip(*keys, strict=True))
        cursor.execute(
            "SELECT m.room, m.username, m.cid, m.id, m.ts"
            " FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(room, username, cid)"
            " JOIN messages m ON m.room = k.room AND m.username = k.username AND m.cid = k.cid",
            (rooms, users, cids),
        )
        return {(room, user, cid): (mid, ts) for room, user, cid, mid, ts in cursor.fetchall()}

    def lock_rooms(self, cursor: Any, rooms: list[str]) -> dict[str, int]:
        # In name order, as reserve_ids takes them: no deadlock cycle. A room
        # without its row yet locks nothing; two writers racing to store its
        # first message with one cid meet at the unique index (conflict_errors).
        cursor.execute(
            "SELECT name, last_id FROM rooms WHERE name = ANY(%s) ORDER BY name FOR UPDATE",
            (rooms,),
        )
        return dict(cursor.fetchall())

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

    def store_batch(self, cursor: Any, entries: Sequence[Entry], ts: int) -> list[Stored]:
        """A small batch in two round trips: one statement that reserves the ids
        and inserts the rows, sent with its BEGIN, then COMMIT.

        Each round trip is a wait on the network and a GIL reacquisition in this
        thread; the generic path takes five (BEGIN, reserve, COPY's two, COMMIT).
        At low and moderate rates batches are small and those round trips are
        most of a batch's cost. Large batches still go by COPY, which inserts a
        row for less than the arrays of this statement cost. The connection is
        switched to autocommit for the batch so that psycopg2 sends no BEGIN of
        its own and adbapi's commit afterwards is a no-op.
        """
        if len(entries) > ONE_STATEMENT_MAX or any(e[3] is not None or e[4] for e in entries):
            # Large, or carrying cids, edits or deletes: the general path.
            return super().store_batch(cursor, entries, ts)
        counts: dict[str, int] = {}
        back: list[int] = []  # how many later messages of its room follow each entry
        for room, *_ in entries:
            counts[room] = counts.get(room, 0) + 1
        seen: dict[str, int] = {}
        for room, *_ in entries:
            k = seen.get(room, 0) + 1
            seen[room] = k
            back.append(counts[room] - k)
        rooms = sorted(counts)
        connection = cursor.connection
        connection.autocommit = True
        try:
            try:
                cursor.execute(
                    _EXECUTE_STORE_BATCH,
                    (
                        rooms,
                        [counts[r] for r in rooms],
                        ts,
                        [e[0] for e in entries],
                        back,
                        [e[1] for e in entries],
                        [e[2] for e in entries],
                    ),
                )
                last = dict(cursor.fetchall())
            except self.connection_errors:
                raise  # nothing committed: the store retries on a fresh connection
            except BaseException:
                _rollback_quietly(cursor)
                raise
            try:
                cursor.execute("COMMIT")
            except self.connection_errors as e:
                raise CommitUnknown(f"connection lost during commit: {e}") from e
        finally:
            if not connection.closed:
                connection.autocommit = False
        return [(last[room] - b, ts, False) for (room, *_), b in zip(entries, back, strict=True)]

    def lock_schema(self, cursor: Any) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))


# Rooms are upserted in name order (the ORDER BY), the same in every writer,
# so two writers never wait on each other in a cycle. A data-modifying WITH
# runs to completion whether or not the outer query reads it. Prepared once per
# connection (``prepare_connection``): parsing and planning it for every batch
# was a large part of PostgreSQL's CPU per batch when batches are small.
_PREPARE_STORE_BATCH = (
    "PREPARE chat_store_batch (text[], bigint[], bigint, text[], bigint[], text[], text[]) AS"
    " WITH r AS ("
    "  INSERT INTO rooms (name, last_id)"
    "  SELECT name, n FROM unnest($1, $2) AS t(name, n) ORDER BY name"
    "  ON CONFLICT (name) DO UPDATE SET last_id = rooms.last_id + excluded.last_id"
    "  RETURNING name, last_id),"
    " m AS ("
    "  INSERT INTO messages (room, id, username, body, ts)"
    "  SELECT m.room, r.last_id - m.back, m.username, m.body, $3"
    "  FROM unnest($4, $5, $6, $7) AS m(room, back, username, body)"
    "  JOIN r ON r.name = m.room)"
    " SELECT name, last_id FROM r"
)
_EXECUTE_STORE_BATCH = "BEGIN; EXECUTE chat_store_batch (%s, %s, %s, %s, %s, %s, %s)"


def prepare_connection(connection: Any) -> None:
    """Each pool connection, as it opens: the batch statement prepared for its session."""
    cursor = connection.cursor()
    cursor.execute(_PREPARE_STORE_BATCH)
    cursor.close()
    connection.commit()


def _rollback_quietly(cursor: Any) -> None:
    """End the transaction a failed statement left open (autocommit mode won't)."""
    try:
        cursor.execute("ROLLBACK")
    except Exception:  # the connection is gone too: adbapi replaces it
        pass


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
        cp_openfun=prepare_connection,
    )
    return SQLStore(pool, PostgresDialect(), clock, writers=min(writers, pool_size), **limits)
