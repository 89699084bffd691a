"""workers = N: one port served by several processes that look like one server.

Real processes throughout: ``twistd -n chatserver --workers 2`` with a
throwaway Postgres and redis-server; clients are real WebSockets. The worker
a connection lands on is chosen by the kernel (SO_REUSEPORT), so the tests
open connections until both workers have some (bounded), and learn who has
how many from /healthz, which lists every worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_twistd import BIN, Twistd, spawn
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import Agent, readBody
from wsclient import TIMEOUT, Client, connect

from chatserver.config import Config
from chatserver.workers import aggregate
from chatserver.workers.listen import (
    NotShareable,
    check_shareable,
    reuseport_socket,
    shared_endpoint,
)
from chatserver.workers.spec import WorkerSpec
from chatserver.workers.supervisor import BACKOFF_MAX, backoff

ensure = pytest_twisted.ensureDeferred
START_TIMEOUT = 30.0
MAX_CLIENTS = 64  # opened one by one until both workers have some


# -- helpers ------------------------------------------------------------------


class Server(Twistd):
    """A twistd supervisor; ``wait_for`` awaits a line of its log (events, no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[re.Pattern[bytes], int, Deferred[re.Match[bytes]]]] = []

    def outReceived(self, data: bytes) -> None:
        super().outReceived(data)
        self._wake()

    errReceived = outReceived

    def wait_for(self, pattern: bytes, after: int = 0) -> Deferred[re.Match[bytes]]:
        """The first match of ``pattern`` in the output from offset ``after`` on."""
        d: Deferred[re.Match[bytes]] = Deferred()
        self._waiting.append((re.compile(pattern), after, d))
        self._wake()
        return d.addTimeout(START_TIMEOUT, reactor)

    def _wake(self) -> None:
        for entry in list(self._waiting):
            regex, after, d = entry
            found = regex.search(self.output, after)
            if found:
                self._waiting.remove(entry)
                d.callback(found)

    def worker_pids(self) -> dict[int, int]:
        """The latest pid the supervisor logged for each worker index."""
        pids = {}
        for index, pid in re.findall(rb"worker (\d+) started \(pid (\d+)\)", self.output):
            pids[int(index)] = int(pid)
        return pids


