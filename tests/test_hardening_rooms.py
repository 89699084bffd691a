"""Rooms, hardened: privacy that holds for those already inside, removals that outrank
a token's claim, and a byte budget on the history one connection may read.

Findings of an attack on the server:

- a room made private kept the non-members who had joined it while it was public
  (they still received, read its history and posted): privacy was checked at join;
- a member removed by the admin API whose token listed the room joined again at once;
- one connection read 26 MB/s of history: 100 bodies of 4000 emoji per 70-byte frame.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import jwt
import pytest
import pytest_twisted
from conftest import fresh_database
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from wsclient import Client, connect, http_json

from chatserver import wire

ensure = pytest_twisted.ensureDeferred
KEY = "admin-key-for-tests-at-least-32-bytes"
SECRET = "a-secret-that-is-long-enough-for-hs256-tokens"
TOKENS = {"auth": "token", "jwt_secret": SECRET, "admin_api_key": KEY}


def tok(sub: str, rooms: list[str] | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 3600}
    if rooms is not None:
        claims["rooms"] = rooms
    return f"token={jwt.encode(claims, SECRET, algorithm='HS256')}"


async def admin(port: int, method: str, path: str, body: Any = None) -> Any:
    status, reply = await http_json(port, method, path, body, key=KEY)
    assert status == 200, (status, reply)
    return reply


async def shut_out(client: Client, room: str) -> None:
    """``client`` is out of ``room``: it can't post, read its history or join it again."""
    sent = await client.request({"type": "send", "room": room, "body": "still here?"})
    assert sent["type"] == "error" and sent["code"] == "not_member", sent
    history = await client.request({"type": "history", "room": room})
    assert history["type"] == "error" and history["code"] == "not_member", history
    rejoin = await client.request({"type": "join", "room": room})
    assert rejoin["type"] == "error" and rejoin["code"] == "forbidden", rejoin


# -- 1. making a room private removes the non-members already in it ---------------------


@pytest.mark.redis
@ensure
async def test_making_a_room_private_removes_its_non_members_on_every_instance(make_server, redis):
    a = make_server(redis_url=redis.url, **TOKENS)
    b = make_server(redis_url=redis.url, **TOKENS)
    await gatherResults([s.broker.when_connected().addTimeout(15, reactor) for s in (a, b)])
    # Members: alice by a membership row, carol by her token's claim. Dave's token
    # claims the room too, but the admin API removed him while the room was public.
    await admin(a.port, "POST", "/admin/rooms/r/members", {"user": "alice"})
    alice = await connect(a.port, query=tok("alice"))
    carol = await connect(b.port, query=tok("carol", rooms=["r"]))
    mallory = await connect(b.port, query=tok("mallory"))
    eve = await connect(a.port, query=tok("eve"))
    dave = await connect(b.port, query=tok("dave", rooms=["r"]))
    everyone = (alice, carol, mallory, eve, dave)
    for client in everyone:
        await client.join("r")
    await admin(a.port, "DELETE", "/admin/rooms/r/members/dave")
    assert await dave.recv() == {"type": "kicked", "room": "r", "reason": "removed"}
    await dave.join("r")  # a public room: anyone may join
    sent = await mallory.request({"type": "send", "room": "r", "body": "while public"})
    assert sent["type"] == "ack"
    for client in everyone:
        assert (await client.expect("message"))["body"] == "while public"

    await admin(a.port, "POST", "/admin/rooms", {"room": "r", "private": True})
    # Everyone who is not a member, on either instance, is out at once.
    for client in (mallory, eve, dave):
        assert await client.recv() == {"type": "kicked", "room": "r", "reason": "private"}
    sent = await alice.request({"type": "send", "room": "r", "body": "members only"})
    assert sent["type"] == "ack"
    for client in (alice, carol):
        assert (await client.expect("message"))["body"] == "members only"
        assert await client.drain_to_pong() == []  # and nothing else: not kicked
    for client in (mallory, eve, dave):
        assert await client.drain_to_pong() == []  # the message did not reach them
        await shut_out(client, "r")
    history = await carol.request({"type": "history", "room": "r"})
    assert [m["body"] for m in history["messages"]] == ["while public", "members only"]


