"""HTTP resources on the WebSocket port: the page at /, /healthz, and /ws itself;
and the connections that carry them, each request on a deadline, counted per
client address, with its body bounded."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib import resources
from io import BytesIO
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableDescriptor, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from chatserver.transport.policies import ProxyPolicy

log = Logger()


# What the deadline counts as when it runs out.
_HEAD = "head"  # the request head, and for a WebSocket upgrade on to the open
_REQUEST = "request"  # a plain request's body, our answer, and closing after it
_REFUSED = "refused"  # answered with a refusal: the client may send on a moment, unread

# A refused client may still be sending (its body, unread); closing on unread
# data would reset the connection and could lose our answer, so the answer goes
# first with a half-close, and what comes in meanwhile is dropped, this long at most.
REFUSAL_LINGER = 2.0

# Labels of early refusals (``ChatSite.http_refusals``, for metrics): few and fixed.
TOO_MANY = "too_many"  # 429: the address is at max_connections_per_ip
BODY_TOO_LARGE = "body_too_large"  # 413: over what the resource takes
BODY_NOT_ACCEPTED = "body_not_accepted"  # 413: the resource takes no body at all
NOT_FOUND = "not_found"  # 404: a body for no resource at all
HTTP_REFUSALS = (TOO_MANY, BODY_TOO_LARGE, BODY_NOT_ACCEPTED, NOT_FOUND)

_STATUS_LINES = {
    404: b"HTTP/1.1 404 Not Found\r\n",
    413: b"HTTP/1.1 413 Content Too Large\r\n",
    429: b"HTTP/1.1 429 Too Many Requests\r\n",
}


class AddressCount(Protocol):
    """The per-address count that WebSockets are admitted against (``Admission``)."""

    def enter(self, address: str) -> bool: ...

    def leave(self, address: str) -> None: ...


def _too_large(limit: int) -> str:
    if limit <= 0:
        return "this resource takes no request body"
    return f"request body over {limit} bytes"


def _declared_length(request: Request) -> int | None:
    """The body's length as its head declares it; None: chunked, known only at its end.
    (Twisted has already refused a head whose length headers are malformed or clash.)"""
    coding = request.getHeader(b"transfer-encoding")
    if coding is not None and coding.lower() == b"chunked":
        return None
    length = request.getHeader(b"content-length")
    return int(length) if length is not None else 0


class BoundedRequest(Request):
    """A request whose body is held in memory and never grows past ``body_limit`` bytes.

    twisted.web reads a body of any size and spools one over 100 KB to a
    temporary file before any resource sees it. The channel sets the limit
    from the resource the request is for before the first byte of the body
    (0 for all but the admin API's POSTs); the byte that goes over it ends the
    request with 413, whatever the transfer coding.
    """

    body_limit = 0
    body_received = 0
    over_limit = False

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.over_limit:
            return  # the rest of a body already refused
        self.body_received += len(data)
        if self.body_received > self.body_limit:
            self.over_limit = True
            channel = self.channel
            if isinstance(channel, DeadlineChannel):
                channel.refuse(413, BODY_TOO_LARGE, _too_large(self.body_limit))
            elif channel is not None:
                channel.loseConnection()
            return
        self.content.write(data)


class DeadlineChannel(HTTPChannel):
    """An HTTP connection on a clock: every request has a deadline, body and answer included.

    Twisted's idle timeout restarts with every byte, so a client trickling a
    request a byte at a time (slowloris) holds a connection for ever; and
    Autobahn's opening-handshake timer starts only once the upgrade request
    has been read. Here a request's time runs from the connection (or the end
    of the previous response on it): its head must be in within
    ``handshake_timeout`` (for a WebSocket upgrade: the WebSocket open), and a
    plain request must be over, body read and our answer written, within
    ``http_request_timeout``. Only an open WebSocket has no deadline.

    A plain request also counts against ``max_connections_per_ip``, in the
    count the WebSockets are admitted against, from its head until its answer
    is written: its client address (behind a trusted proxy, X-Forwarded-For)
    is known only with the head, and before it the deadline bounds the
    connection. A request over the count gets 429, and a body the resource
    does not take, or larger than it takes, 413, both before the body is read.
    """

    deadline = 10.0  # replaced by the site's handshake_timeout
    request_deadline = 30.0  # replaced by the site's http_request_timeout
    clock: IReactorTime
    _timer: IDelayedCall | None = None
    _raw: Any = None
    _phase = _HEAD
    _started = 0.0  # when the current request's time began
    _request_line: bytes | None = None
    _counted: str | None = None  # the address this connection's request counts under
    refused = False  # answered with a refusal: nothing more is read

    def connectionMade(self) -> None:
        self._raw = self.transport
        super().connectionMade()
        self._begin()

    def _begin(self) -> None:
        """A request's time starts: at the connection, and after each answer."""
        self._phase = _HEAD
        self._started = self.clock.seconds()
        self._request_line = None
        self._arm(self.deadline)

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = self.clock.callLater(max(0.0, delay), self._expired)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _release(self) -> None:
        address, self._counted = self._counted, None
        if address is not None:
            self.site.addresses.leave(address)

    # -- reading: nothing more once refused ------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return  # lines Twisted had buffered before the refusal
        if self._request_line is None and line:
            self._request_line = line  # the head's first line: method and target
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if not self.refused:
            super().allContentReceived()

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        upgrade = (request.getHeader(b"upgrade") or b"").lower() == b"websocket"
        site = self.site
        if not upgrade and site.addresses is not None:
            # WebSockets are counted when their handshake is admitted (Admission).
            address = site.client_address(self, request)
            if not site.addresses.enter(address):
                self.refuse(429, TOO_MANY, "too many connections from this address")
                return
            self._counted = address
        method, _, rest = (self._request_line or b"").partition(b" ")
        limit = site.request_body_limit(method, rest.rpartition(b" ")[0])
        length = _declared_length(request)
        if limit is None and length != 0:
            self.refuse(404, NOT_FOUND, "no such resource")
            return
        limit = limit or 0
        if limit <= 0 and length != 0:
            self.refuse(413, BODY_NOT_ACCEPTED, _too_large(0))
            return
        if length is not None and length > limit:
            self.refuse(413, BODY_TOO_LARGE, _too_large(limit))
            return
        if isinstance(request, BoundedRequest):
            request.body_limit = limit
        super().allHeadersReceived()  # gotLength, and 100 Continue if asked for
        if not upgrade:
            self._phase = _REQUEST
            self._arm(self._started + self.request_deadline - self.clock.seconds())

    def refuse(self, status: int, label: str, message: str) -> None:
        """Answer ``status`` now, read nothing more, and close.

        The answer is written straight to the transport: Twisted's response
        machinery needs a request that has been read to its end.
        """
        if self.refused or self.transport is None:
            return
        self.refused = True
        self.site.http_refusals[label] += 1
        peer = self.getPeer()
        log.info(
            "HTTP request from {peer} refused ({status}, {label}): {message}",
            peer=getattr(peer, "host", str(peer)),
            status=status,
            label=label,
            message=message,
        )
        body = json.dumps({"error": message}).encode() + b"\n"
        self.transport.writeSequence(
            [
                _STATUS_LINES[status],
                b"Content-Type: application/json\r\n",
                b"Cache-Control: no-store\r\n",
                b"Connection: close\r\n",
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            ]
        )
        if IHalfCloseableDescriptor.providedBy(self.transport):
            self.transport.loseWriteConnection()  # FIN after the answer; reading goes on
        else:
            self.loseConnection()
        left = self._timer.getTime() - self.clock.seconds() if self._timer is not None else 0.0
        self._phase = _REFUSED
        self._arm(min(left, REFUSAL_LINGER))

    def requestDone(self, request: Any) -> None:
        # Before Twisted's requestDone, which reads a pipelined next request at once.
        if self.transport is not None and self.persistent:
            self._release()
            self._begin()  # the next request on this connection gets its own time
        # Otherwise the connection closes once the answer is out, and this
        # request's deadline (and count) holds until it has.
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        self._release()
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
        peer = str(raw.getPeer())
        if self._phase == _HEAD:
            self.site.handshake_timeouts += 1
            log.info("handshake from {peer} timed out", peer=peer)
        elif self._phase == _REQUEST:
            self.site.request_timeouts += 1
            log.info("HTTP request from {peer} timed out", peer=peer)
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
    """A Site whose connections get ``DeadlineChannel``'s deadlines, per-address count
    and body limits, and whose requests are ``BoundedRequest``s."""

    protocol = DeadlineChannel
    requestFactory = BoundedRequest
    noisy = False

    def __init__(
        self,
        root: Resource,
        clock: IReactorTime,
        deadline: float,
        request_deadline: float | None = None,
        addresses: AddressCount | None = None,
        proxies: ProxyPolicy | None = None,
    ) -> None:
        """``addresses``: the count plain requests share with WebSockets (None: not
        counted); ``proxies``: whose X-Forwarded-For names the address counted."""
        # No resource of ours takes a form: parsing one would only cost CPU on
        # whatever an unauthenticated client sends.
        super().__init__(root, logFormatter=access_line, parsePOSTFormSubmission=False)
        self.clock = clock
        self.deadline = deadline
        self.request_deadline = request_deadline if request_deadline is not None else deadline
        self.addresses = addresses
        self.proxies = proxies or ProxyPolicy(())
        # For metrics: deadlines that ran out in the head (and WebSocket opening),
        # and after it; early refusals by reason (TOO_MANY, BODY_TOO_LARGE, ...).
        self.handshake_timeouts = 0
        self.request_timeouts = 0
        self.http_refusals: Counter[str] = Counter()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.clock = self.clock
        channel.deadline = self.deadline
        channel.request_deadline = self.request_deadline
        return channel

    def client_address(self, channel: HTTPChannel, request: Request) -> str:
        """The address a request counts as, the way a WebSocket handshake's is found."""
        peer = getattr(channel.getPeer(), "host", "")
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        joined = b", ".join(forwarded).decode("latin-1") if forwarded else None
        return self.proxies.client_address(peer, joined)

    def request_body_limit(self, method: bytes, target: bytes) -> int | None:
        """Bytes of body the resource at ``target`` takes for ``method`` (0: none), or
        None when there is no such resource.

        Asked before the body is read, so it follows the path the way
        twisted.web will route it; a root without ``body_limit_for`` takes none.
        """
        body_limit_for = getattr(self.resource, "body_limit_for", None)
        if body_limit_for is None:
            return 0
        path = target.split(b"?", 1)[0]
        limit = body_limit_for(method, [unquote_to_bytes(p) for p in path[1:].split(b"/")])
        return None if limit is None else int(limit)


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


