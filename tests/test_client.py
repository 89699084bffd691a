"""The terminal client: its pure resume/de-dup logic, and the real program against real servers."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable

import jwt
import pytest
import pytest_twisted
from clientproc import chat_lines, spawn_client, talk_elsewhere
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from wsclient import connect

from chatserver.client.connection import close_verdict, with_credentials
from chatserver.client.events import Acked, Message, Notice, Problem, Resync
from chatserver.client.session import (
    READ_INTERVAL,
    Backoff,
    RoomState,
    Session,
    Throttle,
    TokenBucket,
)
from chatserver.client.terminal import USAGE, format_message, parse_line, printable

ensure = pytest_twisted.ensureDeferred
SECRET = "test-secret-that-is-long-enough-for-hs256"


# --- the pure logic -------------------------------------------------------------


def msg(room: str, id: int, user: str = "bob", body: str | None = None, **extra) -> dict:
    """A ``message`` frame; ``extra``: the protocol 1.1 fields (cid, edits, deletes...)."""
    return {
        "type": "message",
        "room": room,
        "id": id,
        "user": user,
        "body": body if body is not None else f"m{id}",
        "ts": 1_795_000_000_000 + id,
        **extra,
    }


def answer(session: Session, frame: dict, kind: str, **fields) -> None:
    """The server's answer to ``frame``, echoing its ref."""
    session.handle({"type": kind, "ref": frame["ref"], **fields})


def shown(events: list) -> list[tuple[str, int]]:
    return [(e.room, e.id) for e in events if isinstance(e, Message)]


def test_first_join_shows_the_backlog_then_what_came_meanwhile_in_order():
    s = Session("alice", ["r"], backlog=3)
    s.connected()
    (join,), _ = s.drain()
    assert join == {"type": "join", "room": "r", "presence": True, "ref": join["ref"]}
    answer(s, join, "joined", room="r", last_id=5)
    (backlog,), events = s.drain()
    assert backlog == {"type": "history", "room": "r", "limit": 3, "ref": backlog["ref"]}
    assert events == [Notice("joined r")]
    s.handle(msg("r", 6))  # live while the backlog is on its way: held
    assert s.drain() == ([], [])
    answer(s, backlog, "history", room="r", messages=[msg("r", i) for i in (3, 4, 5)], more=True)
    frames, events = s.drain()
    assert frames == [] and shown(events) == [("r", 3), ("r", 4), ("r", 5), ("r", 6)]
    assert s.resumed()


def test_reconnect_catches_up_after_the_last_seen_id_and_drops_duplicates():
    s = Session("alice", ["r"], backlog=0)
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=2)
    s.handle(msg("r", 3))
    assert shown(s.drain()[1]) == [("r", 3)]

    s.disconnected()
    assert not s.resumed()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=9)
    (page,), _ = s.drain()
    assert page == {"type": "history", "room": "r", "after": 3, "limit": 100, "ref": page["ref"]}
    s.handle(msg("r", 10))  # live, arrives before the catch-up: held, not shown out of order
    s.handle(msg("r", 11))
    answer(s, page, "history", room="r", messages=[msg("r", i) for i in (4, 5, 6)], more=True)
    (page2,), events = s.drain()
    assert page2["after"] == 6 and shown(events) == [("r", 4), ("r", 5), ("r", 6)]
    # The last page overlaps the live stream (10) and repeats an id (6): both once.
    answer(s, page2, "history", room="r", messages=[msg("r", i) for i in (6, 7, 8, 9, 10)])
    frames, events = s.drain()
    assert frames == []
    assert shown(events) == [("r", i) for i in (7, 8, 9, 10, 11)]
    s.handle(msg("r", 11))
    s.handle(msg("r", 12))
    assert shown(s.drain()[1]) == [("r", 12)]
    assert s.rooms["r"].cursor == 12


def test_a_backlog_page_does_not_move_the_cursor_past_a_gap():
    s = Session("alice", ["r"], backlog=1)
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=10)
    (backlog,), _ = s.drain()
    # 11 and 12 were stored before the page was read; their live copies are late.
    answer(s, backlog, "history", room="r", messages=[msg("r", 12)], more=True)
    assert shown(s.drain()[1]) == [("r", 12)]
    assert s.rooms["r"].cursor == 10
    s.disconnected()  # before 11 came live
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=12)
    (page,), _ = s.drain()
    assert page["after"] == 10
    answer(s, page, "history", room="r", messages=[msg("r", 11), msg("r", 12)])
    assert shown(s.drain()[1]) == [("r", 11)]
    assert s.rooms["r"].cursor == 12


def test_reconnect_with_nothing_new_needs_no_history():
    s = Session("alice", ["a", "b"], backlog=0)
    s.connected()
    joins, _ = s.drain()
    assert [f["room"] for f in joins] == ["a", "b"]
    for f in joins:
        answer(s, f, "joined", room=f["room"], last_id=None)
    s.disconnected()
    s.connected()
    joins, _ = s.drain()
    for f in joins:
        answer(s, f, "joined", room=f["room"], last_id=None)
    assert s.drain()[0] == [] and s.resumed()


CID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def test_a_message_whose_ack_was_lost_is_found_in_history_by_its_cid_not_sent_twice():
    s = Session("alice", ["r"], backlog=0)
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=None)
    stored = s.say("stored before the drop")
    lost = s.say("never reached the server")
    sends, _ = s.drain()
    assert [(f["body"], f["cid"]) for f in sends] == [
        (stored.body, stored.cid),
        (lost.body, lost.cid),
    ]
    s.disconnected()  # neither was acked

    offline = s.say("typed while offline")
    assert s.drain() == ([], [Notice("not connected: queued until connected")])
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=1)
    (page,), _ = s.drain()
    assert page["after"] == 0
    answer(s, page, "history", room="r", messages=[msg("r", 1, "alice", "edited", cid=stored.cid)])
    frames, events = s.drain()
    assert Acked(stored.local, "r", 1) in events  # by its cid, whatever the body now says
    # The unconfirmed one was not stored: sent again with its cid, then the queued one.
    assert [(f["type"], f["body"], f["cid"]) for f in frames] == [
        ("send", "never reached the server", sends[1]["cid"]),
        ("send", "typed while offline", offline.cid),
    ]
    assert len({stored.cid, lost.cid, offline.cid}) == 3
    assert all(CID.fullmatch(i.cid) for i in (stored, lost, offline))
    answer(s, frames[0], "ack", room="r", id=2, ts=0, cid=lost.cid)
    assert s.drain()[1] == [Acked(lost.local, "r", 2)]
    assert len(s.outbox.items) == 1


def test_a_resend_is_not_guessed_from_the_body_and_a_duplicate_ack_confirms_it():
    s = live_session("r")
    item = s.say("hello")
    (sent,), _ = s.drain()
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=2)
    (page,), _ = s.drain()
    # Our user and our body, but not our cid (say, typed the same on another
    # device; or a 1.0 send): not this message, which was not stored.
    same = [msg("r", 1, "alice", "hello"), msg("r", 2, "alice", "hello", cid="other")]
    answer(s, page, "history", room="r", messages=same)
    (again,), events = s.drain()
    assert not any(isinstance(e, Acked) for e in events)
    assert (again["type"], again["body"], again["cid"]) == ("send", "hello", sent["cid"])
    # Its first copy was stored after all (its commit raced the reconnect): the
    # server answers with that copy's id, and that is a confirmation like any other.
    answer(s, again, "ack", room="r", id=3, ts=0, cid=item.cid, duplicate=True)
    assert s.drain() == ([], [Acked(item.local, "r", 3)])
    assert s.outbox.items == []


def test_a_late_live_copy_of_our_message_settles_it_by_cid_once():
    s = live_session("r")
    first, second = s.say("one"), s.say("two")
    sent, _ = s.drain()
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=None)  # neither published yet
    (resend_1, resend_2), _ = s.drain()
    assert [f["cid"] for f in (resend_1, resend_2)] == [f["cid"] for f in sent]
    # Their first copies are published now: each is shown, and settles its item...
    s.handle(msg("r", 1, "alice", "one", cid=first.cid))
    assert s.drain()[1][1:] == [Acked(first.local, "r", 1)]
    # ...and the duplicate ack of the resend finds nothing more to settle.
    answer(s, resend_1, "ack", room="r", id=1, ts=0, cid=first.cid, duplicate=True)
    assert s.drain() == ([], [])
    # Someone else's message with our cid (cids are per user) proves nothing.
    s.handle(msg("r", 2, "mallory", "two", cid=second.cid))
    assert [type(e) for e in s.drain()[1]] == [Message]
    answer(s, resend_2, "ack", room="r", id=3, ts=0, cid=second.cid)
    assert s.drain()[1] == [Acked(second.local, "r", 3)]
    assert s.outbox.items == []


