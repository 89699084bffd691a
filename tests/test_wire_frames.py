"""The per-message frames formatted directly are the bytes ``wire.encode`` makes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from chatserver import wire

names = st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)
refs = st.none() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=40)
ids = st.integers(min_value=0, max_value=2**53)


@given(room=names, user=names, body=st.text(min_size=1, max_size=200), mid=ids, ts=ids)
def test_a_message_frame_is_what_encode_makes(room, user, body, mid, ts):
    frame = wire.encode_message(room, mid, user, body, ts)
    assert frame == wire.encode({"type": "message", **wire.message_dict(room, mid, user, body, ts)})
    assert json.loads(frame) == {
        "type": "message",
        "room": room,
        "id": mid,
        "user": user,
        "body": body,
        "ts": ts,
    }


@given(ref=refs, room=names, mid=ids, ts=ids)
def test_an_ack_is_what_reply_makes(ref, room, mid, ts):
    assert wire.ack(ref, room, mid, ts) == wire.reply("ack", ref, room=room, id=mid, ts=ts)
