"""HTTP resources on the WebSocket port: the page at /, /healthz, and /ws itself."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

log = Logger()


class DeadlineChannel(HTTPChannel):
    """An HTTP connection whose request headers, and WebSocket opening, have a deadline.

    Twisted's idle timeout restarts with every byte, so a client trickling a
    request a byte at a time (slowloris) holds a connection for ever; and
    Autobahn's opening-handshake timer starts only once the upgrade request
    has been read. This deadline runs from the connection (or the end of the
    previous request) to the last header line of the next, and for a WebSocket
    upgrade on to the open: ``handshake_timeout`` bounds all of it.
    """

    deadline = 10.0  # replaced by the site's handshake_timeout
    clock: IReactorTime
    _timer: IDelayedCall | None = None
    _raw: Any = None

    def connectionMade(self) -> None:
        self._raw = self.transport
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.clock.callLater(self.deadline, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        upgrade = self.requests[-1].getHeader(b"upgrade") or b""
        if upgrade.lower() != b"websocket":
            self._disarm()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.transport is not None and self.persistent:
            self._arm()  # the next request on this connection gets its own deadline

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)

    def upgraded_protocol(self) -> Any:
        """The protocol that took the transport over in a WebSocket upgrade."""
        raw = self._raw
        proto = raw.wrappedProtocol if isinstance(raw, ProtocolWrapper) else raw.protocol
        if isinstance(proto, ProtocolWrapper):
            proto = proto.wrappedProtocol
        return proto

    def upgraded(self) -> None:
        """The WebSocket opened in time. Without the pending timer nothing holds
        this channel, its request and headers (a few KB) any longer."""
        self._disarm()
        self._raw = None

    def _expired(self) -> None:
        self._timer = None
        raw = self._raw
        if not getattr(raw, "connected", False):
            return
        if self.transport is None and getattr(self.upgraded_protocol(), "ws_open", False):
            return
        self.site.handshake_timeouts += 1
        log.info("handshake from {peer} timed out", peer=str(raw.getPeer()))
        raw.abortConnection()


class _WithoutQuery:
    """A request as the access log sees it: the path without its query string."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = request.uri.split(b"?", 1)[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def access_line(timestamp: str, request: Any) -> str:
    """Combined log format minus query strings: a ``?token=`` must never reach a log."""
    return combinedLogFormatter(timestamp, _WithoutQuery(request))


class ChatSite(Site):
    """A Site whose connections get ``DeadlineChannel``'s handshake deadline."""

    protocol = DeadlineChannel
    noisy = False

    def __init__(self, root: Resource, clock: IReactorTime, deadline: float) -> None:
        super().__init__(root, logFormatter=access_line)
        self.clock = clock
        self.deadline = deadline
        self.handshake_timeouts = 0

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.clock = self.clock
        channel.deadline = self.deadline
        return channel


class UpgradeResource(WebSocketResource):
    """/ws: a WebSocket handshake, or 426 for a plain request instead of a status page."""

    def render(self, request: Request) -> bytes | int:
        upgrade = (request.getHeader("upgrade") or "").lower()
        if upgrade != "websocket":
            request.setResponseCode(426, b"Upgrade Required")
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"This is a WebSocket endpoint: connect with a WebSocket client.\n"
        channel = request.channel
        result = super().render(request)
        if isinstance(channel, DeadlineChannel) and channel.transport is None:
            proto = channel.upgraded_protocol()
            if getattr(proto, "ws_open", None) is False:
                proto.handshake_channel = channel
        return result


class JSONResource(Resource):
    isLeaf = True

    def __init__(self, status: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request: Request) -> bytes:
        code, body = self._status()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"


def _respond_later(
    request: Request, produce: Callable[[], Awaitable[tuple[int, dict[bytes, bytes], bytes]]]
) -> int:
    """Answer once ``produce`` has: a 500 if it fails, nothing if the client left."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    async def respond() -> None:
        try:
            code, headers, body = await produce()
        except Exception:
            log.failure("answering {path}", path=request.path.decode(errors="replace"))
            code, headers, body = 500, {b"content-type": b"text/plain"}, b"internal error\n"
        if gone:
            return
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader(b"cache-control", b"no-store")
        request.write(body)
        request.finish()

    Deferred.fromCoroutine(respond())
    return NOT_DONE_YET


class AsyncJSONResource(Resource):
    """Like JSONResource, for a status that needs I/O (readiness asks the database;
    a worker asks the other workers)."""

    isLeaf = True

    def __init__(self, status: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request: Request) -> int:
        async def produce() -> tuple[int, dict[bytes, bytes], bytes]:
            code, body = await self._status()
            return code, {b"content-type": b"application/json"}, json.dumps(body).encode() + b"\n"

        return _respond_later(request, produce)


class AsyncTextResource(Resource):
    """A 200 whose body needs I/O: a worker's /metrics gathers every worker's."""

    isLeaf = True

    def __init__(
        self,
        body: Callable[[], Awaitable[bytes]],
        content_type: bytes,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__()
        self._body = body
        self._headers = {b"content-type": content_type, **(headers or {})}

    def render_GET(self, request: Request) -> int:
        async def produce() -> tuple[int, dict[bytes, bytes], bytes]:
            return 200, self._headers, await self._body()

        return _respond_later(request, produce)


class StaticPage(Resource):
    isLeaf = True

    def __init__(self, name: str, content_type: bytes) -> None:
        super().__init__()
        self._body = resources.files("chatserver.static").joinpath(name).read_bytes()
        self._type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._type)
        return self._body


class Root(Resource):
    def __init__(self, children: dict[bytes, Resource], index: Resource | None) -> None:
        super().__init__()
        self._children = children
        self._index = index

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" and not request.postpath and self._index is not None:
            return self._index
        return self._children.get(path) or notFound()
