"""Frames that are not whole messages, against a real listening server.

Pings, pongs and fragments (empty ones too) cost a token of the frame-rate
limit like a message does, and a client over it is closed with 1008; the pongs
the server writes back count towards ``max_send_buffer`` like every other byte
it writes. Clients here are raw sockets: they build any frame and see the
server's control frames too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from wsclient import (
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TIMEOUT,
    RawWebSocket,
    client_frame,
    connect,
    http_get,
    raw_websocket,
    text,
)

ensure = pytest_twisted.ensureDeferred

# No token comes back during a test at the lowest rate the config accepts.
SLOW = {"rate_limit": 0.01, "rate_burst": 5, "rate_limit_strikes": 3}


async def until_close(ws: RawWebSocket) -> tuple[list[tuple[int, bytes]], int | None]:
    """The frames before the server's close frame, and its code."""
    before = []
    while True:
        opcode, payload = await ws.recv()
        if opcode == OP_CLOSE:
            return before, ws.close_code
        before.append((opcode, payload))


def texts(frames: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(p) for op, p in frames if op == OP_TEXT]


async def metric(server: Any, line: str) -> str:
    """The /metrics line that starts with ``line``."""
    code, body = await http_get(server.port, "/metrics")
    assert code == 200
    (found,) = [x for x in body.decode().splitlines() if x.startswith(line)]
    return found


async def neighbour_unaffected(server: Any) -> None:
    bob = await connect(server.port, "bob")
    assert (await bob.request({"type": "ping"}))["type"] == "pong"
    await bob.close()


@ensure
async def test_a_ping_flood_is_rate_limited_and_closed_with_1008(make_server):
    server = make_server(**SLOW)
    ws = await raw_websocket(server.port, "flooder")
    ws.write(b"".join(client_frame(b"p%d" % i, OP_PING) for i in range(50)))
    frames, code = await until_close(ws)
    assert code == 1008
    # The burst is answered; the rest is refused, and the connection closed.
    assert [p for op, p in frames if op == OP_PONG] == [b"p%d" % i for i in range(5)]
    errors = texts(frames)
    assert [e["code"] for e in errors] == ["rate_limited"] * 3, errors
    assert all("ref" not in e for e in errors)
    await ws.wait_lost()
    assert server.chat.policy_closes == 1
    await neighbour_unaffected(server)


@ensure
async def test_unsolicited_pongs_are_rate_limited_and_closed_with_1008(make_server):
    server = make_server(**SLOW)
    ws = await raw_websocket(server.port, "flooder")
    ws.write(client_frame(b"", OP_PONG) * 50)
    frames, code = await until_close(ws)
    assert code == 1008
    assert [e["code"] for e in texts(frames)] == ["rate_limited"] * 3
    assert [op for op, _ in frames] == [OP_TEXT] * 3
    await ws.wait_lost()
    assert server.chat.policy_closes == 1


@ensure
async def test_empty_continuation_frames_are_rate_limited_and_closed_with_1008(make_server):
    server = make_server(**SLOW)
    ws = await raw_websocket(server.port, "flooder")
    ws.write(
        client_frame(b'{"type":"ping"', OP_TEXT, fin=False)
        + client_frame(b"", OP_CONTINUATION, fin=False) * 200
    )
    frames, code = await until_close(ws)
    assert code == 1008
    assert [e["code"] for e in texts(frames)] == ["rate_limited"] * 3
    await ws.wait_lost()
    assert server.chat.policy_closes == 1
    await neighbour_unaffected(server)


@ensure
async def test_a_fragmented_message_costs_a_token_per_frame_control_frames_too(make_server):
    server = make_server(rate_limit=0.01, rate_burst=4, rate_limit_strikes=1)
    ws = await raw_websocket(server.port, "alice")
    # One message in two fragments with a ping between them: three frames, three tokens.
    ws.write(
        client_frame(b'{"type":"ping",', OP_TEXT, fin=False)
        + client_frame(b"between", OP_PING)
        + client_frame(b'"ref":"frag"}', OP_CONTINUATION, fin=True)
        + text({"type": "ping", "ref": "fourth"})
        + text({"type": "ping", "ref": "fifth"})
    )
    frames, code = await until_close(ws)
    assert code == 1008
    assert frames[0] == (OP_PONG, b"between")
    assert [(f["type"], f.get("ref")) for f in texts(frames[1:])] == [
        ("pong", "frag"),
        ("pong", "fourth"),
        ("error", "fifth"),
    ]
    assert texts(frames)[-1]["code"] == "rate_limited"
    await ws.wait_lost()


def only_connection(server: Any) -> Any:
    (proto,) = tuple(server.factory.connections)
    return proto


def server_closed(server: Any, proto: Any, timeout: float) -> Deferred[None]:
    """Fires when the server has closed ``proto`` (onClose), or fails after ``timeout``."""
    out: Deferred[None] = Deferred()
    server.factory.when_closed(proto).addCallback(lambda _: out.called or out.callback(None))
    return out.addTimeout(timeout, reactor)


@ensure
async def test_pongs_to_a_client_that_does_not_read_count_towards_the_send_buffer(make_server):
    """A client pings hard and never reads: dropped once the pongs go over max_send_buffer,
    not left to grow the server's memory until slow_client_timeout."""
    server = make_server(
        max_send_buffer=65536,
        send_buffer_grace=0.0,
        slow_client_timeout=3600.0,
        rate_limit=1_000_000.0,  # the send buffer, not the rate limit, is under test
        rate_burst=1_000_000,
    )
    ws = await raw_websocket(server.port, "pinger")
    gone = server_closed(server, only_connection(server), 3 * TIMEOUT)
    ws.stop_reading()
    pings = client_frame(b"x" * 125, OP_PING) * 1000  # 127 KB of pongs
    # Until dropped: the socket buffers take a few MB over loopback first (at most 64 MB).
    for chunk in range(500):
        ws.write(pings)
        if chunk % 20 == 19:
            await http_get(server.port, "/healthz")  # a round trip: the server catches up
            if gone.called:
                break
    await gone
    assert server.factory.dropped_slow == 1
    assert server.chat.policy_closes == 0
    line = 'chatserver_clients_dropped_total{reason="slow"}'
    assert await metric(server, line) == f"{line} 1.0"
    ws.transport.abortConnection()
    await neighbour_unaffected(server)


@ensure
async def test_a_client_flooding_on_after_its_close_is_not_read_any_more(make_server):
    """Parsing a flood costs CPU even when every frame is ignored: past its rate after
    the close, the server stops reading it; the close handshake's timeout ends it."""
    server = make_server(**SLOW)
    ws = await raw_websocket(server.port, "flooder")
    proto = only_connection(server)
    gone = server_closed(server, proto, TIMEOUT)
    ws.write(client_frame(b"", OP_PING) * 50)  # one read: the close comes mid-way
    _, code = await until_close(ws)  # the server has handled that read by now
    assert code == 1008
    assert proto.transport not in reactor.getReaders()
    ws.write(client_frame(b"", OP_PING) * 1000)  # never read
    await gone
    assert server.chat.policy_closes == 1
    assert server.chat.frames == 5 + 3  # the burst and the strikes; nothing after
    await neighbour_unaffected(server)
