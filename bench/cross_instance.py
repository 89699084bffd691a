"""Cross-instance fan-out benchmark: senders on instance A, members on instance B.

Every message takes the scale-out path: stored by A, acked, published to Redis,
received by B's subscriber and fanned out to B's local members. The script
starts everything it needs (Redis, optionally Postgres, both servers and a
load generator in two processes of its own: members, senders), measures,
prints a markdown table and kills what it started, even on errors.

    python bench/cross_instance.py [--store sqlite|postgres] [--rooms 10]
        [--members 100] [--rate 2000] [--seconds 10]

``--workers N`` runs each chatserver instance as a supervisor with N worker
processes on its port (``workers = N``); its CPU is then the sum over the
supervisor and its workers. With ``--no-pin`` nothing is pinned, which is how
N workers can use more than one core (the generator then shares them).

``--redis-cluster`` puts a throwaway Redis Cluster (3 masters, 3 replicas) in
place of the one Redis: rooms then use sharded pub/sub, spread over the masters
by slot. Run the script with and without it to compare deliveries/s, p99 and
the servers' CPU per delivery.

Servers are pinned to CPU 0 and the generator to CPU 1 (``taskset``) when
possible, so the generator's CPU figure shows whether it, and not the server,
was the bottleneck. Redis and Postgres are not pinned. The servers get a few
CHATSERVER_* limits raised (see SERVER_ENV); the caller's environment wins.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVER_START_TIMEOUT = 30.0
CONNECT_TIMEOUT = 60.0
WARMUP = 2.0
DRAIN_IDLE = 3.0
TICK = 0.005
CONNECT_CONCURRENCY = 40
# Servers need these raised for a benchmark: the defaults (20 frames/s per
# connection, 200 connections per address) are abuse limits for real clients.
SERVER_ENV = {
    "CHATSERVER_RATE_LIMIT": "100000",
    "CHATSERVER_RATE_BURST": "100000",
    "CHATSERVER_MAX_CONNECTIONS_PER_IP": "100000",
}
LOG_PATTERNS = re.compile(
    r"#(warn|error|critical)\]|Traceback|Unhandled|dropping |refused|Error", re.IGNORECASE
)


# -- shared helpers ------------------------------------------------------------


def percentile(sorted_values: Any, p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan when empty)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


PEERS = HERE / "peers"


def server_argv(server: str, port: int, redis_url: str | None, database_url: str) -> list[str]:
    """The command line of one server under test: chatserver, or a peer to compare with.

    ``redis_url`` None: chatserver finds its Redis Cluster in CHATSERVER_REDIS_CLUSTER.
    """
    if server == "autobahn":
        return [sys.executable, str(PEERS / "autobahn_broadcast.py"), str(port)]
    if server == "channels":
        python = PEERS / "channels" / ".venv" / "bin" / "python"
        if not python.exists():
            raise RuntimeError(
                "the channels peer needs its virtualenv: see bench/peers/channels/requirements.txt"
            )
        assert redis_url is not None
        return [str(python), str(PEERS / "channels" / "run.py"), str(port), redis_url, database_url]
    if server == "node":
        if not (PEERS / "node" / "node_modules" / "ws").is_dir():
            raise RuntimeError("the node peer needs its package: cd bench/peers/node && npm ci")
        return ["node", str(PEERS / "node" / "server.js"), str(port)]
    redis = ["--redis-url", redis_url] if redis_url is not None else []
    return [
        venv_tool("twistd"),
        "-n",
        "--pidfile=",
        "chatserver",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1:backlog=1024",
        *redis,
        "--database-url",
        database_url,
    ]


def fast_generator() -> bool:
    """The picows generator (bench/fast_generator.py) when its libraries are installed."""
    try:
        import picows  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


C_GENERATOR_SOURCE = HERE / "c_generator.c"
C_GENERATOR_BINARY = HERE / ".build" / "c_generator"


@functools.cache  # one build (or one failed attempt) per run
def c_binary() -> Path | None:
    """bench/c_generator.c, built on first use; None without cc or if it does not build."""
    binary, source = C_GENERATOR_BINARY, C_GENERATOR_SOURCE
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    binary.parent.mkdir(exist_ok=True)
    built = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(binary), str(source), "-lm"],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        print(f"bench/c_generator.c did not build, using the Python generator:\n{built.stderr}")
        return None
    return binary


def c_generator(role: str) -> Path | None:
    """The C generator for ``role`` ('members' or 'senders'); None means Python.

    ``CHATBENCH_MEMBERS=python`` or ``CHATBENCH_SENDERS=python`` keeps that role in
    Python, to compare generators.
    """
    if os.environ.get(f"CHATBENCH_{role.upper()}") == "python":
        return None
    return c_binary()


def generator_name(role: str) -> str:
    """Which generator plays ``role`` in this run, for the report."""
    if c_generator(role) is not None:
        return "C (epoll)"
    return "picows" if fast_generator() else "autobahn"


def can_pin() -> bool:
    """taskset exists and CPUs 0 and 1 are both ours; otherwise run unpinned."""
    if shutil.which("taskset") is None:
        return False
    try:
        return {0, 1} <= os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return False


def pinned(argv: list[str], cpu: int, pin: bool) -> list[str]:
    """Prefix with taskset; taskset execs, so the pid stays the server's own."""
    return ["taskset", "-c", str(cpu), *argv] if pin else argv