@ensure
async def test_a_history_page_read_when_the_room_turns_private_is_not_delivered(make_server):
    server = make_server(admin_api_key=KEY)
    mallory = await connect(server.port, "mallory")
    await mallory.join("r")
    assert (await mallory.request({"type": "send", "room": "r", "body": "x"}))["type"] == "ack"
    await mallory.expect("message")
    read = server.store.history
    release: Deferred[None] = Deferred()
    asked: Deferred[None] = Deferred()

    def held_history(*args: Any) -> Deferred[Any]:
        asked.callback(None)
        return release.addCallback(lambda _: read(*args))

    server.store.history = held_history
    mallory.send({"type": "history", "room": "r", "ref": "page"})
    await asked.addTimeout(10, reactor)  # the page is being read
    server.store.history = read
    await admin(server.port, "POST", "/admin/rooms", {"room": "r", "private": True})
    release.callback(None)  # the page the store read while the room was public
    assert await mallory.recv() == {"type": "kicked", "room": "r", "reason": "private"}
    answer = await mallory.recv()
    assert answer["type"] == "error" and answer["code"] == "not_member", answer
    assert answer["ref"] == "page"
    await shut_out(mallory, "r")


# -- 11. a stored removal outranks the token's rooms claim ------------------------------


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
@ensure
async def test_a_removed_member_stays_out_whatever_the_token_claims(make_server, request, database):
    settings: dict[str, Any] = dict(TOKENS)
    if database == "postgres":
        settings["database_url"] = fresh_database(request.getfixturevalue("postgres"))
    # Two instances on one bus and one database: the removal is stored, not local.
    a = make_server(**settings)
    b = make_server(**settings)
    await admin(a.port, "POST", "/admin/rooms", {"room": "staff", "private": True})
    bob = await connect(a.port, query=tok("bob", rooms=["staff"]))
    await bob.join("staff")
    await admin(a.port, "DELETE", "/admin/rooms/staff/members/bob")
    assert await bob.recv() == {"type": "kicked", "room": "staff", "reason": "removed"}
    await shut_out(bob, "staff")
    # A new connection with a fresh token that still claims the room, on either instance.
    for server in (a, b):
        again = await connect(server.port, query=tok("bob", rooms=["staff"]))
        await shut_out(again, "staff")
        await again.close()
    # The claim of anyone not removed still admits.
    other = await connect(b.port, query=tok("olga", rooms=["staff"]))
    await other.join("staff")
    # Added again through the admin API: in, with or without the claim.
    await admin(a.port, "POST", "/admin/rooms/staff/members", {"user": "bob"})
    await bob.join("staff")
    plain = await connect(b.port, query=tok("bob"))
    await plain.join("staff")


# -- 13. a byte budget on history ---------------------------------------------------------


_seeded = itertools.count()


async def seeded(
    make_server: Any, tmp_path: Any, messages: int, body: str, **settings: Any
) -> tuple[Any, Client]:
    """A server of its own database on a clock the test moves, with ``messages``
    bodies in room ``h``: the same pages on every such server."""
    clock = Clock()
    clock.advance(1000)
    database = tmp_path / f"seeded-{next(_seeded)}.sqlite3"
    server = make_server(clock=clock, database_url=f"sqlite:///{database}", **settings)
    client = await connect(server.port, "reader")
    await client.join("h")
    for _ in range(messages):
        client.send({"type": "send", "room": "h", "body": body})
    kinds = [(await client.recv())["type"] for _ in range(2 * messages)]
    assert sorted(kinds) == ["ack"] * messages + ["message"] * messages
    return server, client


def page_bytes(page: dict[str, Any]) -> int:
    """What a history frame costs: its JSON as the server encoded it (same key order)."""
    return len(wire.encode(page))


async def history(client: Client, ref: str, limit: int = 10) -> dict[str, Any]:
    return await client.request({"type": "history", "room": "h", "limit": limit, "ref": ref})


