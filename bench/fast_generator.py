"""The load generator of the fan-out benchmarks on picows + uvloop.

The Twisted/Autobahn generator parses every frame in Python: its members run
out of their core at about 20k deliveries/s, below what the servers can send,
and its senders spent a fifth of the generator's core on 500 messages/s.
picows parses and masks frames in C; a delivery here costs one regex search.
It speaks the same line protocol with the parent as ``cross_instance.py``'s own
generator (events on stdout, commands on stdin for the members) and reports
the same result fields.

    python bench/fast_generator.py members|senders SPEC_JSON   (started by cross_instance.py)
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop
from cross_instance import DRAIN_IDLE, TICK, WARMUP, Stats, cpu_now, emit, percentile
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CONNECT_CONCURRENCY = 200
_ID = re.compile(rb'"id":(\d+)')
_BODY = re.compile(rb'"body":"([0-9.e+-]+)\|([01])\|')


class Peer(WSListener):
    """A connection that joins its room on connect; ``ready`` fires with ``joined``."""

    role = "peer"

    def __init__(self, stats: Stats, room: str) -> None:
        self.stats = stats
        self.room = room
        self.last_id: int | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        join = json.dumps({"type": "join", "room": self.room, "ref": 0}).encode()
        transport.send(WSMsgType.TEXT, join)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(RuntimeError("closed before joining"))
        elif self.stats.phase != "done":
            self.stats.closed_during_run[self.role] += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        if payload.startswith(b'{"type":"message"'):
            self.message(payload)
            return
        msg = json.loads(payload)  # an answer: off the hot path
        kind = msg.get("type")
        if kind == "ack":
            self.stats.acked(msg.get("ref"), time.time())
        elif kind == "joined":
            self.last_id = msg.get("last_id") or 0
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            self.stats.errors[str(msg.get("code"))] += 1
            if msg.get("ref") == 0 and not self.ready.done():
                self.ready.set_exception(RuntimeError(f"join failed: {msg}"))

    def message(self, payload: bytes) -> None:
        """A delivery, on the hot path: one per member per message."""


class Member(Peer):
    """A room member: checks ids, records the latency of window messages."""

    role = "member"

    def message(self, payload: bytes) -> None:
        body = _BODY.search(payload)
        sent = float(body.group(1)) if body and body.group(2) == b"1" else None
        mid = int(_ID.search(payload).group(1))
        self.last_id = self.stats.delivered(self.last_id, mid, time.time(), sent)


class Sender(Peer):
    """A room's sender, a member of its room too: its copies are not counted."""

    role = "sender"


async def connect_all(
    port: int, peers: list[Any], make: Callable[[str], Any], names: list[tuple[str, str]]
) -> None:
    """Open and join every (room, user), a bounded number at a time."""
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    url_base = f"ws://127.0.0.1:{port}/ws?user="

    async def connect(room: str, user: str) -> None:
        async with sem:
            _, peer = await ws_connect(
                lambda: make(room), url_base + user, websocket_handshake_timeout=30
            )
            peers.append(peer)
            await asyncio.wait_for(peer.ready, 30)

    await asyncio.gather(*(connect(room, user) for room, user in names))
    emit("connected", connections=len(peers))


async def drain(
    done: Callable[[], bool], progress: Callable[[], int], end: float, limit: float
) -> str:
    """Wait for stragglers: until everything is in, nothing moves, or the limit passes."""
    last_value, last_at = -1, time.time()
    while True:
        now = time.time()
        if done():
            return "everything arrived"
        value = progress()
        if value != last_value:
            last_value, last_at = value, now
        elif now - last_at > DRAIN_IDLE:
            return f"stalled: nothing arrived for {DRAIN_IDLE:g}s"
        if now - end > limit:
            return f"--drain limit of {limit:g}s reached while arriving"
        await asyncio.sleep(0.1)