def venv_tool(name: str) -> str:
    """A console script of the interpreter running us (the project's venv), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc (a supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def redis_cpu(redis: Any) -> float:
    """CPU seconds of the Redis server, or of every node of a Redis Cluster."""
    nodes = getattr(redis, "nodes", None) or [redis]
    total = 0.0
    for node in nodes:
        pid = getattr(node, "pid", None)
        if pid:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
    return total


def cpu_times() -> dict[str, tuple[float, float]]:
    """(busy, total) jiffies per CPU from /proc/stat: is a core saturated, whoever used it?"""
    times = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            ticks = [int(v) for v in values[:8]]  # guest time is already in user
            idle = ticks[3] + ticks[4]  # idle + iowait
            times[name] = (sum(ticks) - idle, sum(ticks))
    return times


def raise_fd_limit(needed: int) -> None:
    """Each connection is a descriptor in the generator and in server B."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:  # raising the hard limit needs root (CAP_SYS_RESOURCE); children inherit it
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, needed))
            hard = needed
        except (ValueError, OSError):
            pass
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- load generator (separate processes, Twisted + Autobahn) -----------------------
#
# Two processes, both on CPU 1: one holds the members (B), one the senders (A).
# In one process a reactor iteration that reads a backlog from a thousand member
# sockets (64 KiB each) stalls the pacing timer for seconds, and the senders then
# fire in bursts: the generator would shape the load it is meant to measure.


def emit(event: str, **data: Any) -> None:
    """One line on stdout for the parent, which times server CPU samples by it."""
    print(json.dumps({"event": event, **data}), flush=True)


class Stats:
    """Counters shared by every connection of one generator process."""

    def __init__(self) -> None:
        self.phase = "setup"  # setup, warmup, measure, drain, done
        self.sent = 0  # all sends, warm-up included
        self.window_sent = 0
        self.window_first_seq = 0
        self.window_last_seq = -1
        self.pacing_lag = 0.0  # worst delay of a send behind its schedule
        self.acks = 0
        self.window_acks = 0
        self.ack_sent_at: dict[int, float] = {}
        self.ack_latency = array("d")
        self.received = 0  # deliveries of window messages
        self.latency = array("d")
        self.arrivals = 0  # every delivery
        self.arrivals_in_window = 0  # deliveries arriving during the window
        # Deliveries per second since the first send: shows backlog, stalls, recovery.
        self.timeline: list[int] = []
        self.t0 = 0.0
        self.window_start = self.window_end = float("inf")
        self.duplicates = 0  # id at or below the last one a member saw
        self.gaps = 0  # ids skipped by a member
        self.errors: Counter[str] = Counter()
        self.closed_during_run: Counter[str] = Counter()

    def next_send(
        self, room: str, now: float, start: float, rate: float, first_window: int
    ) -> bytes:
        """Count the next scheduled send (due at start + seq / rate) and return its frame.

        The ref is the sequence number; the body carries the send time and
        whether the send belongs to the measured window.
        """
        seq = self.sent
        self.sent += 1
        self.pacing_lag = max(self.pacing_lag, now - (start + seq / rate))
        window = "1" if seq >= first_window else "0"
        if window == "1":
            self.window_sent += 1
        self.ack_sent_at[seq] = now
        body = f"{now!r}|{window}|{seq}"
        return json.dumps({"type": "send", "room": room, "body": body, "ref": seq}).encode()

    def acked(self, ref: int, now: float) -> None:
        """An ack for send ``ref``: its latency counts if the send was in the window."""
        self.acks += 1
        sent_at = self.ack_sent_at.pop(ref, None)
        if self.window_first_seq <= ref <= self.window_last_seq:
            self.window_acks += 1
            if sent_at is not None:
                self.ack_latency.append(now - sent_at)

    def delivered(
        self, last: int | None, mid: int, now: float, sent_at: float | None
    ) -> int | None:
        """Count message ``mid`` arriving at a member whose last id was ``last``.

        ``sent_at`` is its send time if it was sent in the measured window.
        Returns the member's last id after it.
        """
        self.arrivals += 1
        if self.window_start <= now < self.window_end:
            self.arrivals_in_window += 1
        second = int(now - self.t0) if self.t0 else 0
        timeline = self.timeline
        while len(timeline) <= second:
            timeline.append(0)
        timeline[second] += 1
        if last is not None:
            if mid <= last:
                self.duplicates += 1
                return last
            if mid != last + 1:
                self.gaps += mid - last - 1
        if sent_at is not None:
            self.received += 1
            self.latency.append(now - sent_at)
        return mid


