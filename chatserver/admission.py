"""Who may open a session: per-address and per-user limits, and global bans.

Counted from the moment a handshake is admitted (before the ban check's
round trip to the store), so a burst of handshakes can't overshoot a limit.
"""

from __future__ import annotations

from collections import Counter

from chatserver.config import Config
from chatserver.store import Store, StoreUnavailable

HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403
HTTP_TOO_MANY = 429
HTTP_UNAVAILABLE = 503


class Refused(Exception):
    """A handshake refused by the core: ``status`` for the client, ``reason`` for the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Admission:
    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store
        # Handshakes in progress and open sessions.
        self.by_address: Counter[str] = Counter()
        self.by_user: Counter[str] = Counter()

    async def admit(self, user: str, address: str) -> None:
        """Count ``user`` at ``address`` in, or raise ``Refused`` (nothing counted then)."""
        config = self._config
        if self.by_address[address] >= config.max_connections_per_ip:
            raise Refused(HTTP_TOO_MANY, "too many connections from this address")
        if self.by_user[user] >= config.max_connections_per_user:
            raise Refused(HTTP_TOO_MANY, "too many connections for this user")
        self.by_address[address] += 1
        self.by_user[user] += 1
        try:
            banned = await self._store.banned_everywhere(user)
        except StoreUnavailable:
            self.release(user, address)
            raise Refused(HTTP_UNAVAILABLE, "ban check: store unavailable") from None
        except BaseException:
            self.release(user, address)
            raise
        if banned:
            self.release(user, address)
            raise Refused(HTTP_FORBIDDEN, "user is banned")

    def release(self, user: str, address: str) -> None:
        for counter, key in ((self.by_address, address), (self.by_user, user)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    # -- plain HTTP requests: the same per-address count, no user and no ban check --

    def enter(self, address: str) -> bool:
        """Count an HTTP request from ``address`` in, in the count WebSockets are admitted
        against, so that neither kind can hold more than ``max_connections_per_ip``
        between them; False (nothing counted) when the address is at the limit."""
        if self.by_address[address] >= self._config.max_connections_per_ip:
            return False
        self.by_address[address] += 1
        return True

    def leave(self, address: str) -> None:
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]
