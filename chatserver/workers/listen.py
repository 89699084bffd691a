"""Listening sockets that several worker processes share (SO_REUSEPORT).

Twisted's endpoints have no SO_REUSEPORT option (twisted/twisted#9101), so each
worker makes its own socket and hands it to ``reactor.adoptStreamPort``. The
endpoint strings of ``listen``, ``metrics_listen`` and ``admin_listen`` keep
working because the endpoint is given a proxy reactor whose ``listenTCP`` and
``listenSSL`` do exactly that; everything else reaches the real reactor.

Which endpoint kinds can be shared, and how:

- ``tcp:``, ``tcp6:``: a SO_REUSEPORT socket per worker; the kernel spreads new
  connections over the workers by a hash of the addresses (a shared accept
  queue balances badly: a few processes take most connections).
- ``ssl:``: the same, with TLS done in the worker by ``TLSMemoryBIOFactory``.
- ``systemd:``: every worker adopts the inherited socket itself (the supervisor
  passes fds 3.. through); systemd's own ``ReusePort=`` is not needed.
- anything else (``unix:``, plugins) is refused at start: a Unix socket path
  belongs to one listener.

The supervisor reserves every TCP port before the workers start: it binds a
SO_REUSEPORT socket that never listens (so it takes no connections) and holds
it. A port in use is then refused at start with one message instead of every
worker failing in a restart loop, nobody else can take the port while a
worker restarts, and ``tcp:0`` gets one port that all workers share (each
worker would otherwise get a port of its own).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory

SHAREABLE = ("tcp", "tcp6", "ssl", "systemd")


class NotShareable(ValueError):
    """An endpoint that several worker processes cannot serve together."""


def endpoint_kind(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def check_shareable(setting: str, description: str) -> None:
    """Refuse, with a message naming the setting, an endpoint workers cannot share."""
    kind = endpoint_kind(description)
    if kind not in SHAREABLE:
        raise NotShareable(
            f"{setting} = {description!r}: {kind}: endpoints cannot be shared by several"
            f" workers; use {', '.join(k + ':' for k in SHAREABLE)} or workers = 1"
        )


def _family(interface: str) -> socket.AddressFamily:
    return socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET


def reuseport_socket(interface: str, port: int, backlog: int | None = None) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT; listening (non-blocking) if ``backlog`` is given.

    Without a backlog it only holds the port: a bound socket that does not
    listen gets no connections, the listening ones of the same port get them all.
    """
    family = _family(interface)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
        if backlog is not None:
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ReusePortReactor:
    """A reactor for ``endpoints.serverFromString`` whose TCP and TLS ports are shared.

    ``port_for_zero``: the port the supervisor reserved for a ``tcp:0`` endpoint,
    so that every worker listens on the same one.
    """

    def __init__(self, reactor: Any, port_for_zero: int | None = None) -> None:
        self._reactor = reactor
        self._port_for_zero = port_for_zero

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        if port == 0 and self._port_for_zero is not None:
            port = self._port_for_zero
        sock = reuseport_socket(interface, port, backlog)
        try:
            return self._reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        finally:
            sock.close()  # the port has its own copy of the descriptor

    def listenSSL(
        self,
        port: int,
        factory: IProtocolFactory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        tls = TLSMemoryBIOFactory(contextFactory, False, factory)
        return self.listenTCP(port, tls, backlog, interface)

    def listenUNIX(self, address: str, *args: Any, **kwargs: Any) -> IListeningPort:
        raise NotShareable(f"unix:{address}: a Unix socket cannot be shared by several workers")


def shared_endpoint(
    reactor: Any, description: str, port_for_zero: int | None = None
) -> IStreamServerEndpoint:
    """The endpoint for ``description``, listening on a port the other workers share."""
    return endpoints.serverFromString(ReusePortReactor(reactor, port_for_zero), description)


@dataclass
class Reservation:
    """What the supervisor holds for its workers: ports, and inherited sockets to pass on."""

    ports: dict[str, int] = field(default_factory=dict)  # description -> port
    inherited: list[int] = field(default_factory=list)  # systemd: file descriptors
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


class _ReservingReactor:
    """Stands in for the reactor while the supervisor resolves its workers' endpoints:
    TCP ports are reserved (bound, never listening), inherited sockets noted."""

    def __init__(self, reactor: Any, reservation: Reservation, description: str) -> None:
        self._reactor = reactor
        self._reservation = reservation
        self._description = description
        self.saved: dict[int, int] = {}

    def restore(self) -> None:
        """Inherited descriptors back at their numbers, for the workers to inherit."""
        for fd, copy in self.saved.items():
            os.dup2(copy, fd)  # inheritable, as systemd passed it
            os.close(copy)
        self.saved.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> int:
        sock = reuseport_socket(interface, port)
        self._reservation.sockets.append(sock)
        self._reservation.ports[self._description] = sock.getsockname()[1]
        return sock.getsockname()[1]

    def listenSSL(
        self,
        port: int,
        factory: IProtocolFactory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> int:
        return self.listenTCP(port, factory, backlog, interface)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> int:
        # The endpoint closes the descriptor once "adopted"; a copy puts it back.
        self._reservation.inherited.append(fileDescriptor)
        self.saved[fileDescriptor] = os.dup(fileDescriptor)
        return fileDescriptor

    def listenUNIX(self, address: str, *args: Any, **kwargs: Any) -> Any:
        raise NotShareable(f"unix:{address}: a Unix socket cannot be shared by several workers")


def reserve(
    reactor: Any, descriptions: list[tuple[str, str]], on_error: Callable[[str], Exception]
) -> Reservation:
    """Resolve every (setting, endpoint) for the workers before they start.

    Raises ``on_error(message)`` for an endpoint that cannot be shared or a
    port that cannot be bound, naming the setting.
    """
    from twisted.internet.protocol import Factory

    reservation = Reservation()
    try:
        for setting, description in descriptions:
            if description in reservation.ports:
                continue
            failures: list[Any] = []
            try:
                check_shareable(setting, description)
                proxy = _ReservingReactor(reactor, reservation, description)
                endpoint = endpoints.serverFromString(proxy, description)
            except NotShareable as e:
                raise on_error(str(e)) from None
            except Exception as e:
                raise on_error(f"{setting} = {description!r}: {e}") from None
            endpoint.listen(Factory()).addErrback(failures.append)
            proxy.restore()
            if failures:
                message = failures[0].getErrorMessage()
                raise on_error(f"{setting} = {description!r}: cannot listen: {message}")
    except BaseException:
        reservation.close()
        raise
    return reservation
