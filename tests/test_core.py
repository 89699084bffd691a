"""The chat core alone: sessions, admission, the path of a send, limits and timers,
driven with a fake transport, a fake store, the in-memory broker and a fake clock.

End-to-end tests with real clients and real servers are beside these; here every
step is synchronous and exact, so order and timing rules are checked precisely.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from wsclient import server_frame_payloads

from chatserver import wire
from chatserver.admission import Refused
from chatserver.auth import Identity
from chatserver.broker.memory import MemoryBroker, MemoryHub
from chatserver.chat import CLOSE_BANNED, CLOSE_POLICY, CLOSE_TOKEN_EXPIRED, Chat
from chatserver.config import Config
from chatserver.delivery import Delivery
from chatserver.rooms import RoomRegistry
from chatserver.session import Session
from chatserver.store import EVERYWHERE, Access, StoredMessage, StoreUnavailable


def frames_of(data: bytes) -> list[dict]:
    return [json.loads(p) for p in server_frame_payloads(data)]


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.reading = True

    def write(self, data: bytes) -> None:
        assert self.closed is None, "a frame after the close"
        self.writes.append(data)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def stop_reading(self) -> None:
        assert self.closed is not None, "stopped reading an open connection"
        self.reading = False

    @property
    def frames(self) -> list[dict]:
        return [f for data in self.writes for f in frames_of(data)]

    def kinds(self) -> list[str]:
        return [f["type"] for f in self.frames]


class FakeStore:
    """Appends wait until the test commits them, as one batch, like the group commit."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[tuple[str, str, str, Deferred]] = []
        self.last: dict[str, int] = {}
        self.banned: set[str] = set()
        self.ban_check_fails = False
        self.on_commit = lambda fire: fire()

    def start(self, on_commit) -> None:
        self.on_commit = on_commit

    def append(self, room: str, user: str, body: str, cid: str | None = None) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((room, user, body, d))
        return d

    def commit(self) -> None:
        batch, self.pending = self.pending, []

        def fire() -> None:
            for room, user, body, d in batch:
                self.last[room] = self.last.get(room, 0) + 1
                d.callback(StoredMessage(room, self.last[room], user, body, 1000))

        self.on_commit(fire)

    def fail_all(self) -> None:
        batch, self.pending = self.pending, []
        self.on_commit(lambda: [d.errback(StoreUnavailable("down")) for *_, d in batch])

    def last_id(self, room: str) -> Deferred:
        return succeed(self.last.get(room))

    def access(self, room: str, user: str, unread_max: int = 0) -> Deferred:
        return succeed(Access(private=False, member=False, banned=False))

    def banned_everywhere(self, user: str) -> Deferred:
        if self.ban_check_fails:
            return fail(StoreUnavailable("down"))
        return succeed(user in self.banned)

    def history(self, room, before, after, limit) -> Deferred:
        return succeed(([], False))


class Core:
    def __init__(self, **settings) -> None:
        self.config = Config(**settings)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = FakeStore(self.clock)
        self.broker = MemoryBroker(MemoryHub(self.clock))
        self.delivery = Delivery()
        registry = RoomRegistry(self.store, self.broker, self.delivery, self.clock, 0.5)
        self.chat = Chat(self.config, self.store, registry, self.broker, self.delivery, self.clock)
        self.store.start(self.chat.on_commit)
        self.broker.start(registry.on_broker_messages, lambda: None, self.chat.on_control)

    def admit(self, user: str, address: str = "192.0.2.1", **identity) -> Session:
        d = Deferred.fromCoroutine(self.chat.admit(Identity(user, **identity), address))
        results: list = []
        d.addBoth(results.append)
        (result,) = results
        if isinstance(result, Exception) or hasattr(result, "raiseException"):
            result.raiseException()
        return result

    def connect(self, user: str, address: str = "192.0.2.1", **identity):
        session = self.admit(user, address, **identity)
        transport = FakeTransport()
        self.chat.open(session, transport)
        return session, transport

    def frame(self, session: Session, **obj) -> None:
        self.chat.handle(session, json.dumps(obj).encode(), False)


def test_a_send_is_acked_after_commit_and_the_ack_goes_before_the_message():
    core = Core()
    alice, a = core.connect("alice")
    bob, b = core.connect("bob")
    core.frame(alice, type="join", room="r", ref=1)
    core.frame(bob, type="join", room="r", ref=1)
    assert a.kinds() == b.kinds() == ["joined"]
    core.frame(alice, type="send", room="r", body="one", ref=2)
    core.frame(alice, type="send", room="r", body="two", ref=3)
    assert a.kinds() == ["joined"]  # nothing before the commit
    core.store.commit()
    # Alice's acks and then the room's messages in one write; Bob's messages in one.
    assert len(a.writes) == 2 and len(b.writes) == 2
    assert [(f["type"], f.get("id")) for f in a.frames[1:]] == [
        ("ack", 1),
        ("ack", 2),
        ("message", 1),
        ("message", 2),
    ]
    assert [f["body"] for f in b.frames[1:]] == ["one", "two"]


