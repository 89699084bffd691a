"""The group-commit scheduler, driven by a pool whose transactions finish when told.

Pure logic: which messages go into which transaction. The real databases are
exercised in test_postgres.py and test_chat.py.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chatserver.store.sql import Dialect, SQLStore


class HeldPool:
    """Records each batch; its transaction commits only when the test says so."""

    def __init__(self, size: int) -> None:
        self.max = size
        self.held: list[tuple[list[tuple[Any, ...]], Deferred]] = []
        self.last: dict[str, int] = {}

    def runInteraction(self, func: Any, entries: list, ts: int) -> Deferred:
        d: Deferred = Deferred()
        self.held.append((entries, d))
        return d

    def commit(self, index: int = 0) -> list[tuple[str, str, str]]:
        entries, d = self.held.pop(index)
        stored = []
        for room, *_ in entries:
            self.last[room] = self.last.get(room, 0) + 1
            stored.append((self.last[room], 1000, False))
        d.callback(stored)
        return [(room, user, body) for room, user, body, *_ in entries]

    def rooms_in_flight(self) -> list[set[str]]:
        return [{room for room, *_ in entries} for entries, _ in self.held]


class Store(SQLStore):
    """Appends take effect at the end of the reactor turn: ``turn`` ends it."""

    def turn(self) -> None:
        self._clock.advance(0)


def store(pool: HeldPool, batch_max: int = 100, queue_max: int = 10_000) -> Store:
    return Store(
        pool,  # type: ignore[arg-type]
        Dialect(),
        Clock(),
        queue_max=queue_max,
        batch_max=batch_max,
        writers=pool.max,
    )


def test_what_one_turn_appends_starts_in_one_transaction():
    pool = HeldPool(size=1)
    s = store(pool)
    for room in ("a", "b", "c", "a"):
        s.append(room, "u", "m")
    assert pool.held == []  # not before the turn ends
    s.turn()
    assert [entry[0] for entry in pool.held[0][0]] == ["a", "a", "b", "c"]
    s.append("d", "u", "m")  # the next turn's wait for the writer
    s.turn()
    assert len(pool.held) == 1 and s.queue_depth() == 1
    pool.commit()
    assert [entry[0] for entry in pool.held[0][0]] == ["d"]


def test_a_busy_hot_room_does_not_hold_back_other_rooms():
    pool = HeldPool(size=2)
    s = store(pool, batch_max=5)
    s.append("hot", "u", "h0")  # first writer takes it alone
    s.turn()
    for i in range(1, 50):
        s.append("hot", "u", f"h{i}")
    s.append("quiet", "u", "q0")
    s.turn()
    # The second writer skips the busy hot room and takes the quiet one.
    assert pool.rooms_in_flight() == [{"hot"}, {"quiet"}]
    assert s.queue_depth() == 49


def test_a_room_is_never_in_two_transactions_and_keeps_its_order():
    pool = HeldPool(size=4)
    s = store(pool, batch_max=3)
    acked: dict[str, list[int]] = {}
    for i in range(40):
        room = "abc"[i % 3] if i % 4 else "hot"
        s.append(room, "u", f"{room}{i}").addCallback(
            lambda m: acked.setdefault(m.room, []).append(m.id)
        )
        s.turn()  # one message per turn: batches form only while writers are busy
    sent: dict[str, list[str]] = {}
    while pool.held:
        flights = pool.rooms_in_flight()
        for a in range(len(flights)):
            for b in range(a + 1, len(flights)):
                assert not flights[a] & flights[b], "a room is in two transactions"
        for room, _, body in pool.commit(len(pool.held) - 1):
            sent.setdefault(room, []).append(body)
    assert s.queue_depth() == 0
    for room, bodies in sent.items():
        assert bodies == sorted(bodies, key=lambda b: int(b[len(room) :]))
        assert acked[room] == list(range(1, len(bodies) + 1))
    assert sum(len(b) for b in sent.values()) == 40


def test_rooms_are_served_oldest_first_and_a_batch_spans_rooms():
    pool = HeldPool(size=1)
    s = store(pool, batch_max=4)
    s.append("first", "u", "x")  # in flight alone
    s.turn()
    for room in ("b", "c", "b", "d", "e", "c"):
        s.append(room, "u", "y")
    s.turn()
    pool.commit()
    entries, _ = pool.held[0]
    assert [entry[0] for entry in entries] == ["b", "b", "c", "c"]
    pool.commit()
    assert [entry[0] for entry in pool.held[0][0]] == ["d", "e"]


def test_the_queue_bound_counts_every_room():
    pool = HeldPool(size=1)
    s = store(pool, batch_max=10, queue_max=3)
    results = []
    s.append("a", "u", "m")
    s.turn()
    for room in ("b", "c", "d", "e"):
        s.append(room, "u", "m").addErrback(lambda f: f.value).addCallback(results.append)
    # "a" is in flight, three wait; the fifth is refused at once.
    assert s.queue_depth() == 3
    assert type(results[-1]).__name__ == "StoreUnavailable"
    assert s.rejected == 1


# -- gathering: a transaction starts no sooner than store_gather after the last --


class ReadingPool(HeldPool):
    """Also runs reads, recording in ``order`` what reached the pool when."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.order: list[str] = []

    def runInteraction(self, func: Any, *args: Any) -> Deferred:
        if len(args) == 2:
            self.order.append("write")
            return super().runInteraction(func, *args)
        self.order.append("read")
        return Deferred()


