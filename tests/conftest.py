"""Fixtures: real chat servers listening on free ports, in this process.

Nothing here imports the reactor at module level, so ``--reactor`` choices work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted


def fast_paths_wanted() -> bool:
    """The suite runs once as configured by default and once more with
    CHATSERVER_FAST_PATHS=false (tests/run), so both paths are tested."""
    return os.environ.get("CHATSERVER_FAST_PATHS", "true").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


@pytest_twisted.async_yield_fixture
async def make_server(tmp_path: Any) -> Any:
    """Start servers on tcp:0 with a SQLite file in tmp_path (by default); stop them after."""
    from twisted.internet import reactor

    from chatserver.broker.memory import MemoryHub
    from chatserver.config import Config
    from chatserver.service import ChatServerService

    hub = MemoryHub(reactor)
    running: list[ChatServerService] = []

    def make(**settings: Any) -> ChatServerService:
        """``clock=`` (a ``task.Clock``) times the connections instead of the reactor."""
        clock = settings.pop("clock", None)
        settings.setdefault("listen", ("tcp:0:interface=127.0.0.1:backlog=1024",))
        settings.setdefault("database_url", f"sqlite:///{tmp_path}/chat.sqlite3")
        # Load tests open hundreds of connections from 127.0.0.1 and send fast;
        # the limit tests set these themselves.
        settings.setdefault("max_connections_per_ip", 100_000)
        settings.setdefault("rate_limit", 100_000.0)
        settings.setdefault("rate_burst", 100_000)
        settings.setdefault("drain_seconds", 0.0)
        settings.setdefault("fast_paths", fast_paths_wanted())
        service = ChatServerService(Config(**settings), reactor, hub=hub, clock=clock)
        service.startService()
        service.port = service.ports()[0]
        running.append(service)
        return service

    yield make
    for service in reversed(running):
        if service.running:
            await service.stopService()


@pytest.fixture
def server(make_server: Callable[..., Any]) -> Any:
    return make_server()


@pytest.fixture(scope="session")
def postgres() -> Any:
    """One throwaway PostgreSQL cluster for the session; tests get their own databases."""
    from servers import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


_databases = iter(range(1, 1_000_000))


def fresh_database(server: Any) -> str:
    """A new, migrated database on ``server``."""
    from chatserver.store import postgres as pg

    url = server.create_database(f"chat_{next(_databases)}")
    pg.migrate_database(url)
    return url


@pytest.fixture
def pg_url(postgres: Any) -> str:
    return fresh_database(postgres)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: Any, tmp_path: Any) -> str:
    """Each store in turn: a test that takes this runs on SQLite and on Postgres."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chat.sqlite3'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def redis() -> Any:
    """A throwaway redis-server of this test's own (tests kill and restart it)."""
    from servers import RedisServer

    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_cluster() -> Any:
    """A throwaway 6-node Redis Cluster (3 masters, 3 replicas) of this test's own."""
    from servers import RedisCluster

    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def own_postgres() -> Any:
    """A cluster of this test's own, for tests that stop and restart it."""
    from servers import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
