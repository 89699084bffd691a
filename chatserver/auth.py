"""Who is connecting: the user name from the opening handshake's query string.

``none`` trusts ``?user=NAME`` (development); ``token`` verifies ``?token=JWT``
(HS256 with ``jwt_secret``, or RS256/ES256 with ``jwt_public_key_file``).
Failures carry the HTTP status for the handshake and a reason for the log only:
a client learns that it was refused, not why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from chatserver import wire
from chatserver.config import Config

MIN_RSA_BITS = 2048
TIME_CLAIMS = ("exp", "nbf", "iat")

# AuthError.label values: few and fixed, so they can name metrics (reasons can't).
LABELS = frozenset(
    {"no_user", "bad_user", "no_token", "bad_token", "expired", "not_yet_valid", "bad_claims"}
)


class AuthError(Exception):
    """``status`` for the client, ``reason`` for the log, ``label`` one of ``LABELS``."""

    def __init__(self, status: int, reason: str, label: str = "bad_token") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.label = label


class KeyFileError(ValueError):
    """The public key file can't verify tokens; raised at start, never per connection."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    expires: float | None = None  # Unix time at which the connection must end
    rooms: frozenset[str] = field(default_factory=frozenset)  # private rooms granted


def _one(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def load_public_key(path: str) -> tuple[Any, list[str]]:
    """The key and the one algorithm it verifies.

    Offering only the key type's own algorithm means a token whose header names
    another one is an ordinary invalid token, not a key-type error inside PyJWT
    (which used to become an HTTP 500 and a traceback).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise KeyFileError(e.strerror or "unreadable") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError("not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"RSA key of {key.key_size} bits; use {MIN_RSA_BITS} or more")
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyFileError(f"EC key on {key.curve.name}; ES256 needs P-256 (secp256r1)")
        return key, ["ES256"]
    raise KeyFileError(f"{type(key).__name__}: use an RSA (RS256) or P-256 EC (ES256) key")


def _is_time(value: Any) -> bool:
    # bool is an int, and json reads NaN and Infinity: none of them is a time.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Authenticator:
    """Checks handshakes; built once, so the key file is read at start, not per connection."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._leeway = config.jwt_leeway
        self._key: Any
        if config.jwt_public_key_file:
            # Never HS256 with a public key: that would let anyone sign with it.
            self._key, self._algorithms = load_public_key(config.jwt_public_key_file)
        else:
            self._key = config.jwt_secret
            self._algorithms = ["HS256"]
        self._require = ["sub"] + (["exp"] if config.jwt_require_exp else [])
        self._issuer = config.jwt_issuer
        # With no audience configured PyJWT refuses any token that has one.
        self._audience = config.jwt_audience

    def authenticate(self, params: dict[str, list[str]]) -> Identity:
        if self._config.auth == "none":
            user = _one(params, "user")
            if user is None:
                raise AuthError(401, "no ?user= given", "no_user")
            if not wire.is_valid_name(user):
                raise AuthError(
                    401, "user name is not 1-64 characters of A-Z a-z 0-9 _ . : -", "bad_user"
                )
            return Identity(user)
        token = _one(params, "token")
        if token is None:
            raise AuthError(401, "no ?token= given", "no_token")
        claims = self._decode(token)
        for name in TIME_CLAIMS:
            # PyJWT takes "exp": "123" for 123, but it would never be enforced later.
            if name in claims and not _is_time(claims[name]):
                raise AuthError(401, f"token {name} claim is not a number", "bad_claims")
        user = claims.get("sub")
        if not wire.is_valid_name(user):
            raise AuthError(403, "token subject is not a valid user name", "bad_claims")
        rooms = claims.get("rooms", [])
        if not isinstance(rooms, list) or not all(wire.is_valid_name(r) for r in rooms):
            raise AuthError(403, "token rooms claim is not a list of room names", "bad_claims")
        exp = claims.get("exp")
        expires = float(exp) + self._leeway if exp is not None else None
        return Identity(user, expires, frozenset(rooms))

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                leeway=self._leeway,
                issuer=self._issuer,
                audience=self._audience,
                options={"require": self._require, "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired", "expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError(401, "token not yet valid", "not_yet_valid") from None
        except (
            jwt.MissingRequiredClaimError,
            jwt.InvalidIssuerError,
            jwt.InvalidAudienceError,
            jwt.InvalidIssuedAtError,
        ) as e:
            raise AuthError(401, f"token claims refused: {e}", "bad_claims") from None
        except jwt.PyJWTError as e:
            # Every other PyJWT error (InvalidKeyError too) is a bad token, not our fault.
            raise AuthError(401, f"invalid token: {e}", "bad_token") from None
