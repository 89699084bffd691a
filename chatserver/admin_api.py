"""The admin HTTP API: rooms, members, kicks, bans and server messages, JSON in and out.

Authenticated by ``Authorization: Bearer <admin_api_key>``. Every change that
takes access away also ends it at once on every instance (over the broker's
control channel), not at the user's next reconnect.

    POST   /admin/rooms                      {"room", "private": bool}
    POST   /admin/rooms/ROOM/members         {"user"}
    DELETE /admin/rooms/ROOM/members/USER
    POST   /admin/rooms/ROOM/kick            {"user"}
    POST   /admin/rooms/ROOM/messages        {"body", "user": "system"}
    POST   /admin/bans                       {"user", "room": optional, absent = everywhere}
    DELETE /admin/bans/USER                  ?room=ROOM (absent = the global ban)
"""

from __future__ import annotations

import hmac
import json
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from chatserver import wire
from chatserver.chat import Chat
from chatserver.config import Config
from chatserver.store import EVERYWHERE, Store, StoreUnavailable

log = Logger()
MAX_REQUEST_BYTES = 1 << 20


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _name(value: Any, what: str) -> str:
    if not wire.is_valid_name(value):
        raise HTTPError(400, f"{what} must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return value


class AdminAPI(Resource):
    isLeaf = True

    def __init__(self, config: Config, store: Store, chat: Chat) -> None:
        super().__init__()
        self._key = (config.admin_api_key or "").encode()
        self._max_body = config.max_body_chars
        self._store = store
        self._chat = chat
        self.requests: Counter[int] = Counter()  # by status, for metrics

    def render(self, request: Request) -> Any:
        Deferred.fromCoroutine(self._serve(request))
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        try:
            self._authorize(request)
            result = await self._route(request)
            status = 200
        except HTTPError as e:
            status, result = e.status, {"error": e.message}
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
        request.write(json.dumps(result).encode() + b"\n")
        request.finish()

    def _authorize(self, request: Request) -> None:
        header = request.getHeader(b"authorization") or b""
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self._key):
            raise HTTPError(401, "missing or wrong admin API key")

    def _json(self, request: Request) -> dict[str, Any]:
        raw = request.content.read(MAX_REQUEST_BYTES + 1)
        if len(raw) > MAX_REQUEST_BYTES:
            raise HTTPError(413, "request body too large")
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
