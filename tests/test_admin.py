"""The admin API, private rooms, and kicks and bans that take effect on every instance."""

from __future__ import annotations

import json
import time
from io import BytesIO

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from wsclient import connect, handshake_status, http_get, http_json

ensure = pytest_twisted.ensureDeferred
KEY = "admin-key-for-tests-at-least-32-bytes"


async def two_instances(make_server, redis, **settings):
    a = make_server(redis_url=redis.url, admin_api_key=KEY, **settings)
    b = make_server(redis_url=redis.url, admin_api_key=KEY, **settings)
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    return a, b


@ensure
async def test_admin_api_rejects_missing_and_wrong_keys(make_server):
    server = make_server(admin_api_key=KEY)
    body = {"room": "r"}
    assert (await http_json(server.port, "POST", "/admin/rooms", body))[0] == 401
    assert (await http_json(server.port, "POST", "/admin/rooms", body, key="wrong"))[0] == 401
    status, reply = await http_json(server.port, "POST", "/admin/rooms", body, key=KEY)
    assert status == 200 and reply == {"room": "r", "private": False}
    # Clear 4xx errors for bad requests.
    assert (await http_json(server.port, "POST", "/admin/rooms", key=KEY, raw=b"{nope"))[0] == 400
    bad = await http_json(server.port, "POST", "/admin/rooms", {"room": "a b"}, key=KEY)
    assert bad[0] == 400 and "room" in bad[1]["error"]
    priv = await http_json(
        server.port, "POST", "/admin/rooms", {"room": "r", "private": 1}, key=KEY
    )
    assert priv[0] == 400
    assert (await http_json(server.port, "GET", "/admin/rooms", key=KEY))[0] == 405
    assert (await http_json(server.port, "POST", "/admin/nothing", {}, key=KEY))[0] == 404


@ensure
async def test_no_admin_api_without_a_key(server):
    code, _ = await http_get(server.port, "/admin/rooms")
    assert code == 404


@ensure
async def test_admin_api_on_its_own_endpoint(make_server):
    from servers import free_port

    admin_port = free_port()
    server = make_server(admin_api_key=KEY, admin_listen=(f"tcp:{admin_port}:interface=127.0.0.1",))
    ok = await http_json(admin_port, "POST", "/admin/rooms", {"room": "r"}, key=KEY)
    assert ok[0] == 200
    assert (await http_json(server.port, "POST", "/admin/rooms", {"room": "r"}, key=KEY))[0] == 404


@ensure
async def test_private_room_needs_membership_or_a_token_claim(make_server):
    import jwt

    secret = "a-secret-that-is-long-enough-for-hs256-tokens"
    server = make_server(admin_api_key=KEY, auth="token", jwt_secret=secret)
    port = server.port
    await http_json(port, "POST", "/admin/rooms", {"room": "staff", "private": True}, key=KEY)

    def tok(sub, **claims):
        claims = {"sub": sub, "exp": int(time.time()) + 3600, **claims}
        return f"token={jwt.encode(claims, secret, algorithm='HS256')}"

    alice = await connect(port, query=tok("alice"))
    refused = await alice.request({"type": "join", "room": "staff"})
    assert refused["type"] == "error" and refused["code"] == "forbidden"
    # Frames for a room never joined stay not_member.
    assert (await alice.request({"type": "history", "room": "staff"}))["code"] == "not_member"
    await http_json(port, "POST", "/admin/rooms/staff/members", {"user": "alice"}, key=KEY)
    await alice.join("staff")
    bob = await connect(port, query=tok("bob", rooms=["staff"]))
    await bob.join("staff")
    # Public rooms stay open to everyone.
    await bob.join("lobby")
    # Taking membership away ends it at once.
    status, _ = await http_json(port, "DELETE", "/admin/rooms/staff/members/alice", key=KEY)
    assert status == 200
    kicked = await alice.recv()
    assert kicked == {"type": "kicked", "room": "staff", "reason": "removed"}
    assert (await alice.request({"type": "join", "room": "staff"}))["code"] == "forbidden"


