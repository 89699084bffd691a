"""The broker interface: per-room fan-out between server instances.

The chat core publishes every stored message to its room's channel and
subscribes to a room only while it has local members there. A broker is
at-most-once: the core never relies on it for completeness, only for speed;
gaps are filled from the store.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from twisted.internet.defer import Deferred

# (room, payload) for a room message; the payload is opaque to the broker.
MessageHandler = Callable[[str, bytes], None]
# Called after the broker had lost messages (reconnect): the core re-reads the store.
ResyncHandler = Callable[[], None]
# A control message (kick, ban) for every instance.
ControlHandler = Callable[[bytes], None]


class Broker(Protocol):
    # Entered around the messages of one read from the bus, so that what they
    # send can leave together (the service sets the WebSocket factory's coalesced).
    batch_scope: Callable[[], AbstractContextManager[None]]

    def start(
        self, on_message: MessageHandler, on_resync: ResyncHandler, on_control: ControlHandler
    ) -> Deferred[None]: ...

    def subscribe(self, room: str) -> Deferred[None]:
        """Fires once messages published to the room from now on will arrive."""

    def unsubscribe(self, room: str) -> None: ...

    def publish(self, room: str, payload: bytes) -> None:
        """Best effort: failures are counted and logged, never raised to the sender."""

    def publish_control(self, payload: bytes) -> None:
        """To every instance, this one included; kept and sent again after an outage."""

    def stop(self) -> Deferred[None]: ...
