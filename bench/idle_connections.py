"""Idle connections: server memory per connection and how fast connections open.

Starts a throwaway Redis and PostgreSQL and one server (the full stack: Postgres
store, Redis broker), pinned to CPU 0; this process is the client, pinned to
CPU 1. It opens ``--connections`` WebSockets (``--concurrency`` handshakes in
flight), each joining one of ``--rooms`` rooms, then holds them idle and reads
the server's resident memory. Memory per connection is the RSS growth over the
RSS measured after a warm-up of ``--warmup`` connections (imports, pools and
first-use caches are not connection costs), divided by the connections added.

    python bench/idle_connections.py [--connections 10000] [--rooms 100]

Needs picows and uvloop (bench/requirements.txt). Each connection is a file
descriptor in the server and here: the hard limit must allow that many
(``ulimit -Hn``); the script raises its soft limit, and the server raises its own.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from cross_instance import (
    SERVER_ENV,
    Instance,
    can_pin,
    pinned,
    raise_fd_limit,
    venv_tool,
)
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Member(WSListener):
    def __init__(self, room: str) -> None:
        self.room = room
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(WSMsgType.TEXT, json.dumps({"type": "join", "room": self.room}).encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT or self.joined.done():
            return
        msg = json.loads(frame.get_payload_as_bytes())
        if msg.get("type") == "joined":
            self.joined.set_result(None)
        elif msg.get("type") == "error":
            self.joined.set_exception(RuntimeError(str(msg)))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        if not self.joined.done():
            self.joined.set_exception(RuntimeError("closed before joining"))


async def open_many(port: int, start: int, count: int, rooms: int, concurrency: int) -> list:
    sem = asyncio.Semaphore(concurrency)
    members: list[Member] = []

    async def one(i: int) -> None:
        async with sem:
            _, member = await ws_connect(
                lambda: Member(f"idle{i % rooms}"),
                f"ws://127.0.0.1:{port}/ws?user=u{i}",
                websocket_handshake_timeout=60,
            )
            members.append(member)
            await asyncio.wait_for(member.joined, 60)

    await asyncio.gather(*(one(i) for i in range(start, start + count)))
    return members


async def measure(args: argparse.Namespace, server: Instance) -> dict[str, Any]:
    assert server.proc is not None
    pid = server.proc.pid
    base = await open_many(server.port, 0, args.warmup, args.rooms, args.concurrency)
    await asyncio.sleep(1.0)  # let the server settle: a measurement, not a synchronisation
    rss_before = rss_kib(pid)
    t0 = time.monotonic()
    cpu0 = server.cpu()
    rest = await open_many(
        server.port, args.warmup, args.connections - args.warmup, args.rooms, args.concurrency
    )
    storm = time.monotonic() - t0
    storm_cpu = server.cpu() - cpu0
    await asyncio.sleep(2.0)
    rss_after = rss_kib(pid)
    idle_cpu0 = server.cpu()
    await asyncio.sleep(5.0)
    idle_cpu = (server.cpu() - idle_cpu0) / 5.0
    added = len(rest)
    for m in base + rest:
        if m.transport is not None:
            m.transport.send_close(WSCloseCode.OK)
            m.transport.disconnect()
    return {
        "connections": len(base) + added,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "kib_per_connection": (rss_after - rss_before) / added,
        "connects_per_second": added / storm,
        "server_cpu_per_connect_ms": storm_cpu / added * 1000,
        "idle_server_cpu": idle_cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="postgres")
    args = parser.parse_args()
    if not 0 < args.warmup < args.connections:
        parser.error("need 0 < --warmup < --connections")
    sys.path.insert(0, str(REPO / "tests"))
    servers = importlib.import_module("servers")
    raise_fd_limit(args.connections + 1024)
    pin = can_pin()
    root = Path(tempfile.mkdtemp(prefix="chatidle-"))
    redis = servers.RedisServer()
    redis.start()
    pg = None
    server = Instance("A", root / "A", servers.free_port())
    try:
        if args.store == "postgres":
            pg = servers.PostgresServer()
            pg.start()
            database_url = pg.create_database("chatidle")
            import subprocess

            subprocess.run(
                [venv_tool("chatserver-admin"), "migrate", "--database-url", database_url],
                check=True,
                capture_output=True,
            )
        else:
            database_url = f"sqlite:///{root / 'chat.sqlite3'}"
        argv = [
            venv_tool("twistd"),
            "-n",
            "--pidfile=",
            "chatserver",
            "--listen",
            f"tcp:{server.port}:interface=127.0.0.1:backlog=4096",
            "--redis-url",
            redis.url,
            "--database-url",
            database_url,
        ]
        server.start(pinned(argv, 0, pin), {**SERVER_ENV, **os.environ})
        server.wait_listening(30)
        if pin:
            os.sched_setaffinity(0, {1})
        result = uvloop.run(measure(args, server))
        code = server.stop()
        rows = [
            (f"connections (each joined to one of {args.rooms} rooms)", result["connections"]),
            (
                "server RSS after warm-up / with all connections (MiB)",
                f"{result['rss_before_mib']:.1f} / {result['rss_after_mib']:.1f}",
            ),
            ("server RSS per idle connection (KiB)", f"{result['kib_per_connection']:.2f}"),
            ("connection storm: connects + joins/s", f"{result['connects_per_second']:.0f}"),
            ("server CPU per connect + join (ms)", f"{result['server_cpu_per_connect_ms']:.3f}"),
            ("server CPU while idle (% of a core)", f"{result['idle_server_cpu'] * 100:.1f}"),
        ]
        print("| metric | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        print()
        print(
            f"store={args.store}, concurrency={args.concurrency}, warm-up={args.warmup};"
            f" pinning: {'server CPU 0, client CPU 1' if pin else 'none'}; server exit {code};"
            f" nproc={os.cpu_count()}, Python {sys.version.split()[0]}"
        )
        notable = server.notable_log_lines()
        if notable:
            print("server log warnings/errors:\n  " + "\n  ".join(notable))
        return 0
    finally:
        server.stop()
        if pg is not None:
            pg.close()
        redis.close()


if __name__ == "__main__":
    sys.exit(main())
