"""Abuse limits at their edges, against a real listening server and real clients.

Each limit is exercised one under (passes) and one over (refused). The fixture
defaults the per-address and rate limits to huge values, so every test here
passes its own.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory as ProtocolFactory
from twisted.internet.protocol import Protocol
from wsclient import TIMEOUT, Client, HandshakeRefused, connect, handshake_status, http_get

ensure = pytest_twisted.ensureDeferred


# -- helpers ----------------------------------------------------------------------


def server_side(server: Any, client: Client) -> Any:
    """The server's protocol object for ``client``: matched by the TCP port pair."""
    local = client.proto.transport.getHost().port
    matches = [p for p in server.factory.connections if p.transport.getPeer().port == local]
    assert len(matches) == 1, (local, matches)
    return matches[0]


def bounded(d: Deferred[Any], timeout: float) -> Deferred[Any]:
    """A Deferred with ``d``'s result, or TimeoutError; timing out leaves ``d`` itself alone."""
    out: Deferred[Any] = Deferred()

    def forward(result: Any) -> Any:
        if not out.called:
            out.callback(result)
        return None  # d's own failure, if any, is handed over to ``out``

    d.addBoth(forward)
    return out.addTimeout(timeout, reactor)


def server_closed(server: Any, proto: Any, timeout: float = TIMEOUT) -> Deferred[None]:
    """Fires when the server has run ``onClose`` for ``proto`` (bounded by ``timeout``)."""
    return bounded(server.factory.when_closed(proto), timeout)


async def close_and_wait_server(server: Any, client: Client) -> None:
    """Close ``client`` and wait until the server has let go of the connection too."""
    gone = server_closed(server, server_side(server, client))
    await client.close()
    await gone


async def refused(port: int, user: str, **kwargs: Any) -> bool:
    """True if a real WebSocket client's handshake is refused."""
    try:
        client = await connect(port, user, **kwargs)
    except HandshakeRefused:
        return True
    await client.close()
    return False


