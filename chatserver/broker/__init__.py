"""The broker interface: per-room fan-out between server instances.

The chat core publishes every stored message to its room's channel and
subscribes to a room only while it has local members there. A broker is
at-most-once: the core never relies on it for completeness, only for speed;
gaps are filled from the store.

Messages flow one way, from the broker to the core, through the handlers
given to ``start``; the broker knows nothing of the core (no scope, no
callbacks into it besides those handlers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred

# The room messages of one read from the bus, in order: [(room, payload), ...].
# One list per read lets the core send what they cause together (one write
# per member); the payload is opaque to the broker. The list is the core's.
MessagesHandler = Callable[[list[tuple[str, bytes]]], None]
# Called after the broker had lost messages (reconnect): the core re-reads the store.
ResyncHandler = Callable[[], None]
# A control message (kick, ban) for every instance. Delivered in its place
# among room messages: those read before it are handed over first.
ControlHandler = Callable[[bytes], None]


class Broker(Protocol):
    # Counters for metrics: messages published, room messages received.
    published: int
    received: int

    @property
    def connected(self) -> bool:
        """Messages published now reach the other instances (for readiness)."""

    def start(
        self, on_messages: MessagesHandler, on_resync: ResyncHandler, on_control: ControlHandler
    ) -> Deferred[None]: ...

    def subscribe(self, room: str) -> Deferred[None]:
        """Fires once messages published to the room from now on will arrive."""

    def unsubscribe(self, room: str) -> None: ...

    def publish(self, room: str, payload: bytes) -> None:
        """Best effort: failures are counted and logged, never raised to the sender."""

    def publish_in_order(self, room: str, payload: bytes) -> None:
        """As ``publish``, and in the order of this instance's other calls of it
        (presence events: a user's online must not overtake their offline)."""

    def publish_control(self, payload: bytes) -> None:
        """To every instance, this one included; kept and sent again after an outage."""

    def stop(self) -> Deferred[None]: ...
