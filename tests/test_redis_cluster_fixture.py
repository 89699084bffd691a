"""Tests for the throwaway Redis Cluster in tests/servers.py.

Sharded pub/sub tests will kill masters and move slots under a running chat
server; here the cluster's own behaviour is checked first: every slot served,
SSUBSCRIBE/SPUBLISH on the owner, MOVED elsewhere, failover and resharding.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

import pytest
from servers import RedisCluster, RedisReplyError

pytestmark = pytest.mark.redis

CHANNEL = "room:cluster-test"


def assert_delivers(cluster: RedisCluster, port: int, channel: str, payload: str) -> None:
    """SSUBSCRIBE on ``port``, SPUBLISH there, and read the ``smessage`` push."""
    with cluster.subscriber(port) as sub:
        assert sub.ssubscribe(channel) == [["ssubscribe", channel, 1]]
        assert cluster.command(port, "SPUBLISH", channel, payload) == 1
        assert sub.next_push(timeout=5.0) == ["smessage", channel, payload]


def moved_to(cluster: RedisCluster, port: int, channel: str) -> tuple[int, int]:
    """SSUBSCRIBE on ``port`` must be refused with MOVED; return (slot, port) it names."""
    with cluster.subscriber(port) as sub, pytest.raises(RedisReplyError) as refused:
        sub.ssubscribe(channel)
    match = re.fullmatch(r"MOVED (\d+) 127\.0\.0\.1:(\d+)", str(refused.value))
    assert match, f"expected MOVED from port {port}, got {refused.value!r}"
    return int(match[1]), int(match[2])


def test_cluster_starts_with_three_masters_covering_every_slot(
    redis_cluster: RedisCluster,
) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    ranges = sorted(r for master in masters for r in master.slots)
    assert ranges[0][0] == 0 and ranges[-1][1] == 16383
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))

    nodes = redis_cluster.nodes
    assert len(nodes) == 6
    assert len({node.port for node in nodes}) == 6
    assert all(node.running and node.pid for node in nodes)
    roles = {node.port: node.role for node in nodes}
    master_ports = {master.port for master in masters}
    assert {port for port, role in roles.items() if role == "master"} == master_ports
    replicas = [node for node in nodes if node.role == "slave"]
    assert sorted(node.replica_of for node in replicas) == sorted(master_ports)
    for node in nodes:
        assert "cluster_state:ok" in node.command("CLUSTER", "INFO")
    assert redis_cluster.seed_urls() == [f"redis://127.0.0.1:{node.port}" for node in nodes]

    pids = [node.pid for node in nodes]
    dirs = [node.dir for node in nodes]
    redis_cluster.close()
    assert not any(node.running for node in nodes)
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(d.exists() for d in dirs)
    redis_cluster.close()  # idempotent; the fixture closes again


def test_owner_accepts_ssubscribe_and_delivers_spublish(redis_cluster: RedisCluster) -> None:
    owner = redis_cluster.owner_of(CHANNEL)
    slot = redis_cluster.keyslot(CHANNEL)
    assert [m.port for m in redis_cluster.masters() if m.owns(slot)] == [owner]
    assert_delivers(redis_cluster, owner, CHANNEL, "hello shard")


def test_non_owner_refuses_ssubscribe_with_moved(redis_cluster: RedisCluster) -> None:
    owner = redis_cluster.owner_of(CHANNEL)
    slot = redis_cluster.keyslot(CHANNEL)
    others = [m.port for m in redis_cluster.masters() if m.port != owner]
    assert len(others) == 2
    for port in others:
        assert moved_to(redis_cluster, port, CHANNEL) == (slot, owner)


def test_master_killed_replica_takes_over_and_delivers(redis_cluster: RedisCluster) -> None:
    old = redis_cluster.owner_of(CHANNEL)
    old_slots = next(m.slots for m in redis_cluster.masters() if m.port == old)
    replica = next(n.port for n in redis_cluster.nodes if n.replica_of == old)

    redis_cluster.kill_master(old)
    assert not redis_cluster.node(old).running
    promoted = redis_cluster.wait_for_failover(old, timeout=10.0)

    assert promoted == replica
    assert redis_cluster.node(promoted).role == "master"
    assert redis_cluster.owner_of(CHANNEL) == promoted
    masters = redis_cluster.masters()
    assert len(masters) == 3 and old not in {m.port for m in masters}
    assert next(m.slots for m in masters if m.port == promoted) == old_slots
    assert_delivers(redis_cluster, promoted, CHANNEL, "after failover")

    # The old master comes back with its nodes.conf as a replica of the new one.
    assert redis_cluster.restart_node(old) == "slave"
    assert redis_cluster.node(old).replica_of == promoted
    assert redis_cluster.owner_of(CHANNEL) == promoted


def test_move_slot_moves_ownership(redis_cluster: RedisCluster) -> None:
    slot = redis_cluster.keyslot(CHANNEL)
    old = redis_cluster.owner_of(CHANNEL)
    new = next(m.port for m in redis_cluster.masters() if m.port != old)
    # One key in the slot so the MIGRATE step has work to do.
    key = "{" + CHANNEL + "}:k"
    assert redis_cluster.command(old, "SET", key, "v") == "OK"

    redis_cluster.move_slot(slot, new)

    assert redis_cluster.owner_of(CHANNEL) == new
    masters = redis_cluster.masters()
    assert [m.port for m in masters if m.owns(slot)] == [new]
    assert sum(e - s + 1 for m in masters for s, e in m.slots) == 16384
    assert redis_cluster.command(new, "GET", key) == "v"
    assert redis_cluster.command(old, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert moved_to(redis_cluster, old, CHANNEL) == (slot, new)
    assert_delivers(redis_cluster, new, CHANNEL, "after move")


def test_missing_redis_cli_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = shutil.which("redis-server")
    assert server, "redis-server must be installed for the redis tests"
    (tmp_path / "redis-server").symlink_to(server)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-cli not found on PATH"):
        RedisCluster()
