"""A real WebSocket test client (Autobahn) and raw HTTP helpers for the tests.

Every wait has a timeout so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory as ProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, readBody

TIMEOUT = 10.0
_refs = itertools.count(1)


class HandshakeRefused(Exception):
    pass


class ClientProtocol(WebSocketClientProtocol):
    def onConnect(self, response: Any) -> None:
        self.response = response

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        self.close_reason = reason
        if not self.factory.opened.called:
            self.factory.opened.errback(HandshakeRefused(reason))
        if not self.closed.called:
            self.closed.callback(code)


class Client:
    """One connection; frames arrive in a queue the test reads in order."""

    def __init__(self, proto: ClientProtocol) -> None:
        self.proto = proto

    @property
    def subprotocol(self) -> str | None:
        return self.proto.response.protocol

    def send(self, frame: dict[str, Any]) -> None:
        self.proto.sendMessage(json.dumps(frame).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.proto.sendMessage(payload, isBinary=binary)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        return await self.proto.frames.get().addTimeout(timeout, reactor)

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send with a fresh ref; return the answer carrying that ref (other frames are kept)."""
        ref = frame.setdefault("ref", f"r{next(_refs)}")
        self.send(frame)
        skipped = []
        try:
            while True:
                got = await self.recv()
                if got.get("ref") == ref and got.get("type") != "message":
                    return got
                skipped.append(got)
        finally:
            # Frames that came before the answer stay readable, in order.
            pending = list(self.proto.frames.pending)
            self.proto.frames.pending[:] = skipped + pending

    async def expect(self, kind: str) -> dict[str, Any]:
        got = await self.recv()
        assert got["type"] == kind, got
        return got

    async def drain_to_pong(self) -> list[dict[str, Any]]:
        """Every frame that arrives before the answer to a ping: proves 'nothing else came'."""
        ref = f"p{next(_refs)}"
        self.send({"type": "ping", "ref": ref})
        before = []
        while True:
            got = await self.recv()
            if got == {"type": "pong", "ref": ref}:
                return before
            before.append(got)

    async def join(self, room: str) -> dict[str, Any]:
        got = await self.request({"type": "join", "room": room})
        assert got["type"] == "joined", got
        return got

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        return await self.proto.closed.addTimeout(timeout, reactor)

    async def close(self) -> None:
        if not self.proto.closed.called:
            self.proto.sendClose(1000)
            await self.wait_closed()


async def connect(
    port: int,
    user: str | None = "alice",
    query: str | None = None,
    protocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/ws",
) -> Client:
    if query is None:
        query = f"user={user}" if user is not None else ""
    url = f"ws://127.0.0.1:{port}{path}" + (f"?{query}" if query else "")
    factory = WebSocketClientFactory(url, protocols=protocols, headers=headers)
    factory.protocol = ClientProtocol
    factory.opened = Deferred()
    factory.setProtocolOptions(autoPingInterval=0, maxMessagePayloadSize=0)

    def build(addr: Any) -> ClientProtocol:
        proto = WebSocketClientFactory.buildProtocol(factory, addr)
        proto.frames = DeferredQueue()
        proto.closed = Deferred()
        proto.close_code = None
        return proto

    factory.buildProtocol = build
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    await endpoint.connect(factory).addTimeout(TIMEOUT, reactor)
    proto = await factory.opened.addTimeout(TIMEOUT, reactor)
    return Client(proto)


