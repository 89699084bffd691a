"""Soak benchmark: does a long-running daemon stay flat under connection churn?

A leak that costs a few hundred bytes per connection never shows in a test
that opens a hundred; it shows after an hour of clients coming and going. This
script starts everything it needs (a throwaway Redis and Postgres from
tests/servers.py, the server as a real ``twistd -n chatserver`` process on
both, and a load generator in a process of its own), runs a steady churn for
``--seconds``, samples the server every ``--sample`` seconds, and judges:

- RSS grows less than ``--rss-slope-max`` MiB per 10 minutes (least-squares
  slope over the samples after the warm-up: the first 20 % of the run, at
  least 60 s, when pools, caches and the allocator's arenas fill up);
- after the load stops, open fds, WebSocket connections, rooms hosted and
  Redis subscriptions return to their baseline (measured before the load)
  within ``--settle`` seconds;
- the database connections stay what they were at the baseline throughout.

    python bench/soak.py [--seconds 1800] [--sample 10] [--plot soak.svg] [--csv soak.csv]

The churn: ``--cyclers`` clients each loop connect, join 1-3 rooms, send,
read history, and end in one of several ways (leave and close; close with the
rooms still joined; vanish by aborting the TCP connection after the
conversation, or in the middle of its joins, or in the middle of the opening
handshake). ``--idle`` members stay connected throughout in the shared rooms
and receive their messages. Ephemeral rooms are visited by churning clients
only, so they are hosted and dropped (Redis SUBSCRIBE/UNSUBSCRIBE) all the time.

The server runs on CPU 0 and the generator on CPU 1 (``taskset``) when both
are ours; the generator's CPU is reported so a reader can see it was not the
limit. Exit status 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import itertools
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cross_instance import (
    SERVER_ENV,
    Instance,
    can_pin,
    cpu_seconds,
    cpu_times,
    pinned,
    raise_fd_limit,
    server_argv,
    venv_tool,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATABASE = "chatsoak"
SERVER_START_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
WARMUP_FRACTION = 0.2
WARMUP_MIN = 60.0
RSS_SLOPE_MAX = 1.0  # MiB per 10 minutes
MIN_FIT_SAMPLES = 3
PRIME_ROUNDS = 5
SETTLE_POLL = 0.5
TABLE_ROWS = 40
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0
TICK = 1.0
# How a churning client's visit ends, with its share of the visits. The
# variants are where a server forgets to clean up: a close with rooms still
# joined, a peer that vanishes without a close frame (after its conversation,
# with joins and a send in flight, or before its handshake is complete).
ENDINGS: dict[str, float] = {
    "leave+close": 0.50,
    "close": 0.20,
    "abort": 0.15,
    "abort-mid-join": 0.10,
    "abort-mid-handshake": 0.05,
}
MIB = 1024.0


def percent(value: float) -> str:
    """A CPU share as a percentage of one core, '-' when unknown."""
    return "-" if value != value else f"{value * 100:.0f}%"


# -- load generator (its own process, Twisted + Autobahn) -------------------------


def emit(event: str, **data: Any) -> None:
    """One JSON line on stdout for the parent."""
    print(json.dumps({"event": event, **data}), flush=True)


def run_generator(mode: str, spec: dict[str, Any]) -> None:
    """The generator process: 'prime' opens the server's pools, 'load' is the soak.

    Prime: a burst of concurrent joins and history reads, so that every
    database connection of the pool is opened before the baseline is taken
    (adbapi opens one per pool thread on that thread's first interaction).
    Load: idle members, then the churning clients until ``seconds``, then
    everything closes and the result is reported.
    """
    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        connectWS,
    )
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import LoopingCall, deferLater

    port = spec["port"]
    rng = random.Random(spec["seed"])
    stats: Counter[str] = Counter()
    state: dict[str, Any] = {"stopping": False, "refs": 0}
    shared = [f"shared{k}" for k in range(spec["shared_rooms"])]
    ephemeral = [f"eph{k}" for k in range(spec["ephemeral_rooms"])]
    endings, weights = list(ENDINGS), list(ENDINGS.values())

    class Conn(WebSocketClientProtocol):
        """Answers are matched by ref; message frames are only counted."""

        def __init__(self) -> None:
            super().__init__()
            self.pending: dict[int, Deferred[dict[str, Any] | None]] = {}
            self.closed: Deferred[int | None] = Deferred()
            self.idle = False

        def onOpen(self) -> None:
            self.factory.opened.callback(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if payload.startswith(b'{"type":"message"'):
                stats["deliveries"] += 1
                return
            msg = json.loads(payload)
            if msg.get("type") == "error":
                stats[f"error frame: {msg.get('code')}"] += 1
            d = self.pending.pop(msg.get("ref"), None)
            if d is not None:
                d.callback(msg)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            opened = self.factory.opened
            if not opened.called:
                opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
            pending, self.pending = self.pending, {}
            for d in pending.values():
                d.callback(None)  # None: the connection went away before the answer
            if self.idle and not state["stopping"]:
                stats[f"idle member closed: {code}"] += 1
            if not self.closed.called:
                self.closed.callback(code)

    async def connect(user: str) -> Conn:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws?user={user}")
        factory.protocol = Conn
        factory.setProtocolOptions(
            utf8validateIncoming=False,
            autoPingInterval=0,  # the server pings; Autobahn answers by itself
            openHandshakeTimeout=CONNECT_TIMEOUT,
            closeHandshakeTimeout=5,
        )
        factory.opened = Deferred()
        factory.clientConnectionFailed = lambda _c, reason: (
            factory.opened.called or factory.opened.errback(reason)
        )
        connectWS(factory, timeout=CONNECT_TIMEOUT)
        conn: Conn = await factory.opened.addTimeout(CONNECT_TIMEOUT + 5, reactor)
        stats["connects"] += 1
        return conn

    def send(conn: Conn, frame: dict[str, Any]) -> int:
        state["refs"] += 1
        frame["ref"] = state["refs"]
        conn.sendMessage(json.dumps(frame).encode())
        return state["refs"]

    async def request(conn: Conn, frame: dict[str, Any], expect: str) -> dict[str, Any] | None:
        """Send and wait for the answer; count what did not answer as expected."""
        d: Deferred[dict[str, Any] | None] = Deferred()
        conn.pending[send(conn, frame)] = d
        answer = await d.addTimeout(REQUEST_TIMEOUT, reactor)
        if answer is None:
            stats[f"gone before {expect}"] += 1
        elif answer.get("type") != expect:
            stats[f"unexpected answer to {frame['type']}: {answer.get('type')}"] += 1
        return answer

    def pick_rooms() -> list[str]:
        count = rng.randint(1, 3)
        rooms = {rng.choice(shared if rng.random() < 0.5 else ephemeral) for _ in range(count)}
        return sorted(rooms)

    async def vanish_mid_handshake() -> None:
        """Half an upgrade request, then a TCP abort: the server's HTTP side must let go."""
        lost: Deferred[None] = Deferred()

        class Half(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(
                    f"GET /ws?user=half HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    "Upgrade: websocket\r\n".encode()
                )
                self.transport.abortConnection()

            def connectionLost(self, reason: Any = None) -> None:
                lost.callback(None)

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=CONNECT_TIMEOUT)
        await endpoint.connect(Factory.forProtocol(Half))
        await lost

    async def visit(user: str) -> None:
        """One churning client's visit, from connect to its chosen ending."""
        ending = rng.choices(endings, weights)[0]
        stats[f"ending {ending}"] += 1
        if ending == "abort-mid-handshake":
            await vanish_mid_handshake()
            return
        conn = await connect(user)
        rooms = pick_rooms()
        if ending == "abort-mid-join":
            for room in rooms:
                send(conn, {"type": "join", "room": room})
            send(conn, {"type": "send", "room": rooms[0], "body": f"in flight from {user}"})
            conn.transport.abortConnection()
            await conn.closed
            return
        try:
            joins = [request(conn, {"type": "join", "room": r}, "joined") for r in rooms]
            await gatherResults([Deferred.fromCoroutine(j) for j in joins], consumeErrors=True)
            for i in range(rng.randint(1, spec["sends"])):
                room = rng.choice(rooms)
                body = f"{user} says {i} " + "x" * rng.randint(0, 200)
                if await request(conn, {"type": "send", "room": room, "body": body}, "ack"):
                    stats["acks"] += 1
            room = rng.choice(rooms)
            await request(conn, {"type": "history", "room": room, "limit": 20}, "history")
            if ending == "abort":
                conn.transport.abortConnection()
            else:
                if ending == "leave+close":
                    for room in rooms:
                        await request(conn, {"type": "leave", "room": room}, "left")
                conn.sendClose(1000)
        except BaseException:
            conn.transport.abortConnection()
            raise
        finally:
            await conn.closed

    async def cycler(index: int) -> None:
        while not state["stopping"]:
            try:
                await visit(f"churn{index}")
                stats["cycles"] += 1
            except Exception as e:
                stats[f"failed visit: {type(e).__name__}"] += 1
            think = spec["think"]
            if think > 0 and not state["stopping"]:
                await deferLater(reactor, rng.uniform(0, 2 * think))

    async def idle_member(index: int) -> Conn:
        conn = await connect(f"idle{index}")
        conn.idle = True
        for room in sorted(set(rng.sample(shared, min(2, len(shared))))):
            await request(conn, {"type": "join", "room": room}, "joined")
        return conn

    async def prime() -> None:
        async def one(index: int) -> None:
            conn = await connect(f"prime{index}")
            room = shared[index % len(shared)]
            await request(conn, {"type": "join", "room": room}, "joined")
            reads = [
                request(conn, {"type": "history", "room": room, "limit": 50}, "history")
                for _ in range(spec["prime_reads"])
            ]
            await gatherResults([Deferred.fromCoroutine(r) for r in reads], consumeErrors=True)
            conn.sendClose(1000)
            await conn.closed

        await gatherResults(
            [Deferred.fromCoroutine(one(i)) for i in range(spec["prime_clients"])],
            consumeErrors=True,
        )

    def tick() -> None:
        emit("tick", stats=dict(stats))

    ticker = LoopingCall(tick)
    result: dict[str, Any] = {}

    async def load() -> None:
        members = await gatherResults(
            [Deferred.fromCoroutine(idle_member(i)) for i in range(spec["idle"])],
            consumeErrors=True,
        )
        emit("started", idle=len(members))
        ticker.start(TICK)
        runs = [Deferred.fromCoroutine(cycler(i)) for i in range(spec["cyclers"])]
        await deferLater(reactor, spec["seconds"])
        state["stopping"] = True
        emit("stopping", stats=dict(stats))
        await gatherResults(runs, consumeErrors=True)
        for conn in members:
            conn.sendClose(1000)
        await gatherResults([m.closed for m in members], consumeErrors=True)

    async def main() -> None:
        try:
            await (prime() if mode == "prime" else load())
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            if ticker.running:
                ticker.stop()
            emit("result", stats=dict(stats), **result)
            state["reported"] = True
            reactor.stop()

    class ParentWatch(Protocol):
        """Our stdin ends when the parent is done with us, or died: then stop at once."""

        def connectionLost(self, reason: Any = None) -> None:
            os._exit(0 if "reported" in state else 3)

    stdio.StandardIO(ParentWatch())
    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()


# -- orchestration (parent process) -------------------------------------------------


class GeneratorProcess:
    """The generator subprocess: JSON events on its stdout."""

    def __init__(self, mode: str, spec: dict[str, Any], pin: bool, log: Path) -> None:
        self.mode = mode
        self.log = log
        self._buffer = b""
        self.stats: dict[str, int] = {}
        self.events: dict[str, float] = {}  # event name -> monotonic time first seen
        self.result: dict[str, Any] | None = None
        argv = [sys.executable, str(Path(__file__).resolve()), "--_generator", mode]
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                pinned([*argv, json.dumps(spec)], 1, pin),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.PIPE,
                start_new_session=True,
            )

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def cpu(self) -> float:
        """CPU seconds so far (from /proc: also while it is busy and not reporting)."""
        try:
            return cpu_seconds(self.proc.pid)
        except (OSError, IndexError):
            return float("nan")

    def pump(self, timeout: float) -> None:
        """Read what the generator said within ``timeout`` seconds."""
        ready, _, _ = select.select([self], [], [], max(0.0, timeout))
        if not ready:
            return
        chunk = os.read(self.fileno(), 65536)
        if not chunk:
            if self.result is None:
                raise RuntimeError(
                    f"{self.mode} generator ended (exit {self.proc.wait(5)}):\n{self.log_tail()}"
                )
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            name = event.get("event")
            self.events.setdefault(name, time.monotonic())
            self.stats = event.get("stats", self.stats)
            if name == "result":
                self.result = event
                if "error" in event:
                    raise RuntimeError(f"{self.mode} generator failed: {event['error']}")

    def wait_result(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while self.result is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.mode} generator did not finish in {timeout:.0f}s")
            self.pump(min(left, 1.0))
        return self.result

    def stop(self) -> None:
        """Let a generator that reported exit by itself; kill it otherwise."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.result is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "<no log>"


@dataclass
class Sample:
    """One look at the server; counters (CPU, cycles) are cumulative."""

    t: float  # seconds since the load started (negative: the baseline)
    phase: str
    rss_kib: int
    fds: int
    threads: int
    connections: float
    rooms_hosted: float
    subscribed_rooms: float  # chatserver_redis_subscribed_rooms
    redis_channels: int  # PUBSUB CHANNELS chat:*
    redis_subscribers: int  # sum of PUBSUB NUMSUB over those channels
    db_connections: int  # pg_stat_activity for the server's database
    store_queue: float
    server_cpu: float
    generator_cpu: float
    cycles: int


# What must come back to the baseline once the load has stopped.
SETTLED = (
    "fds",
    "connections",
    "rooms_hosted",
    "subscribed_rooms",
    "redis_channels",
    "redis_subscribers",
)


class Probe:
    """Reads the server's numbers from /proc, /metrics, Redis and Postgres."""

    def __init__(self, server: Instance, redis: Any, pg: Any) -> None:
        assert server.proc is not None
        self.pid = server.proc.pid
        self.port = server.port
        self.redis = redis
        self.pg = pg

    def proc_status(self) -> tuple[int, int]:
        rss = threads = 0
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        return rss, threads

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of GET /metrics, by name."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels:
                    values[sample.name] = sample.value
        return values

    def redis_subscriptions(self) -> tuple[int, int]:
        channels = self.redis.command("PUBSUB", "CHANNELS", "chat:*") or []
        if not channels:
            return 0, 0
        reply = self.redis.command("PUBSUB", "NUMSUB", *channels)
        return len(channels), sum(int(n) for n in reply[1::2])

    def db_connections(self) -> int:
        rows = self.pg.query(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = %s AND backend_type = 'client backend'",
            (DATABASE,),
        )
        return int(rows[0][0])

    def sample(self, t: float, phase: str, gen: GeneratorProcess | None) -> Sample:
        # fds before /metrics: our own HTTP request is an fd of the server's meanwhile.
        fds = self.fds()
        rss, threads = self.proc_status()
        server_cpu = cpu_seconds(self.pid)
        m = self.metrics()
        channels, subscribers = self.redis_subscriptions()
        return Sample(
            t=round(t, 2),
            phase=phase,
            rss_kib=rss,
            fds=fds,
            threads=threads,
            connections=m.get("chatserver_connections", float("nan")),
            rooms_hosted=m.get("chatserver_rooms_hosted", float("nan")),
            subscribed_rooms=m.get("chatserver_redis_subscribed_rooms", float("nan")),
            redis_channels=channels,
            redis_subscribers=subscribers,
            db_connections=self.db_connections(),
            store_queue=m.get("chatserver_store_queue_depth", float("nan")),
            server_cpu=server_cpu,
            generator_cpu=gen.cpu() if gen is not None else float("nan"),
            cycles=gen.stats.get("cycles", 0) if gen is not None else 0,
        )


