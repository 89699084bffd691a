"""Slot arithmetic against Redis's own answers on a real cluster."""

from __future__ import annotations

import random
import string

import pytest

from chatserver.broker.cluster_slots import SLOTS, Node, SlotMap, crc16, key_slot


def test_crc16_check_value_and_hash_tags():
    assert crc16(b"123456789") == 0x31C3  # the XMODEM check value
    assert key_slot(b"123456789") == 0x31C3 % SLOTS
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"{user1000}.following") == key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: whole key
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")


def test_a_partial_map_has_gaps_and_no_owner_there():
    m = SlotMap([[0, 99, [b"127.0.0.1", 7000, b"id"]], [200, SLOTS - 1, ["127.0.0.1", 7001]]])
    assert m.owner(50) == Node("127.0.0.1", 7000)
    assert m.owner(150) is None
    assert m.owner(SLOTS - 1) == Node("127.0.0.1", 7001)
    assert not m.covers_all()


@pytest.mark.redis
def test_slots_and_owners_match_a_real_cluster(redis_cluster):
    rng = random.Random(7)
    names = ["chat:0:room:" + "".join(rng.choices(string.ascii_letters, k=8)) for _ in range(50)]
    port = redis_cluster.masters()[0].port
    for name in names:
        assert key_slot(name.encode()) == redis_cluster.command(port, "CLUSTER", "KEYSLOT", name)
    m = SlotMap(redis_cluster.command(port, "CLUSTER", "SLOTS"))
    assert m.covers_all()
    assert len(m.masters()) == 3
    for name in names:
        assert m.owner_of(name.encode()) == Node("127.0.0.1", redis_cluster.owner_of(name))


def test_a_map_keeps_replicas_and_names_unknown_hosts_after_the_node_asked():
    reply = [
        [0, 8191, [b"10.0.0.1", 7000, b"a"], [b"10.0.0.4", 7003, b"d"]],
        [8192, SLOTS - 1, [b"", 7001, b"b"], [b"?", 7004, b"e"]],
    ]
    m = SlotMap(reply, asked="10.0.0.9")
    assert m.owner(9000) == Node("10.0.0.9", 7001)
    assert m.replicas == {Node("10.0.0.4", 7003), Node("10.0.0.9", 7004)}
    assert m.nodes() == m.masters() | m.replicas
    assert m.covers_all() and m.coverage() == SLOTS


def test_a_moved_slot_patches_one_slot_only():
    a, b, c = Node("h", 1), Node("h", 2), Node("h", 3)
    m = SlotMap([[0, 99, ["h", 1]], [100, SLOTS - 1, ["h", 2]]])
    moved = m.with_owner(50, c)
    assert [moved.owner(s) for s in (0, 49, 50, 51, 99, 100)] == [a, a, c, a, a, b]
    assert moved.covers_all() and moved.masters() == {a, b, c}
    assert m.owner(50) == a  # the original is unchanged
    edge = m.with_owner(0, b).with_owner(99, b)
    assert [edge.owner(s) for s in (0, 1, 98, 99)] == [b, a, a, b]
    owners = moved.owners()
    assert len(owners) == SLOTS and owners[50] == c and owners[100] == b
    assert not moved.same_owners(m) and moved.same_owners(m.with_owner(50, c))
