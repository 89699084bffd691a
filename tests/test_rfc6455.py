"""RFC 6455 conformance, case by case, against a live server.

The reference suite (Autobahn|Testsuite) runs on Python 2 only, so its case
groups are rebuilt here: 1 framing, 2 pings and pongs, 3 reserved bits,
4 opcodes, 5 fragmentation, 6 UTF-8, 7 close handling, 9 limits, plus masking.
Every case opens a plain TCP connection, does the HTTP upgrade itself and
writes frames built by hand, because a real WebSocket client library refuses
to send most of what is tested here.

The chat layer reads JSON text frames. A case proves that a frame was read
(not silently skipped) by sending a JSON ``ping`` and awaiting its ``pong``
with the same ``ref``. Binary frames and text that is not JSON get an
``error`` frame with code ``bad_frame``, and the connection stays open
(PROTOCOL.md, Transport). A WebSocket-level violation must end with a close
frame carrying 1002, 1007 or 1009, never a bare TCP drop (PROTOCOL.md; RFC
6455 section 7.1.7).

The suite runs twice (CHATSERVER_FAST_PATHS=true and false, tests/run). The
``inbound_frames`` fast path parses small, whole, masked text frames itself,
so most violations are also sent right behind a valid frame in the same write
(``after_valid``): the fast path reads the first frame and must hand the
second to Autobahn. Lengths include the fast path's own limit.

Cases share one server per set of settings (module scope): each opens its own
connection, and a server start costs more than most cases.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import string
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from conftest import fast_paths_wanted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from chatserver.compat.autobahn import INBOUND_FAST_MAX

ensure = pytest_twisted.ensureDeferred

DEADLINE = 5.0  # seconds: every wait has one, so a broken server fails a case, never hangs it
FAST = fast_paths_wanted()

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, 1.3

PROTOCOL_ERROR, INVALID_PAYLOAD, TOO_BIG = 1002, 1007, 1009
# Codes an endpoint may put in a close frame (RFC 6455, 7.4.1 and 7.4.2). 1012-1014 were
# registered with IANA after the RFC; they are left out of both lists.
VALID_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999)


# -- frames ------------------------------------------------------------------------------


def _xor(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(
    payload: bytes = b"",
    opcode: int = OP_TEXT,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    length_bytes: int | None = None,
) -> bytes:
    """Any client frame, legal or not (RFC 6455, 5.2).

    ``length`` declares a payload length other than the real one (to send a header
    alone); ``length_bytes`` (0, 2 or 8) forces the size of the extended length field.
    """
    n = len(payload) if length is None else length
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    mask_bit = 0x80 if masked else 0
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    if length_bytes == 0:
        head += bytes([mask_bit | n])
    elif length_bytes == 2:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def close_payload(code: int | None = None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason


@dataclass(frozen=True)
class Frame:
    """One frame the server sent."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def code(self) -> int | None:
        """A close frame's status code; None when its body is empty (RFC 6455, 5.5.1)."""
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def reason(self) -> bytes:
        return self.payload[2:]

    def json(self) -> Any:
        assert self.opcode == OP_TEXT, self
        return json.loads(self.payload)


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames at the start of ``data``, and what is left of a partial one."""
    frames = []
    while len(data) >= 2:
        b0, b1 = data[0], data[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            if len(data) < 4:
                break
            n, pos = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            if len(data) < 10:
                break
            n, pos = struct.unpack("!Q", data[2:10])[0], 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            key, pos = data[pos : pos + 4], pos + 4
        if len(data) < pos + n:
            break
        payload = data[pos : pos + n]
        if masked and len(key) == 4:
            payload = _xor(payload, key)
        frames.append(Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, masked, payload))
        data = data[pos + n :]
    return frames, data


def may_be_sent(code: int) -> bool:
    """7.4.1 and 7.4.2 (with 1012-1014, registered with IANA since): the codes a close
    frame may carry."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def check_server_frame(f: Frame) -> None:
    """What the RFC requires of every frame a server sends, whatever the case tests."""
    assert not f.masked, f"server frame is masked (RFC 6455, 5.1): {f}"
    assert f.rsv == 0, f"server frame has RSV bits without an extension (5.2): {f}"
    assert f.opcode in DATA_OPCODES + CONTROL_OPCODES, f"server used a reserved opcode: {f}"
    if f.opcode in CONTROL_OPCODES:
        assert f.fin and len(f.payload) <= 125, f"bad server control frame (5.5): {f}"
    if f.opcode == OP_CLOSE:
        assert len(f.payload) != 1, f"server close frame with a 1-byte body (5.5.1): {f}"
        if f.code is not None:
            assert may_be_sent(f.code), f"server sent a reserved close code (7.4): {f}"
            f.reason.decode("utf-8")  # 5.5.1: the reason is UTF-8
    if f.opcode == OP_TEXT and f.fin:
        f.payload.decode("utf-8")  # 8.1: text frames are UTF-8


# -- a raw client --------------------------------------------------------------------------


class Lost(AssertionError):
    """The connection ended where the case expected a frame: the usual shape of a
    violation answered by a TCP drop instead of a close frame."""