@ensure
async def test_server_message_through_the_admin_api(make_server):
    server = make_server(admin_api_key=KEY)
    a = await connect(server.port)
    await a.join("news")
    status, reply = await http_json(
        server.port, "POST", "/admin/rooms/news/messages", {"body": "maintenance at 5"}, key=KEY
    )
    assert status == 200 and reply["id"] == 1 and reply["user"] == "system"
    got = await a.expect("message")
    assert got["body"] == "maintenance at 5" and got["user"] == "system" and got["id"] == 1
    too_long = {"body": "x" * 5000}
    assert (await http_json(server.port, "POST", "/admin/rooms/news/messages", too_long, key=KEY))[
        0
    ] == 413
    empty = {"body": ""}
    assert (await http_json(server.port, "POST", "/admin/rooms/news/messages", empty, key=KEY))[
        0
    ] == 400


@ensure
async def test_kick_on_another_instance_ends_delivery_within_a_second(make_server, redis):
    a, b = await two_instances(make_server, redis)
    mallory = await connect(b.port, "mallory")
    alice = await connect(a.port, "alice")
    await mallory.join("r")
    await mallory.join("other")
    await alice.join("r")
    await alice.join("other")
    await alice.request({"type": "send", "room": "r", "body": "before"})
    assert (await mallory.expect("message"))["body"] == "before"

    # The admin call lands on A; Mallory is connected to B.
    status, _ = await http_json(a.port, "POST", "/admin/rooms/r/kick", {"user": "mallory"}, key=KEY)
    assert status == 200
    kicked = await mallory.recv(timeout=1.0)
    assert kicked == {"type": "kicked", "room": "r", "reason": "kicked"}
    for i in range(5):
        await alice.request({"type": "send", "room": "r", "body": f"after {i}"})
    await alice.request({"type": "send", "room": "other", "body": "still here"})
    got = await mallory.expect("message")
    assert got["room"] == "other" and got["body"] == "still here"
    assert await mallory.drain_to_pong() == []
    assert (await mallory.request({"type": "send", "room": "r", "body": "x"}))[
        "code"
    ] == "not_member"
    # A kick is not a ban: rejoining a public room works.
    await mallory.join("r")


@ensure
async def test_room_ban_and_global_ban_across_instances(make_server, redis):
    a, b = await two_instances(make_server, redis)
    mallory = await connect(b.port, "mallory")
    alice = await connect(a.port, "alice")
    for client in (mallory, alice):
        await client.join("r")
        await client.join("s")
    status, _ = await http_json(
        a.port, "POST", "/admin/bans", {"user": "mallory", "room": "r"}, key=KEY
    )
    assert status == 200
    assert await mallory.recv(timeout=1.0) == {"type": "kicked", "room": "r", "reason": "banned"}
    await alice.request({"type": "send", "room": "r", "body": "not for mallory"})
    assert await mallory.drain_to_pong() == []
    assert (await mallory.request({"type": "join", "room": "r"}))["code"] == "forbidden"
    await mallory.join("s")  # only that room

    status, _ = await http_json(a.port, "POST", "/admin/bans", {"user": "mallory"}, key=KEY)
    assert status == 200
    assert await mallory.wait_closed(timeout=1.0) == 4003
    assert await handshake_status(b.port, query="user=mallory") == 403
    assert await handshake_status(a.port, query="user=mallory") == 403
    # Lifting the ban lets them back in.
    assert (await http_json(a.port, "DELETE", "/admin/bans/mallory", key=KEY))[0] == 200
    assert await handshake_status(b.port, query="user=mallory") == 101
    lifted = await http_json(a.port, "DELETE", "/admin/bans/mallory?room=r", key=KEY)
    assert lifted[0] == 200
    back = await connect(b.port, "mallory")
    await back.join("r")


