"""Where a message's CPU goes: a per-message budget of one chatserver run.

It runs ``cross_instance.py --instances 1`` at one rate and, during the
measured window, reads the CPU of the server's reactor thread and of its pool
threads (from /proc, per thread), of the PostgreSQL and Redis processes the
run started, and the store's batches (from /metrics). With ``py-spy``
installed (``bench/requirements.txt``) it also samples the reactor thread and
splits its CPU over what it was doing. Everything is divided by the messages
per second, so each line is microseconds of CPU per message.

    python bench/budget.py [--rooms 1000] [--members 5] [--rate 3000] [--window 6]

The split of the reactor thread is by py-spy's samples, leaf first: a sample
counts for the innermost step it names (a ``send`` inside the delivery of a
batch counts as the kernel's send). Samples waiting in ``epoll_wait`` are left
out, as idle. The /proc figures are exact; the split is a sampled estimate.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
WARMUP = 2.0


def _line_of(path: Path, text: str) -> int:
    """The line of ``path`` holding ``text`` (where a syscall is made), 0 if none."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return number
    return 0


def _syscall_lines() -> tuple[int, int]:
    import twisted.internet.tcp

    send = _line_of(HERE.parent / "chatserver" / "compat" / "twisted.py", "t.socket.send(data)")
    recv = _line_of(Path(twisted.internet.tcp.__file__), "self.socket.recv(")
    return send, recv


_SEND, _RECV = _syscall_lines()

# Leaf first: the innermost frame that matches names the step.
STEPS = [
    ("kernel: send() to clients", rf"DirectWrite\.write \(.*compat/twisted\.py:{_SEND}\)$"),
    ("kernel: recv() from clients", rf"Connection\.doRead \(twisted/internet/tcp\.py:{_RECV}\)$"),
    ("writing frames (Python)", r"DirectWrite\.write|Outbound\.|ChatProtocol\.sendData"),
    ("delivery: holding and joining frames", r"Delivery\."),
    (
        "encoding ack and message",
        r"^(ack|encode|encode_message|reply|text_frame) \(chatserver/wire\.py|JSONEncoder",
    ),
    ("Redis: publish", r"RedisBroker\.(publish|_publish)|SlicedPublish\.publish|_publish_replied"),
    (
        "Redis: reading (own messages back, publish replies)",
        r"Liveness\.dataReceived|pushes_received|on_broker_messages|Sliced|RoomRegistry\.offer",
    ),
    ("chat: frame handling (JSON, rate, membership)", r"Chat\.|chatserver/wire\.py|JSONDecoder"),
    ("store: queueing", r"SQLStore\.(append|_kick|_kick_soon|_take_batch|_write|_interaction)\b"),
    ("store: hand-off to a pool thread", r"callInThread|Team\.|ThreadWorker|Condition|Queue\.put"),
    ("store: commit callbacks, ack, registry", r"SQLStore\._written|RoomRegistry|StoredMessage"),
    ("WebSocket frames in (Autobahn)", r"InboundFrames|WebSocket|ChatProtocol|Connection\.doRead"),
    ("reactor: timers", r"runUntilCurrent|DelayedCall|LoopingCall"),
    ("reactor: polling, wake-ups", r"doPoll|_Waker|posixbase|threadCallQueue"),
]
IDLE = re.compile(
    r"doPoll \((chatserver/compat/twisted\.py|twisted/internet/epollreactor\.py):\d+\)$"
)