def refused(answer: dict[str, Any], ref: str) -> bool:
    return answer == {
        "type": "error",
        "code": "rate_limited",
        "message": answer.get("message"),
        "ref": ref,
    }


RATE = 1024  # bytes per second: the clock moves by 1/1024 s per byte, exact in binary


@ensure
async def test_history_pages_are_charged_their_bytes_at_the_edge(make_server, tmp_path):
    # Measure one page, then set the budget to exactly it on a fresh server.
    _, probe = await seeded(make_server, tmp_path, 10, "m" * 200)
    size = page_bytes(await history(probe, "p0"))
    assert size > RATE
    server, client = await seeded(
        make_server,
        tmp_path,
        10,
        "m" * 200,
        history_bytes_per_second=RATE,
        history_burst_bytes=size,
    )
    clock = server.clock
    first = await history(client, "p0")
    assert first["type"] == "history" and len(first["messages"]) == 10
    assert page_bytes(first) == size  # the whole burst: none left
    assert refused(await history(client, "p1"), "p1")
    clock.advance(1 / RATE)  # one byte back: a page is let through, and sent whole
    whole = await history(client, "p1")
    assert whole["type"] == "history" and len(whole["messages"]) == 10
    assert refused(await history(client, "p2"), "p2")  # 1 - size bytes left
    clock.advance((size - 1) / RATE)  # back to exactly 0: still spent
    assert refused(await history(client, "p2"), "p2")
    clock.advance(1 / RATE)
    assert (await history(client, "p2"))["type"] == "history"
    # The refill stops at the burst, however long the connection was quiet.
    clock.advance(3600)
    assert (await history(client, "p3"))["type"] == "history"
    assert refused(await history(client, "p4"), "p4")
    # Other frames are not charged: the frame rate limit is a budget of its own.
    assert (await client.request({"type": "send", "room": "h", "body": "x"}))["type"] == "ack"


@ensure
async def test_history_requests_sent_together_cannot_all_pass_before_the_first_is_charged(
    make_server, tmp_path
):
    _, probe = await seeded(make_server, tmp_path, 10, "m" * 200)
    size = page_bytes(await history(probe, "q0"))
    _, client = await seeded(
        make_server,
        tmp_path,
        10,
        "m" * 200,
        history_bytes_per_second=RATE,
        history_burst_bytes=size + 1,
    )
    refs = [f"q{i}" for i in range(10)]
    for ref in refs:
        client.send({"type": "history", "room": "h", "limit": 10, "ref": ref})
    answers = [await client.recv() for _ in refs]
    assert [a["ref"] for a in answers] == refs  # in the order they were asked
    assert [a["type"] for a in answers[:2]] == ["history", "history"]
    assert all(refused(a, ref) for a, ref in zip(answers[2:], refs[2:], strict=True))


@ensure
async def test_the_default_budget_stops_the_emoji_flood(make_server, tmp_path):
    """The attack: pages of 100 bodies of 4000 emoji (about 1.6 MB each), asked for as
    fast as the frame rate allows. The defaults let a few through, then refuse."""
    server, client = await seeded(make_server, tmp_path, 100, "\U0001f600" * 4000)
    config = server.config
    for i in range(20):
        client.send({"type": "history", "room": "h", "limit": 100, "after": 0, "ref": i})
    answers = [await client.recv() for _ in range(20)]
    pages = [a for a in answers if a["type"] == "history"]
    sent = sum(page_bytes(p) for p in pages)
    # A page asked for with budget left is sent whole: at most one page over the burst.
    assert len(pages) == 3 and all(len(p["messages"]) == 100 for p in pages)
    assert sent - page_bytes(pages[-1]) < config.history_burst_bytes < sent
    assert all(refused(a, a["ref"]) for a in answers[3:])
    server.clock.advance(sent / config.history_bytes_per_second)  # the whole debt paid
    again = await client.request({"type": "history", "room": "h", "limit": 100, "ref": "x"})
    assert again["type"] == "history"
