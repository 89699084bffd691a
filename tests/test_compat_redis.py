"""The txredisapi shortcuts: checked at start-up, counted when they run, and left
behind for txredisapi's public path when the library no longer has what they need.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogLevel, globalLogPublisher

from chatserver.broker.redis import RedisBroker, RedisTLSUnavailable
from chatserver.compat import FastPaths
from chatserver.compat import txredisapi as compat
from chatserver.compat.txredisapi import (
    CHECKS,
    INLINE_BULK,
    PUBLISH,
    PUSH,
    REQUIRED,
    InlineBulk,
    SlicedPublish,
    SlicedPushes,
)
from chatserver.config import Config

ensure = pytest_twisted.ensureDeferred
RedisProtocol = txredisapi.RedisProtocol.__name__  # BaseRedisProtocol, or Hiredis...


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The warnings chatserver.compat logs meanwhile, formatted."""
    from twisted.logger import formatEvent

    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "chatserver.compat" and event["log_level"] is (
            LogLevel.warn
        ):
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_every_check_passes_on_the_installed_txredisapi():
    assert {name: check() for name, check in {**CHECKS, **REQUIRED}.items()} == {
        PUSH: [],
        PUBLISH: [],
        INLINE_BULK: [],
        "redis_tls_handshake_wait": [],
    }


def test_with_fast_paths_off_no_check_runs_and_nothing_is_taken(warnings):
    ran: list[str] = []

    def failing(name: str) -> Callable[[], list[str]]:
        return lambda: ran.append(name) or [f"txredisapi.{name}"]

    fast_paths = FastPaths(False, {name: failing(name) for name in CHECKS})
    assert ran == [] and warnings == []
    assert not any(fast_paths.on(name) for name in CHECKS)


# -- what a check notices ---------------------------------------------------------


