"""One connection's outgoing bytes: bounded, and dropped rather than grown.

The transport tells us (as an ``IPushProducer``) when its buffer is full; we
queue while paused, and a client that stays behind or lets the queue grow past
``max_send_buffer`` is dropped instead of growing the server's memory.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from chatserver.config import Config

log = Logger()
STATE_OPEN = WebSocketProtocol.STATE_OPEN  # after our close frame (or the peer's): nothing more


def cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()


@implementer(IPushProducer)
class Outbound:
    """Mixed into the protocol: ``write`` sends or queues, ``abort_slow`` drops."""

    factory: Any
    transport: Any
    user: str
    peer: str
    state: int
    _writable = False  # open, and not dropped
    _paused_since: float | None = None
    _slow_timer: IDelayedCall | None = None
    _over_timer: IDelayedCall | None = None
    _queue: deque[bytes] | None = None  # made when the transport first pushes back
    _queued = 0

    def write(self, data: bytes) -> None:
        """Whole frames, in order: to the transport now, or queued behind what waits."""
        if not self._writable or self.state != STATE_OPEN:
            return
        if self._queue is None and self._paused_since is None:
            self.transport.write(data)
            return
        self._enqueue(data)

    def _enqueue(self, data: bytes) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(data)
        self._queued += len(data)
        config: Config = self.factory.config
        if self._queued > config.max_send_buffer and self._over_timer is None:
            # A burst (one group commit, a history page) passes if the client
            # drains it within the grace; one that stays over is dropped.
            if config.send_buffer_grace <= 0:
                self.abort_slow("send buffer full")
            else:
                self._over_timer = self.factory.clock.callLater(
                    config.send_buffer_grace, self._still_over
                )

    def _still_over(self) -> None:
        self._over_timer = None
        if self._queued > self.factory.config.max_send_buffer:
            self.abort_slow("send buffer full")

    @property
    def send_buffer_over(self) -> bool:
        """Over ``max_send_buffer`` and waiting out the grace."""
        return self._over_timer is not None

    def pauseProducing(self) -> None:
        if self._paused_since is None:
            clock = self.factory.clock
            self._paused_since = clock.seconds()
            self._slow_timer = clock.callLater(
                self.factory.config.slow_client_timeout, self.abort_slow, "not reading"
            )

    def resumeProducing(self) -> None:
        self._paused_since = None
        cancel(self._slow_timer)
        self._slow_timer = None
        queue = self._queue
        while queue and self._paused_since is None:
            data = queue.popleft()
            self._queued -= len(data)
            self.transport.write(data)  # may pause us again
        if queue is not None and not queue:
            self._queue = None  # an empty deque is still most of a KB
        if self._queued <= self.factory.config.max_send_buffer:
            cancel(self._over_timer)
            self._over_timer = None

    def hand_over(self) -> None:
        """A clean close follows: Twisted writes what it holds before the FIN, and
        no longer asks us for more, so what is queued (at most about
        ``max_send_buffer``) goes to it now rather than being lost."""
        queue = self._queue
        self._queue = None
        self._queued = 0
        if queue:
            self.transport.write(b"".join(queue))

    def stopProducing(self) -> None:
        self._writable = False
        self._queue = None

    def start_writing(self) -> None:
        """The WebSocket is open: frames may go out."""
        self._writable = True

    def stop_writing(self) -> None:
        self._writable = False
        self._queue = None
        for timer in (self._slow_timer, self._over_timer):
            cancel(timer)

    def abort_slow(self, why: str) -> None:
        if not self._writable:
            return
        self._writable = False
        self._queue = None
        self.factory.dropped_slow += 1
        log.info("dropping {user} at {peer}: {why}", user=self.user, peer=self.peer, why=why)
        # Not a close handshake: a peer that doesn't read would never finish it.
        self.transport.abortConnection()
