"""The supervisor: the small parent process of ``workers > 1``.

It opens neither the store nor the broker; it reserves the ports (see
``chatserver.workers.listen``), starts the workers, relays their logs, and
keeps them running:

- Each worker is ``python -m chatserver.workers.worker`` (``reactor.spawnProcess``),
  told its spec (the validated config, its index) as one JSON line on stdin.
  The stdin pipe stays open: its end tells a worker that the supervisor is gone.
- A worker that exits, however (a crash, ``kill -9``, a signal of its own),
  is logged with its exit code or signal and started again after a delay
  that doubles from ``BACKOFF_FIRST`` up to ``BACKOFF_MAX``; the delay goes
  back to the first once a worker has run ``BACKOFF_RESET`` seconds.
- Stopping (SIGTERM or SIGINT to the supervisor): every worker gets SIGTERM
  and drains its clients (close code 1001) as a single server does; one
  still running ``drain_seconds + KILL_MARGIN`` later gets SIGKILL. The
  supervisor exits (0) when all have.
- The supervisor answers on the private channel too: its metrics (workers
  running, restarts) go into every /metrics, and it tells the workers which
  of them are running, so a worker between a crash and its restart is
  reported as down rather than as not ready.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver.config import Config
from chatserver.workers import channel
from chatserver.workers.listen import Reservation
from chatserver.workers.logrelay import LineRelay
from chatserver.workers.spec import WorkerSpec
from chatserver.workers.whole import SUPERVISOR, worker_name

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET = 60.0
KILL_MARGIN = 10.0  # beyond drain_seconds: closing handshakes, the store's last flush
WORKER_MODULE = "chatserver.workers.worker"


def runtime_parent() -> str | None:
    """Where the private channel's directory goes (``mkdtemp``: mode 0700, only this
    user reaches the workers). systemd's ``RuntimeDirectory=`` first: it is removed
    with the service even after a SIGKILL, when the supervisor cannot clean up."""
    for name in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        path = (os.environ.get(name) or "").split(":")[0]
        if path and os.path.isdir(path):
            return path
    return None  # the system's temporary directory


def backoff(failures: int) -> float:
    """Seconds before restarting a worker that failed ``failures`` times in a row."""
    return min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)


@dataclass
class Slot:
    """One worker index and the process currently filling it."""

    index: int
    process: IProcessTransport | None = None
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0
    restarts: int = 0
    restart_call: IDelayedCall | None = None
    ended: Deferred[None] | None = None

    @property
    def name(self) -> str:
        return worker_name(self.index)

    @property
    def running(self) -> bool:
        return self.process is not None


class WorkerProcess(ProcessProtocol):
    """One worker's pipes: its spec goes in; its log lines come out."""

    def __init__(self, spec_line: bytes, slot: Slot, supervisor: Supervisor) -> None:
        self._spec_line = spec_line
        self._slot = slot
        self._supervisor = supervisor
        self._out = LineRelay(slot.name, slot.index, structured=True)
        self._err = LineRelay(slot.name, slot.index, structured=False)

    def connectionMade(self) -> None:
        self.transport.write(self._spec_line)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        (self._out if childFD == 1 else self._err).feed(data)

    def processEnded(self, reason: Failure) -> None:
        self._out.flush()
        self._err.flush()
        self._supervisor.ended(self._slot, reason)


class _SupervisorCollector:
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        slots = self._supervisor.slots
        yield GaugeMetricFamily(
            "chatserver_workers", "Worker processes configured.", value=len(slots)
        )
        yield GaugeMetricFamily(
            "chatserver_workers_running",
            "Worker processes running now.",
            value=sum(1 for s in slots if s.running),
        )
        restarts = CounterMetricFamily(
            "chatserver_worker_restarts",
            "Workers started again after they exited, by worker.",
            labels=["worker"],
        )
        for slot in slots:
            restarts.add_metric([str(slot.index)], slot.restarts)
        yield restarts


