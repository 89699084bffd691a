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


def in_an_hour() -> int:
    return int(time.time()) + 3600


@ensure
async def test_token_handshakes(token_server):
    port = token_server.port
    now = int(time.time())
    good = token({"sub": "alice", "exp": now + 600})
    assert await handshake_status(port, query=f"token={good}") == 101
    assert await handshake_status(port, query="") == 401
    assert await handshake_status(port, query="user=alice") == 401  # dev mode is off
    forged = token({"sub": "alice", "exp": now + 600}, key="another-secret-that-is-long-enough")
    assert await handshake_status(port, query=f"token={forged}") == 401
    expired = token({"sub": "alice", "exp": now - 60})
    assert await handshake_status(port, query=f"token={expired}") == 401
    early = token({"sub": "alice", "exp": now + 1200, "nbf": now + 600})
    assert await handshake_status(port, query=f"token={early}") == 401
    no_alg = unsigned({"sub": "alice", "exp": now + 600})
    assert await handshake_status(port, query=f"token={no_alg}") == 401
    assert await handshake_status(port, query="token=not.a.jwt") == 401
    no_sub = token({"name": "alice", "exp": now + 600})
    assert await handshake_status(port, query=f"token={no_sub}") == 401
    bad_sub = token({"sub": "no spaces allowed", "exp": now + 600})
    assert await handshake_status(port, query=f"token={bad_sub}") == 403
    assert token_server.factory.rejected["expired"] == 1


@ensure
async def test_the_token_subject_is_the_user(token_server):
    carol = token({"sub": "carol", "exp": in_an_hour()})
    a = await connect(token_server.port, query=f"token={carol}")
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
    exp = in_an_hour()
    good = token({"sub": "alice", "exp": exp}, key=private, algorithm=algorithm)
    assert await handshake_status(server.port, query=f"token={good}") == 101
    # Algorithm confusion: HS256 "signed" with the public key must not pass.
    confused = _hs256_with(public_pem, {"sub": "mallory", "exp": exp})
    assert await handshake_status(server.port, query=f"token={confused}") == 401
    hs256 = token({"sub": "x", "exp": exp})
    assert await handshake_status(server.port, query=f"token={hs256}") == 401


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


# -- refusals that must be clean 401s, and the claims that are checked ----------


def _private_key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


ALGORITHM = {"rsa": "RS256", "ec": "ES256"}


def _public_key_file(tmp_path, private, name: str = "jwt.pub") -> str:
    path = tmp_path / name
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return str(path)


@pytest.fixture
def log_events():
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def assert_no_traceback(events: list[dict]) -> None:
    from twisted.logger import formatEvent

    assert [e for e in events if "log_failure" in e] == []
    assert not any("Traceback" in formatEvent(e) for e in events)


@pytest.mark.parametrize(("key_kind", "signer_kind"), [("rsa", "ec"), ("ec", "rsa")])
@ensure
async def test_a_token_for_the_other_key_type_is_a_401_without_a_traceback(
    make_server, tmp_path, log_events, key_kind, signer_kind
):
    server = make_server(
        auth="token", jwt_public_key_file=_public_key_file(tmp_path, _private_key(key_kind))
    )
    claims = {"sub": "mallory", "exp": in_an_hour()}
    other = token(claims, key=_private_key(signer_kind), algorithm=ALGORITHM[signer_kind])
    assert await handshake_status(server.port, query=f"token={other}") == 401
    assert_no_traceback(log_events)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@ensure
async def test_time_claims_must_be_numbers(token_server, claim):
    now = int(time.time())
    claims = {"sub": "alice", "exp": now + 600, "nbf": now - 60, "iat": now - 60}
    assert await handshake_status(token_server.port, query=f"token={token(claims)}") == 101
    # A string PyJWT would read as a number, but that is never enforced later.
    stringly = token({**claims, claim: str(claims[claim])})
    assert await handshake_status(token_server.port, query=f"token={stringly}") == 401


@ensure
async def test_a_token_without_exp_is_refused_unless_jwt_require_exp_is_false(make_server):
    forever = f"token={token({'sub': 'alice'})}"
    strict = make_server(auth="token", jwt_secret=SECRET)
    assert await handshake_status(strict.port, query=forever) == 401
    lax = make_server(auth="token", jwt_secret=SECRET, jwt_require_exp=False)
    assert await handshake_status(lax.port, query=forever) == 101


@ensure
async def test_jwt_issuer_must_match_iss(make_server):
    server = make_server(auth="token", jwt_secret=SECRET, jwt_issuer="https://auth.example/")
    exp = in_an_hour()

    async def status(**claims) -> int:
        query = f"token={token({'sub': 'alice', 'exp': exp, **claims})}"
        return await handshake_status(server.port, query=query)

    assert await status(iss="https://auth.example/") == 101
    assert await status() == 401
    assert await status(iss="https://evil.example/") == 401
    # PyJWT won't encode a non-string iss, so sign this one by hand.
    listed = _hs256_with(
        SECRET.encode(), {"sub": "a", "exp": exp, "iss": ["https://auth.example/"]}
    )
    assert await handshake_status(server.port, query=f"token={listed}") == 401


@ensure
async def test_jwt_audience_must_be_in_aud(make_server):
    server = make_server(auth="token", jwt_secret=SECRET, jwt_audience="chat")
    exp = in_an_hour()

    async def status(**claims) -> int:
        query = f"token={token({'sub': 'alice', 'exp': exp, **claims})}"
        return await handshake_status(server.port, query=query)

    assert await status(aud="chat") == 101
    assert await status(aud=["billing", "chat"]) == 101
    assert await status() == 401
    assert await status(aud="billing") == 401
    assert await status(aud=["billing"]) == 401


