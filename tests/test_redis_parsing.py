"""The Redis connections parse a whole read in one pass (txredisapi alone does not)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import txredisapi
from twisted.internet.testing import StringTransport

from chatserver.broker.redis import _FastPublish, _FastPush, _InlineBulk


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


class Subscriber(_InlineBulk, txredisapi.SubscriberProtocol):
    def __init__(self) -> None:
        super().__init__(charset=None, convertNumbers=False)  # as the broker's factory
        self.got: list[tuple[bytes, bytes]] = []
        self.lines = 0  # lines txredisapi parsed itself
        self.replies: list[Any] = []

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.got.append((channel, message))

    def lineReceived(self, line: Any) -> Any:
        self.lines += 1
        return super().lineReceived(line)

    def replyReceived(self, reply: Any) -> None:
        if not (isinstance(reply, list) and reply and reply[0] == b"message"):
            self.replies.append(reply)
        super().replyReceived(reply)


class FastSubscriber(_FastPush, Subscriber):
    pass


SUBSCRIBERS = [Subscriber, FastSubscriber]


def connected(proto: Any) -> StringTransport:
    transport = StringTransport()
    proto.transport = transport
    proto.connected = 1
    transport.registerProducer(proto, True)
    return transport


def test_a_burst_of_messages_is_parsed_at_once_wherever_the_read_ends():
    payloads = [b'%d {"body":"\\r\\n $3"}' % i for i in range(5)]
    burst = b"".join(message(b"chat:0:room:r", p) for p in payloads)
    for cut in range(len(burst) + 1):
        proto = Subscriber()
        transport = connected(proto)
        proto.dataReceived(burst[:cut])
        proto.dataReceived(burst[cut:])
        # Everything that arrived is delivered before dataReceived returns,
        # and the socket was never paused for a reactor turn.
        assert proto.got == [(b"chat:0:room:r", p) for p in payloads], cut
        assert transport.producerState == "producing"


@pytest.mark.parametrize("kind", SUBSCRIBERS)
def test_a_message_cut_short_waits_for_its_end(kind):
    whole = message(b"c", b"x" * 100)
    proto = kind()
    connected(proto)
    proto.dataReceived(whole[:-10])
    assert proto.got == []
    proto.dataReceived(whole[-10:] + message(b"c", b"y"))
    assert proto.got == [(b"c", b"x" * 100), (b"c", b"y")]


class Client(_InlineBulk, txredisapi.RedisProtocol):
    pass


def test_pipelined_bulk_replies_resolve_in_order():
    proto = Client(charset=None)
    connected(proto)
    results: list[Any] = []
    for key in ("a", "b", "c"):
        proto.execute_command("GET", key).addCallback(results.append)
    proto.dataReceived(b"$3\r\none\r\n$-1\r\n$5\r\nthree\r\n")
    assert results == [b"one", None, b"three"]


def test_whole_messages_are_sliced_out_without_the_line_parser():
    proto = FastSubscriber()
    connected(proto)
    proto.dataReceived(b"".join(message(b"c", b"m%d" % i) for i in range(50)))
    assert proto.got == [(b"c", b"m%d" % i) for i in range(50)]
    assert proto.lines == 0


class ScopedSubscriber(FastSubscriber):
    """Records which messages were handled inside which batch scope."""

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[list[bytes]] = []
        self.open = False

    @contextmanager
    def _scope(self) -> Iterator[None]:
        self.scopes.append([])
        self.open = True
        try:
            yield
        finally:
            self.open = False

    def _batch_scope(self) -> Any:
        return self._scope()

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        super().messageReceived(pattern, channel, message)
        if self.open:
            self.scopes[-1].append(message)


def test_the_messages_of_one_read_are_handled_in_one_batch_scope():
    proto = ScopedSubscriber()
    connected(proto)
    first = [b"1 a", b"2 b", b"3 c"]
    proto.dataReceived(b"".join(message(b"chat:0:room:r", p) for p in first))
    proto.dataReceived(message(b"chat:0:room:r", b"4 d"))
    assert proto.scopes == [first, [b"4 d"]]
    assert [m for _, m in proto.got] == [*first, b"4 d"]


@pytest.mark.parametrize("kind", SUBSCRIBERS)
def test_other_replies_between_messages_reach_txredisapi(kind):
    confirm = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nd\r\n:2\r\n"
    pong = b"+PONG\r\n"
    data = message(b"c", b"1") + confirm + message(b"c", b"2") + pong + message(b"d", b"3")
    for cut in range(len(data) + 1):
        proto = kind()
        connected(proto)
        proto.dataReceived(data[:cut])
        proto.dataReceived(data[cut:])
        assert proto.got == [(b"c", b"1"), (b"c", b"2"), (b"d", b"3")], cut
        assert proto.replies == [[b"subscribe", b"d", 2], "PONG"], cut


def test_a_malformed_length_goes_to_txredisapi():
    proto = FastSubscriber()
    connected(proto)
    proto.dataReceived(b"*3\r\n$7\r\nmessage\r\n$x\r\n")
    assert proto.got == []
    assert proto.lines > 0


class Publisher(_FastPublish, _InlineBulk, txredisapi.RedisProtocol):
    def __init__(self) -> None:
        super().__init__(charset=None, convertNumbers=False)
        self.lines = 0

    def _awaiting_reply(self, waited: bool) -> None:
        pass  # the liveness watch is tested with a real server

    def lineReceived(self, line: Any) -> Any:
        self.lines += 1
        return super().lineReceived(line)


def test_publish_writes_what_txredisapi_would():
    proto = Publisher()
    transport = connected(proto)
    payload = b'7 {"body":"\r\n$3\r\n"}'
    proto.publish(b"chat:0:room:r", payload)
    assert transport.value() == proto._build_command(b"PUBLISH", b"chat:0:room:r", payload)


def test_replies_stay_matched_to_their_commands_wherever_the_read_ends():
    replies = b":1\r\n:0\r\n+PONG\r\n-ERR wrong\r\n:12\r\n"
    for cut in range(len(replies) + 1):
        proto = Publisher()
        connected(proto)
        got: list[Any] = []
        proto.publish(b"c", b"1").addCallback(got.append)
        proto.publish(b"c", b"2").addCallback(got.append)
        proto.execute_command(b"PING").addCallback(got.append)
        proto.publish(b"c", b"3").addCallback(got.append)
        proto.publish(b"c", b"4").addCallback(got.append)
        proto.dataReceived(replies[:cut])
        proto.dataReceived(replies[cut:])
        assert got[:3] == [1, 0, "PONG"], cut
        assert isinstance(got[3], txredisapi.ResponseError), cut
        assert got[4:] == [12], cut


def test_integer_replies_skip_the_line_parser():
    proto = Publisher()
    connected(proto)
    got: list[Any] = []
    for _ in range(20):
        proto.publish(b"c", b"x").addCallback(got.append)
    proto.dataReceived(b":1\r\n" * 20)
    assert got == [1] * 20
    assert proto.lines == 0


def test_publishes_waiting_when_the_connection_drops_get_the_error():
    from twisted.python.failure import Failure

    proto = Publisher()
    connected(proto)
    got: list[Any] = []
    proto.publish(b"c", b"x").addCallback(got.append)
    proto.connectionLost(Failure(ConnectionError("gone")))
    assert len(got) == 1 and isinstance(got[0], txredisapi.ConnectionError)
    with pytest.raises(txredisapi.ConnectionError):
        proto.publish(b"c", b"y")
