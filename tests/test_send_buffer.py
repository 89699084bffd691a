"""The outgoing queue's limit and its grace, driven by a fake clock.

A burst may take a connection's unsent queue over ``max_send_buffer``; the
connection is dropped only if it is still over once ``send_buffer_grace`` has
passed (at once when the grace is 0). End-to-end tests with real clients are
in test_limits.py.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chatserver.config import Config
from chatserver.transport.outbound import STATE_OPEN, Outbound

LIMIT = 10_000


class Factory:
    def __init__(self, grace: float) -> None:
        self.config = Config(
            max_send_buffer=LIMIT, send_buffer_grace=grace, slow_client_timeout=3600.0
        )
        self.clock = Clock()
        self.dropped_slow = 0


class Connection(Outbound):
    user = "u"
    peer = "tcp:192.0.2.1:4000"
    state = STATE_OPEN


def paused_connection(grace: float) -> tuple[Connection, Factory, StringTransport]:
    proto = Connection()
    factory = Factory(grace)
    proto.factory = factory
    transport = StringTransport()
    proto.transport = transport
    proto.start_writing()
    proto.pauseProducing()  # the transport's buffer is full: writes queue
    return proto, factory, transport


def test_under_the_limit_is_kept_however_long():
    proto, factory, transport = paused_connection(grace=1.0)
    proto.write(b"x" * LIMIT)
    factory.clock.advance(100)
    assert factory.dropped_slow == 0 and not transport.disconnecting


def test_over_the_limit_for_the_whole_grace_is_dropped():
    proto, factory, transport = paused_connection(grace=1.0)
    proto.write(b"x" * (LIMIT + 1))
    factory.clock.advance(0.99)
    assert factory.dropped_slow == 0
    factory.clock.advance(0.02)
    assert factory.dropped_slow == 1 and transport.disconnecting


def test_a_burst_drained_within_the_grace_is_kept():
    proto, factory, transport = paused_connection(grace=1.0)
    for _ in range(5):
        proto.write(b"x" * LIMIT)  # five times the limit, in one turn
    factory.clock.advance(0.5)
    proto.resumeProducing()  # the client read it all
    assert transport.value() == b"x" * (5 * LIMIT)
    factory.clock.advance(10)
    assert factory.dropped_slow == 0 and not transport.disconnecting


def test_zero_grace_drops_at_once():
    proto, factory, transport = paused_connection(grace=0.0)
    proto.write(b"x" * LIMIT)
    assert factory.dropped_slow == 0
    proto.write(b"x")
    assert factory.dropped_slow == 1 and transport.disconnecting


def test_a_clean_close_hands_what_is_queued_to_the_transport_in_order():
    """Autobahn's close frame (a reply too) joins the queue; before the FIN, Twisted
    must get all of it, or the peer would see frames lost and no close frame."""
    proto, factory, transport = paused_connection(grace=1.0)
    proto.write(b"one")
    proto.write(b"two")
    proto.write(b"\x88\x02\x03\xe8")  # a close frame
    assert transport.value() == b""
    proto.hand_over()
    assert transport.value() == b"onetwo\x88\x02\x03\xe8"
    proto.resumeProducing()  # nothing is written twice
    assert transport.value() == b"onetwo\x88\x02\x03\xe8"
    assert factory.dropped_slow == 0
