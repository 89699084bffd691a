"""The cluster broker's RESP2 parser and node connection, byte by byte.

The parser must give the same values however the bytes are cut into reads;
the connection must match replies to commands in order while pushes and
Redis' own unsubscribes arrive in between, and must drop itself rather than
misroute a reply. Connections run on a StringTransport and a fake clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from chatserver.broker.cluster_slots import key_slot
from chatserver.broker.resp import (
    MAX_DEPTH,
    MAX_LINE,
    AskError,
    ConnectionLostError,
    MovedError,
    ProtocolError,
    ReplyError,
    ReplyTooLarge,
    RespParser,
    RespProtocol,
    encode_command,
)


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def smessage(channel: bytes, payload: bytes) -> bytes:
    return array(bulk(b"smessage"), bulk(channel), bulk(payload))


# Every kind of value, and pushes, in one stream; the values each part gives.
STREAM: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", b"OK"),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (bulk(b"hello"), b"hello"),
    (bulk(b""), b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (bulk(b"line\r\nbreaks\r\n inside"), b"line\r\nbreaks\r\n inside"),
    (smessage(b"chat:0:room:r", b'7 {"a":1}'), (b"chat:0:room:r", b'7 {"a":1}')),
    (smessage(b"c", b"payload\r\nwith CRLF"), (b"c", b"payload\r\nwith CRLF")),
    (smessage(b"c", b""), (b"c", b"")),
    (b"*2\r\n:0\r\n:5460\r\n", [0, 5460]),
    (
        array(
            b":0\r\n",
            b":5460\r\n",
            array(bulk(b"127.0.0.1"), b":7000\r\n", bulk(b"id1"), b"*0\r\n"),
            array(bulk(b"127.0.0.1"), b":7003\r\n", bulk(b"id2"), b"*0\r\n"),
        ),
        [0, 5460, [b"127.0.0.1", 7000, b"id1", []], [b"127.0.0.1", 7003, b"id2", []]],
    ),
    (array(bulk(b"ssubscribe"), bulk(b"c"), b":1\r\n"), [b"ssubscribe", b"c", 1]),
    (array(bulk(b"pong"), bulk(b"")), [b"pong", b""]),
    (array(bulk(b"a"), b"$-1\r\n", b":3\r\n"), [b"a", None, 3]),
    (b"-ERR unknown command 'x', with args beginning with: \r\n", ReplyError),
    (b"-MOVED 3999 127.0.0.1:6381\r\n", MovedError),
    (b"-ASK 3999 127.0.0.1:6382\r\n", AskError),
    (smessage(b"\xff\x00binary", bytes(range(256))), (b"\xff\x00binary", bytes(range(256)))),
]
WHOLE = b"".join(data for data, _ in STREAM)


def check(values: list[Any]) -> None:
    assert len(values) == len(STREAM)
    for value, (_, expected) in zip(values, STREAM, strict=True):
        if isinstance(expected, type):
            assert type(value) is expected
        else:
            assert value == expected
            assert type(value) is type(expected)


def test_the_whole_stream_in_one_read():
    check(RespParser().feed(WHOLE))


def test_split_at_every_byte_boundary():
    for cut in range(len(WHOLE) + 1):
        parser = RespParser()
        values = parser.feed(WHOLE[:cut]) + parser.feed(WHOLE[cut:])
        check(values)
        assert parser.buffered == 0


def test_one_byte_at_a_time():
    parser = RespParser()
    values: list[Any] = []
    for i in range(len(WHOLE)):
        values += parser.feed(WHOLE[i : i + 1])
    check(values)


def test_split_in_three_everywhere_around_a_push():
    data = b":1\r\n" + smessage(b"chat:0:room:x", b"12 body") + b"+OK\r\n"
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            parser = RespParser()
            values = parser.feed(data[:i]) + parser.feed(data[i:j]) + parser.feed(data[j:])
            assert values == [1, (b"chat:0:room:x", b"12 body"), b"OK"]


def test_a_large_bulk_arriving_in_many_reads_is_joined_once():
    """16 MiB in 2 KiB reads: joining (or re-parsing) what is held on every read
    copies about 64 GB (seconds); holding the reads until the length is there
    copies once (milliseconds)."""
    import time

    payload = bytes(range(256)) * (16 * 4096)
    data = smessage(b"c", payload)
    parser = RespParser()
    got: list[Any] = []
    started = time.process_time()
    for i in range(0, len(data), 2048):
        got += parser.feed(data[i : i + 2048])
    assert time.process_time() - started < 0.5
    assert got == [(b"c", payload)]
    assert parser.buffered == 0


def test_redirects_name_slot_host_and_port():
    moved = ReplyError.parse("MOVED 3999 127.0.0.1:6381")
    assert isinstance(moved, MovedError)
    assert (moved.slot, moved.host, moved.port, moved.code) == (3999, "127.0.0.1", 6381, "MOVED")
    ask = ReplyError.parse("ASK 12 10.0.0.2:7000")
    assert isinstance(ask, AskError) and (ask.slot, ask.host, ask.port) == (12, "10.0.0.2", 7000)
    ipv6 = ReplyError.parse("MOVED 1 ::1:7000")
    assert (ipv6.host, ipv6.port) == ("::1", 7000)
    unknown = ReplyError.parse("MOVED 1 :7000")  # "the node you asked"
    assert (unknown.host, unknown.port) == ("", 7000)
    for text in (
        "MOVED",
        "MOVED x 1.2.3.4:5",
        "MOVED 1 nowhere",
        "CLUSTERDOWN The cluster is down",
    ):
        error = ReplyError.parse(text)
        assert type(error) is ReplyError and error.text == text
    assert ReplyError.parse("CLUSTERDOWN The cluster is down").code == "CLUSTERDOWN"


def test_oversize_replies_are_refused():
    parser = RespParser(max_reply=1000)
    with pytest.raises(ReplyTooLarge):
        parser.feed(b"$1001\r\n")  # refused on the header, nothing buffered
    parser = RespParser(max_reply=1000)
    with pytest.raises(ReplyTooLarge):
        parser.feed(b"*400\r\n")
    # Many elements each small, together too big: refused once the total is.
    parser = RespParser(max_reply=1000)
    data = array(*[bulk(b"x" * 50)] * 30)
    with pytest.raises(ReplyTooLarge):
        for i in range(0, len(data), 10):
            parser.feed(data[i : i + 10])
    assert RespParser(max_reply=1000).feed(bulk(b"x" * 900)) == [b"x" * 900]


def test_garbage_is_a_protocol_error():
    for data in (b"?what\r\n", b"$abc\r\n", b":1x\r\n", b"$3\r\nabcXY", b"x" * (MAX_LINE + 1)):
        with pytest.raises(ProtocolError):
            RespParser().feed(data)
    nested = b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n"
    with pytest.raises(ProtocolError):
        RespParser().feed(nested)
    assert RespParser().feed(b"*1\r\n" * MAX_DEPTH + b":1\r\n")  # deep enough is fine


def test_encode_command():
    assert encode_command(["SET", b"k\r\n", 5]) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n"


# -- the connection --------------------------------------------------------------


class Handler:
    """Records what a connection reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def connection_ready(self, proto: RespProtocol) -> None:
        self.events.append(("ready", None))

    def connection_lost(self, proto: RespProtocol, reason: Failure) -> None:
        self.events.append(("lost", proto.error))

    def pushes_received(self, proto: RespProtocol, pushes: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("pushes", pushes))

    def unsubscribed(self, proto: RespProtocol, channel: bytes) -> None:
        self.events.append(("unsubscribed", channel))


