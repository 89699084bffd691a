"""HTTP resources on the WebSocket port: the page at /, /healthz, and /ws itself."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request


class UpgradeResource(WebSocketResource):
    """/ws: a WebSocket handshake, or 426 for a plain request instead of a status page."""

    def render(self, request: Request) -> bytes | int:
        upgrade = (request.getHeader("upgrade") or "").lower()
        if upgrade != "websocket":
            request.setResponseCode(426, b"Upgrade Required")
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"This is a WebSocket endpoint: connect with a WebSocket client.\n"
        return super().render(request)


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


class AsyncJSONResource(Resource):
    """Like JSONResource, for a status that needs I/O (readiness asks the database)."""

    isLeaf = True

    def __init__(self, status: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request: Request) -> int:
        async def respond() -> None:
            code, body = await self._status()
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(body).encode() + b"\n")
            request.finish()

        Deferred.fromCoroutine(respond())
        return NOT_DONE_YET


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