class RawClient(Protocol):
    """A WebSocket client at the byte level: writes whatever a case builds, reads every
    frame the server sends (control frames too), in order.

    It answers the server's close frame with a close of its own, as RFC 6455 (5.5.1)
    asks of a client that has not sent one, so a server-initiated close completes at
    once and the server then closes TCP (7.1.1). ``next_frame`` returns None when the
    connection is gone and every frame before that has been read.
    """

    def __init__(self, port: int, user: str) -> None:
        self.key = base64.b64encode(os.urandom(16))
        self.request = (
            f"GET /ws?user={user} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: "
            + self.key.decode()
            + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.buffer = b""
        self.upgraded = False
        self.opened: Deferred[None] = Deferred()
        self.frames: list[Frame] = []
        self.lost_reason: Failure | None = None
        self.sent_close = False
        self._waiter: Deferred[None] | None = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.upgraded, self.buffer = True, rest
            self.opened.callback(head)
        frames, self.buffer = parse_frames(self.buffer)
        for f in frames:
            if f.opcode == OP_CLOSE and not self.sent_close:
                self.send(close_payload(f.code), OP_CLOSE)  # echo the code, as 5.5.1 asks
        self.frames.extend(frames)
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = reason
        if not self.opened.called:
            self.opened.errback(Lost("connection lost during the handshake"))
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    # -- sending

    def write(self, *frames: bytes) -> None:
        """Frames built by ``frame``, all in one TCP write."""
        self.sent_close |= any(f[0] & 0x0F == OP_CLOSE for f in frames)
        self.transport.write(b"".join(frames))

    def send(self, payload: bytes = b"", opcode: int = OP_TEXT, **options: Any) -> None:
        self.write(frame(payload, opcode, **options))

    # -- receiving

    async def next_frame(self, timeout: float = DEADLINE) -> Frame | None:
        while not self.frames:
            if self.lost_reason is not None:
                return None
            waiter: Deferred[None] = Deferred()
            self._waiter = waiter
            try:
                await waiter.addTimeout(timeout, reactor)
            except DeferredTimeout:
                raise AssertionError(
                    f"neither a frame nor the connection's end within {timeout}s"
                ) from None
        f = self.frames.pop(0)
        check_server_frame(f)
        return f

    async def expect_frame(self) -> Frame:
        f = await self.next_frame()
        if f is None:
            raise Lost(f"connection closed ({self.how_lost()}) where a frame was expected")
        return f

    async def expect_json(self) -> dict[str, Any]:
        f = await self.expect_frame()
        assert f.opcode == OP_TEXT and f.fin, f
        return f.json()

    async def wait_lost(self, timeout: float = DEADLINE) -> None:
        """The connection's end, whatever frames are still unread."""
        while self.lost_reason is None:
            waiter: Deferred[None] = Deferred()
            self._waiter = waiter
            await waiter.addTimeout(timeout, reactor)

    def how_lost(self) -> str:
        if self.lost_reason is None:
            return "open"
        return type(self.lost_reason.value).__name__


_users = itertools.count(1)
_clients: list[RawClient] = []  # opened by the running case, aborted after it


async def open_ws(port: int) -> RawClient:
    # A user of its own: the shared server's per-user limit never sees the last case's.
    client = RawClient(port, f"rfc{next(_users)}")
    _clients.append(client)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=DEADLINE)
    await endpoint.connect(Factory.forProtocol(lambda: client)).addTimeout(DEADLINE, reactor)
    head = await client.opened.addTimeout(DEADLINE, reactor)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101 "), lines[0]
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    # RFC 6455, 4.2.2: the accept key proves the server read our key.
    accept = base64.b64encode(hashlib.sha1(client.key + ACCEPT_GUID).digest()).decode()
    assert headers.get("sec-websocket-accept") == accept, headers
    return client


# -- what a case expects ----------------------------------------------------------------

_refs = itertools.count(1)
_FILL = (string.ascii_letters + string.digits + "-_.").encode()


