"""Incoming frames read by the server's own fast path and by Autobahn, side by side.

Whole, small, masked text frames skip Autobahn's frame machinery; everything
else must reach Autobahn untouched. These tests write raw bytes, cut reads at
every kind of place and mix frames the fast path must not take.
"""

from __future__ import annotations

import json
import os
import struct

import pytest_twisted
from wsclient import connect

from chatserver.compat.autobahn import INBOUND_FAST_MAX

ensure = pytest_twisted.ensureDeferred


def masked(payload: bytes, opcode: int = 1, fin: bool = True, length_bytes: int = 0) -> bytes:
    """A client frame; ``length_bytes`` forces a 2- or 8-byte length field."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if length_bytes == 8 or n > 65535:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    elif length_bytes == 2 or n > 125:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | n])
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def send(ref: str, body: str) -> bytes:
    frame = {"type": "send", "room": "r", "body": body, "ref": ref}
    return json.dumps(frame, ensure_ascii=False).encode()


async def acks(client, refs: list[str]) -> list[str]:
    """The refs of the next acks, skipping the member's own messages."""
    seen = []
    while len(seen) < len(refs):
        got = await client.recv()
        if got["type"] != "message":
            assert got["type"] == "ack", got
            seen.append(got["ref"])
    return seen


async def alice_in_r(server):
    a = await connect(server.port, "alice")
    await a.join("r")
    return a


async def stored(server) -> list[str]:
    """Bodies stored in room "r", read by another connection."""
    reader = await connect(server.port, "reader")
    await reader.join("r")
    page = await reader.request({"type": "history", "room": "r", "limit": 100})
    await reader.close()
    return [m["body"] for m in page["messages"]]


def server_side(server):
    (proto,) = tuple(server.factory.connections)
    return proto


@ensure
async def test_frames_cut_anywhere_are_each_read_once_in_order(server):
    a = await alice_in_r(server)
    proto = server_side(server)
    bodies = ["x", "é" * 150, "y" * 40]  # 7-bit, 16-bit (UTF-8) and 7-bit lengths
    sizes = [len(masked(send("r0000-0", b))) for b in bodies]
    total = sum(sizes)
    edges = {sum(sizes[:i]) + d for i in range(4) for d in (-1, 0, 1, 2, 3, 6, 7, 8)}
    cuts = sorted(c for c in edges | set(range(0, total + 1, 11)) if 0 <= c <= total)
    for cut in cuts:
        refs = [f"r{cut:04d}-{i}" for i in range(3)]
        data = b"".join(masked(send(ref, body)) for ref, body in zip(refs, bodies, strict=True))
        assert len(data) == total
        proto.dataReceived(data[:cut])
        proto.dataReceived(data[cut:])
        assert await acks(a, refs) == refs, cut
    newest = (await a.request({"type": "history", "room": "r", "limit": 1}))["messages"]
    assert [(m["id"], m["body"]) for m in newest] == [(3 * len(cuts), bodies[2])]


@ensure
async def test_a_frame_one_byte_at_a_time(server):
    a = await alice_in_r(server)
    proto = server_side(server)
    data = masked(send("slow", "drip"))
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert await acks(a, ["slow"]) == ["slow"]


@ensure
async def test_text_then_ping_then_text_in_one_write(server):
    a = await alice_in_r(server)
    data = masked(send("1", "a")) + masked(b"hi", opcode=9) + masked(send("2", "b"))
    a.proto.transport.write(data)
    assert await acks(a, ["1", "2"]) == ["1", "2"]


@ensure
async def test_text_then_close_in_one_write(server):
    a = await alice_in_r(server)
    a.proto.transport.write(masked(send("last", "bye")) + masked(b"\x03\xe8", opcode=8))
    # The close comes before the commit, so no ack: the message is stored all the same.
    assert await a.wait_closed() == 1000
    assert await stored(server) == ["bye"]


@ensure
async def test_a_fragmented_message_is_not_taken_apart(server):
    a = await alice_in_r(server)
    whole = send("frag", "in three parts")
    parts = [whole[:10], whole[10:20], whole[20:]]
    data = (
        masked(parts[0], opcode=1, fin=False)
        + masked(parts[1], opcode=0, fin=False)
        + masked(parts[2], opcode=0, fin=True)
        + masked(send("after", "whole"))
    )
    a.proto.transport.write(data)
    assert await acks(a, ["frag", "after"]) == ["frag", "after"]


@ensure
async def test_an_unmasked_frame_after_a_good_one_is_a_protocol_error(server):
    a = await alice_in_r(server)
    good = masked(send("ok", "fine"))
    # ASCII throughout: read as masked, these bytes would make a valid (if
    # meaningless) text frame and draw an error frame instead of the close.
    unmasked = b"\x81\x1e" + b'{"type":"ping","ref":"unmask"}' + b"x" * 40
    a.proto.transport.write(good + unmasked)
    assert await a.wait_closed() == 1002
    assert [f for f in a.proto.frames.pending if f["type"] != "message"] == []
    assert await stored(server) == ["fine"]


@ensure
async def test_lengths_not_in_shortest_form_are_protocol_errors(server):
    for length_bytes in (2, 8):
        a = await connect(server.port, "alice")
        a.proto.transport.write(masked(b'{"type":"ping"}', length_bytes=length_bytes))
        assert await a.wait_closed() == 1002, length_bytes


@ensure
async def test_bad_utf8_after_a_good_frame_closes_with_1007(server):
    a = await alice_in_r(server)
    a.proto.transport.write(masked(send("ok", "fine")) + masked(b'{"type":"ping","x":"\xff"}'))
    assert await a.wait_closed() == 1007
    assert await stored(server) == ["fine"]


@ensure
async def test_the_frame_limit_holds_at_its_edge(make_server):
    server = make_server(max_frame_bytes=256)
    a = await alice_in_r(server)
    at_limit = send("edge", "e" * (1 + 256 - len(send("edge", "e"))))
    assert len(at_limit) == 256
    over = send("edge", "e" * (2 + 256 - len(send("edge", "e"))))
    assert len(over) == 257
    a.proto.transport.write(masked(at_limit) + masked(over))
    assert await a.wait_closed() == 1009
    assert await stored(server) == [json.loads(at_limit)["body"]]


@ensure
async def test_frames_bigger_than_the_fast_path_still_arrive(make_server):
    server = make_server(max_frame_bytes=4 * INBOUND_FAST_MAX, max_body_chars=4 * INBOUND_FAST_MAX)
    a = await alice_in_r(server)
    big = "b" * (INBOUND_FAST_MAX + 1)
    a.proto.transport.write(masked(send("big", big)) + masked(send("small", "s")))
    assert await acks(a, ["big", "small"]) == ["big", "small"]
