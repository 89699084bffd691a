"""Once the server has decided to close a connection, nothing that connection sends counts.

Frames can arrive between the server's close frame and the TCP close: after a
global ban (4003), a token's expiry (4001) or a policy close (1008) none of them
is stored, delivered or counted again. A ban stored while a handshake's ban
check is under way still reaches that connection. Real clients, real server.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from wsclient import (
    OP_CLOSE,
    OP_PING,
    TIMEOUT,
    Client,
    HandshakeRefused,
    client_frame,
    connect,
    http_get,
    http_json,
    raw_websocket,
    text,
)

from chatserver.chat import CLOSE_BANNED, CLOSE_POLICY, CLOSE_TOKEN_EXPIRED
from chatserver.store import EVERYWHERE

ensure = pytest_twisted.ensureDeferred
KEY = "admin-key-for-tests-at-least-32-bytes"
SECRET = "test-secret-that-is-long-enough-for-hs256"
AFTER = 10  # sends written after the close decision


def sends_after(room: str = "r") -> bytes:
    """AFTER send frames in one write, as a client that ignores the close frame would."""
    return b"".join(
        text({"type": "send", "room": room, "body": f"after {i}", "ref": i}) for i in range(AFTER)
    )


async def two_in_room(port: int, query: str | None = None) -> tuple[Client, Client]:
    """mallory (to be closed) and bob, both in room "r"."""
    mallory = await connect(port, "mallory", query=query)
    await mallory.join("r")
    bob = await connect(port, "bob")
    await bob.join("r")
    return mallory, bob


async def nothing_was_stored_or_delivered(member: Client, user: str = "bob") -> None:
    """``member`` got none of mallory's late sends, and its own send, made after the
    server read them, is the room's first message."""
    assert await member.drain_to_pong() == []
    ack = await member.request({"type": "send", "room": "r", "body": "mine"})
    assert (ack["type"], ack["id"]) == ("ack", 1), ack
    got = await member.expect("message")
    assert (got["user"], got["id"]) == (user, 1)
    page = await member.request({"type": "history", "room": "r"})
    assert [m["body"] for m in page["messages"]] == ["mine"]


def late_answers(client: Client) -> list[dict[str, Any]]:
    return [f for f in client.proto.frames.pending if f.get("type") in ("ack", "error")]


async def metric(server: Any, line: str) -> str:
    code, body = await http_get(server.port, "/metrics")
    assert code == 200
    (found,) = [x for x in body.decode().splitlines() if x.startswith(line)]
    return found


POLICY = 'chatserver_clients_dropped_total{reason="policy"}'


# -- finding 7: nothing counts after the close decision ----------------------------


@ensure
async def test_sends_after_a_global_ban_are_not_stored_or_delivered(make_server):
    server = make_server()
    mallory, bob = await two_in_room(server.port)
    server.chat.kick(EVERYWHERE, "mallory", "banned")  # the close frame is on its way
    mallory.proto.transport.write(sends_after())  # ... and these arrive after the decision
    assert await mallory.wait_closed() == CLOSE_BANNED  # the server read them all by now
    assert late_answers(mallory) == []
    await nothing_was_stored_or_delivered(bob)
    assert server.chat.kicks == 1


@ensure
async def test_sends_after_a_policy_close_are_not_stored_or_delivered(make_server):
    server = make_server(max_bad_frames=2)
    mallory, bob = await two_in_room(server.port)
    bad = client_frame(b"not json")
    mallory.proto.transport.write(bad + bad + sends_after())
    assert await mallory.wait_closed() == CLOSE_POLICY
    assert [f["code"] for f in late_answers(mallory)] == ["bad_frame", "bad_frame"]
    await nothing_was_stored_or_delivered(bob)
    assert server.chat.policy_closes == 1


