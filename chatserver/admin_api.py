"""The admin HTTP API: rooms, members, kicks, bans and server messages, JSON in and out.

Authenticated by ``Authorization: Bearer <admin_api_key>``. Every change that
takes access away also ends it at once on every instance (over the broker's
control channel), not at the user's next reconnect.

Wrong keys are throttled per client address: after ``admin_auth_failures``
within ``admin_auth_lockout`` seconds, every request from that address gets 429
(with Retry-After) until the lockout ends, even one with the right key, so
that the answer can't tell a guesser whether a guess was right.

    POST   /admin/rooms                      {"room", "private": bool}
    POST   /admin/rooms/ROOM/members         {"user"}
    DELETE /admin/rooms/ROOM/members/USER
    POST   /admin/rooms/ROOM/kick            {"user"}
    POST   /admin/rooms/ROOM/messages        {"body", "user": "system"}
    DELETE /admin/rooms/ROOM/messages/ID     ?user=NAME (the delete event's user, "system")
    GET    /admin/rooms/ROOM/presence        who is online, on every instance
    POST   /admin/bans                       {"user", "room": optional, absent = everywhere}
    DELETE /admin/bans/USER                  ?room=ROOM (absent = the global ban)
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
from collections import Counter, OrderedDict
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from chatserver import wire
from chatserver.chat import Chat
from chatserver.config import Config
from chatserver.store import (
    EVERYWHERE,
    MessageNotFound,
    NotYetWritten,
    Store,
    StoreUnavailable,
)
from chatserver.transport.policies import ProxyPolicy

log = Logger()
MAX_TRACKED_ADDRESSES = 10_000  # bounds the throttle's memory whatever the traffic


class HTTPError(Exception):
    def __init__(
        self, status: int, message: str, headers: dict[bytes, bytes] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def throttle_key(address: str) -> str:
    """IPv6 addresses count by /64: one host commonly holds a whole /64, and
    would otherwise get a fresh allowance of guesses from each of its addresses."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address: still one key, of bounded size
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Failures:
    __slots__ = ("count", "locked_until", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.count = 0
        self.locked_until = 0.0


class AuthThrottle:
    """Wrong admin keys by client address, so that guessing is slow and shows in the log.

    An LRU of at most ``max_tracked`` addresses: a flood from many addresses
    evicts the oldest entries instead of growing without bound. A lockout is not
    extended by the requests it refuses, so a client that keeps retrying is let
    back in when Retry-After says.
    """

    def __init__(
        self,
        limit: int,
        lockout: float,
        clock: IReactorTime,
        max_tracked: int = MAX_TRACKED_ADDRESSES,
    ) -> None:
        self.limit = limit
        self.lockout = lockout
        self.clock = clock
        self.max_tracked = max_tracked
        self._entries: OrderedDict[str, _Failures] = OrderedDict()
        self.lockouts = 0

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it is not locked out."""
        entry = self._entries.get(address)
        if entry is None:
            return 0.0
        now = self.clock.seconds()
        if entry.locked_until > now:
            return entry.locked_until - now
        if entry.locked_until or now - entry.since >= self.lockout:
            del self._entries[address]  # lockout over, or its failures too old to count
        return 0.0

    def failed(self, address: str) -> None:
        now = self.clock.seconds()
        entry = self._entries.get(address)
        if entry is None or now - entry.since >= self.lockout:
            entry = self._entries[address] = _Failures(now)
        self._entries.move_to_end(address)
        entry.count += 1
        if entry.count >= self.limit:
            entry.locked_until = now + self.lockout
            self.lockouts += 1
            log.warn(
                "admin API: {address} locked out for {seconds:g}s after {count} wrong keys",
                address=address,
                seconds=self.lockout,
                count=entry.count,
            )
        while len(self._entries) > self.max_tracked:
            self._entries.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._entries.pop(address, None)


def _name(value: Any, what: str) -> str:
    if not wire.is_valid_name(value):
        raise HTTPError(400, f"{what} must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return value


class AdminAPI(Resource):
    isLeaf = True

    def __init__(
        self, config: Config, store: Store, chat: Chat, clock: IReactorTime | None = None
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._key = (config.admin_api_key or "").encode()
        self._max_body = config.max_body_chars
        self._max_request = config.max_request_body
        self._store = store
        self._chat = chat
        self._proxies = ProxyPolicy(config.trusted_proxies)
        self.throttle = AuthThrottle(config.admin_auth_failures, config.admin_auth_lockout, clock)
        self.requests: Counter[int] = Counter()  # by status, for metrics
        if not config.admin_listen:
            log.warn(
                "admin API is served at /admin on the public port(s); set admin_listen to"
                " serve it on a private endpoint only"
            )

    def request_body_limit(self, method: bytes) -> int:
        """Asked by the site before a body is read: only the POSTs take one. Anything
        larger is refused with 413 then, unauthenticated or not, before it is read."""
        return self._max_request if method == b"POST" else 0

    def render(self, request: Request) -> Any:
        Deferred.fromCoroutine(self._serve(request))
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        headers: dict[bytes, bytes] = {}
        try:
            self._authorize(request)
            result = await self._route(request)
            status = 200
        except HTTPError as e:
            status, result, headers = e.status, {"error": e.message}, e.headers
        except StoreUnavailable:
            status, result = 503, {"error": "storage is unavailable; try again"}
        except Exception:
            log.failure("admin request failed")
            status, result = 500, {"error": "internal error"}
        self.requests[status] += 1
        if gone:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="chatserver admin"')
        for name, value in headers.items():
            request.setHeader(name, value)
        request.write(json.dumps(result).encode() + b"\n")
        request.finish()

    def _authorize(self, request: Request) -> None:
        peer = getattr(request.getClientAddress(), "host", "")
        forwarded = request.getHeader(b"x-forwarded-for")
        address = throttle_key(
            self._proxies.client_address(peer, forwarded.decode("latin-1") if forwarded else None)
        )
        wait = self.throttle.retry_after(address)
        if wait > 0:
            raise HTTPError(
                429,
                "too many wrong admin API keys from this address; try again later",
                {b"retry-after": str(max(1, math.ceil(wait))).encode()},
            )
        header = request.getHeader(b"authorization") or b""
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self._key):
            self.throttle.failed(address)
            raise HTTPError(401, "missing or wrong admin API key")
        self.throttle.succeeded(address)

    def _json(self, request: Request) -> dict[str, Any]:
        # The site has refused a larger body before reading it; this holds for a
        # request that came some other way.
        raw = request.content.read(self._max_request + 1)
        if len(raw) > self._max_request:
            raise HTTPError(413, f"request body over {self._max_request} bytes")
        try:
            body = wire.decode_json(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return body

    async def _route(self, request: Request) -> dict[str, Any]:
        method = request.method.decode()
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        match (method, path):
            case ("POST", ["rooms"]):
                body = self._json(request)
                room = _name(body.get("room"), "room")
                private = body.get("private", False)
                if not isinstance(private, bool):
                    raise HTTPError(400, "private must be true or false")
                await self._store.set_room(room, private)
                await self._chat.room_privacy_changed(room, private)
                return {"room": room, "private": private}
            case ("POST", ["rooms", room, "members"]):
                room = _name(room, "room")
                user = _name(self._json(request).get("user"), "user")
                await self._store.set_member(room, user, True)
                return {"room": room, "user": user, "member": True}
            case ("DELETE", ["rooms", room, "members", user]):
                room, user = _name(room, "room"), _name(user, "user")
                await self._store.set_member(room, user, False)
                self._chat.kick(room, user, "removed")
                return {"room": room, "user": user, "member": False}
            case ("POST", ["rooms", room, "kick"]):
                room = _name(room, "room")
                user = _name(self._json(request).get("user"), "user")
                self._chat.kick(room, user, "kicked")
                return {"room": room, "user": user, "kicked": True}
            case ("POST", ["rooms", room, "messages"]):
                return await self._post_message(_name(room, "room"), self._json(request))
            case ("GET", ["rooms", room, "presence"]):
                room = _name(room, "room")
                try:
                    names, count = await self._chat.online_in(room)
                except Exception:
                    log.failure("admin API: reading presence failed")
                    raise HTTPError(503, "presence is unavailable; try again") from None
                return {"room": room, "online": names, "online_count": count}
            case ("DELETE", ["rooms", room, "messages", target]):
                return await self._delete_message(_name(room, "room"), target, request)
            case ("POST", ["bans"]):
                body = self._json(request)
                user = _name(body.get("user"), "user")
                room = body.get("room")
                where = EVERYWHERE if room is None else _name(room, "room")
                # Stored first, so a rejoin after the kick is already refused.
                await self._store.set_ban(where, user, True)
                self._chat.kick(where, user, "banned")
                return {"user": user, "room": room, "banned": True}
            case ("DELETE", ["bans", user]):
                user = _name(user, "user")
                room_arg = request.args.get(b"room")
                room = room_arg[0].decode("utf-8", "replace") if room_arg else None
                where = EVERYWHERE if room is None else _name(room, "room")
                await self._store.set_ban(where, user, False)
                return {"user": user, "room": room, "banned": False}
            case (_, ["rooms", *_] | ["bans", *_]):
                raise HTTPError(405, f"{method} is not supported here")
        raise HTTPError(404, "no such admin resource")

    async def _delete_message(self, room: str, target: str, request: Request) -> dict[str, Any]:
        if not (target.isascii() and target.isdigit() and 0 < int(target) <= wire.MAX_ID):
            raise HTTPError(400, "message id must be a positive integer")
        user_arg = request.args.get(b"user")
        user = _name(user_arg[0].decode("utf-8", "replace") if user_arg else "system", "user")
        try:
            event = await self._chat.remove(room, int(target), user)
        except MessageNotFound as e:
            raise HTTPError(404, str(e)) from None
        except NotYetWritten as e:
            raise HTTPError(400, str(e)) from None
        return {
            "room": room,
            "id": event.id,
            "ts": event.ts,
            "user": user,
            "deletes": event.deletes,
        }

    async def _post_message(self, room: str, body: dict[str, Any]) -> dict[str, Any]:
        text = body.get("body")
        user = _name(body.get("user", "system"), "user")
        if not isinstance(text, str) or not text:
            raise HTTPError(400, "body must be a non-empty string")
        if len(text) > self._max_body:
            raise HTTPError(413, f"body is longer than {self._max_body} characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(400, "body must be valid Unicode text") from None
        if "\x00" in text:
            raise HTTPError(400, "body must not contain NUL")
        message = await self._chat.post(room, user, text)
        return {"room": room, "id": message.id, "ts": message.ts, "user": user}
