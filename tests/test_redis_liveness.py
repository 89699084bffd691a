"""When a Redis connection counts as dead, driven by a fake clock.

A subscriber far behind on a busy room receives data all the time while its
PING waits at the back of the queue: that connection is healthy. One that has
replies outstanding and hears nothing for ``redis_timeout`` is not.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chatserver.broker.redis import RedisBroker
from chatserver.compat import FastPaths
from chatserver.compat.txredisapi import CHECKS
from chatserver.config import Config

TIMEOUT = 5.0


class Factory:
    """What the subscriber asks of its factory (no reactor, no pool)."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker

    def connection_lost(self, conn: Any, why: Any) -> None:
        pass


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def subscriber(request: Any) -> tuple[Clock, Any, StringTransport]:
    """The broker's subscriber class, on a fake clock, with the fast paths on and off."""
    clock = Clock()
    config = Config(redis_url="redis://127.0.0.1:1/0", redis_timeout=TIMEOUT)
    broker = RedisBroker(config, clock, FastPaths(request.param, CHECKS))
    proto = broker.subscriber_protocol(charset=None, convertNumbers=False)
    proto.factory = Factory(broker)
    proto.handshake = succeed(None)
    proto.callLater = clock.callLater  # txredisapi's own re-entries, without fast paths
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, proto, transport


def push(clock: Clock, proto: Any, n: int) -> None:
    for i in range(n):
        proto.dataReceived(b"*3\r\n$7\r\nmessage\r\n$3\r\nchn\r\n$1\r\n%d\r\n" % (i % 10))
        clock.advance(0)  # the reactor turns txredisapi's own parser waits for


def test_a_busy_connection_behind_on_its_replies_is_kept(subscriber):
    clock, proto, transport = subscriber
    proto.ping()
    for _ in range(20):  # four timeouts long, data arriving every quarter timeout
        clock.advance(TIMEOUT / 4)
        push(clock, proto, 3)
    assert not transport.disconnecting
    assert proto.connected


def test_a_silent_connection_with_a_reply_outstanding_is_dropped(subscriber):
    clock, proto, transport = subscriber
    proto.ping()
    clock.advance(TIMEOUT / 2)
    push(clock, proto, 1)
    clock.advance(TIMEOUT * 0.99)
    assert not transport.disconnecting
    clock.advance(TIMEOUT * 0.02)
    assert transport.disconnecting  # aborted


def test_an_idle_connection_with_nothing_outstanding_is_kept(subscriber):
    clock, proto, transport = subscriber
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