def ping_json(size: int | None = None, ref: str | None = None) -> tuple[bytes, str]:
    """A chat ``ping`` of exactly ``size`` bytes (padded with a field the server ignores)
    and its ref: a frame whose answer proves the server read it whole and unmasked."""
    ref = ref if ref is not None else f"r{next(_refs)}"
    if size is None:
        return json.dumps({"type": "ping", "ref": ref}, ensure_ascii=False).encode(), ref
    head = b'{"type":"ping","ref":' + json.dumps(ref).encode() + b',"pad":"'
    fill = size - len(head) - 2
    assert fill >= 0, size
    pad = (_FILL * (fill // len(_FILL) + 1))[:fill]
    return head + pad + b'"}', ref


async def expect_pong(ws: RawClient, ref: str) -> None:
    got = await ws.expect_json()
    assert got == {"type": "pong", "ref": ref}, got


async def expect_bad_frame(ws: RawClient) -> None:
    got = await ws.expect_json()
    assert got["type"] == "error" and got["code"] == "bad_frame", got


async def assert_alive(ws: RawClient) -> None:
    """The connection still works, and nothing was sent before this answer."""
    payload, ref = ping_json()
    ws.send(payload)
    await expect_pong(ws, ref)


async def until_close(ws: RawClient) -> tuple[list[Frame], Frame]:
    before = []
    while True:
        f = await ws.next_frame()
        if f is None:
            raise Lost(
                f"TCP closed ({ws.how_lost()}) without a close frame; frames before: {before}"
            )
        if f.opcode == OP_CLOSE:
            return before, f
        before.append(f)


async def closes_with(ws: RawClient, code: int) -> list[Frame]:
    """The server failed the connection (RFC 6455, 7.1.7): a close frame with ``code``,
    then the end of TCP with nothing after the close. Returns the frames before it."""
    before, close = await until_close(ws)
    assert close.code == code, (close.code, close.reason, before)
    after = await ws.next_frame()
    assert after is None, f"a frame after the close frame (5.5.1): {after}"
    return before


async def closes_cleanly(ws: RawClient, sent: int | None) -> Frame:
    """The server answered our close (5.5.1): one close frame, no data before it, then
    TCP closed by the server (7.1.1). ``sent``: the code we sent, None for none."""
    before, close = await until_close(ws)
    assert before == [], before
    # 5.5.1: the reply "typically echos the status code it received"; 1000 is fine too.
    allowed = {None, 1000} if sent is None else {sent, 1000}
    assert close.code in allowed, (close.code, close.reason)
    assert await ws.next_frame() is None
    assert ws.how_lost() == "ConnectionDone", ws.how_lost()  # a clean TCP close, not a reset
    return close


def server_side(server: Any, ws: RawClient) -> Any:
    """The server's protocol for this client: reads fed to it are exactly the TCP reads."""
    port = ws.transport.getHost().port
    (proto,) = [p for p in server.factory.connections if p.transport.getPeer().port == port]
    return proto


def cases(*values: Any, marks: Iterable[pytest.MarkDecorator] = (), id: str | None = None) -> Any:
    return pytest.param(*values, marks=tuple(marks), id=id)


# -- the server -------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture(scope="module")
async def servers(tmp_path_factory: Any) -> Any:
    """Servers shared by this module's cases, one per set of settings, started as
    conftest's ``make_server`` starts them.

    Every case opens its own connection, so nothing carries over; a server start
    (its SQLite migration) costs more than most cases, and there are hundreds.
    """
    from chatserver.broker.memory import MemoryHub
    from chatserver.config import Config
    from chatserver.service import ChatServerService

    hub = MemoryHub(reactor)
    running: dict[tuple[tuple[str, Any], ...], Any] = {}

    def get(**settings: Any) -> Any:
        key = tuple(sorted(settings.items()))
        if key not in running:
            settings.setdefault("listen", ("tcp:0:interface=127.0.0.1",))
            path = tmp_path_factory.mktemp("rfc6455")
            settings.setdefault("database_url", f"sqlite:///{path}/chat.sqlite3")
            settings.setdefault("max_connections_per_ip", 100_000)
            settings.setdefault("rate_limit", 100_000.0)
            settings.setdefault("rate_burst", 100_000)
            settings.setdefault("drain_seconds", 0.0)
            settings.setdefault("ping_interval", 0)  # its own pings off: a case sees its frames
            settings.setdefault("fast_paths", FAST)
            service = ChatServerService(Config(**settings), reactor, hub=hub)
            service.startService()
            service.port = service.ports()[0]
            # The run with fast paths on must really take the inbound fast path.
            assert service.fast_paths.on("inbound_frames") == FAST
            running[key] = service
        return running[key]

    yield get
    for service in running.values():
        if service.running:
            await service.stopService()


@pytest.fixture
def server(servers: Callable[..., Any]) -> Any:
    return servers()


@pytest_twisted.async_yield_fixture(autouse=True)
async def _abort_leftover_connections() -> Any:
    """A case that passes leaves its connection open; the shared server must not keep it."""
    yield
    while _clients:
        client = _clients.pop()
        if client.transport is not None and client.lost_reason is None:
            client.transport.abortConnection()
            await client.wait_lost()


# Where a violating frame goes: alone, or right behind a valid frame in the same write,
# where the fast path reads the first frame and must pass the rest to Autobahn.
PLACES = ("alone", "after_valid")


async def write_placed(ws: RawClient, place: str, *frames: bytes) -> None:
    """Writes ``frames``, alone or right after a valid ping in the same write, whose
    answer must come first: a frame before a violation is still the client's to send."""
    if place == "alone":
        ws.write(*frames)
        return
    payload, ref = ping_json()
    ws.write(frame(payload), *frames)
    await expect_pong(ws, ref)


def fragments(payload: bytes, sizes: Iterable[int], opcode: int = OP_TEXT) -> list[bytes]:
    """``payload`` as a fragmented message (5.4): one frame per size, the last takes the rest."""
    out, pos = [], 0
    for size in sizes:
        out.append(payload[pos : pos + size])
        pos += size
    out.append(payload[pos:])
    last = len(out) - 1
    return [
        frame(part, opcode if i == 0 else OP_CONTINUATION, fin=i == last)
        for i, part in enumerate(out)
    ]


async def dribble(server: Any, ws: RawClient, data: bytes, via: str, chunk: int = 1) -> None:
    """``data`` in pieces of ``chunk`` bytes.

    ``reads``: straight into the server protocol's ``dataReceived``, so each piece is
    exactly one read, deterministically. ``tcp``: one TCP write per piece, Nagle off,
    two reactor turns apart; the server then reads almost every piece on its own (650
    of 654 one-byte reads, counted once), but nothing guarantees it, so the answers are
    what is checked, never the timing.
    """
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    if via == "reads":
        proto = server_side(server, ws)
        for piece in pieces:
            proto.dataReceived(piece)
        return
    for piece in pieces:
        ws.transport.write(piece)
        for _ in range(2):  # a turn for the piece to leave, one for the server to read it
            await deferLater(reactor, 0, lambda: None)


# -- 1 framing ----------------------------------------------------------------------------

# All within the default max_frame_bytes; INBOUND_FAST_MAX is where the fast path stops.
LENGTHS = (0, 1, 125, 126, 127, 128, INBOUND_FAST_MAX, INBOUND_FAST_MAX + 1, 65535, 65536)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@ensure
async def test_1_data_frame_of_each_length_is_read(server: Any, opcode: int, n: int) -> None:
    """5.2: a 7-bit length up to 125, a 16-bit field from 126, a 64-bit field from 65536;
    a misread length at any boundary would desynchronise the stream (the ping after)."""
    ws = await open_ws(server.port)
    if opcode == OP_TEXT and n >= 64:
        payload, ref = ping_json(n)
        ws.send(payload)
        await expect_pong(ws, ref)
    else:
        # Binary, or text too short to be a chat frame: bad_frame, and it stays open.
        ws.send(
            (bytes(range(256)) * (n // 256 + 1))[:n] if opcode == OP_BINARY else b"x" * n,
            opcode,
        )
        await expect_bad_frame(ws)
    await assert_alive(ws)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(
    ("n", "length_bytes"), [(0, 2), (5, 2), (125, 2), (5, 8), (125, 8), (126, 8), (65535, 8)]
)
@ensure
async def test_1_length_not_in_its_shortest_form_is_a_protocol_error(
    server: Any, n: int, length_bytes: int, place: str
) -> None:
    """5.2: "the minimal number of bytes MUST be used to encode the length"."""
    ws = await open_ws(server.port)
    payload = ping_json(n)[0] if n >= 64 else b" " * n
    await write_placed(ws, place, frame(payload, length_bytes=length_bytes))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


@ensure
async def test_1_64_bit_length_with_its_top_bit_set_is_a_protocol_error(server: Any) -> None:
    """5.2: the most significant bit of a 64-bit length MUST be 0 (header sent alone)."""
    ws = await open_ws(server.port)
    ws.send(b"", OP_BINARY, length=2**63 + 16, length_bytes=8)
    assert await closes_with(ws, PROTOCOL_ERROR) == []


@pytest.mark.parametrize("via", ["reads", "tcp"])
@ensure
async def test_1_frames_split_byte_by_byte(server: Any, via: str) -> None:
    """5.2 framing is a byte stream: a frame's header, mask and payload may each arrive
    across any number of reads (Autobahn|Testsuite 1.x with chopsize 1)."""
    ws = await open_ws(server.port)
    p16, r16 = ping_json(300)  # 16-bit length
    pfrag, rfrag = ping_json(ref="frag-κόσμε-𝄞")  # multi-byte UTF-8 split across reads
    p7, r7 = ping_json(100)  # 7-bit length
    data = b"".join(
        [
            frame(p16),
            frame(b"drip", OP_PING),
            frame(bytes(range(125)), OP_PING),  # the largest control payload
            *fragments(pfrag, [7, 15]),
            frame(b"\x01\x02\x03", OP_BINARY),
            frame(p7),
            frame(close_payload(1000, b"bye"), OP_CLOSE),
        ]
    )
    ws.sent_close = True
    await dribble(server, ws, data, via)
    await expect_pong(ws, r16)
    assert await ws.expect_frame() == Frame(True, 0, OP_PONG, False, b"drip")
    assert await ws.expect_frame() == Frame(True, 0, OP_PONG, False, bytes(range(125)))
    await expect_pong(ws, rfrag)
    await expect_bad_frame(ws)
    await expect_pong(ws, r7)
    await closes_cleanly(ws, 1000)


@pytest.mark.parametrize("via", ["reads", "tcp"])
@ensure
async def test_1_64_bit_length_frame_with_its_header_split_byte_by_byte(
    server: Any, via: str
) -> None:
    """5.2: the 8-byte extended length arrives a byte at a time, the payload in pieces."""
    ws = await open_ws(server.port)
    payload, ref = ping_json(65536)
    data = frame(payload)
    assert data[1] == 0x80 | 127
    await dribble(server, ws, data[:14], via)  # 2 + 8 length bytes + 4 mask bytes
    await dribble(server, ws, data[14:], via, chunk=4093)
    await expect_pong(ws, ref)
    await assert_alive(ws)


@pytest.mark.parametrize("n", [10, 200])
@ensure
async def test_1_many_frames_in_one_write_are_each_answered_in_order(server: Any, n: int) -> None:
    """5.2: frames follow each other with nothing between; one read holds many."""
    ws = await open_ws(server.port)
    pings = [ping_json(64 + i) for i in range(n)]
    ws.write(*(frame(p) for p, _ in pings))
    for _, ref in pings:
        await expect_pong(ws, ref)
    await assert_alive(ws)


# -- 2 pings and pongs ------------------------------------------------------------------

PING_PAYLOADS = [
    cases(b"", id="empty"),
    cases(b"Hello, world!", id="text"),
    cases(bytes(range(125)), id="binary-125"),
    cases(b"\xfe\xff" * 62 + b"\xff", id="not-utf8-125"),
]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("payload", PING_PAYLOADS)
@ensure
async def test_2_ping_is_answered_with_a_pong_carrying_its_payload(
    server: Any, payload: bytes, place: str
) -> None:
    """5.5.2 and 5.5.3: a Pong in response "MUST have identical Application data"; a
    control frame's payload is at most 125 bytes and need not be UTF-8."""
    ws = await open_ws(server.port)
    await write_placed(ws, place, frame(payload, OP_PING))
    assert await ws.expect_frame() == Frame(True, 0, OP_PONG, False, payload)
    await assert_alive(ws)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG], ids=["ping", "pong"])
@ensure
async def test_2_control_frame_with_126_byte_payload_is_a_protocol_error(
    server: Any, opcode: int, place: str
) -> None:
    """5.5: "All control frames MUST have a payload length of 125 bytes or less"."""
    ws = await open_ws(server.port)
    await write_placed(ws, place, frame(b"p" * 126, opcode))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


@pytest.mark.parametrize("payload", PING_PAYLOADS)
@ensure
async def test_2_unsolicited_pong_is_ignored(server: Any, payload: bytes) -> None:
    """5.5.3: "A Pong frame MAY be sent unsolicited ... A response to an unsolicited Pong
    frame is not expected"."""
    ws = await open_ws(server.port)
    ws.send(payload, OP_PONG)
    await assert_alive(ws)


@ensure
async def test_2_ping_between_fragments_is_answered_before_the_message_ends(server: Any) -> None:
    """5.4 and 5.5: control frames may be injected in the middle of a fragmented message,
    and an endpoint answers a Ping "as soon as is practical" (5.5.2)."""
    ws = await open_ws(server.port)
    payload, ref = ping_json()
    first, last = fragments(payload, [9])
    ws.write(first, frame(b"between", OP_PING))
    assert await ws.expect_frame() == Frame(True, 0, OP_PONG, False, b"between")
    ws.write(last)
    await expect_pong(ws, ref)


@ensure
async def test_2_many_pings_in_one_write_are_answered_with_the_last_one_last(server: Any) -> None:
    """5.5.3: with several Pings unanswered, an endpoint MAY answer only the most recent;
    any Pong it sends echoes one of them, in order."""
    ws = await open_ws(server.port)
    sent = [b"ping-%d" % i for i in range(10)]
    payload, ref = ping_json()
    ws.write(*(frame(p, OP_PING) for p in sent), frame(payload))
    pongs = []
    while (f := await ws.expect_frame()).opcode == OP_PONG:
        pongs.append(f.payload)
    assert f.json() == {"type": "pong", "ref": ref}
    assert pongs and pongs[-1] == sent[-1], pongs
    assert pongs == [p for p in sent if p in pongs], pongs  # in order, each sent once


# -- 3 reserved bits ------------------------------------------------------------------------


def rsv_frame(opcode: int, rsv: int) -> bytes:
    """A frame with RSV bits, and a payload the server would answer if it read it."""
    payloads = {
        OP_TEXT: ping_json()[0],
        OP_BINARY: b"\x00\xff",
        OP_PING: b"would-be-answered",
        OP_PONG: b"",
        OP_CLOSE: close_payload(1000),
    }
    return frame(payloads[opcode], opcode, rsv=rsv)


RSV_CASES = [(OP_TEXT, rsv) for rsv in range(1, 8)] + [
    (opcode, rsv) for opcode in (OP_BINARY, OP_PING, OP_PONG, OP_CLOSE) for rsv in (1, 2, 4)
]


def rsv_id(case: tuple[int, int]) -> str:
    names = {OP_TEXT: "text", OP_BINARY: "binary", OP_PING: "ping", OP_PONG: "pong"}
    return f"{names.get(case[0], 'close')}-rsv{case[1]}"


@pytest.mark.parametrize(
    ("case", "place"),
    [cases(case, place, id=f"{rsv_id(case)}-{place}") for case in RSV_CASES for place in PLACES],
)
@ensure
async def test_3_reserved_bits_without_an_extension_are_a_protocol_error(
    server: Any, case: tuple[int, int], place: str
) -> None:
    """5.2: RSV1-3 "MUST be 0 unless an extension is negotiated ... If a nonzero value is
    received ... the receiving endpoint MUST _Fail the WebSocket Connection_"; the frame
    itself is not acted on (no answer to it)."""
    opcode, rsv = case
    ws = await open_ws(server.port)
    await write_placed(ws, place, rsv_frame(opcode, rsv))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


@ensure
async def test_3_reserved_bit_on_a_continuation_frame_is_a_protocol_error(server: Any) -> None:
    """5.2: the RSV rule holds for every frame of a fragmented message."""
    ws = await open_ws(server.port)
    first, _ = fragments(ping_json()[0], [9])
    ws.write(first, frame(b'"}', OP_CONTINUATION, rsv=1))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


# -- 4 opcodes ------------------------------------------------------------------------------

RESERVED_OPCODES = (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("with_payload", [False, True], ids=["empty", "payload"])
@pytest.mark.parametrize("opcode", RESERVED_OPCODES, ids=lambda o: f"op{o:X}")
@ensure
async def test_4_reserved_opcode_is_a_protocol_error(
    server: Any, opcode: int, with_payload: bool, place: str
) -> None:
    """5.2: "If an unknown opcode is received, the receiving endpoint MUST _Fail the
    WebSocket Connection_" (3-7 are reserved non-control, 0xB-0xF reserved control)."""
    ws = await open_ws(server.port)
    payload = ping_json()[0] if with_payload else b""
    await write_placed(ws, place, frame(payload, opcode))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


# -- 5 fragmentation ------------------------------------------------------------------------

SPLITS = {
    "two": [20],
    "three": [10, 10],
    "one-byte-each": [1] * 60,
    "empty-first": [0, 20],
    "empty-middle": [10, 0, 0, 10],
    "empty-last": [100],  # the payload is shorter: the final fragment is empty
}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@ensure
async def test_5_fragmented_text_is_one_message(server: Any, split: list[int]) -> None:
    """5.4: a message of one first frame (FIN clear), continuations, and a final frame
    (FIN set); fragments may be empty."""
    ws = await open_ws(server.port)
    payload, ref = ping_json(64)
    ws.write(*fragments(payload, split))
    await expect_pong(ws, ref)
    await assert_alive(ws)


@ensure
async def test_5_each_fragment_in_its_own_write(server: Any) -> None:
    """5.4: the server waits for the final fragment, across reads, before the message."""
    ws = await open_ws(server.port)
    payload, ref = ping_json(64)
    for part in fragments(payload, [10, 10, 10]):
        ws.write(part)
    await expect_pong(ws, ref)


@ensure
async def test_5_fragmented_binary_gets_bad_frame(server: Any) -> None:
    """5.4 with PROTOCOL.md: a whole binary message, however fragmented, gets one
    bad_frame error and the connection stays open."""
    ws = await open_ws(server.port)
    ws.write(*fragments(bytes(range(30)), [10, 10], OP_BINARY))
    await expect_bad_frame(ws)
    await assert_alive(ws)


@ensure
async def test_5_control_frames_interleaved_with_fragments(server: Any) -> None:
    """5.4: "Control frames MAY be injected in the middle of a fragmented message";
    the ping is answered, the pong ignored, the message arrives whole."""
    ws = await open_ws(server.port)
    payload, ref = ping_json(64)
    a, b, c = fragments(payload, [20, 20])
    ws.write(a, frame(b"unsolicited", OP_PONG), b, frame(b"p1", OP_PING), frame(b"p2", OP_PING), c)
    pongs = []
    while (f := await ws.expect_frame()).opcode == OP_PONG:
        pongs.append(f.payload)
    assert pongs in ([b"p1", b"p2"], [b"p2"]), pongs  # 5.5.3: the most recent at least
    assert f.json() == {"type": "pong", "ref": ref}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("fin", [True, False], ids=["fin", "no-fin"])
@ensure
async def test_5_continuation_without_a_message_is_a_protocol_error(
    server: Any, fin: bool, place: str
) -> None:
    """5.4: a continuation frame only continues a fragmented message; outside one the
    server MUST _Fail the WebSocket Connection_ (after_valid: right after a whole one)."""
    ws = await open_ws(server.port)
    await write_placed(ws, place, frame(ping_json()[0], OP_CONTINUATION, fin=fin))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


NEW_DATA_FRAMES = {
    "text-fin": (OP_TEXT, True),
    "text-no-fin": (OP_TEXT, False),
    "binary-fin": (OP_BINARY, True),
    "binary-no-fin": (OP_BINARY, False),
}


@pytest.mark.parametrize("second", NEW_DATA_FRAMES.values(), ids=NEW_DATA_FRAMES.keys())
@ensure
async def test_5_new_data_frame_inside_a_fragmented_message_is_a_protocol_error(
    server: Any, second: tuple[int, bool]
) -> None:
    """5.4: "fragments of one message MUST NOT be interleaved between fragments of
    another" (Autobahn|Testsuite 5.x: a new text or binary frame before the final one)."""
    ws = await open_ws(server.port)
    first, _ = fragments(ping_json()[0], [9])
    opcode, fin = second
    ws.write(first, frame(ping_json()[0], opcode, fin=fin))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


@pytest.mark.parametrize("inside_message", [False, True], ids=["alone", "inside-message"])
@pytest.mark.parametrize(
    "opcode",
    [
        cases(OP_CLOSE, id="close"),
        cases(OP_PING, id="ping"),
        cases(OP_PONG, id="pong"),
    ],
)
@ensure
async def test_5_fragmented_control_frame_is_a_protocol_error(
    server: Any, opcode: int, inside_message: bool
) -> None:
    """5.5: "Control frames ... MUST NOT be fragmented" (FIN clear on a control frame)."""
    ws = await open_ws(server.port)
    payload = close_payload(1000) if opcode == OP_CLOSE else b"frag"
    before = [fragments(ping_json()[0], [9])[0]] if inside_message else []
    ws.write(*before, frame(payload, opcode, fin=False), frame(b"", OP_CONTINUATION))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


# -- 6 UTF-8 --------------------------------------------------------------------------------

VALID_TEXTS = {
    "ascii": "Hello-µ@ßöäüàá-UTF-8!!",
    "greek": "κόσμε",
    "2-byte-first-last": "\u0080\u07ff",
    "3-byte-first-last": "\u0800\uffff",
    "4-byte-first-last": "\U00010000\U0010ffff",
    "around-surrogates": "\ud7ff\ue000",
    "replacement-char": "\ufffd",
    "noncharacters": "\ufffe\U0001fffe\U0010fffe",
    "mixed": "€𝄞ß中文",
}


@pytest.mark.parametrize("text", VALID_TEXTS.values(), ids=VALID_TEXTS.keys())
@ensure
async def test_6_valid_utf8_in_one_frame(server: Any, text: str) -> None:
    """8.1: any valid UTF-8 is accepted (noncharacters included); the echoed ref proves
    the text arrived intact."""
    ws = await open_ws(server.port)
    payload, ref = ping_json(ref=text)
    ws.send(payload)
    await expect_pong(ws, ref)


@pytest.mark.parametrize("text", ["κόσμε", "€𝄞ß中文\U0010ffff"], ids=["greek", "mixed"])
@ensure
async def test_6_valid_utf8_split_across_fragments_at_every_byte(server: Any, text: str) -> None:
    """5.6 and 8.1: only the whole message must be valid UTF-8; a fragment may end in the
    middle of a code point. Every cut, one message each, then one fragment per byte."""
    ws = await open_ws(server.port)
    payload, ref = ping_json(ref=text)
    for cut in range(1, len(payload)):
        ws.write(*fragments(payload, [cut]))
        await expect_pong(ws, ref)
    ws.write(*fragments(payload, [1] * (len(payload) - 1)))
    await expect_pong(ws, ref)


INVALID_UTF8 = {
    "lone-continuation-80": b"\x80",
    "lone-continuation-bf": b"\xbf",
    "continuations-80-bf": b"\x80\xbf\x80\xbf",
    "lone-start-c0": b"\xc0 ",
    "lone-start-e0": b"\xe0 ",
    "lone-start-f0": b"\xf0 ",
    "byte-fe": b"\xfe",
    "byte-ff": b"\xff",
    "bytes-f5-f7": b"\xf5\x80\x80\x80",
    "5-byte-form": b"\xf8\x88\x80\x80\x80",
    "6-byte-form": b"\xfc\x84\x80\x80\x80\x80",
    "overlong-slash-2": b"\xc0\xaf",
    "overlong-slash-3": b"\xe0\x80\xaf",
    "overlong-slash-4": b"\xf0\x80\x80\xaf",
    "overlong-max-2": b"\xc1\xbf",
    "overlong-max-3": b"\xe0\x9f\xbf",
    "overlong-max-4": b"\xf0\x8f\xbf\xbf",
    "overlong-nul-2": b"\xc0\x80",
    "surrogate-d800": b"\xed\xa0\x80",
    "surrogate-dbff": b"\xed\xaf\xbf",
    "surrogate-dc00": b"\xed\xb0\x80",
    "surrogate-dfff": b"\xed\xbf\xbf",
    "surrogate-pair": b"\xed\xa0\x80\xed\xb0\x80",
    "above-10ffff": b"\xf4\x90\x80\x80",
    "cut-short-then-ascii": b"\xe2\x82 ",
    "greek-then-surrogate": "κόσμε".encode() + b"\xed\xa0\x80",
}
TRUNCATED_UTF8 = {"2-byte": b"\xce", "3-byte": b"\xe2\x82", "4-byte": b"\xf0\x9d\x84"}
WHERE = ("frame", "first-fragment", "last-fragment")


def with_bytes_inside(bad: bytes) -> tuple[bytes, bytes]:
    """A chat ping with ``bad`` inside its ref string: (before and bad, after)."""
    return b'{"type":"ping","ref":"x' + bad, b'y"}'


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
@ensure
async def test_6_invalid_utf8_closes_with_1007(server: Any, bad: bytes, where: str) -> None:
    """8.1: "When an endpoint is to interpret a byte stream as UTF-8 but finds that the
    byte stream is not, in fact, a valid UTF-8 stream, that endpoint MUST _Fail the
    WebSocket Connection_" (7.4.1: 1007); overlongs and surrogates are not UTF-8."""
    ws = await open_ws(server.port)
    head, tail = with_bytes_inside(bad)
    if where == "frame":
        ws.send(head + tail)
    elif where == "first-fragment":
        ws.write(frame(head, fin=False), frame(tail, OP_CONTINUATION))
    else:
        ws.write(frame(b'{"type":"ping",', fin=False), frame(head[15:] + tail, OP_CONTINUATION))
    assert await closes_with(ws, INVALID_PAYLOAD) == []


@pytest.mark.parametrize("fragmented", [False, True], ids=["frame", "fragments"])
@pytest.mark.parametrize("cut", TRUNCATED_UTF8.values(), ids=TRUNCATED_UTF8.keys())
@ensure
async def test_6_message_ending_inside_a_code_point_closes_with_1007(
    server: Any, cut: bytes, fragmented: bool
) -> None:
    """8.1: the whole message must be valid UTF-8; one that ends mid-sequence is not,
    even when every fragment so far could have been continued."""
    ws = await open_ws(server.port)
    payload = ping_json()[0] + b" " + cut
    if fragmented:
        ws.write(*fragments(payload, [len(payload) - len(cut)]))
    else:
        ws.send(payload)
    assert await closes_with(ws, INVALID_PAYLOAD) == []


@pytest.mark.parametrize("shape", ["first-fragment", "partial-frame"])
@ensure
async def test_6_invalid_utf8_fails_fast(server: Any, shape: str) -> None:
    """8.1 as Autobahn|Testsuite 6.4 tests it: the server fails the connection on the
    invalid byte, without waiting for the rest of the message (never sent here)."""
    ws = await open_ws(server.port)
    part = b'{"type":"ping","ref":"' + "κόσμε".encode() + b"\xf4\x90\x80\x80"
    if shape == "first-fragment":
        ws.send(part, fin=False)
    else:
        ws.send(part, length=len(part) + 100)  # the header promises 100 more bytes
    assert await closes_with(ws, INVALID_PAYLOAD) == []


# -- 7 close handling -----------------------------------------------------------------------


@ensure
async def test_7_close_without_a_body_is_answered(server: Any) -> None:
    """5.5.1: a close may have no body; the server answers with a close (empty, or 1000:
    1005 must not be sent, 7.4.1) and then closes TCP itself (7.1.1)."""
    ws = await open_ws(server.port)
    ws.send(b"", OP_CLOSE)
    await closes_cleanly(ws, None)


REASONS = {
    "no-reason": b"",
    "ascii": b"bye",
    "utf8": "κόσμε €𝄞".encode(),
    "123-bytes": ("é" * 61 + "x").encode(),  # 2 + 123 = 125, the largest control payload
}


VALID_CLOSES = [cases(code, b"", id=str(code)) for code in VALID_CLOSE_CODES] + [
    cases(code, reason, id=f"{code}-{name}")
    for code in (1000, 4999)
    for name, reason in REASONS.items()
    if reason
]


@pytest.mark.parametrize(("code", "reason"), VALID_CLOSES)
@ensure
async def test_7_close_with_a_valid_code_is_answered(server: Any, code: int, reason: bytes) -> None:
    """7.4.1 and 7.4.2: 1000-1003, 1007-1011 and 3000-4999 may be sent; the answer
    echoes the code or says 1000 (5.5.1), and TCP closes."""
    ws = await open_ws(server.port)
    ws.send(close_payload(code, reason), OP_CLOSE)
    await closes_cleanly(ws, code)


@pytest.mark.parametrize("place", [cases(p, id=p) for p in PLACES])
@ensure
async def test_7_close_with_a_1_byte_body_is_a_protocol_error(server: Any, place: str) -> None:
    """5.5.1: "If there is a body, the first two bytes of the body MUST be a 2-byte
    unsigned integer ... representing a status code"."""
    ws = await open_ws(server.port)
    await write_placed(ws, place, frame(b"\x03", OP_CLOSE))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


INVALID_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
@ensure
async def test_7_close_with_an_invalid_code_is_a_protocol_error(server: Any, code: int) -> None:
    """7.4.1: 1004 is reserved, 1005, 1006 and 1015 "MUST NOT be set as a status code in
    a Close control frame"; 0-999 are not used, 1016-2999 are reserved for the RFC and its
    extensions, 5000 and above do not exist (7.4.2)."""
    ws = await open_ws(server.port)
    ws.send(close_payload(code, b"x"), OP_CLOSE)
    assert await closes_with(ws, PROTOCOL_ERROR) == []


@pytest.mark.parametrize(
    "reason",
    [b"\xff", b"ok\xed\xa0\x80", b"\xc0\xaf", "κόσμε".encode()[:-1]],
    ids=["ff", "surrogate", "overlong", "truncated"],
)
@ensure
async def test_7_close_reason_that_is_not_utf8_closes_with_1007(server: Any, reason: bytes) -> None:
    """5.5.1: the reason's data "MUST be UTF-8 encoded"; 8.1 then asks for 1007."""
    ws = await open_ws(server.port)
    ws.send(close_payload(1000, reason), OP_CLOSE)
    assert await closes_with(ws, INVALID_PAYLOAD) == []


@ensure
async def test_7_close_with_a_126_byte_body_is_a_protocol_error(server: Any) -> None:
    """5.5: control frames carry at most 125 bytes, close frames too."""
    ws = await open_ws(server.port)
    ws.send(close_payload(1000, b"r" * 124), OP_CLOSE)
    assert await closes_with(ws, PROTOCOL_ERROR) == []


AFTER_CLOSE = {
    "text": lambda: frame(ping_json()[0]),
    "fragmented-text": lambda: b"".join(fragments(ping_json()[0], [5])),
    "ping": lambda: frame(b"after", OP_PING),
    "binary": lambda: frame(b"\x00", OP_BINARY),
    "second-close": lambda: frame(close_payload(1001), OP_CLOSE),
}


@pytest.mark.parametrize("after", AFTER_CLOSE.values(), ids=AFTER_CLOSE.keys())
@ensure
async def test_7_frames_after_a_close_are_ignored(server: Any, after: Callable[[], bytes]) -> None:
    """5.5.1: "The application MUST NOT send any more data frames after sending a Close
    frame"; what follows one is not processed: no answer, just the close reply."""
    ws = await open_ws(server.port)
    ws.write(frame(close_payload(1000), OP_CLOSE), after())
    await closes_cleanly(ws, 1000)


@ensure
async def test_7_close_after_a_valid_frame_in_the_same_write(server: Any) -> None:
    """5.5.1 with the fast path: the frame before the close is answered, then the close."""
    ws = await open_ws(server.port)
    payload, ref = ping_json()
    ws.write(frame(payload), frame(close_payload(1000, b"bye"), OP_CLOSE))
    before, close = await until_close(ws)
    assert [f.json() for f in before] == [{"type": "pong", "ref": ref}]
    assert close.code == 1000
    assert await ws.next_frame() is None


@ensure
async def test_7_close_inside_a_fragmented_message_is_answered(server: Any) -> None:
    """5.4 and 5.5.1: a close may come between fragments; the unfinished message is
    dropped and the close answered."""
    ws = await open_ws(server.port)
    first, _ = fragments(ping_json()[0], [9])
    ws.write(first, frame(close_payload(1000), OP_CLOSE))
    await closes_cleanly(ws, 1000)


# -- masking --------------------------------------------------------------------------------

UNMASKED = {
    "text": (OP_TEXT, lambda: ping_json()[0]),
    "binary": (OP_BINARY, lambda: b"\x00\xff"),
    "ping": (OP_PING, lambda: b"unmasked"),
    "pong": (OP_PONG, lambda: b""),
    "close": (OP_CLOSE, lambda: close_payload(1000)),
}


@pytest.mark.parametrize(
    ("case", "place"),
    [
        cases(case, place, id=f"{name}-{place}")
        for name, case in UNMASKED.items()
        for place in PLACES
    ],
)
@ensure
async def test_unmasked_client_frame_is_a_protocol_error(
    server: Any, case: tuple[int, Callable[[], bytes]], place: str
) -> None:
    """5.1: "The server MUST close the connection upon receiving a frame that is not
    masked ... a server MAY send a Close frame with a status code of 1002"."""
    opcode, payload = case
    ws = await open_ws(server.port)
    await write_placed(ws, place, frame(payload(), opcode, masked=False))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


@ensure
async def test_unmasked_continuation_frame_is_a_protocol_error(server: Any) -> None:
    """5.1: every client frame is masked, each fragment of a message too."""
    ws = await open_ws(server.port)
    first, _ = fragments(ping_json()[0], [9])
    ws.write(first, frame(b'"}', OP_CONTINUATION, masked=False))
    assert await closes_with(ws, PROTOCOL_ERROR) == []


# -- 9 limits -------------------------------------------------------------------------------

LIMITS = (256, 65536)  # the smallest max_frame_bytes allowed (fast path's own limit), default


@pytest.fixture(params=LIMITS, ids=lambda n: f"max{n}")
def limited(request: Any, servers: Callable[..., Any]) -> Any:
    srv = servers(max_frame_bytes=request.param)
    srv.limit = request.param
    return srv


@pytest.mark.parametrize("split", [None, [3], [100, 0]], ids=["frame", "2-fragments", "3-frags"])
@ensure
async def test_9_message_at_the_limit_is_accepted(limited: Any, split: list[int] | None) -> None:
    """10.4: a server limits message size; a message of exactly max_frame_bytes is in."""
    ws = await open_ws(limited.port)
    payload, ref = ping_json(limited.limit)
    ws.write(*(fragments(payload, split) if split else [frame(payload)]))
    await expect_pong(ws, ref)
    await assert_alive(ws)


@pytest.mark.parametrize(
    "shape", ["text", "binary", "2-fragments", "many-fragments", "header-alone", "huge-header"]
)
@ensure
async def test_9_one_byte_over_the_limit_closes_with_1009(limited: Any, shape: str) -> None:
    """10.4 and 7.4.1: a message "too big for it to process" ends the connection with
    1009, whole or fragmented; a header that declares too much is enough (nothing after
    it is sent here, so the server must not wait for the payload)."""
    ws = await open_ws(limited.port)
    payload, _ = ping_json(limited.limit + 1)
    if shape == "text":
        ws.send(payload)
    elif shape == "binary":
        ws.send(payload, OP_BINARY)
    elif shape == "2-fragments":
        ws.write(*fragments(payload, [limited.limit // 2]))
    elif shape == "many-fragments":
        ws.write(*fragments(payload, [limited.limit // 8] * 8))
    elif shape == "header-alone":
        ws.send(b"", length=limited.limit + 1)
    else:
        ws.send(b"", length=2**40)
    assert await closes_with(ws, TOO_BIG) == []