TIMEOUT = 5.0


def connection(**auth: Any) -> tuple[RespProtocol, Handler, StringTransport, Clock]:
    clock = Clock()
    handler = Handler()
    proto = RespProtocol(handler, clock, TIMEOUT, **auth)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, handler, transport, clock


def lose(proto: RespProtocol, transport: StringTransport) -> None:
    """What the reactor does after abortConnection: connectionLost."""
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionLostError("aborted")))


def replies(proto: RespProtocol, *commands: tuple[Any, ...]) -> list[Any]:
    got: list[Any] = []
    for command in commands:
        proto.command(*command).addBoth(got.append)
    return got


def test_auth_with_a_user_goes_first_and_then_the_connection_is_ready():
    proto, handler, transport, _ = connection(username="chat", password="s3cret")
    assert transport.value() == encode_command(["AUTH", "chat", "s3cret"])
    assert handler.events == []
    proto.dataReceived(b"+OK\r\n")
    assert handler.events == [("ready", None)] and proto.ready


def test_auth_with_a_password_only():
    proto, handler, transport, _ = connection(password="s3cret")
    assert transport.value() == encode_command(["AUTH", "s3cret"])
    proto.dataReceived(b"+OK\r\n")
    assert handler.events == [("ready", None)]


def test_no_password_no_auth():
    _proto, handler, transport, _ = connection()
    assert transport.value() == b""
    assert handler.events == [("ready", None)]