class Peer:
    """One benchmark connection: a room member on B or a room's sender on A."""

    def __init__(self, stats: Stats, room: str, user: str, sender: bool) -> None:
        self.stats = stats
        self.room = room
        self.user = user
        self.sender = sender
        self.proto: Any = None
        self.last_id: int | None = None
        self.ready: Any = None  # Deferred, fires on "joined"

    def opened(self, proto: Any) -> None:
        """Join the room as soon as the WebSocket is open."""
        self.proto = proto
        proto.sendMessage(json.dumps({"type": "join", "room": self.room, "ref": 0}).encode())

    def closed(self, code: int | None, reason: str | None) -> None:
        """A close before the run ends is a finding (e.g. dropped as a slow client)."""
        self.proto = None
        if self.ready is not None and not self.ready.called:
            self.ready.errback(RuntimeError(f"{self.user}: closed {code} {reason}"))
            return
        if self.stats.phase != "done":
            self.stats.closed_during_run[f"{'sender' if self.sender else 'member'} {code}"] += 1

    def frame(self, payload: bytes) -> None:
        """Hot path: cheap prefix checks first, JSON only where needed."""
        stats = self.stats
        if payload.startswith(b'{"type":"message"'):
            if not self.sender:
                self.message(payload, stats)
            return  # a sender is a member of its room too; its copies are not counted
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "ack":
            stats.acked(msg.get("ref"), time.time())
        elif kind == "joined":
            self.last_id = msg.get("last_id") or 0
            if self.ready is not None and not self.ready.called:
                self.ready.callback(self)
        elif kind == "error":
            stats.errors[str(msg.get("code"))] += 1
            if msg.get("ref") == 0 and self.ready is not None and not self.ready.called:
                self.ready.errback(RuntimeError(f"{self.user}: join failed: {msg}"))

    def message(self, payload: bytes, stats: Stats) -> None:
        """A delivery: order check, then latency if it was sent in the window."""
        now = time.time()
        msg = json.loads(payload)
        sent_at, window, _ = msg["body"].split("|")
        sent = float(sent_at) if window == "1" else None
        self.last_id = stats.delivered(self.last_id, msg["id"], now, sent)


