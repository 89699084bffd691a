"""Slow and oversized HTTP requests against a real listening server and raw clients.

Every plain HTTP request has a deadline that covers its body and our answer
(``http_request_timeout``), counts in the same per-address count as the
WebSockets (``max_connections_per_ip``), and has its body refused before it
is read when the resource takes none or when it is over ``max_request_body``;
a body is held in memory, never spooled to a file.

Deadlines run on a ``task.Clock`` only the test moves; other waits are bounded
by WAIT, so a server that keeps a connection it should have closed fails a
test instead of hanging it.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory as ProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from wsclient import TIMEOUT, connect, handshake_status, http_get
from zope.interface import implementer

ensure = pytest_twisted.ensureDeferred

KEY = "admin-key-for-tests-at-least-32-bytes"
MIB = 1 << 20
WAIT = 5.0  # for an answer, or the server closing: it comes at once, or not at all
HEAD_DEADLINE = 8.0  # handshake_timeout
REQUEST_DEADLINE = 20.0  # http_request_timeout
EDGE = 1 / 64  # how far short of a deadline, or past it (exact in binary)
LAST_CHUNK = b"0\r\n\r\n"


# -- a raw HTTP client ------------------------------------------------------------


class RawConnection(Protocol):
    """A plain TCP connection: what arrives, and when the connection ends."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)


def bounded(d: Deferred[Any], timeout: float = WAIT) -> Deferred[Any]:
    """A Deferred with ``d``'s result, or TimeoutError; timing out leaves ``d`` alone."""
    out: Deferred[Any] = Deferred()

    def forward(result: Any) -> None:
        if not out.called:
            out.callback(result)

    d.addBoth(forward)
    return out.addTimeout(timeout, reactor)


async def open_raw(port: int) -> RawConnection:
    conn = RawConnection()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    await endpoint.connect(ProtocolFactory.forProtocol(lambda: conn)).addTimeout(TIMEOUT, reactor)
    return conn


async def hang_up(conn: RawConnection) -> None:
    if not conn.lost.called:
        conn.transport.abortConnection()
    await bounded(conn.lost, TIMEOUT)