class _RawHTTP(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.done.called:
            self.done.callback(self.data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback(self.data)


async def in_room(port: int, room: str, *users: str) -> list[Client]:
    """One connection per user, each joined to ``room``: the opening of most tests."""
    clients = [await connect(port, user) for user in users]
    for client in clients:
        await client.join(room)
    return clients


async def raw_request(port: int, request: bytes) -> bytes:
    """Send raw bytes, return what came back up to the end of the response headers."""
    proto = _RawHTTP(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    await endpoint.connect(ProtocolFactory.forProtocol(lambda: proto)).addTimeout(TIMEOUT, reactor)
    return await proto.done.addTimeout(TIMEOUT, reactor)


async def handshake_status(
    port: int, path: str = "/ws", query: str = "user=alice", headers: dict[str, str] | None = None
) -> int:
    """The HTTP status a WebSocket opening handshake gets."""
    lines = [
        f"GET {path}?{query} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    data = await raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    return int(data.split(b" ", 2)[1])


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    agent = Agent(reactor)
    response = await agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode()).addTimeout(
        TIMEOUT, reactor
    )
    body = await readBody(response)
    return response.code, body


async def http_json(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """An HTTP request with a JSON body (or raw bytes); returns (status, parsed JSON or None)."""
    from io import BytesIO

    from twisted.web.client import FileBodyProducer
    from twisted.web.http_headers import Headers

    headers = Headers({b"content-type": [b"application/json"]})
    if key is not None:
        headers.addRawHeader(b"authorization", f"Bearer {key}".encode())
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    producer = FileBodyProducer(BytesIO(data)) if data is not None else None
    agent = Agent(reactor)
    response = await agent.request(
        method.encode(), f"http://127.0.0.1:{port}{path}".encode(), headers, producer
    ).addTimeout(TIMEOUT, reactor)
    text = await readBody(response)
    try:
        return response.code, json.loads(text)
    except ValueError:
        return response.code, None


def server_frame_payloads(data: bytes) -> list[bytes]:
    """The payloads of the unmasked text frames a server wrote (one write may hold several)."""
    out, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0x81, data[pos:]
        n, pos = data[pos + 1], pos + 2
        if n == 126:
            n, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        out.append(data[pos : pos + n])
        pos += n
    return out


# -- a WebSocket client at the byte level -------------------------------------------

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def client_frame(payload: bytes, opcode: int = OP_TEXT, fin: bool = True) -> bytes:
    """One masked client frame, any opcode, fragment or not, empty or not."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n > 65535:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    elif n > 125:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | n])
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + body


def text(frame: dict[str, Any]) -> bytes:
    """A whole client text frame holding ``frame`` as JSON."""
    return client_frame(json.dumps(frame).encode())


class RawWebSocket(Protocol):
    """Sends whatever frames a test builds (pings, pongs, empty fragments) and sees every
    frame the server sends, control frames included, as (opcode, payload) in order.

    Answers the server's close frame with one of its own, as a client should, so
    ``lost`` firing means the server has read everything sent before it.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = b""
        self.upgraded = False
        self.opened: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.frames: DeferredQueue[tuple[int, bytes]] = DeferredQueue()
        self.close_code: int | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101 "):
                self.opened.errback(HandshakeRefused(head.split(b"\r\n", 1)[0].decode()))
                self.transport.loseConnection()
                return
            self.upgraded, self.buffer = True, rest
            self.opened.callback(None)
        while len(self.buffer) >= 2:
            opcode, n, pos = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            if n == 126:
                n, pos = int.from_bytes(self.buffer[2:4], "big"), 4
            elif n == 127:
                n, pos = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < pos + n:
                return
            payload, self.buffer = self.buffer[pos : pos + n], self.buffer[pos + n :]
            if opcode == OP_CLOSE and self.close_code is None:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                self.send(OP_CLOSE, payload[:2])
            self.frames.put((opcode, payload))

    def connectionLost(self, reason: Any) -> None:
        if not self.opened.called:
            self.opened.errback(HandshakeRefused("connection lost"))
        self.lost.callback(None)

    def send(self, opcode: int, payload: bytes = b"", fin: bool = True) -> None:
        self.transport.write(client_frame(payload, opcode, fin))

    def write(self, data: bytes) -> None:
        """Frames built by ``client_frame``, many in one write if the test wants."""
        self.transport.write(data)

    def stop_reading(self) -> None:
        self.transport.pauseProducing()

    async def recv(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        return await self.frames.get().addTimeout(timeout, reactor)

    async def recv_json(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        opcode, payload = await self.recv(timeout)
        assert opcode == OP_TEXT, (opcode, payload)
        return json.loads(payload)

    async def wait_lost(self, timeout: float = TIMEOUT) -> None:
        lost: Deferred[None] = Deferred()
        self.lost.addBoth(lambda r: lost.callback(None) if not lost.called else None)
        await lost.addTimeout(timeout, reactor)


async def raw_websocket(port: int, user: str = "alice") -> RawWebSocket:
    """An open WebSocket on a raw TCP connection (see ``RawWebSocket``)."""
    request = (
        f"GET /ws?user={user} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    proto = RawWebSocket(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    await endpoint.connect(ProtocolFactory.forProtocol(lambda: proto)).addTimeout(TIMEOUT, reactor)
    await proto.opened.addTimeout(TIMEOUT, reactor)
    return proto