def cpu_now() -> float:
    """This process's user + system CPU seconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_generator(role: str, spec: dict[str, Any]) -> None:
    """A generator process ('members' or 'senders'): connect, run, report on stdout.

    The parent relays the senders' start time and final count to the members
    process on its stdin, so both measure the same window.
    """
    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        connectWS,
    )
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver

    rooms, members, rate = spec["rooms"], spec["members"], float(spec["rate"])
    seconds = float(spec["seconds"])
    stats = Stats()
    result: dict[str, Any] = {"role": role}
    rusage: dict[str, float] = {}
    t: dict[str, float] = {}

    class Client(WebSocketClientProtocol):
        """Forwards to its Peer; the protocol object itself keeps no state."""

        def onOpen(self) -> None:
            self.factory.peer.opened(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.factory.peer.frame(payload)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            self.factory.peer.closed(code, reason)

    def connect(peer: Peer, port: int) -> Deferred[Peer]:
        url = f"ws://127.0.0.1:{port}/ws?user={peer.user}"
        factory = WebSocketClientFactory(url)
        factory.protocol = Client
        # Validating UTF-8 in pure Python would cost the generator more than the parse.
        factory.setProtocolOptions(
            utf8validateIncoming=False,
            openHandshakeTimeout=CONNECT_TIMEOUT / 2,
            closeHandshakeTimeout=1,
        )
        factory.peer = peer
        peer.ready = Deferred()
        factory.clientConnectionFailed = lambda _c, reason: (
            peer.ready.called or peer.ready.errback(reason)
        )
        connectWS(factory, timeout=CONNECT_TIMEOUT / 2)
        return peer.ready

    names = [f"bench{r}" for r in range(rooms)]
    if role == "members":
        peers = [
            Peer(stats, name, f"m{r}_{i}", sender=False)
            for r, name in enumerate(names)
            for i in range(members)
        ]
    else:
        peers = [Peer(stats, name, f"s{r}", sender=True) for r, name in enumerate(names)]

    def finish() -> None:
        if stats.phase == "done":
            return
        stats.phase = "done"
        if "error" not in result:
            result.update(
                cpu=(rusage["end"] - rusage["measure"]) / (t["end"] - t["measure"]),
                errors=dict(stats.errors),
                closed_during_run=dict(stats.closed_during_run),
                drain=t["drained"] - t["end"],
            )
            if role == "members":
                lat = sorted(stats.latency)
                result.update(
                    received=stats.received,
                    duplicates=stats.duplicates,
                    gaps=stats.gaps,
                    arrivals_in_window=stats.arrivals_in_window,
                    timeline=stats.timeline,
                    latency_ms={p: percentile(lat, p) * 1000 for p in (50, 90, 99, 100)},
                )
            else:
                ack = sorted(stats.ack_latency)
                result.update(
                    sent=stats.window_sent,
                    acks=stats.window_acks,
                    window=t["end"] - t["measure"],
                    pacing_lag_ms=stats.pacing_lag * 1000,
                    ack_latency_ms={p: percentile(ack, p) * 1000 for p in (50, 99)},
                )
        emit("result", **result)
        # Close handshakes, so the servers log clean closes, then stop (bounded).
        for peer in peers:
            if peer.proto is not None:
                peer.proto.sendClose(code=1000)
        reactor.callLater(0.1, stop_when_closed, time.time() + 2.0)

    def stop_when_closed(give_up_at: float) -> None:
        if any(p.proto is not None for p in peers) and time.time() < give_up_at:
            reactor.callLater(0.1, stop_when_closed, give_up_at)
        elif reactor.running:
            reactor.stop()

    def fail(failure: Any) -> None:
        result["error"] = f"{role}: {failure.getErrorMessage()}"
        finish()

    def measure_start(now: float) -> None:
        stats.phase = "measure"
        rusage["measure"], t["measure"] = cpu_now(), now

    def measure_end(now: float) -> None:
        stats.phase = "drain"
        rusage["end"], t["end"] = cpu_now(), now

    # Drain: stop when everything expected is in, or nothing moved for a while.
    progress: dict[str, Any] = {"value": -1, "at": 0.0, "expected": None}

    def check_drain() -> None:
        now = time.time()
        if role == "members":
            done = stats.received >= progress["expected"]
            value = stats.arrivals  # warm-up deliveries count too: B may still be on them
        else:
            done = stats.window_acks >= stats.window_sent
            value = stats.acks
        if value != progress["value"]:
            progress.update(value=value, at=now)
        if done:
            result["drain_end"] = "everything arrived"
        elif now - progress["at"] > DRAIN_IDLE:
            result["drain_end"] = f"stalled: nothing arrived for {DRAIN_IDLE:g}s"
        elif now - t["end"] > spec["drain"]:
            result["drain_end"] = f"--drain limit of {spec['drain']:g}s reached while arriving"
        else:
            return
        drain_check.stop()
        t["drained"] = now
        finish()

    drain_check = LoopingCall(check_drain)

    # -- senders: open-loop pacing; message k is due at start + k / rate ------------
    first_window = round(WARMUP * rate)
    end_index = round((WARMUP + seconds) * rate)
    stats.window_first_seq, stats.window_last_seq = first_window, end_index - 1

    def send_one(now: float) -> None:
        peer = peers[stats.sent % rooms]
        frame = stats.next_send(peer.room, now, t["start"], rate, first_window)
        if peer.proto is None:
            stats.errors["sender gone"] += 1
            return
        peer.proto.sendMessage(frame)

    def tick() -> None:
        """Send what the schedule says is due by now, however late the timer fired."""
        now = time.time()
        if stats.phase == "warmup" and now >= t["measure_at"]:
            measure_start(now)
            emit("measure_start")
        due = min(int((now - t["start"]) * rate) + 1, end_index)
        while stats.sent < due:
            send_one(now)
        if stats.phase == "measure" and now >= t["end_at"]:
            pacer.stop()
            measure_end(now)
            emit("measure_end", sent=stats.window_sent)
            drain_check.start(0.1)

    pacer = LoopingCall(tick)

    def start_sending() -> None:
        now = time.time()
        t.update(start=now, measure_at=now + WARMUP, end_at=now + WARMUP + seconds)
        stats.phase = "warmup"
        emit("start", t=now)
        pacer.start(TICK)

    # -- members: phases come from the parent ---------------------------------------
    def edge(what: Any) -> None:
        what(time.time())
        maybe_drain()

    def maybe_drain() -> None:
        """Members drain once their window is over and the senders' count is known."""
        ready = "end" in t and progress["expected"] is not None
        if ready and not drain_check.running:
            drain_check.start(0.1)

    class Control(LineReceiver):
        """Commands from the parent on stdin; its end means the parent is gone."""

        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            cmd = json.loads(line)
            if cmd["cmd"] == "start":
                # The window's edges follow from the senders' start: timers, not relayed
                # commands, which a busy reactor would read late.
                stats.t0, stats.phase = cmd["t"], "warmup"
                stats.window_start = stats.t0 + WARMUP
                stats.window_end = stats.window_start + seconds
                now = time.time()
                reactor.callLater(max(0.0, stats.window_start - now), edge, measure_start)
                reactor.callLater(max(0.0, stats.window_end - now), edge, measure_end)
            elif cmd["cmd"] == "measure_end":
                progress["expected"] = cmd["sent"] * members
                maybe_drain()

        def connectionLost(self, reason: Any = None) -> None:
            if stats.phase != "done":
                result["error"] = f"{role}: parent closed stdin in phase {stats.phase}"
                finish()

    async def setup() -> None:
        sem = DeferredSemaphore(CONNECT_CONCURRENCY)
        port = spec["port_b"] if role == "members" else spec["port_a"]
        await gatherResults([sem.run(connect, p, port) for p in peers], consumeErrors=True)
        emit("connected", connections=len(peers))
        if role == "members":
            stdio.StandardIO(Control())
        else:
            start_sending()

    Deferred.fromCoroutine(setup()).addErrback(fail)

    def deadline() -> None:
        result["error"] = f"{role}: deadline reached in phase {stats.phase}"
        finish()

    reactor.callLater(spec["deadline"], deadline)
    reactor.run()