@ensure
async def test_kick_works_with_the_memory_broker(make_server):
    server = make_server(admin_api_key=KEY)
    m = await connect(server.port, "mallory")
    await m.join("r")
    await http_json(server.port, "POST", "/admin/rooms/r/kick", {"user": "mallory"}, key=KEY)
    assert (await m.recv(timeout=1.0))["type"] == "kicked"
    assert await m.drain_to_pong() == []


@pytest.mark.redis
@ensure
async def test_a_ban_issued_during_a_redis_outage_reaches_the_other_instance(make_server, redis):
    """The control message is lost (nothing kept to republish); the stored ban is not."""
    from test_redis import all_lost

    a, b = await two_instances(make_server, redis, redis_republish_max=0, redis_keepalive=0.2)
    mallory = await connect(b.port, "mallory")
    await mallory.join("r")
    redis.kill()
    await all_lost(a)
    await all_lost(b)
    status, _ = await http_json(
        a.port, "POST", "/admin/bans", {"user": "mallory", "room": "r"}, key=KEY
    )
    assert status == 200
    back = b.broker.when_connected()
    redis.restart()
    await back.addTimeout(30, reactor)
    assert await mallory.recv() == {"type": "kicked", "room": "r", "reason": "banned"}
    assert b.chat.kicks == 1


# -- the admin key: where it is served, and guessing it ----------------------------


@pytest.fixture
def warnings():
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    seen: list[str] = []

    def observe(event):
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_admin_api_on_the_public_port_is_warned_about(make_server, warnings):
    from servers import free_port

    make_server(admin_api_key=KEY)
    assert [w for w in warnings if "admin_listen" in w] != []
    warnings.clear()
    make_server(admin_api_key=KEY, admin_listen=(f"tcp:{free_port()}:interface=127.0.0.1",))
    make_server()
    assert [w for w in warnings if "admin" in w] == []


async def admin_post(port, key=None, forwarded_for=None):
    """POST /admin/rooms; returns (status, headers), optionally as if via a proxy."""
    from twisted.web.client import Agent, FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    headers = Headers({b"content-type": [b"application/json"]})
    if key is not None:
        headers.addRawHeader(b"authorization", f"Bearer {key}".encode())
    if forwarded_for is not None:
        headers.addRawHeader(b"x-forwarded-for", forwarded_for.encode())
    body = FileBodyProducer(BytesIO(json.dumps({"room": "r"}).encode()))
    url = f"http://127.0.0.1:{port}/admin/rooms".encode()
    response = await Agent(reactor).request(b"POST", url, headers, body).addTimeout(10, reactor)
    await readBody(response)
    return response.code, response.headers


def retry_after(headers) -> str | None:
    values = headers.getRawHeaders(b"retry-after")
    return values[0].decode() if values else None


def throttled_server(make_server, **settings):
    """A server whose admin throttle runs on a Clock the test moves."""
    from twisted.internet.task import Clock

    settings.setdefault("admin_auth_failures", 3)
    settings.setdefault("admin_auth_lockout", 60.0)
    server = make_server(admin_api_key=KEY, **settings)
    clock = Clock()
    clock.advance(1000)
    server.admin.throttle.clock = clock
    return server, clock


@ensure
async def test_wrong_keys_lock_the_address_out_even_for_the_right_key(make_server, warnings):
    server, clock = throttled_server(make_server)
    port = server.port
    for _ in range(3):  # the 3rd (admin_auth_failures) is still a plain 401
        assert (await admin_post(port, key="wrong"))[0] == 401
    assert [w for w in warnings if "locked out" in w] != []
    status, headers = await admin_post(port, key="wrong")
    assert (status, retry_after(headers)) == (429, "60")
    # While locked out, the right key is refused too: no answer tells a guess was right.
    status, headers = await admin_post(port, key=KEY)
    assert (status, retry_after(headers)) == (429, "60")
    assert (await admin_post(port))[0] == 429
    clock.advance(59.5)
    status, headers = await admin_post(port, key=KEY)
    assert (status, retry_after(headers)) == (429, "1")
    clock.advance(0.5)
    assert (await admin_post(port, key=KEY))[0] == 200
    # Refused requests did not extend the lockout, and the count starts again.
    assert (await admin_post(port, key="wrong"))[0] == 401
    assert server.admin.requests[429] == 4