def gathering(pool: HeldPool, gather: float = 0.5, batch_max: int = 100) -> Store:
    return Store(
        pool,  # type: ignore[arg-type]
        Dialect(),
        Clock(),
        queue_max=10_000,
        batch_max=batch_max,
        writers=pool.max,
        gather=gather,
    )


def stored_then_appended(s: Store, pool: HeldPool) -> None:
    """m1 stored by a transaction started just now, then m2 appended in a turn of its own."""
    s.append("a", "u", "m1")
    s.turn()
    pool.commit()
    s.append("a", "u", "m2")
    s.turn()


def test_after_a_quiet_spell_a_message_starts_at_once_and_the_next_ones_gather():
    pool = HeldPool(size=1)
    s = gathering(pool, gather=0.5)
    s.append("a", "u", "m1")
    s.turn()
    assert len(pool.held) == 1  # nothing started lately: at once
    pool.commit()
    s.append("b", "u", "m2")
    s.turn()
    s.append("c", "u", "m3")
    s.turn()
    assert pool.held == [] and s.queue_depth() == 2
    s._clock.advance(0.25)
    assert pool.held == []  # still inside the gather
    s._clock.advance(0.25)  # half a second after the first started
    assert [entry[0] for entry in pool.held[0][0]] == ["b", "c"]
    pool.commit()
    s._clock.advance(1)  # quiet again
    s.append("d", "u", "m4")
    s.turn()
    assert [entry[0] for entry in pool.held[0][0]] == ["d"]


def test_a_full_batch_does_not_wait_for_the_gather():
    pool = HeldPool(size=1)
    s = gathering(pool, gather=0.5, batch_max=3)
    s.append("a", "u", "m")
    s.turn()
    pool.commit()
    s.append("b", "u", "1")
    s.append("b", "u", "2")
    s.turn()
    assert pool.held == []  # one short of a full batch: it gathers
    s.append("b", "u", "3")
    s.turn()
    assert [entry[2] for entry in pool.held[0][0]] == ["1", "2", "3"]


def test_a_transaction_longer_than_the_gather_is_followed_at_once():
    pool = HeldPool(size=1)
    s = gathering(pool, gather=0.5)
    s.append("a", "u", "m1")
    s.turn()
    s.append("a", "u", "m2")  # waits for the writer
    s.turn()
    s._clock.advance(0.5)  # the first transaction took the whole gather
    assert len(pool.held) == 1
    pool.commit()
    assert [entry[2] for entry in pool.held[0][0]] == ["m2"]


def test_a_read_sends_the_gathering_appends_first():
    """A client that pipelines a send and a history request sees its message."""
    pool = ReadingPool(size=2)
    s = gathering(pool, gather=0.5)
    stored_then_appended(s, pool)
    assert pool.order == ["write"]  # m2 gathers
    s.last_id("a")
    assert pool.order == ["write", "write", "read"]
    assert [entry[2] for entry in pool.held[0][0]] == ["m2"]


def test_no_gather_starts_each_turn_at_once():
    pool = HeldPool(size=1)
    s = gathering(pool, gather=0.0)
    stored_then_appended(s, pool)
    assert [entry[2] for entry in pool.held[0][0]] == ["m2"]