def spawn_workers(tmp_path: Path, pg_url: str, redis_url: str, *extra: str) -> Server:
    proto = Server()
    args = [
        "-n",
        "--pidfile=",
        "chatserver",
        "--listen",
        "tcp:0:interface=127.0.0.1:backlog=1024",
        "--workers",
        "2",
        "--database-url",
        pg_url,
        "--redis-url",
        redis_url,
        "--drain-seconds",
        "0",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    reactor.spawnProcess(
        proto, str(BIN / "twistd"), [str(BIN / "twistd"), *args], env=env, path=str(tmp_path)
    )
    return proto


async def serving(proc: Server) -> int:
    """The shared port, once both workers serve."""
    port = await proc.listening.addTimeout(START_TIMEOUT, reactor)
    await proc.wait_for(rb"worker 1 serving")
    await proc.wait_for(rb"worker 2 serving")
    return port


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A GET on a new connection (so the kernel picks a worker each time)."""
    response = (
        await Agent(reactor)
        .request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        .addTimeout(TIMEOUT, reactor)
    )
    body = await readBody(response)
    headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, headers, body


async def health(port: int) -> dict[str, Any]:
    code, _, body = await get(port, "/healthz")
    assert code == 200, body
    return json.loads(body)


def per_worker(body: dict[str, Any]) -> dict[int, int]:
    return {w["worker"]: w.get("connections", 0) for w in body["each"]}


async def clients_on_both_workers(port: int, room: str, each: int = 1) -> list[Client]:
    """Members of ``room``, opened until each worker has at least ``each``."""
    clients: list[Client] = []
    for n in range(MAX_CLIENTS):
        client = await connect(port, f"u{n}")
        await client.join(room)
        clients.append(client)
        if len(clients) >= 2 * each:
            counts = per_worker(await health(port))
            if all(counts.get(i, 0) >= each for i in (1, 2)):
                return clients
    raise AssertionError(f"{MAX_CLIENTS} connections never gave both workers {each}")


async def readyz_settles(port: int) -> tuple[int, bool]:
    """/readyz once every worker's broker links are up: a worker serves before
    they are, and nothing outside it can await that, so this polls (bounded)."""
    deadline = reactor.seconds() + TIMEOUT
    while True:
        code, _, body = await get(port, "/readyz")
        if code == 200 or reactor.seconds() > deadline:
            return code, json.loads(body)["ready"]
        await deferLater(0.05)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: its parent just has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def gone(pids: list[int], timeout: float = TIMEOUT) -> list[int]:
    """Poll (nothing to await: they are not our children) until no pid runs."""
    deadline = reactor.seconds() + timeout
    while any(alive(p) for p in pids) and reactor.seconds() < deadline:
        await deferLater(0.05)
    return [p for p in pids if alive(p)]


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


async def stop(proc: Server) -> None:
    if proc.transport.pid is not None:
        proc.transport.signalProcess("TERM")
    assert await proc.ended.addTimeout(TIMEOUT + 10, reactor) == 0, proc.output.decode()[-3000:]


def when_closed(clients: list[Client], count: int) -> Deferred[list[Client]]:
    """Fires with the first ``count`` of ``clients`` whose connection ends."""
    done: Deferred[list[Client]] = Deferred()
    closed: list[Client] = []

    def one(_: Any, client: Client) -> Any:
        closed.append(client)
        if len(closed) == count and not done.called:
            done.callback(list(closed))
        return _

    for client in clients:
        client.proto.closed.addBoth(one, client)
    return done.addTimeout(TIMEOUT, reactor)


# -- the process tests ----------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_two_workers_share_one_port_and_deliver_in_order_across_workers(
    tmp_path, pg_url, redis
):
    proc = spawn_workers(tmp_path, pg_url, redis.url)
    try:
        port = await serving(proc)
        # New connections land on both workers, and each names itself.
        answered = set()
        for _ in range(MAX_CLIENTS):
            body = await health(port)
            answered.add((body["worker"], body["pid"]))
            if len(answered) == 2:
                break
        assert {w for w, _ in answered} == {1, 2}, answered
        assert dict(answered) == proc.worker_pids()
        assert body["workers"] == 2 and body["workers_running"] == 2

        members = await clients_on_both_workers(port, "r")
        # All but the last are on one worker, the last on the other.
        senders = [members[0], members[-1]]
        sent: list[tuple[int, str]] = []
        for round_ in range(5):
            for n, s in enumerate(senders):
                text = f"sender {n} round {round_}"
                ack = await s.request({"type": "send", "room": "r", "body": text})
                assert ack["type"] == "ack", ack
                sent.append((ack["id"], text))
        for member in members:
            got = [await member.expect("message") for _ in sent]
            assert [(m["id"], m["body"]) for m in got] == sent
        ids = [i for i, _ in sent]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # gap-free
        await stop(proc)
    finally:
        if not proc.ended.called:
            proc.transport.signalProcess("KILL")


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_a_killed_worker_is_restarted_and_its_clients_resume_gap_free(
    tmp_path, pg_url, redis
):
    proc = spawn_workers(tmp_path, pg_url, redis.url)
    try:
        port = await serving(proc)
        members = await clients_on_both_workers(port, "r")
        before = per_worker(await health(port))
        victim_pid = proc.worker_pids()[1]
        seen = {}
        for n in range(3):
            await members[0].request({"type": "send", "room": "r", "body": f"before {n}"})
        for member in members:
            for _ in range(3):
                seen[id(member)] = (await member.expect("message"))["id"]

        mark = len(proc.output)
        os.kill(victim_pid, signal.SIGKILL)
        victims = await when_closed(members, before[1])
        survivors = [m for m in members if m not in victims]
        assert len(survivors) == before[2]
        assert all(v.proto.close_code == 1006 for v in victims)
        await proc.wait_for(rb"worker 1 \(pid %d\) killed by signal SIGKILL" % victim_pid, mark)

        # While they are away, the room goes on.
        missed = []
        for n in range(3):
            ack = await survivors[0].request({"type": "send", "room": "r", "body": f"away {n}"})
            missed.append((ack["id"], f"away {n}"))
        for member in survivors:
            got = [await member.expect("message") for _ in missed]
            assert [(m["id"], m["body"]) for m in got] == missed

        # Each comes back (to whichever worker listens) and gets exactly what it missed.
        back = []
        for victim in victims:
            last = seen[id(victim)]
            client = await connect(port, f"back{len(back)}")
            joined = await client.join("r")
            assert joined["last_id"] == missed[-1][0]
            page = await client.request({"type": "history", "room": "r", "after": last})
            assert [(m["id"], m["body"]) for m in page["messages"]] == missed
            assert page["more"] is False
            back.append(client)
        ack = await survivors[0].request({"type": "send", "room": "r", "body": "live again"})
        assert ack["id"] == missed[-1][0] + 1
        for member in back + survivors:
            got = await member.expect("message")
            assert (got["id"], got["body"]) == (ack["id"], "live again")

        # The supervisor started worker 1 again; the new process answers.
        restarted = await proc.wait_for(rb"worker 1 started \(pid (\d+)\)", mark)
        new_pid = int(restarted.group(1))
        assert new_pid != victim_pid
        await proc.wait_for(rb"worker 1 serving \(pid %d\)" % new_pid, mark)
        answered = None
        for _ in range(MAX_CLIENTS):
            body = await health(port)
            if body["worker"] == 1:
                answered = body["pid"]
                break
        assert answered == new_pid
        await stop(proc)
    finally:
        if not proc.ended.called:
            proc.transport.signalProcess("KILL")


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("signal_name", ["TERM", "INT"])
@ensure
async def test_sigterm_or_sigint_to_the_supervisor_drains_every_worker_and_exits_0(
    tmp_path, pg_url, redis, signal_name
):
    proc = spawn_workers(tmp_path, pg_url, redis.url)
    try:
        port = await serving(proc)
        members = await clients_on_both_workers(port, "r")
        pids = list(proc.worker_pids().values())
        proc.transport.signalProcess(signal_name)  # SIGINT: Ctrl-C
        codes = [await m.wait_closed() for m in members]
        assert codes == [1001] * len(members)
        assert await proc.ended.addTimeout(TIMEOUT + 10, reactor) == 0, proc.output.decode()
        assert await gone(pids) == []  # reaped by the supervisor before it exited
        assert proc.output.count(b"exited with code 0") == 2, proc.output.decode()
        assert b"Traceback" not in proc.output, proc.output.decode()
    finally:
        if not proc.ended.called:
            proc.transport.signalProcess("KILL")


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_metrics_from_any_worker_are_the_whole_servers_and_die_with_the_supervisor(
    tmp_path, pg_url, redis
):
    proc = spawn_workers(tmp_path, pg_url, redis.url)
    try:
        port = await serving(proc)
        members = await clients_on_both_workers(port, "r")
        counts = per_worker(await health(port))
        assert sum(counts.values()) == len(members) and max(counts.values()) < len(members)
        answered_by = set()
        for _ in range(MAX_CLIENTS):
            code, headers, body = await get(port, "/metrics")
            assert code == 200
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in aggregate.parse(body)
                for s in family.samples
            }
            assert samples[("chatserver_connections", ())] == len(members)
            assert samples[("chatserver_rooms_hosted", ())] == 2  # "r", on each worker
            assert samples[("chatserver_joins_total", ())] == len(members)
            assert samples[("chatserver_db_pool_size", ())] == 2 * Config().db_pool_size
            assert samples[("chatserver_workers_reporting", ())] == 2
            assert samples[("chatserver_workers_running", ())] == 2
            assert samples[("chatserver_worker_restarts_total", (("worker", "1"),))] == 0
            on = [v for (name, _), v in samples.items() if name == "chatserver_fast_path_enabled"]
            assert set(on) <= {0.0, 1.0}  # a state: the max, not a sum
            answered_by.add(headers["x-chatserver-worker"])
            if len(answered_by) == 2:
                break
        assert answered_by == {"1", "2"}

        # kill -9 of the supervisor: the kernel tells each worker (SIGTERM), which drains.
        pids = list(proc.worker_pids().values())
        proc.transport.signalProcess("KILL")
        await proc.ended.addTimeout(TIMEOUT, reactor)
        codes = [await m.wait_closed() for m in members]
        assert codes == [1001] * len(members)
        assert await gone(pids) == []
    finally:
        if not proc.ended.called:
            proc.transport.signalProcess("KILL")
        left = re.search(rb"starting on '(.*)/supervisor\.sock'", proc.output)
        if left:  # a supervisor killed with -9 cannot clean up after itself
            shutil.rmtree(left.group(1).decode(), ignore_errors=True)


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_readyz_names_a_worker_that_is_not_ready_until_it_is_back(tmp_path, pg_url, redis):
    # Worker 1 drains two connections over 4 s: not ready for 2 s after the first closes.
    proc = spawn_workers(tmp_path, pg_url, redis.url, "--drain-seconds", "4")
    try:
        port = await serving(proc)
        assert await readyz_settles(port) == (200, True)
        members = await clients_on_both_workers(port, "r", each=2)
        counts = per_worker(await health(port))
        pid = proc.worker_pids()[1]
        mark = len(proc.output)
        os.kill(pid, signal.SIGTERM)  # to the worker alone: it drains, exits 0, comes back
        await when_closed(members, 1)
        # Worker 1 stopped listening before it began closing: worker 2 answers.
        code, _, body = await get(port, "/readyz")
        answer = json.loads(body)
        assert code == 503, answer
        assert answer["worker"] == 2 and answer["not_ready"] == [1], answer
        assert "worker 1: draining" in answer["problems"], answer
        await when_closed(members, counts[1])
        await proc.wait_for(rb"worker 1 \(pid %d\) exited with code 0" % pid, mark)
        restarted = await proc.wait_for(rb"worker 1 started \(pid (\d+)\)", mark)
        await proc.wait_for(rb"worker 1 serving \(pid %s\)" % restarted.group(1), mark)
        assert await readyz_settles(port) == (200, True)
        for member in members:
            await member.close()
        await stop(proc)
    finally:
        if not proc.ended.called:
            proc.transport.signalProcess("KILL")


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_a_worker_that_will_not_stop_is_killed_and_the_supervisor_still_exits_0(
    tmp_path, pg_url, redis
):
    from chatserver.workers.supervisor import KILL_MARGIN

    proc = spawn_workers(tmp_path, pg_url, redis.url)
    try:
        await serving(proc)
        stuck = proc.worker_pids()[2]
        os.kill(stuck, signal.SIGSTOP)  # it cannot drain, or even see SIGTERM
        started = reactor.seconds()
        proc.transport.signalProcess("TERM")
        assert await proc.ended.addTimeout(KILL_MARGIN + TIMEOUT, reactor) == 0
        assert reactor.seconds() - started >= KILL_MARGIN
        assert re.search(rb"worker 2 \(pid %d\) still running: SIGKILL" % stuck, proc.output)
        assert re.search(rb"worker 2 \(pid %d\) killed by signal SIGKILL" % stuck, proc.output)
        assert not alive(stuck)
    finally:
        if not proc.ended.called:
            proc.transport.signalProcess("KILL")


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_every_worker_serves_a_socket_passed_by_systemd(tmp_path, pg_url, redis):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    proc = Server()
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ws"}
    env.pop("PORT", None)
    args = [
        *("-n", "--pidfile=", "chatserver", "--listen", "systemd:domain=INET:name=ws"),
        *("--workers", "2", "--database-url", pg_url, "--redis-url", redis.url),
        *("--drain-seconds", "0"),
    ]
    script = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'
    reactor.spawnProcess(
        proc,
        "/bin/sh",
        ["/bin/sh", "-c", script, str(BIN / "twistd"), *args],
        env=env,
        path=str(tmp_path),
        childFDs={0: "w", 1: "r", 2: "r", 3: sock.fileno()},
    )
    try:
        assert await serving(proc) == port, proc.output.decode()
        for index in (1, 2):
            line = rb"\[worker %d\] chatserver listening on systemd:domain=INET:name=ws: open"
            await proc.wait_for(line % index + rb" http://localhost:%d/" % port)
        # One accept queue, two workers taking from it.
        members = await clients_on_both_workers(port, "r")
        await members[0].request({"type": "send", "room": "r", "body": "hello"})
        for member in members:
            assert (await member.expect("message"))["body"] == "hello"
        await stop(proc)
        assert [await m.wait_closed() for m in members] == [1001] * len(members)
    finally:
        sock.close()
        if not proc.ended.called:
            proc.transport.signalProcess("KILL")


# -- one worker process, driven directly -----------------------------------------


class WorkerOutput(ProcessProtocol):
    """A worker's stdout is JSON log events: fires ``listening`` with its port,
    ``serving`` with its pid, ``ended`` with its exit code."""

    def __init__(self) -> None:
        self.output = b""
        self.events: list[dict[str, Any]] = []
        self.listening: Deferred[int] = Deferred()
        self.serving: Deferred[int] = Deferred()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        *lines, _partial = self.output.split(b"\n")
        for line in lines[len(self.events) :]:
            event = json.loads(line)
            self.events.append(event)
            text = event.get("log_format") or ""
            if "open http://localhost:" in text and not self.listening.called:
                self.listening.callback(event["port"])
            if "serving (pid" in text and not self.serving.called:
                self.serving.callback(event["pid"])

    def errReceived(self, data: bytes) -> None:
        self.output += b""  # stderr is shown on failure only
        self.stderr = getattr(self, "stderr", b"") + data

    def processEnded(self, reason: Any) -> None:
        for d in (self.listening, self.serving):
            if not d.called:
                d.errback(RuntimeError(getattr(self, "stderr", b"").decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


@pytest.fixture
def runtime_dir() -> Any:
    """A short directory: a Unix socket path has at most 107 bytes."""
    import tempfile

    path = tempfile.mkdtemp(prefix="cs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def worker_spec(tmp_path: Path, runtime_dir: str, parent_pid: int) -> WorkerSpec:
    config = Config(
        listen=("tcp:0:interface=127.0.0.1",),
        database_url=f"sqlite:///{tmp_path}/chat.sqlite3",
        drain_seconds=0.0,
    )
    return WorkerSpec(config, 1, 1, runtime_dir, parent_pid)


@ensure
async def test_a_worker_stops_when_its_stdin_closes(tmp_path, runtime_dir):
    proto = WorkerOutput()
    reactor.spawnProcess(
        proto,
        sys.executable,
        [sys.executable, "-m", "chatserver.workers.worker"],
        env=dict(os.environ),
        path=str(tmp_path),
    )
    proto.transport.write(worker_spec(tmp_path, runtime_dir, os.getpid()).to_line())
    port = await proto.listening.addTimeout(START_TIMEOUT, reactor)
    await proto.serving.addTimeout(START_TIMEOUT, reactor)
    client = await connect(port, "alice")
    proto.transport.closeStdin()  # what the supervisor's death does to the pipe
    assert await client.wait_closed() == 1001
    assert await proto.ended.addTimeout(TIMEOUT, reactor) == 0


MIDDLE = """
import subprocess, sys
subprocess.Popen([sys.executable, "-m", "chatserver.workers.worker"]).wait()
"""


@ensure
async def test_a_worker_whose_parent_dies_stops_though_its_stdin_stays_open(tmp_path, runtime_dir):
    """PR_SET_PDEATHSIG alone: this test keeps the worker's stdin pipe open."""
    read_end, write_end = os.pipe()
    proto = WorkerOutput()
    middle = reactor.spawnProcess(
        proto,
        sys.executable,
        [sys.executable, "-c", MIDDLE],
        env=dict(os.environ),
        path=str(tmp_path),
        childFDs={0: read_end, 1: "r", 2: "r"},
    )
    os.close(read_end)
    try:
        os.write(write_end, worker_spec(tmp_path, runtime_dir, middle.pid).to_line())
        port = await proto.listening.addTimeout(START_TIMEOUT, reactor)
        worker_pid = await proto.serving.addTimeout(START_TIMEOUT, reactor)
        client = await connect(port, "alice")
        middle.signalProcess("KILL")
        assert await client.wait_closed() == 1001
        # The worker held the stdout pipe; it is closed once the worker exits.
        await proto.ended.addTimeout(TIMEOUT, reactor)
        assert await gone([worker_pid]) == []
    finally:
        os.close(write_end)


# -- refusals at start ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--workers", "2"], b"set redis_url or redis_cluster"),
        (["--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"], b"SQLite belongs to one"),
        (
            [
                "--workers",
                "2",
                "--redis-url",
                "redis://127.0.0.1:1/0",
                "--database-url",
                "postgresql://nobody@127.0.0.1:1/chat",
                "--listen",
                "unix:/tmp/chat.sock",
            ],
            b"unix: endpoints cannot be shared",
        ),
    ],
    ids=["no broker", "sqlite", "unix socket"],
)
@ensure
async def test_twistd_refuses_workers_it_cannot_run(tmp_path, args, says):
    await refused(tmp_path, args, says)


