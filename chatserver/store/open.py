"""Pick the store implementation from the configured database URL."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from chatserver.config import Config
from chatserver.store import Store


def prepare(config: Config) -> None:
    """Blocking schema work before the reactor serves: migrate SQLite, check Postgres."""
    if config.is_sqlite:
        from chatserver.store import sqlite

        sqlite.prepare(config.database_url)
    else:
        from chatserver.store import postgres

        postgres.check(config.database_url)


def open_store(config: Config, clock: IReactorTime) -> Store:
    limits = {
        "queue_max": config.store_queue_max,
        "batch_max": config.store_batch_max,
        "gather": config.store_gather,
    }
    if config.is_sqlite:
        from chatserver.store import sqlite

        return sqlite.open_store(config.database_url, clock, **limits)
    from chatserver.store import postgres

    return postgres.open_store(
        config.database_url, clock, config.db_pool_size, config.store_writers, **limits
    )