def test_a_failed_auth_drops_the_connection():
    proto, handler, transport, _ = connection(password="wrong")
    proto.dataReceived(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    lose(proto, transport)
    assert handler.events[0][0] == "lost" and "AUTH failed: WRONGPASS" in handler.events[0][1]


def test_tls_waits_for_the_handshake_before_auth():
    clock, handler = Clock(), Handler()
    proto = RespProtocol(handler, clock, TIMEOUT, password="pw", tls=True)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value() == b""  # not a byte to an unverified server
    proto.handshakeCompleted()
    assert transport.value() == encode_command(["AUTH", "pw"])


def test_pipelined_replies_reach_their_commands_in_order():
    proto, _, transport, _ = connection()
    got = replies(proto, ("PING",), ("GET", "k"), ("CLUSTER", "SLOTS"), ("NOPE",))
    assert transport.value() == b"".join(
        encode_command(c) for c in (["PING"], ["GET", "k"], ["CLUSTER", "SLOTS"], ["NOPE"])
    )
    proto.dataReceived(b"+PONG\r\n$-1\r\n*1\r\n*3\r\n:0\r\n:16383\r\n")
    assert got[:2] == [b"PONG", None]
    assert len(got) == 2  # the array is not complete yet
    proto.dataReceived(b"*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n-ERR unknown command 'NOPE'\r\n")
    assert got[2] == [[0, 16383, [b"127.0.0.1", 7000]]]
    assert got[3].check(ReplyError) and "unknown command" in got[3].getErrorMessage()


def test_spublish_replies_go_to_their_sinks_without_deferreds():
    proto, _, transport, _ = connection()
    got: list[Any] = []
    for n in range(3):
        proto.spublish(b"c", b"m%d" % n, lambda reply, arg: got.append((arg, reply)), n)
    assert transport.value().count(b"SPUBLISH") == 3
    proto.dataReceived(b":1\r\n:0\r\n-MOVED 1 127.0.0.1:7001\r\n")
    assert got[:2] == [(0, 1), (1, 0)]
    assert isinstance(got[2][1], MovedError) and got[2][0] == 2


def test_pushes_of_one_read_arrive_as_one_list_each_run_between_replies():
    proto, handler, _, _ = connection()
    confirmations: list[Any] = []
    for channel in (b"a", b"b"):
        proto.ssubscribe(channel, lambda reply, arg: confirmations.append(reply), None)
    handler.events.clear()
    data = (
        array(bulk(b"ssubscribe"), bulk(b"a"), b":1\r\n")
        + smessage(b"a", b"1")
        + smessage(b"a", b"2")
        + array(bulk(b"ssubscribe"), bulk(b"b"), b":2\r\n")
        + smessage(b"b", b"3")
        + smessage(b"a", b"4")
    )
    proto.dataReceived(data)
    assert confirmations == [[b"ssubscribe", b"a", 1], [b"ssubscribe", b"b", 2]]
    assert handler.events == [
        ("pushes", [(b"a", b"1"), (b"a", b"2")]),
        ("pushes", [(b"b", b"3"), (b"a", b"4")]),
    ]
    assert proto.subscribed == {b"a", b"b"}


def subscribed(*channels: bytes) -> tuple[RespProtocol, Handler, StringTransport, Clock]:
    conn = connection()
    proto, handler = conn[0], conn[1]
    for n, channel in enumerate(channels, 1):
        proto.ssubscribe(channel, lambda reply, arg: None, None)
        proto.dataReceived(array(bulk(b"ssubscribe"), bulk(channel), b":%d\r\n" % n))
    handler.events.clear()
    return conn


def test_an_unsolicited_sunsubscribe_is_reported_not_taken_for_a_reply():
    proto, handler, _, _ = subscribed(b"a", b"b")
    got = replies(proto, ("PING",))
    proto.sunsubscribe(b"b")
    # Redis drops "a" (its slot moved), then answers PING and our SUNSUBSCRIBE b.
    proto.dataReceived(
        array(bulk(b"sunsubscribe"), bulk(b"a"), b":1\r\n")
        + array(bulk(b"pong"), bulk(b""))
        + array(bulk(b"sunsubscribe"), bulk(b"b"), b":0\r\n")
    )
    assert handler.events == [("unsubscribed", b"a")]
    assert got == [[b"pong", b""]]
    assert proto.outstanding == 0 and proto.subscribed == set()


def test_our_sunsubscribe_crossing_redis_dropping_the_same_channel():
    """Redis drops "a" just before our SUNSUBSCRIBE a, which it then answers with MOVED."""
    proto, _handler, transport, _ = subscribed(b"a")
    proto.sunsubscribe(b"a")
    got = replies(proto, ("PING",))
    slot = key_slot(b"a")
    proto.dataReceived(
        array(bulk(b"sunsubscribe"), bulk(b"a"), b":0\r\n")
        + b"-MOVED %d 127.0.0.1:7001\r\n" % slot
        + b"+PONG\r\n"
    )
    assert got == [b"PONG"]  # the MOVED was the SUNSUBSCRIBE's, not the PING's
    assert not transport.disconnecting and proto.outstanding == 0


def test_a_reply_that_answers_another_command_drops_the_connection():
    proto, handler, transport, _ = connection()
    handler.events.clear()
    confirmations: list[Any] = []
    proto.ssubscribe(b"a", lambda reply, arg: confirmations.append(reply), None)
    proto.dataReceived(array(bulk(b"ssubscribe"), bulk(b"b"), b":1\r\n") + smessage(b"b", b"x"))
    assert transport.disconnecting and confirmations == []
    assert handler.events == []  # nothing read after the mismatch is used
    lose(proto, transport)
    assert isinstance(confirmations[0], ConnectionLostError)
    assert "does not answer" in handler.events[-1][1]


def test_a_reply_nobody_asked_for_drops_the_connection():
    proto, _, transport, _ = connection()
    proto.dataReceived(b"+OK\r\n")
    assert transport.disconnecting


def test_an_oversize_reply_drops_the_connection():
    clock, handler = Clock(), Handler()
    proto = RespProtocol(handler, clock, TIMEOUT, max_reply=1024)
    transport = StringTransport()
    proto.makeConnection(transport)
    got = replies(proto, ("GET", "big"))
    proto.dataReceived(b"$2000\r\n" + b"x" * 100)
    assert transport.disconnecting
    lose(proto, transport)
    assert got[0].check(ConnectionLostError)
    assert "a bulk string of 2000 bytes" in handler.events[-1][1]


def test_outstanding_commands_fail_when_the_connection_is_lost():
    proto, handler, _transport, _ = connection()
    got = replies(proto, ("PING",), ("PING",))
    sunk: list[Any] = []
    proto.spublish(b"c", b"m", lambda reply, arg: sunk.append(reply), None)
    proto.connectionLost(Failure(ConnectionLostError("gone")))
    assert [g.check(ConnectionLostError) for g in got] == [ConnectionLostError] * 2
    assert isinstance(sunk[0], ConnectionLostError)
    assert handler.events[-1][0] == "lost"
    # Sending on a lost connection answers at once, never hangs.
    late = replies(proto, ("PING",))
    assert late[0].check(ConnectionLostError)


def test_a_busy_connection_behind_on_its_replies_is_kept():
    proto, _, transport, clock = subscribed(b"c")
    replies(proto, ("PING",))
    for _ in range(20):  # four timeouts long, pushes arriving every quarter timeout
        clock.advance(TIMEOUT / 4)
        proto.dataReceived(smessage(b"c", b"x"))
    assert not transport.disconnecting


def test_a_silent_connection_with_a_reply_outstanding_is_dropped():
    proto, _, transport, clock = connection()
    replies(proto, ("PING",))
    clock.advance(TIMEOUT / 2)
    proto.dataReceived(smessage(b"c", b"x"))
    clock.advance(TIMEOUT * 0.99)
    assert not transport.disconnecting
    clock.advance(TIMEOUT * 0.02)
    assert transport.disconnecting


def test_an_idle_connection_with_nothing_outstanding_is_kept():
    proto, _, transport, clock = connection()
    replies(proto, ("PING",))
    proto.dataReceived(b"+PONG\r\n")
    clock.advance(TIMEOUT * 10)
    assert not transport.disconnecting
    replies(proto, ("PING",))  # the wait starts when a reply is asked for
    clock.advance(TIMEOUT * 0.9)
    assert not transport.disconnecting
    clock.advance(TIMEOUT * 0.2)
    assert transport.disconnecting


def test_a_command_given_up_on_still_takes_its_reply():
    """A timeout cancels the Deferred; the reply must not go to the next command."""
    proto, _, _, _ = connection()
    first = proto.command("CLUSTER", "SLOTS")
    first.addErrback(lambda _: None)
    first.cancel()
    got = replies(proto, ("PING",))
    proto.dataReceived(b"*0\r\n+PONG\r\n")
    assert got == [b"PONG"]