async def refused(tmp_path: Path, args: list[str], says: bytes) -> None:
    proc = spawn(["-n", "--pidfile=", "chatserver", *args], tmp_path)
    code = await proc.ended.addTimeout(START_TIMEOUT, reactor)
    proc.listening.addErrback(lambda _: None)
    assert code != 0
    assert says in proc.output, proc.output.decode()
    assert b"Traceback" not in proc.output, proc.output.decode()
    assert b"worker 1 started" not in proc.output


@ensure
async def test_workers_refuse_a_taken_port_or_a_missing_database_before_starting(tmp_path):
    from servers import free_port

    broker = ["--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"]
    nowhere = f"postgresql://nobody@127.0.0.1:{free_port()}/chat"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(8)
    try:
        port = taken.getsockname()[1]
        args = [*broker, "--database-url", nowhere, "--listen", f"tcp:{port}:interface=127.0.0.1"]
        await refused(tmp_path, args, b"cannot listen")
    finally:
        taken.close()
    args = [*broker, "--database-url", nowhere, "--listen", "tcp:0:interface=127.0.0.1"]
    await refused(tmp_path, args, b"cannot reach the database")


# -- the pieces ---------------------------------------------------------------------


def test_reuseport_sockets_bind_one_port_twice_and_plain_ones_cannot():
    first = reuseport_socket("127.0.0.1", 0, backlog=16)
    port = first.getsockname()[1]
    second = reuseport_socket("127.0.0.1", port, backlog=16)
    plain = socket.socket()
    try:
        assert second.getsockname()[1] == port
        assert not first.getblocking() and not second.getblocking()
        with pytest.raises(OSError) as refused:
            plain.bind(("127.0.0.1", port))
        assert refused.value.errno == 98  # EADDRINUSE
    finally:
        for s in (first, second, plain):
            s.close()


