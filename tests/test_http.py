"""The HTTP side of the port: handshake statuses, health, the page."""

from __future__ import annotations

import json

import pytest_twisted
from wsclient import HandshakeRefused, connect, handshake_status, http_get, raw_request

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
