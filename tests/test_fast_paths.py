"""The shortcuts through Twisted's and Autobahn's internals: each runs when on, the
public path serves the whole protocol when off, and a library that lost what a
shortcut relies on turns that shortcut off at start-up, with one warning.

(txredisapi's shortcuts have the same tests in test_compat_redis.py.)
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher
from wsclient import connect, http_get

from chatserver.compat import FastPaths
from chatserver.compat import autobahn as autobahn_compat
from chatserver.compat import twisted as twisted_compat
from chatserver.transport.protocol import ChatProtocol

ensure = pytest_twisted.ensureDeferred

SERVER_PATHS = (
    autobahn_compat.INBOUND_FRAMES,
    autobahn_compat.LEAN_CONNECTIONS,
    twisted_compat.DIRECT_WRITE,
    twisted_compat.LEAN_TRANSPORT,
    twisted_compat.LEAN_POLL,
)


async def chat_a_little(server) -> None:
    """Two clients, a room, a few messages each way: every path gets used."""
    a = await connect(server.port, "alice")
    b = await connect(server.port, "bob")
    await a.join("r")
    await b.join("r")
    for i in range(3):
        ack = await a.request({"type": "send", "room": "r", "body": f"m{i}"})
        assert ack["type"] == "ack"
        assert (await b.expect("message"))["body"] == f"m{i}"
    history = await b.request({"type": "history", "room": "r", "limit": 10})
    assert [m["body"] for m in history["messages"]] == ["m0", "m1", "m2"]
    await a.close()
    await b.close()


@ensure
async def test_every_fast_path_runs_when_on(make_server):
    server = make_server(fast_paths=True)
    assert all(server.fast_paths.on(name) for name in SERVER_PATHS), server.fast_paths.missing
    await chat_a_little(server)
    runs = server.fast_paths.runs
    assert runs[autobahn_compat.INBOUND_FRAMES] >= 5  # join, three sends, history
    assert runs[autobahn_compat.LEAN_CONNECTIONS] >= 2  # each connection as it opened
    assert server.factory.direct_writes > 0
    assert runs[twisted_compat.LEAN_POLL] > 0  # the reactor polled without the log wrapper
    code, body = await http_get(server.port, "/metrics")
    text = body.decode()
    assert code == 200
    assert 'chatserver_fast_path_enabled{path="inbound_frames"} 1.0' in text
    assert 'chatserver_fast_path_runs_total{path="inbound_frames"}' in text


@ensure
async def test_the_public_path_speaks_the_whole_protocol_when_off(make_server):
    server = make_server(fast_paths=False)
    assert not any(server.fast_paths.on(name) for name in server.fast_paths.names())
    # No shortcut's mixin is in the class that serves the connections.
    assert server.factory.protocol.__bases__ == (ChatProtocol,)
    await chat_a_little(server)
    assert sum(server.fast_paths.runs.values()) == 0
    assert server.factory.direct_writes == 0


@pytest.fixture
def warnings():
    seen: list[str] = []

    def observe(event):
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            seen.append(event.get("log_format", "").format(**event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@ensure
async def test_a_library_missing_what_a_shortcut_needs_turns_it_off(
    make_server, monkeypatch, warnings
):
    # As if new releases had renamed one thing each shortcut reads.
    monkeypatch.setitem(twisted_compat._TRANSPORT_STATE, "_tempDataLenRenamed", int)
    monkeypatch.setitem(autobahn_compat.INBOUND_STATE, "current_frame_renamed", None)
    monkeypatch.setitem(autobahn_compat.AT_REST, "closedByMe_renamed", False)
    server = make_server(fast_paths=True)
    fast = server.fast_paths
    assert not fast.on(twisted_compat.DIRECT_WRITE)
    assert not fast.on(autobahn_compat.INBOUND_FRAMES)
    assert not fast.on(autobahn_compat.LEAN_CONNECTIONS)
    assert fast.on(twisted_compat.LEAN_TRANSPORT)  # its check still passes
    assert fast.missing[twisted_compat.DIRECT_WRITE] == ["tcp.Connection._tempDataLenRenamed (int)"]
    named = [w for w in warnings if "fast path" in w]
    assert len(named) == 3 and any("current_frame_renamed" in w for w in named), named
    await chat_a_little(server)
    assert fast.runs[autobahn_compat.INBOUND_FRAMES] == 0
    assert server.factory.direct_writes == 0


def test_each_check_passes_against_the_pinned_libraries():
    checks = {**twisted_compat.CHECKS, **autobahn_compat.CHECKS}
    assert {name: check() for name, check in checks.items()} == {name: [] for name in checks}


def test_fast_paths_off_runs_no_check():
    def boom() -> list[str]:
        raise AssertionError("a check ran with fast paths off")

    fast = FastPaths(False, {"x": boom})
    assert not fast.on("x") and fast.missing == {"x": []}