@ensure
async def test_without_jwt_audience_tokens_with_an_aud_are_refused(token_server):
    exp = in_an_hour()
    for_us = token({"sub": "alice", "exp": exp})
    assert await handshake_status(token_server.port, query=f"token={for_us}") == 101
    for_billing = token({"sub": "alice", "exp": exp, "aud": "billing"})
    assert await handshake_status(token_server.port, query=f"token={for_billing}") == 401


# -- configuration checked at start ---------------------------------------------


@pytest.mark.parametrize("name", ["jwt_secret", "admin_api_key"])
def test_a_secret_under_32_bytes_stops_the_server_at_start(name):
    from chatserver.config import ConfigError, load

    short = "s3cret-" + "x" * 24  # 31 bytes
    with pytest.raises(ConfigError, match=name) as refused:
        load(None, {f"CHATSERVER_{name.upper()}": short}, {})
    assert short not in str(refused.value)  # the length, never the secret
    with pytest.raises(ConfigError, match=name):
        load(None, {}, {name: short})
    assert getattr(load(None, {}, {name: short + "x"}), name) == short + "x"
    # Bytes, not characters: 16 two-byte characters are enough.
    assert getattr(load(None, {}, {name: "é" * 16}), name) == "é" * 16


def _unusable_keys():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),
    }


@pytest.mark.parametrize("kind", ["ed25519", "p384", "rsa1024", "not-pem"])
def test_an_unusable_public_key_file_stops_the_server_at_start(tmp_path, kind):
    from chatserver.config import Config, ConfigError

    if kind == "not-pem":
        path = tmp_path / "jwt.pub"
        path.write_text("this is not a key\n")
        key_file = str(path)
    else:
        key_file = _public_key_file(tmp_path, _unusable_keys()[kind])
    with pytest.raises(ConfigError, match="jwt_public_key_file"):
        Config(auth="token", jwt_public_key_file=key_file)


@pytest.mark.parametrize(
    ("name", "value"),
    [("admin_auth_failures", 0), ("admin_auth_lockout", 0.5), ("admin_auth_lockout", 90000)],
)
def test_admin_throttle_settings_are_range_checked(name, value):
    from chatserver.config import ConfigError, load

    with pytest.raises(ConfigError, match=name):
        load(None, {}, {name: value})


# -- the Authenticator on its own -------------------------------------------------


def _authenticator(**settings):
    from chatserver.auth import Authenticator
    from chatserver.config import Config

    return Authenticator(Config(**{"auth": "token", "jwt_secret": SECRET, **settings}))


def _refusal(authenticator, query: dict):
    from chatserver.auth import AuthError

    with pytest.raises(AuthError) as refused:
        authenticator.authenticate({k: [v] for k, v in query.items()})
    return refused.value


@pytest.mark.parametrize(
    ("claims", "status", "label"),
    [
        (None, 401, "no_token"),
        ({"sub": "a", "exp": -1}, 401, "expired"),
        ({"sub": "a", "exp": 2**40, "nbf": 2**39}, 401, "not_yet_valid"),
        ({"sub": "a"}, 401, "bad_claims"),  # no exp
        ({"sub": "a", "exp": 2**40, "aud": "x"}, 401, "bad_claims"),
        ({"sub": "a", "exp": "9999999999"}, 401, "bad_claims"),
        ({"sub": "a b", "exp": 2**40}, 403, "bad_claims"),
        ({"sub": "a", "exp": 2**40, "rooms": "r"}, 403, "bad_claims"),
        ("not.a.jwt", 401, "bad_token"),
    ],
)
def test_refusals_carry_a_fixed_label(claims, status, label):
    from chatserver.auth import LABELS

    query = (
        {} if claims is None else {"token": claims if isinstance(claims, str) else token(claims)}
    )
    refused = _refusal(_authenticator(jwt_leeway=0), query)
    assert (refused.status, refused.label) == (status, label)
    assert refused.label in LABELS


def test_refusals_in_development_mode_carry_labels():
    from chatserver.auth import Authenticator
    from chatserver.config import Config

    authenticator = Authenticator(Config())
    assert _refusal(authenticator, {}).label == "no_user"
    assert _refusal(authenticator, {"user": "a b"}).label == "bad_user"


@pytest.mark.parametrize("value", ["9999999999", True, [9999999999], {"t": 1}])
def test_non_numeric_exp_is_refused(value):
    refused = _refusal(_authenticator(), {"token": token({"sub": "a", "exp": value})})
    assert refused.status == 401


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_exp_is_refused(value):
    # json writes and reads these as the non-standard words Infinity and NaN.
    refused = _refusal(_authenticator(), {"token": token({"sub": "a", "exp": value})})
    assert refused.status == 401


def test_a_float_exp_ends_the_connection_on_time():
    identity = _authenticator(jwt_leeway=5).authenticate(
        {"token": [token({"sub": "a", "exp": 2**40 + 0.5})]}
    )
    assert identity.expires == 2**40 + 0.5 + 5


@pytest.mark.parametrize(("key_kind", "signer_kind"), [("rsa", "ec"), ("ec", "rsa")])
def test_the_other_key_type_is_a_bad_token(tmp_path, key_kind, signer_kind):
    from chatserver.auth import Authenticator
    from chatserver.config import Config

    key_file = _public_key_file(tmp_path, _private_key(key_kind))
    authenticator = Authenticator(Config(auth="token", jwt_public_key_file=key_file))
    other = token({"sub": "a", "exp": 2**40}, _private_key(signer_kind), ALGORITHM[signer_kind])
    refused = _refusal(authenticator, {"token": other})
    assert (refused.status, refused.label) == (401, "bad_token")