async def run_members(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    rooms, members = spec["rooms"], spec["members"]
    seconds = float(spec["seconds"])
    result: dict[str, Any] = {"role": "members"}
    marks: dict[str, float] = {}
    peers: list[Member] = []
    names = [(f"bench{r}", f"m{r}_{i}") for r in range(rooms) for i in range(members)]
    await connect_all(spec["port_b"], peers, lambda room: Member(stats, room), names)

    expected: dict[str, int | None] = {"n": None}
    window_over = asyncio.Event()
    sent_known = asyncio.Event()

    def measure_start() -> None:
        stats.phase = "measure"
        marks["cpu_measure"], marks["measure"] = cpu_now(), time.time()

    def measure_end() -> None:
        stats.phase = "drain"
        marks["cpu_end"], marks["end"] = cpu_now(), time.time()
        window_over.set()

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def control() -> None:
        while True:
            line = await reader.readline()
            if not line:
                if stats.phase != "done":
                    result["error"] = f"members: parent closed stdin in phase {stats.phase}"
                    window_over.set()
                    sent_known.set()
                return
            cmd = json.loads(line)
            if cmd["cmd"] == "start":
                stats.t0, stats.phase = cmd["t"], "warmup"
                stats.window_start = stats.t0 + WARMUP
                stats.window_end = stats.window_start + seconds
                now = time.time()
                loop.call_later(max(0.0, stats.window_start - now), measure_start)
                loop.call_later(max(0.0, stats.window_end - now), measure_end)
            elif cmd["cmd"] == "measure_end":
                expected["n"] = cmd["sent"] * members
                sent_known.set()

    control_task = asyncio.create_task(control())
    await window_over.wait()
    await sent_known.wait()
    if "error" not in result:
        result["drain_end"] = await drain(
            lambda: stats.received >= (expected["n"] or 0),
            lambda: stats.arrivals,  # warm-up deliveries count too
            marks["end"],
            spec["drain"],
        )
        marks["drained"] = time.time()
        stats.phase = "done"
        lat = sorted(stats.latency)
        result.update(
            cpu=(marks["cpu_end"] - marks["cpu_measure"]) / (marks["end"] - marks["measure"]),
            errors=dict(stats.errors),
            closed_during_run=dict(stats.closed_during_run),
            drain=marks["drained"] - marks["end"],
            received=stats.received,
            duplicates=stats.duplicates,
            gaps=stats.gaps,
            arrivals_in_window=stats.arrivals_in_window,
            timeline=stats.timeline,
            latency_ms={p: percentile(lat, p) * 1000 for p in (50, 90, 99, 100)},
        )
    stats.phase = "done"
    emit("result", **result)
    control_task.cancel()
    for peer in peers:
        if peer.transport is not None:
            peer.transport.send_close(WSCloseCode.OK)
            peer.transport.disconnect()


async def run_senders(spec: dict[str, Any]) -> None:
    """Open-loop pacing: message k is due at start + k / rate, however late a tick fires."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    rooms, rate = spec["rooms"], float(spec["rate"])
    seconds = float(spec["seconds"])
    result: dict[str, Any] = {"role": "senders"}
    t: dict[str, float] = {}
    peers: list[Sender] = []
    names = [(f"bench{r}", f"s{r}") for r in range(rooms)]
    await connect_all(spec["port_a"], peers, lambda room: Sender(stats, room), names)
    by_room = {p.room: p for p in peers}
    order = [by_room[f"bench{r}"] for r in range(rooms)]
    first_window = round(WARMUP * rate)
    end_index = round((WARMUP + seconds) * rate)
    stats.window_first_seq, stats.window_last_seq = first_window, end_index - 1
    window_over = asyncio.Event()

    def send_one(now: float) -> None:
        peer = order[stats.sent % rooms]
        frame = stats.next_send(peer.room, now, t["start"], rate, first_window)
        if peer.transport is None:
            stats.errors["sender gone"] += 1
            return
        peer.transport.send(WSMsgType.TEXT, frame)

    def tick() -> None:
        now = time.time()
        if stats.phase == "warmup" and now >= t["measure_at"]:
            stats.phase = "measure"
            t["cpu_measure"], t["measure"] = cpu_now(), now
            emit("measure_start")
        due = min(int((now - t["start"]) * rate) + 1, end_index)
        while stats.sent < due:
            send_one(now)
        if stats.phase == "measure" and now >= t["end_at"]:
            stats.phase = "drain"
            t["cpu_end"], t["end"] = cpu_now(), now
            emit("measure_end", sent=stats.window_sent)
            window_over.set()
            return
        loop.call_at(loop.time() + TICK, tick)

    now = time.time()
    t.update(start=now, measure_at=now + WARMUP, end_at=now + WARMUP + seconds)
    stats.phase = "warmup"
    emit("start", t=now)
    tick()
    await window_over.wait()
    result["drain_end"] = await drain(
        lambda: stats.window_acks >= stats.window_sent, lambda: stats.acks, t["end"], spec["drain"]
    )
    t["drained"] = time.time()
    stats.phase = "done"
    ack = sorted(stats.ack_latency)
    result.update(
        cpu=(t["cpu_end"] - t["cpu_measure"]) / (t["end"] - t["measure"]),
        errors=dict(stats.errors),
        closed_during_run=dict(stats.closed_during_run),
        drain=t["drained"] - t["end"],
        sent=stats.window_sent,
        acks=stats.window_acks,
        window=t["end"] - t["measure"],
        pacing_lag_ms=stats.pacing_lag * 1000,
        ack_latency_ms={p: percentile(ack, p) * 1000 for p in (50, 99)},
    )
    emit("result", **result)
    for peer in peers:
        if peer.transport is not None:
            peer.transport.send_close(WSCloseCode.OK)
            peer.transport.disconnect()


async def run(role: str, spec: dict[str, Any]) -> None:
    """A generator that does not finish by the deadline reports an error, not a hang."""
    runner = run_members if role == "members" else run_senders
    try:
        await asyncio.wait_for(runner(spec), spec["deadline"])
    except TimeoutError:
        emit("result", role=role, error=f"{role}: deadline reached")


def main() -> None:
    role, spec = sys.argv[1], json.loads(sys.argv[2])
    if role not in ("members", "senders"):
        sys.exit(f"unknown role {role!r}")
    uvloop.run(run(role, spec))


if __name__ == "__main__":
    main()