# -- orchestration (parent process) -------------------------------------------------


class Instance:
    """One twistd chatserver subprocess with its own working directory and log."""

    def __init__(self, name: str, workdir: Path, port: int) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        """Spawn; stdout and stderr both go to the log file we wait on."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_listening(self, timeout: float, workers: int = 1) -> None:
        """The server logs 'open http://localhost:PORT/' once it accepts connections
        (each worker once, with several)."""
        assert self.proc is not None
        marker = f"open http://localhost:{self.port}/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.read_text(errors="replace").count(marker) >= workers:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server {self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            time.sleep(0.1)
        raise RuntimeError(f"server {self.name} not listening after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        """End of the log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def cpu(self) -> float:
        """CPU seconds used so far by the server and its live worker processes."""
        assert self.proc is not None
        total = 0.0
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(OSError):  # a process that just ended
                total += cpu_seconds(pid)
        return total

    def health(self) -> str:
        """/healthz, to see e.g. the store queue after the run."""
        url = f"http://127.0.0.1:{self.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.read().decode(errors="replace").strip()
        except OSError as e:
            return f"<{e}>"

    def stop(self) -> int | None:
        """SIGTERM (graceful: flushes the store), SIGKILL if it does not exit in time."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    def notable_log_lines(self) -> list[str]:
        """Warnings, errors and tracebacks from the log, counted by shape."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        counts: Counter[str] = Counter()
        first: dict[str, str] = {}
        for line in text.splitlines():
            if not LOG_PATTERNS.search(line):
                continue
            body = re.sub(r"^\S+ \S+ ", "", line)  # timestamp
            shape = re.sub(r"\d+", "N", body)[:200]
            counts[shape] += 1
            first.setdefault(shape, body[:300])
        return [f"{n} x {first[s]}" for s, n in counts.most_common(15)]