def test_sends_wait_for_the_room_to_be_caught_up():
    s = Session("alice", ["r"], backlog=0)
    s.connected()
    (join,), _ = s.drain()
    s.say("early")
    assert s.drain() == ([], [])  # not before the join is answered
    answer(s, join, "joined", room="r", last_id=None)
    (send,), _ = s.drain()
    assert send["type"] == "send" and send["body"] == "early"


def test_refused_join_is_dropped_and_a_failed_catch_up_reconnects():
    s = Session("alice", ["private", "r"], backlog=0)
    s.connected()
    j1, j2 = s.drain()[0]
    answer(s, j1, "error", code="forbidden", message="no")
    assert s.drain()[1] == [Problem("forbidden", "join private: no")]
    assert list(s.rooms) == ["r"] and s.current == "r"
    answer(s, j2, "joined", room="r", last_id=None)
    s.disconnected()
    s.rooms["r"].cursor = 0
    s.connected()
    (join,), _ = s.drain()
    assert join["room"] == "r"  # the refused room is not asked for again
    answer(s, join, "joined", room="r", last_id=4)
    (page,), _ = s.drain()
    answer(s, page, "error", code="unavailable", message="store down")
    events = s.drain()[1]
    assert isinstance(events[-1], Resync)


def test_join_leave_and_older_pages():
    s = Session("alice", [], backlog=2)
    s.say("nowhere")
    assert s.drain()[1] == [Problem("not_member", "join a room first: /join ROOM")]
    s.join("bad name")
    assert s.drain()[1][0].code == "bad_request"
    s.join("r")
    assert s.drain() == ([], [])  # offline: joined on connect
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=10)
    (backlog,), _ = s.drain()
    answer(s, backlog, "history", room="r", messages=[msg("r", 9), msg("r", 10)], more=True)
    s.drain()
    s.older(3)
    (older,), _ = s.drain()
    assert older == {"type": "history", "room": "r", "before": 9, "limit": 3, "ref": older["ref"]}
    answer(s, older, "history", room="r", messages=[msg("r", i) for i in (6, 7, 8)], more=False)
    _, events = s.drain()
    assert shown(events) == [("r", 6), ("r", 7), ("r", 8)]
    assert events[-1] == Notice("no older messages in r")
    s.leave()
    (leave,), _ = s.drain()
    assert leave["type"] == "leave" and s.current is None and not s.rooms
    s.handle(msg("r", 11))  # after leaving: ignored
    answer(s, leave, "left", room="r")
    assert s.drain() == ([], [Notice("left r")])


def test_kicked_room_is_not_rejoined():
    s = Session("alice", ["r", "s"], backlog=0)
    s.connected()
    for f in s.drain()[0]:
        answer(s, f, "joined", room=f["room"], last_id=None)
    s.drain()
    s.handle({"type": "kicked", "room": "r", "reason": "kicked"})
    assert s.drain()[1] == [Problem("kicked", "removed from r (kicked)")]
    s.disconnected()
    s.connected()
    assert [f["room"] for f in s.drain()[0]] == ["s"]


def test_backoff_grows_with_jitter_to_a_cap_and_resets():
    b = Backoff(base=0.5, cap=8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    b.reset()
    assert b.next_delay() <= 0.5


def test_token_bucket_lets_a_burst_through_then_paces():
    bucket = TokenBucket(rate=10, burst=3)
    for _ in range(3):
        assert bucket.delay(100.0) == 0
        bucket.take(100.0)
    assert bucket.delay(100.0) == pytest.approx(0.1)
    assert bucket.delay(100.1) == pytest.approx(0)


def test_helpers():
    assert printable("plain text ✓") == "plain text ✓"
    assert printable("\x1b[2Jgone\nline") == "\\x1b[2Jgone\\nline"
    assert printable("abc\u202edcb") == "abc\\u202edcb"
    assert format_message(Message("r", 4, "bob", "hi\tthere", 0)) == "[r] #4 bob: hi\\tthere"
    assert close_verdict(1001, "server shutting down") is None
    assert close_verdict(1006, "connection was closed uncleanly (peer dropped)") is None
    assert close_verdict(4001, "token expired") is not None
    reason = "connection was closed uncleanly (WebSocket connection upgrade failed [401]: x)"
    assert "401" in close_verdict(1006, reason)
    assert close_verdict(1006, reason.replace("401", "429")) is None
    assert with_credentials("ws://h:1/ws", "al ice", None) == "ws://h:1/ws?user=al+ice"
    assert with_credentials("wss://h/ws?x=1&user=z", None, "t.k.n") == "wss://h/ws?x=1&token=t.k.n"
    with pytest.raises(ValueError):
        with_credentials("http://h/ws", "a", None)
    assert parse_line("hello") == ("say", "hello")
    assert parse_line("//not a command") == ("say", "/not a command")
    assert parse_line("/join  lobby ") == ("join", "lobby")
    assert parse_line("/QUIT") == ("quit", "")


class EdgeRandom(random.Random):
    """A "random" that always picks one end of the range, and records what it was asked."""

    def __init__(self, upper: bool) -> None:
        super().__init__(0)
        self.upper = upper
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return b if self.upper else a


def test_backoff_doubles_from_the_base_to_the_cap_and_jitters_over_the_upper_half():
    top = Backoff(base=0.5, cap=8.0, rng=EdgeRandom(upper=True))
    assert [top.next_delay() for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    bottom_rng = EdgeRandom(upper=False)
    bottom = Backoff(base=0.5, cap=8.0, rng=bottom_rng)
    assert [bottom.next_delay() for _ in range(7)] == [0.25, 0.5, 1, 2, 4, 4, 4]
    assert bottom_rng.asked == [(c / 2, c) for c in (0.5, 1, 2, 4, 8, 8, 8)]
    bottom.reset()
    assert bottom.attempt == 0 and bottom.next_delay() == 0.25


def test_backoff_defaults_and_a_client_offline_for_a_very_long_time():
    b = Backoff(rng=EdgeRandom(upper=True))
    assert [b.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    for _ in range(5000):  # days of retries: the exponent must not overflow
        assert b.next_delay() == 30


def test_token_bucket_refills_at_its_rate_and_never_beyond_its_burst():
    bucket = TokenBucket(rate=10, burst=3)
    assert bucket.delay(1e9) == 0  # full at first use, whatever the clock reads
    for _ in range(3):
        bucket.take(1e9)
    assert bucket.delay(1e9 + 0.05) == pytest.approx(0.05)  # half a token so far
    assert bucket.delay(1e9 + 0.1) == pytest.approx(0)
    bucket.take(1e9 + 0.1)
    assert bucket.delay(1e9 + 0.1) == pytest.approx(0.1)
    # A long idle time refills only up to the burst: 3 frames at once, then paced.
    later = 1e9 + 100
    for _ in range(3):
        assert bucket.delay(later) == 0
        bucket.take(later)
    assert bucket.delay(later) == pytest.approx(0.1)


def test_room_state_shows_each_id_once_and_only_the_stream_moves_the_cursor():
    state = RoomState("r")
    m = [Message("r", i, "bob", f"m{i}", 0) for i in range(10)]
    assert state.accept(m[5], stream=False)  # a backlog page
    assert (state.cursor, state.oldest) == (None, 5)
    assert not state.accept(m[5])  # its live copy, late: not shown again...
    assert state.cursor == 5  # ...but the stream has reached it
    assert state.accept(m[3], stream=False) and state.oldest == 3 and state.cursor == 5
    assert state.accept(m[7]) and state.cursor == 7
    assert not state.accept(m[7]) and not state.accept(m[3], stream=False)
    assert state.seen == {3, 5, 7}


def live_session(*rooms: str, **options) -> Session:
    """A session whose rooms are joined (empty) and live; ``options`` for ``Session``."""
    s = Session("alice", rooms, backlog=0, **options)
    s.connected()
    for f in s.drain()[0]:
        answer(s, f, "joined", room=f["room"], last_id=None)
    s.drain()
    return s


def test_duplicates_are_dropped_by_room_and_id():
    s = live_session("a", "b")
    s.handle(msg("a", 1))
    s.handle(msg("b", 1))  # same id, another room: another message
    s.handle(msg("a", 1))  # the same message again
    s.handle(msg("a", 2))
    assert shown(s.drain()[1]) == [("a", 1), ("b", 1), ("a", 2)]
    assert s.rooms["a"].seen == {1, 2} and s.rooms["b"].seen == {1}


def test_live_messages_held_during_a_catch_up_are_shown_after_it_in_id_order():
    s = live_session("r")
    s.handle(msg("r", 1))
    s.drain()
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=4)
    (page,), _ = s.drain()
    s.older(2)  # asked during the catch-up: sent once the room is live
    s.handle(msg("r", 6))  # live, out of order, and newer than the catch-up
    s.handle(msg("r", 5))
    assert s.drain() == ([], [])
    answer(s, page, "history", room="r", messages=[msg("r", i) for i in (2, 3, 4)])
    (older,), events = s.drain()
    assert shown(events) == [("r", 2), ("r", 3), ("r", 4), ("r", 5), ("r", 6)]
    assert older == {"type": "history", "room": "r", "before": 1, "limit": 2, "ref": older["ref"]}


def test_messages_held_when_the_connection_drops_are_fetched_again_not_kept():
    s = live_session("r")
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=3)
    s.drain()
    s.handle(msg("r", 4))  # held: the catch-up is still on its way
    s.disconnected()
    assert s.rooms["r"].held == []
    s.handle(msg("r", 5))  # offline (a late frame of the old connection): ignored
    assert s.drain() == ([], [])
    assert s.rooms["r"].cursor == 0


def test_pending_sends_that_can_no_longer_go_are_reported():
    s = live_session("a", "b")
    s.current = "a"
    s.say("y" * 80)
    (send,), _ = s.drain()
    answer(s, send, "error", code="too_large", message="body too long")
    assert s.drain()[1] == [Problem("too_large", f"body too long (not sent: {'y' * 57}...)")]
    assert s.outbox.items == []
    s.disconnected()
    s.say("to a", room="a")
    s.say("to b", room="b")
    s.drain()
    s.leave("a")
    frames, events = s.drain()
    assert frames == []
    assert events == [
        Problem("not_sent", "left a before this was sent: to a"),
        Notice("left a"),
    ]
    assert [i.body for i in s.outbox.items] == ["to b"] and s.current == "b"


def test_a_busy_server_refusing_a_join_keeps_the_room_and_resyncs():
    s = Session("alice", ["r"], backlog=0)
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "error", code="rate_limited", message="slow down")
    events = s.drain()[1]
    assert events == [Resync("join r: rate_limited"), Problem("rate_limited", "join r: slow down")]
    assert list(s.rooms) == ["r"]  # joined again after the reconnect


