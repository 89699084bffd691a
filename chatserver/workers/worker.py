"""A worker process: ``python -m chatserver.workers.worker``, started by the supervisor.

Each worker is a full chat server instance (its own store pool and broker
connections; rooms meet across workers over the broker, as across hosts)
plus its end of the private channel, in one service tree: the channel starts
first and stops last, so siblings can ask a draining worker how it is.

The order at start matters and is why the imports wait:
1. ``LISTEN_PID`` is set to this process before Twisted reads the systemd
   variables (when ``twisted.internet.endpoints`` is first imported), so the
   sockets the supervisor passed through as fds 3.. are this worker's too;
2. the spec is read from stdin, then the parent-death signal armed and
   checked against the parent's pid in the spec;
3. the reactor (the kind the supervisor runs), logging, and the service.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatserver.workers.spec import WorkerSpec


def main() -> int:
    if "LISTEN_FDS" in os.environ:
        os.environ["LISTEN_PID"] = str(os.getpid())

    from chatserver.workers.spec import MAX_SPEC_BYTES, SpecError, WorkerSpec

    line = sys.stdin.buffer.readline(MAX_SPEC_BYTES + 1)
    try:
        spec = WorkerSpec.from_line(line)
    except SpecError as e:
        sys.stderr.write(f"chatserver worker: {e}\n")
        return 2

    from chatserver.workers.process import die_with_parent

    if not die_with_parent(spec.parent_pid):
        sys.stderr.write("chatserver worker: the supervisor is gone; not starting\n")
        return 1
    return run(spec)


def _install_reactor(name: str | None) -> None:
    if not name:
        return
    import importlib

    from twisted.internet.error import ReactorAlreadyInstalledError

    try:
        install = getattr(importlib.import_module(name), "install", None)
        if install is not None:
            install()
    except (ImportError, ReactorAlreadyInstalledError):
        pass  # the default reactor serves


def run(spec: WorkerSpec) -> int:
    _install_reactor(spec.reactor)
    from twisted.internet import reactor
    from twisted.logger import Logger, globalLogBeginner

    from chatserver.workers.logrelay import worker_observer

    globalLogBeginner.beginLoggingTo([worker_observer(sys.stdout)], redirectStandardIO=True)
    log = Logger(namespace="chatserver.workers")

    from chatserver.broker.redis import RedisTLSUnavailable
    from chatserver.gcstats import freeze_startup_objects
    from chatserver.store import SchemaError
    from chatserver.workers.process import (
        EndOfInput,
        raise_open_files_limit,
        stop_cleanly_on_signals,
        stop_once,
    )
    from chatserver.workers.service import WorkerService

    raise_open_files_limit()
    try:
        service = WorkerService(spec, reactor)
    except (SchemaError, RedisTLSUnavailable) as e:
        log.error("chatserver: {error}", error=str(e))
        return 1
    stop = stop_once(reactor)
    try:
        service.privilegedStartService()
    except Exception:
        log.failure("worker {worker} could not start", worker=spec.index)
        return 1

    def started() -> None:
        stop_cleanly_on_signals(reactor, stop)
        reactor.addReader(EndOfInput(sys.stdin.fileno(), stop))
        service.startService()
        frozen = freeze_startup_objects()
        log.info(
            "worker {worker} serving (pid {pid}); {frozen} objects from start-up kept out of"
            " garbage collection",
            worker=spec.index,
            pid=os.getpid(),
            frozen=frozen,
        )

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
