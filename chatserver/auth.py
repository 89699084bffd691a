"""Who is connecting: the user name from the opening handshake's query string.

``none`` trusts ``?user=NAME`` (development); ``token`` verifies ``?token=JWT``
(HS256 with ``jwt_secret``, or RS256/ES256 with ``jwt_public_key_file``).
Failures carry the HTTP status for the handshake and a reason for the log only:
a client learns that it was refused, not why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jwt

from chatserver import wire
from chatserver.config import Config


class AuthError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    expires: float | None = None  # Unix time at which the connection must end
    rooms: frozenset[str] = field(default_factory=frozenset)  # private rooms granted


def _one(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


class Authenticator:
    """Checks handshakes; built once, so the key file is read at start, not per connection."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._leeway = config.jwt_leeway
        if config.jwt_public_key_file:
            with open(config.jwt_public_key_file, "rb") as fh:
                self._key: str | bytes | None = fh.read()
            # Never HS256 with a public key: that would let anyone sign with it.
            self._algorithms = ["RS256", "ES256"]
        else:
            self._key = config.jwt_secret
            self._algorithms = ["HS256"]

    def authenticate(self, params: dict[str, list[str]]) -> Identity:
        if self._config.auth == "none":
            user = _one(params, "user")
            if user is None:
                raise AuthError(401, "no ?user= given")
            if not wire.is_valid_name(user):
                raise AuthError(401, "user name is not 1-64 characters of A-Z a-z 0-9 _ . : -")
            return Identity(user)
        token = _one(params, "token")
        if token is None:
            raise AuthError(401, "no ?token= given")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                leeway=self._leeway,
                options={"require": ["sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError(401, "token not yet valid") from None
        except jwt.InvalidTokenError as e:
            raise AuthError(401, f"invalid token: {e}") from None
        user = claims.get("sub")
        if not wire.is_valid_name(user):
            raise AuthError(403, "token subject is not a valid user name")
        rooms = claims.get("rooms", [])
        if not isinstance(rooms, list) or not all(wire.is_valid_name(r) for r in rooms):
            raise AuthError(403, "token rooms claim is not a list of room names")
        exp = claims.get("exp")
        expires = float(exp) + self._leeway if isinstance(exp, int | float) else None
        return Identity(user, expires, frozenset(rooms))
