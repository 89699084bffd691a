"""Protocol 1.1, edits and deletes: events in the room's sequence, folded in history,
and a deleted text erased from storage.

Real stores (SQLite and Postgres), real WebSocket clients, the admin API over
HTTP, and two instances over a real Redis.
"""

from __future__ import annotations

import glob
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from wsclient import connect, http_json, in_room

ensure = pytest_twisted.ensureDeferred
KEY = "admin-key-for-tests-at-least-32-bytes"


def folded(page: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What a history page says of each message: id, user, body and the 1.1 fields."""
    return [
        (
            m["id"],
            m["user"],
            m["body"],
            m.get("edits"),
            m.get("deletes"),
            "edited" in m,
            m.get("deleted", False),
        )
        for m in page["messages"]
    ]


@ensure
async def test_the_author_edits_and_deletes_and_every_member_sees_the_events(
    make_server, database_url
):
    server = make_server(database_url=database_url)
    alice, bob = await in_room(server.port, "r", "alice", "bob")
    sent = await alice.request({"type": "send", "room": "r", "body": "helo wrold"})
    assert (await bob.expect("message"))["id"] == 1

    edit = await alice.request({"type": "edit", "room": "r", "id": 1, "body": "hello world"})
    assert (edit["type"], edit["room"], edit["id"]) == ("ack", "r", 2)
    got = await bob.expect("message")
    assert {k: got[k] for k in ("id", "user", "body", "edits")} == {
        "id": 2,
        "user": "alice",
        "body": "hello world",
        "edits": 1,
    }
    assert got["ts"] == edit["ts"] and "deletes" not in got
    page = await bob.request({"type": "history", "room": "r"})
    assert folded(page) == [
        (1, "alice", "hello world", None, None, True, False),
        (2, "alice", "hello world", 1, None, False, False),
    ]
    assert page["messages"][0]["edited"] == edit["ts"]
    assert page["messages"][0]["ts"] == sent["ts"]

    gone = await alice.request({"type": "delete", "room": "r", "id": 1})
    assert (gone["type"], gone["id"]) == ("ack", 3)
    got = await bob.expect("message")
    assert (got["id"], got["user"], got["body"], got["deletes"]) == (3, "alice", "", 1)
    assert "edits" not in got
    page = await bob.request({"type": "history", "room": "r"})
    assert folded(page) == [
        (1, "alice", "", None, None, True, True),
        (2, "alice", "", 1, None, False, False),  # the edit's text is erased too
        (3, "alice", "", None, 1, False, False),
    ]
    # The sequence goes on without a gap.
    assert (await alice.request({"type": "send", "room": "r", "body": "next"}))["id"] == 4


@ensure
async def test_refused_changes_get_clear_errors_and_take_no_id(make_server, database_url):
    server = make_server(database_url=database_url)
    alice, bob = await in_room(server.port, "r", "alice", "bob")
    await alice.request({"type": "send", "room": "r", "body": "mine"})
    await alice.request({"type": "edit", "room": "r", "id": 1, "body": "still mine"})

    async def error_of(client, frame):
        got = await client.request(frame)
        assert got["type"] == "error", got
        assert "Traceback" not in got["message"]
        return got["code"]

    # Someone else's message.
    assert await error_of(bob, {"type": "edit", "room": "r", "id": 1, "body": "x"}) == "forbidden"
    assert await error_of(bob, {"type": "delete", "room": "r", "id": 1}) == "forbidden"
    # An event is not a message to change; an id past the last is a mistake.
    assert await error_of(alice, {"type": "edit", "room": "r", "id": 2, "body": "x"}) == (
        "not_found"
    )
    assert await error_of(alice, {"type": "delete", "room": "r", "id": 3}) == "bad_request"
    assert await error_of(alice, {"type": "delete", "room": "r", "id": 2**62}) == "bad_request"
    # Ids that are not message ids at all.
    for bad in ("1", -1, 0, 1.5, True, None, 2**63):
        frame = {"type": "delete", "room": "r", "id": bad}
        assert await error_of(alice, frame) == "bad_request", bad
        frame = {"type": "edit", "room": "r", "id": bad, "body": "x"}
        assert await error_of(alice, frame) == "bad_request", bad
    for body in ("", None, 5, "nul\x00"):
        frame = {"type": "edit", "room": "r", "id": 1, "body": body}
        assert await error_of(alice, frame) == "bad_request", body
    # Not a member of the room.
    assert await error_of(alice, {"type": "delete", "room": "elsewhere", "id": 1}) == ("not_member")

    assert (await alice.request({"type": "delete", "room": "r", "id": 1}))["id"] == 3
    # A deleted message can be neither edited nor deleted again.
    assert await error_of(alice, {"type": "edit", "room": "r", "id": 1, "body": "x"}) == (
        "not_found"
    )
    assert await error_of(alice, {"type": "delete", "room": "r", "id": 1}) == "not_found"
    # None of the refusals took an id.
    assert (await alice.request({"type": "send", "room": "r", "body": "after"}))["id"] == 4
    got = [m["id"] for m in (await bob.request({"type": "history", "room": "r"}))["messages"]]
    assert got == [1, 2, 3, 4]


@ensure
async def test_max_body_chars_and_the_frame_rate_apply_to_edits(make_server):
    server = make_server(max_body_chars=10, rate_limit=0.01, rate_burst=5)
    alice = await connect(server.port, "alice")
    await alice.join("r")  # token 1
    await alice.request({"type": "send", "room": "r", "body": "a" * 10})  # 2
    edit = {"type": "edit", "room": "r", "id": 1}
    assert (await alice.request({**edit, "body": "b" * 10}))["type"] == "ack"  # 3: at the edge
    over = await alice.request({**edit, "body": "b" * 11})  # 4
    assert (over["type"], over["code"]) == ("error", "too_large")
    assert (await alice.request({"type": "delete", "room": "r", "id": 1}))["type"] == "ack"  # 5
    limited = await alice.request({"type": "delete", "room": "r", "id": 1})
    assert (limited["type"], limited["code"]) == ("error", "rate_limited")


@ensure
async def test_a_message_and_its_changes_in_one_batch_are_decided_in_order(
    make_server, database_url
):
    server = make_server(database_url=database_url)
    alice = await connect(server.port, "alice")
    await alice.join("r")
    # Pipelined, so one reactor turn and one transaction: each change sees the ones
    # before it (the client knows an empty room's first id is 1).
    frames = [
        {"type": "send", "room": "r", "body": "first", "ref": 1},
        {"type": "edit", "room": "r", "id": 1, "body": "second", "ref": 2},
        {"type": "edit", "room": "r", "id": 1, "body": "third", "ref": 3},
        {"type": "delete", "room": "r", "id": 1, "ref": 4},
        {"type": "delete", "room": "r", "id": 1, "ref": 5},
        {"type": "send", "room": "r", "body": "after", "ref": 6},
    ]
    for frame in frames:
        alice.send(frame)
    answers = {}
    messages = []
    while len(answers) < len(frames):
        got = await alice.recv()
        if got["type"] == "message":
            messages.append(got)
        else:
            answers[got["ref"]] = got
    assert [(answers[r]["type"], answers[r].get("id")) for r in range(1, 7)] == [
        ("ack", 1),
        ("ack", 2),
        ("ack", 3),
        ("ack", 4),
        ("error", None),
        ("ack", 5),
    ]
    assert answers[5]["code"] == "not_found"
    messages += await alice.drain_to_pong()
    assert [(m["id"], m["body"], m.get("edits"), m.get("deletes")) for m in messages] == [
        (1, "first", None, None),
        (2, "second", 1, None),
        (3, "third", 1, None),
        (4, "", None, 1),
        (5, "after", None, None),
    ]
    page = await alice.request({"type": "history", "room": "r"})
    assert folded(page) == [
        (1, "alice", "", None, None, True, True),
        (2, "alice", "", 1, None, False, False),
        (3, "alice", "", 1, None, False, False),
        (4, "alice", "", None, 1, False, False),
        (5, "alice", "after", None, None, False, False),
    ]


@ensure
async def test_an_edit_with_a_cid_is_stored_once(make_server, database_url):
    server = make_server(database_url=database_url)
    alice = await connect(server.port, "alice")
    await alice.join("r")
    await alice.request({"type": "send", "room": "r", "body": "x", "cid": "m1"})
    edit = {"type": "edit", "room": "r", "id": 1, "body": "y", "cid": "e1"}
    first = await alice.request(dict(edit))
    again = await alice.request(dict(edit))
    assert (first["id"], first["cid"], first.get("duplicate", False)) == (2, "e1", False)
    assert (again["id"], again["ts"], again["duplicate"]) == (2, first["ts"], True)
    page = await alice.request({"type": "history", "room": "r"})
    assert [(m["id"], m.get("cid"), m.get("edits")) for m in page["messages"]] == [
        (1, "m1", None),
        (2, "e1", 1),
    ]


@ensure
async def test_the_admin_api_deletes_anyones_message(make_server, database_url):
    server = make_server(database_url=database_url, admin_api_key=KEY)
    alice, bob = await in_room(server.port, "r", "alice", "bob")
    await alice.request({"type": "send", "room": "r", "body": "rude"})
    await bob.expect("message")

    status, body = await http_json(
        server.port, "DELETE", "/admin/rooms/r/messages/1?user=mod", key=KEY
    )
    assert status == 200, body
    assert (body["room"], body["id"], body["deletes"], body["user"]) == ("r", 2, 1, "mod")
    got = await bob.expect("message")
    assert (got["id"], got["user"], got["body"], got["deletes"]) == (2, "mod", "", 1)
    assert (await alice.expect("message"))["id"] == 1
    assert (await alice.expect("message"))["deletes"] == 1

    status, body = await http_json(server.port, "DELETE", "/admin/rooms/r/messages/1", key=KEY)
    assert status == 404 and "no message 1" in body["error"]
    for path, code in (
        ("/admin/rooms/r/messages/2", 404),  # an event, not a message
        ("/admin/rooms/r/messages/3", 400),  # not written yet
        ("/admin/rooms/r/messages/abc", 400),
        ("/admin/rooms/r/messages/-1", 400),
        ("/admin/rooms/r/messages/0", 400),
        ("/admin/rooms/r/messages/99999999999999999999", 400),
        ("/admin/rooms/no-such-room/messages/1", 400),
        ("/admin/rooms/r/messages/1?user=bad%20name", 400),
    ):
        status, _ = await http_json(server.port, "DELETE", path, key=KEY)
        assert status == code, path
    assert (await http_json(server.port, "DELETE", "/admin/rooms/r/messages/1"))[0] == 401
    # The default actor is "system", as for the admin API's posts.
    await http_json(server.port, "POST", "/admin/rooms/r/messages", {"body": "hi"}, key=KEY)
    status, body = await http_json(server.port, "DELETE", "/admin/rooms/r/messages/3", key=KEY)
    assert (status, body["user"], body["id"]) == (200, "system", 4)


@ensure
async def test_a_resume_with_after_sees_every_change_in_order(make_server, database_url):
    server = make_server(database_url=database_url)
    alice = await connect(server.port, "alice")
    await alice.join("r")
    for i in range(3):
        await alice.request({"type": "send", "room": "r", "body": f"m{i}"})
    carol = await connect(server.port, "carol")
    seen = (await carol.join("r"))["last_id"]
    await carol.close()
    await alice.request({"type": "edit", "room": "r", "id": 2, "body": "m1!"})
    await alice.request({"type": "delete", "room": "r", "id": 1})
    await alice.request({"type": "send", "room": "r", "body": "m3"})
    await alice.request({"type": "edit", "room": "r", "id": 6, "body": "m3!"})
    await alice.request({"type": "delete", "room": "r", "id": 3})

    carol = await connect(server.port, "carol")
    await carol.join("r")
    got = []
    cursor = seen
    while True:  # small pages: the paging itself must not skip
        page = await carol.request({"type": "history", "room": "r", "after": cursor, "limit": 2})
        got += page["messages"]
        if not page["more"]:
            break
        cursor = page["messages"][-1]["id"]
    assert [(m["id"], m["body"], m.get("edits"), m.get("deletes")) for m in got] == [
        (4, "m1!", 2, None),
        (5, "", None, 1),
        (6, "m3!", None, None),
        (7, "m3!", 6, None),
        (8, "", None, 3),
    ]
    assert got[2]["edited"] == got[3]["ts"]
    # Scroll-back shows the folded state of the messages before the resume point.
    back = await carol.request({"type": "history", "room": "r", "before": seen + 1})
    assert [(m["id"], m["body"], m.get("deleted", False)) for m in back["messages"]] == [
        (1, "", True),
        (2, "m1!", False),
        (3, "", True),
    ]
    assert "edited" in back["messages"][1]


def _sqlite_bytes(path: str) -> bytes:
    """Every byte SQLite keeps of the database: the file, its log and shared memory."""
    data = b""
    for name in sorted(glob.glob(path + "*")):
        with open(name, "rb") as f:
            data += f.read()
    return data


@ensure
async def test_a_deleted_text_is_nowhere_in_the_sqlite_files(make_server, tmp_path):
    path = str(tmp_path / "erase.sqlite3")
    server = make_server(database_url=f"sqlite:///{path}", max_body_chars=10_000)
    alice = await connect(server.port, "alice")
    await alice.join("r")
    secret, revised = "zebra-4f1c-original", "zebra-4f1c-revised"
    # A body longer than a page, too: its overflow pages are freed by the delete,
    # and a freed page keeps its bytes unless secure_delete zeroes it.
    long_secret = "quagga-77e0-" + "q" * 6000
    await alice.request({"type": "send", "room": "r", "body": secret})
    await alice.request({"type": "send", "room": "r", "body": "keep-this-one"})
    await alice.request({"type": "edit", "room": "r", "id": 1, "body": revised})
    await alice.request({"type": "send", "room": "r", "body": long_secret})
    await alice.request({"type": "send", "room": "r", "body": "keep-this-too"})
    before = _sqlite_bytes(path)
    # The test can see the text where it is: otherwise its absence proves nothing.
    texts = [t.encode() for t in (secret, revised, long_secret[:40])]
    assert all(t in before for t in texts)
    await alice.request({"type": "delete", "room": "r", "id": 1})
    await alice.request({"type": "delete", "room": "r", "id": 4})
    after = _sqlite_bytes(path)
    assert [t for t in texts if t in after] == []
    assert b"keep-this-one" in after and b"keep-this-too" in after
    await server.stopService()
    after_stop = _sqlite_bytes(path)
    assert [t for t in texts if t in after_stop] == []


@ensure
async def test_a_deleted_text_is_nowhere_in_the_postgres_table(make_server, pg_url):
    server = make_server(database_url=pg_url)
    alice = await connect(server.port, "alice")
    await alice.join("r")
    await alice.request({"type": "send", "room": "r", "body": "zebra-original"})
    await alice.request({"type": "edit", "room": "r", "id": 1, "body": "zebra-revised"})

    def count() -> int:
        connection = psycopg2.connect(pg_url)
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT count(*) FROM messages WHERE body LIKE 'zebra%%'")
            return cursor.fetchone()[0]
        finally:
            connection.close()

    assert count() == 2  # the message, folded, and its edit event
    await alice.request({"type": "delete", "room": "r", "id": 1})
    assert count() == 0


@pytest.mark.postgres
@pytest.mark.redis
@ensure
async def test_changes_reach_the_other_instance_and_race_safely(make_server, pg_url, redis):
    a, b = (
        make_server(database_url=pg_url, redis_url=redis.url, admin_api_key=KEY) for _ in range(2)
    )
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    on_a = await connect(a.port, "alice")
    on_b = await connect(b.port, "alice")
    bob = await connect(b.port, "bob")
    for c in (on_a, on_b, bob):
        await c.join("r")
    await on_a.request({"type": "send", "room": "r", "body": "x"})
    await on_a.request({"type": "edit", "room": "r", "id": 1, "body": "y"})
    assert [(m["id"], m.get("edits")) for m in (await bob.recv(), await bob.recv())] == [
        (1, None),
        (2, 1),
    ]
    # The same delete from two instances at the same moment: one wins, the other
    # finds the message gone; ids stay gap-free. Many rounds, for the race.
    rounds = 15
    for i in range(rounds):
        sent = await on_a.request({"type": "send", "room": "r", "body": f"r{i}"})
        frame = {"type": "delete", "room": "r", "id": sent["id"]}
        answers = await gatherResults(
            [Deferred.fromCoroutine(c.request(dict(frame))) for c in (on_a, on_b)]
        )
        kinds = sorted((x["type"], x.get("code")) for x in answers)
        assert kinds == [("ack", None), ("error", "not_found")], (i, answers)
        ack = next(x for x in answers if x["type"] == "ack")
        assert ack["id"] == sent["id"] + 1
    page = await bob.request({"type": "history", "room": "r", "after": 0, "limit": 100})
    ids = [m["id"] for m in page["messages"]]
    assert ids == list(range(1, 3 + 2 * rounds))
    # The admin API on one instance; the member on the other sees the delete.
    await http_json(b.port, "DELETE", "/admin/rooms/r/messages/1", key=KEY)
    while (got := await on_a.recv())["type"] != "message" or got.get("deletes") != 1:
        pass
    assert got["user"] == "system"


@ensure
async def test_each_change_of_one_transaction_gets_its_own_answer(database_url):
    from chatserver.config import Config
    from chatserver.store import MessageNotFound, NotAuthor, NotYetWritten
    from chatserver.store.open import open_store, prepare

    config = Config(database_url=database_url)
    prepare(config)
    store = open_store(config, reactor)
    await store.append("s", "u", "elsewhere")
    pending = [
        store.append("r", "u", "one", "c1"),
        store.edit("r", "v", 1, "not yours"),
        store.edit("r", "u", 1, "one!", "e1"),
        store.edit("r", "u", 1, "one!", "e1"),  # the same cid: the same event
        store.delete("r", "u", 2),  # an event, not a message
        store.delete("r", "u", 5),  # past the last id, even counting this batch
        store.delete("r", "v", 1, by_admin=True),
        store.edit("r", "u", 1, "too late"),
        store.edit("s", "u", 1, "there"),
    ]
    outcomes: list[Any] = []
    for d in pending:
        try:
            outcomes.append(await d)
        except Exception as e:
            outcomes.append(type(e))
    assert store.batches == 2  # "elsewhere", then all of the above together
    summary = [
        o if isinstance(o, type) else (o.room, o.id, o.edits, o.deletes, o.duplicate)
        for o in outcomes
    ]
    assert summary == [
        ("r", 1, None, None, False),
        NotAuthor,
        ("r", 2, 1, None, False),
        ("r", 2, 1, None, True),
        MessageNotFound,
        NotYetWritten,
        ("r", 3, None, 1, False),
        MessageNotFound,
        ("s", 2, 1, None, False),
    ]
    page, _ = await store.history("r", None, None, 10)
    assert [(m.id, m.body, m.deleted) for m in page] == [
        (1, "", True),
        (2, "", False),
        (3, "", False),
    ]
    page, _ = await store.history("s", None, None, 10)
    assert [(m.id, m.body, m.edited is not None) for m in page] == [
        (1, "there", True),
        (2, "there", False),
    ]
    await store.close()