class RawConnection(Protocol):
    """A plain TCP connection: records what arrives and when the server hangs up."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self.headers: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.headers.called:
            self.headers.callback(self.data)

    def connectionLost(self, reason: Any) -> None:
        if not self.headers.called:
            self.headers.callback(self.data)
        self.lost.callback(None)


async def raw_connection(port: int) -> RawConnection:
    proto = RawConnection()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    factory = ProtocolFactory.forProtocol(lambda: proto)
    await endpoint.connect(factory).addTimeout(TIMEOUT, reactor)
    return proto


def upgrade_request(port: int, user: str = "alice") -> bytes:
    return (
        f"GET /ws?user={user} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()


# -- 1. frame rate ----------------------------------------------------------------


@ensure
async def test_frame_rate_burst_then_rate_limited_then_closed_after_strikes(make_server):
    # 0.01 frames/s is the lowest rate the config accepts: no token comes back during the test.
    server = make_server(rate_limit=0.01, rate_burst=5, rate_limit_strikes=3)
    a = await connect(server.port, "alice")
    neighbour = await connect(server.port, "bob")
    await neighbour.join("r")

    for i in range(5):
        a.send({"type": "ping", "ref": f"ok{i}"})
        assert await a.recv() == {"type": "pong", "ref": f"ok{i}"}
    assert (await neighbour.request({"type": "ping"}))["type"] == "pong"

    a.send({"type": "ping", "ref": "six"})
    err = await a.recv()
    assert err["type"] == "error" and err["code"] == "rate_limited" and err["ref"] == "six", err
    assert isinstance(err["message"], str) and err["message"]
    # The neighbour has its own bucket.
    assert (await neighbour.request({"type": "ping"}))["type"] == "pong"

    # A frame that is not even parsed (rate limited first) still gets its ref echoed.
    a.send({"type": "send", "room": "r", "body": "x", "ref": 7})
    err = await a.recv()
    assert err["type"] == "error" and err["code"] == "rate_limited" and err["ref"] == 7, err
    assert not a.proto.closed.called

    a.send({"type": "ping", "ref": "eight"})
    err = await a.recv()
    assert err["type"] == "error" and err["code"] == "rate_limited" and err["ref"] == "eight", err
    assert await a.wait_closed() == 1008
    assert server.chat.errors["rate_limited"] == 3

    # The neighbour is unaffected, and the rate-limited sends never reached the room.
    assert (await neighbour.request({"type": "ping"}))["type"] == "pong"
    assert await neighbour.drain_to_pong() == []


@ensure
async def test_rate_limited_frame_without_valid_ref_gets_error_without_ref(make_server):
    server = make_server(rate_limit=0.01, rate_burst=1, rate_limit_strikes=10)
    a = await connect(server.port)
    assert (await a.request({"type": "ping"}))["type"] == "pong"
    for payload in (b"not json", b'{"type":"ping","ref":true}', b'{"type":"ping","ref":1.5}'):
        a.send_raw(payload)
        got = await a.recv()
        assert got["code"] == "rate_limited" and "ref" not in got, (payload, got)
    a.send_raw(b"\x00\x01", binary=True)
    got = await a.recv()
    assert got["code"] == "rate_limited" and "ref" not in got


# -- 2. connections per user ------------------------------------------------------


@ensure
async def test_connections_per_user_edge(make_server):
    server = make_server(max_connections_per_user=2)
    u1 = await connect(server.port, "u")
    u2 = await connect(server.port, "u")
    assert await handshake_status(server.port, query="user=u") == 429
    assert await refused(server.port, "u")
    # Another user is fine, and u's two connections still work.
    other = await connect(server.port, "v")
    assert (await other.request({"type": "ping"}))["type"] == "pong"
    for c in (u1, u2):
        assert (await c.request({"type": "ping"}))["type"] == "pong"
    assert server.factory.rejected["too_many"] == 2

    await close_and_wait_server(server, u1)
    u3 = await connect(server.port, "u")
    assert (await u3.request({"type": "ping"}))["type"] == "pong"
    assert await handshake_status(server.port, query="user=u") == 429


@ensure
async def test_connections_per_user_hold_under_a_burst_of_handshakes(make_server):
    """Handshakes that arrive together must not all pass the check before any is counted."""
    server = make_server(max_connections_per_user=2)
    attempts = [Deferred.fromCoroutine(connect(server.port, "burst")) for _ in range(10)]
    results = await DeferredList(attempts, consumeErrors=True)
    opened = [r for ok, r in results if ok]
    failures = [r for ok, r in results if not ok]
    try:
        assert all(f.check(HandshakeRefused) for f in failures), failures
        assert len(opened) == 2, f"{len(opened)} of 10 simultaneous handshakes for one user opened"
        assert len(server.chat.users["burst"]) == 2
    finally:
        for client in opened:
            await close_and_wait_server(server, client)


# -- 3. connections per address ---------------------------------------------------


@ensure
async def test_connections_per_ip_edge_and_forwarded_for_is_ignored_by_default(make_server):
    server = make_server(max_connections_per_ip=2)
    a = await connect(server.port, "a")
    b = await connect(server.port, "b")
    assert await handshake_status(server.port, query="user=c") == 429
    # Without trusted proxies, X-Forwarded-For is the client's word and is ignored.
    spoofed = {"X-Forwarded-For": "203.0.113.5"}
    assert await handshake_status(server.port, query="user=c", headers=spoofed) == 429
    assert await refused(server.port, "c", headers=spoofed)
    assert server.chat.admission.by_address == {"127.0.0.1": 2}

    await close_and_wait_server(server, a)
    c = await connect(server.port, "c")
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    assert (await b.request({"type": "ping"}))["type"] == "pong"
    assert await handshake_status(server.port, query="user=d") == 429


@ensure
async def test_connections_per_ip_behind_a_trusted_proxy(make_server):
    server = make_server(max_connections_per_ip=2, trusted_proxies=("127.0.0.1",))
    five = {"X-Forwarded-For": "203.0.113.5"}
    six = {"X-Forwarded-For": "203.0.113.6"}
    p1 = await connect(server.port, "p1", headers=five)
    await connect(server.port, "p2", headers=five)
    assert await handshake_status(server.port, query="user=p3", headers=five) == 429
    assert await refused(server.port, "p3", headers=five)
    # A client cannot escape its count by prepending an address of its choosing:
    # the proxy appends the real one, and the rightmost untrusted hop counts.
    chained = {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"}
    assert await handshake_status(server.port, query="user=p3", headers=chained) == 429
    # Another client address behind the same proxy is counted on its own.
    q = await connect(server.port, "q", headers=six)
    assert (await q.request({"type": "ping"}))["type"] == "pong"
    # So is the proxy itself (no header).
    local = await connect(server.port, "local")
    assert server.chat.admission.by_address == {"203.0.113.5": 2, "203.0.113.6": 1, "127.0.0.1": 1}

    await close_and_wait_server(server, p1)
    p4 = await connect(server.port, "p4", headers=five)
    assert (await p4.request({"type": "ping"}))["type"] == "pong"
    assert (await local.request({"type": "ping"}))["type"] == "pong"


@ensure
async def test_connections_per_ip_hold_under_a_burst_of_handshakes(make_server):
    server = make_server(max_connections_per_ip=3)
    attempts = [Deferred.fromCoroutine(connect(server.port, f"user{i}")) for i in range(10)]
    results = await DeferredList(attempts, consumeErrors=True)
    opened = [r for ok, r in results if ok]
    failures = [r for ok, r in results if not ok]
    try:
        assert all(f.check(HandshakeRefused) for f in failures), failures
        assert len(opened) == 3, f"{len(opened)} of 10 simultaneous handshakes from one address"
        assert server.chat.admission.by_address["127.0.0.1"] == 3
    finally:
        for client in opened:
            await close_and_wait_server(server, client)


# -- 4. origin ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "origin", "status"),
    [
        (("https://chat.example",), "https://chat.example", 101),
        (("https://chat.example",), "https://chat.example:443", 101),
        (("https://chat.example",), "HTTPS://Chat.Example", 101),
        (("https://chat.example:443",), "https://chat.example", 101),
        (("https://chat.example",), "https://evil.example", 403),
        (("https://chat.example",), "http://chat.example", 403),
        (("https://chat.example",), "https://chat.example:8443", 403),
        (("https://chat.example",), "https://chat.example.evil.net", 403),
        (("https://chat.example",), "https://evilchat.example", 403),
        (("https://chat.example",), "null", 403),
        (("https://chat.example",), None, 101),
        (("https://*.example.com",), "https://a.example.com", 101),
        (("https://*.example.com",), "https://a.b.example.com:443", 101),
        (("https://*.example.com",), "https://example.com.evil.net", 403),
        (("https://*.example.com",), "https://evil.net/.example.com", 403),
        (("https://*.example.com",), "http://a.example.com", 403),
        (("http://localhost:8080",), "http://localhost:8080", 101),
        (("http://localhost:8080",), "http://localhost", 403),
    ],
)
@ensure
async def test_origin_policy(make_server, allowed, origin, status):
    server = make_server(allowed_origins=allowed)
    headers = {} if origin is None else {"Origin": origin}
    assert await handshake_status(server.port, query="user=o", headers=headers) == status
    if status == 403:
        assert server.factory.rejected["origin"] == 1
        assert await refused(server.port, "o", headers=headers)


# -- 5. handshake timeout ---------------------------------------------------------
#
# The deadline runs on the server's clock, a task.Clock here that only the test
# moves: each test puts the connection where it wants it, then moves the clock
# to just short of the deadline and past it.

DEADLINE = 8.0  # handshake_timeout
EDGE = 1 / 64  # how far short of the deadline, or past it (exact in binary)
CLOSE_1000 = b"\x88\x82\x00\x00\x00\x00\x03\xe8"  # a client's close frame (mask 0), code 1000
CLOSE_1000_REPLY = b"\x88\x02\x03\xe8"  # the server's answer to it


def fake_clock() -> Any:
    """A clock for the server's connections that moves only when the test advances it."""
    from twisted.internet.task import Clock

    return Clock()


