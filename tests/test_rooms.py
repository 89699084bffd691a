"""The per-room sequencer, driven by a fake clock: order, duplicates, gaps filled from the store."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from chatserver import wire
from chatserver.broker.memory import MemoryBroker, MemoryHub
from chatserver.rooms import RoomRegistry, broker_payload
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
    user = "m"

    def __init__(self):
        self.got = []

    def deliver(self, prepared):
        self.got.append(__import__("json").loads(prepared)["id"])


def msg(i):
    return StoredMessage("r", i, "u", f"b{i}", 0)


def frame(i):
    return wire.encode_message("r", i, "u", f"b{i}", 0)


def setup(stored):
    clock = Clock()
    store = ListStore(stored)
    registry = RoomRegistry(store, MemoryBroker(MemoryHub(clock)), lambda f: f, clock, 0.5)
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


def test_a_gap_fill_delivers_its_page_inside_the_batch_scope():
    from contextlib import contextmanager

    clock, store, registry, member, _ = setup([])
    scopes = []

    @contextmanager
    def scope():
        scopes.append(len(member.got))
        yield
        scopes[-1] = (scopes[-1], len(member.got))

    registry.batch_scope = scope
    store.messages = [msg(1), msg(2), msg(3)]
    registry.offer("r", 4, frame(4))
    clock.advance(1)
    assert member.got == [1, 2, 3, 4]
    # The page (1-3) in one scope, the buffered 4 drained in the next.
    assert scopes == [(0, 3), (3, 4)]
