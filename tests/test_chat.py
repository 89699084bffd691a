"""End to end on the embedded default: real server, real WebSocket clients."""

from __future__ import annotations

import json

import pytest_twisted
from wsclient import connect

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_two_members_exchange_and_other_room_sees_nothing(server):
    a = await connect(server.port, "alice")
    b = await connect(server.port, "bob")
    c = await connect(server.port, "carol")
    assert (await a.join("lobby"))["last_id"] is None
    await b.join("lobby")
    await c.join("elsewhere")

    a.send({"type": "send", "room": "lobby", "body": "hi bob", "ref": 7})
    ack = await a.recv()
    assert ack["type"] == "ack" and ack["ref"] == 7 and ack["room"] == "lobby"
    own = await a.expect("message")
    got = await b.expect("message")
    assert own == got
    assert got == {
        "type": "message",
        "room": "lobby",
        "id": ack["id"],
        "user": "alice",
        "body": "hi bob",
        "ts": ack["ts"],
    }
    b.send({"type": "send", "room": "lobby", "body": "hi alice", "ref": "x"})
    assert (await b.expect("ack"))["ref"] == "x"
    assert (await a.expect("message"))["body"] == "hi alice"
    assert (await b.expect("message"))["id"] == ack["id"] + 1
    assert await c.drain_to_pong() == []


@ensure
async def test_history_pages_backwards_and_forwards(server):
    a = await connect(server.port)
    await a.join("h")
    ids = []
    for i in range(7):
        ack = await a.request({"type": "send", "room": "h", "body": f"m{i}"})
        ids.append(ack["id"])
    assert ids == list(range(1, 8))

    page = await a.request({"type": "history", "room": "h", "limit": 3})
    assert [m["body"] for m in page["messages"]] == ["m4", "m5", "m6"] and page["more"]
    page = await a.request({"type": "history", "room": "h", "limit": 3, "before": 5})
    assert [m["id"] for m in page["messages"]] == [2, 3, 4] and page["more"]
    page = await a.request({"type": "history", "room": "h", "limit": 3, "before": 2})
    assert [m["id"] for m in page["messages"]] == [1] and not page["more"]
    page = await a.request({"type": "history", "room": "h", "limit": 3, "after": 0})
    assert [m["id"] for m in page["messages"]] == [1, 2, 3] and page["more"]
    page = await a.request({"type": "history", "room": "h", "limit": 3, "after": 4})
    assert [m["id"] for m in page["messages"]] == [5, 6, 7] and not page["more"]
    page = await a.request({"type": "history", "room": "h", "after": 7})
    assert page["messages"] == [] and not page["more"]
    default = await a.request({"type": "history", "room": "h"})
    assert len(default["messages"]) == 7 and not default["more"]
    m = default["messages"][0]
    assert set(m) == {"room", "id", "user", "body", "ts"} and m["user"] == "alice"


BAD_INPUTS = [
    # (raw payload, expected code)
    (b"{not json", "bad_frame"),
    (b'{"type":"ping","x":NaN}', "bad_frame"),
    (b'{"type":"ping","x":Infinity}', "bad_frame"),
    (b'{"type":"ping","x":' + b"[" * 50 + b"]" * 50 + b"}", "bad_frame"),
    (b"[1,2]", "bad_frame"),
    (b'"ping"', "bad_frame"),
    (b'{"type":"dance"}', "bad_frame"),
    (b'{"room":"lobby"}', "bad_frame"),
    (b'{"type":5}', "bad_frame"),
    (b'{"type":"join"}', "bad_request"),
    (b'{"type":"join","room":""}', "bad_request"),
    (b'{"type":"join","room":"has space"}', "bad_request"),
    (b'{"type":"join","room":"' + b"r" * 65 + b'"}', "bad_request"),
    (b'{"type":"join","room":"caf\xc3\xa9"}', "bad_request"),
    (b'{"type":"join","room":7}', "bad_request"),
    (b'{"type":"send","room":"lobby","body":5}', "bad_request"),
    (b'{"type":"send","room":"lobby","body":""}', "bad_request"),
    (b'{"type":"send","room":"lobby"}', "bad_request"),
    (b'{"type":"send","room":"lobby","body":"a\\u0000b"}', "bad_request"),
    (b'{"type":"send","room":"lobby","body":"lone \\ud800"}', "bad_request"),
    (b'{"type":"history","room":"lobby","limit":0}', "bad_request"),
    (b'{"type":"history","room":"lobby","limit":101}', "bad_request"),
    (b'{"type":"history","room":"lobby","limit":"5"}', "bad_request"),
    (b'{"type":"history","room":"lobby","limit":true}', "bad_request"),
    (b'{"type":"history","room":"lobby","before":-1}', "bad_request"),
    (b'{"type":"history","room":"lobby","before":1.5}', "bad_request"),
    (b'{"type":"history","room":"lobby","before":3,"after":1}', "bad_request"),
    (b'{"type":"ping","ref":1.5}', "bad_request"),
    (b'{"type":"ping","ref":[1]}', "bad_request"),
    (b'{"type":"ping","ref":true}', "bad_request"),
    (b'{"type":"send","room":"nope","body":"x"}', "not_member"),
    (b'{"type":"history","room":"nope"}', "not_member"),
    (b'{"type":"leave","room":"nope"}', "not_member"),
]