def wait_ready(port: int, timeout: float) -> None:
    """/readyz answers 200 once Redis and the database both answer."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as resp:
                if resp.status == 200:
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout:.0f}s: {last}")


def slope_per_10min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), in MiB per 10 minutes (nan if too few)."""
    if len(points) < MIN_FIT_SAMPLES:
        return float("nan")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return float("nan")
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx * 600.0


def rates(samples: list[Sample]) -> list[dict[str, float]]:
    """Per-interval server CPU, generator CPU and cycles/s, for each sample after the first."""
    out = [{"server": float("nan"), "generator": float("nan"), "cycles": float("nan")}]
    for a, b in itertools.pairwise(samples):
        dt = b.t - a.t
        if dt <= 0:
            out.append(out[-1])
            continue
        out.append(
            {
                "server": (b.server_cpu - a.server_cpu) / dt,
                "generator": (b.generator_cpu - a.generator_cpu) / dt,
                "cycles": (b.cycles - a.cycles) / dt,
            }
        )
    return out


def table(samples: list[Sample], per: list[dict[str, float]]) -> str:
    """Markdown table of every Nth sample (and every sample outside the steady load)."""
    steady = [i for i, s in enumerate(samples) if s.phase == "load"]
    step = max(1, math.ceil(len(steady) / TABLE_ROWS))
    keep = {i for i, s in enumerate(samples) if s.phase != "load"}
    keep |= set(steady[::step]) | set(steady[-1:])
    head = (
        "| t (s) | phase | RSS (MiB) | fds | threads | conns | rooms hosted | redis subs"
        " (metric) | redis channels / subscribers | DB conns | store queue | cycles/s"
        " | server CPU | generator CPU |"
    )
    lines = [head, "|" + "---|" * 14]
    for i in sorted(keep):
        s, r = samples[i], per[i]
        steady_phase = s.phase in ("warm-up", "load")
        cycles = f"{r['cycles']:.1f}" if steady_phase and r["cycles"] == r["cycles"] else "-"
        lines.append(
            f"| {s.t:.0f} | {s.phase} | {s.rss_kib / MIB:.2f} | {s.fds} | {s.threads}"
            f" | {s.connections:.0f} | {s.rooms_hosted:.0f} | {s.subscribed_rooms:.0f}"
            f" | {s.redis_channels} / {s.redis_subscribers} | {s.db_connections}"
            f" | {s.store_queue:.0f} | {cycles} | {percent(r['server'])}"
            f" | {percent(r['generator'])} |"
        )
    if step > 1:
        lines.append(f"\n(every {step}th sample of the steady load; all are in the CSV)")
    return "\n".join(lines)


