"""The wire format of protocol v1: parse and check client frames, encode server frames.

Pure functions, no I/O: everything a client can send is turned into either a
typed frame or a ``FrameError`` carrying the protocol's error code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

SUBPROTOCOL = "chat.v1"
MAX_DEPTH = 8
MAX_ID = 2**63 - 1  # ids are BIGINT in the store
HISTORY_LIMIT_MAX = 100
HISTORY_LIMIT_DEFAULT = 50

_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_CID = re.compile(r"[A-Za-z0-9_\-]{1,64}")

# Error codes (PROTOCOL.md).
BAD_FRAME = "bad_frame"
BAD_REQUEST = "bad_request"
NOT_MEMBER = "not_member"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
TOO_LARGE = "too_large"
UNAVAILABLE = "unavailable"
NOT_FOUND = "not_found"  # protocol 1.1
# Every error code the protocol defines.
ERROR_CODES = (
    BAD_FRAME,
    BAD_REQUEST,
    NOT_MEMBER,
    FORBIDDEN,
    RATE_LIMITED,
    TOO_LARGE,
    UNAVAILABLE,
    NOT_FOUND,
)


class FrameError(Exception):
    """A client frame the server answers with an ``error`` frame."""

    def __init__(self, code: str, message: str, ref: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    ref: str | int | None = None
    presence: bool = False  # protocol 1.1: this connection follows who is online


@dataclass(frozen=True, slots=True)
class Leave:
    room: str
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Send:
    room: str
    body: str
    ref: str | int | None = None
    cid: str | None = None  # protocol 1.1: the client's id for this send, for retries


@dataclass(frozen=True, slots=True)
class Edit:
    room: str
    id: int
    body: str
    ref: str | int | None = None
    cid: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    room: str
    id: int
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Read:
    room: str
    id: int
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Typing:
    room: str
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    room: str
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class History:
    room: str
    before: int | None = None
    after: int | None = None
    limit: int = HISTORY_LIMIT_DEFAULT
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: str | int | None = None


ClientFrame = Join | Leave | Send | Edit | Delete | Read | Typing | PresenceQuery | History | Ping


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _too_deep(value: Any, depth: int = 1) -> bool:
    if depth > MAX_DEPTH:
        return True
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return False
    return any(isinstance(v, dict | list) and _too_deep(v, depth + 1) for v in value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: str) -> bool:
    """True when the string can be stored faithfully: no NUL, no lone surrogates."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _room(obj: dict, ref: str | int | None) -> str:
    room = obj.get("room")
    if not is_valid_name(room):
        raise FrameError(BAD_REQUEST, "room must be 1-64 characters of A-Z a-z 0-9 _ . : -", ref)
    return room