class Counting:
    """A protocol factory that counts connections and fires when ``total`` are made."""

    def __init__(self, shared: dict[str, Any], name: str) -> None:
        self.shared = shared
        self.name = name

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        from twisted.internet.protocol import Protocol

        self.shared[self.name] += 1
        if sum(self.shared[n] for n in ("a", "b")) == self.shared["total"]:
            self.shared["done"].callback(None)
        return Protocol()


@ensure
async def test_two_shared_endpoints_on_one_port_both_get_connections():
    shared: dict[str, Any] = {"a": 0, "b": 0, "total": 32, "done": Deferred()}
    first = await shared_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(
        Counting(shared, "a")
    )
    port = first.getHost().port
    second = await shared_endpoint(reactor, "tcp:0:interface=127.0.0.1", port).listen(
        Counting(shared, "b")
    )
    clients = []
    try:
        assert second.getHost().port == port
        for _ in range(shared["total"]):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        await shared["done"].addTimeout(TIMEOUT, reactor)
        assert shared["a"] > 0 and shared["b"] > 0, shared
    finally:
        for c in clients:
            c.close()
        await first.stopListening()
        await second.stopListening()


@ensure
async def test_a_shared_tls_endpoint_speaks_tls():
    import twisted.test
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import CertificateOptions

    pem = Path(twisted.test.__file__).parent / "server.pem"

    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    class Once(Protocol):
        def connectionMade(self) -> None:
            self.got: Deferred[bytes] = Deferred()
            self.transport.write(b"over tls")

        def dataReceived(self, data: bytes) -> None:
            self.got.callback(data)
            self.transport.loseConnection()

    description = f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
    listening = await shared_endpoint(reactor, description).listen(Factory.forProtocol(Echo))
    try:
        port = listening.getHost().port
        endpoint = wrapClientTLS(
            CertificateOptions(), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        client = await endpoint.connect(Factory.forProtocol(Once))
        assert await client.got.addTimeout(TIMEOUT, reactor) == b"over tls"
    finally:
        await listening.stopListening()


@pytest.mark.parametrize(
    "description", ["tcp:8080", "tcp6:8080", "ssl:8443", "systemd:domain=INET:index=0"]
)
def test_shareable_endpoints_pass(description):
    check_shareable("listen", description)


def test_a_unix_endpoint_cannot_be_shared_and_the_message_names_the_setting():
    with pytest.raises(NotShareable, match=r"metrics_listen = 'unix:/run/m.sock': unix:"):
        check_shareable("metrics_listen", "unix:/run/m.sock")


def test_metrics_sum_across_processes_except_state_gauges():
    one = b"""# HELP chatserver_connections Open WebSocket connections.
# TYPE chatserver_connections gauge
chatserver_connections 3.0
# HELP chatserver_joins_total Rooms joined.
# TYPE chatserver_joins_total counter
chatserver_joins_total 5.0
# HELP chatserver_fast_path_enabled 1 if on.
# TYPE chatserver_fast_path_enabled gauge
chatserver_fast_path_enabled{path="a"} 1.0
chatserver_fast_path_enabled{path="b"} 0.0
# HELP chatserver_errors_total Errors.
# TYPE chatserver_errors_total counter
chatserver_errors_total{code="x"} 1.0
"""
    two = one.replace(b"connections 3.0", b"connections 4.0").replace(b'code="x"', b'code="y"')
    two = two.replace(b'path="b"} 0.0', b'path="b"} 1.0')
    merged = aggregate.merge([aggregate.parse(one), aggregate.parse(two)], 2)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in aggregate.parse(merged)
        for s in family.samples
    }
    assert samples == {
        ("chatserver_connections", ()): 7.0,
        ("chatserver_joins_total", ()): 10.0,
        ("chatserver_fast_path_enabled", (("path", "a"),)): 1.0,
        ("chatserver_fast_path_enabled", (("path", "b"),)): 1.0,
        ("chatserver_errors_total", (("code", "x"),)): 1.0,
        ("chatserver_errors_total", (("code", "y"),)): 1.0,
        ("chatserver_workers_reporting", ()): 2.0,
    }
    with pytest.raises(ValueError):
        aggregate.parse(b"not { prometheus")


def test_restart_delay_doubles_up_to_its_cap():
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(100) == BACKOFF_MAX == 30.0


def test_the_spec_carries_the_config_through_json(tmp_path):
    from chatserver.workers.spec import SpecError

    config = Config(
        listen=("tcp:0", "tcp:1"),
        workers=3,
        redis_url="redis://127.0.0.1:6379/0",
        database_url="postgresql://u:p@db/chat",
        jwt_secret="s3cret-" * 8,
        auth="token",
    )
    spec = WorkerSpec(config, 2, 3, "/run/x", 42, {"tcp:0": 5000}, "twisted.internet.pollreactor")
    again = WorkerSpec.from_line(spec.to_line())
    assert again == spec and again.config == config
    with pytest.raises(SpecError):
        WorkerSpec.from_line(b'{"config": {"max_body_chars": 0}}\n')
    with pytest.raises(SpecError):
        WorkerSpec.from_line(b"")
