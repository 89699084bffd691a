"""The per-room sequencer, driven by a fake clock: order, duplicates, gaps filled from the store."""

from __future__ import annotations

import json

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from wsclient import server_frame_payloads

from chatserver import wire
from chatserver.broker.memory import MemoryBroker, MemoryHub
from chatserver.delivery import Delivery
from chatserver.rooms import RoomRegistry, broker_payload, relay_payload
from chatserver.store import StoredMessage


class ListStore:
    """Only what the registry reads: last_id and history after an id."""

    def __init__(self, messages):
        self.messages = messages
        self.reads = 0

    def last_id(self, room):
        return succeed(max((m.id for m in self.messages), default=None))

    def history(self, room, before, after, limit):
        self.reads += 1
        newer = [m for m in self.messages if m.id > after]
        return succeed((newer[:limit], len(newer) > limit))


class Member:
    def __init__(self):
        self.got = []
        self.writes = 0

    def write(self, data):
        # Frames of one batch arrive joined in one write.
        for payload in server_frame_payloads(data):
            obj = json.loads(payload)
            self.got.append(obj.get("id", obj.get("type")))
        self.writes += 1


def msg(i):
    return StoredMessage("r", i, "u", f"b{i}", 0)


def frame(i):
    return wire.encode_message("r", i, "u", f"b{i}", 0)


def setup(stored):
    clock = Clock()
    store = ListStore(stored)
    registry = RoomRegistry(store, MemoryBroker(MemoryHub(clock)), Delivery(), clock, 0.5)
    member = Member()
    joined = []
    registry.join(member, "r").addCallback(joined.append)
    return clock, store, registry, member, joined


def test_in_order_duplicates_dropped():
    _, _, registry, member, joined = setup([msg(1)])
    assert joined == [1]
    for i in (2, 3, 3, 2, 4):
        registry.offer("r", i, frame(i))
    assert member.got == [2, 3, 4]


def test_out_of_order_waits_then_delivers_in_order():
    clock, store, registry, member, _ = setup([])
    registry.offer("r", 2, frame(2))
    registry.offer("r", 3, frame(3))
    assert member.got == []
    registry.offer("r", 1, frame(1))
    assert member.got == [1, 2, 3]
    clock.advance(10)
    assert store.reads == 0


def test_a_gap_nobody_fills_is_read_from_the_store():
    clock, store, registry, member, _ = setup([])
    store.messages = [msg(1), msg(2), msg(3)]
    registry.offer("r", 3, frame(3))
    clock.advance(0.4)
    assert member.got == []
    clock.advance(0.2)
    assert member.got == [1, 2, 3]
    assert store.reads == 1


def test_broker_payload_roundtrip_and_resync():
    _, store, registry, member, _ = setup([])
    registry.on_broker_message("r", broker_payload(1, frame(1)))
    registry.on_broker_message("r", b"garbage")
    assert member.got == [1]
    assert registry.dropped_broker_frames == 1
    store.messages = [msg(1), msg(2)]
    registry.resync()
    assert member.got == [1, 2]


def test_last_member_leaving_unhosts_the_room():
    _, _, registry, member, _ = setup([])
    registry.leave(member, "r")
    assert "r" not in registry.rooms


def test_a_gap_fill_page_reaches_each_member_in_one_write():
    clock, store, registry, member, _ = setup([])
    store.messages = [msg(1), msg(2), msg(3)]
    registry.offer("r", 4, frame(4))
    clock.advance(1)
    assert member.got == [1, 2, 3, 4]
    # The page (1-3) in one write, the buffered 4 drained after it in another.
    assert member.writes == 2
    assert registry.delivery.coalesced_frames == 3


def test_a_member_gets_in_a_batch_exactly_what_it_would_have_got_at_once():
    _, _, registry, first, _ = setup([])
    delivery = registry.delivery
    second = Member()
    with delivery.batch():
        delivery.to_connection(first, wire.text_frame(wire.reply("ack", 1)))
        registry.offer("r", 1, frame(1))
        registry.join(second, "r")  # joins after 1: gets 2 and 3 only
        registry.offer("r", 2, frame(2))
        registry.leave(first, "r")  # leaves after 2: never gets 3
        # What was held for the room is released to its members as it leaves,
        # before anything sent to it afterwards (a "kicked" frame, say).
        delivery.to_connection(first, wire.text_frame(wire.encode({"type": "kicked"})))
        registry.offer("r", 3, frame(3))
        assert first.got == second.got == []  # all still held
    # The ack first, then the room's frames, then what followed the leave.
    assert first.got == ["ack", 1, 2, "kicked"]
    assert second.got == [2, 3]
    assert first.writes == 1
    assert delivery.delivered == 4


def test_batches_nest_and_the_outermost_writes():
    _, _, registry, member, _ = setup([])
    with registry.delivery.batch():
        registry.offer("r", 1, frame(1))
        with registry.delivery.batch():
            registry.offer("r", 2, frame(2))
        assert member.got == []
    assert member.got == [1, 2]
    assert member.writes == 1


def test_one_read_from_the_broker_reaches_each_member_in_one_write():
    _, _, registry, member, _ = setup([])
    registry.on_broker_messages([("r", broker_payload(i, frame(i))) for i in (1, 2, 3)])
    assert member.got == [1, 2, 3]
    assert member.writes == 1


def test_frames_with_no_id_reach_members_but_not_their_sender_nor_twice():
    _, _, registry, member, _ = setup([])
    typer = Member()
    registry.join(typer, "r")
    registry.sinks_of = lambda user: [typer] if user == "t" else []
    typing = wire.encode({"type": "typing", "room": "r", "user": "t"})
    registry.relay("r", "t", typing)
    assert (member.got, typer.got) == (["typing"], [])
    # From another instance: delivered; this instance's own echo: not again.
    registry.on_broker_message("r", relay_payload(b"other", "t", typing))
    registry.on_broker_message("r", relay_payload(registry.origin, "t", typing))
    assert member.got == ["typing", "typing"]
    watched = []
    registry.on_presence = lambda room, frame: watched.append((room, frame))
    event = wire.encode({"type": "presence", "room": "r", "user": "t", "online": True})
    registry.on_broker_message("r", b"^ other " + event)
    registry.on_broker_message("r", b"^ " + registry.origin + b" " + event)
    assert watched == [("r", event)]
    # Malformed ones are counted and dropped; nobody gets anything.
    for bad in (b"~ only-origin", b"~ ", b"^ only-origin", b"^ "):
        registry.on_broker_message("r", bad)
    assert registry.dropped_broker_frames == 4
    assert member.got == ["typing", "typing"] and watched == [("r", event)]