def test_a_failed_commit_is_an_unavailable_error_with_the_ref():
    core = Core()
    alice, a = core.connect("alice")
    core.frame(alice, type="join", room="r")
    core.frame(alice, type="send", room="r", body="x", ref="s1")
    core.store.fail_all()
    assert a.frames[-1] == {
        "type": "error",
        "code": "unavailable",
        "message": "down",
        "ref": "s1",
    }


def test_admission_counts_per_address_and_per_user_and_uncounts_on_close():
    core = Core(max_connections_per_ip=2, max_connections_per_user=2)
    s1 = core.admit("alice", "192.0.2.1")
    core.admit("bob", "192.0.2.1")
    with pytest.raises(Refused) as refused:
        core.admit("carol", "192.0.2.1")
    assert refused.value.status == 429
    core.admit("alice", "192.0.2.2")
    with pytest.raises(Refused):
        core.admit("alice", "192.0.2.3")
    core.chat.close(s1)
    core.chat.close(s1)  # twice is harmless
    core.admit("carol", "192.0.2.1")
    assert core.chat.admission.by_address == {"192.0.2.1": 2, "192.0.2.2": 1}


def test_a_banned_user_is_refused_and_an_unreachable_store_is_503_and_not_counted():
    core = Core()
    core.store.banned.add("mallory")
    with pytest.raises(Refused) as refused:
        core.admit("mallory")
    assert refused.value.status == 403
    core.store.ban_check_fails = True
    with pytest.raises(Refused) as refused:
        core.admit("alice")
    assert refused.value.status == 503
    assert not core.chat.admission.by_user and not core.chat.admission.by_address


def test_the_rate_limit_refills_with_the_clock_and_strikes_close_with_1008():
    core = Core(rate_limit=1.0, rate_burst=2, rate_limit_strikes=3)
    alice, a = core.connect("alice")
    for _ in range(2):
        core.frame(alice, type="ping")
    core.frame(alice, type="ping", ref="late")
    assert a.kinds() == ["pong", "pong", "error"]
    assert a.frames[-1]["code"] == "rate_limited" and a.frames[-1]["ref"] == "late"
    core.clock.advance(1.0)  # one token back
    core.frame(alice, type="ping")
    assert a.kinds()[-1] == "pong"
    for _ in range(3):
        core.frame(alice, type="ping")
    assert a.closed == (CLOSE_POLICY, "rate limit exceeded")


def test_bad_frames_close_at_the_limit():
    core = Core(max_bad_frames=3)
    alice, a = core.connect("alice")
    for _ in range(2):
        core.chat.handle(alice, b"not json", False)
    assert a.closed is None
    core.chat.handle(alice, b"{}", False)
    assert a.kinds() == ["error"] * 3 and a.closed == (CLOSE_POLICY, "too many invalid frames")


def test_a_token_expiring_closes_with_4001_at_its_time_not_before():
    core = Core()
    _, a = core.connect("alice", expires=core.clock.seconds() + 60)
    core.clock.advance(59.9)
    assert a.closed is None
    core.clock.advance(0.2)
    assert a.closed == (CLOSE_TOKEN_EXPIRED, "token expired")


def test_closing_before_the_token_expires_cancels_its_timer():
    core = Core()
    alice, _ = core.connect("alice", expires=core.clock.seconds() + 60)
    core.chat.close(alice)
    assert core.clock.getDelayedCalls() == []


def test_a_kick_leaves_the_room_at_once_and_a_ban_closes_after_what_was_held():
    core = Core()
    alice, a = core.connect("alice")
    bob, b = core.connect("bob")
    for s in (alice, bob):
        core.frame(s, type="join", room="r")
    core.chat.kick("r", "bob", "removed")
    assert b.frames[-1] == {"type": "kicked", "room": "r", "reason": "removed"}
    core.frame(alice, type="send", room="r", body="after")
    core.store.commit()
    assert "after" not in [f.get("body") for f in b.frames]
    with core.delivery.batch():
        core.frame(alice, type="ping", ref="held")
        assert a.frames[-1]["type"] != "pong"  # held
        core.chat.kick(EVERYWHERE, "alice", "banned")
        # The pong was written before the close was started.
        assert a.frames[-1] == {"type": "pong", "ref": "held"}
        assert a.closed == (CLOSE_BANNED, "banned")


def test_frames_to_a_closed_session_go_nowhere():
    core = Core()
    alice, a = core.connect("alice")
    core.frame(alice, type="join", room="r")
    core.frame(alice, type="send", room="r", body="x")
    core.chat.close(alice)
    core.store.commit()  # the ack finds the session closed
    assert a.kinds() == ["joined"]
    assert wire.SUBPROTOCOL == "chat.v1"


# -- closing: decided once, and nothing counts after it ------------------------------


