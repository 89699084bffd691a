"""Token authentication in the opening handshake, and token expiry on open connections."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from wsclient import connect, handshake_status

ensure = pytest_twisted.ensureDeferred
SECRET = "test-secret-that-is-long-enough-for-hs256"


def token(claims: dict, key=SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def unsigned(claims: dict) -> str:
    """An `alg: none` token, which must never be accepted."""

    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest.fixture
def token_server(make_server):
    return make_server(auth="token", jwt_secret=SECRET, jwt_leeway=0)


@ensure
async def test_token_handshakes(token_server):
    port = token_server.port
    now = int(time.time())
    good = token({"sub": "alice", "exp": now + 600})
    assert await handshake_status(port, query=f"token={good}") == 101
    assert await handshake_status(port, query="") == 401
    assert await handshake_status(port, query="user=alice") == 401  # dev mode is off
    forged = token({"sub": "alice"}, key="another-secret-that-is-long-enough-for-it")
    assert await handshake_status(port, query=f"token={forged}") == 401
    expired = token({"sub": "alice", "exp": now - 60})
    assert await handshake_status(port, query=f"token={expired}") == 401
    early = token({"sub": "alice", "nbf": now + 600})
    assert await handshake_status(port, query=f"token={early}") == 401
    assert await handshake_status(port, query=f"token={unsigned({'sub': 'alice'})}") == 401
    assert await handshake_status(port, query="token=not.a.jwt") == 401
    no_sub = token({"name": "alice"})
    assert await handshake_status(port, query=f"token={no_sub}") == 401
    bad_sub = token({"sub": "no spaces allowed"})
    assert await handshake_status(port, query=f"token={bad_sub}") == 403
    assert token_server.factory.rejected["token expired"] == 1


@ensure
async def test_the_token_subject_is_the_user(token_server):
    a = await connect(token_server.port, query=f"token={token({'sub': 'carol'})}")
    await a.join("r")
    await a.request({"type": "send", "room": "r", "body": "hi"})
    assert (await a.expect("message"))["user"] == "carol"


@ensure
async def test_a_connection_is_closed_with_4001_when_its_token_expires(token_server):
    soon = token({"sub": "alice", "exp": int(time.time()) + 2})
    a = await connect(token_server.port, query=f"token={soon}")
    await a.join("r")
    assert await a.wait_closed(timeout=10) == 4001
    assert "token expired" in a.proto.close_reason


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@ensure
async def test_public_key_tokens(make_server, tmp_path, kind):
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        algorithm = "RS256"
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        algorithm = "ES256"
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(public_pem)
    server = make_server(auth="token", jwt_public_key_file=str(key_file))
    good = token({"sub": "alice"}, key=private, algorithm=algorithm)
    assert await handshake_status(server.port, query=f"token={good}") == 101
    # Algorithm confusion: HS256 "signed" with the public key must not pass.
    confused = _hs256_with(public_pem, {"sub": "mallory"})
    assert await handshake_status(server.port, query=f"token={confused}") == 401
    assert await handshake_status(server.port, query=f"token={token({'sub': 'x'})}") == 401


def _hs256_with(key: bytes, claims: dict) -> str:
    """PyJWT refuses to sign HS256 with a PEM key, so build the token by hand."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"
