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
from twisted.internet.task import deferLater
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
    d: Deferred[None] = Deferred()
    server.factory._close_waiters.setdefault(proto, []).append(d)
    return bounded(d, timeout)


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
    assert server.factory.rejected["too many connections for this user"] == 2

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
        assert server.chat.connections_of("burst") == 2
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
    assert server.factory.by_address == {"127.0.0.1": 2}

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
    assert server.factory.by_address == {"203.0.113.5": 2, "203.0.113.6": 1, "127.0.0.1": 1}

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
        assert server.factory.by_address["127.0.0.1"] == 3
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
        assert server.factory.rejected["origin not allowed"] == 1
        assert await refused(server.port, "o", headers=headers)


# -- 5. handshake timeout ---------------------------------------------------------


async def hung_up_within(conn: RawConnection, seconds: float) -> bool:
    """True if the server closes ``conn`` within ``seconds``; the connection is gone after."""
    try:
        await bounded(conn.lost, seconds)
        return True
    except DeferTimeoutError:
        return False
    finally:
        if not conn.lost.called:
            conn.transport.abortConnection()
            await bounded(conn.lost, TIMEOUT)


async def stop_within(server: Any, seconds: float = 20.0) -> None:
    """Stop the server here, bounded: a connection the server lost track of would make
    the fixture's unbounded stopService() wait forever. The fixture then finds it stopped."""
    if server.running:
        await bounded(server.stopService(), seconds)


async def at_phase(fraction: float) -> None:
    """Wait until the wall clock's fractional second is ``fraction`` (a deliberate delay)."""
    await deferLater(reactor, (fraction - reactor.seconds() % 1.0) % 1.0, lambda: None)


@ensure
async def test_silent_connection_is_closed_after_handshake_timeout(make_server):
    server = make_server(handshake_timeout=0.5)
    try:
        silent = await raw_connection(server.port)
        assert await hung_up_within(silent, 5.0), "a connection that sent nothing was kept open"
        assert silent.data == b""
        assert server.site.handshake_timeouts == 1
        _, metrics = await http_get(server.port, "/metrics")
        assert b'chatserver_handshake_rejections_total{reason="handshake timeout"} 1.0' in metrics
    finally:
        await stop_within(server)


@ensure
async def test_half_sent_upgrade_request_is_closed_after_handshake_timeout(make_server):
    server = make_server(handshake_timeout=0.5)
    try:
        slowloris = await raw_connection(server.port)
        request = upgrade_request(server.port)
        slowloris.transport.write(request[: len(request) // 2])
        assert await hung_up_within(slowloris, 5.0), "a half-sent handshake was kept open"
        assert b" 101 " not in slowloris.data
    finally:
        await stop_within(server)


@ensure
async def test_trickled_upgrade_request_is_closed_after_handshake_timeout(make_server):
    """The timeout bounds the whole handshake, not the pause between two bytes of it."""
    server = make_server(handshake_timeout=0.5)
    try:
        trickle = await raw_connection(server.port)
        request = upgrade_request(server.port)
        # One byte every 0.1 s (the whole request would take ~17 s); give up after 5 s.
        try:
            for i in range(50):
                if trickle.lost.called:
                    break
                trickle.transport.write(request[i : i + 1])
                await deferLater(reactor, 0.1, lambda: None)
            assert trickle.lost.called, "a handshake trickled a byte at a time was kept open 5 s"
        finally:
            await hung_up_within(trickle, 0.0)
    finally:
        await stop_within(server)


@pytest.mark.parametrize("phase", [0.05, 0.3, 0.55, 0.8])
@ensure
async def test_upgrade_request_completed_within_handshake_timeout_is_accepted(make_server, phase):
    """Half the request, then the rest 0.2 s later: well within 0.5 s, so 101.

    ``phase`` is where in the wall clock's second the request completes: the
    answer must not depend on it.
    """
    server = make_server(handshake_timeout=0.5)
    try:
        # The deadline runs from the connection: connect at the phase, send at once.
        await at_phase((phase - 0.2) % 1.0)
        conn = await raw_connection(server.port)
        try:
            request = upgrade_request(server.port)
            conn.transport.write(request[: len(request) // 2])
            # A deliberate delay that creates the condition: the request arrives in two parts.
            await deferLater(reactor, 0.2, lambda: None)
            conn.transport.write(request[len(request) // 2 :])
            response = await bounded(conn.headers, TIMEOUT)
            assert response.startswith(b"HTTP/1.1 101 "), response
            assert [p.user for p in server.factory.connections] == ["alice"]
        finally:
            await hung_up_within(conn, 0.0)
    finally:
        await stop_within(server)


@ensure
async def test_client_gone_during_handshake_does_not_keep_its_slot(make_server):
    """A client that hangs up while its handshake is being checked is not counted forever."""
    server = make_server(max_connections_per_user=1, max_connections_per_ip=2)
    lookup = server.store.banned_everywhere

    def slow_lookup(user: str) -> Deferred[bool]:
        # A slow store (a deliberate delay): the ghost is gone before its ban check answers.
        return lookup(user).addCallback(lambda banned: deferLater(reactor, 0.3, lambda: banned))

    server.store.banned_everywhere = slow_lookup
    try:
        ghost = await raw_connection(server.port)
        ghost.transport.write(upgrade_request(server.port, "ghost"))
        ghost.transport.loseConnection()  # after the request is flushed
        await bounded(ghost.lost, TIMEOUT)
        # Lookups answer in the order they were asked, so once bob is through,
        # the server has finished with the ghost's handshake too.
        bob = await connect(server.port, "bob")
        assert [p.user for p in server.factory.connections] == ["bob"]
        assert server.factory.by_address == {"127.0.0.1": 1}
        assert server.chat.connections_of("ghost") == 0
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
    server = make_server(send_buffer_grace=0.0, slow_client_timeout=3600.0)
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
    assert proto._over_timer is None


@ensure
async def test_handshake_deadline_covers_the_checks_after_the_request(make_server):
    """A request read in full, then a ban check that never answers: still cut at the deadline."""
    server = make_server(handshake_timeout=0.5)
    server.store.banned_everywhere = lambda user: Deferred()  # never answers
    try:
        conn = await raw_connection(server.port)
        conn.transport.write(upgrade_request(server.port, "stuck"))
        assert await hung_up_within(conn, 5.0), "a handshake stuck in its checks was kept open"
        assert b" 101 " not in conn.data
        assert server.site.handshake_timeouts == 1
    finally:
        await stop_within(server)
