"""Redis Cluster's slot arithmetic: which slot a channel hashes to, and who owns it.

Sharded pub/sub (SSUBSCRIBE / SPUBLISH) must talk to the master that owns the
channel's slot, so a cluster client computes slots itself instead of asking
the cluster per channel (CLUSTER KEYSLOT would be a round trip per room).
The slot map comes from CLUSTER SLOTS and is replaced whole when the cluster
says it changed (MOVED, a lost connection, a periodic refresh).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

SLOTS = 16384


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """The slot of ``key``; a non-empty ``{tag}`` hashes only the tag, as Redis does."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


@dataclass(frozen=True, slots=True)
class Node:
    host: str
    port: int


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SlotMap:
    """Owners of slot ranges, from a CLUSTER SLOTS reply (bytes or str elements).

    ``asked`` is the host of the node that answered: Redis names a node whose
    address it does not know by an empty host (or "?"), meaning that one.
    Replicas are kept too (``nodes``): when every master we knew is gone,
    one of them can still say who serves the slots now.
    """

    def __init__(self, reply: Sequence[Sequence[object]], asked: str = "") -> None:
        ranges = []
        replicas = set()
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            ranges.append((start, end, _node(master, asked)))  # type: ignore[arg-type]
            for replica in entry[3:]:
                replicas.add(_node(replica, asked))  # type: ignore[arg-type]
        self._set(ranges)
        self.replicas = frozenset(replicas - self.masters())

    def _set(self, ranges: list[tuple[int, int, Node]]) -> None:
        ranges.sort(key=lambda r: r[0])
        self._starts = [r[0] for r in ranges]
        self._ranges = ranges

    def owner(self, slot: int) -> Node | None:
        """The master serving ``slot``, or None if no range covers it (cluster not ready)."""
        i = bisect.bisect_right(self._starts, slot) - 1
        if i < 0:
            return None
        start, end, node = self._ranges[i]
        return node if start <= slot <= end else None

    def owner_of(self, channel: bytes) -> Node | None:
        return self.owner(key_slot(channel))

    def masters(self) -> set[Node]:
        return {node for _, _, node in self._ranges}

    def nodes(self) -> set[Node]:
        """Every node the reply named, masters and replicas."""
        return self.masters() | self.replicas

    def covers_all(self) -> bool:
        """Every slot has an owner: the map is complete."""
        expected = 0
        for start, end, _ in self._ranges:
            if start != expected:
                return False
            expected = end + 1
        return expected == SLOTS

    def coverage(self) -> int:
        """How many slots have an owner."""
        return sum(end - start + 1 for start, end, _ in self._ranges)

    def owners(self) -> list[Node | None]:
        """The owner of every slot, by slot: a lookup without bisecting, for hot paths."""
        out: list[Node | None] = [None] * SLOTS
        for start, end, node in self._ranges:
            out[start : end + 1] = [node] * (end - start + 1)
        return out

    def with_owner(self, slot: int, node: Node) -> SlotMap:
        """This map with ``slot`` served by ``node`` (what a MOVED reply says)."""
        ranges: list[tuple[int, int, Node]] = []
        for start, end, owner in self._ranges:
            if start <= slot <= end:
                if start < slot:
                    ranges.append((start, slot - 1, owner))
                if slot < end:
                    ranges.append((slot + 1, end, owner))
            else:
                ranges.append((start, end, owner))
        ranges.append((slot, slot, node))
        patched = SlotMap.__new__(SlotMap)
        patched._set(ranges)
        patched.replicas = self.replicas - {node}
        return patched

    def same_owners(self, other: SlotMap) -> bool:
        """Both maps send every slot to the same master."""
        return self.owners() == other.owners()

    def __repr__(self) -> str:
        parts = [f"{s}-{e}:{n.host}:{n.port}" for s, e, n in self._ranges]
        return f"<SlotMap {' '.join(parts)}>"


def _node(entry: Sequence[object], asked: str) -> Node:
    host = _text(entry[0])
    if host in ("", "?"):
        host = asked
    return Node(host, int(entry[1]))  # type: ignore[call-overload]