class Generator:
    """One generator subprocess: its event lines out, commands in (members only)."""

    def __init__(
        self, role: str, spec: dict[str, Any], pin: bool, log: Path, fast: bool = False
    ) -> None:
        self.role = role
        self.log = log
        self._buffer = b""
        self.events: set[str] = set()
        self.result: dict[str, Any] | None = None
        c_path = c_generator(role)
        if c_path is not None:
            argv = [str(c_path), role]
        elif fast:  # picows + uvloop (bench/requirements.txt)
            argv = [sys.executable, str(HERE / "fast_generator.py"), role]
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "--_generator", role]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                pinned([*argv, json.dumps(spec)], 1, pin),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.PIPE,
                start_new_session=True,
            )

    def command(self, cmd: str, **data: Any) -> None:
        """A line on the generator's stdin (the members process follows the senders)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **data}).encode() + b"\n")
        self.proc.stdin.flush()

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def read_events(self) -> list[dict[str, Any]]:
        """Whatever complete lines are available now (call when select says readable)."""
        chunk = os.read(self.fileno(), 65536)
        if not chunk:
            raise RuntimeError(f"{self.role} generator ended (exit {self.proc.wait(5)})")
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events = [json.loads(line) for line in lines if line.strip()]
        for event in events:
            self.events.add(event.get("event"))
            if event.get("event") == "result":
                self.result = event
                if "error" in event:
                    raise RuntimeError(f"load generator failed: {event['error']}")
        return events

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
        """Its stderr, for failures."""
        return self.log.read_text(errors="replace")[-3000:]


def pump(gens: list[Generator], deadline: float, until: Any, on_event: Any = None) -> None:
    """Read events from the generators until ``until()`` holds, with a hard deadline."""
    while not until():
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("load generator did not finish in time")
        live = [g for g in gens if g.result is None]
        ready, _, _ = select.select(live, [], [], min(left, 1.0))
        for gen in ready:
            for event in gen.read_events():
                if on_event is not None:
                    on_event(gen.role, event)


def fmt_ms(value: float) -> str:
    """Milliseconds with sensible precision, '-' for no data."""
    return "-" if value != value else f"{value:.1f}"


def bottleneck(generator: float, server_cpu: dict[str, float], pin: bool) -> str:
    """Say which side ran out of CPU, so a result is not blamed on the wrong process."""
    notes = []
    if generator >= 0.9:
        notes.append(f"the generator was CPU-bound ({generator * 100:.0f}%): numbers understate")
    both = server_cpu["A"] + server_cpu["B"]
    cpu0 = server_cpu.get("cpu0", 0.0)
    if pin and max(both, cpu0) >= 0.9:
        notes.append(
            f"CPU 0, the servers' core, was saturated (A+B = {both * 100:.0f}%,"
            f" busy {cpu0 * 100:.0f}% counting Redis/Postgres when they ran there)"
        )
    elif max(server_cpu["A"], server_cpu["B"]) >= 0.9:
        notes.append("a server used a whole core")
    return "bottleneck: " + ("; ".join(notes) if notes else "none hit (CPU below 90% everywhere)")


def cpu_per_delivery(server_cpu: dict[str, float], window: float, deliveries: int) -> float:
    """Microseconds of server CPU (both instances) per message delivered to a member."""
    if not deliveries:
        return float("nan")
    return (server_cpu["A"] + server_cpu["B"]) * window / deliveries * 1e6


def report(
    args: argparse.Namespace,
    m: dict[str, Any],
    sd: dict[str, Any],
    server_cpu: dict[str, float],
    pin: bool,
) -> str:
    """The markdown table the brief asks for, plus context lines."""
    lat = {int(float(k)): v for k, v in m["latency_ms"].items()}
    ack = {int(float(k)): v for k, v in sd["ack_latency_ms"].items()}
    window = sd["window"]
    expected = sd["sent"] * args.members
    lost = expected - m["received"]
    generator_cpu = m["cpu"] + sd["cpu"]
    errors = Counter(m["errors"]) + Counter(sd["errors"])
    closed = Counter(m["closed_during_run"]) + Counter(sd["closed_during_run"])
    rows = [
        ("messages sent", f"{sd['sent']} ({sd['sent'] / window:.0f}/s)"),
        ("acks", str(sd["acks"])),
        ("deliveries expected (sent x M)", str(expected)),
        ("deliveries received", str(m["received"])),
        ("lost", f"{lost} ({(lost / expected * 100) if expected else 0:.2f}%)"),
        ("deliveries/s (arriving in the window)", f"{m['arrivals_in_window'] / window:.0f}"),
        (
            "latency p50 / p90 / p99 / max (ms)",
            " / ".join(fmt_ms(lat[p]) for p in (50, 90, 99, 100)),
        ),
        ("ack latency p50 / p99 (ms)", " / ".join(fmt_ms(ack[p]) for p in (50, 99))),
        ("sender pacing: worst lag behind schedule (ms)", f"{sd['pacing_lag_ms']:.1f}"),
        (
            "generator CPU (% of one core)",
            f"{generator_cpu * 100:.0f}% (members {m['cpu'] * 100:.0f}%"
            f" + senders {sd['cpu'] * 100:.0f}%)",
        ),
        ("server A CPU (senders)", f"{server_cpu['A'] * 100:.0f}%"),
        ("Redis CPU (all its processes)", f"{server_cpu['redis'] * 100:.0f}%"),
        ("server B CPU (members)", f"{server_cpu['B'] * 100:.0f}%" if args.instances > 1 else "-"),
        (
            "server CPU per delivery, A+B (us)",
            f"{cpu_per_delivery(server_cpu, window, m['arrivals_in_window']):.1f}",
        ),
        (
            "CPU 0 / CPU 1 busy, all processes",
            " / ".join(
                f"{server_cpu[c] * 100:.0f}%" if c in server_cpu else "-" for c in ("cpu0", "cpu1")
            ),
        ),
        ("duplicates / gaps seen by members", f"{m['duplicates']} / {m['gaps']}"),
        ("error frames", json.dumps(dict(errors)) if errors else "0"),
        ("connections closed during run", json.dumps(dict(closed)) if closed else "0"),
    ]
    pinning = "servers CPU 0, generator CPU 1 (taskset)" if pin else "none"
    broker = "redis-cluster(3 masters)" if args.redis_cluster else "redis"
    head = (
        f"server={args.server} broker={broker} instances={args.instances}"
        f" workers={args.workers}"
        f" store={args.store if args.server in ('chatserver', 'channels') else '-'}"
        f" rooms={args.rooms}"
        f" members={args.members} rate={args.rate:g}/s "
        f"window={window:.2f}s; pinning: {pinning}\n"
        f"members' drain: {m['drain']:.2f}s, ended: {m['drain_end']};"
        f" generator: members {generator_name('members')},"
        f" senders {generator_name('senders')}"
    )
    lines = [head, "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    timeline = " ".join(str(n) for n in m["timeline"])
    lines += ["", f"deliveries per second from the first send (warm-up {WARMUP:g}s): {timeline}"]
    lines.append(bottleneck(generator_cpu, server_cpu, pin))
    return "\n".join(lines)


def cleanup(
    gens: list[Generator],
    instances: list[Instance],
    backends: list[Any],
    root: Path,
    keep: bool,
    ok: bool,
) -> str:
    """Stop all we started, each step on its own so that one failure leaks nothing else.

    Output is returned, not printed: a closed stdout must not cut cleanup short.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lines: list[str] = []
    for gen in gens:
        try:
            gen.stop()
        except Exception as e:
            lines.append(f"stopping the {gen.role} generator failed: {e!r}")
    for inst in instances:
        try:
            code: Any = inst.stop()
        except Exception as e:
            code = f"stop failed: {e!r}"
            if inst.proc is not None:
                with contextlib.suppress(OSError):
                    inst.proc.kill()
        notable = inst.notable_log_lines()
        if notable or code not in (0, None):
            lines.append(f"\nserver {inst.name} log (exit {code}), warnings/errors by count:")
            lines += [f"  {line}" for line in notable]
        elif ok:
            lines.append(f"server {inst.name}: no warnings or errors in its log (exit {code})")
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