def test_nothing_a_session_sends_counts_once_the_core_closed_it():
    core = Core(max_bad_frames=2)
    alice, a = core.connect("alice")
    bob, b = core.connect("bob")
    for s in (alice, bob):
        core.frame(s, type="join", room="r")
    core.chat.handle(alice, b"not json", False)
    core.chat.handle(alice, b"not json", False)
    assert a.closed == (CLOSE_POLICY, "too many invalid frames")
    for _ in range(5):
        core.frame(alice, type="send", room="r", body="late")
        core.chat.handle(alice, b"not json", False)
        assert not core.chat.allow_frame(alice)  # a ping, a pong or a fragment
    core.store.commit()
    assert core.store.pending == [] and core.store.last == {}
    assert "late" not in [f.get("body") for f in b.frames]
    assert core.chat.policy_closes == 1
    assert core.chat.errors["bad_frame"] == 2
    core.chat.kick(EVERYWHERE, "alice", "banned")  # already closing: not closed or counted again
    assert a.closed == (CLOSE_POLICY, "too many invalid frames") and core.chat.kicks == 0


def test_a_send_waiting_for_its_join_is_dropped_if_the_session_is_closed_meanwhile():
    core = Core()
    alice, _ = core.connect("alice")
    access: Deferred = Deferred()
    core.store.access = lambda room, user, unread_max=0: access
    core.frame(alice, type="join", room="r")
    core.frame(alice, type="send", room="r", body="queued behind the join")
    core.chat.kick(EVERYWHERE, "alice", "banned")
    access.callback(Access(private=False, member=False, banned=False))
    assert core.store.pending == []


def test_other_frames_cost_a_token_each_and_strike_like_messages():
    core = Core(rate_limit=1.0, rate_burst=2, rate_limit_strikes=2)
    alice, a = core.connect("alice")
    assert core.chat.allow_frame(alice) and core.chat.allow_frame(alice)
    assert not core.chat.allow_frame(alice)
    assert a.frames[-1] == {
        "type": "error",
        "code": "rate_limited",
        "message": a.frames[-1]["message"],
    }
    core.clock.advance(1.0)
    core.frame(alice, type="ping", ref=1)  # the bucket is shared with messages
    assert a.kinds()[-1] == "pong"
    assert not core.chat.allow_frame(alice)
    assert not core.chat.allow_frame(alice)
    assert a.closed == (CLOSE_POLICY, "rate limit exceeded")
    assert core.chat.policy_closes == 1


def held_ban_check(core: Core) -> list[Deferred]:
    """Ban checks wait until the test answers them."""
    asked: list[Deferred] = []

    def check(user: str) -> Deferred:
        asked.append(Deferred())
        return asked[-1]

    core.store.banned_everywhere = check
    return asked


def test_a_ban_applied_during_the_ban_check_refuses_the_handshake():
    core = Core()
    asked = held_ban_check(core)
    results: list = []
    Deferred.fromCoroutine(core.chat.admit(Identity("mallory"), "192.0.2.1")).addBoth(
        results.append
    )
    core.chat.kick(EVERYWHERE, "mallory", "banned")  # the kick of a ban just stored
    asked[0].callback(False)  # read before the ban was stored
    (result,) = results
    assert result.check(Refused) and result.value.status == 403, result
    assert not core.chat.users and not core.chat.admission.by_user
    assert core.chat.kicks == 1


def test_a_handshake_refused_by_a_limit_leaves_nothing_registered():
    core = Core(max_connections_per_user=1)
    core.admit("alice")
    with pytest.raises(Refused):
        core.admit("alice")
    assert len(core.chat.users["alice"]) == 1 and core.chat.admission.by_user == {"alice": 1}


def test_a_ban_or_an_expiry_after_admission_closes_the_connection_as_it_opens():
    core = Core()
    banned = core.admit("mallory")
    expiring = core.admit("alice", expires=core.clock.seconds() + 1)
    core.chat.kick(EVERYWHERE, "mallory", "banned")
    core.clock.advance(1)
    for session, code in ((banned, CLOSE_BANNED), (expiring, CLOSE_TOKEN_EXPIRED)):
        transport = FakeTransport()
        core.chat.open(session, transport)
        assert transport.closed is not None and transport.closed[0] == code
        core.frame(session, type="ping")
        assert transport.writes == [] and not session.open
        core.chat.close(session)
    assert not core.chat.users and not core.chat.admission.by_user


def test_a_disconnect_by_the_server_is_a_close_decided_by_the_core():
    core = Core()
    alice, a = core.connect("alice")
    core.frame(alice, type="join", room="r")
    core.chat.disconnect(alice, 1001, "server shutting down")
    assert a.closed == (1001, "server shutting down")
    core.frame(alice, type="send", room="r", body="late")
    assert core.store.pending == [] and a.kinds() == ["joined"]


def test_a_client_sending_past_its_rate_after_the_close_is_not_read_any_more():
    core = Core(rate_limit=1.0, rate_burst=3, rate_limit_strikes=1, max_bad_frames=1)
    alice, a = core.connect("alice")
    core.chat.handle(alice, b"not json", False)  # closed by policy, two tokens left
    assert a.closed is not None
    for _ in range(2):
        core.frame(alice, type="ping")  # in flight when the close went out: fine
        assert a.reading
    assert not core.chat.allow_frame(alice)  # one past its rate
    assert not a.reading
    assert a.kinds() == ["error"] and core.chat.policy_closes == 1