async def server_caught_up(server: Any) -> None:
    """Returns once the server has accepted every connection made before this call and
    read everything they sent before it: an HTTP round trip on a new connection.

    Over loopback, bytes sent are ready at the other end at once, and the reactor
    serves every ready socket on each turn; this answer needs several turns more.
    (The round trip's own deadline ends with its request: it never times out.)
    """
    code, _ = await http_get(server.port, "/healthz")
    assert code == 200


async def hang_up(conn: RawConnection) -> None:
    """Close ``conn`` from our side if the server hasn't; it is gone after."""
    if not conn.lost.called:
        conn.transport.abortConnection()
    await bounded(conn.lost, TIMEOUT)


async def stop_within(server: Any, seconds: float = 20.0) -> None:
    """Stop the server here, bounded: a connection the server lost track of would make
    the fixture's unbounded stopService() wait forever. The fixture then finds it stopped."""
    if server.running:
        await bounded(server.stopService(), seconds)


@ensure
async def test_silent_connection_is_closed_at_the_handshake_deadline(make_server):
    clock = fake_clock()
    server = make_server(handshake_timeout=DEADLINE, clock=clock)
    try:
        silent = await raw_connection(server.port)
        try:
            await server_caught_up(server)  # accepted: its deadline runs from now
            clock.advance(DEADLINE - EDGE)
            assert server.site.handshake_timeouts == 0
            clock.advance(EDGE)
            assert server.site.handshake_timeouts == 1, "a connection that sent nothing was kept"
            await bounded(silent.lost, TIMEOUT)
            assert silent.data == b""
        finally:
            await hang_up(silent)
        _, metrics = await http_get(server.port, "/metrics")
        assert b'chatserver_handshake_rejections_total{reason="timeout"} 1.0' in metrics
    finally:
        await stop_within(server)


