"""Tests for the throwaway test servers in tests/servers.py.

The integration suite relies on these helpers to kill and restart real
brokers, so their own behaviour (same port after restart, TLS chain, clean
teardown) is checked here first.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import psycopg2
import pytest
from servers import PostgresServer, RedisReplyError, RedisServer, free_port


@pytest.fixture
def tls_redis_server() -> Iterator[RedisServer]:
    server = RedisServer(tls=True)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_starts_and_answers(redis: RedisServer) -> None:
    assert redis.running
    assert redis.command("PING") == "PONG"
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert redis.command("SET", "k", "v") == "OK"
    assert redis.command("GET", "k") == "v"
    assert redis.command("GET", "missing") is None
    assert redis.command("PUBSUB", "NUMSUB", "room") == ["room", 0]
    assert "cmd=client" in redis.command("CLIENT", "LIST")


def test_redis_error_reply_raises(redis: RedisServer) -> None:
    with pytest.raises(RedisReplyError, match="unknown command"):
        redis.command("NOSUCHCOMMAND")


def test_redis_config_set_timeout(redis: RedisServer) -> None:
    assert redis.command("CONFIG", "SET", "timeout", "7") == "OK"
    assert redis.command("CONFIG", "GET", "timeout") == ["timeout", "7"]


def test_redis_kill_and_restart_same_port(redis: RedisServer) -> None:
    port = redis.port
    redis.command("SET", "k", "v")
    redis.kill()
    assert not redis.running
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    redis.restart()
    assert redis.port == port
    assert redis.command("PING") == "PONG"
    # Persistence is off, so a restarted server comes back empty.
    assert redis.command("GET", "k") is None


def test_redis_stop_and_restart(redis: RedisServer) -> None:
    port = redis.port
    redis.stop()
    assert not redis.running
    redis.restart()
    assert redis.port == port
    assert redis.command("PING") == "PONG"


def test_redis_password() -> None:
    server = RedisServer(password="s3cret/pw")
    try:
        server.start()
        assert server.command("PING") == "PONG"
        assert server.url == f"redis://:s3cret%2Fpw@127.0.0.1:{server.port}/0"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.makefile("rb").readline().startswith(b"-NOAUTH")
    finally:
        server.close()


def test_redis_close_is_idempotent() -> None:
    server = RedisServer()
    server.start()
    server.close()
    server.close()
    assert not server.running
    assert not server.dir.exists()


def test_tls_redis_answers_ping_with_ca(tls_redis_server: RedisServer) -> None:
    server = tls_redis_server
    assert server.url == f"rediss://localhost:{server.port}/0"
    ctx = ssl.create_default_context(cafile=server.ca_file)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(b"PING\r\n")
        assert sock.makefile("rb").readline() == b"+PONG\r\n"
    assert server.command("PING") == "PONG"


def test_tls_redis_accepts_client_certificate(tls_redis_server: RedisServer) -> None:
    ctx = tls_redis_server.ssl_context(client_cert=True)
    with (
        socket.create_connection(("127.0.0.1", tls_redis_server.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"PING\r\n")
        assert sock.makefile("rb").readline() == b"+PONG\r\n"


def test_tls_redis_rejects_wrong_hostname(tls_redis_server: RedisServer) -> None:
    ctx = ssl.create_default_context(cafile=tls_redis_server.ca_file)
    with (
        socket.create_connection(("127.0.0.1", tls_redis_server.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="wrong.example")


def test_tls_redis_rejects_plaintext(tls_redis_server: RedisServer) -> None:
    with socket.create_connection(("127.0.0.1", tls_redis_server.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        try:
            reply = sock.recv(100)
        except OSError:
            reply = b""
    assert not reply.startswith(b"+PONG")


def test_postgres_starts_and_answers(postgres_server: PostgresServer) -> None:
    assert postgres_server.url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    assert postgres_server.query("SELECT 1 + %s", (1,)) == [(2,)]
    assert postgres_server.query("SHOW max_connections") == [("200",)]
    assert postgres_server.query("SHOW fsync") == [("off",)]
    rows = postgres_server.query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", ("postgres",)
    )
    assert rows[0][0] >= 1


def test_postgres_stop_and_restart(postgres_server: PostgresServer) -> None:
    port = postgres_server.port
    postgres_server.query("CREATE TABLE survives (x int)")
    postgres_server.query("INSERT INTO survives VALUES (42)")
    postgres_server.stop()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(postgres_server.url, connect_timeout=2)
    postgres_server.restart()
    assert postgres_server.port == port
    assert postgres_server.query("SELECT x FROM survives") == [(42,)]


def test_postgres_kill_and_restart(postgres_server: PostgresServer) -> None:
    postgres_server.kill()
    assert not postgres_server.running
    postgres_server.restart()
    assert postgres_server.query("SELECT 1") == [(1,)]


def test_postgres_create_database(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("chat_test")
    assert url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/chat_test"
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id serial PRIMARY KEY, body text)")
            cur.execute("INSERT INTO t (body) VALUES (%s) RETURNING id", ("héllo",))
            assert cur.fetchone() == (1,)
            cur.execute("SELECT current_database(), body FROM t")
            assert cur.fetchone() == ("chat_test", "héllo")
        conn.commit()
    finally:
        conn.close()
    assert postgres_server.query("SELECT body FROM t", database="chat_test") == [("héllo",)]


def test_postgres_close_is_idempotent() -> None:
    server = PostgresServer()
    server.start()
    server.close()
    server.close()
    assert not server.running
    assert not server.dir.exists()
