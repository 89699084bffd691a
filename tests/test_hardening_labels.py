"""Refused handshakes are counted under a few fixed labels, whatever the client sends.

An attack sent 300 distinct bad tokens and got 313 series of
``chatserver_handshake_rejections_total``: each PyJWT message (with a character
position in it) had become a label. The label now names the kind of refusal;
the detail goes to the log only.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from wsclient import connect, handshake_status, http_get

from chatserver.store import EVERYWHERE
from chatserver.transport.protocol import REJECTION_LABELS

ensure = pytest_twisted.ensureDeferred
SECRET = "a-secret-that-is-long-enough-for-hs256-tokens"
FAMILY = "chatserver_handshake_rejections_total"
# The site counts handshake timeouts itself, under "timeout".
SITE_LABELS = {"timeout"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def broken_token(n: int) -> str:
    """A token whose header is invalid JSON at character ``n``: PyJWT's message names it."""
    header = b'{"alg":"HS256"' + b" " * n + b",}"
    return f"{_b64(header)}.{_b64(b'{}')}.{_b64(b'sig')}"


def good_token(sub: str, **claims: Any) -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def rejection_series(port: int) -> dict[str, float]:
    code, body = await http_get(port, "/metrics")
    assert code == 200
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == FAMILY
    }


@ensure
async def test_distinct_bad_tokens_do_not_add_label_values(make_server):
    server = make_server(auth="token", jwt_secret=SECRET)
    port = server.port
    for n in range(3):
        assert await handshake_status(port, query=f"token={broken_token(n)}") == 401
    few = await rejection_series(port)
    for n in range(3, 60):
        assert await handshake_status(port, query=f"token={broken_token(n)}") == 401
    many = await rejection_series(port)
    assert set(many) == set(few)
    assert set(many) - SITE_LABELS <= REJECTION_LABELS
    assert many["bad_token"] == 60
    assert set(server.factory.rejected) == {"bad_token"}


@ensure
async def test_each_kind_of_refusal_has_its_fixed_label(make_server):
    server = make_server(
        auth="token",
        jwt_secret=SECRET,
        allowed_origins=("https://chat.example",),
        max_connections_per_user=1,
    )
    port = server.port
    expired = jwt.encode({"sub": "a", "exp": int(time.time()) - 3600}, SECRET, algorithm="HS256")
    assert await handshake_status(port, query=f"token={expired}") == 401
    assert await handshake_status(port, query="") == 401
    assert await handshake_status(port, query="token=not.a.jwt") == 401
    evil = {"Origin": "https://evil.example"}
    assert await handshake_status(port, query=f"token={good_token('a')}", headers=evil) == 403
    first = await connect(port, query=f"token={good_token('busy')}")
    assert await handshake_status(port, query=f"token={good_token('busy')}") == 429
    await server.store.set_ban(EVERYWHERE, "mallory", True)
    assert await handshake_status(port, query=f"token={good_token('mallory')}") == 403
    assert dict(server.factory.rejected) == {
        "expired": 1,
        "no_token": 1,
        "bad_token": 1,
        "origin": 1,
        "too_many": 1,
        "banned": 1,
    }
    series = await rejection_series(port)
    assert set(series) - SITE_LABELS <= REJECTION_LABELS
    await first.close()


def test_the_label_set_is_small_and_fixed():
    assert REJECTION_LABELS == {
        "no_user",
        "bad_user",
        "no_token",
        "bad_token",
        "expired",
        "not_yet_valid",
        "bad_claims",
        "origin",
        "banned",
        "too_many",
        "unavailable",
        "timeout",
        "refused",
    }
