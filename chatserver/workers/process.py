"""What every server process sets up for itself: a single process, the supervisor, a worker.

- the open-files limit (each WebSocket is a file descriptor);
- SIGTERM/SIGINT stop the reactor cleanly and the process exits 0;
- a worker never outlives its supervisor: the kernel sends it SIGTERM when the
  supervisor dies (Linux ``PR_SET_PDEATHSIG``), and it also stops when its
  stdin -- a pipe from the supervisor -- reaches end of file, which covers
  other systems and the moment before the signal was armed.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

PR_SET_PDEATHSIG = 1


def raise_open_files_limit() -> None:
    """Each WebSocket is a file descriptor, and the usual soft limit is 1024.

    Raise the soft limit to the hard one (always allowed); a hard limit below
    what a deployment needs is the operator's to raise (systemd: LimitNOFILE).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return
    log.info(
        "open files limit: {limit} (about that many connections)",
        limit="unlimited" if hard == resource.RLIM_INFINITY else hard,
    )


def stop_once(reactor: Any) -> Callable[[], None]:
    """A stop that may be asked for many times (a signal, then end of stdin, then
    another signal) and stops the reactor once: a second ``reactor.stop()`` raises."""
    stopping = []

    def stop() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()

    return stop


def stop_cleanly_on_signals(reactor: Any, stop: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT stop the reactor like Twisted's own handlers (the service
    drains its clients), but are not re-raised when the process exits: a server that
    drained has done its job and exits 0, which is what systemd and container
    runtimes expect from a clean stop. Runs after the reactor installed its
    handlers, and replaces them."""
    stop = stop or stop_once(reactor)

    def on_signal(number: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, on_signal)


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel for SIGTERM when the parent dies; False if it is already gone.

    Linux only (elsewhere the stdin watch alone stops the worker). The check
    after arming closes the race with a parent that died just before.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            log.warn("PR_SET_PDEATHSIG failed: {error}", error=os.strerror(errno))
    return os.getppid() == parent_pid


@implementer(IReadDescriptor)
class EndOfInput:
    """Calls ``on_end`` once when the pipe on ``fd`` is closed by its writer."""

    def __init__(self, fd: int, on_end: Callable[[], None]) -> None:
        self._fd = fd
        self._on_end = on_end
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "stdin"

    def doRead(self) -> Exception | None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return e
        if not data:
            return EOFError()
        return None  # nothing more is expected after the spec; ignored

    def connectionLost(self, reason: Failure) -> None:
        self._on_end()