class GetOnly(Resource):
    """A resource that answers GET (and HEAD, as twisted.web does). Another method
    gets a plain 405 with ``Allow`` here: twisted.web's own answer is an HTML page
    built by a class it deprecated."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        request.setResponseCode(405)
        request.setHeader(b"allow", b"GET, HEAD")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"method not allowed: GET or HEAD only\n"


class JSONResource(GetOnly):
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


class AsyncJSONResource(GetOnly):
    """Like JSONResource, for a status that needs I/O (readiness asks the database;
    a worker asks the other workers)."""

    def __init__(self, status: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request: Request) -> int:
        async def produce() -> tuple[int, dict[bytes, bytes], bytes]:
            code, body = await self._status()
            return code, {b"content-type": b"application/json"}, json.dumps(body).encode() + b"\n"

        return _respond_later(request, produce)


class AsyncTextResource(GetOnly):
    """A 200 whose body needs I/O: a worker's /metrics gathers every worker's."""

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


class StaticPage(GetOnly):
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

    def body_limit_for(self, method: bytes, segments: list[bytes]) -> int | None:
        """For ``ChatSite.request_body_limit``, routed as ``getChild`` routes: None for no
        such resource; a child that takes a body says so with ``request_body_limit(method)``,
        and the page, /ws and the status resources take none."""
        child: Resource | None
        if segments == [b""] and self._index is not None:
            child = self._index
        else:
            child = self._children.get(segments[0]) if segments else None
        if child is None:
            return None
        limit = getattr(child, "request_body_limit", None)
        return int(limit(method)) if limit is not None else 0
