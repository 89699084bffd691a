"""The members side of the fan-out benchmarks on picows + uvloop.

The Twisted/Autobahn members generator parses every frame in Python and runs
out of its core at about 20k deliveries/s, below what the server can send.
picows parses frames in C, and a delivery here costs one regex search: this
generator can count well past 100k deliveries/s on one core. It speaks the
same line protocol with the parent as ``cross_instance.py``'s own generator
(events on stdout, commands on stdin) and reports the same result fields.

    python bench/fast_members.py SPEC_JSON   (started by cross_instance.py)
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

import uvloop
from cross_instance import DRAIN_IDLE, WARMUP, Stats, cpu_now, emit, percentile
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CONNECT_CONCURRENCY = 200
_ID = re.compile(rb'"id":(\d+)')
_BODY = re.compile(rb'"body":"([0-9.e+-]+)\|([01])\|')


class Member(WSListener):
    """One room member: joins on connect, checks ids, records latency of window messages."""

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
            self.stats.closed_during_run["member"] += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        stats = self.stats
        if payload.startswith(b'{"type":"message"'):
            body = _BODY.search(payload)
            sent = float(body.group(1)) if body and body.group(2) == b"1" else None
            mid = int(_ID.search(payload).group(1))
            self.last_id = stats.delivered(self.last_id, mid, time.time(), sent)
            return
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "joined":
            self.last_id = msg.get("last_id") or 0
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            stats.errors[str(msg.get("code"))] += 1
            if msg.get("ref") == 0 and not self.ready.done():
                self.ready.set_exception(RuntimeError(f"join failed: {msg}"))


async def run(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    rooms, members = spec["rooms"], spec["members"]
    seconds = float(spec["seconds"])
    url_base = f"ws://127.0.0.1:{spec['port_b']}/ws?user="
    result: dict[str, Any] = {"role": "members"}
    marks: dict[str, float] = {}
    peers: list[Member] = []
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(room: str, user: str) -> None:
        async with sem:
            _, member = await ws_connect(
                lambda: Member(stats, room), url_base + user, websocket_handshake_timeout=30
            )
            peers.append(member)
            await asyncio.wait_for(member.ready, 30)

    await asyncio.gather(
        *(connect(f"bench{r}", f"m{r}_{i}") for r in range(rooms) for i in range(members))
    )
    emit("connected", connections=len(peers))

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
        last_value, last_at = -1, time.time()
        while True:
            now = time.time()
            if stats.received >= (expected["n"] or 0):
                result["drain_end"] = "everything arrived"
                break
            if stats.arrivals != last_value:
                last_value, last_at = stats.arrivals, now
            elif now - last_at > DRAIN_IDLE:
                result["drain_end"] = f"stalled: nothing arrived for {DRAIN_IDLE:g}s"
                break
            if now - marks["end"] > spec["drain"]:
                result["drain_end"] = f"--drain limit of {spec['drain']:g}s reached while arriving"
                break
            await asyncio.sleep(0.1)
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


def main() -> None:
    uvloop.run(run(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
