"""The installed entry points: `twistd -n chatserver` as a real process, and packaging."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from wsclient import TIMEOUT, connect

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
