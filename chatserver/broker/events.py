"""What a network broker tells tests and logs about its connections.

Shared by the Redis and the Redis Cluster brokers: an observer list fed with
``(event, detail)`` pairs, and a Deferred that fires once the broker says it
is ``connected``. Which events exist is each broker's own (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

Observer = Callable[[str, Any], None]


class BrokerEvents:
    """Mixed into a broker that sets ``self._observers = []`` and has ``connected``."""

    _observers: list[Observer]
    connected: bool

    def observe(self, callback: Observer) -> None:
        """Call ``callback(event, detail)`` on each connection event."""
        self._observers.append(callback)

    def _event(self, event: str, detail: Any = None) -> None:
        for callback in list(self._observers):
            callback(event, detail)

    def when_connected(self) -> Deferred[None]:
        """Fires once the broker is connected (at once if it is now)."""
        d: Deferred[None] = Deferred()
        if self.connected:
            d.callback(None)
            return d

        def check(event: str, detail: Any) -> None:
            if self.connected and not d.called:
                self._observers.remove(check)
                d.callback(None)

        self._observers.append(check)
        return d