@ensure
async def test_half_sent_upgrade_request_is_closed_at_the_handshake_deadline(make_server):
    """Half the request halfway to the deadline: still cut at the deadline counted from the
    connection, and the rest just after it is too late."""
    clock = fake_clock()
    server = make_server(handshake_timeout=DEADLINE, clock=clock)
    try:
        slowloris = await raw_connection(server.port)
        try:
            await server_caught_up(server)  # accepted: its deadline runs from now
            clock.advance(DEADLINE / 2)
            request = upgrade_request(server.port)
            slowloris.transport.write(request[: len(request) // 2])
            await server_caught_up(server)  # the half read
            clock.advance(DEADLINE / 2 - EDGE)
            assert server.site.handshake_timeouts == 0
            clock.advance(2 * EDGE)
            assert server.site.handshake_timeouts == 1, "a half-sent handshake was kept open"
            slowloris.transport.write(request[len(request) // 2 :])
            await bounded(slowloris.lost, TIMEOUT)
            assert b" 101 " not in slowloris.data
        finally:
            await hang_up(slowloris)
    finally:
        await stop_within(server)


@ensure
async def test_trickled_upgrade_request_is_closed_at_the_deadline_from_the_connection(
    make_server,
):
    """The deadline bounds the whole handshake, not the pause between two bytes of it."""
    clock = fake_clock()
    server = make_server(handshake_timeout=DEADLINE, clock=clock)
    try:
        trickle = await raw_connection(server.port)
        try:
            request = upgrade_request(server.port)
            step = DEADLINE / 16  # one byte a step: the whole request would take ~85 s
            for sent in range(1, len(request) + 1):
                trickle.transport.write(request[sent - 1 : sent])
                # The byte is read: a deadline that restarted with each byte would restart now.
                await server_caught_up(server)
                clock.advance(step)
                if server.site.handshake_timeouts:
                    break
            assert server.site.handshake_timeouts == 1, "a handshake trickled in was kept open"
            assert (sent, clock.seconds()) == (16, DEADLINE)  # cut at the deadline, not later
            await bounded(trickle.lost, TIMEOUT)
            assert b" 101 " not in trickle.data
        finally:
            await hang_up(trickle)
    finally:
        await stop_within(server)


@ensure
async def test_upgrade_request_completed_just_before_the_deadline_is_accepted(make_server):
    """Half the request at once, the rest just before the deadline: 101, and the open
    WebSocket outlives the deadline."""
    clock = fake_clock()
    server = make_server(handshake_timeout=DEADLINE, clock=clock)
    try:
        conn = await raw_connection(server.port)
        try:
            request = upgrade_request(server.port)
            conn.transport.write(request[: len(request) // 2])
            await server_caught_up(server)  # accepted, and the half read
            clock.advance(DEADLINE - EDGE)
            conn.transport.write(request[len(request) // 2 :])
            response = await bounded(conn.headers, TIMEOUT)
            assert response.startswith(b"HTTP/1.1 101 "), response
            assert [p.user for p in server.factory.connections] == ["alice"]
            clock.advance(DEADLINE)  # long past the deadline: it ended when the WebSocket opened
            assert server.site.handshake_timeouts == 0
            conn.transport.write(CLOSE_1000)  # and the WebSocket answers a close handshake
            await bounded(conn.lost, TIMEOUT)
            assert conn.data.endswith(CLOSE_1000_REPLY), conn.data
        finally:
            await hang_up(conn)
    finally:
        await stop_within(server)


@ensure
async def test_client_gone_during_handshake_does_not_keep_its_slot(make_server):
    """A client that hangs up while its handshake is being checked is not counted forever."""
    server = make_server(max_connections_per_user=1, max_connections_per_ip=2)
    lookup = server.store.banned_everywhere
    ghost_checked: Deferred[bool] = Deferred()  # the ghost's ban check, answered by the test
    asked: Deferred[None] = Deferred()

    def held_lookup(user: str) -> Deferred[bool]:
        asked.callback(None)
        return ghost_checked

    server.store.banned_everywhere = held_lookup
    try:
        ghost = await raw_connection(server.port)
        ghost.transport.write(upgrade_request(server.port, "ghost"))
        await bounded(asked, TIMEOUT)  # its request is read, its ban check under way
        ghost.transport.loseConnection()
        await bounded(ghost.lost, TIMEOUT)
        server.store.banned_everywhere = lookup
        ghost_checked.callback(False)  # the store answers after the client left
        bob = await connect(server.port, "bob")
        assert [p.user for p in server.factory.connections] == ["bob"]
        assert server.chat.admission.by_address == {"127.0.0.1": 1}
        assert "ghost" not in server.chat.admission.by_user
        again = await connect(server.port, "ghost")
        await close_and_wait_server(server, again)
        await close_and_wait_server(server, bob)
    finally:
        await stop_within(server)


# -- 6. bounded outgoing buffer ---------------------------------------------------

FLOOD_MESSAGES = 3000
FLOOD_BODY = 4000


def flood_body(i: int) -> str:
    return f"{i:06d}" + "x" * (FLOOD_BODY - 6)


async def flood(sender: Client, window: int | None) -> None:
    """Send FLOOD_MESSAGES to room "flood"; ``window``: most unacknowledged at once (None: all)."""
    if window is None:
        for i in range(FLOOD_MESSAGES):
            sender.send({"type": "send", "room": "flood", "body": flood_body(i), "ref": i})
        return
    for start in range(0, FLOOD_MESSAGES, window):
        batch = range(start, min(start + window, FLOOD_MESSAGES))
        for i in batch:
            sender.send({"type": "send", "room": "flood", "body": flood_body(i), "ref": i})
        acks = 0
        while acks < len(batch):
            got = await sender.recv()
            if got["type"] != "message":
                assert got["type"] == "ack", got
                acks += 1


async def flood_past_a_non_reader(server: Any, window: int | None) -> None:
    """A member that stops reading is dropped; a member that reads gets every message."""
    slow = await connect(server.port, "slow")
    try:
        await slow.join("flood")
        slow_proto = server_side(server, slow)
        slow_gone = server_closed(server, slow_proto, timeout=60.0)
        # The client stops reading its socket: the server's writes back up.
        slow.proto.transport.pauseProducing()

        fast = await connect(server.port, "fast")
        await fast.join("flood")
        sender = await connect(server.port, "sender")
        await sender.join("flood")

        await flood(sender, window)
        await slow_gone
        left = sorted(p.user for p in server.factory.connections)
        assert server.factory.dropped_slow == 1, f"dropped as slow; still connected: {left}"
        assert slow_proto not in server.factory.connections

        ids = []
        for i in range(FLOOD_MESSAGES):
            got = await fast.expect("message")
            assert got["body"] == flood_body(i), (i, got["body"][:10])
            ids.append(got["id"])
        assert ids == list(range(ids[0], ids[0] + FLOOD_MESSAGES))
        assert await fast.drain_to_pong() == []
        assert (await sender.request({"type": "ping"}))["type"] == "pong"
        # Only the client that stopped reading was dropped.
        assert server.factory.dropped_slow == 1
        assert {p.user for p in server.factory.connections} == {"fast", "sender"}
        await close_and_wait_server(server, fast)
        await close_and_wait_server(server, sender)
    finally:
        slow.proto.transport.abortConnection()


@ensure
async def test_non_reader_is_dropped_when_its_send_buffer_is_full(make_server):
    server = make_server(max_send_buffer=65536, slow_client_timeout=3600.0)
    # At most 8 messages (32 KB) in flight: no member gets a burst bigger than that at once.
    await flood_past_a_non_reader(server, window=8)


@ensure
async def test_flood_without_waiting_for_acks_drops_only_the_non_reader(make_server):
    """The sender pipelines everything: the store commits in groups, so members get bursts."""
    server = make_server(max_send_buffer=65536, slow_client_timeout=3600.0)
    await flood_past_a_non_reader(server, window=None)


@ensure
async def test_non_reader_is_dropped_after_slow_client_timeout(make_server):
    server = make_server(max_send_buffer=1 << 34, slow_client_timeout=0.5)
    await flood_past_a_non_reader(server, window=None)


@ensure
async def test_client_that_reads_is_not_dropped_for_two_full_history_pages(make_server):
    """Default limits: two pipelined history pages of 100 longest 4-byte-character messages.

    Each page is one ~1.6 MB frame; the client reads everything as it arrives.
    """
    server = make_server()
    a = await connect(server.port)
    await a.join("big")
    body = "\U0001f600" * server.config.max_body_chars
    for start in range(0, 200, 20):
        for i in range(start, start + 20):
            a.send({"type": "send", "room": "big", "body": body, "ref": f"s{i}"})
        acks = 0
        while acks < 20:
            got = await a.recv()
            if got["type"] != "message":
                assert got["type"] == "ack", got
                acks += 1
    await a.drain_to_pong()  # the client's own copies of its messages
    a.send({"type": "history", "room": "big", "after": 0, "limit": 100, "ref": "h1"})
    a.send({"type": "history", "room": "big", "after": 100, "limit": 100, "ref": "h2"})
    try:
        pages = [await a.recv(), await a.recv()]
    except DeferTimeoutError:
        pytest.fail(
            f"no history pages: connection closed with {a.proto.close_code},"
            f" dropped_slow = {server.factory.dropped_slow}"
        )
    assert [(p["type"], p["ref"], len(p["messages"])) for p in pages] == [
        ("history", "h1", 100),
        ("history", "h2", 100),
    ]
    assert [m["id"] for p in pages for m in p["messages"]] == list(range(1, 201))
    assert server.factory.dropped_slow == 0
    assert (await a.request({"type": "ping"}))["type"] == "pong"


@ensure
async def test_zero_grace_drops_a_non_reader_once_over_the_buffer(make_server):
    """send_buffer_grace = 0: over max_send_buffer means dropped, with no grace timer.
    (The grace itself is driven by a fake clock in test_send_buffer.py.)"""
    server = make_server(
        send_buffer_grace=0.0, slow_client_timeout=3600.0, history_burst_bytes=1 << 36
    )
    a = await connect(server.port)
    await a.join("big")
    body = "\U0001f600" * server.config.max_body_chars
    for _ in range(100):
        ack = await a.request({"type": "send", "room": "big", "body": body})
        assert ack["type"] == "ack", ack
    await a.drain_to_pong()
    proto = server_side(server, a)
    gone = server_closed(server, proto)
    a.proto.transport.pauseProducing()  # stops reading
    # 40 pages of ~1.6 MB: more than the socket buffers can hold (Linux: 4 + 32 MB at most).
    for i in range(40):
        a.send({"type": "history", "room": "big", "after": 0, "limit": 100, "ref": f"h{i}"})
    await gone
    assert server.factory.dropped_slow == 1
    assert not proto.send_buffer_over


@ensure
async def test_handshake_deadline_covers_the_checks_after_the_request(make_server):
    """A request read in full, then a ban check that never answers: still cut at the deadline."""
    clock = fake_clock()
    server = make_server(handshake_timeout=DEADLINE, clock=clock)
    asked: Deferred[str] = Deferred()

    def never_answers(user: str) -> Deferred[bool]:
        if not asked.called:
            asked.callback(user)
        return Deferred()

    server.store.banned_everywhere = never_answers
    try:
        conn = await raw_connection(server.port)
        try:
            conn.transport.write(upgrade_request(server.port, "stuck"))
            assert await bounded(asked, TIMEOUT) == "stuck"  # read in full, now in its checks
            clock.advance(DEADLINE - EDGE)
            assert server.site.handshake_timeouts == 0
            clock.advance(EDGE)
            assert server.site.handshake_timeouts == 1, "a handshake stuck in its checks was kept"
            await bounded(conn.lost, TIMEOUT)
            assert b" 101 " not in conn.data
        finally:
            await hang_up(conn)
    finally:
        await stop_within(server)