@ensure
async def test_every_bad_input_gets_its_error_and_the_connection_survives(make_server):
    server = make_server(max_bad_frames=1000)
    a = await connect(server.port)
    b = await connect(server.port, "bob")
    await a.join("lobby")
    await b.join("lobby")
    for payload, code in BAD_INPUTS:
        a.send_raw(payload)
        got = await a.recv()
        assert got["type"] == "error" and got["code"] == code, (payload, got)
        assert isinstance(got["message"], str) and got["message"]
        assert "Traceback" not in got["message"]
    a.send_raw(b'{"type":"ping"}', binary=True)
    assert (await a.recv())["code"] == "bad_frame"
    # Still serving this connection and its neighbour.
    assert (await a.request({"type": "ping"}))["type"] == "pong"
    await a.request({"type": "send", "room": "lobby", "body": "still here"})
    assert (await b.expect("message"))["body"] == "still here"
    assert server.chat.errors["bad_request"] > 10


@ensure
async def test_ref_is_echoed_on_answers_and_errors(server):
    a = await connect(server.port)
    for ref in ["abc", 0, -5, 2**53]:
        a.send({"type": "ping", "ref": ref})
        assert await a.recv() == {"type": "pong", "ref": ref}
    a.send({"type": "join", "room": "r", "ref": "j"})
    joined = await a.recv()
    # Version 1's fields exactly; protocol 1.1 adds last_read and unread beside them.
    assert {k: joined[k] for k in ("type", "room", "last_id", "ref")} == {
        "type": "joined",
        "room": "r",
        "last_id": None,
        "ref": "j",
    }
    assert set(joined) - {"type", "room", "last_id", "ref"} == {"last_read", "unread"}
    a.send({"type": "send", "room": "other", "body": "x", "ref": 42})
    err = await a.recv()
    assert err["code"] == "not_member" and err["ref"] == 42
    a.send({"type": "leave", "room": "r", "ref": "l"})
    assert (await a.recv()) == {"type": "left", "room": "r", "ref": "l"}


@ensure
async def test_body_limit_edge(make_server):
    server = make_server(max_body_chars=10)
    a = await connect(server.port)
    await a.join("r")
    ok = await a.request({"type": "send", "room": "r", "body": "é" * 10})
    assert ok["type"] == "ack"
    err = await a.request({"type": "send", "room": "r", "body": "é" * 11})
    assert err["code"] == "too_large"


@ensure
async def test_leaving_and_disconnecting_stop_delivery(server):
    a = await connect(server.port)
    b = await connect(server.port, "bob")
    c = await connect(server.port, "carol")
    for client in (a, b, c):
        await client.join("r")
    await b.request({"type": "leave", "room": "r"})
    await c.close()
    await a.request({"type": "send", "room": "r", "body": "after"})
    assert (await a.expect("message"))["body"] == "after"
    assert await b.drain_to_pong() == []
    # The room stays hosted only while it has members.
    await a.close()
    assert "r" not in server.registry.rooms or server.registry.rooms["r"].members == set()


