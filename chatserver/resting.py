"""Autobahn's per-connection state at rest, kept once per class instead of per connection.

Autobahn keeps about 80 attributes on every connection. Once it is open, and
between messages, most of them hold a flag, ``None`` or an empty value. Those
values become class attributes of the protocol (``install``), and ``compact``
drops instance values equal to them: an idle connection's dict shrinks from
about 80 keys to about 30, and a few objects that were only needed for the
handshake or the last message go with them.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketServerProtocol

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


def forget_handshake(obj: Any) -> None:
    """Drop what only the opening handshake needed (reads now give ``None``)."""
    attrs = obj.__dict__
    for name in HANDSHAKE:
        attrs.pop(name, None)


def install(cls: type) -> None:
    """Give ``cls`` the resting values as class attributes."""
    for name, value in AT_REST.items():
        setattr(cls, name, value)


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
