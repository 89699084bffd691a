"""The embedded default broker: rooms fan out within one process.

A ``MemoryHub`` stands for the shared bus; each server instance has its own
``MemoryBroker`` on it. One process normally has one of each; tests put several
instances on one hub to act like several servers on one Redis.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from chatserver.broker import ControlHandler, MessagesHandler, ResyncHandler


class MemoryHub:
    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.subscribers: dict[str, set[MemoryBroker]] = {}
        self.brokers: set[MemoryBroker] = set()
        # The presence state of the instances on this hub (chatserver.presence.memory).
        self.presence: dict[str, dict[str, int]] = {}

    def numsub(self, room: str) -> int:
        return len(self.subscribers.get(room, ()))


class MemoryBroker:
    def __init__(self, hub: MemoryHub) -> None:
        self._hub = hub
        self._on_messages: MessagesHandler | None = None
        self._on_control: ControlHandler | None = None
        self.rooms: set[str] = set()
        self.published = 0
        self.received = 0

    connected = True  # nothing to lose: the hub is in this process

    @property
    def hub(self) -> MemoryHub:
        return self._hub

    def start(
        self, on_messages: MessagesHandler, on_resync: ResyncHandler, on_control: ControlHandler
    ) -> Deferred[None]:
        self._on_messages = on_messages
        self._on_control = on_control
        self._hub.brokers.add(self)
        return succeed(None)

    def publish_control(self, payload: bytes) -> None:
        for broker in tuple(self._hub.brokers):
            self._hub.clock.callLater(0, broker._control, payload)

    def _control(self, payload: bytes) -> None:
        if self._on_control is not None:
            self._on_control(payload)

    def subscribe(self, room: str) -> Deferred[None]:
        self.rooms.add(room)
        self._hub.subscribers.setdefault(room, set()).add(self)
        return succeed(None)

    def unsubscribe(self, room: str) -> None:
        self.rooms.discard(room)
        subs = self._hub.subscribers.get(room)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self._hub.subscribers[room]

    def publish(self, room: str, payload: bytes) -> None:
        self.published += 1
        # Delivered on a later turn of the reactor, as a network broker would.
        for broker in tuple(self._hub.subscribers.get(room, ())):
            self._hub.clock.callLater(0, broker._receive, room, payload)

    publish_in_order = publish  # delivered in call order anyway

    def _receive(self, room: str, payload: bytes) -> None:
        # One message per delivery here: a one-item list (nothing read together).
        if room in self.rooms and self._on_messages is not None:
            self.received += 1
            self._on_messages([(room, payload)])

    def stop(self) -> Deferred[None]:
        for room in tuple(self.rooms):
            self.unsubscribe(room)
        self._on_messages = None
        self._on_control = None
        self._hub.brokers.discard(self)
        return succeed(None)