@ensure
async def test_join_reports_last_id_and_is_idempotent(server):
    a = await connect(server.port)
    await a.join("r")
    await a.request({"type": "send", "room": "r", "body": "one"})
    await a.request({"type": "send", "room": "r", "body": "two"})
    b = await connect(server.port, "bob")
    assert (await b.join("r"))["last_id"] == 2
    assert (await b.join("r"))["last_id"] == 2
    # Joining twice does not deliver twice.
    await a.request({"type": "send", "room": "r", "body": "three"})
    assert (await b.expect("message"))["id"] == 3
    assert await b.drain_to_pong() == []


@ensure
async def test_frames_pipelined_after_join_are_answered_in_order(server):
    a = await connect(server.port)
    a.send({"type": "join", "room": "p", "ref": 1})
    a.send({"type": "send", "room": "p", "body": "right away", "ref": 2})
    a.send({"type": "history", "room": "p", "ref": 3})
    assert (await a.recv())["type"] == "joined"
    assert (await a.recv())["type"] == "ack"
    assert (await a.recv())["body"] == "right away"
    hist = await a.recv()
    assert hist["type"] == "history" and [m["body"] for m in hist["messages"]] == ["right away"]


@ensure
async def test_messages_survive_a_restart_on_the_same_sqlite_file(make_server):
    first = make_server()
    a = await connect(first.port)
    await a.join("keep")
    for body in ("before", "restart"):
        await a.request({"type": "send", "room": "keep", "body": body})
    await first.stopService()
    assert await a.wait_closed() == 1001

    second = make_server()
    b = await connect(second.port, "bob")
    assert (await b.join("keep"))["last_id"] == 2
    page = await b.request({"type": "history", "room": "keep"})
    assert [m["body"] for m in page["messages"]] == ["before", "restart"]
    ack = await b.request({"type": "send", "room": "keep", "body": "after"})
    assert ack["id"] == 3


@ensure
async def test_subprotocol_is_selected_when_offered(server):
    a = await connect(server.port, protocols=["chat.v1"])
    assert a.subprotocol == "chat.v1"
    b = await connect(server.port, "bob")
    assert b.subprotocol is None


@ensure
async def test_max_rooms_per_connection_edge(make_server):
    server = make_server(max_rooms_per_connection=2)
    a = await connect(server.port)
    await a.join("one")
    await a.join("two")
    err = await a.request({"type": "join", "room": "three"})
    assert err["type"] == "error" and err["code"] == "forbidden"
    await a.request({"type": "leave", "room": "one"})
    await a.join("three")


@ensure
async def test_repeated_bad_frames_close_with_1008_at_the_limit(make_server):
    server = make_server(max_bad_frames=3)
    a = await connect(server.port)
    for _ in range(2):
        a.send_raw(b"nope")
        assert (await a.recv())["code"] == "bad_frame"
    assert (await a.request({"type": "ping"}))["type"] == "pong"
    a.send_raw(b"nope")
    assert (await a.recv())["code"] == "bad_frame"
    assert await a.wait_closed() == 1008


@ensure
async def test_frame_over_the_size_limit_closes_with_1009(make_server):
    server = make_server(max_frame_bytes=1024)
    a = await connect(server.port)
    b = await connect(server.port, "bob")
    await a.join("r")
    fits = json.dumps({"type": "send", "room": "r", "body": "x" * 900}).encode()
    assert len(fits) <= 1024
    a.send_raw(fits)
    assert (await a.recv())["type"] == "ack"
    a.send_raw(json.dumps({"type": "send", "room": "r", "body": "x" * 1100}).encode())
    assert await a.wait_closed() == 1009
    assert (await b.request({"type": "ping"}))["type"] == "pong"


@ensure
async def test_invalid_utf8_closes_with_1007(server):
    a = await connect(server.port)
    # Autobahn's client validates nothing outgoing when asked to send raw frames.
    a.proto.sendFrame(opcode=1, payload=b'{"type":"ping","x":"\xff\xfe"}')
    assert await a.wait_closed() == 1007
