"""The embedded default store: SQLite through the same adbapi pool, one connection."""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorTime

from chatserver.store.sql import Dialect, SQLStore, migrate


class SQLiteDialect(Dialect):
    name = "sqlite"
    connection_errors = (sqlite3.InterfaceError,)
    database_errors = (sqlite3.OperationalError, sqlite3.DatabaseError)
    conflict_errors = (sqlite3.IntegrityError,)
    erases_after_commit = True

    def sql(self, text: str) -> str:
        return text.replace("%s", "?")

    def after_erasure(self, cursor: Any) -> None:
        # The log holds page images written before the erasure: copied into the
        # database (whose freed space secure_delete zeroed) and truncated to nothing.
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cursor.fetchall()


def path_from_url(url: str) -> str:
    """sqlite:///relative/path or sqlite:////absolute/path; sqlite:///:memory: for tests."""
    return url[len("sqlite:///") :]


def _configure(connection: sqlite3.Connection) -> None:
    # WAL lets history reads run beside the writer. FULL syncs the WAL at every
    # commit, so an ack survives a power loss too, not only a crash of the
    # process; group commit makes that nearly free under load (measured:
    # 32.7k against 33.8k messages/s batched; 1.7k against 6.6k one per commit).
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=5000")
    # Freed space is overwritten with zeros: a deleted message's text is erased
    # from the file, not only unlinked from the table.
    connection.execute("PRAGMA secure_delete=ON")
    connection.commit()


def connect(url: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path_from_url(url))
    _configure(connection)
    return connection


def prepare(url: str) -> None:
    """Blocking, before serving: the embedded default migrates itself, no set-up step."""
    connection = connect(url)
    try:
        migrate(connection, SQLiteDialect())
    finally:
        connection.close()


def open_store(url: str, clock: IReactorTime, **limits: Any) -> SQLStore:
    pool = adbapi.ConnectionPool(
        "sqlite3",
        path_from_url(url),
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_reconnect=True,
        cp_openfun=_configure,
        cp_noisy=False,
    )
    return SQLStore(pool, SQLiteDialect(), clock, writers=1, **limits)
