"""Cross-instance fan-out benchmark: senders on instance A, members on instance B.

Every message takes the scale-out path: stored by A, acked, published to Redis,
received by B's subscriber and fanned out to B's local members. The script
starts everything it needs (Redis, optionally Postgres, both servers and a
load generator in its own process), measures, prints a markdown table and
kills what it started, even on errors.

    python bench/cross_instance.py [--store sqlite|postgres] [--rooms 10]
        [--members 100] [--rate 2000] [--seconds 10]

Servers are pinned to CPU 0 and the generator to CPU 1 (``taskset``) when
possible, so the generator's CPU figure shows whether it, and not the server,
was the bottleneck.
"""

from __future__ import annotations

import argparse
import importlib
import json
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
    k = max(0, min(len(sorted_values) - 1, round(p / 100.0 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[k])


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


def raise_fd_limit(needed: int) -> None:
    """Each connection is a descriptor in the generator and in server B."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- load generator (separate process, Twisted + Autobahn) -------------------------


def emit(event: str, **data: Any) -> None:
    """One line on stdout for the parent, which times server CPU samples by it."""
    print(json.dumps({"event": event, **data}), flush=True)


class Stats:
    """Counters shared by every connection of the generator."""

    def __init__(self) -> None:
        self.phase = "setup"  # setup, warmup, measure, drain
        self.sent = 0  # all sends, warmup included
        self.window_sent = 0
        self.window_first_seq: int | None = None
        self.window_last_seq = -1
        self.acks = 0
        self.window_acks = 0
        self.ack_sent_at: dict[int, float] = {}
        self.ack_latency = array("d")
        self.received = 0  # deliveries of window messages
        self.latency = array("d")
        self.arrivals_in_window = 0  # any delivery arriving during the window
        # Deliveries per second since the first send: shows backlog, stalls, recovery.
        self.timeline: list[int] = []
        self.t0 = 0.0
        self.duplicates = 0  # id at or below the last one a member saw
        self.gaps = 0  # ids skipped by a member
        self.errors: Counter[str] = Counter()
        self.closed_during_run: Counter[str] = Counter()
        self.sender_messages = 0


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
            if self.sender:
                stats.sender_messages += 1
                return
            now = time.time()
            msg = json.loads(payload)
            if stats.phase == "measure":
                stats.arrivals_in_window += 1
            second = int(now - stats.t0)
            timeline = stats.timeline
            while len(timeline) <= second:
                timeline.append(0)
            timeline[second] += 1
            mid = msg["id"]
            last = self.last_id
            if last is not None:
                if mid <= last:
                    stats.duplicates += 1
                    return
                if mid != last + 1:
                    stats.gaps += mid - last - 1
            self.last_id = mid
            sent_at, window, _ = msg["body"].split("|")
            if window == "1":
                stats.received += 1
                stats.latency.append(now - float(sent_at))
            return
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "ack":
            now = time.time()
            ref = msg.get("ref")
            stats.acks += 1
            sent_at = stats.ack_sent_at.pop(ref, None)
            if stats.window_first_seq is not None and (
                stats.window_first_seq <= ref <= stats.window_last_seq
            ):
                stats.window_acks += 1
                if sent_at is not None:
                    stats.ack_latency.append(now - sent_at)
        elif kind == "joined":
            self.last_id = msg.get("last_id") or 0
            if self.ready is not None and not self.ready.called:
                self.ready.callback(self)
        elif kind == "error":
            stats.errors[str(msg.get("code"))] += 1
            if msg.get("ref") == 0 and self.ready is not None and not self.ready.called:
                self.ready.errback(RuntimeError(f"{self.user}: join failed: {msg}"))


def run_generator(spec: dict[str, Any]) -> None:
    """The generator process: connect, pace sends, measure, drain, report on stdout."""
    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        connectWS,
    )
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
    from twisted.internet.task import LoopingCall

    rooms, members, rate = spec["rooms"], spec["members"], float(spec["rate"])
    seconds = float(spec["seconds"])
    stats = Stats()

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

    room_names = [f"bench{r}" for r in range(rooms)]
    member_peers = [
        Peer(stats, name, f"m{r}_{i}", sender=False)
        for r, name in enumerate(room_names)
        for i in range(members)
    ]
    sender_peers = [Peer(stats, name, f"s{r}", sender=True) for r, name in enumerate(room_names)]
    result: dict[str, Any] = {}
    t: dict[str, float] = {}
    rusage: dict[str, float] = {}

    def cpu_now() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def fail(failure: Any) -> None:
        result["error"] = failure.getErrorMessage()
        finish()

    def finish() -> None:
        stats.phase = "done"
        if "error" not in result:
            lat = sorted(stats.latency)
            ack = sorted(stats.ack_latency)
            result.update(
                sent=stats.window_sent,
                sent_total=stats.sent,
                acks=stats.window_acks,
                expected=stats.window_sent * members,
                received=stats.received,
                duplicates=stats.duplicates,
                gaps=stats.gaps,
                window=t["end"] - t["measure"],
                arrivals_in_window=stats.arrivals_in_window,
                timeline=stats.timeline,
                drain=t["drained"] - t["end"],
                latency_ms={p: percentile(lat, p) * 1000 for p in (50, 90, 99, 100)},
                ack_latency_ms={p: percentile(ack, p) * 1000 for p in (50, 99)},
                generator_cpu=(rusage["end"] - rusage["measure"]) / (t["end"] - t["measure"]),
                errors=dict(stats.errors),
                closed_during_run=dict(stats.closed_during_run),
                sender_messages=stats.sender_messages,
            )
        emit("result", **result)
        if reactor.running:
            reactor.stop()

    def send_one() -> None:
        seq = stats.sent
        peer = sender_peers[seq % rooms]
        stats.sent += 1
        if peer.proto is None:
            stats.errors["sender gone"] += 1
            return
        now = time.time()
        window = "1" if stats.phase == "measure" else "0"
        if window == "1":
            stats.window_sent += 1
            if stats.window_first_seq is None:
                stats.window_first_seq = seq
            stats.window_last_seq = seq
        stats.ack_sent_at[seq] = now
        body = f"{now!r}|{window}|{seq}"
        frame = {"type": "send", "room": peer.room, "body": body, "ref": seq}
        peer.proto.sendMessage(json.dumps(frame).encode())

    def tick() -> None:
        """Open-loop pacing: send what the schedule says is due by now, however late."""
        now = time.time()
        if stats.phase == "warmup" and now >= t["measure"]:
            stats.phase = "measure"
            rusage["measure"] = cpu_now()
            emit("measure_start")
        elif stats.phase == "measure" and now >= t["end"]:
            rusage["end"] = cpu_now()
            emit("measure_end")
            stats.phase = "drain"
            pacer.stop()
            drain_check.start(0.1)
            return
        due = int((now - t["start"]) * rate) - stats.sent
        for _ in range(max(0, due)):
            send_one()

    progress = {"value": -1, "at": 0.0}

    def check_drain() -> None:
        """Stop when every expected delivery and ack is in, or nothing moves any more."""
        now = time.time()
        done = stats.received >= stats.window_sent * members and stats.window_acks >= (
            stats.window_sent
        )
        # Any delivery counts as progress: a lagging B may still be on warm-up messages.
        value = sum(stats.timeline) + stats.window_acks
        if value != progress["value"]:
            progress.update(value=value, at=now)
        idle = now - progress["at"] > DRAIN_IDLE
        if done or idle or now - t["end"] > spec["drain"]:
            drain_check.stop()
            t["drained"] = now
            finish()

    pacer = LoopingCall(tick)
    drain_check = LoopingCall(check_drain)

    def start_load(_: Any) -> None:
        emit("connected", connections=len(member_peers) + len(sender_peers))
        now = time.time()
        t.update(start=now, measure=now + WARMUP, end=now + WARMUP + seconds)
        stats.t0 = now
        stats.phase = "warmup"
        pacer.start(TICK)

    async def setup() -> None:
        # Members first, so B has subscribed every room before the first send.
        sem = DeferredSemaphore(CONNECT_CONCURRENCY)
        await gatherResults(
            [sem.run(connect, p, spec["port_b"]) for p in member_peers], consumeErrors=True
        )
        await gatherResults([connect(p, spec["port_a"]) for p in sender_peers], consumeErrors=True)

    d = Deferred.fromCoroutine(setup())
    d.addCallbacks(start_load, fail)

    def deadline() -> None:
        result["error"] = f"generator deadline reached in phase {stats.phase}"
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

    def wait_listening(self, timeout: float) -> None:
        """The server logs 'open http://localhost:PORT/' once it accepts connections."""
        assert self.proc is not None
        marker = f"open http://localhost:{self.port}/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log.read_text(errors="replace"):
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
        """CPU seconds used so far."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

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


def read_events(
    proc: subprocess.Popen[str], deadline: float, on_event: dict[str, Any]
) -> dict[str, Any]:
    """Read the generator's event lines until 'result', calling hooks as events arrive."""
    assert proc.stdout is not None
    buffer = ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("load generator did not finish in time")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if not ready:
            if proc.poll() is not None:
                raise RuntimeError(f"load generator exited with {proc.returncode}")
            continue
        chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
        if not chunk:
            raise RuntimeError(f"load generator closed its output (exit {proc.wait(5)})")
        buffer += chunk
        while "\n" in buffer:
            line, buffer = buffer.split("\n", 1)
            try:
                event = json.loads(line)
            except ValueError:
                print(f"generator: {line}", file=sys.stderr)
                continue
            hook = on_event.get(event.get("event"))
            if hook is not None:
                hook(event)
            if event.get("event") == "result":
                return event


def fmt_ms(value: float) -> str:
    """Milliseconds with sensible precision, '-' for no data."""
    return "-" if value != value else f"{value:.1f}"


def report(
    args: argparse.Namespace,
    res: dict[str, Any],
    server_cpu: dict[str, float],
    pin: bool,
) -> str:
    """The markdown table the brief asks for, plus context lines."""
    lat = {int(float(k)): v for k, v in res["latency_ms"].items()}
    ack = {int(float(k)): v for k, v in res["ack_latency_ms"].items()}
    window = res["window"]
    lost = res["expected"] - res["received"]
    rows = [
        ("messages sent (window)", f"{res['sent']} ({res['sent'] / window:.0f}/s)"),
        ("acks", str(res["acks"])),
        ("deliveries expected (sent x M)", str(res["expected"])),
        ("deliveries received", str(res["received"])),
        ("lost", f"{lost} ({(lost / res['expected'] * 100) if res['expected'] else 0:.2f}%)"),
        ("deliveries/s (arriving in window)", f"{res['arrivals_in_window'] / window:.0f}"),
        (
            "latency p50 / p90 / p99 / max (ms)",
            " / ".join(fmt_ms(lat[p]) for p in (50, 90, 99, 100)),
        ),
        ("ack latency p50 / p99 (ms)", " / ".join(fmt_ms(ack[p]) for p in (50, 99))),
        ("generator CPU (% of one core)", f"{res['generator_cpu'] * 100:.0f}%"),
        ("server A CPU (senders)", f"{server_cpu['A'] * 100:.0f}%"),
        ("server B CPU (members)", f"{server_cpu['B'] * 100:.0f}%"),
        ("duplicates / gaps seen by members", f"{res['duplicates']} / {res['gaps']}"),
        ("error frames", json.dumps(res["errors"]) if res["errors"] else "0"),
        (
            "connections closed during run",
            json.dumps(res["closed_during_run"]) if res["closed_during_run"] else "0",
        ),
    ]
    head = (
        f"store={args.store} rooms={args.rooms} members={args.members} rate={args.rate}/s "
        f"seconds={args.seconds} (window {window:.2f}s, drain {res['drain']:.2f}s); "
        f"pinning: {'servers CPU 0, generator CPU 1 (taskset)' if pin else 'none'}"
    )
    lines = [head, "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    timeline = " ".join(str(n) for n in res["timeline"])
    lines += ["", f"deliveries per second from the first send (warm-up {WARMUP:g}s): {timeline}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Start everything, run the generator, report; the finally block cleans up."""
    sys.path.insert(0, str(REPO / "tests"))
    servers = importlib.import_module("servers")

    pin = can_pin()
    connections = args.rooms * (args.members + 1)
    raise_fd_limit(connections + 4096)
    root = Path(tempfile.mkdtemp(prefix="chatbench-"))
    redis: Any = None
    pg: Any = None
    instances: list[Instance] = []
    generator: subprocess.Popen[str] | None = None
    ok = False
    try:
        redis = servers.RedisServer()
        redis.start()
        if args.store == "postgres":
            pg = servers.PostgresServer()
            pg.start()
            database_url = pg.create_database("chatbench")
            subprocess.run(
                [venv_tool("chatserver-admin"), "migrate", "--database-url", database_url],
                check=True,
                capture_output=True,
                timeout=60,
            )
        else:
            # One file for both, so B's gap fills and join last_id see A's writes.
            database_url = f"sqlite:///{root / 'chat.sqlite3'}"

        env = {**os.environ, **SERVER_ENV}
        for name in ("A", "B"):
            inst = Instance(name, root / name, servers.free_port())
            argv = [
                venv_tool("twistd"),
                "-n",
                "--pidfile=",
                "chatserver",
                "--listen",
                f"tcp:{inst.port}:interface=127.0.0.1",
                "--redis-url",
                redis.url,
                "--database-url",
                database_url,
            ]
            inst.start(pinned(argv, 0, pin), env)
            instances.append(inst)
        for inst in instances:
            inst.wait_listening(SERVER_START_TIMEOUT)
        a, b = instances

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
        gen_log = root / "generator.log"
        with open(gen_log, "wb") as err:
            generator = subprocess.Popen(
                pinned(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--_generator",
                        json.dumps(spec),
                    ],
                    1,
                    pin,
                ),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        samples: dict[str, dict[str, float]] = {}

        def sample(key: str) -> Any:
            def hook(_: dict[str, Any]) -> None:
                samples[key] = {"t": time.monotonic(), "A": a.cpu(), "B": b.cpu()}

            return hook

        try:
            res = read_events(
                generator,
                time.monotonic() + budget + 10,
                {"measure_start": sample("start"), "measure_end": sample("end")},
            )
        except RuntimeError:
            print(f"generator log:\n{gen_log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        if "error" in res:
            raise RuntimeError(f"load generator failed: {res['error']}")
        wall = samples["end"]["t"] - samples["start"]["t"]
        server_cpu = {n: (samples["end"][n] - samples["start"][n]) / wall for n in ("A", "B")}
        print(report(args, res, server_cpu, pin))
        print()
        print(f"server overrides: {' '.join(f'{k}={v}' for k, v in SERVER_ENV.items())}")
        for inst in instances:
            print(f"server {inst.name} /healthz after run: {inst.health()}")
        ok = True
        return 0
    finally:
        if generator is not None and generator.poll() is None:
            generator.kill()
            generator.wait(timeout=10)
        for inst in instances:
            code = inst.stop()
            notable = inst.notable_log_lines()
            if notable or (code not in (0, None)):
                print(f"\nserver {inst.name} log (exit {code}), warnings/errors by count:")
                for line in notable:
                    print(f"  {line}")
            elif ok:
                print(f"server {inst.name}: no warnings or errors in its log (exit {code})")
        if pg is not None:
            pg.close()
        if redis is not None:
            redis.close()
        if args.keep:
            print(f"kept working files in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


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
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    parser.add_argument("--_generator", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._generator:
        run_generator(json.loads(args._generator))
        return 0
    if min(args.rooms, args.members) < 1 or min(args.rate, args.seconds, args.drain) <= 0:
        parser.error("rooms, members, rate, seconds and drain must be positive")

    def terminated(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