def head(
    port: int,
    method: str,
    path: str,
    *,
    length: int | None = None,
    chunked: bool = False,
    key: str | None = None,
    close: bool = True,
    extra: tuple[str, ...] = (),
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if close:
        lines.append("Connection: close")
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunks(body: bytes, size: int) -> bytes:
    return b"".join(chunk(body[i : i + size]) for i in range(0, len(body), size))


def room_body(size: int, room: str = "edge") -> bytes:
    """A JSON body for POST /admin/rooms of exactly ``size`` bytes (padded with spaces)."""
    body = json.dumps({"room": room}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the (first) response in ``data``."""
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(lines[0].split(" ", 2)[1]), headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2 :]
    return out


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a whole request (with Connection: close); the answer, once the server closed."""
    conn = await open_raw(port)
    try:
        conn.send(request)
        await bounded(conn.lost)
        return parse(conn.data)
    finally:
        await hang_up(conn)


async def refused_at_once(port: int, request_head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send only a request's head: the answer must come, and the connection close,
    without a byte of the body announced."""
    conn = await open_raw(port)
    try:
        conn.send(request_head)
        await bounded(conn.lost)
        assert conn.data, "closed without an answer"
        return parse(conn.data)
    finally:
        await hang_up(conn)


async def server_caught_up(server: Any) -> None:
    """Returns once the server has read everything sent on earlier connections:
    an HTTP round trip on a new connection (see test_limits.server_caught_up)."""
    code, _ = await http_get(server.port, "/healthz")
    assert code == 200


async def slow_post(server: Any, headers: tuple[str, ...] = ()) -> RawConnection:
    """An admin POST whose head is in and whose body has only begun: a request in progress."""
    conn = await open_raw(server.port)
    conn.send(head(server.port, "POST", "/admin/rooms", length=100, key=KEY, extra=headers) + b"{")
    return conn


async def stop_within(server: Any, seconds: float = 20.0) -> None:
    if server.running:
        await bounded(server.stopService(), seconds)


# -- 1. a request's deadline covers its body and our answer --------------------------


@ensure
async def test_slow_body_is_cut_at_the_request_deadline(make_server):
    """The attack: a large Content-Length, then a byte now and then. Each byte comes well
    within the handshake deadline of the one before; the request is still cut when its
    whole time is up."""
    clock = Clock()
    server = make_server(
        admin_api_key=KEY,
        handshake_timeout=HEAD_DEADLINE,
        http_request_timeout=REQUEST_DEADLINE,
        clock=clock,
    )
    try:
        slow = await open_raw(server.port)
        try:
            await server_caught_up(server)  # accepted: its time runs from now
            slow.send(head(server.port, "POST", "/admin/rooms", length=10_000, key=KEY) + b"{")
            step = REQUEST_DEADLINE / 8  # under the handshake deadline
            for _ in range(7):
                await server_caught_up(server)  # the last byte read
                clock.advance(step)
                slow.send(b" ")
            await server_caught_up(server)
            clock.advance(step - EDGE)
            await server_caught_up(server)
            assert not slow.lost.called  # just short of the deadline: still there
            clock.advance(EDGE)
            await bounded(slow.lost)  # dropped, at the deadline
            assert slow.data == b""
            assert (server.site.handshake_timeouts, server.site.request_timeouts) == (0, 1)
            await server_caught_up(server)
            assert server.chat.admission.by_address == {}  # and no longer counted
        finally:
            await hang_up(slow)
    finally:
        await stop_within(server)


@ensure
async def test_body_completed_just_before_the_request_deadline_is_answered(make_server):
    clock = Clock()
    server = make_server(
        admin_api_key=KEY,
        handshake_timeout=HEAD_DEADLINE,
        http_request_timeout=REQUEST_DEADLINE,
        clock=clock,
    )
    try:
        conn = await open_raw(server.port)
        try:
            await server_caught_up(server)
            body = room_body(64)
            conn.send(head(server.port, "POST", "/admin/rooms", length=64, key=KEY) + body[:10])
            await server_caught_up(server)
            clock.advance(REQUEST_DEADLINE - EDGE)
            conn.send(body[10:])
            await bounded(conn.lost)  # answered, then closed (Connection: close)
            status, _, reply = parse(conn.data)
            assert (status, json.loads(reply)) == (200, {"room": "edge", "private": False})
            clock.advance(REQUEST_DEADLINE)
            assert (server.site.handshake_timeouts, server.site.request_timeouts) == (0, 0)
        finally:
            await hang_up(conn)
    finally:
        await stop_within(server)


@ensure
async def test_request_whose_answer_never_comes_is_cut_at_the_request_deadline(make_server):
    """The deadline is met when our answer is written, not when the body is in."""
    clock = Clock()
    server = make_server(
        admin_api_key=KEY,
        handshake_timeout=HEAD_DEADLINE,
        http_request_timeout=REQUEST_DEADLINE,
        clock=clock,
    )
    asked: Deferred[str] = Deferred()

    def never_answers(room: str, private: bool) -> Deferred[None]:
        asked.callback(room)
        return Deferred()

    server.store.set_room = never_answers
    try:
        conn = await open_raw(server.port)
        try:
            await server_caught_up(server)
            body = room_body(64, room="stuck")
            conn.send(head(server.port, "POST", "/admin/rooms", length=64, key=KEY) + body)
            assert await bounded(asked) == "stuck"  # read in full, being answered
            clock.advance(REQUEST_DEADLINE - EDGE)
            await server_caught_up(server)
            assert not conn.lost.called  # just short of the deadline: still there
            clock.advance(EDGE)
            await bounded(conn.lost)
            assert conn.data == b""
            assert (server.site.handshake_timeouts, server.site.request_timeouts) == (0, 1)
        finally:
            await hang_up(conn)
    finally:
        await stop_within(server)


# -- 2. one per-address count for HTTP requests and WebSockets -----------------------


@ensure
async def test_http_requests_count_towards_max_connections_per_ip_at_the_edge(make_server):
    server = make_server(admin_api_key=KEY, max_connections_per_ip=2)
    port = server.port
    slow1 = await slow_post(server)
    slow2 = None
    try:
        code, _ = await http_get(port, "/healthz")  # N = 2: slow1 and this one
        assert code == 200
        slow2 = await slow_post(server)
        code, body = await http_get(port, "/healthz")  # N + 1
        assert code == 429 and json.loads(body)["error"], body
        assert server.chat.admission.by_address == {"127.0.0.1": 2}
        # A WebSocket from the same address is refused too: one count.
        assert await handshake_status(port, query="user=w") == 429
        assert server.site.http_refusals == {"too_many": 1}

        await hang_up(slow2)  # its slot is free again
        code, _ = await http_get(port, "/healthz")
        assert code == 200
        slow1.send(room_body(100)[1:])  # the request that was counted completes as usual
        await bounded(slow1.lost)
        status, _, reply = parse(slow1.data)
        assert (status, json.loads(reply)) == (200, {"room": "edge", "private": False})
        w = await connect(port, "w")
        assert (await w.request({"type": "ping"}))["type"] == "pong"
        await w.close()
    finally:
        for conn in (slow1, slow2):
            if conn is not None:
                await hang_up(conn)


@ensure
async def test_websockets_count_against_http_requests(make_server):
    server = make_server(admin_api_key=KEY, max_connections_per_ip=2)
    port = server.port
    ws = await connect(port, "a")
    slow = await slow_post(server)
    try:
        code, _ = await http_get(port, "/healthz")
        assert code == 429
        assert await handshake_status(port, query="user=b") == 429
        gone = server.factory.when_closed(next(iter(server.factory.connections)))
        await ws.close()
        await bounded(gone)
        code, _ = await http_get(port, "/healthz")
        assert code == 200
        assert server.chat.admission.by_address == {"127.0.0.1": 1}  # slow, still counted
    finally:
        await hang_up(slow)


@ensure
async def test_forwarded_address_is_counted_behind_a_trusted_proxy(make_server):
    server = make_server(
        admin_api_key=KEY, max_connections_per_ip=1, trusted_proxies=("127.0.0.1",)
    )
    port = server.port
    five = ("X-Forwarded-For: 203.0.113.5",)
    slow = await slow_post(server, five)
    try:
        status, _, _ = await exchange(port, head(port, "GET", "/healthz", extra=five))
        assert status == 429
        # Prepending an address of the client's choosing does not escape the count.
        chained = ("X-Forwarded-For: 198.51.100.1, 203.0.113.5",)
        status, _, _ = await exchange(port, head(port, "GET", "/healthz", extra=chained))
        assert status == 429
        six = ("X-Forwarded-For: 203.0.113.6",)
        status, _, _ = await exchange(port, head(port, "GET", "/healthz", extra=six))
        assert status == 200
        status, _, _ = await exchange(port, head(port, "GET", "/healthz"))  # the proxy itself
        assert status == 200
        assert server.chat.admission.by_address == {"203.0.113.5": 1}
    finally:
        await hang_up(slow)


# -- 3. request bodies: refused before they are read -------------------------------


@pytest.mark.parametrize("limit", [None, 4096], ids=["default", "4096"])
@ensure
async def test_body_over_the_limit_by_content_length_is_refused_before_it_is_read(
    make_server, limit
):
    settings = {} if limit is None else {"max_request_body": limit}
    server = make_server(admin_api_key=KEY, **settings)
    limit = limit or MIB
    assert server.config.max_request_body == limit
    port = server.port
    # Exactly the limit: taken.
    request = head(port, "POST", "/admin/rooms", length=limit, key=KEY) + room_body(limit)
    status, _, reply = await exchange(port, request)
    assert (status, json.loads(reply)) == (200, {"room": "edge", "private": False})
    # One byte more: 413 on the head alone, and closed; no 100 Continue for it.
    over = head(
        port, "POST", "/admin/rooms", length=limit + 1, key=KEY, extra=("Expect: 100-continue",)
    )
    status, headers, reply = await refused_at_once(port, over)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(reply) == {"error": f"request body over {limit} bytes"}
    assert server.site.http_refusals == {"body_too_large": 1}
    # Unauthenticated, it is the same: refused before a byte is read.
    status, _, _ = await refused_at_once(port, head(port, "POST", "/admin/rooms", length=limit + 1))
    assert status == 413


@pytest.mark.parametrize("limit", [None, 4096], ids=["default", "4096"])
@ensure
async def test_chunked_body_over_the_limit_is_refused_as_it_streams(make_server, limit):
    settings = {} if limit is None else {"max_request_body": limit}
    server = make_server(admin_api_key=KEY, **settings)
    limit = limit or MIB
    port = server.port
    piece = max(1, limit // 7)  # chunk boundaries that do not fall on the limit
    # Exactly the limit, in chunks: taken.
    body = room_body(limit)
    request = head(port, "POST", "/admin/rooms", chunked=True, key=KEY) + chunks(body, piece)
    status, _, reply = await exchange(port, request + LAST_CHUNK)
    assert (status, json.loads(reply)) == (200, {"room": "edge", "private": False})
    # One byte more, and the body not even finished: 413, and closed.
    conn = await open_raw(port)
    try:
        conn.send(head(port, "POST", "/admin/rooms", chunked=True, key=KEY))
        conn.send(chunks(room_body(limit + 1), piece))
        await bounded(conn.lost)
        status, headers, reply = parse(conn.data)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(reply) == {"error": f"request body over {limit} bytes"}
    finally:
        await hang_up(conn)
    assert server.site.http_refusals == {"body_too_large": 1}
    await server_caught_up(server)  # has seen the refused client hang up
    assert server.chat.admission.by_address == {}


NO_BODY = [
    ("POST", "/"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/app.js"),
    ("GET", "/ws?user=x"),
    ("GET", "/admin/rooms"),
    ("DELETE", "/admin/bans/mallory"),
    ("PUT", "/admin/rooms"),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("method", "path"), NO_BODY)
@ensure
async def test_resource_without_a_body_refuses_one_at_once(make_server, method, path, chunked):
    server = make_server(admin_api_key=KEY)
    port = server.port
    length = None if chunked else 300_000_000
    request = head(port, method, path, length=length, chunked=chunked, key=KEY)
    status, _, reply = await refused_at_once(port, request)
    assert status == 413
    assert json.loads(reply) == {"error": "this resource takes no request body"}
    assert server.site.http_refusals == {"body_not_accepted": 1}


@implementer(IHalfCloseableProtocol)
class StaysOpen(RawConnection):
    """A client that keeps its side open, and sending, after the server's FIN."""

    def __init__(self) -> None:
        super().__init__()
        self.eof: Deferred[None] = Deferred()

    def readConnectionLost(self) -> None:
        self.eof.callback(None)

    def writeConnectionLost(self) -> None:
        pass


@ensure
async def test_a_refused_client_that_sends_on_is_dropped_after_a_moment(make_server):
    """The refusal is written with a half-close, so that the body still in flight does
    not reset the connection before the client reads it; a client that keeps sending
    is read (and its bytes dropped) only REFUSAL_LINGER seconds more."""
    from chatserver.web import REFUSAL_LINGER

    clock = Clock()
    server = make_server(admin_api_key=KEY, max_request_body=4096, clock=clock)
    conn = StaysOpen()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port, timeout=TIMEOUT)
    await endpoint.connect(ProtocolFactory.forProtocol(lambda: conn)).addTimeout(TIMEOUT, reactor)
    try:
        conn.send(head(server.port, "POST", "/admin/rooms", length=10**9, key=KEY))
        await bounded(conn.eof)  # the answer, then the server's FIN
        assert parse(conn.data)[0] == 413
        conn.send(b"x" * 65536)  # the body goes on coming
        await server_caught_up(server)
        clock.advance(REFUSAL_LINGER - EDGE)
        conn.send(b"x" * 65536)
        await server_caught_up(server)
        assert server.chat.admission.by_address == {"127.0.0.1": 1}  # still there, counted
        clock.advance(EDGE)
        # Gone from the server. (This client reads nothing after the FIN, so it learns
        # of the reset only when it writes again.)
        await server_caught_up(server)
        assert server.chat.admission.by_address == {}
        # The refusal was counted; its end is no timeout of a request that was served.
        assert server.site.http_refusals == {"body_too_large": 1}
        assert (server.site.handshake_timeouts, server.site.request_timeouts) == (0, 0)
    finally:
        await hang_up(conn)
        await stop_within(server)


@ensure
async def test_body_for_no_resource_is_404_at_once(make_server):
    server = make_server()  # no admin API: /admin is no resource here
    port = server.port
    for path in ("/nothing-here", "/admin/rooms"):
        status, _, _ = await refused_at_once(port, head(port, "POST", path, length=300_000_000))
        assert status == 404
    assert server.site.http_refusals == {"not_found": 2}


@ensure
async def test_requests_without_a_body_are_served_as_before(make_server, recwarn):
    server = make_server(admin_api_key=KEY)
    port = server.port
    status, headers, reply = await exchange(port, head(port, "POST", "/", length=0))
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert reply == b"method not allowed: GET or HEAD only\n"
    # Answered by us, not by twisted.web's deprecated error page.
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    for path in ("/healthz", "/readyz", "/metrics", "/app.js"):
        status, headers, _ = await exchange(port, head(port, "PUT", path, length=0))
        assert status == 405 and headers["allow"] == "GET, HEAD", path
    status, _, reply = await exchange(port, head(port, "GET", "/healthz", length=0))
    assert status == 200 and json.loads(reply)["status"] == "ok"
    status, _, _ = await exchange(port, head(port, "DELETE", "/admin/bans/mallory", key=KEY))
    assert status == 200
    assert not server.site.http_refusals


@ensure
async def test_no_request_body_is_written_to_disk(make_server, monkeypatch):
    """twisted.web spools bodies over 100 KB into a temporary file; ours stay in memory."""
    spooled: list[Any] = []
    temporary_file = tempfile.TemporaryFile

    def recording(*args: Any, **kwargs: Any) -> Any:
        spooled.append(args)
        return temporary_file(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    server = make_server(admin_api_key=KEY)
    port = server.port
    request = head(port, "POST", "/admin/rooms", length=MIB, key=KEY) + room_body(MIB)
    assert (await exchange(port, request))[0] == 200
    request = head(port, "POST", "/admin/rooms", chunked=True, key=KEY)
    request += chunks(room_body(MIB), 65536) + LAST_CHUNK
    assert (await exchange(port, request))[0] == 200
    assert spooled == []


@ensure
async def test_refusals_leave_neighbours_alone_and_log_no_traceback(make_server):
    server = make_server(admin_api_key=KEY, max_request_body=4096, max_connections_per_ip=3)
    port = server.port
    neighbour = await connect(port, "neighbour")
    await neighbour.join("r")
    failures: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        await refused_at_once(port, head(port, "POST", "/", length=300_000_000))
        await refused_at_once(port, head(port, "POST", "/admin/rooms", length=4097, key=KEY))
        over = head(port, "POST", "/admin/rooms", chunked=True, key=KEY) + chunk(b"x" * 5000)
        await refused_at_once(port, over)
        slow1, slow2 = await slow_post(server), await slow_post(server)
        try:
            status, _, _ = await exchange(port, head(port, "GET", "/healthz"))
            assert status == 429
        finally:
            await hang_up(slow1)
            await hang_up(slow2)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures == []
    assert (await neighbour.request({"type": "ping"}))["type"] == "pong"
    assert await neighbour.drain_to_pong() == []
    assert server.site.http_refusals == {"body_not_accepted": 1, "body_too_large": 2, "too_many": 1}
    await neighbour.close()


def test_new_settings_are_range_checked():
    from chatserver.config import Config, ConfigError

    assert Config().max_request_body == MIB and Config().http_request_timeout == 30.0
    for bad in ({"max_request_body": 1023}, {"http_request_timeout": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Config(**bad)
