"""A session: what the chat core knows of one connection.

The core creates it when it admits a handshake and forgets it when the
connection ends. The transport behind it only sends bytes and closes; it
holds nothing of the chat. So the core can be driven with a fake transport
and a fake clock, and a second transport would need no change here.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall


class Transport(Protocol):
    """What the core needs of a connection."""

    def write(self, data: bytes) -> None:
        """Send whole WebSocket frames, in order; bounded (a client that does not read is
        dropped by the transport)."""

    def close(self, code: int, reason: str) -> None:
        """Start a closing handshake with ``code``; frames written before it go first."""

    def stop_reading(self) -> None:
        """Read nothing more from the client, which keeps sending after the close: parsing
        a flood costs CPU even when all of it is ignored. The close handshake's
        timeout then ends the connection."""


NO_GRANTS: frozenset[str] = frozenset()


class Session:
    __slots__ = (
        "address",
        "bad_frames",
        "closing",
        "counted",
        "expiry",
        "granted",
        "history_at",
        "history_budget",
        "history_read",
        "open",
        "opened_at",
        "rooms",
        "strikes",
        "tokens",
        "tokens_at",
        "transport",
        "user",
    )

    def __init__(
        self,
        user: str,
        address: str,
        granted: frozenset[str],
        tokens: float,
        now: float,
        history_budget: float = 0.0,
    ) -> None:
        self.user = user
        self.address = address
        # Private rooms the user's token grants; most grant none, and an empty
        # frozenset is 216 bytes of its own (Python has no shared empty one).
        self.granted = granted or NO_GRANTS
        # room -> None once joined, or the Deferred of a join still in progress.
        self.rooms: dict[str, Deferred[int] | None] = {}
        # Token bucket for the frame rate, and rate-limited frames in a row.
        self.tokens = tokens
        self.tokens_at = now
        self.strikes = 0
        self.bad_frames = 0
        # Token bucket of the bytes history pages may take (a frame costs the same
        # whatever it asks for), refilled from ``history_at``; the caller passes the
        # full bucket as one shared float, so an idle connection holds none of its own.
        self.history_budget = history_budget
        self.history_at = 0.0
        # Fires when the history page being read has been answered: the next waits,
        # so each is charged before the next one is let through.
        self.history_read: Deferred[None] | None = None
        # The WebSocket is open and the core has not decided to close it: frames
        # flow both ways. False again from that decision on, not from the TCP close.
        self.open = False
        # (code, reason) once the core decided to close it, before or after it opened.
        self.closing: tuple[int, str] | None = None
        self.counted = True  # against the admission limits, until the core closes it
        # Where its frames go (rooms' members and delivery are keyed by it); kept
        # after the close, so leaving rooms finds it.
        self.transport: Transport | None = None
        self.expiry: IDelayedCall | None = None
        self.opened_at = 0.0

    def attach(self, transport: Transport, now: float) -> None:
        self.transport = transport
        self.opened_at = now
        self.open = self.closing is None

    def detach(self) -> None:
        self.open = False
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()
        self.expiry = None

    def close(self, code: int, reason: str) -> bool:
        """Decide to close: True the first time only, so a close is counted once.

        Decided before the WebSocket opened, it is remembered: the handshake is
        refused, or the connection closed as soon as it opens.
        """
        if self.closing is not None:
            return False
        self.closing = (code, reason)
        if self.open and self.transport is not None:
            self.open = False
            self.transport.close(code, reason)
        return True

    def __repr__(self) -> str:
        return f"<Session {self.user}@{self.address} rooms={len(self.rooms)}>"
