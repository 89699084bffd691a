"""The private channel between the processes of one server: a Unix socket each.

Each worker, and the supervisor, listens on ``<runtime_dir>/<name>.sock``; the
directory is made by the supervisor with mode 0700, so only the server's own
user can connect. A connection carries one question (a short line:
``metrics``, ``health`` or ``ready``) and gets one answer, then is closed.
Everything is bounded: the question's length and the time to send it, the
answer's size and the time to get it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

MAX_QUESTION = 64
QUESTION_DEADLINE = 2.0
MAX_ANSWER = 8 << 20

Handler = Callable[[], Awaitable[bytes]]


def socket_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, name.replace(" ", "-") + ".sock")


class _Answering(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_QUESTION
    factory: ChannelFactory
    _timer: IDelayedCall | None = None
    _asked = False

    def connectionMade(self) -> None:
        self._timer = self.factory.reactor.callLater(QUESTION_DEADLINE, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def lineReceived(self, line: bytes) -> None:
        self._disarm()
        if self._asked:
            return  # one question per connection
        self._asked = True
        self.transport.pauseProducing()
        handler = self.factory.handlers.get(line.strip())
        if handler is None:
            self.transport.loseConnection()
            return
        ensureDeferred(handler()).addCallbacks(self._answer, self._failed)

    def _answer(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.loseConnection()

    def _failed(self, failure: Failure) -> None:
        self.factory.log.failure("answering a sibling", failure)
        self.transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._disarm()


class ChannelFactory(Factory):
    """Answers the other processes' questions with this process's own state."""

    log = Logger()
    protocol = _Answering
    noisy = False

    def __init__(self, reactor: Any, handlers: dict[bytes, Handler]) -> None:
        self.reactor = reactor
        self.handlers = handlers


def listen(reactor: Any, path: str, factory: ChannelFactory) -> IListeningPort:
    """Listen on ``path``, replacing the socket a dead predecessor left behind."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return reactor.listenUNIX(path, factory, mode=0o600)


class TooLong(Exception):
    """A sibling's answer exceeded MAX_ANSWER."""


class _Asking(Protocol):
    def __init__(self, question: bytes, done: Deferred[bytes]) -> None:
        self._question = question
        self._done = done
        self._chunks: list[bytes] = []
        self._size = 0

    def connectionMade(self) -> None:
        self.transport.write(self._question + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self._chunks.clear()
            if not self._done.called:
                self._done.errback(TooLong(f"answer over {MAX_ANSWER} bytes"))
            self.transport.abortConnection()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self._done.called:
            self._done.callback(b"".join(self._chunks))


async def ask(reactor: Any, path: str, question: bytes, timeout: float) -> bytes:
    """The answer of the process listening on ``path``; TimeoutError past ``timeout``."""
    protocols: list[_Asking] = []

    def cancel(d: Deferred[bytes]) -> None:
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.abortConnection()

    done: Deferred[bytes] = Deferred(cancel)

    def build() -> _Asking:
        proto = _Asking(question, done)
        protocols.append(proto)
        return proto

    factory = Factory.forProtocol(build)
    factory.noisy = False
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    connecting = endpoint.connect(factory)
    connecting.addErrback(lambda f: None if done.called else done.errback(f))
    done.addTimeout(timeout, reactor, onTimeoutCancel=_timed_out(connecting))
    return await done


def _timed_out(connecting: Deferred[Any]) -> Callable[[Any, float], Any]:
    def on_timeout(result: Any, timeout: float) -> Any:
        connecting.cancel()
        raise TimeoutError(f"no answer within {timeout:g}s")

    return on_timeout