def processes(name: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


def cpu_ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def snapshot(server: int, others: dict[str, set[int]]) -> dict[str, int]:
    """CPU ticks by part: main (the reactor thread), pool (the others), postgres, redis."""
    ticks: dict[str, int] = collections.Counter()
    for task in Path(f"/proc/{server}/task").iterdir():
        part = "main" if task.name == str(server) else "pool"
        try:
            ticks[f"{part}@{task.name}"] = cpu_ticks(task / "stat")
        except OSError:
            pass
    for part, pids in others.items():
        for pid in pids:
            try:
                ticks[f"{part}@{pid}"] = cpu_ticks(Path(f"/proc/{pid}/stat"))
            except OSError:
                pass
    return ticks


def by_part(first: dict[str, int], last: dict[str, int]) -> dict[str, int]:
    """Ticks used in between, per part; a process gone by the end counts nothing."""
    used: dict[str, int] = collections.Counter()
    for key, end in last.items():
        used[key.split("@")[0]] += end - first.get(key, end)
    return used


def child_server(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"twistd" in cmdline:
            return int(entry.name)
    return None


def http(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return reply.read().decode()


def store_counters(port: int) -> tuple[float, float]:
    text = http(port, "/metrics")
    found = {}
    for name in ("chatserver_messages_stored_total", "chatserver_store_batches_total"):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else 0.0
    return found["chatserver_messages_stored_total"], found["chatserver_store_batches_total"]


def split(raw: Path) -> tuple[collections.Counter[str], int]:
    """py-spy's reactor-thread samples by step (leaf first), and how many there were."""
    steps: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0] or IDLE.search(frames[-1]):
            continue
        total += int(count)
        for frame in reversed(frames[1:]):
            step = next((name for name, rx in STEPS if re.search(rx, frame)), None)
            if step is not None:
                steps[step] += int(count)
                break
        else:
            steps["other"] += int(count)
    return steps, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--rate", type=float, default=3000)
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured")
    parser.add_argument("--no-spy", action="store_true", help="the /proc figures only")
    args = parser.parse_args()
    spy = None if args.no_spy else shutil.which("py-spy", path=str(Path(sys.executable).parent))
    spy = spy or (None if args.no_spy else shutil.which("py-spy"))
    before = {"postgres": processes("postgres"), "redis": processes("redis-server")}
    run = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "cross_instance.py"),
            "--instances",
            "1",
            "--rooms",
            str(args.rooms),
            "--members",
            str(args.members),
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.window + 3),
            "--drain",
            "5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        server = None
        while server is None and time.monotonic() < deadline:
            server = child_server(run.pid)
            time.sleep(0.2)
        if server is None:
            sys.exit("the server did not start")
        argv = Path(f"/proc/{server}/cmdline").read_bytes().decode(errors="replace")
        port = int(re.search(r"tcp:(\d+)", argv).group(1))
        wanted = args.rooms * (args.members + 1)
        while time.monotonic() < deadline:
            try:
                if json.loads(http(port, "/healthz")).get("connections") == wanted:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        time.sleep(WARMUP + 1.0)  # the senders' warm-up, and a second into the window
        others = {
            "postgres": processes("postgres") - before["postgres"],
            "redis": processes("redis-server") - before["redis"],
        }
        stored0, batches0 = store_counters(port)
        first, t0 = snapshot(server, others), time.monotonic()
        raw = Path(tempfile.mkdtemp(prefix="chatbudget-")) / "spy.raw"
        if spy:
            subprocess.run(
                [
                    *(spy, "record", "-d", str(int(args.window)), "-r", "250"),
                    *("--pid", str(server), "--nonblocking", "--threads"),
                    *("-f", "raw", "-o", str(raw)),
                ],
                capture_output=True,
                check=False,
            )
        else:
            time.sleep(args.window)
        last, t1 = snapshot(server, others), time.monotonic()
        stored1, batches1 = store_counters(port)
        report = run.communicate(timeout=180)[0]
    finally:
        if run.poll() is None:
            run.terminate()
    wall = t1 - t0
    used = {part: ticks / TICK / wall for part, ticks in by_part(first, last).items()}
    messages = (stored1 - stored0) / wall

    def us(cores: float) -> str:
        return f"{cores * 1e6 / messages:.1f}"

    per_batch = messages * wall / max(1.0, batches1 - batches0)
    print(
        f"{args.rooms} rooms x {args.members} members at {args.rate:.0f} msg/s: {messages:.0f}"
        f" messages stored per second in the window, {per_batch:.1f} per transaction"
    )
    print()
    print("| where | CPU, % of a core | us per message |")
    print("|---|---:|---:|")
    main_cpu = used.get("main", 0.0)
    print(f"| server: reactor thread | {100 * main_cpu:.1f} | {us(main_cpu)} |")
    if spy and raw.exists():
        steps, total = split(raw)
        for name, count in steps.most_common():
            share = main_cpu * count / total
            print(f"| - {name} | {100 * share:.1f} | {us(share)} |")
    for part, label in (
        ("pool", "server: pool threads (psycopg2)"),
        ("postgres", "PostgreSQL"),
        ("redis", "Redis"),
    ):
        print(f"| {label} | {100 * used.get(part, 0.0):.1f} | {us(used.get(part, 0.0))} |")
    print(f"| all | {100 * sum(used.values()):.1f} | {us(sum(used.values()))} |")
    print()
    for line in report.splitlines():
        if re.match(r"\| (latency|ack latency|generator CPU|server A CPU|lost)", line):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