class Supervisor(Service):
    log = Logger()

    def __init__(self, config: Config, reactor: Any, reservation: Reservation) -> None:
        self.config = config
        self.reactor = reactor
        self.reservation = reservation
        self.slots = [Slot(i) for i in range(1, config.workers + 1)]
        self.runtime_dir: str | None = None
        self._channel: IListeningPort | None = None
        self._stopping = False
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_SupervisorCollector(self))

    def startService(self) -> None:
        super().startService()
        self.runtime_dir = tempfile.mkdtemp(prefix="chatserver-", dir=runtime_parent())
        self._channel = channel.listen(
            self.reactor,
            channel.socket_path(self.runtime_dir, SUPERVISOR),
            channel.ChannelFactory(
                self.reactor, {b"metrics": self._metrics, b"health": self._health}
            ),
        )
        self.log.info(
            "starting {workers} workers; database connections: {workers} x db_pool_size"
            " {pool} = {total}",
            workers=len(self.slots),
            pool=self.config.db_pool_size,
            total=len(self.slots) * self.config.db_pool_size,
        )
        for slot in self.slots:
            self._spawn(slot)

    async def _metrics(self) -> bytes:
        return generate_latest(self._registry)

    async def _health(self) -> bytes:
        workers = {
            str(s.index): {"pid": s.pid, "running": s.running, "restarts": s.restarts}
            for s in self.slots
        }
        return json.dumps({"pid": os.getpid(), "workers": workers}).encode()

    def _spec(self, slot: Slot) -> WorkerSpec:
        assert self.runtime_dir is not None
        return WorkerSpec(
            config=self.config,
            index=slot.index,
            count=len(self.slots),
            runtime_dir=self.runtime_dir,
            parent_pid=os.getpid(),
            ports=dict(self.reservation.ports),
            reactor=type(self.reactor).__module__,
        )

    def _environment(self) -> dict[str, str]:
        """This process's environment (same interpreter, same PYTHONPATH, so the
        same chatserver) minus the CHATSERVER_ settings: the spec is the config."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSERVER_")}
        env.pop("LISTEN_PID", None)  # each worker names itself
        if self._inherited_count():
            env["LISTEN_FDS"] = str(self._inherited_count())
        return env

    def _inherited_count(self) -> int:
        """How many systemd sockets (fds 3..) to pass on: all of them, so that
        LISTEN_FDNAMES still names each (Twisted ignores all if the counts differ)."""
        if not self.reservation.inherited:
            return 0
        count = max(self.reservation.inherited) - 2
        names = os.environ.get("LISTEN_FDNAMES")
        return max(count, len(names.split(":"))) if names else count

    def _child_fds(self) -> dict[int, Any]:
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for fd in range(3, 3 + self._inherited_count()):
            fds[fd] = fd
        return fds

    def _spawn(self, slot: Slot) -> None:
        slot.restart_call = None
        proto = WorkerProcess(self._spec(slot).to_line(), slot, self)
        slot.ended = Deferred()
        slot.started_at = self.reactor.seconds()
        slot.process = self.reactor.spawnProcess(
            proto,
            sys.executable,
            [sys.executable, "-m", WORKER_MODULE],
            env=self._environment(),
            path=os.getcwd(),
            childFDs=self._child_fds(),
        )
        slot.pid = slot.process.pid
        self.log.info("worker {worker} started (pid {pid})", worker=slot.index, pid=slot.pid)

    def ended(self, slot: Slot, reason: Failure) -> None:
        """A worker's process is gone: log how, then restart it unless stopping."""
        status = reason.value
        code = getattr(status, "exitCode", None)
        number = getattr(status, "signal", None)
        how = f"killed by signal {_signal_name(number)}" if number else f"exited with code {code}"
        ran = self.reactor.seconds() - slot.started_at
        pid = slot.pid
        slot.process = None
        slot.pid = None
        ended, slot.ended = slot.ended, None
        if self._stopping:
            self.log.info("worker {worker} (pid {pid}) {how}", worker=slot.index, pid=pid, how=how)
        else:
            if ran >= BACKOFF_RESET:
                slot.failures = 0
            slot.failures += 1
            delay = backoff(slot.failures)
            self.log.warn(
                "worker {worker} (pid {pid}) {how} after {ran:.1f}s; restarting it in {delay:g}s",
                worker=slot.index,
                pid=pid,
                how=how,
                ran=ran,
                delay=delay,
                exit_code=code,
                exit_signal=number,
            )
            slot.restart_call = self.reactor.callLater(delay, self._restart, slot)
        if ended is not None:
            ended.callback(None)

    def _restart(self, slot: Slot) -> None:
        slot.restarts += 1
        self._spawn(slot)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        waiting = []
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            slot.restart_call = None
            if slot.process is not None and slot.ended is not None:
                waiting.append(slot.ended)
                self._signal(slot, "TERM")
        deadline = self.config.drain_seconds + KILL_MARGIN
        self.log.info(
            "stopping {count} workers (they drain their clients; SIGKILL after {deadline:g}s)",
            count=len(waiting),
            deadline=deadline,
        )
        killer = self.reactor.callLater(deadline, self._kill_remaining)
        await DeferredList(waiting)
        if killer.active():
            killer.cancel()
        if self._channel is not None:
            await self._channel.stopListening()
            self._channel = None
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.reservation.close()
        self.log.info("all workers stopped")

    def _kill_remaining(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                self.log.warn(
                    "worker {worker} (pid {pid}) still running: SIGKILL",
                    worker=slot.index,
                    pid=slot.pid,
                )
                self._signal(slot, "KILL")

    def _signal(self, slot: Slot, name: str) -> None:
        try:
            if slot.process is not None:
                slot.process.signalProcess(name)
        except ProcessExitedAlready:
            pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
