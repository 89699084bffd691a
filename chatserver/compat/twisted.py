"""Twisted internals: a frame straight to the socket, and a lean transport.

``write`` on a TCP transport buffers the data and registers for writability;
the next loop pass sends and unregisters: two ``epoll_ctl`` calls around each
``send``, most of a delivery's cost. When Twisted has nothing buffered, the
socket can take the frame at once; what it doesn't take goes through
``write`` as before, behind nothing, so order is kept. Knowing that "nothing
is buffered" needs three private attributes of ``twisted.internet.tcp``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

DIRECT_WRITE = "direct_write"
LEAN_TRANSPORT = "lean_transport"

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


CHECKS = {
    DIRECT_WRITE: check_direct_write,
    LEAN_TRANSPORT: check_lean_transport,
}


def is_plain_tcp(transport: object) -> bool:
    """Only a plain TCP transport may be written to directly (TLS has its own buffers)."""
    return isinstance(transport, tcp.Connection)


def send_now(transport: Any, data: bytes) -> bytes | None:
    """Give ``data`` to the socket now if Twisted holds nothing for it.

    Returns what is left for ``transport.write`` (all of it when Twisted has
    something buffered), or None when nothing is left to write: all sent, or
    the connection is closing (Twisted would drop it too).
    """
    if transport._tempDataLen or transport.dataBuffer or not transport.connected:
        return data
    if transport.disconnecting or transport._writeDisconnected:
        return None
    try:
        sent = transport.socket.send(data)
    except OSError:  # EAGAIN and EINTR too; Twisted's write reports real errors
        return data
    return data[sent:] if sent < len(data) else None


def shrink_transport(transport: Any) -> None:
    """The transport's dict grew during the HTTP exchange; a copy is sized to what it
    holds now: about 0.4 KB less per connection."""
    transport.__dict__ = dict(transport.__dict__)