def run(args: argparse.Namespace) -> int:
    """Start everything, run the generator, report; the finally block cleans up."""
    sys.path.insert(0, str(REPO / "tests"))
    servers = importlib.import_module("servers")

    pin = can_pin() and not args.no_pin
    connections = args.rooms * (args.members + 1)
    raise_fd_limit(connections + 4096)
    root = Path(tempfile.mkdtemp(prefix="chatbench-"))
    redis: Any = None
    redis_url: str | None = None
    pg: Any = None
    instances: list[Instance] = []
    gens: list[Generator] = []
    ok = False
    try:
        if args.redis_cluster:
            redis = servers.RedisCluster()  # 3 masters + 3 replicas, sharded pub/sub
            redis.start()
        else:
            redis = servers.RedisServer()
            redis.start()
            redis_url = redis.url
        if args.store == "postgres":
            pg = servers.PostgresServer(durable=True)  # fsync on, as in production
            pg.start()
            database_url = pg.create_database("chatbench")
            migrate = subprocess.run(
                [venv_tool("chatserver-admin"), "migrate", "--database-url", database_url],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if migrate.returncode != 0:
                raise RuntimeError(f"chatserver-admin migrate failed:\n{migrate.stderr}")
        else:
            # One file for both, so B's gap fills and join last_id see A's writes.
            database_url = f"sqlite:///{root / 'chat.sqlite3'}"

        # The caller's CHATSERVER_* variables win, so any setting can be tried.
        env = {**SERVER_ENV, **os.environ}
        if args.workers > 1:
            env["CHATSERVER_WORKERS"] = str(args.workers)
        if args.redis_cluster:
            env["CHATSERVER_REDIS_CLUSTER"] = ",".join(redis.seed_urls())
        for name in ("A", "B")[: args.instances]:
            inst = Instance(name, root / name, servers.free_port())
            argv = server_argv(args.server, inst.port, redis_url, database_url)
            inst.start(pinned(argv, 0, pin), env)
            instances.append(inst)
        for inst in instances:
            inst.wait_listening(SERVER_START_TIMEOUT, args.workers)
        a, b = instances[0], instances[-1]  # one instance: senders and members share it

        budget = CONNECT_TIMEOUT + WARMUP + args.seconds + args.drain + 15
        spec = {
            "rooms": args.rooms,
            "members": args.members,
            "rate": args.rate,
            "seconds": args.seconds,
            "port_a": a.port,
            "port_b": b.port,
            "drain": args.drain,
            "deadline": budget,
        }
        samples: dict[str, dict[str, Any]] = {}
        health: dict[str, str] = {}

        def sample(key: str) -> None:
            samples[key] = {
                "t": time.monotonic(),
                "A": a.cpu(),
                "B": b.cpu() if b is not a else 0.0,
                "redis": redis_cpu(redis),
                "cpus": cpu_times(),
            }

        deadline = time.monotonic() + budget + 10
        members = Generator("members", spec, pin, root / "members.log", fast=fast_generator())
        gens.append(members)
        senders: Generator | None = None

        def relay(role: str, event: dict[str, Any]) -> None:
            """Server CPU is sampled, and the members told, as the senders change phase."""
            kind = event.get("event")
            if role != "senders" or kind not in ("start", "measure_start", "measure_end"):
                return
            if kind != "start":
                sample(kind)
            if kind == "measure_start":
                health.update((inst.name, inst.health()) for inst in instances)
            if kind != "measure_start":
                members.command(kind, **{k: v for k, v in event.items() if k != "event"})

        try:
            # Members first, so B has subscribed every room before the first send.
            pump(gens, deadline, lambda: "connected" in members.events)
            senders = Generator("senders", spec, pin, root / "senders.log", fast=fast_generator())
            gens.append(senders)
            pump(gens, deadline, lambda: all(g.result is not None for g in gens), relay)
        except (RuntimeError, ValueError):
            for gen in gens:
                print(f"{gen.role} generator stderr:\n{gen.log_tail()}", file=sys.stderr)
            raise
        m, sd = members.result, senders.result
        assert m is not None and sd is not None
        wall = samples["measure_end"]["t"] - samples["measure_start"]["t"]
        first, last = samples["measure_start"], samples["measure_end"]
        server_cpu = {n: (last[n] - first[n]) / wall for n in ("A", "B", "redis")}
        for cpu in ("cpu0", "cpu1"):
            if cpu in first["cpus"] and cpu in last["cpus"]:
                busy = last["cpus"][cpu][0] - first["cpus"][cpu][0]
                total = last["cpus"][cpu][1] - first["cpus"][cpu][1]
                server_cpu[cpu] = busy / total if total else float("nan")
        print(report(args, m, sd, server_cpu, pin))
        print()
        settings = sorted(f"{k}={v}" for k, v in env.items() if k.startswith("CHATSERVER_"))
        print(f"server settings from the environment: {' '.join(settings)}")
        for name, text in health.items():
            print(f"server {name} /healthz as the window began: {text}")
        ok = True
        return 0
    finally:
        notes = cleanup(gens, instances, [pg, redis], root, args.keep, ok)
        with contextlib.suppress(OSError):  # e.g. stdout piped into head
            print(notes, flush=True)


def main() -> int:
    """Parse arguments; the hidden --_generator flag makes this process the load generator."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="postgres")
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000, help="messages/s across all rooms")
    parser.add_argument("--seconds", type=float, default=10, help="measured window")
    parser.add_argument(
        "--drain", type=float, default=10, help="most seconds to wait for stragglers"
    )
    parser.add_argument(
        "--instances",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: senders on A, members on B (default); 1: everyone on A, still through Redis",
    )
    parser.add_argument(
        "--server",
        choices=("chatserver", "autobahn", "node", "channels"),
        default="chatserver",
        help="what to measure: chatserver (Redis and the store on), or a peer in bench/peers/"
        " (one in-memory process; implies --instances 1)",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a throwaway 3-master Redis Cluster (sharded pub/sub) instead of one Redis",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes per chatserver instance"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="pin nothing (servers and generator share the CPUs)"
    )
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    parser.add_argument("--_generator", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._generator:
        role, spec = args._generator
        run_generator(role, json.loads(spec))
        return 0
    if args.workers < 1 or (args.workers > 1 and args.server != "chatserver"):
        parser.error("--workers is a positive number, for chatserver only")
    if args.server != "chatserver":
        args.instances = 1
        if args.redis_cluster:
            parser.error("--redis-cluster measures chatserver only")
    if min(args.rooms, args.members) < 1 or min(args.rate, args.seconds, args.drain) <= 0:
        parser.error("rooms, members, rate, seconds and drain must be positive")

    def terminated(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
