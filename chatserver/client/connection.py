"""The client's IO glue: one WebSocket to the server (Autobahn on Twisted), paced.

``Link`` knows the reactor, Autobahn and JSON, and nothing of rooms or
messages: it opens a connection, turns what arrives into frames (dicts) for its
handler, and sends frames no faster than the ``TokenBucket`` allows. What to
send and when to reconnect is decided above it (``terminal.Client`` with the
sans-IO ``session``). Importing this module installs no reactor.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import endpoints, ssl
from twisted.logger import Logger

from chatserver.client.events import Frame
from chatserver.client.session import TokenBucket
from chatserver.wire import SUBPROTOCOL

CONNECT_TIMEOUT = 10.0

# Close codes after which reconnecting with the same credentials cannot help.
FATAL_CLOSE_CODES = {
    4001: "token expired: get a new token",
    4003: "banned from this server",
}
# Handshake statuses that mean the same (a 429 or 503 is worth retrying).
FATAL_HANDSHAKE = {400: "bad request", 401: "not authenticated", 403: "forbidden", 404: "no /ws"}

# One logger for the client's lines, under the namespace they had when the client was
# one module (``[chatserver.client.Client#info] ...`` with -v), so that nothing that
# reads or filters them has to change.
log = Logger(namespace="chatserver.client.Client")


def close_verdict(code: int | None, reason: str | None) -> str | None:
    """Why reconnecting cannot help, or None when it can (a restart, a network drop,
    a busy server). Autobahn reports a refused handshake as an abnormal close whose
    reason carries the HTTP status."""
    if code in FATAL_CLOSE_CODES:
        return FATAL_CLOSE_CODES[code]
    found = re.search(r"upgrade failed \[(\d{3})\]", reason or "")
    if found and int(found.group(1)) in FATAL_HANDSHAKE:
        status = int(found.group(1))
        return f"handshake refused: {status} {FATAL_HANDSHAKE[status]}"
    return None


def with_credentials(url: str, user: str | None, token: str | None) -> str:
    """The WebSocket URL with ``token=`` (token mode) or ``user=`` (development mode)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url}")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("user", "token")]
    query.append(("token", token) if token else ("user", user or ""))
    return urlunsplit(parts._replace(query=urlencode(query), path=parts.path or "/ws"))


class LinkHandler(Protocol):
    """What a ``Link`` tells about its connection (the client implements it)."""

    def opened(self) -> None: ...

    def received(self, frame: Any) -> None: ...

    def connect_failed(self, reason: str) -> None: ...

    def closed(self, was_open: bool, code: int | None, reason: str | None) -> None: ...


class ChatClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.link.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.factory.link.received(self, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.link.closed(self, code, reason)


class Link:
    """The connection to the server, one at a time, and the pacing of what goes out.

    Frames wait in a queue and leave as the token bucket allows, so that a client
    rejoining and catching up many rooms at once stays under the server's rate
    limit. A new connection starts with a full bucket; a closed one drops what was
    still queued (the session resends what matters after the reconnect).
    """

    def __init__(self, reactor: Any, url: str, handler: LinkHandler) -> None:
        self.reactor = reactor
        self.url = url
        self.handler = handler
        self.bucket = TokenBucket()
        self.proto: Any = None
        self._queue: deque[bytes] = deque()
        self._pump_call: Any = None

    @property
    def is_open(self) -> bool:
        """A connection is open (frames sent now go out on it)."""
        return self.proto is not None

    def _endpoint(self) -> Any:
        secure, host, port, *_ = parse_url(self.url)
        tcp = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        if secure:
            return endpoints.wrapClientTLS(ssl.optionsForClientTLS(host), tcp)
        return tcp

    def connect(self) -> None:
        """Open a new connection; the handler hears ``opened`` or ``connect_failed``
        (or ``closed`` with ``was_open`` false if the WebSocket handshake fails)."""
        factory = WebSocketClientFactory(self.url, protocols=[SUBPROTOCOL])
        factory.protocol = ChatClientProtocol
        factory.link = self
        factory.setProtocolOptions(
            # Our own pings find a dead network (no RST ever comes) within ~25 s.
            autoPingInterval=15,
            autoPingTimeout=10,
            openHandshakeTimeout=CONNECT_TIMEOUT,
            closeHandshakeTimeout=5,
        )
        log.info("connecting to {url}", url=self.url)
        d = self._endpoint().connect(factory)
        d.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Any) -> None:
        reason = failure.getErrorMessage()
        log.info("connection failed: {reason}", reason=reason)
        self.handler.connect_failed(reason)

    # from the protocol

    def opened(self, proto: Any) -> None:
        self.proto = proto
        self.bucket = TokenBucket()
        self.handler.opened()

    def received(self, proto: Any, payload: bytes) -> None:
        if proto is not self.proto:
            return
        try:
            frame = json.loads(payload)
        except ValueError:
            log.warn("ignoring a frame that is not JSON: {payload!r}", payload=payload)
            return
        log.debug("< {frame}", frame=frame)
        self.handler.received(frame)

    def closed(self, proto: Any, code: int | None, reason: str | None) -> None:
        was_open = proto is self.proto
        if was_open:
            self.proto = None
            self._queue.clear()
        self.handler.closed(was_open, code, reason)

    # to the server

    def send(self, frames: list[Frame]) -> None:
        """Queue frames, and send what the bucket allows now; the rest follows later."""
        for frame in frames:
            log.debug("> {frame}", frame=frame)
            self._queue.append(json.dumps(frame, ensure_ascii=False).encode())
        self._pump()

    def spare(self) -> int:
        """Frames that would go at once, ahead of none: what the bucket holds beyond
        the queue. Optional frames (read markers) are sent only within it, so they
        never queue in front of what the user sends."""
        if self.proto is None:
            return 0
        return int(self.bucket.available(self.reactor.seconds())) - len(self._queue)

    def _pump(self) -> None:
        self._pump_call = None
        while self._queue and self.proto is not None:
            wait = self.bucket.delay(self.reactor.seconds())
            if wait > 0:
                self._pump_call = self.reactor.callLater(wait, self._pump)
                return
            self.bucket.take(self.reactor.seconds())
            self.proto.sendMessage(self._queue.popleft())

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Start the closing handshake, if a connection is open; ``closed`` follows."""
        if self.proto is not None:
            self.proto.sendClose(code, reason)

    def stop(self) -> None:
        """No more sending: the program is ending."""
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
