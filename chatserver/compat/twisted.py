"""Twisted internals: a frame straight to the socket, a lean transport, a lean poll.

``write`` on a TCP transport buffers the data and registers for writability;
the next loop pass sends and unregisters: two ``epoll_ctl`` calls around each
``send``, most of a delivery's cost. When Twisted has nothing buffered, the
socket can take the frame at once; what it doesn't take goes through
``write`` as before, behind nothing, so order is kept. Knowing that "nothing
is buffered" needs three private attributes of ``twisted.internet.tcp``.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import tcp

DIRECT_WRITE = "direct_write"
_STATE_OPEN = WebSocketProtocol.STATE_OPEN
LEAN_TRANSPORT = "lean_transport"
LEAN_POLL = "lean_poll"
# What the lean poll reads on the epoll reactor.
_POLL_STATE = ("_poller", "_selectables", "_doReadOrWrite")

# What DirectWrite reads on a tcp.Connection, with the type it expects.
_TRANSPORT_STATE = {
    "_tempDataLen": int,
    "dataBuffer": bytes,
    "_writeDisconnected": int,  # bool or int: a flag either way
    "disconnecting": int,
    "connected": int,
    "socket": socket.socket,
}


def _probe_connection() -> tuple[Any, list[socket.socket]]:
    from twisted.internet import reactor

    a, b = socket.socketpair()
    return tcp.Connection(a, None, reactor), [a, b]


def check_direct_write() -> list[str]:
    conn, sockets = _probe_connection()
    try:
        return [
            f"tcp.Connection.{name} ({kind.__name__})"
            for name, kind in _TRANSPORT_STATE.items()
            if not isinstance(getattr(conn, name, None), kind)
        ]
    finally:
        for s in sockets:
            s.close()


def check_lean_transport() -> list[str]:
    conn, sockets = _probe_connection()
    try:
        return (
            [] if isinstance(getattr(conn, "__dict__", None), dict) else ["tcp.Connection.__dict__"]
        )
    finally:
        for s in sockets:
            s.close()


def check_lean_poll() -> list[str]:
    from twisted.internet import epollreactor, reactor

    if not isinstance(reactor, epollreactor.EPollReactor):
        return [f"the epoll reactor ({type(reactor).__name__} is installed)"]
    return [f"EPollReactor.{name}" for name in _POLL_STATE if not hasattr(reactor, name)]


CHECKS = {
    DIRECT_WRITE: check_direct_write,
    LEAN_TRANSPORT: check_lean_transport,
    LEAN_POLL: check_lean_poll,
}


def install_lean_poll(reactor: Any, runs: Counter[str]) -> None:
    """Each ready socket handled without ``log.callWithLogger`` around it.

    Twisted's ``doPoll`` wraps every event in a logging context (a dict copy
    and two calls) so that legacy ``log.msg`` lines name the connection. We
    log through ``twisted.logger``, which ignores that context, and with small
    rooms a message is a read of its own: the wrapper was 3-5 % of the
    reactor. ``_doReadOrWrite`` still catches, logs and disconnects. The
    reactor's own ``doPoll`` comes back with ``uninstall_lean_poll``.
    """
    from twisted.internet import epollreactor

    if not isinstance(reactor, epollreactor.EPollReactor):
        return  # a wrapper (a test's, a worker's): its reactor polls as before
    poller = reactor._poller
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite

    def doPoll(timeout: float | None) -> None:
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        runs[LEAN_POLL] += 1
        get = selectables.get
        for fd, event in events:
            selectable = get(fd)
            if selectable is not None:
                handle(selectable, fd, event)

    reactor.doPoll = reactor.doIteration = doPoll


def uninstall_lean_poll(reactor: Any) -> None:
    for name in ("doPoll", "doIteration"):
        reactor.__dict__.pop(name, None)


def is_plain_tcp(transport: object) -> bool:
    """Only a plain TCP transport may be written to directly (TLS has its own buffers)."""
    return isinstance(transport, tcp.Connection)


class DirectWrite:
    """``write`` for ``chatserver.transport.outbound.Outbound``: straight to the socket
    when Twisted holds nothing for it (fast path ``direct_write``).

    One function per delivery, with the checks inline: this runs once per
    member per batch, so a helper call here is measurable. It reads the
    outbound queue's state (``_writable``, ``_queue``, ``_paused_since``) and
    Twisted's (``_tempDataLen``, ``dataBuffer``, ``_writeDisconnected``).
    """

    _direct = False  # the protocol class sets it for plain TCP connections

    def write(self, data: bytes) -> None:
        if not self._writable or self.state != _STATE_OPEN:
            return
        if self._queue is not None or self._paused_since is not None:
            self._enqueue(data)
            return
        t = self.transport
        if self._direct and not t._tempDataLen and not t.dataBuffer and t.connected:
            if t.disconnecting or t._writeDisconnected:
                return  # closing: Twisted would drop it too
            try:
                sent = t.socket.send(data)
            except OSError:  # EAGAIN and EINTR too; Twisted's write reports real errors
                sent = 0
            if sent == len(data):
                self.factory.direct_writes += 1
                return
            data = data[sent:]
        t.write(data)

    if TYPE_CHECKING:
        _writable: bool
        _queue: Any
        _paused_since: float | None
        state: int
        transport: Any
        factory: Any

        def _enqueue(self, data: bytes) -> None: ...


def shrink_transport(transport: Any) -> None:
    """The transport's dict grew during the HTTP exchange; a copy is sized to what it
    holds now: about 0.4 KB less per connection."""
    transport.__dict__ = dict(transport.__dict__)