def write_csv(path: Path, samples: list[Sample], per: list[dict[str, float]]) -> None:
    names = [f.name for f in fields(Sample)]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, "server_cpu_share", "generator_cpu_share", "cycles_per_s"])
        for s, r in zip(samples, per, strict=True):
            row = asdict(s)
            writer.writerow(
                [row[n] for n in names]
                + [f"{r['server']:.4f}", f"{r['generator']:.4f}", f"{r['cycles']:.2f}"]
            )


def write_svg(
    path: Path,
    samples: list[Sample],
    warmup_end: float,
    load_end: float,
    fit: tuple[float, float, float] | None,
    title: str,
) -> None:
    """Two panels, RSS and fds over time, as plain SVG: no plotting library needed.

    ``fit`` is (slope per second, intercept, first t) of the RSS line in MiB.
    """
    width, height, left, right, top, panel_h, gap = 900, 560, 70, 20, 40, 210, 60
    plot_w = width - left - right
    ts = [s.t for s in samples]
    t_min, t_max = min(ts), max(ts)
    if t_max <= t_min:
        t_max = t_min + 1

    def x(t: float) -> float:
        return left + (t - t_min) / (t_max - t_min) * plot_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14">{escape(title)}</text>',
    ]
    panels = [
        ("RSS (MiB)", [s.rss_kib / MIB for s in samples], "#1f77b4"),
        ("open fds", [float(s.fds) for s in samples], "#d62728"),
    ]
    for index, (label, values, colour) in enumerate(panels):
        y0 = top + index * (panel_h + gap)
        lo, hi = min(values), max(values)
        pad = max((hi - lo) * 0.1, 0.5)
        lo, hi = lo - pad, hi + pad

        def y(v: float, y0: float = y0, lo: float = lo, hi: float = hi) -> float:
            return y0 + panel_h - (v - lo) / (hi - lo) * panel_h

        out.append(
            f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}"'
            ' fill="none" stroke="#999"/>'
        )
        if warmup_end > t_min:
            out.append(
                f'<rect x="{left}" y="{y0}" width="{x(min(warmup_end, t_max)) - left:.1f}"'
                f' height="{panel_h}" fill="#eee"/>'
            )
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            out.append(
                f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>'
                f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}"'
                ' stroke="#eee"/>'
            )
        if t_min <= load_end <= t_max:
            out.append(
                f'<line x1="{x(load_end):.1f}" x2="{x(load_end):.1f}" y1="{y0}"'
                f' y2="{y0 + panel_h}" stroke="#555" stroke-dasharray="4 3"/>'
                f'<text x="{x(load_end) - 4:.1f}" y="{y0 + 14}" text-anchor="end">'
                "load stops</text>"
            )
        points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(ts, values, strict=True))
        out.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
        )
        if index == 0 and fit is not None:
            slope, intercept, start = fit
            out.append(
                f'<line x1="{x(start):.1f}" y1="{y(intercept + slope * start):.1f}"'
                f' x2="{x(load_end):.1f}" y2="{y(intercept + slope * load_end):.1f}"'
                ' stroke="black" stroke-dasharray="6 3"/>'
            )
        out.append(f'<text x="{left + 6}" y="{y0 - 6}" fill="{colour}">{escape(label)}</text>')
        for k in range(6):
            t = t_min + (t_max - t_min) * k / 5
            label_y = y0 + panel_h + 16
            out.append(f'<text x="{x(t):.1f}" y="{label_y}" text-anchor="middle">{t:.0f}s</text>')
    out.append(
        f'<text x="{left}" y="{height - 8}" fill="#555">grey: warm-up (excluded from the'
        " RSS fit); dashed black: least-squares fit of RSS over the steady load</text>"
    )
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def settle(
    probe: Probe, baseline: Sample, deadline: float, t_of: Any, gen: GeneratorProcess
) -> tuple[Sample, float | None]:
    """Poll until everything in SETTLED is back at the baseline, or the deadline passes.

    Returns the last sample and the seconds it took (None: not back in time).
    """
    start = time.monotonic()
    while True:
        now = time.monotonic()
        last = probe.sample(t_of(now), "settle", gen)
        if all(getattr(last, k) == getattr(baseline, k) for k in SETTLED):
            return last, now - start
        if now >= deadline:
            return last, None
        time.sleep(SETTLE_POLL)


