"""Who is connecting: the user name from the opening handshake's query string.

``none`` trusts ``?user=NAME`` (development); ``token`` verifies ``?token=JWT``.
Failures carry the HTTP status for the handshake and a reason for the log only:
a client learns that it was refused, not why.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt

from chatserver import wire
from chatserver.config import Config

LEEWAY_SECONDS = 30


class AuthError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    expires: float | None = None  # Unix time at which the connection must end


def _one(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def authenticate(config: Config, params: dict[str, list[str]]) -> Identity:
    if config.auth == "none":
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
            config.jwt_secret,
            algorithms=["HS256"],
            leeway=LEEWAY_SECONDS,
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
    exp = claims.get("exp")
    return Identity(user, float(exp) + LEEWAY_SECONDS if exp is not None else None)
