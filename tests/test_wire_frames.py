"""The per-message frames formatted directly are the bytes ``wire.encode`` makes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from chatserver import wire
from chatserver.store import StoredMessage

names = st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)
refs = st.none() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=40)
ids = st.integers(min_value=0, max_value=2**53)
cids = st.none() | st.from_regex(r"[A-Za-z0-9_\-]{1,64}", fullmatch=True)


@given(room=names, user=names, body=st.text(min_size=1, max_size=200), mid=ids, ts=ids, cid=cids)
def test_a_message_frame_is_what_encode_makes(room, user, body, mid, ts, cid):
    frame = wire.encode_message(room, mid, user, body, ts, cid)
    fields = wire.message_dict(room, mid, user, body, ts, cid)
    assert frame == wire.encode({"type": "message", **fields})
    expected = {"type": "message", "room": room, "id": mid, "user": user, "body": body, "ts": ts}
    if cid is not None:
        expected["cid"] = cid
    assert json.loads(frame) == expected


@given(ref=refs, room=names, mid=ids, ts=ids, cid=cids, duplicate=st.booleans())
def test_an_ack_is_what_reply_makes(ref, room, mid, ts, cid, duplicate):
    fields: dict = {"room": room, "id": mid, "ts": ts}
    if cid is not None:
        fields["cid"] = cid
    if duplicate:
        fields["duplicate"] = True
    assert wire.ack(ref, room, mid, ts, cid, duplicate) == wire.reply("ack", ref, **fields)


def test_a_cid_is_checked_like_a_name():
    frame = wire.parse(b'{"type":"send","room":"r","body":"b","cid":"a-B_9"}', False, 100)
    assert frame == wire.Send("r", "b", None, "a-B_9")
    for bad in ('""', '"a.b"', '"' + "x" * 65 + '"', "7", "null"):
        payload = b'{"type":"send","room":"r","body":"b","cid":%s,"ref":1}' % bad.encode()
        if bad == "null":
            assert wire.parse(payload, False, 100).cid is None
            continue
        try:
            wire.parse(payload, False, 100)
        except wire.FrameError as e:
            assert (e.code, e.ref) == (wire.BAD_REQUEST, 1)
        else:
            raise AssertionError(f"cid {bad} was accepted")


optional_ids = st.none() | st.integers(min_value=1, max_value=2**53)


@given(
    mid=ids,
    body=st.text(max_size=50),
    edits=optional_ids,
    deletes=optional_ids,
    edited=optional_ids,
    deleted=st.booleans(),
)
def test_a_change_or_a_changed_message_carries_only_the_fields_that_say_something(
    mid, body, edits, deletes, edited, deleted
):
    stored = StoredMessage("r", mid, "u", body, 5, None, False, edits, deletes, edited, deleted)
    frame = json.loads(wire.message_frame(stored))
    assert frame == {"type": "message", **wire.message_fields(stored)}
    extras = {"edits": edits, "deletes": deletes, "edited": edited, "deleted": deleted or None}
    assert {k: frame[k] for k in extras if k in frame} == {
        k: v for k, v in extras.items() if v is not None
    }
    assert frame.get("deleted", False) is deleted


def test_edit_and_delete_frames_are_parsed_and_checked():
    edit = b'{"type":"edit","room":"r","id":3,"body":"b","cid":"e1","ref":1}'
    assert wire.parse(edit, False, 100) == wire.Edit("r", 3, "b", 1, "e1")
    assert wire.parse(b'{"type":"delete","room":"r","id":3}', False, 100) == wire.Delete("r", 3)
    for bad in (b'"3"', b"0", b"-1", b"1.0", b"true", b"null", b"9223372036854775808"):
        for payload in (
            b'{"type":"delete","room":"r","ref":1,"id":%s}' % bad,
            b'{"type":"edit","room":"r","body":"b","ref":1,"id":%s}' % bad,
        ):
            try:
                wire.parse(payload, False, 100)
            except wire.FrameError as e:
                assert (e.code, e.ref) == (wire.BAD_REQUEST, 1)
            else:
                raise AssertionError(f"id {bad!r} was accepted")
    long = b'{"type":"edit","room":"r","id":1,"body":"%s"}' % (b"x" * 101)
    try:
        wire.parse(long, False, 100)
    except wire.FrameError as e:
        assert e.code == wire.TOO_LARGE
    else:
        raise AssertionError("an edit over max_body_chars was accepted")