def test_the_session_layer_imports_no_io():
    code = (
        "import sys, chatserver.client.session, chatserver.client.outbox;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'twisted', 'autobahn', 'zope'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_entry_point_and_python_dash_m():
    from chatserver.client import main

    with pytest.raises(SystemExit) as exited:
        main(["ws://h/ws"])  # no --user nor --token
    assert exited.value.code == 2
    out = subprocess.run(
        [sys.executable, "-m", "chatserver.client", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("usage: chatserver-client ")


def test_edit_and_delete_go_to_the_current_room_and_their_answers_settle_them():
    s = live_session("r")
    edit = s.edit(3, "fixed")
    delete = s.delete(4)
    (e, d), _ = s.drain()
    assert e == {
        "type": "edit",
        "room": "r",
        "id": 3,
        "body": "fixed",
        "cid": edit.cid,
        "ref": e["ref"],
    }
    assert d == {"type": "delete", "room": "r", "id": 4, "ref": d["ref"]}  # no cid
    assert CID.fullmatch(edit.cid) and delete.cid is None
    answer(s, e, "ack", room="r", id=5, ts=0, cid=edit.cid)
    answer(s, d, "ack", room="r", id=6, ts=0)
    assert s.drain() == ([], [Acked(edit.local, "r", 5), Acked(delete.local, "r", 6)])
    # Refusals print like any error frame, with what was not done.
    s.edit(1, "not mine")
    s.delete(2)
    (e, d), _ = s.drain()
    answer(s, e, "error", code="forbidden", message="only its author may edit message 1")
    answer(s, d, "error", code="not_found", message="no message 2 in r")
    assert s.drain()[1] == [
        Problem("forbidden", "only its author may edit message 1 (not sent: edit of #1: not mine)"),
        Problem("not_found", "no message 2 in r (not sent: delete of #2)"),
    ]
    assert s.outbox.items == []
    s.leave()
    s.drain()
    assert s.edit(1, "x") is None and s.delete(1) is None
    assert s.drain()[1] == [Problem("not_member", "join a room first: /join ROOM")] * 2


def test_edits_and_deletes_whose_acks_were_lost_are_found_or_sent_again():
    s = live_session("r")
    found_edit, lost_edit = s.edit(1, "found"), s.edit(1, "lost")
    found_delete, lost_delete = s.delete(2), s.delete(3)
    first_copies, _ = s.drain()
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=7)
    (page,), _ = s.drain()
    events = [
        msg("r", 5, "alice", "found", cid=found_edit.cid, edits=1),
        msg("r", 6, "alice", "", deletes=2),  # a delete event has no cid: ours by what it deletes
        msg("r", 7, "mod", "", deletes=3),  # the admin API's, not ours
    ]
    answer(s, page, "history", room="r", messages=events)
    frames, got = s.drain()
    assert [e for e in got if isinstance(e, Acked)] == [
        Acked(found_edit.local, "r", 5),
        Acked(found_delete.local, "r", 6),
    ]
    assert [(f["type"], f["id"], f.get("cid")) for f in frames] == [
        ("edit", 1, first_copies[1]["cid"]),
        ("delete", 3, None),
    ]
    # A delete sent again finds its message gone (deleted by its first copy, or by
    # someone else): done, not an error.
    answer(s, frames[1], "error", code="not_found", message="no message 3 in r")
    answer(s, frames[0], "ack", room="r", id=8, ts=0, cid=lost_edit.cid, duplicate=True)
    assert s.drain() == ([], [Acked(lost_edit.local, "r", 8)])
    assert s.outbox.items == [] and lost_delete.retried


def test_edit_and_delete_events_count_as_seen_when_resuming():
    s = live_session("r")
    s.handle(msg("r", 1))
    s.handle(msg("r", 2, body="fixed", edits=1, cid="e1"))
    s.handle(msg("r", 3, body="", deletes=1))
    _, events = s.drain()
    assert [(e.id, e.edits, e.deletes) for e in events] == [
        (1, None, None),
        (2, 1, None),
        (3, None, 1),
    ]
    assert s.rooms["r"].cursor == 3
    s.handle(msg("r", 3, body="", deletes=1))  # a repeat of an event: once, as a message
    assert s.drain() == ([], [])
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=5)
    (page,), _ = s.drain()
    assert page["after"] == 3  # not 1: the events were seen
    answer(s, page, "history", room="r", messages=[msg("r", 4), msg("r", 5, body="x", edits=4)])
    assert shown(s.drain()[1]) == [("r", 4), ("r", 5)]
    assert s.rooms["r"].cursor == 5


def test_message_from_frame_reads_the_1_1_fields_and_drops_malformed_ones():
    plain = Message.from_frame(msg("r", 1))
    assert (plain.cid, plain.edits, plain.deletes, plain.edited, plain.deleted) == (
        None,
        None,
        None,
        None,
        False,
    )
    full = Message.from_frame(msg("r", 2, cid="c", edits=1, edited=5, deleted=True))
    assert (full.cid, full.edits, full.edited, full.deleted) == ("c", 1, 5, True)
    odd = Message.from_frame(msg("r", 3, cid=7, edits=True, deletes="1", edited=None, deleted=1))
    assert (odd.cid, odd.edits, odd.deletes, odd.edited, odd.deleted) == (
        None,
        None,
        None,
        None,
        False,
    )


def test_format_of_events_and_of_edited_and_deleted_messages():
    def line(**fields) -> str:
        return format_message(Message.from_frame(msg("r", 9, "bob", **fields)))

    assert (
        line(body="new\x1b[2J text", edits=4, cid="c") == "[r] #9 bob edited #4: new\\x1b[2J text"
    )
    assert line(body="", deletes=4) == "[r] #9 bob deleted #4"
    assert line(body="", edits=4) == "[r] #9 bob edited #4: (deleted)"  # erased with its message
    assert (
        line(body="latest\u202e", edited=1_795_000_000_123) == "[r] #9 bob: latest\\u202e (edited)"
    )
    assert line(body="", edited=1_795_000_000_123, deleted=True) == "[r] #9 bob: (deleted)"
    assert line(body="plain", cid="c") == "[r] #9 bob: plain"


class FakeLink:
    """Stands for the WebSocket: records what the client would send."""

    is_open = True

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, frames: list[dict]) -> None:
        self.sent.extend(frames)


def test_edit_and_delete_commands_refuse_bad_usage_and_send_nothing():
    from chatserver.client.terminal import Client, message_id

    out: list[str] = []
    err: list[str] = []
    client = Client(None, "ws://h/ws", live_session("r"), out.append, err.append)
    client.link = link = FakeLink()
    bad = ["/edit", "/edit 3", "/edit x text", "/edit 0 text", "/edit -1 text", "/edit 1.5 t"]
    bad += [
        "/delete",
        "/delete x",
        "/delete 3 4",
        "/delete \uff13",
        f"/delete {2**63}",
        "/DELETE #",
    ]
    for line in bad:
        client.line(line)
    assert link.sent == [] and client.session.outbox.items == []
    assert err == [f"! usage: {USAGE['edit']}"] * 6 + [f"! usage: {USAGE['delete']}"] * 6
    assert out == []
    client.line("/edit #3   new  text ")
    client.line("/Delete 12")
    assert [(f["type"], f["room"], f["id"], f.get("body")) for f in link.sent] == [
        ("edit", "r", 3, "new  text"),
        ("delete", "r", 12, None),
    ]
    assert message_id("#12") == message_id("12") == 12
    assert message_id("+12") is message_id("1_2") is message_id("#") is None


# --- read markers and typing (protocol 1.1), on a fake clock -----------------------


class FakeClock:
    """The session's clock, moved by the test (in steps exact in binary, so that a due
    time is reached exactly)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def reads(frames: list[dict]) -> list[tuple[str, int]]:
    return [(f["room"], f["id"]) for f in frames if f["type"] == "read"]


def test_what_is_shown_is_marked_read_once_per_interval_with_the_newest_id():
    clock = FakeClock()
    s = Session("alice", ["r"], backlog=3, clock=clock)
    s.connected()
    (join,), _ = s.drain()
    assert s.read_delay() is None  # not joined yet
    answer(s, join, "joined", room="r", last_id=5, last_read=1, unread=4)
    (backlog,), events = s.drain()
    assert events == [Notice("joined r"), Notice("[r] 4 unread")]
    assert s.read_delay() is None  # nothing shown yet
    answer(s, backlog, "history", room="r", messages=[msg("r", i) for i in (3, 4, 5)], more=True)
    assert s.drain()[0] == []  # markers go only when the driver asks
    assert s.read_delay() == 0
    assert s.send_reads() == 1
    (read,), _ = s.drain()
    assert read == {"type": "read", "room": "r", "id": 5, "ref": read["ref"]}

    # A burst within the interval: nothing until it is over, then one marker, the newest.
    for i in range(6, 16):
        s.handle(msg("r", i))
        clock.advance(0.0625)
        assert s.send_reads() == 0
    assert shown(s.drain()[1]) == [("r", i) for i in range(6, 16)]
    assert s.read_delay() == READ_INTERVAL - 0.625
    clock.advance(0.375)
    assert s.read_delay() == 0 and s.send_reads() == 1
    frames, _ = s.drain()
    assert reads(frames) == [("r", 15)]
    answer(s, read, "read", room="r", id=5)  # the server's answers print nothing
    answer(s, frames[0], "read", room="r", id=15)
    assert s.drain() == ([], [])
    assert s.read_delay() is None and s.send_reads(force=True) == 0  # nothing new shown
    # Our own messages count as shown too: the marker is a position, not a count.
    s.handle(msg("r", 16, "alice"))
    clock.advance(READ_INTERVAL)
    s.send_reads()
    assert reads(s.drain()[0]) == [("r", 16)]


def test_read_markers_from_the_server_keep_the_highest_and_print_nothing():
    clock = FakeClock()
    s = live_session("r", clock=clock)
    for i in (1, 2, 3):
        s.handle(msg("r", i))
    s.drain()
    s.handle({"type": "read", "room": "r", "id": 10})  # read on another device, further
    s.handle({"type": "read", "room": "r", "id": 2})  # an older one, late: kept the highest
    for odd in (
        {"type": "read", "room": "r", "id": True},
        {"type": "read", "room": "r", "id": "11"},
        {"type": "read", "room": ["r"], "id": 11},
        {"type": "read", "room": "elsewhere", "id": 11},
        {"type": "read"},
    ):
        s.handle(odd)
    assert s.drain() == ([], [])
    assert s.rooms["r"].read == 10
    assert s.read_delay() is None  # what we showed is read already
    s.handle(msg("r", 11))
    assert s.send_reads() == 1
    assert reads(s.drain()[0]) == [("r", 11)]
    # A join answered from before the marker moved (it crossed the read frame)
    # does not take it back: the server's marker only grows.
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    s.handle({"type": "read", "room": "r", "id": 11})
    answer(s, join, "joined", room="r", last_id=11, last_read=4, unread=0)
    assert s.rooms["r"].read == 11 and s.read_delay() is None


def test_history_scroll_back_is_not_marked_read():
    s = Session("alice", ["r"], backlog=0, clock=FakeClock())
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=10, last_read=None, unread=10)
    assert s.drain()[1] == [Notice("joined r"), Notice("[r] 10 unread")]
    s.older(5)
    (older,), _ = s.drain()
    answer(s, older, "history", room="r", messages=[msg("r", i) for i in range(6, 11)], more=True)
    assert shown(s.drain()[1]) == [("r", i) for i in range(6, 11)]
    assert s.read_delay() is None and s.send_reads(force=True) == 0


def test_a_marker_lost_with_the_connection_is_sent_again_after_the_rejoin():
    clock = FakeClock()
    s = live_session("r", clock=clock)
    s.handle(msg("r", 1))
    s.send_reads()
    assert reads(s.drain()[0]) == [("r", 1)]
    s.handle(msg("r", 2))
    s.disconnected()  # the marker for 1 was not answered, 2 was not marked
    clock.advance(5)
    assert s.read_delay() is None  # offline
    s.connected()
    (join,), _ = s.drain()
    assert s.read_delay() is None  # not joined yet: the server would refuse it
    answer(s, join, "joined", room="r", last_id=3, last_read=None, unread=3)
    (page,), events = s.drain()
    assert events == [Notice("joined r"), Notice("[r] 3 unread")]
    assert s.read_delay() == 0  # the server has no marker, and 2 was shown
    answer(s, page, "history", room="r", messages=[msg("r", 3)])
    s.send_reads()
    assert reads(s.drain()[0]) == [("r", 3)]
    # Reconnected again: the server has it now, so nothing is sent.
    s.disconnected()
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=3, last_read=3, unread=0)
    assert s.drain() == ([], [Notice("joined r")])
    clock.advance(5)
    assert s.read_delay() is None


def test_read_errors_print_nothing_and_only_passing_ones_are_retried():
    clock = FakeClock()
    s = live_session("a", "b", clock=clock)
    s.handle(msg("a", 1))
    s.handle(msg("b", 1))
    s.send_reads()
    (read_a, read_b), _ = s.drain()
    answer(s, read_a, "error", code="unavailable", message="read marker not stored; try again")
    answer(s, read_b, "error", code="not_member", message="not in b")
    assert s.drain() == ([], [])
    clock.advance(READ_INTERVAL)
    s.send_reads()
    assert reads(s.drain()[0]) == [("a", 1)]  # b's would only be refused again


def test_read_markers_take_only_the_budget_given_the_longest_waiting_first():
    clock = FakeClock()
    s = live_session("a", "b", "c", clock=clock)
    for room in "abc":
        s.handle(msg(room, 1))
    assert s.send_reads(-3) == 0 and s.send_reads(0) == 0
    assert s.send_reads(2) == 2
    assert reads(s.drain()[0]) == [("a", 1), ("b", 1)]
    assert s.read_delay() == 0  # c is still due
    clock.advance(0.25)
    assert s.send_reads(2) == 1
    assert reads(s.drain()[0]) == [("c", 1)]
    for room in "cba":
        s.handle(msg(room, 2))
    clock.advance(2 * READ_INTERVAL)
    s.send_reads(1)
    s.send_reads(1)
    s.send_reads(1)
    assert reads(s.drain()[0]) == [("a", 2), ("b", 2), ("c", 2)]
    # At the end (the program quits), the interval does not hold the last ones back.
    s.handle(msg("a", 3))
    assert s.send_reads() == 0 and s.send_reads(force=True) == 1
    assert reads(s.drain()[0]) == [("a", 3)]


def test_a_session_that_shows_nothing_marks_nothing_read():
    s = live_session("r", clock=FakeClock(), mark_read=False)
    s.handle(msg("r", 1))
    assert s.read_delay() is None and s.send_reads(force=True) == 0


def test_unread_is_a_status_line_only_when_there_is_some():
    s = Session("alice", ["a", "b", "c", "d"], backlog=0)
    s.connected()
    joins, _ = s.drain()
    for f, unread in zip(joins, (0, None, True, 7), strict=True):
        answer(s, f, "joined", room=f["room"], last_id=None, last_read=None, unread=unread)
    assert s.drain()[1] == [
        Notice("joined a"),
        Notice("joined b"),
        Notice("joined c"),
        Notice("joined d"),
        Notice("[d] 7 unread"),
    ]


def test_typing_is_shown_once_per_user_and_room_per_interval_never_for_our_own_user():
    clock = FakeClock()
    s = live_session("r", "s", clock=clock)

    def typing(room, user) -> list:
        s.handle({"type": "typing", "room": room, "user": user})
        frames, events = s.drain()
        assert frames == []  # never answered
        return events

    assert typing("r", "bob") == [Notice("[r] bob is typing")]
    assert typing("r", "bob") == []
    assert typing("r", "carol") == [Notice("[r] carol is typing")]
    assert typing("s", "bob") == [Notice("[s] bob is typing")]
    for room, user in [("r", "alice"), ("x", "bob"), ("r", "bad name"), ("r", None), (["r"], "b")]:
        assert typing(room, user) == []
    clock.advance(4.5)
    assert typing("r", "bob") == []
    clock.advance(0.5)
    assert typing("r", "bob") == [Notice("[r] bob is typing")]
    clock.advance(-3600)  # the wall clock was set back: not silenced for an hour
    assert typing("r", "carol") == [Notice("[r] carol is typing")]


def test_the_typing_throttle_forgets_keys_past_their_interval():
    throttle = Throttle(5.0, tracked_max=4)
    for i in range(100):
        assert throttle.allow(("r", f"u{i}"), float(i))
        assert len(throttle._last) <= 8
    assert not throttle.allow(("r", "u99"), 100.0)


# --- presence (protocol 1.1) ------------------------------------------------------


def presence(room: str, user: str, online: bool) -> dict:
    return {"type": "presence", "room": room, "user": user, "online": online}


def present_session(*rooms: str, online=("alice", "bob")) -> Session:
    """A live session whose joins said ``online`` is who is online in each room."""
    s = Session("alice", rooms, backlog=0)
    s.connected()
    for f in s.drain()[0]:
        answer(
            s,
            f,
            "joined",
            room=f["room"],
            last_id=None,
            online=list(online),
            online_count=len(online),
        )
    s.drain()
    return s


def test_every_join_asks_for_presence_and_says_how_many_are_online():
    s = Session("alice", ["r", "s", "t"], backlog=0)
    s.connected()
    joins, _ = s.drain()
    assert [f["presence"] for f in joins] == [True, True, True]
    r, rs, t = joins
    answer(
        s, r, "joined", room="r", last_id=None, unread=2, online=["bob", "alice"], online_count=2
    )
    answer(s, rs, "joined", room="s", last_id=None, online=None, online_count=None)
    answer(s, t, "joined", room="t", last_id=None)  # a server without presence
    assert s.drain() == (
        [],
        [
            Notice("joined r"),
            Notice("[r] 2 unread"),
            Notice("[r] 2 online"),
            Notice("joined s"),  # its presence state unavailable: nothing said
            Notice("joined t"),
        ],
    )
    assert (s.rooms["r"].online, s.rooms["r"].online_count) == ({"alice", "bob"}, 2)
    assert (s.rooms["s"].online, s.rooms["t"].online_count) == (None, None)
    s.join("u")
    (join,), _ = s.drain()
    assert join == {"type": "join", "room": "u", "presence": True, "ref": join["ref"]}
    # After a reconnect too; what was known is forgotten until the rejoin says.
    s.disconnected()
    assert s.rooms["r"].online is None and s.rooms["r"].online_count is None
    s.connected()
    joins, _ = s.drain()
    assert [(f["room"], f["presence"]) for f in joins] == [(room, True) for room in "rstu"]
    answer(s, joins[0], "joined", room="r", last_id=None, online=["alice"], online_count=1)
    assert s.drain()[1] == [Notice("joined r"), Notice("[r] 1 online")]
    # A front end that shows nothing (--send) does not ask.
    quiet = Session("alice", ["r"], presence=False)
    quiet.connected()
    (join,), _ = quiet.drain()
    assert "presence" not in join


def test_presence_changes_print_for_the_current_room_only_and_never_for_our_user():
    s = present_session("r", "s")
    assert s.current == "r"

    def told(*frames: dict) -> list:
        for frame in frames:
            s.handle(frame)
        sent, events = s.drain()
        assert sent == []  # never answered
        return events

    assert told(presence("r", "carol", True)) == [Notice("[r] carol is online")]
    assert told(presence("r", "carol", True)) == []  # known already: not twice
    assert (s.rooms["r"].online, s.rooms["r"].online_count) == ({"alice", "bob", "carol"}, 3)
    assert told(presence("r", "bob", False)) == [Notice("[r] bob went offline")]
    assert told(presence("r", "dave", False)) == []  # not online as far as we know
    assert s.rooms["r"].online_count == 2
    # Another room: kept, not printed.
    assert told(presence("s", "carol", True), presence("s", "bob", False)) == []
    assert (s.rooms["s"].online, s.rooms["s"].online_count) == ({"alice", "carol"}, 2)
    # Our own user: never printed, and we stay online where we are.
    assert told(presence("r", "alice", False), presence("s", "alice", True)) == []
    assert "alice" in s.rooms["r"].online and s.rooms["s"].online_count == 2
    # Nonsense is ignored.
    odd = [
        presence("r", "bad name", True),
        {"type": "presence", "room": "r", "online": True},
        {"type": "presence", "room": "r", "user": 7, "online": False},
        {"type": "presence", "room": "r", "user": "erin", "online": "yes"},
        presence("elsewhere", "erin", True),
        {"type": "presence", "room": ["r"], "user": "erin", "online": True},
        {"type": "presence"},
    ]
    assert told(*odd) == []
    assert s.rooms["r"].online == {"alice", "carol"}
    s.join("s")  # now the current room
    assert told(presence("s", "carol", False)) == [
        Notice("now in s"),
        Notice("[s] carol went offline"),
    ]
    assert told(presence("r", "carol", False)) == []


def test_a_presence_list_replaces_what_was_known_without_a_word():
    s = present_session("r")
    burst = {
        "type": "presence",
        "room": "r",
        "online": ["alice", "carol", "dave"],
        "online_count": 3,
    }
    s.handle(burst)
    assert s.drain() == ([], [])
    assert (s.rooms["r"].online, s.rooms["r"].online_count) == ({"alice", "carol", "dave"}, 3)
    s.handle(presence("r", "bob", False))  # gone by the list already
    s.handle(presence("r", "carol", True))  # in it already
    s.handle(presence("r", "dave", False))
    assert s.drain()[1] == [Notice("[r] dave went offline")]
    # A list cut short (presence_list_max): those not listed may still go offline.
    s.handle(
        {"type": "presence", "room": "r", "online": ["alice", "bad name", 3], "online_count": 5}
    )
    assert s.drain() == ([], [])
    assert (s.rooms["r"].online, s.rooms["r"].online_count) == ({"alice"}, 5)
    s.handle(presence("r", "erin", False))
    s.handle(presence("r", "fred", True))
    assert s.drain()[1] == [Notice("[r] erin went offline"), Notice("[r] fred is online")]
    assert (s.rooms["r"].online, s.rooms["r"].online_count) == ({"alice", "fred"}, 5)
    # A count below the names cannot be right; a null list: unknown, so every event is news.
    s.handle({"type": "presence", "room": "r", "online": ["alice", "bob"], "online_count": 1})
    assert s.rooms["r"].online_count == 2
    s.handle({"type": "presence", "room": "r", "online": None, "online_count": None})
    s.handle(presence("r", "bob", True))
    s.handle(presence("r", "bob", True))
    assert s.drain() == ([], [Notice("[r] bob is online")] * 2)
    assert s.rooms["r"].online is None and s.rooms["r"].online_count is None


def test_who_asks_the_server_and_prints_its_answer():
    s = present_session("r", "s")
    s.who()
    (ask,), events = s.drain()
    assert ask == {"type": "presence", "room": "r", "ref": ask["ref"]} and events == []
    answer(s, ask, "presence", room="r", online=["carol", "alice", "bob"], online_count=3)
    assert s.drain() == ([], [Notice("[r] 3 online: alice, bob, carol")])
    assert s.rooms["r"].online == {"alice", "bob", "carol"}
    s.who()
    (ask,), _ = s.drain()
    answer(s, ask, "presence", room="r", online=["bob"], online_count=3)
    assert s.drain()[1] == [Notice("[r] 3 online: bob, and 2 more")]
    s.who()
    (ask,), _ = s.drain()
    answer(s, ask, "presence", room="r", online=[], online_count=4)  # presence_list_max = 0
    assert s.drain()[1] == [Notice("[r] 4 online")]
    s.who()
    (ask,), _ = s.drain()
    answer(s, ask, "error", code="unavailable", message="presence is unavailable; try again")
    assert s.drain()[1] == [Problem("unavailable", "who r: presence is unavailable; try again")]
    # The answer for a room left meanwhile says nothing.
    s.who()
    (ask,), _ = s.drain()
    s.leave("r")
    s.drain()
    answer(s, ask, "presence", room="r", online=["alice"], online_count=1)
    assert s.drain() == ([], [])
    s.leave("s")
    s.drain()
    s.who()
    assert s.drain() == ([], [Problem("not_member", "join a room first: /join ROOM")])


def test_who_before_the_room_is_joined_is_asked_once_it_is():
    s = present_session("r")
    s.who()
    s.drain()
    s.disconnected()  # that one was not answered: asked again after the rejoin
    s.who()  # nor this one, typed offline: the same question, asked once
    assert s.drain() == ([], [Notice("not connected: /who answered once connected")])
    s.connected()
    (join,), _ = s.drain()
    s.who()  # joining: waits too
    assert s.drain() == ([], [])
    answer(s, join, "joined", room="r", last_id=None, online=["alice"], online_count=1)
    (ask,), events = s.drain()
    assert ask == {"type": "presence", "room": "r", "ref": ask["ref"]}
    assert events == [Notice("joined r"), Notice("[r] 1 online")]
    answer(s, ask, "presence", room="r", online=["alice", "bob"], online_count=2)
    assert s.drain() == ([], [Notice("[r] 2 online: alice, bob")])


def test_who_command_sends_a_presence_request_and_refuses_an_argument():
    from chatserver.client.terminal import HELP, Client

    out: list[str] = []
    err: list[str] = []
    client = Client(None, "ws://h/ws", present_session("r"), out.append, err.append)
    client.link = link = FakeLink()
    client.line("/who everyone")
    assert link.sent == [] and err == [f"! usage: {HELP}"]
    client.line("/WHO")
    assert [(f["type"], f["room"]) for f in link.sent] == [("presence", "r")]
    client.received(
        {
            "type": "presence",
            "ref": link.sent[0]["ref"],
            "room": "r",
            "online": ["bob", "alice"],
            "online_count": 2,
        }
    )
    client.received(presence("r", "carol", True))
    assert out == ["* [r] 2 online: alice, bob", "* [r] carol is online"]
    assert "/who" in HELP


class PacedProto:
    """Stands for the open WebSocket under a real ``Link``: records what it sends."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def sendMessage(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))


def test_the_client_sends_read_markers_only_within_the_pacing_s_spare_room():
    """Thirty rooms with news at once: the markers go as the bucket has room beyond
    a reserve, so the frames the user sends meanwhile never wait behind them."""
    from chatserver.client.terminal import READ_RESERVE, Client

    clock = task.Clock()
    clock.advance(1000)
    rooms = [f"r{i}" for i in range(30)]
    out: list[str] = []
    session = Session("alice", rooms, backlog=0, clock=clock.seconds)
    client = Client(clock, "ws://h/ws?user=alice", session, out.append, out.append)
    proto = PacedProto()
    client.link.opened(proto)
    assert len(proto.sent) == client.link.bucket.burst  # the rest of the joins is paced
    clock.pump([0.125] * 24)  # the joins, then the bucket fills up again
    for frame in list(proto.sent):
        client.received({"type": "joined", "ref": frame["ref"], "room": frame["room"]})
    for room in rooms:
        client.received(msg(room, 1))
    assert sum(line.endswith(": m1") for line in out) == 30
    proto.sent.clear()
    clock.advance(0)  # the markers' timer (all due now)
    burst = client.link.bucket.burst
    assert len(reads(proto.sent)) == burst - READ_RESERVE
    client.line("hello")  # goes at once: the reserve
    assert proto.sent[-1]["type"] == "send"
    for _ in range(5):
        assert not client.link._queue  # nothing ever waits behind a marker
        clock.advance(READ_INTERVAL)
    assert sorted(reads(proto.sent)) == sorted((room, 1) for room in rooms)
    assert session.read_delay() is None and not clock.getDelayedCalls()


# --- the real program against real servers ----------------------------------------


async def message_with(client, body: str) -> dict:
    """The next ``message`` frame with this body (other frames are skipped)."""
    while True:
        got = await client.recv()
        if got["type"] == "message" and got["body"] == body:
            return got


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


@ensure
async def test_send_mode_prints_the_id_and_the_message_is_stored(server):
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "lobby", "--send", "héllo")
    assert await proc.wait_ended() == 0, proc.transcript()
    assert proc.lines == ["1"]
    bob = await connect(server.port, "bob")
    await bob.join("lobby")
    page = await bob.request({"type": "history", "room": "lobby"})
    assert [(m["id"], m["user"], m["body"]) for m in page["messages"]] == [(1, "alice", "héllo")]


@ensure
async def test_send_mode_reports_an_error_frame_and_exits_1(make_server):
    server = make_server(max_body_chars=10)
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r", "--send", "x" * 11)
    assert await proc.wait_ended() == 1
    assert proc.lines == []
    assert any(line.startswith("! too_large: ") for line in proc.errors), proc.transcript()


@ensure
async def test_token_mode_and_a_refused_token(make_server):
    server = make_server(auth="token", jwt_secret=SECRET)
    good = jwt.encode({"sub": "tina", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    proc = spawn_client(url(server.port), "--token", good, "--room", "r", "--send", "by token")
    assert await proc.wait_ended() == 0, proc.transcript()
    forged = jwt.encode(
        {"sub": "tina", "exp": int(time.time()) + 3600},
        "another-secret-that-is-long-enough-for-it",
        "HS256",
    )
    proc = spawn_client(url(server.port), "--token", forged, "--room", "r", "--send", "no")
    assert await proc.wait_ended() == 1
    assert any("handshake refused: 401" in line for line in proc.errors), proc.transcript()


@ensure
async def test_interactive_session_chats_both_ways_and_joins_and_leaves(server):
    bob = await connect(server.port, "bob")
    await bob.join("lobby")
    await bob.request({"type": "send", "room": "lobby", "body": "before you came"})
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "lobby")
    try:
        await proc.expect(r"^\* joined lobby$")
        await proc.expect(r"^\[lobby\] #1 bob: before you came$")  # the backlog

        await bob.request({"type": "send", "room": "lobby", "body": "live from bob"})
        await proc.expect(r"^\[lobby\] #2 bob: live from bob$")
        proc.type("hello bob")
        got = await message_with(bob, "hello bob")
        assert (got["id"], got["user"]) == (3, "alice")
        await proc.expect(r"^\[lobby\] #3 alice: hello bob$")

        carol = await connect(server.port, "carol")
        await carol.join("side")
        proc.type("/join side")
        await proc.expect(r"^\* joined side$")
        proc.type("in side", "//slash")
        assert (await message_with(carol, "in side"))["user"] == "alice"
        assert (await message_with(carol, "/slash"))["user"] == "alice"
        await proc.expect(r"^\[side\] #2 alice: /slash$")
        proc.type("/leave side")
        await proc.expect(r"^\* left side$")
        await carol.request({"type": "send", "room": "side", "body": "after you left"})
        proc.type("back in the lobby")  # the current room is the lobby again
        await message_with(bob, "back in the lobby")
        await proc.expect(r"^\[lobby\] #4 alice: back in the lobby$")
        proc.type("/nonsense")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
        assert not any("after you left" in line for line in proc.lines)
        assert any(line.startswith("! usage:") for line in proc.errors)
    finally:
        proc.kill()


@ensure
async def test_history_command_pages_back_to_the_start(server):
    bob = await connect(server.port, "bob")
    await bob.join("old")
    for i in range(1, 31):
        await bob.request({"type": "send", "room": "old", "body": f"m{i}"})
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "old", "--backlog", "5")
    try:
        await proc.expect(r"^\[old\] #30 bob: m30$")
        proc.type("/history 10")
        await proc.expect(r"^\[old\] #25 bob: m25$")
        proc.type("/history 100")
        await proc.expect(r"^\* no older messages in old$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0
        ids = [i for i, _, _ in chat_lines(proc.lines, "old")]
        # Printed as asked: the newest 5, then the 10 before, then the rest.
        assert ids == [*range(26, 31), *range(16, 26), *range(1, 16)]
        assert all(body == f"m{i}" for i, _, body in chat_lines(proc.lines, "old"))
    finally:
        proc.kill()


@ensure
async def test_client_resumes_after_a_server_restart_nothing_missing_or_doubled(
    make_server, tmp_path
):
    database_url = f"sqlite:///{tmp_path}/restart.sqlite3"
    server = make_server(database_url=database_url)
    port = server.port
    proc = spawn_client(url(port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* joined r$")
        bob = await connect(port, "bob")
        await bob.join("r")
        await bob.request({"type": "send", "room": "r", "body": "before"})
        await proc.expect(r"^\[r\] #1 bob: before$")

        await server.stopService()
        await proc.expect(r"^\* connection closed \(1001 .*reconnecting in")
        assert await bob.wait_closed() == 1001

        # Nothing listens on the port now. Meanwhile the chat goes on elsewhere,
        # through another server on the same database.
        await talk_elsewhere(make_server, database_url, "r", "away by script")

        # The server comes back on the same port; more is said while the client
        # may or may not be back yet (it must show those once either way).
        make_server(listen=(f"tcp:{port}:interface=127.0.0.1",), database_url=database_url)
        bob = await connect(port, "bob")
        await bob.join("r")
        await bob.request({"type": "send", "room": "r", "body": "after 1"})
        await bob.request({"type": "send", "room": "r", "body": "after 2"})
        await proc.expect(r"^\* connected to ")
        await proc.expect(r"^\[r\] #9 bob: after 2$")
        proc.type("I am back")
        await message_with(bob, "I am back")
        await proc.expect(r"^\[r\] #10 alice: I am back$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()

    printed = chat_lines(proc.lines, "r")
    assert [i for i, _, _ in printed] == list(range(1, 11)), proc.transcript()
    assert [body for _, _, body in printed] == [
        "before",
        *(f"away {i}" for i in range(1, 6)),
        "away by script",
        "after 1",
        "after 2",
        "I am back",
    ]
    assert not any(re.search(r"Traceback|Unhandled", line) for line in proc.errors)


@ensure
async def test_each_message_sent_carries_a_cid_of_its_own(server):
    bob = await connect(server.port, "bob")
    await bob.join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* joined r$")
        proc.type("one", "two")
        got = [await message_with(bob, "one"), await message_with(bob, "two")]
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    script = spawn_client(url(server.port), "--user", "alice", "--room", "r", "--send", "three")
    assert await script.wait_ended() == 0, script.transcript()
    assert script.lines == ["3"]
    got.append(await message_with(bob, "three"))
    cids = [m["cid"] for m in got]
    assert all(CID.fullmatch(c) for c in cids) and len(set(cids)) == 3
    page = await bob.request({"type": "history", "room": "r"})
    assert [m["cid"] for m in page["messages"]] == cids


def cut(server, user: str) -> None:
    """Close ``user``'s connections from the server's side, as a restart would."""
    for session in list(server.chat.users.get(user, [])):
        server.chat.disconnect(session, 1001, "cut by the test")


def watch_appends(server, monkeypatch, user: str, first: Callable) -> list[Deferred]:
    """Every message ``user`` stores goes through the real store; the first one's
    result then passes through ``first`` before the chat core hears of it. Returns
    one Deferred per append, fired with what the store made of it."""
    real = server.store.append
    stored: list[Deferred] = [Deferred() for _ in range(4)]
    count = itertools.count()

    def append(room, who, body, cid=None):
        d = real(room, who, body, cid)
        if who == user:
            n = next(count)

            def seen(message):
                stored[n].callback(message)
                return message

            d.addCallback(seen)
            if n == 0:
                d.addCallback(first)
        return d

    monkeypatch.setattr(server.store, "append", append)
    return stored


@ensure
async def test_a_send_whose_ack_was_lost_is_sent_again_with_its_cid_and_stored_once(
    server, monkeypatch
):
    """The corner a guess from history got wrong: the message is committed, but the
    reconnect's join comes before it is published, so the catch-up cannot show it.
    Sent again with its cid, it is answered with the stored id: one copy."""
    release: Deferred = Deferred()

    async def hold(message):
        await release
        return message

    stored = watch_appends(server, monkeypatch, "alice", lambda m: Deferred.fromCoroutine(hold(m)))
    bob = await connect(server.port, "bob")
    await bob.join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* joined r$")
        proc.type("only once")
        first = await stored[0].addTimeout(10, reactor)  # committed; nobody knows yet
        cut(server, "alice")
        await proc.expect(r"^\* connection closed \(1001 cut by the test\); reconnecting in")
        await proc.expect(r"^\* joined r$")
        again = await stored[1].addTimeout(10, reactor)
        assert (again.id, again.cid, again.duplicate) == (first.id, first.cid, True)
        release.callback(None)  # the first copy is published now, to bob and to alice
        await proc.expect(r"^\[r\] #1 alice: only once$")
        assert (await message_with(bob, "only once"))["cid"] == first.cid
        assert await bob.drain_to_pong() == []
        proc.type("/quit")  # exits 0 only once the duplicate ack has confirmed it
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        if not release.called:
            release.callback(None)
        proc.kill()
    assert not stored[2].called
    page = await bob.request({"type": "history", "room": "r"})
    assert [(m["id"], m["body"], m["cid"]) for m in page["messages"]] == [
        (1, "only once", first.cid)
    ]
    assert [line for line in proc.lines if "only once" in line] == ["[r] #1 alice: only once"]
    assert not any("not sent" in line for line in proc.errors), proc.transcript()


@ensure
async def test_a_send_whose_ack_was_lost_is_found_by_its_cid_and_not_sent_again(
    server, monkeypatch
):
    def lose_the_ack(message):
        cut(server, "alice")  # before the chat core acks it
        return message

    stored = watch_appends(server, monkeypatch, "alice", lose_the_ack)
    bob = await connect(server.port, "bob")
    await bob.join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* joined r$")
        proc.type("ack lost")
        first = await stored[0].addTimeout(10, reactor)
        assert (await message_with(bob, "ack lost"))["cid"] == first.cid
        await proc.expect(r"^\* connection closed \(1001 cut by the test\); reconnecting in")
        await proc.expect(r"^\* joined r$")
        proc.type("next")  # sent after the catch-up, so after any resend
        await message_with(bob, "next")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    second = stored[1].result
    assert (second.body, second.id, second.duplicate) == ("next", 2, False)
    assert not stored[2].called
    assert [line for line in proc.lines if "ack lost" in line] == ["[r] #1 alice: ack lost"]


@ensure
async def test_edit_and_delete_commands_end_to_end(server):
    bob = await connect(server.port, "bob")
    await bob.join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* joined r$")
        proc.type("helo wrold")
        sent = await message_with(bob, "helo wrold")
        await proc.expect(r"^\[r\] #1 alice: helo wrold$")

        proc.type("/edit #1 hello \x1b[1mworld")
        edit = await message_with(bob, "hello \x1b[1mworld")
        assert (edit["id"], edit["user"], edit["edits"]) == (2, "alice", 1)
        assert CID.fullmatch(edit["cid"]) and edit["cid"] != sent["cid"]
        await proc.expect(r"^\[r\] #2 alice edited #1: hello \\x1b\[1mworld$")

        proc.type("/delete 1")
        gone = await bob.expect("message")
        assert (gone["id"], gone["user"], gone["body"], gone["deletes"]) == (3, "alice", "", 1)
        assert "cid" not in gone
        await proc.expect(r"^\[r\] #3 alice deleted #1$")

        await bob.request({"type": "send", "room": "r", "body": "bob's"})
        await proc.expect(r"^\[r\] #4 bob: bob's$")
        proc.type("/edit 4 mine now")
        await proc.expect_error(
            r"^! forbidden: .*edit message 4 \(not sent: edit of #4: mine now\)$"
        )
        proc.type("/delete 4")
        await proc.expect_error(r"^! forbidden: .*delete message 4")
        proc.type("/delete 1")
        await proc.expect_error(r"^! not_found: ")
        proc.type("/edit 3 an event")
        await proc.expect_error(r"^! not_found: ")
        proc.type("/edit 99 not yet")
        await proc.expect_error(r"^! bad_request: ")

        proc.type("/edit 4", "/delete one")
        await proc.expect_error(r"^! usage: /edit ID TEXT")
        await proc.expect_error(r"^! usage: /delete ID")
        proc.type("after all that")  # frames leave in order: nothing went before it
        skipped = []
        while (got := await bob.recv())["body"] != "after all that":
            skipped.append(got["body"])
        assert skipped == ["bob's"] and got["id"] == 5  # no event was stored either
        await proc.expect(r"^\[r\] #5 alice: after all that$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()


@ensure
async def test_history_prints_edited_and_deleted_messages_and_their_events(server):
    bob = await connect(server.port, "bob")
    await bob.join("r")
    for frame in (
        {"type": "send", "room": "r", "body": "frist"},
        {"type": "edit", "room": "r", "id": 1, "body": "first\x07"},
        {"type": "send", "room": "r", "body": "regret"},
        {"type": "edit", "room": "r", "id": 3, "body": "regret more"},
        {"type": "delete", "room": "r", "id": 3},
        {"type": "send", "room": "r", "body": "last"},
    ):
        assert (await bob.request(frame))["type"] == "ack"
    expected = [
        "[r] #1 bob: first\\x07 (edited)",
        "[r] #2 bob edited #1: first\\x07",
        "[r] #3 bob: (deleted)",
        "[r] #4 bob edited #3: (deleted)",  # its text is erased with its message
        "[r] #5 bob deleted #3",
        "[r] #6 bob: last",
    ]
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r", "--backlog", "3")
    try:
        await proc.expect(r"^\[r\] #6 bob: last$")  # the backlog
        proc.type("/history")  # and the older page: the same format
        await proc.expect(r"^\* no older messages in r$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    printed = [line for line in proc.lines if line.startswith("[r] ")]
    assert printed == expected[3:] + expected[:3], proc.transcript()


async def next_read(client) -> int:
    """The id of the next ``read`` frame (messages and the rest are skipped)."""
    while True:
        got = await client.recv()
        if got["type"] == "read":
            assert "ref" not in got, got  # another connection's marker
            return got["id"]


@ensure
async def test_the_client_marks_read_what_it_printed_for_the_users_other_connections(
    make_server,
):
    server = make_server(rate_limit=20.0, rate_burst=40)  # the server's defaults
    bob = await connect(server.port, "bob")
    await bob.join("r")
    for i in (1, 2, 3):
        await bob.request({"type": "send", "room": "r", "body": f"m{i}"})
    elsewhere = await connect(server.port, "alice")  # her other device
    joined = await elsewhere.join("r")
    assert (joined["last_read"], joined["unread"]) == (None, 3)
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* joined r$")
        await proc.expect(r"^\* \[r\] 3 unread$")
        await proc.expect(r"^\[r\] #3 bob: m3$")
        assert await next_read(elsewhere) == 3  # the backlog
        await bob.request({"type": "send", "room": "r", "body": "live"})
        await proc.expect(r"^\[r\] #4 bob: live$")
        assert await next_read(elsewhere) == 4
        fresh = await connect(server.port, "alice")
        joined = await fresh.join("r")
        assert (joined["last_read"], joined["unread"]) == (4, 0)
        # Printed right before /quit (within the interval, likely): marked all the same.
        await bob.request({"type": "send", "room": "r", "body": "last words"})
        await proc.expect(r"^\[r\] #5 bob: last words$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
        assert await next_read(elsewhere) == 5
    finally:
        proc.kill()
    # The server's answers to the markers print nothing, and nothing was refused.
    assert [line for line in proc.lines if "read" in line] == ["* [r] 3 unread"]
    assert proc.errors == [], proc.transcript()


@ensure
async def test_a_burst_of_messages_is_marked_read_in_few_frames_ending_with_the_newest(
    make_server,
):
    server = make_server(rate_limit=20.0, rate_burst=40)
    carol = await connect(server.port, "carol")  # the limit is per connection
    await carol.join("r")
    for i in range(1, 31):
        await carol.request({"type": "send", "room": "r", "body": f"m{i}"})
    bob = await connect(server.port, "bob")
    await bob.join("r")
    elsewhere = await connect(server.port, "alice")
    await elsewhere.join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r", "--backlog", "30")
    try:
        await proc.expect(r"^\[r\] #30 carol: m30$")
        assert await next_read(elsewhere) == 30  # thirty printed, one marker
        for i in range(31, 51):  # one by one: each printed before the next is sent
            bob.send({"type": "send", "room": "r", "body": f"m{i}"})
            await proc.expect(rf"^\[r\] #{i} bob: m{i}$")
        marked = [await next_read(elsewhere)]
        while marked[-1] != 50:
            marked.append(await next_read(elsewhere))
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    # Twenty messages printed apart (a marker each, were they not coalesced).
    assert marked == sorted(set(marked)) and len(marked) < 20, marked
    assert [i for i, _, _ in chat_lines(proc.lines, "r")] == list(range(1, 51))
    assert proc.errors == [], proc.transcript()  # no rate_limited, nor anything else


@ensure
async def test_typing_is_a_status_line_once_per_interval_and_never_for_our_own_user(
    make_server,
):
    server = make_server(typing_interval=0.0)  # relays every one: the client must throttle
    bob = await connect(server.port, "bob")
    carol = await connect(server.port, "carol")
    elsewhere = await connect(server.port, "alice")
    for c in (bob, carol, elsewhere):
        await c.join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* joined r$")
        for c in (bob, bob, carol, bob, elsewhere):
            c.send({"type": "typing", "room": "r"})
        for c in (bob, carol, elsewhere):
            await c.drain_to_pong()  # each one's typing frames were handled and relayed
        # Relayed to the client before this message, on the same connection: once it
        # is printed, every typing frame has been seen.
        await bob.request({"type": "send", "room": "r", "body": "done"})
        await proc.expect(r"^\[r\] #1 bob: done$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    typing = [line for line in proc.lines if line.endswith(" is typing")]
    assert sorted(typing) == ["* [r] bob is typing", "* [r] carol is typing"], proc.transcript()


@ensure
async def test_presence_lines_for_the_current_room_and_who_end_to_end(server):
    bob = await connect(server.port, "bob")
    await bob.join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r", "--room", "s")
    try:
        await proc.expect(r"^\* joined r$")
        await proc.expect(r"^\* \[r\] 2 online$")  # only with presence: true
        await proc.expect(r"^\* joined s$")
        await proc.expect(r"^\* \[s\] 1 online$")
        carol = await connect(server.port, "carol")
        await carol.join("s")  # not the current room: kept silently
        dave = await connect(server.port, "dave")
        await dave.join("r")
        await proc.expect(r"^\* \[r\] dave is online$")
        # Our user's other device changes nothing: we are online already.
        elsewhere = await connect(server.port, "alice")
        await elsewhere.join("r")
        await elsewhere.close()
        proc.type("/who")
        await proc.expect(r"^\* \[r\] 3 online: alice, bob, dave$")
        await dave.close()
        await proc.expect(r"^\* \[r\] dave went offline$")
        proc.type("/join s", "/who")
        await proc.expect(r"^\* \[s\] 2 online: alice, carol$")
        await carol.close()
        await proc.expect(r"^\* \[s\] carol went offline$")

        # After a reconnect the rooms are joined with presence again.
        cut(server, "alice")
        await proc.expect(r"^\* connection closed \(1001 cut by the test\); reconnecting in")
        await proc.expect(r"^\* joined r$")
        await proc.expect(r"^\* \[r\] 2 online$")
        await proc.expect(r"^\* \[s\] 1 online$")
        erin = await connect(server.port, "erin")
        await erin.join("s")
        await proc.expect(r"^\* \[s\] erin is online$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    changes = [line for line in proc.lines if re.search(r" (is online|went offline)$", line)]
    assert changes == [
        "* [r] dave is online",
        "* [r] dave went offline",
        "* [s] carol went offline",
        "* [s] erin is online",
    ], proc.transcript()
    assert proc.errors == [], proc.transcript()


@ensure
async def test_who_with_the_servers_list_cut_short(make_server):
    server = make_server(presence_list_max=1)
    for user in ("bob", "carol"):
        await (await connect(server.port, user)).join("r")
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* \[r\] 3 online$")
        proc.type("/who")
        await proc.expect(r"^\* \[r\] 3 online: (alice|bob|carol), and 2 more$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()


@ensure
async def test_a_burst_of_joins_comes_as_a_list_that_prints_nothing(make_server):
    # The server's one-second windows, on a clock of the test's: the burst is one
    # window however slowly the joins go, and its list comes when the test says.
    windows = task.Clock()
    server = make_server(presence_burst=1, clock=windows)
    proc = spawn_client(url(server.port), "--user", "alice", "--room", "r")
    try:
        await proc.expect(r"^\* \[r\] 1 online$")
        bob = await connect(server.port, "bob")
        await bob.join("r")
        await proc.expect(r"^\* \[r\] bob is online$")  # the first event of the window
        clients = [await connect(server.port, user) for user in ("carol", "dave")]
        for client in clients:
            await client.join("r")  # past the burst: held for the list
        windows.advance(1)  # the window ends: the list goes out
        # Printed only if the list told the client dave was online.
        await clients[1].close()
        await proc.expect(r"^\* \[r\] dave went offline$")
        proc.type("/who")
        await proc.expect(r"^\* \[r\] 3 online: alice, bob, carol$")
        proc.type("/quit")
        assert await proc.wait_ended() == 0, proc.transcript()
    finally:
        proc.kill()
    assert not [line for line in proc.lines if re.search("(carol|dave) is online", line)]