def without_instance_attribute(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """As if a txredisapi release renamed an attribute its protocols set in __init__.

    txredisapi itself never reads ``bulk_length`` before setting it, so its own
    parser keeps working: only what reads it from outside must notice.
    """
    init = txredisapi.BaseRedisProtocol.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.__dict__.pop(name)

    monkeypatch.setattr(txredisapi.BaseRedisProtocol, "__init__", patched)


def test_a_renamed_instance_attribute_is_reported_by_name(monkeypatch):
    without_instance_attribute(monkeypatch, "bulk_length")
    assert CHECKS[PUSH]() == ["txredisapi.SubscriberProtocol.bulk_length"]
    assert CHECKS[PUBLISH]() == [f"txredisapi.{RedisProtocol}.bulk_length"]
    assert CHECKS[INLINE_BULK]() == []  # does not read it


def test_a_changed_signature_is_reported(monkeypatch):
    def setLineMode(self: Any, rest: bytes = b"") -> None:
        pass

    monkeypatch.setattr(txredisapi.LineReceiver, "setLineMode", setLineMode)
    assert CHECKS[INLINE_BULK]() == [f"txredisapi.{RedisProtocol}.setLineMode(extra)"]


def test_parser_state_that_no_longer_means_what_it_meant_is_reported(monkeypatch):
    # As hiredis' parser would: the attributes are all there, but the bytes of
    # an unfinished reply are kept somewhere else.
    def dataReceived(self: Any, data: bytes, unpause: bool = False) -> None:
        self.elsewhere = getattr(self, "elsewhere", b"") + data

    monkeypatch.setattr(txredisapi.BaseRedisProtocol, "dataReceived", dataReceived)
    for name in (PUSH, PUBLISH):
        missing = CHECKS[name]()
        assert missing and all("meaning changed" in m for m in missing), missing


def test_a_protocol_that_acts_before_connection_made_fails_the_tls_check(monkeypatch):
    make_connection = txredisapi.BaseRedisProtocol.makeConnection

    def makeConnection(self: Any, transport: Any) -> None:
        make_connection(self, transport)
        txredisapi.BaseRedisProtocol.connectionMade(self)  # AUTH before connectionMade

    monkeypatch.setattr(txredisapi.BaseRedisProtocol, "makeConnection", makeConnection)
    assert REQUIRED["redis_tls_handshake_wait"]() == [
        f"txredisapi.{RedisProtocol}.makeConnection (acts before connectionMade)"
    ]


def test_rediss_is_refused_at_start_up_when_tls_verification_cannot_be_waited_for(monkeypatch):
    monkeypatch.setitem(REQUIRED, "redis_tls_handshake_wait", lambda: ["txredisapi.X.y"])
    fast_paths = FastPaths(True, CHECKS)
    with pytest.raises(RedisTLSUnavailable, match=r"rediss:// is refused.*txredisapi\.X\.y"):
        RedisBroker(Config(redis_url="rediss://localhost:1/0"), reactor, fast_paths)
    # redis:// does not need it.
    RedisBroker(Config(redis_url="redis://localhost:1/0"), reactor, fast_paths)


# -- over a real Redis ----------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def brokers() -> Any:
    """start(url, fast_paths) -> (broker, [room messages received]); stopped after."""
    started: list[RedisBroker] = []

    def start(url: str, fast_paths: FastPaths) -> tuple[RedisBroker, list[tuple[str, bytes]]]:
        # One publisher: Redis then handles the publishes in the order they were sent.
        config = Config(redis_url=url, redis_keepalive=0.5, redis_publishers=1)
        broker = RedisBroker(config, reactor, fast_paths)
        got: list[tuple[str, bytes]] = []
        broker.start(got.extend, lambda: None, lambda payload: None)
        started.append(broker)
        return broker, got

    yield start
    for broker in started:
        await broker.stop()


async def flow(brokers: Any, url: str, a_paths: FastPaths, b_paths: FastPaths) -> None:
    """A publishes 50 messages to a room B holds: B gets them all, in order."""
    a, _ = brokers(url, a_paths)
    b, got = brokers(url, b_paths)
    await gatherResults([x.when_connected() for x in (a, b)]).addTimeout(15, reactor)
    await b.subscribe("r")
    sent = [("r", b"m%d" % i) for i in range(50)]
    for room, payload in sent:
        a.publish(room, payload)
    deadline = reactor.seconds() + 15
    while len(got) < len(sent) and reactor.seconds() < deadline:
        await sleep(0.05)
    assert got == sent
    assert (a.published, a.publish_failures) == (50, 0)


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest.mark.redis
@pytest.mark.parametrize("wanted", [True, False], ids=["on", "off"])
@ensure
async def test_each_fast_path_ran_when_on_and_not_when_off(brokers, redis, wanted):
    a_paths, b_paths = FastPaths(wanted, CHECKS), FastPaths(wanted, CHECKS)
    await flow(brokers, redis.url, a_paths, b_paths)
    if wanted:
        assert a_paths.runs[PUBLISH] == 50  # every publish, one format each
        assert 0 < b_paths.runs[PUSH] <= 50  # messages sliced (a PONG in a read ends it)
        assert b_paths.runs[INLINE_BULK] > 0  # at least the SUBSCRIBE replies
    else:
        assert a_paths.runs == {} and b_paths.runs == {}


def test_the_protocol_classes_hold_only_the_enabled_fast_paths():
    def mixins(fast_paths: FastPaths) -> set[type]:
        broker = RedisBroker(Config(redis_url="redis://localhost:1/0"), reactor, fast_paths)
        found = set(broker.subscriber_protocol.__mro__) | set(broker.publisher_protocol.__mro__)
        return found & {SlicedPushes, SlicedPublish, InlineBulk}

    assert mixins(FastPaths(True, CHECKS)) == {SlicedPushes, SlicedPublish, InlineBulk}
    assert mixins(FastPaths(False, CHECKS)) == set()
    only_inline = FastPaths(True, {**CHECKS, PUSH: lambda: ["x"], PUBLISH: lambda: ["y"]})
    assert mixins(only_inline) == {InlineBulk}


@pytest.mark.redis
@ensure
async def test_a_missing_library_attribute_turns_its_fast_paths_off_and_messages_still_flow(
    brokers, redis, monkeypatch, warnings
):
    without_instance_attribute(monkeypatch, "bulk_length")
    a_paths, b_paths = FastPaths(True, CHECKS), FastPaths(True, CHECKS)
    assert a_paths.missing[PUSH] == ["txredisapi.SubscriberProtocol.bulk_length"]
    assert a_paths.missing[PUBLISH] == [f"txredisapi.{RedisProtocol}.bulk_length"]
    assert (a_paths.on(PUSH), a_paths.on(PUBLISH), a_paths.on(INLINE_BULK)) == (
        False,
        False,
        True,
    )
    # One warning per fast path turned off (per FastPaths), naming what is missing.
    assert len(warnings) == 4
    for name in (PUSH, PUBLISH):
        mine = [w for w in warnings if f"fast path {name} is off" in w]
        assert len(mine) == 2 and all("bulk_length" in w for w in mine), warnings
    await flow(brokers, redis.url, a_paths, b_paths)
    assert a_paths.runs[PUBLISH] == 0 and b_paths.runs[PUSH] == 0


@pytest.mark.redis
@ensure
async def test_one_failing_check_turns_off_that_path_only_with_one_warning(
    brokers, redis, warnings
):
    checks = {**CHECKS, PUBLISH: lambda: ["txredisapi.RedisProtocol.replyQueue"]}
    a_paths = FastPaths(True, checks)
    assert len(warnings) == 1
    assert "fast path redis_publish is off" in warnings[0]
    assert "txredisapi.RedisProtocol.replyQueue" in warnings[0]
    assert [name for name in CHECKS if a_paths.on(name)] == [PUSH, INLINE_BULK]
    b_paths = FastPaths(True, CHECKS)
    await flow(brokers, redis.url, a_paths, b_paths)
    # A published through txredisapi's execute_command; B still sliced.
    assert a_paths.runs[PUBLISH] == 0
    assert b_paths.runs[PUSH] > 0


def test_the_broker_module_reaches_into_no_txredisapi_internals():
    import chatserver.broker.redis as broker_module

    source = inspect.getsource(broker_module)
    for name in (
        "replyQueue",
        "bulk_length",
        "multi_bulk",
        "line_mode",
        "_LineReceiver__buffer",
        "_connectionReady",
        "setLineMode",
        "unpause",
        "disconnectCalled",
        ".pool",
        ".stopped",
    ):
        assert name not in source, name
    assert compat.__name__ == "chatserver.compat.txredisapi"


@pytest.mark.redis
@pytest.mark.parametrize("wanted", [True, False], ids=["on", "off"])
@ensure
async def test_whole_servers_over_redis_count_their_runs(make_server, redis, wanted):
    """The server hands its FastPaths to its RedisBroker: what the broker takes, it counts."""
    from wsclient import connect

    a, b = (make_server(redis_url=redis.url, fast_paths=wanted) for _ in range(2))
    await gatherResults([s.broker.when_connected() for s in (a, b)]).addTimeout(15, reactor)
    ca, cb = await connect(a.port, "alice"), await connect(b.port, "bob")
    await ca.join("r")
    await cb.join("r")
    for i in range(5):
        await ca.request({"type": "send", "room": "r", "body": f"m{i}"})
    for i in range(5):
        assert (await cb.expect("message"))["body"] == f"m{i}"
    if wanted:
        assert all(a.fast_paths.on(name) for name in CHECKS), a.fast_paths.missing
        assert a.fast_paths.runs[PUBLISH] >= 5
        assert b.fast_paths.runs[PUSH] > 0
    else:
        assert not any(a.fast_paths.runs[name] for name in CHECKS)
        assert not any(b.fast_paths.runs[name] for name in CHECKS)
    await ca.close()
    await cb.close()
