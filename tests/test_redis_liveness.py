"""When a Redis connection counts as dead, driven by a fake clock.

A subscriber far behind on a busy room receives data all the time while its
PING waits at the back of the queue: that connection is healthy. One that has
replies outstanding and hears nothing for ``redis_timeout`` is not.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chatserver.broker.redis import RedisBroker, _Factory, _Subscriber
from chatserver.config import Config

TIMEOUT = 5.0


def subscriber() -> tuple[Clock, _Subscriber, StringTransport]:
    clock = Clock()
    broker = RedisBroker(Config(redis_url="redis://127.0.0.1:1/0", redis_timeout=TIMEOUT), clock)
    factory = _Factory(broker, _Subscriber, 1)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, proto, transport


def push(proto: _Subscriber, n: int) -> None:
    for i in range(n):
        proto.dataReceived(b"*3\r\n$7\r\nmessage\r\n$3\r\nchn\r\n$1\r\n%d\r\n" % (i % 10))


def test_a_busy_connection_behind_on_its_replies_is_kept():
    clock, proto, transport = subscriber()
    proto.ping()
    for _ in range(20):  # four timeouts long, data arriving every quarter timeout
        clock.advance(TIMEOUT / 4)
        push(proto, 3)
    assert not transport.disconnecting
    assert proto.connected


def test_a_silent_connection_with_a_reply_outstanding_is_dropped():
    clock, proto, transport = subscriber()
    proto.ping()
    clock.advance(TIMEOUT / 2)
    push(proto, 1)
    clock.advance(TIMEOUT * 0.99)
    assert not transport.disconnecting
    clock.advance(TIMEOUT * 0.02)
    assert transport.disconnecting  # aborted


def test_an_idle_connection_with_nothing_outstanding_is_kept():
    clock, proto, transport = subscriber()
    proto.ping()
    proto.dataReceived(b"+PONG\r\n")
    clock.advance(TIMEOUT * 10)
    assert not transport.disconnecting
    # The wait for the next reply starts when it is asked for, not at the last data.
    proto.ping()
    clock.advance(TIMEOUT * 0.9)
    assert not transport.disconnecting
    clock.advance(TIMEOUT * 0.2)
    assert transport.disconnecting
