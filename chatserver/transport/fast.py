"""The protocol class a factory serves, built from the fast paths that are on.

Each shortcut is a mixin placed before ``ChatProtocol``; with a shortcut off,
its mixin is simply not there, so the hot paths carry no per-frame test of a
setting.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.protocol import TrafficStats

from chatserver.compat import FastPaths
from chatserver.compat import autobahn as autobahn_compat
from chatserver.compat import twisted as twisted_compat
from chatserver.transport.protocol import ChatProtocol


class _Lean:
    """``lean_connections`` and ``lean_transport``: idle connections kept small."""

    transport: Any
    fast_paths: FastPaths

    def opened(self) -> None:
        # The handshake's leftovers and every attribute at its resting value go.
        autobahn_compat.forget_handshake(self)
        if self.fast_paths.on(twisted_compat.LEAN_TRANSPORT):
            twisted_compat.shrink_transport(self.transport)
        super().opened()  # type: ignore[misc]
        self.compact()

    def compact(self) -> None:
        self.fast_paths.runs[autobahn_compat.LEAN_CONNECTIONS] += 1
        autobahn_compat.compact(self)


class _Direct(twisted_compat.DirectWrite):
    _direct = True  # a class default: one attribute less on every plain TCP connection

    def opened(self) -> None:
        if not twisted_compat.is_plain_tcp(self.transport):
            self._direct = False  # TLS keeps buffers of its own
        super().opened()  # type: ignore[misc]


def protocol_class(factory: WebSocketServerFactory, fast: FastPaths) -> type[ChatProtocol]:
    """A ``ChatProtocol`` subclass for ``factory``, with the shortcuts ``fast`` allows."""
    bases: list[type] = []
    attrs: dict[str, Any] = {"factory": factory, "fast_paths": fast}
    if fast.on(autobahn_compat.INBOUND_FRAMES):
        bases.append(autobahn_compat.InboundFrames)
        attrs["_inbound_limit"] = autobahn_compat.inbound_limit(factory)
    if fast.on(twisted_compat.DIRECT_WRITE):
        bases.append(_Direct)
    if fast.on(autobahn_compat.LEAN_CONNECTIONS):
        bases.append(_Lean)
        attrs.update(autobahn_compat.lean_class_attributes(factory, TrafficStats()))
    bases.append(ChatProtocol)
    return type("ChatProtocol", tuple(bases), attrs)
