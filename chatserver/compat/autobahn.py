"""Autobahn internals: small frames read here, idle connections kept small.

Two shortcuts, each checked at start-up against a real opened connection
(``check_*``), each with Autobahn's own behaviour as the fallback:

- ``inbound_frames``: whole, small, masked text frames are unmasked and
  handed to ``onMessage`` here. Autobahn takes about 18 us to turn an 80-byte
  frame into a message (a frame header object, a masker object, UTF-8
  validator calls and five hooks); this takes a few. Anything else goes to
  Autobahn from its first byte, with nothing read ahead of it, so its checks
  and close codes stand.
- ``lean_connections``: Autobahn keeps about 80 attributes on every
  connection; once it is open, and between messages, most hold a flag,
  ``None`` or an empty value. Those resting values become class attributes
  and ``compact`` drops instance values equal to them; Autobahn's ~30
  options and its traffic counters are shared by the factory's connections.
  An idle connection's dict shrinks from about 80 keys to about 30.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats

from chatserver.compat import FastPaths

INBOUND_FRAMES = "inbound_frames"
LEAN_CONNECTIONS = "lean_connections"

# Frames up to this size are unmasked here; bigger ones by Autobahn's C masker.
INBOUND_FAST_MAX = 8192
_STATE_OPEN = WebSocketServerProtocol.STATE_OPEN

# -- the probe: a real connection through a real opening handshake ------------

_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _masked_text(payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b"\x81" + bytes((0x80 | len(payload),)) + mask + body


class _Probe(WebSocketServerProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.got.append(payload)


def _opened_probe() -> _Probe:
    from twisted.internet.testing import StringTransport

    factory = WebSocketServerFactory("ws://localhost/ws")
    factory.protocol = _Probe
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(_UPGRADE)
    return proto


# What the inbound path reads on an open connection between messages, and the
# method it hands everything else to.
INBOUND_STATE: dict[str, Any] = {"data": b"", "current_frame": None, "inside_message": False}
INBOUND_METHODS = ("_dataReceived",)


def check_inbound_frames() -> list[str]:
    try:
        proto = _opened_probe()
    except Exception as e:  # a changed handshake path: report, don't crash start-up
        return [f"a probe handshake ({e!r})"]
    missing = [
        f"WebSocketServerProtocol.{n}"
        for n in INBOUND_METHODS
        if not callable(getattr(proto, n, None))
    ]
    if getattr(proto, "state", None) != _STATE_OPEN:
        missing.append("WebSocketServerProtocol.state == STATE_OPEN after the handshake")
    for name, expected in INBOUND_STATE.items():
        if not hasattr(proto, name):
            missing.append(f"WebSocketServerProtocol.{name}")
        elif getattr(proto, name) != expected:
            missing.append(f"WebSocketServerProtocol.{name} == {expected!r} between messages")
    if not missing:
        proto._dataReceived(_masked_text(b"probe"))
        if proto.got != [b"probe"]:
            missing.append("WebSocketServerProtocol._dataReceived -> onMessage")
    return missing


# -- resting values ----------------------------------------------------------

# Read by Autobahn only up to onOpen: the request, headers and response text
# are a few KB per connection.
HANDSHAKE = (
    "_transport_details",
    "_wskey",
    "http_request_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "http_response_data",
    "websocket_protocols",
    "websocket_origin",
    "websocket_extensions",
)
AT_REST: dict[str, Any] = {
    **dict.fromkeys(HANDSHAKE, None),
    **dict.fromkeys(
        (
            "_perMessageCompress",
            "trackedTimings",
            "wasNotCleanReason",
            "localCloseCode",
            "localCloseReason",
            "remoteCloseCode",
            "remoteCloseReason",
            "openHandshakeTimeoutCall",
            "closeHandshakeTimeoutCall",
            "autoPingTimeoutCall",
            "autoPingPending",
            "autoPingPendingCall",
            "autoPingPendingSent",
            "websocket_protocol_in_use",
            "current_frame",
            "current_frame_masker",
            "message_data",
            "frame_data",
            "_valid_events",
            "_results",
        ),
        None,
    ),
    **dict.fromkeys(
        (
            "triggered",
            "wasMaxFramePayloadSizeExceeded",
            "wasMaxMessagePayloadSizeExceeded",
            "closedByMe",
            "failedByMe",
            "droppedByMe",
            "wasClean",
            "wasServerConnectionDropTimeout",
            "wasOpenHandshakeTimeout",
            "wasCloseHandshakeTimeout",
            "wasServingFlashSocketPolicyFile",
            "inside_message",
            "_isMessageCompressed",
            "message_is_binary",
        ),
        False,
    ),
    "data": b"",
    "autoPingPendingSeq": 0,
    "send_state": WebSocketServerProtocol.SEND_STATE_GROUND,
    "state": WebSocketServerProtocol.STATE_OPEN,
    "websocket_version": 13,
    "utf8validateIncomingCurrentMessage": True,
    # Set afresh when a frame or message starts; not read between messages.
    "utf8validateLast": (True, True, 0, 0),
    "frame_length": 0,
    "message_data_total_length": 0,
    # Queues Autobahn fills only for chopped or synced sends, which we never
    # make; the empty tuple fails loudly should that change.
    "send_queue": (),
    "websocket_extensions_in_use": (),
}
DROP_WHEN_EMPTY = ("send_queue", "websocket_extensions_in_use")
# Autobahn's event mixin reads these only once listeners are registered (we
# register none).
EVENT_STATE = ("_results", "_valid_events")
# Per-message state, dropped only between messages.
BETWEEN_MESSAGES = (
    "current_frame_masker",
    "utf8validateLast",
    "frame_length",
    "message_data_total_length",
)
IMMUTABLE = (type(None), bool, int, float, str, bytes, tuple, frozenset)
MISSING = object()


def check_lean_connections() -> list[str]:
    try:
        proto = _opened_probe()
    except Exception as e:
        return [f"a probe handshake ({e!r})"]
    proto._dataReceived(_masked_text(b"probe"))  # per-message state exists after one
    names = set(vars(proto)) | set(dir(type(proto)))
    missing = [f"WebSocketServerProtocol.{n}" for n in AT_REST if n not in names]
    if not isinstance(getattr(WebSocketServerProtocol, "CONFIG_ATTRS", None), list | tuple):
        missing.append("WebSocketServerProtocol.CONFIG_ATTRS")
    if not isinstance(getattr(proto, "trafficStats", None), TrafficStats):
        missing.append("WebSocketServerProtocol.trafficStats")
    return missing


CHECKS = {INBOUND_FRAMES: check_inbound_frames, LEAN_CONNECTIONS: check_lean_connections}


def lean_class_attributes(factory: WebSocketServerFactory, traffic: TrafficStats) -> dict[str, Any]:
    """Class attributes for a per-factory protocol class: resting values, the factory's
    options (Autobahn copies each onto every connection when it opens: about 1.5 KB),
    and one traffic counter for all (Autobahn counts per connection; nothing reads it)."""
    options = {
        # A function as a class attribute would become a method: keep it plain.
        name: staticmethod(value) if isinstance(value, types.FunctionType) else value
        for name in WebSocketServerProtocol.CONFIG_ATTRS
        for value in (getattr(factory, name),)
    }
    return {**AT_REST, **options, "CONFIG_ATTRS": (), "trafficStats": traffic}


def forget_handshake(obj: Any) -> None:
    """Drop what only the opening handshake needed (reads now give ``None``)."""
    attrs = obj.__dict__
    for name in HANDSHAKE:
        attrs.pop(name, None)
    attrs.pop("trafficStats", None)  # the class's shared counter stands in
    attrs["data"] = b""


def compact(obj: Any) -> None:
    """Drop instance attributes that hold their class's value (see ``AT_REST``).

    Only safe between frames: per-message state goes only when no frame or
    message is being parsed.
    """
    attrs = obj.__dict__
    between = attrs.get("current_frame") is None and not attrs.get("inside_message")
    cls = type(obj)
    lean = {}
    for name, value in attrs.items():
        if between and name in BETWEEN_MESSAGES:
            continue
        at_rest = getattr(cls, name, MISSING)
        if value is at_rest:
            continue
        if type(value) is type(at_rest) and type(value) in IMMUTABLE and value == at_rest:
            continue
        if name in DROP_WHEN_EMPTY and not value:
            continue
        if name in EVENT_STATE and attrs.get("_listeners") is None:
            continue
        lean[name] = value
    if len(lean) < len(attrs):
        obj.__dict__ = lean


# -- inbound frames ------------------------------------------------------------


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 unmasking as one big-integer XOR: a few C calls, no loop in Python."""
    n = len(payload)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def inbound_limit(factory: WebSocketServerFactory) -> int:
    """The largest frame read here: INBOUND_FAST_MAX, or the factory's limits if lower."""
    return min(
        (INBOUND_FAST_MAX, factory.maxFramePayloadSize, factory.maxMessagePayloadSize),
        key=lambda n: n if n > 0 else INBOUND_FAST_MAX,  # 0: no limit
    )