@ensure
async def test_wrong_keys_count_within_the_lockout_window(make_server):
    server, clock = throttled_server(make_server)
    for _ in range(2):
        assert (await admin_post(server.port, key="wrong"))[0] == 401
    clock.advance(60)  # those two are forgotten
    for _ in range(3):
        assert (await admin_post(server.port, key="wrong"))[0] == 401
    assert (await admin_post(server.port, key="wrong"))[0] == 429


@ensure
async def test_the_right_key_clears_earlier_wrong_ones(make_server):
    server, _ = throttled_server(make_server)
    for _ in range(2):
        assert (await admin_post(server.port, key="wrong"))[0] == 401
    assert (await admin_post(server.port, key=KEY))[0] == 200
    for _ in range(3):
        assert (await admin_post(server.port, key="wrong"))[0] == 401
    assert (await admin_post(server.port, key="wrong"))[0] == 429


@ensure
async def test_the_lockout_is_per_client_address(make_server):
    server, _ = throttled_server(make_server, trusted_proxies=("127.0.0.1",))
    port = server.port
    for _ in range(3):
        assert (await admin_post(port, key="wrong", forwarded_for="203.0.113.5"))[0] == 401
    assert (await admin_post(port, key=KEY, forwarded_for="203.0.113.5"))[0] == 429
    assert (await admin_post(port, key=KEY, forwarded_for="203.0.113.6"))[0] == 200
    assert (await admin_post(port, key=KEY))[0] == 200  # the proxy itself
    # IPv6 by /64: a host can't get fresh guesses from each of its addresses.
    for host in ("2001:db8::1", "2001:db8::2", "2001:db8::3"):
        assert (await admin_post(port, key="wrong", forwarded_for=host))[0] == 401
    assert (await admin_post(port, key=KEY, forwarded_for="2001:db8::ffff"))[0] == 429
    assert (await admin_post(port, key=KEY, forwarded_for="2001:db8:0:1::1"))[0] == 200


@ensure
async def test_x_forwarded_for_from_an_untrusted_peer_does_not_dodge_the_lockout(make_server):
    server, _ = throttled_server(make_server)
    for n in range(3):
        status, _ = await admin_post(server.port, key="wrong", forwarded_for=f"203.0.113.{n}")
        assert status == 401
    assert (await admin_post(server.port, key=KEY, forwarded_for="203.0.113.99"))[0] == 429


def test_the_throttle_tracks_a_bounded_number_of_addresses():
    from twisted.internet.task import Clock

    from chatserver.admin_api import AuthThrottle

    throttle = AuthThrottle(limit=3, lockout=60, clock=Clock(), max_tracked=100)
    for n in range(1000):
        throttle.failed(f"10.0.{n // 256}.{n % 256}")
        assert len(throttle) <= 100
    for _ in range(2):
        throttle.failed("10.0.3.231")  # the newest: kept, now locked out
    assert throttle.retry_after("10.0.3.231") == 60
    assert throttle.retry_after("10.0.0.0") == 0  # the oldest went first


def test_throttle_keys():
    from chatserver.admin_api import throttle_key

    assert throttle_key("203.0.113.5") == "203.0.113.5"
    assert throttle_key("::ffff:203.0.113.5") == "203.0.113.5"
    assert throttle_key("2001:db8::1") == throttle_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert throttle_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert throttle_key("unix") == "unix"
