"""The HTTP side of the port: handshake statuses, health, the page."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory as ProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from wsclient import (
    TIMEOUT,
    HandshakeRefused,
    connect,
    handshake_status,
    http_get,
    raw_request,
)

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_handshake_statuses(server):
    assert await handshake_status(server.port) == 101
    assert await handshake_status(server.port, query="") == 401
    assert await handshake_status(server.port, query="user=") == 401
    assert await handshake_status(server.port, query="user=bad%20name") == 401
    assert await handshake_status(server.port, query="user=" + "u" * 65) == 401
    assert await handshake_status(server.port, path="/elsewhere") == 404


@ensure
async def test_refused_handshake_is_not_a_websocket(server):
    try:
        await connect(server.port, user=None)
    except HandshakeRefused:
        pass
    else:
        raise AssertionError("connected without a user")


@ensure
async def test_plain_get_on_ws_is_426(server):
    data = await raw_request(
        server.port, f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
    )
    assert data.startswith(b"HTTP/1.1 426")


@ensure
async def test_healthz_and_page(server):
    a = await connect(server.port)
    await a.join("r")
    code, body = await http_get(server.port, "/healthz")
    assert code == 200
    status = json.loads(body)
    assert status["status"] == "ok" and status["connections"] == 1 and status["rooms"] == 1
    code, body = await http_get(server.port, "/")
    assert code == 200 and b"chatserver" in body
    code, _ = await http_get(server.port, "/nothing-here")
    assert code == 404


@ensure
async def test_access_log_leaves_out_query_strings(server):
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list[str] = []

    def observer(event):
        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        code, _ = await http_get(server.port, "/ws?token=s3cret-token&user=x")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert code == 426
    lines = [line for line in seen if '"GET /ws' in line]
    assert lines, seen  # the request was logged...
    assert not any("s3cret" in line for line in seen)  # ...without its token


# -- keep-alive and pipelining on the deadline channel ----------------------------


class _Conversation(Protocol):
    """A raw connection that waits for whole responses (each with a Content-Length)."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self._waiting: tuple[int, Deferred[list[bytes]]] | None = None

    def responses(self) -> list[bytes]:
        out, rest = [], self.data
        while b"\r\n\r\n" in rest:
            top, _, body = rest.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in top.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(body) < length:
                break
            out.append(top.split(b"\r\n", 1)[0])
            rest = body[length:]
        return out

    def wait_for(self, count: int) -> Deferred[list[bytes]]:
        """Fires with the status lines once ``count`` responses are in (bounded)."""
        d: Deferred[list[bytes]] = Deferred()
        self._waiting = (count, d)
        self._check()
        return d.addTimeout(TIMEOUT, reactor)

    def _check(self) -> None:
        if self._waiting is not None and len(self.responses()) >= self._waiting[0]:
            d, self._waiting = self._waiting[1], None
            d.callback(self.responses())

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


async def _converse(port: int) -> _Conversation:
    conn = _Conversation()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    await endpoint.connect(ProtocolFactory.forProtocol(lambda: conn)).addTimeout(TIMEOUT, reactor)
    return conn


def _get(port: int, path: str, close: bool = False) -> bytes:
    last = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{last}\r\n".encode()


@ensure
async def test_pipelined_requests_are_answered_in_turn_and_counted_once(make_server):
    """One connection, one request at a time: each counts against max_connections_per_ip
    from its head to its answer, so requests in a row never count twice."""
    server = make_server(max_connections_per_ip=1)
    conn = await _converse(server.port)
    try:
        conn.transport.write(
            _get(server.port, "/healthz")
            + _get(server.port, "/app.css")
            + _get(server.port, "/healthz", close=True)
        )
        assert await conn.wait_for(3) == [b"HTTP/1.1 200 OK"] * 3
        await conn.lost.addTimeout(TIMEOUT, reactor)
        assert not server.site.http_refusals
    finally:
        if not conn.lost.called:
            conn.transport.abortConnection()


@ensure
async def test_each_keep_alive_request_gets_its_own_deadline(make_server):
    """Requests in a row on one connection: each has its own time, and an idle
    connection between them is closed at the handshake deadline."""
    clock = Clock()
    deadline = 8.0
    edge = 1 / 64
    server = make_server(handshake_timeout=deadline, http_request_timeout=20.0, clock=clock)
    conn = await _converse(server.port)
    try:
        for count in (1, 2, 3):
            clock.advance(deadline - edge)  # each request comes just before its deadline
            conn.transport.write(_get(server.port, "/healthz"))
            assert len(await conn.wait_for(count)) == count
        clock.advance(deadline - edge)
        assert (server.site.handshake_timeouts, server.site.request_timeouts) == (0, 0)
        clock.advance(edge)  # idle past it: closed
        await conn.lost.addTimeout(TIMEOUT, reactor)
        assert (server.site.handshake_timeouts, server.site.request_timeouts) == (1, 0)
    finally:
        if not conn.lost.called:
            conn.transport.abortConnection()