def cleanup(
    gens: list[GeneratorProcess],
    server: Instance | None,
    backends: list[Any],
    root: Path,
    keep: bool,
) -> str:
    """Stop what we started, each step on its own so that one failure leaks nothing else."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lines: list[str] = []
    for gen in gens:
        try:
            gen.stop()
        except Exception as e:
            lines.append(f"stopping the {gen.mode} generator failed: {e!r}")
    if server is not None:
        try:
            code: Any = server.stop()
        except Exception as e:
            code = f"stop failed: {e!r}"
            if server.proc is not None:
                with contextlib.suppress(OSError):
                    server.proc.kill()
        notable = server.notable_log_lines()
        if notable or code not in (0, None):
            lines.append(f"server log (exit {code}), warnings/errors by count:")
            lines += [f"  {line}" for line in notable]
        else:
            lines.append(f"server: no warnings or errors in its log (exit {code})")
    for backend in backends:
        if backend is None:
            continue
        try:
            backend.close()
        except Exception as e:
            lines.append(f"closing {type(backend).__name__} failed: {e!r}")
    if keep:
        lines.append(f"kept working files in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return "\n".join(lines)


def verdicts(
    args: argparse.Namespace,
    samples: list[Sample],
    baseline: Sample,
    warmup: float,
    load_end: float,
    settled: tuple[Sample, float | None],
) -> tuple[list[tuple[bool, str]], tuple[float, float, float] | None, float]:
    """The pass criteria, each as (passed, line with the numbers)."""
    out: list[tuple[bool, str]] = []
    fit_points = [
        (s.t, s.rss_kib / MIB) for s in samples if s.phase == "load" and warmup <= s.t <= load_end
    ]
    slope = slope_per_10min(fit_points)
    fit = None
    if slope == slope:
        n = len(fit_points)
        mx = sum(p[0] for p in fit_points) / n
        my = sum(p[1] for p in fit_points) / n
        fit = (slope / 600.0, my - slope / 600.0 * mx, fit_points[0][0])
        first, last = fit_points[0][1], fit_points[-1][1]
        out.append(
            (
                slope < args.rss_slope_max,
                f"RSS slope after warm-up: {slope:+.3f} MiB / 10 min over {n} samples"
                f" ({warmup:.0f}-{load_end:.0f} s; {first:.2f} -> {last:.2f} MiB);"
                f" limit {args.rss_slope_max:g}",
            )
        )
    else:
        out.append(
            (
                False,
                f"RSS slope: fewer than {MIN_FIT_SAMPLES} samples after the {warmup:.0f} s"
                " warm-up; run longer",
            )
        )
    last, took = settled
    diffs = ", ".join(
        f"{k} {getattr(baseline, k):g} -> {getattr(last, k):g}"
        for k in SETTLED
        if getattr(last, k) != getattr(baseline, k)
    )
    values = ", ".join(f"{k}={getattr(baseline, k):g}" for k in SETTLED)
    if took is not None:
        out.append(
            (True, f"back to baseline {took:.1f} s after the generator's last close: {values}")
        )
    else:
        out.append(
            (False, f"NOT back to baseline within {args.settle:g} s of the load stopping: {diffs}")
        )
    counts = sorted({s.db_connections for s in samples})
    out.append(
        (
            counts == [baseline.db_connections],
            f"DB connections constant: {baseline.db_connections} at the baseline, seen"
            f" {counts} over {len(samples)} samples",
        )
    )
    return out, fit, slope


def run(args: argparse.Namespace) -> int:
    """Start everything, prime, measure the baseline, soak, settle, judge."""
    sys.path.insert(0, str(REPO / "tests"))
    servers = importlib.import_module("servers")
    pin = can_pin()
    raise_fd_limit(args.idle + args.cyclers * 4 + 4096)
    root = Path(tempfile.mkdtemp(prefix="chatsoak-"))
    redis: Any = None
    pg: Any = None
    server: Instance | None = None
    gens: list[GeneratorProcess] = []
    try:
        redis = servers.RedisServer()
        redis.start()
        pg = servers.PostgresServer()
        pg.start()
        database_url = pg.create_database(DATABASE)
        migrate = subprocess.run(
            [venv_tool("chatserver-admin"), "migrate", "--database-url", database_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"chatserver-admin migrate failed:\n{migrate.stderr}")
        env = {**SERVER_ENV, **os.environ}
        server = Instance("soak", root / "server", servers.free_port())
        argv = server_argv("chatserver", server.port, redis.url, database_url)
        server.start(pinned(argv, 0, pin), env)
        server.wait_listening(SERVER_START_TIMEOUT)
        wait_ready(server.port, READY_TIMEOUT)
        probe = Probe(server, redis, pg)
        spec = {
            "port": server.port,
            "seed": args.seed,
            "shared_rooms": args.shared_rooms,
            "ephemeral_rooms": args.ephemeral_rooms,
            "idle": args.idle,
            "cyclers": args.cyclers,
            "think": args.think,
            "sends": args.sends,
            "seconds": args.seconds,
            "prime_clients": 40,
            "prime_reads": 10,
        }

        # Prime until every pool connection is open: a baseline taken before that
        # would count the pool's later connections as leaked fds.
        pool_size = probe.metrics().get("chatserver_db_pool_size", 0)
        for _ in range(PRIME_ROUNDS):
            primer = GeneratorProcess("prime", spec, pin, root / "prime.log")
            gens.append(primer)
            primer.wait_result(120)
            primer.stop()
            if probe.db_connections() >= pool_size:
                break
        # Wait for the priming clients' connections and rooms to be gone.
        deadline = time.monotonic() + args.settle
        while True:
            baseline = probe.sample(0.0, "baseline", None)
            if baseline.connections == 0 and baseline.rooms_hosted == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"priming clients did not go away: {baseline}")
            time.sleep(SETTLE_POLL)
        load_avg_before = Path("/proc/loadavg").read_text().split()[:3]

        gen = GeneratorProcess("load", spec, pin, root / "load.log")
        gens.append(gen)
        while "started" not in gen.events:
            gen.pump(1.0)
            if gen.result is not None:
                raise RuntimeError(f"load generator ended before starting: {gen.result}")
        t0 = gen.events["started"]
        baseline.generator_cpu = gen.cpu()
        samples = [baseline]
        cpus_start = cpu_times()
        warmup = max(WARMUP_MIN, WARMUP_FRACTION * args.seconds)
        next_at = t0 + args.sample
        hard_deadline = t0 + args.seconds + 180
        print(
            f"soaking for {args.seconds:g} s (warm-up {warmup:g} s), sampling every"
            f" {args.sample:g} s; server pid {probe.pid} on port {server.port}",
            flush=True,
        )
        while gen.result is None:
            now = time.monotonic()
            if now > hard_deadline:
                raise RuntimeError("the load generator did not finish in time")
            gen.pump(min(max(0.0, next_at - now), 1.0))
            now = time.monotonic()
            if now >= next_at:
                t = now - t0
                phase = "warm-up" if t < warmup else "load"
                if "stopping" in gen.events:
                    phase = "wind-down"
                samples.append(probe.sample(t, phase, gen))
                next_at += args.sample
                if args.progress:
                    s = samples[-1]
                    print(
                        f"  t={t:6.0f}s rss={s.rss_kib / MIB:7.2f} MiB fds={s.fds}"
                        f" conns={s.connections:.0f} cycles={s.cycles}",
                        flush=True,
                    )
        cpus_end = cpu_times()
        load_end = gen.events["stopping"] - t0
        closed_at = gen.events["result"]
        stats = gen.result.get("stats", {}) if gen.result else {}
        gen_cpu_total = gen.cpu() - baseline.generator_cpu
        load_seconds = closed_at - t0
        last, took = settle(probe, baseline, closed_at + args.settle, lambda m: m - t0, gen)
        last.phase = "settled" if took is not None else "unsettled"
        samples.append(last)
        load_avg_after = Path("/proc/loadavg").read_text().split()[:3]

        per = rates(samples)
        results, fit, _ = verdicts(args, samples, baseline, warmup, load_end, (last, took))
        ok = all(passed for passed, _ in results)

        print()
        print(table(samples, per))
        print()
        cycles = stats.get("cycles", 0)
        server_cpu = (samples[-1].server_cpu - baseline.server_cpu) / max(load_seconds, 1e-9)
        interval_gen = [r["generator"] for r in per[1:] if r["generator"] == r["generator"]]
        busy = []
        for cpu in ("cpu0", "cpu1"):
            if cpu in cpus_start and cpu in cpus_end:
                total = cpus_end[cpu][1] - cpus_start[cpu][1]
                done = cpus_end[cpu][0] - cpus_start[cpu][0]
                busy.append(f"{cpu} {done / total * 100:.0f}%" if total else f"{cpu} -")
        endings = ", ".join(
            f"{k.removeprefix('ending ')} {v}" for k, v in sorted(stats.items()) if "ending" in k
        )
        trouble = {
            k: v
            for k, v in stats.items()
            if k.startswith(("error", "failed", "gone", "unexpected", "idle member"))
        }
        print(
            f"load: {args.cyclers} churning clients (think {args.think:g} s), {args.idle} idle"
            f" members, {args.shared_rooms} shared + {args.ephemeral_rooms} ephemeral rooms;"
            f" {cycles} visits ({cycles / max(load_end, 1e-9):.1f}/s),"
            f" {stats.get('connects', 0)} WebSocket connects, {stats.get('acks', 0)} messages"
            f" acked, {stats.get('deliveries', 0)} deliveries to clients"
        )
        print(f"visit endings: {endings}")
        print(f"errors and surprises seen by the generator: {json.dumps(trouble) or '{}'}")
        print(
            f"generator CPU: {gen_cpu_total / max(load_seconds, 1e-9) * 100:.0f}% of one core"
            f" on average, {max(interval_gen, default=float('nan')) * 100:.0f}% in its busiest"
            f" interval; server CPU {server_cpu * 100:.0f}% on average"
            f" (pinning: {'server CPU 0, generator CPU 1' if pin else 'none'})"
        )
        print(
            f"machine: {os.cpu_count()} CPUs, busy during the load: {', '.join(busy) or '-'};"
            f" load average {' '.join(load_avg_before)} before, {' '.join(load_avg_after)}"
            " after. Other processes (other engineers' test runs) share this machine, so"
            " CPU and timing figures are noisy."
        )
        print(
            "Python object counts: /metrics exposes none (only gc collections, pause times and"
            " frozen objects); tests/test_soak.py checks the server's objects in-process."
        )
        print()
        for passed, line in results:
            print(f"{'PASS' if passed else 'FAIL'}: {line}")
        print(f"\n{'PASS' if ok else 'FAIL'}")

        csv_path = args.csv or Path(tempfile.gettempdir()) / f"chatsoak-{int(time.time())}.csv"
        write_csv(csv_path, samples, per)
        print(f"samples written to {csv_path}")
        if args.plot:
            title = f"chatserver soak {args.seconds:g} s: {'PASS' if ok else 'FAIL'}"
            write_svg(args.plot, samples, warmup, load_end, fit, title)
            print(f"plot written to {args.plot}")
        return 0 if ok else 1
    finally:
        notes = cleanup(gens, server, [pg, redis], root, args.keep)
        with contextlib.suppress(OSError):
            print(notes, flush=True)


def main() -> int:
    """Parse arguments; the hidden --_generator flag makes this process the load generator."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800, help="length of the load")
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples")
    parser.add_argument("--cyclers", type=int, default=40, help="churning clients at a time")
    parser.add_argument("--idle", type=int, default=100, help="members connected throughout")
    parser.add_argument(
        "--think", type=float, default=0.5, help="mean pause between a client's visits (s)"
    )
    parser.add_argument("--sends", type=int, default=4, help="most messages sent per visit")
    parser.add_argument("--shared-rooms", type=int, default=10)
    parser.add_argument("--ephemeral-rooms", type=int, default=40)
    parser.add_argument(
        "--settle",
        type=float,
        default=30,
        help="seconds the server has to return to its baseline after the load",
    )
    parser.add_argument(
        "--rss-slope-max", type=float, default=RSS_SLOPE_MAX, help="MiB per 10 minutes"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--csv", type=Path, help="where to write the samples")
    parser.add_argument("--plot", type=Path, help="write an SVG plot of RSS and fds here")
    parser.add_argument("--progress", action="store_true", help="print each sample as taken")
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    parser.add_argument("--_generator", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._generator:
        mode, spec = args._generator
        run_generator(mode, json.loads(spec))
        return 0
    if min(args.seconds, args.sample, args.settle) <= 0 or min(args.cyclers, args.idle) < 0:
        parser.error("seconds, sample and settle must be positive")
    if args.shared_rooms < 1 or args.ephemeral_rooms < 1 or args.sends < 1:
        parser.error("shared-rooms, ephemeral-rooms and sends must be at least 1")

    def terminated(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
