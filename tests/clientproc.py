"""The terminal client as a real process, with its output as lines a test can wait for.

No sleeps: ``expect`` fires when a line matching a pattern has been printed, or
fails the test after a timeout, showing everything the client said.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

TIMEOUT = 15.0
BIN = Path(sys.executable).parent
CLIENT = str(BIN / "chatserver-client")


class ClientProcess(ProcessProtocol):
    """Collects stdout and stderr line by line; ``expect`` reads forward like a pager."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._buffers = {1: b"", 2: b""}
        # (pattern, fd, first line to look at, deferred)
        self._waiters: list[tuple[re.Pattern[str], int, int, Deferred[str]]] = []
        self.pos = 0  # lines before this index have been consumed by expect()
        self.err_pos = 0  # the same for errors and expect_error()
        self.ended: Deferred[int] = Deferred()

    # output

    def _received(self, fd: int, data: bytes) -> None:
        self._buffers[fd] += data
        *complete, self._buffers[fd] = self._buffers[fd].split(b"\n")
        target = self.lines if fd == 1 else self.errors
        for raw in complete:
            target.append(raw.decode("utf-8", errors="replace"))
        if complete:
            self._check(fd)

    def outReceived(self, data: bytes) -> None:
        self._received(1, data)

    def errReceived(self, data: bytes) -> None:
        self._received(2, data)

    def processEnded(self, reason: Any) -> None:
        for fd in (1, 2):
            if self._buffers[fd]:
                self._received(fd, b"\n")
        for *_, d in self._waiters:
            if not d.called:
                d.errback(AssertionError(f"client ended; it said:\n{self.transcript()}"))
        self._waiters.clear()
        self.ended.callback(reason.value.exitCode)

    def _check(self, fd: int) -> None:
        target = self.lines if fd == 1 else self.errors
        for waiter in list(self._waiters):
            pattern, on, start, d = waiter
            if on != fd:
                continue
            for i in range(start, len(target)):
                if pattern.search(target[i]):
                    self._waiters.remove(waiter)
                    if fd == 1:
                        self.pos = max(self.pos, i + 1)
                    else:
                        self.err_pos = max(self.err_pos, i + 1)
                    d.callback(target[i])
                    break

    def transcript(self) -> str:
        return "\n".join(["stdout:", *self.lines, "stderr:", *self.errors])

    async def expect(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The next line (after the last one expected) that matches ``pattern``."""
        return await self._expect(pattern, 1, timeout)

    async def expect_error(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """``expect`` for stderr, with its own place."""
        return await self._expect(pattern, 2, timeout)

    async def _expect(self, pattern: str, fd: int, timeout: float) -> str:
        d: Deferred[str] = Deferred()
        start = self.pos if fd == 1 else self.err_pos
        self._waiters.append((re.compile(pattern), fd, start, d))
        self._check(fd)
        try:
            return await d.addTimeout(timeout, reactor)
        except Exception as e:
            raise AssertionError(
                f"no line matching {pattern!r} within {timeout}s:\n{self.transcript()}"
            ) from e

    # input

    def type(self, *lines: str) -> None:
        for line in lines:
            self.transport.write(line.encode() + b"\n")

    async def wait_ended(self, timeout: float = TIMEOUT) -> int:
        return await self.ended.addTimeout(timeout, reactor)

    def kill(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")


def spawn_client(*args: str) -> ClientProcess:
    """``chatserver-client ARGS`` (the installed console script) with its stdin a pipe."""
    proto = ClientProcess()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reactor.spawnProcess(proto, CLIENT, [CLIENT, *args], env=env)
    return proto


def chat_lines(lines: list[str], room: str) -> list[tuple[int, str, str]]:
    """(id, user, body) of every ``[room] #id user: body`` line, in printed order
    (not the ``user edited #id: body`` lines of edit events)."""
    found = []
    for line in lines:
        m = re.fullmatch(rf"\[{re.escape(room)}\] #(\d+) (\S+): (.*)", line)
        if m:
            found.append((int(m.group(1)), m.group(2), m.group(3)))
    return found


async def talk_elsewhere(make_server: Any, database_url: str, room: str, script_body: str) -> None:
    """While a client's own server is down: five messages from a WebSocket client and
    one from ``chatserver-client --send``, through another server on the same database."""
    from wsclient import connect

    elsewhere = make_server(database_url=database_url)
    carol = await connect(elsewhere.port, "carol")
    await carol.join(room)
    for i in range(1, 6):
        await carol.request({"type": "send", "room": room, "body": f"away {i}"})
    script = spawn_client(
        f"ws://127.0.0.1:{elsewhere.port}/ws",
        "--user",
        "dave",
        "--room",
        room,
        "--send",
        script_body,
    )
    assert await script.wait_ended() == 0, script.transcript()
    await carol.close()
    await elsewhere.stopService()