class InboundFrames:
    """Mixed in before the protocol when ``inbound_frames`` is on."""

    _inbound_limit = INBOUND_FAST_MAX  # set per factory class
    fast_paths: FastPaths  # set per factory class
    state: int
    data: bytes
    current_frame: Any
    inside_message: bool

    if TYPE_CHECKING:

        def onMessage(self, payload: bytes, isBinary: bool) -> None: ...

        def _dataReceived(self, data: bytes) -> None: ...

    def dataReceived(self, data: bytes) -> None:
        if (
            self.state != _STATE_OPEN
            or self.data
            or self.current_frame is not None
            or self.inside_message
        ):
            self._dataReceived(data)
            return
        end_of_data = len(data)
        limit = self._inbound_limit
        pos = 0
        frames = 0
        while pos + 6 <= end_of_data and data[pos] == 0x81:  # FIN, no RSV, text
            length = data[pos + 1]
            if length < 0x80 or length == 0xFF:
                break  # unmasked, or a 64-bit length
            length &= 0x7F
            head = pos + 6
            if length == 126:
                head = pos + 8
                if head > end_of_data:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not the shortest encoding: Autobahn refuses it
            if length > limit or head + length > end_of_data:
                break
            end = head + length
            payload = _unmask(data[head:end], data[head - 4 : head])
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break
            pos = end
            frames += 1
            self.onMessage(payload, False)
            if self.state != _STATE_OPEN:
                break  # closing: Autobahn reads what follows
        if frames:
            self.fast_paths.runs[INBOUND_FRAMES] += frames
        if pos < end_of_data:
            self._dataReceived(data[pos:] if pos else data)