def _cursor(obj: dict, key: str, ref: str | int | None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_ID:
        raise FrameError(BAD_REQUEST, f"{key} must be a non-negative integer message id", ref)
    return value


def _target(obj: dict, ref: str | int | None) -> int:
    value = obj.get("id")
    if not _is_int(value) or not 1 <= value <= MAX_ID:
        raise FrameError(BAD_REQUEST, "id must be a positive integer message id", ref)
    return value


def _body(obj: dict, ref: str | int | None, max_body_chars: int) -> str:
    body = obj.get("body")
    if not isinstance(body, str) or not body:
        raise FrameError(BAD_REQUEST, "body must be a non-empty string", ref)
    if len(body) > max_body_chars:
        raise FrameError(TOO_LARGE, f"body is longer than {max_body_chars} characters", ref)
    if not _is_text(body):
        raise FrameError(
            BAD_REQUEST, "body must be valid Unicode text without NUL or lone surrogates", ref
        )
    return body


def _cid(obj: dict, ref: str | int | None) -> str | None:
    cid = obj.get("cid")
    if cid is not None and not (isinstance(cid, str) and _CID.fullmatch(cid)):
        raise FrameError(BAD_REQUEST, "cid must be 1-64 characters of A-Z a-z 0-9 _ -", ref)
    return cid


# One decoder and one encoder for every frame: json.loads and json.dumps with
# any option build a new one per call, a third of the time for a small frame.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def decode_json(payload: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, bounded nesting); ValueError otherwise.

    JSON on the wire is UTF-8 (RFC 8259); a leading byte order mark is
    tolerated, as json.loads does.
    """
    text = payload.decode("utf-8-sig")
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nesting too deep") from None
    # Fewer brackets than the limit cannot nest past it.
    if text.count("{") + text.count("[") > MAX_DEPTH and _too_deep(value):
        raise ValueError("nesting too deep")
    return value


def parse(payload: bytes, is_binary: bool, max_body_chars: int) -> ClientFrame:
    """Turn one WebSocket message into a client frame, or raise ``FrameError``."""
    if is_binary:
        raise FrameError(BAD_FRAME, "binary frames are not accepted; send JSON text")
    try:
        obj = decode_json(payload)
    except (ValueError, UnicodeDecodeError):
        raise FrameError(BAD_FRAME, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError(BAD_FRAME, "frame must be a JSON object")

    ref = obj.get("ref")
    if ref is not None and not (_is_int(ref) or isinstance(ref, str)):
        raise FrameError(BAD_REQUEST, "ref must be a string or an integer")
    if isinstance(ref, str) and not _is_text(ref):
        raise FrameError(BAD_REQUEST, "ref must be valid Unicode text without NUL")

    kind = obj.get("type")
    if kind == "send":
        room = _room(obj, ref)
        body = _body(obj, ref, max_body_chars)
        return Send(room, body, ref, _cid(obj, ref))
    if kind == "edit":
        room = _room(obj, ref)
        target = _target(obj, ref)
        body = _body(obj, ref, max_body_chars)
        return Edit(room, target, body, ref, _cid(obj, ref))
    if kind == "delete":
        room = _room(obj, ref)
        return Delete(room, _target(obj, ref), ref)
    if kind == "join":
        room = _room(obj, ref)
        presence = obj.get("presence", False)
        if not isinstance(presence, bool):
            raise FrameError(BAD_REQUEST, "presence must be true or false", ref)
        return Join(room, ref, presence)
    if kind == "read":
        room = _room(obj, ref)
        return Read(room, _target(obj, ref), ref)
    if kind == "typing":
        return Typing(_room(obj, ref), ref)
    if kind == "presence":
        return PresenceQuery(_room(obj, ref), ref)
    if kind == "leave":
        return Leave(_room(obj, ref), ref)
    if kind == "history":
        room = _room(obj, ref)
        before = _cursor(obj, "before", ref)
        after = _cursor(obj, "after", ref)
        if before is not None and after is not None:
            raise FrameError(BAD_REQUEST, "give before or after, not both", ref)
        limit = obj.get("limit", HISTORY_LIMIT_DEFAULT)
        if not _is_int(limit) or not 1 <= limit <= HISTORY_LIMIT_MAX:
            raise FrameError(BAD_REQUEST, f"limit must be an integer 1-{HISTORY_LIMIT_MAX}", ref)
        return History(room, before, after, limit, ref)
    if kind == "ping":
        return Ping(ref)
    if isinstance(kind, str) and _is_text(kind):
        raise FrameError(BAD_FRAME, f"unknown frame type {kind[:64]!r}", ref)
    raise FrameError(BAD_FRAME, "frame needs a string 'type'", ref)


def encode(obj: dict[str, Any]) -> bytes:
    """Strict, compact JSON as UTF-8."""
    return _ENCODER.encode(obj).encode()


def reply(kind: str, ref: str | int | None = None, **fields: Any) -> bytes:
    if ref is not None:
        fields["ref"] = ref
    return encode({"type": kind, **fields})


def error(code: str, message: str, ref: str | int | None = None) -> bytes:
    return reply("error", ref, code=code, message=message)


def message_dict(
    room: str, id: int, user: str, body: str, ts: int, cid: str | None = None
) -> dict[str, Any]:
    fields = {"room": room, "id": id, "user": user, "body": body, "ts": ts}
    if cid is not None:
        fields["cid"] = cid
    return fields


class MessageLike(Protocol):
    """A stored message or edit/delete event, as the store reads it back."""

    room: str
    id: int
    user: str
    body: str
    ts: int
    cid: str | None
    edits: int | None
    deletes: int | None
    edited: int | None
    deleted: bool


def message_fields(m: MessageLike) -> dict[str, Any]:
    """``m`` as history pages carry it: the protocol 1.1 fields only when they
    say something, so a version 1 client sees what it always saw."""
    fields = message_dict(m.room, m.id, m.user, m.body, m.ts, m.cid)
    if m.edits is not None:
        fields["edits"] = m.edits
    if m.deletes is not None:
        fields["deletes"] = m.deletes
    if m.edited is not None:
        fields["edited"] = m.edited
    if m.deleted:
        fields["deleted"] = True
    return fields


def message_frame(m: MessageLike) -> bytes:
    """The ``message`` frame of ``m``, as every member gets it."""
    if m.edits is None and m.deletes is None and m.edited is None and not m.deleted:
        return encode_message(m.room, m.id, m.user, m.body, m.ts, m.cid)
    # Rare (a change, or a changed message read back to fill a gap): the plain way.
    return encode({"type": "message", **message_fields(m)})


# The two frames every message costs, formatted directly: the same bytes as
# ``encode`` of their dicts, at a third of the cost (strings still go through
# the encoder, which escapes them; ints are formatted).
_string = _ENCODER.encode


def encode_message(
    room: str, id: int, user: str, body: str, ts: int, cid: str | None = None
) -> bytes:
    head = (
        f'{{"type":"message","room":{_string(room)},"id":{id},'
        f'"user":{_string(user)},"body":{_string(body)},"ts":{ts}'
    )
    if cid is None:
        return (head + "}").encode()
    return f'{head},"cid":{_string(cid)}}}'.encode()


def ack(
    ref: str | int | None,
    room: str,
    id: int,
    ts: int,
    cid: str | None = None,
    duplicate: bool = False,
) -> bytes:
    """``reply("ack", ref, room=room, id=id, ts=ts[, cid=cid][, duplicate=True])``,
    byte for byte."""
    head = f'{{"type":"ack","room":{_string(room)},"id":{id},"ts":{ts}'
    if cid is not None:
        head += f',"cid":{_string(cid)}'
    if duplicate:
        head += ',"duplicate":true'
    if ref is None:
        return (head + "}").encode()
    ref_text = str(ref) if type(ref) is int else _string(ref)
    return f'{head},"ref":{ref_text}}}'.encode()


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one unmasked, final WebSocket text frame (RFC 6455, 5.2).

    A server's frames carry no mask, so a broadcast's frame is built once and
    the same bytes go to every member.
    """
    n = len(payload)
    if n < 126:
        return b"\x81" + bytes((n,)) + payload
    if n <= 0xFFFF:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload
