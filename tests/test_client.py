"""The terminal client: its pure resume/de-dup logic, and the real program against real servers."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time

import jwt
import pytest
import pytest_twisted
from clientproc import chat_lines, spawn_client, talk_elsewhere
from wsclient import connect

from chatserver.client.connection import close_verdict, with_credentials
from chatserver.client.events import Acked, Message, Notice, Problem, Resync
from chatserver.client.session import Backoff, RoomState, Session, TokenBucket
from chatserver.client.terminal import format_message, parse_line, printable

ensure = pytest_twisted.ensureDeferred
SECRET = "test-secret-that-is-long-enough-for-hs256"


# --- the pure logic -------------------------------------------------------------


def msg(room: str, id: int, user: str = "bob", body: str | None = None) -> dict:
    return {
        "type": "message",
        "room": room,
        "id": id,
        "user": user,
        "body": body if body is not None else f"m{id}",
        "ts": 1_795_000_000_000 + id,
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
    assert join == {"type": "join", "room": "r", "ref": join["ref"]}
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


def test_a_message_whose_ack_was_lost_is_found_in_history_not_sent_twice():
    s = Session("alice", ["r"], backlog=0)
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=None)
    stored = s.say("stored before the drop")
    lost = s.say("never reached the server")
    sends, _ = s.drain()
    assert [f["body"] for f in sends] == [stored.body, lost.body]
    s.disconnected()  # neither was acked

    s.say("typed while offline")
    assert s.drain() == ([], [Notice("not connected: queued until connected")])
    s.connected()
    (join,), _ = s.drain()
    answer(s, join, "joined", room="r", last_id=1)
    (page,), _ = s.drain()
    assert page["after"] == 0
    answer(s, page, "history", room="r", messages=[msg("r", 1, "alice", stored.body)])
    frames, events = s.drain()
    assert Acked(stored.local, "r", 1) in events
    # The unconfirmed one was not stored: sent again, then the queued one.
    assert [(f["type"], f["body"]) for f in frames] == [
        ("send", "never reached the server"),
        ("send", "typed while offline"),
    ]
    answer(s, frames[0], "ack", room="r", id=2, ts=0)
    assert s.drain()[1] == [Acked(lost.local, "r", 2)]
    assert len(s.outbox.items) == 1


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


def live_session(*rooms: str) -> Session:
    """A session whose rooms are joined (empty) and live."""
    s = Session("alice", rooms, backlog=0)
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
