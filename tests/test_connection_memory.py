"""What an open connection keeps: no HTTP channel, few attributes of its own, and
still every guarantee of the protocol after its state has been compacted."""

from __future__ import annotations

import gc
import json
from collections import deque

import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from wsclient import Client, connect

from chatserver.compat import autobahn as autobahn_compat
from chatserver.web import DeadlineChannel

ensure = pytest_twisted.ensureDeferred

# An open, joined connection between pings holds about 30 attributes of its
# own; Autobahn alone sets about 80.
MAX_OWN_ATTRIBUTES = 36


def server_side(server, user: str):
    return next(p for p in server.factory.connections if p.user == user)


async def next_ping(client: Client) -> None:
    """Fires when the server's next WebSocket ping reaches ``client`` (answered as usual)."""
    got: Deferred[None] = Deferred()
    proto = client.proto

    def on_ping(payload: bytes) -> None:
        WebSocketClientProtocol.onPing(proto, payload)
        if not got.called:
            got.callback(None)

    proto.onPing = on_ping
    await got.addTimeout(10, reactor)
    del proto.onPing


@ensure
async def test_an_open_websocket_keeps_no_http_channel(make_server):
    server = make_server(handshake_timeout=60.0)
    clients = [await connect(server.port, f"u{i}") for i in range(3)]
    for c in clients:
        await c.join("r")
    gc.collect()
    channels = [
        o for o in gc.get_objects() if isinstance(o, DeadlineChannel) and o.site is server.site
    ]
    # The handshake deadline (60 s here) no longer holds the request and its headers.
    assert channels == []
    for c in clients:
        await c.close()


@ensure
async def test_a_compacted_connection_keeps_every_guarantee(make_server):
    server = make_server(ping_interval=0.3, ping_timeout=5.0, max_frame_bytes=4096)
    a = await connect(server.port, "alice")
    b = await connect(server.port, "bob")
    await a.join("r")
    await b.join("r")
    await next_ping(a)  # the sweep compacts before it pings
    proto = server_side(server, "alice")
    if server.fast_paths.on(autobahn_compat.LEAN_CONNECTIONS):
        assert len(proto.__dict__) <= MAX_OWN_ATTRIBUTES, sorted(proto.__dict__)

    # A message in several frames, then an ordinary one: ids in order, delivered.
    body = "x" * 300
    payload = json.dumps({"type": "send", "room": "r", "body": body, "ref": "frag"}).encode()
    a.proto.sendMessage(payload, fragmentSize=40)
    await a.expect("ack")
    second = await a.request({"type": "send", "room": "r", "body": "after"})
    assert second["type"] == "ack"
    got = [await b.expect("message"), await b.expect("message")]
    assert [m["body"] for m in got] == [body, "after"]
    assert got[1]["id"] == got[0]["id"] + 1

    # Limits still hold: an oversized frame is refused with 1009, and bob stays.
    await next_ping(a)
    a.send_raw(b"x" * 5000)
    assert await a.wait_closed() == 1009
    assert (await b.request({"type": "ping"}))["type"] == "pong"

    # Invalid UTF-8 after a compaction is still caught.
    await next_ping(b)
    b.send_raw(b'{"type": "ping", "ref": "\xff"}')
    assert await b.wait_closed() == 1007


_Resting = type("_Resting", (), dict(autobahn_compat.AT_REST))


def test_compact_drops_resting_values_and_keeps_the_rest():
    obj = _Resting()
    obj.__dict__.update(
        state=_Resting.state,  # equal to the class value: goes
        closedByMe=True,  # differs: stays
        send_queue=deque(),  # empty queue: goes
        rooms={},  # a connection's own mutable state: stays, even empty
        current_frame=None,
        inside_message=False,
        frame_length=43,  # per-message, between messages: goes
    )
    autobahn_compat.compact(obj)
    assert sorted(obj.__dict__) == ["closedByMe", "rooms"]
    assert obj.state == _Resting.state and obj.send_queue == ()


def test_compact_keeps_message_state_while_a_message_is_being_parsed():
    obj = _Resting()
    obj.__dict__.update(current_frame=object(), inside_message=True, frame_length=43)
    autobahn_compat.compact(obj)
    assert obj.__dict__["frame_length"] == 43 and obj.inside_message is True