@ensure
async def test_sends_after_the_token_expired_are_not_stored_or_delivered(make_server):
    clock = Clock()
    clock.advance(time.time())  # the tokens' exp is wall-clock time
    server = make_server(auth="token", jwt_secret=SECRET, jwt_leeway=0, clock=clock)
    exp = int(clock.seconds()) + 60
    tokens = {u: jwt.encode({"sub": u, "exp": exp}, SECRET, algorithm="HS256") for u in ("m", "b")}
    mallory = await connect(server.port, query=f"token={tokens['m']}")
    await mallory.join("r")
    bob = await connect(server.port, query=f"token={tokens['b']}")
    await bob.join("r")
    await mallory.drain_to_pong()
    clock.advance(exp - clock.seconds() - 0.5)
    assert not mallory.proto.closed.called
    # Both expire now; bob's socket is not read before this turn ends either.
    clock.advance(1.0)
    mallory.proto.transport.write(sends_after())
    assert await mallory.wait_closed() == CLOSE_TOKEN_EXPIRED
    assert await bob.wait_closed() == CLOSE_TOKEN_EXPIRED
    assert late_answers(mallory) == []
    # Read back by a new connection with a fresh token.
    fresh = jwt.encode({"sub": "reader", "exp": exp + 3600}, SECRET, algorithm="HS256")
    reader = await connect(server.port, query=f"token={fresh}")
    await reader.join("r")
    await nothing_was_stored_or_delivered(reader, "reader")
    await reader.close()


# -- finding 15: a policy close is counted once per connection ---------------------


@ensure
async def test_a_rate_limit_close_is_counted_once_however_many_frames_follow(make_server):
    server = make_server(rate_limit=0.01, rate_burst=1, rate_limit_strikes=2)
    ws = await raw_websocket(server.port, "flooder")
    ws.write(text({"type": "ping"}) * 20 + client_frame(b"", OP_PING) * 20)
    while (await ws.recv())[0] != OP_CLOSE:
        pass
    assert ws.close_code == CLOSE_POLICY
    await ws.wait_lost()  # the server read every frame before our close reply
    assert server.chat.policy_closes == 1
    assert server.chat.errors["rate_limited"] == 2
    assert await metric(server, POLICY) == f"{POLICY} 1.0"


@ensure
async def test_a_bad_frames_close_is_counted_once_however_many_frames_follow(make_server):
    server = make_server(max_bad_frames=2)
    ws = await raw_websocket(server.port, "flooder")
    ws.write(client_frame(b"not json") * 20)
    while (await ws.recv())[0] != OP_CLOSE:
        pass
    assert ws.close_code == CLOSE_POLICY
    await ws.wait_lost()
    assert server.chat.policy_closes == 1
    assert server.chat.errors["bad_frame"] == 2
    assert await metric(server, POLICY) == f"{POLICY} 1.0"


# -- finding 14: a ban between the handshake's ban check and the connection's opening --


def bounded(d: Deferred[Any], timeout: float = TIMEOUT) -> Deferred[Any]:
    return d.addTimeout(timeout, reactor)


@ensure
async def test_a_ban_stored_while_the_handshake_is_checked_refuses_it(make_server):
    """The store read "not banned" before the ban was stored, and answers after it."""
    server = make_server(admin_api_key=KEY)
    lookup = server.store.banned_everywhere
    answer: Deferred[bool] = Deferred()
    asked: Deferred[None] = Deferred()

    def held_lookup(user: str) -> Deferred[bool]:
        asked.callback(None)
        return answer

    server.store.banned_everywhere = held_lookup
    connecting = Deferred.fromCoroutine(connect(server.port, "mallory"))
    await bounded(asked)  # the handshake is in its ban check
    server.store.banned_everywhere = lookup
    status, _ = await http_json(server.port, "POST", "/admin/bans", {"user": "mallory"}, key=KEY)
    assert status == 200  # stored, and the kick applied to every connection of mallory's
    answer.callback(False)  # what the store read before the ban was stored
    with pytest.raises(HandshakeRefused):
        client = await connecting
        await client.close()
    assert server.factory.rejected["banned"] == 1
    assert "mallory" not in server.chat.users
    assert server.chat.admission.by_user == {} and server.chat.admission.by_address == {}
    assert not server.factory.connections
    with pytest.raises(HandshakeRefused):  # and the stored ban holds from now on
        await connect(server.port, "mallory")
    bob = await connect(server.port, "bob")  # nobody else is affected
    assert (await bob.request({"type": "ping"}))["type"] == "pong"
    await bob.close()
