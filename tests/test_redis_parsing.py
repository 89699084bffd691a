"""The Redis connections parse every read right, with the fast paths on and off.

With them on, a whole read is parsed in one pass and pub/sub messages are
sliced out of it (txredisapi alone does not); with them off, the classes are
txredisapi's own behaviour and must deliver the same, only later and slower.
The protocol classes are built exactly as the broker builds them.
"""

from __future__ import annotations

from typing import Any

import pytest
import txredisapi
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from chatserver.compat import FastPaths
from chatserver.compat.txredisapi import (
    CHECKS,
    HELD_MAX,
    INLINE_BULK,
    PUBLISH,
    PUSH,
    Pushes,
    publisher_class,
    subscriber_class,
)


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


def failed(name: str) -> dict[str, Any]:
    return {name: lambda: [f"txredisapi.{name} (failed for this test)"]}


# All on, all off, and the two partial sets a failed check leaves: slicing over
# txredisapi's turn-by-turn parser, and the inline parser alone.
FAST_PATH_SETS = {
    "fast": (True, CHECKS),
    "plain": (False, CHECKS),
    "no_inline": (True, {**CHECKS, **failed(INLINE_BULK)}),
    "inline_only": (True, {**CHECKS, **failed(PUSH), **failed(PUBLISH)}),
}


@pytest.fixture(params=list(FAST_PATH_SETS))
def fast_paths(request: Any) -> FastPaths:
    wanted, checks = FAST_PATH_SETS[request.param]
    return FastPaths(wanted, checks)


class SubscriberHead:
    """In the broker's place: records what it would be handed, and txredisapi's own work."""

    def pushes_received(self, pushes: Pushes) -> None:
        self.reads.append(list(pushes))

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.reads.append([(channel, message)])

    def lineReceived(self, line: Any) -> Any:
        self.lines += 1  # lines txredisapi parsed itself
        return super().lineReceived(line)  # type: ignore[misc]

    def replyReceived(self, reply: Any) -> None:
        if not (isinstance(reply, list) and reply and reply[0] == b"message"):
            self.replies.append(reply)
        super().replyReceived(reply)  # type: ignore[misc]


class PublisherHead:
    def lineReceived(self, line: Any) -> Any:
        self.lines += 1
        return super().lineReceived(line)  # type: ignore[misc]


class Conn:
    """A protocol on a fake transport and a fake clock, for txredisapi's deferred re-entries."""

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.clock = Clock()
        proto.callLater = self.clock.callLater
        proto.reads, proto.replies, proto.lines = [], [], 0
        self.transport = StringTransport()
        proto.transport = self.transport
        proto.connected = 1
        self.transport.registerProducer(proto, True)

    def feed(self, data: bytes) -> None:
        """One read, then every turn txredisapi deferred the rest of it to."""
        self.proto.dataReceived(data)
        while self.clock.getDelayedCalls():
            self.clock.advance(0)

    @property
    def got(self) -> list[tuple[bytes, bytes]]:
        return [m for read in self.proto.reads for m in read]


def subscriber(fast_paths: FastPaths) -> Conn:
    cls = subscriber_class("Subscriber", (SubscriberHead,), fast_paths)
    return Conn(cls(charset=None, convertNumbers=False))  # as the broker's factory


def publisher(fast_paths: FastPaths) -> Conn:
    cls = publisher_class("Publisher", (PublisherHead,), fast_paths)
    return Conn(cls(charset=None, convertNumbers=False))


def test_the_classes_are_txredisapis_own_without_fast_paths():
    off = FastPaths(False, CHECKS)
    sub = subscriber_class("S", (SubscriberHead,), off)
    pub = publisher_class("P", (PublisherHead,), off)
    assert sub.__bases__ == (SubscriberHead, txredisapi.SubscriberProtocol)
    assert pub.__bases__ == (PublisherHead, txredisapi.RedisProtocol)
    assert pub.publish is txredisapi.RedisProtocol.publish  # execute_command("PUBLISH", ...)


def test_a_burst_of_messages_is_parsed_wherever_the_read_ends(fast_paths):
    payloads = [b'%d {"body":"\\r\\n $3"}' % i for i in range(5)]
    burst = b"".join(message(b"chat:0:room:r", p) for p in payloads)
    for cut in range(len(burst) + 1):
        conn = subscriber(fast_paths)
        conn.proto.dataReceived(burst[:cut])
        conn.proto.dataReceived(burst[cut:])
        if fast_paths.on(INLINE_BULK):
            # Everything that arrived is delivered before dataReceived returns,
            # and the socket was never paused for a reactor turn.
            assert conn.got == [(b"chat:0:room:r", p) for p in payloads], cut
            assert conn.clock.getDelayedCalls() == [], cut
        conn.feed(b"")
        assert conn.got == [(b"chat:0:room:r", p) for p in payloads], cut
        assert conn.transport.producerState == "producing", cut


