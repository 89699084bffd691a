"""The installed entry points: `twistd -n chatserver` as a real process, and packaging."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from wsclient import TIMEOUT, connect, http_get

ensure = pytest_twisted.ensureDeferred
BIN = Path(sys.executable).parent
ROOT = Path(__file__).parent.parent


class Twistd(ProcessProtocol):
    """Collects output; fires ``listening`` with the port from the start-up log line."""

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        found = re.search(rb"open http://localhost:(\d+)/", self.output)
        if found and not self.listening.called:
            self.listening.callback(int(found.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


def spawn(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Twistd:
    proto = Twistd()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PORT", None)
    reactor.spawnProcess(
        proto, str(BIN / "twistd"), [str(BIN / "twistd"), *args], env=full_env, path=str(cwd)
    )
    return proto


@ensure
async def test_twistd_serves_and_stops_cleanly_on_sigterm(tmp_path):
    proc = spawn(
        ["-n", "--pidfile=", "chatserver", "--listen", "tcp:0:interface=127.0.0.1"], tmp_path
    )
    port = await proc.listening.addTimeout(30, reactor)
    a = await connect(port, "alice")
    b = await connect(port, "bob")
    await a.join("r")
    await b.join("r")
    ack = await a.request({"type": "send", "room": "r", "body": "from a process"})
    assert ack["type"] == "ack"
    assert (await b.expect("message"))["body"] == "from a process"
    # What start-up built is kept out of garbage collection (see chatserver.gcstats).
    code, body = await http_get(port, "/metrics")
    frozen = re.search(rb"^chatserver_gc_frozen_objects (\S+)$", body, re.M)
    assert code == 200 and frozen and float(frozen.group(1)) > 10_000, body[-500:]
    proc.transport.signalProcess("TERM")
    assert await a.wait_closed() == 1001
    assert await proc.ended.addTimeout(TIMEOUT, reactor) == 0, proc.output.decode()
    assert (tmp_path / "chatserver.sqlite3").exists()
    assert b"Traceback" not in proc.output, proc.output.decode()


@ensure
async def test_twistd_refuses_a_bad_setting_with_its_name(tmp_path):
    proc = spawn(
        ["-n", "--pidfile=", "chatserver", "--max-body-chars", "zero"],
        tmp_path,
        env={"CHATSERVER_AUTH": "none"},
    )
    code = await proc.ended.addTimeout(30, reactor)
    proc.listening.addErrback(lambda _: None)
    assert code != 0
    assert b"max_body_chars" in proc.output


@ensure
async def test_twistd_without_its_database_says_so_in_one_line(tmp_path):
    from servers import free_port

    url = f"postgresql://nobody@127.0.0.1:{free_port()}/chat"  # nothing listens there
    proc = spawn(["-n", "--pidfile=", "chatserver", "--database-url", url], tmp_path)
    code = await proc.ended.addTimeout(30, reactor)
    proc.listening.addErrback(lambda _: None)
    assert code != 0
    assert b"cannot reach the database" in proc.output, proc.output.decode()
    assert b"Traceback" not in proc.output, proc.output.decode()


def test_twistd_lists_the_plugin():
    out = subprocess.run(
        [str(BIN / "twistd"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "chatserver" in out


def test_wheel_contains_the_plugin_and_not_twisted_init(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("chatserver-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/chatserver_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "chatserver/static/index.html" in names


@ensure
async def test_json_logs_one_object_per_line_with_connection_fields(tmp_path):
    proc = spawn(
        [
            "--logger",
            "chatserver.logs.json_observer",
            "-n",
            "--pidfile=",
            "chatserver",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--drain-seconds",
            "0",
        ],
        tmp_path,
    )
    port = await proc.listening.addTimeout(30, reactor)
    a = await connect(port, "alice")
    await a.join("r")
    await a.request({"type": "send", "room": "r", "body": "a secret body"})
    proc.transport.signalProcess("TERM")
    assert await a.wait_closed() == 1001
    assert await proc.ended.addTimeout(TIMEOUT, reactor) == 0, proc.output.decode()
    lines = proc.output.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "namespace", "message"} <= r.keys() for r in records)
    opened = [r for r in records if r["message"].startswith("connection open")]
    closed = [r for r in records if r["message"].startswith("connection closed")]
    assert [(r["user"], r["address"], r["level"]) for r in opened] == [
        ("alice", "127.0.0.1", "info")
    ]
    assert closed[0]["user"] == "alice" and closed[0]["code"] == 1001
    assert closed[0]["reason"] == "server shutting down"  # ours, since we closed
    assert isinstance(closed[0]["duration"], float)
    assert "a secret body" not in proc.output.decode()
    # The server raised its own open-files limit and said what it is.
    assert any(r["message"].startswith("open files limit: ") for r in records)


def spawn_activated(sock: socket.socket, tmp_path: Path) -> Twistd:
    """Start twistd the way systemd's socket activation does: the listening socket is
    fd 3, LISTEN_FDS/LISTEN_FDNAMES say so, LISTEN_PID is the server's own pid (the
    shell sets it, then execs twistd in its place)."""
    proto = Twistd()
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ws"}
    env.pop("PORT", None)
    args = ["-n", "--pidfile=", "chatserver", "--listen", "systemd:domain=INET:name=ws"]
    script = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'
    reactor.spawnProcess(
        proto,
        "/bin/sh",
        ["/bin/sh", "-c", script, str(BIN / "twistd"), *args],
        env=env,
        path=str(tmp_path),
        childFDs={0: "w", 1: "r", 2: "r", 3: sock.fileno()},
    )
    return proto


@ensure
async def test_socket_activation_serves_the_inherited_socket_across_a_restart(tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    try:
        first = spawn_activated(sock, tmp_path)
        assert await first.listening.addTimeout(30, reactor) == port
        a = await connect(port, "alice")
        await a.join("r")
        sent = await a.request({"type": "send", "room": "r", "body": "before the restart"})
        first.transport.signalProcess("TERM")
        assert await a.wait_closed() == 1001
        assert await first.ended.addTimeout(TIMEOUT, reactor) == 0, first.output.decode()

        # No server now, but the socket is still open (systemd holds it): a client
        # connecting during the restart waits in the backlog instead of being refused.
        waiting = Deferred.fromCoroutine(connect(port, "bob"))
        second = spawn_activated(sock, tmp_path)
        await second.listening.addTimeout(30, reactor)
        b = await waiting
        await b.join("r")
        page = await b.request({"type": "history", "room": "r", "after": 0})
        assert [(m["id"], m["body"]) for m in page["messages"]] == [
            (sent["id"], "before the restart")
        ]
        second.transport.signalProcess("TERM")
        assert await b.wait_closed() == 1001
        assert await second.ended.addTimeout(TIMEOUT, reactor) == 0, second.output.decode()
    finally:
        sock.close()