def test_a_message_cut_short_waits_for_its_end(fast_paths):
    whole = message(b"c", b"x" * 100)
    conn = subscriber(fast_paths)
    conn.feed(whole[:-10])
    assert conn.got == []
    conn.feed(whole[-10:] + message(b"c", b"y"))
    assert conn.got == [(b"c", b"x" * 100), (b"c", b"y")]


def test_reads_that_end_anywhere_keep_every_message_on_the_fast_path():
    # Under load a read ends wherever the socket buffer did: the message it cut
    # is held for the next read, so txredisapi's parser never takes over.
    payloads = [b'%d {"body":"\\r\\n $3 *3"}' % i for i in range(6)]
    burst = b"".join(message(b"chat:0:room:r", p) for p in payloads)
    for first in range(len(burst) + 1):
        for second in (first, (first + len(burst)) // 2):
            fast = FastPaths(True, CHECKS)
            conn = subscriber(fast)
            for piece in (burst[:first], burst[first:second], burst[second:]):
                conn.proto.dataReceived(piece)
            assert conn.got == [(b"chat:0:room:r", p) for p in payloads], (first, second)
            assert conn.proto.lines == 0, (first, second)
            assert fast.runs[PUSH] == len(payloads)


def test_a_held_message_that_turns_out_otherwise_goes_to_txredisapi(fast_paths):
    # "*3\r\n$" starts a message and a subscribe confirmation alike.
    confirm = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nd\r\n:2\r\n"
    data = message(b"c", b"1") + confirm + message(b"c", b"2")
    for cut in range(len(data) + 1):
        conn = subscriber(fast_paths)
        conn.feed(data[:cut])
        conn.feed(data[cut:])
        assert conn.got == [(b"c", b"1"), (b"c", b"2")], cut
        assert conn.proto.replies == [[b"subscribe", b"d", 2]], cut


def test_integer_replies_cut_anywhere_skip_the_line_parser():
    replies = b":1\r\n:10\r\n:200\r\n"
    for cut in range(len(replies) + 1):
        fast = FastPaths(True, CHECKS)
        conn = publisher(fast)
        got: list[Any] = []
        for _ in range(3):
            conn.proto.publish(b"c", b"x").addCallback(got.append)
        conn.proto.dataReceived(replies[:cut])
        conn.proto.dataReceived(replies[cut:])
        assert got == [1, 10, 200], cut
        assert conn.proto.lines == 0, cut


def test_a_held_reply_is_bounded():
    # A length past HELD_MAX is not waited for here: txredisapi's parser takes it.
    conn = subscriber(FastPaths(True, CHECKS))
    head = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$%d\r\n" % (HELD_MAX + 10)
    conn.proto.dataReceived(head + b"x" * (HELD_MAX - len(head) + 1))
    assert conn.proto.lines > 0
    assert conn.proto._held == b""


def test_pipelined_bulk_replies_resolve_in_order(fast_paths):
    conn = publisher(fast_paths)
    results: list[Any] = []
    for key in ("a", "b", "c"):
        conn.proto.execute_command("GET", key).addCallback(results.append)
    conn.feed(b"$3\r\none\r\n$-1\r\n$5\r\nthree\r\n")
    assert results == [b"one", None, b"three"]


def test_whole_messages_are_sliced_out_as_one_list_without_the_line_parser():
    fast = FastPaths(True, CHECKS)
    conn = subscriber(fast)
    conn.proto.dataReceived(b"".join(message(b"c", b"m%d" % i) for i in range(50)))
    assert conn.proto.reads == [[(b"c", b"m%d" % i) for i in range(50)]]
    assert conn.proto.lines == 0
    assert fast.runs[PUSH] == 50


def test_each_read_is_one_list_with_the_fast_path_and_one_per_message_without(fast_paths):
    conn = subscriber(fast_paths)
    first = [b"1 a", b"2 b", b"3 c"]
    conn.feed(b"".join(message(b"chat:0:room:r", p) for p in first))
    conn.feed(message(b"chat:0:room:r", b"4 d"))
    reads = [[m for _, m in read] for read in conn.proto.reads]
    if fast_paths.on(PUSH):
        assert reads == [first, [b"4 d"]]
    else:
        assert reads == [[b"1 a"], [b"2 b"], [b"3 c"], [b"4 d"]]


def test_other_replies_between_messages_reach_txredisapi(fast_paths):
    confirm = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nd\r\n:2\r\n"
    pong = b"+PONG\r\n"
    data = message(b"c", b"1") + confirm + message(b"c", b"2") + pong + message(b"d", b"3")
    for cut in range(len(data) + 1):
        conn = subscriber(fast_paths)
        conn.feed(data[:cut])
        conn.feed(data[cut:])
        assert conn.got == [(b"c", b"1"), (b"c", b"2"), (b"d", b"3")], cut
        assert conn.proto.replies == [[b"subscribe", b"d", 2], "PONG"], cut


def test_a_malformed_length_goes_to_txredisapi():
    conn = subscriber(FastPaths(True, CHECKS))
    conn.feed(b"*3\r\n$7\r\nmessage\r\n$x\r\n")
    assert conn.got == []
    assert conn.proto.lines > 0


def test_publish_writes_what_txredisapi_would(fast_paths):
    conn = publisher(fast_paths)
    payload = b'7 {"body":"\r\n$3\r\n"}'
    conn.proto.publish(b"chat:0:room:r", payload)
    assert conn.transport.value() == (
        b"*3\r\n$7\r\nPUBLISH\r\n$13\r\nchat:0:room:r\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    )


def outcome(result: Any) -> Any:
    """A reply either way: the fast path fires with an exception, execute_command errbacks."""
    return result.value if isinstance(result, Failure) else result


def test_replies_stay_matched_to_their_commands_wherever_the_read_ends(fast_paths):
    replies = b":1\r\n:0\r\n+PONG\r\n-ERR wrong\r\n:12\r\n"
    for cut in range(len(replies) + 1):
        conn = publisher(fast_paths)
        got: list[Any] = []
        conn.proto.publish(b"c", b"1").addBoth(got.append)
        conn.proto.publish(b"c", b"2").addBoth(got.append)
        conn.proto.execute_command(b"PING").addBoth(got.append)
        conn.proto.publish(b"c", b"3").addBoth(got.append)
        conn.proto.publish(b"c", b"4").addBoth(got.append)
        conn.feed(replies[:cut])
        conn.feed(replies[cut:])
        got = [outcome(r) for r in got]
        assert got[:3] == [1, 0, "PONG"], cut
        assert isinstance(got[3], txredisapi.ResponseError), cut
        assert got[4:] == [12], cut


def test_integer_replies_skip_the_line_parser():
    fast = FastPaths(True, CHECKS)
    conn = publisher(fast)
    got: list[Any] = []
    for _ in range(20):
        conn.proto.publish(b"c", b"x").addCallback(got.append)
    conn.feed(b":1\r\n" * 20)
    assert got == [1] * 20
    assert conn.proto.lines == 0
    assert fast.runs[PUBLISH] == 20


def test_publishes_waiting_when_the_connection_drops_get_the_error(fast_paths):
    conn = publisher(fast_paths)
    got: list[Any] = []
    conn.proto.publish(b"c", b"x").addBoth(got.append)
    conn.proto.connectionLost(Failure(ConnectionError("gone")))
    assert len(got) == 1 and isinstance(outcome(got[0]), txredisapi.ConnectionError)
    with pytest.raises(txredisapi.ConnectionError):
        conn.proto.publish(b"c", b"y")


def test_each_fast_path_counts_its_runs_and_none_counts_when_off(fast_paths):
    sub, pub = subscriber(fast_paths), publisher(fast_paths)
    # Three messages, then a subscribe confirmation and one more message, both
    # parsed by txredisapi (bulk strings with data behind them).
    confirm = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nd\r\n:2\r\n"
    sub.feed(b"".join(message(b"c", b"%d" % i) for i in range(3)) + confirm + message(b"c", b"3"))
    pub.proto.publish(b"c", b"x")
    pub.feed(b":1\r\n")
    assert len(sub.got) == 4
    # Slicing stops at the confirmation: the last message is txredisapi's to parse.
    assert fast_paths.runs[PUSH] == (3 if fast_paths.on(PUSH) else 0)
    assert fast_paths.runs[PUBLISH] == (1 if fast_paths.on(PUBLISH) else 0)
    # Parsed on in the same pass after "subscribe", "d", "message" and "c"
    # (and, without slicing, after three bulk strings of each sliced message).
    inline = 4 if fast_paths.on(PUSH) else 4 + 3 * 3
    assert fast_paths.runs[INLINE_BULK] == (inline if fast_paths.on(INLINE_BULK) else 0)
    if not fast_paths.wanted:
        assert fast_paths.runs == {}
