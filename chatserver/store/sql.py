"""The SQL store shared by SQLite and Postgres: group commit, gap-free ids, history.

Writes are queued and written in batches by the pool's threads: everything
appended in one reactor turn starts in one transaction, and while one batch is
being committed, new messages gather and the next transaction takes all of
them at once. Throughput then grows with load instead of with connections, and
the queue is bounded: past ``queue_max`` waiting messages, ``append`` fails with
``StoreUnavailable`` at once instead of growing a backlog.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver.store import (
    EVERYWHERE,
    Access,
    ChangeRefused,
    CommitHandler,
    MessageNotFound,
    NotAuthor,
    NotYetWritten,
    SchemaError,
    StoredMessage,
    StoreUnavailable,
)
from chatserver.store.schema import LATEST, MIGRATIONS

# room, id, user, body, ts, cid, edits, deletes
Row = tuple[str, int, str, str, int, str | None, int | None, int | None]
# Users per query (bans after a broker outage, memberships of a room made private):
# well under any placeholder limit.
BANS_QUERY_CHUNK = 500
# Cids looked up per query: each brings its room and cid as two placeholders,
# under the 999 that SQLite before 3.32 allows.
CID_QUERY_CHUNK = 400
# What an entry asks for: a message, or a change of the message ``target``.
SEND, EDIT, DELETE, ADMIN_DELETE = 0, 1, 2, 3
Entry = tuple[str, str, str, str | None, int, int]  # room, user, body, cid, op, target
# What store_batch says of each entry: (id, ts, duplicate), or why a change was refused.
Stored = tuple[int, int, bool] | ChangeRefused


class _Target:
    """What deciding on an edit or delete needs to know of its target."""

    __slots__ = ("deleted", "is_event", "user")

    def __init__(self, user: str, is_event: bool, deleted: bool) -> None:
        self.user = user
        self.is_event = is_event
        self.deleted = deleted


class Conflict(Exception):
    """Another writer changed what this transaction read first; nothing is
    committed and the batch is simply written again."""


class Dialect:
    """What differs between the databases; everything else is shared SQL."""

    name = "sql"
    # Errors that mean "the connection is gone": the transaction did not commit.
    connection_errors: tuple[type[BaseException], ...] = ()
    # Errors from the database as a whole (locked, shutting down, disk full).
    database_errors: tuple[type[BaseException], ...] = ()
    # A unique key broken by a writer that committed first (two instances storing
    # the same cid at once): nothing committed, and a retry finds its row.
    conflict_errors: tuple[type[BaseException], ...] = ()
    # Whether after_erasure has work to do (a delete then waits for it).
    erases_after_commit = False

    def sql(self, text: str) -> str:
        """SQL is written with %s placeholders; dialects with another style convert."""
        return text

    def insert_messages(self, cursor: Any, rows: Sequence[Row]) -> None:
        cursor.executemany(
            self.sql(
                "INSERT INTO messages (room, id, username, body, ts, cid, edits, deletes)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
            ),
            rows,
        )

    def lock_rooms(self, cursor: Any, rooms: list[str]) -> dict[str, int]:
        """Hold the counter rows of ``rooms`` (sorted) to commit and return their
        last ids, before looking for cids or targets: a writer of the same room
        then commits first and is seen (SQLite has one writer at a time)."""
        last: dict[str, int] = {}
        for start in range(0, len(rooms), BANS_QUERY_CHUNK):
            chunk = rooms[start : start + BANS_QUERY_CHUNK]
            marks = ",".join(["%s"] * len(chunk))
            cursor.execute(
                self.sql(f"SELECT name, last_id FROM rooms WHERE name IN ({marks})"), chunk
            )
            last.update(cursor.fetchall())
        return last

    def find_targets(
        self, cursor: Any, wanted: dict[str, set[int]]
    ) -> dict[tuple[str, int], _Target]:
        """What is stored of the messages that edits and deletes name, by room."""
        found: dict[tuple[str, int], _Target] = {}
        for room, ids in wanted.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), BANS_QUERY_CHUNK):
                chunk = ordered[start : start + BANS_QUERY_CHUNK]
                marks = ",".join(["%s"] * len(chunk))
                cursor.execute(
                    self.sql(
                        "SELECT id, username, edits IS NOT NULL OR deletes IS NOT NULL, deleted"
                        f" FROM messages WHERE room = %s AND id IN ({marks})"
                    ),
                    [room, *chunk],
                )
                for mid, user, is_event, deleted in cursor.fetchall():
                    found[(room, mid)] = _Target(user, bool(is_event), bool(deleted))
        return found

    def apply_changes(
        self,
        cursor: Any,
        edits: list[tuple[str, int, str, int]],
        deletes: list[tuple[str, int]],
    ) -> None:
        """Fold edits (room, target, body, ts) into their targets, then erase the
        deleted (room, target): the text itself is overwritten, the target's and
        its edits', so no copy of it is left in the table."""
        if edits:
            cursor.executemany(
                self.sql("UPDATE messages SET body = %s, edited = %s WHERE room = %s AND id = %s"),
                [(body, ts, room, target) for room, target, body, ts in edits],
            )
        if deletes:
            cursor.executemany(
                self.sql("UPDATE messages SET body = '', deleted = %s WHERE room = %s AND id = %s"),
                [(True, room, target) for room, target in deletes],
            )
            cursor.executemany(
                self.sql("UPDATE messages SET body = '' WHERE room = %s AND edits = %s"), deletes
            )

    def find_cids(
        self, cursor: Any, keys: set[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(id, ts) of each stored (room, user, cid) among ``keys``."""
        found: dict[tuple[str, str, str], tuple[int, int]] = {}
        ordered = sorted(keys)
        for start in range(0, len(ordered), CID_QUERY_CHUNK):
            chunk = ordered[start : start + CID_QUERY_CHUNK]
            rooms = sorted({room for room, _, _ in chunk})
            cids = sorted({cid for _, _, cid in chunk})
            query = (
                "SELECT room, username, cid, id, ts FROM messages"
                f" WHERE room IN ({','.join(['%s'] * len(rooms))})"
                f" AND cid IN ({','.join(['%s'] * len(cids))})"
            )
            cursor.execute(self.sql(query), [*rooms, *cids])
            for room, user, cid, mid, ts in cursor.fetchall():
                if (room, user, cid) in keys:
                    found[(room, user, cid)] = (mid, ts)
        return found

    def reserve_ids(self, cursor: Any, counts: dict[str, int]) -> dict[str, int]:
        """Advance each room's counter by its count; return each room's new last id.

        The row lock taken here is held to commit, which serialises a room's
        writers: ids are handed out in commit order, with no gaps. Rooms go in a
        fixed order so two writers never wait on each other in a cycle.
        """
        upsert = self.sql(
            "INSERT INTO rooms (name, last_id) VALUES (%s, %s) ON CONFLICT (name)"
            " DO UPDATE SET last_id = rooms.last_id + excluded.last_id RETURNING last_id"
        )
        last = {}
        for room in sorted(counts):
            cursor.execute(upsert, (room, counts[room]))
            last[room] = cursor.fetchone()[0]
        return last

    def store_batch(self, cursor: Any, entries: Sequence[Entry], ts: int) -> list[Stored]:
        """Give each entry the next id of its room and insert it, in the pool's
        transaction; return (id, ts, duplicate) in entry order. An entry whose
        (room, user, cid) is stored already, or came earlier in this batch, is not
        stored: it gets that message's id and ts.

        Most batches are plain sends with new cids, or none: such a batch is
        stored as if every cid were new, the unique index the judge. A batch the
        index refuses (a retry, or a copy from another instance), or one with a
        cid twice, or with edits or deletes, is decided entry by entry instead
        (``_store_in_order``). Deciding every batch that way halved the
        throughput.

        Raises a connection error only when nothing can have been committed
        (the caller retries those on a fresh connection).
        """
        if all(e[4] == SEND for e in entries):
            keys = [(room, user, cid) for room, user, _, cid, _, _ in entries if cid is not None]
            if len(set(keys)) == len(keys):
                try:
                    return self._insert(cursor, entries, ts)
                except self.conflict_errors:
                    cursor.connection.rollback()  # the reserved ids go back too
        return self._store_in_order(cursor, entries, ts)

    def _insert(self, cursor: Any, entries: Sequence[Entry], ts: int) -> list[Stored]:
        """Every entry a new message: reserve its room's next ids and insert."""
        counts: dict[str, int] = {}
        for room, *_ in entries:
            counts[room] = counts.get(room, 0) + 1
        last = self.reserve_ids(cursor, counts)
        next_id = {room: last[room] - n + 1 for room, n in counts.items()}
        result: list[Stored] = []
        rows: list[Row] = []
        for room, user, body, cid, _, _ in entries:
            mid = next_id[room]
            next_id[room] = mid + 1
            result.append((mid, ts, False))
            rows.append((room, mid, user, body, ts, cid, None, None))
        self.insert_messages(cursor, rows)
        return result

    def _store_in_order(self, cursor: Any, entries: Sequence[Entry], ts: int) -> list[Stored]:
        """Each entry decided in order, against what is stored and what the
        entries before it did (a message and its edit may share a batch; a cid
        stored before, or earlier in the batch, is a repeat), under the rooms'
        counter locks: a writer of the same room commits first and is seen.
        Refused changes take no id, so ids stay gap-free. It looks everything up
        first, which the common batch need not pay for (``store_batch``)."""
        rooms = sorted({e[0] for e in entries})
        last = self.lock_rooms(cursor, rooms)
        keys = {(room, user, cid) for room, user, _, cid, _, _ in entries if cid is not None}
        found = self.find_cids(cursor, keys) if keys else {}
        wanted: dict[str, set[int]] = {}
        for room, _, _, _, op, target in entries:
            if op != SEND and 0 < target <= last.get(room, 0):
                wanted.setdefault(room, set()).add(target)
        targets = self.find_targets(cursor, wanted)
        next_id = {room: last.get(room, 0) + 1 for room in rooms}
        first: dict[tuple[str, str, str], int] = {}  # a cid's (room, user, cid) -> its new id
        result: list[Stored] = []
        rows: list[Row] = []
        edits: list[tuple[str, int, str, int]] = []
        deletes: list[tuple[str, int]] = []
        for room, user, body, cid, op, target in entries:
            key = (room, user, cid) if cid is not None else None
            if key is not None and key in found:
                result.append((*found[key], True))
                continue
            if key is not None and key in first:
                result.append((first[key], ts, True))
                continue
            if op != SEND:
                refused = self._refusal(room, user, op, target, next_id[room], targets)
                if refused is not None:
                    result.append(refused)
                    continue
            mid = next_id[room]
            next_id[room] = mid + 1
            if key is not None:
                first[key] = mid
            targets[(room, mid)] = _Target(user, op != SEND, False)
            if op == EDIT:
                edits.append((room, target, body, ts))
                rows.append((room, mid, user, body, ts, cid, target, None))
            elif op in (DELETE, ADMIN_DELETE):
                targets[(room, target)].deleted = True
                deletes.append((room, target))
                rows.append((room, mid, user, "", ts, cid, None, target))
            else:
                rows.append((room, mid, user, body, ts, cid, None, None))
            result.append((mid, ts, False))
        counts = {room: n - last.get(room, 0) - 1 for room, n in next_id.items()}
        counts = {room: n for room, n in counts.items() if n}
        if counts:
            reserved = self.reserve_ids(cursor, counts)
            if any(reserved[room] != next_id[room] - 1 for room in counts):
                # A room's first row was created by another writer meanwhile.
                raise Conflict("a room's counter moved while the batch was decided")
        if rows:
            self.insert_messages(cursor, rows)
        self.apply_changes(cursor, edits, deletes)
        return result

    @staticmethod
    def _refusal(
        room: str,
        user: str,
        op: int,
        target: int,
        next_id: int,
        targets: dict[tuple[str, int], _Target],
    ) -> ChangeRefused | None:
        if target >= next_id:
            return NotYetWritten(f"{room} has no message {target} yet")
        found = targets.get((room, target))
        if found is None or found.is_event or found.deleted:
            return MessageNotFound(f"no message {target} in {room}")
        if op != ADMIN_DELETE and found.user != user:
            verb = "edit" if op == EDIT else "delete"
            return NotAuthor(f"only its author may {verb} message {target}")
        return None

    def lock_schema(self, cursor: Any) -> None:
        """Keep two servers from migrating at once (Postgres locks; SQLite has one writer)."""

    def after_erasure(self, cursor: Any) -> None:
        """After a committed delete, outside any transaction: let go of old copies
        of the erased text that the database keeps beside the table."""


class CommitUnknown(Exception):
    """The connection broke during COMMIT: the batch may or may not be stored,
    so it is reported as failed and never retried (a retry could store it twice)."""


class _BeforeCommit(Exception):
    """A connection error raised by a statement: nothing was committed, a retry is safe."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def schema_version(cursor: Any, dialect: Dialect) -> int:
    cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    cursor.execute("SELECT MAX(version) FROM schema_version")
    row = cursor.fetchone()
    return (row[0] or 0) if row else 0


def migrate(connection: Any, dialect: Dialect, log: Logger | None = None) -> list[int]:
    """Apply every migration the database lacks; return the versions applied."""
    cursor = connection.cursor()
    dialect.lock_schema(cursor)
    current = schema_version(cursor, dialect)
    if current > LATEST:
        connection.rollback()
        raise SchemaError(f"database schema is version {current}; this server knows {LATEST}")
    applied = []
    for version, what, statements in MIGRATIONS:
        if version <= current:
            continue
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(dialect.sql("INSERT INTO schema_version (version) VALUES (%s)"), (version,))
        applied.append(version)
        if log:
            log.info("schema migrated to version {version}: {what}", version=version, what=what)
    connection.commit()
    cursor.close()
    return applied


def check_schema(connection: Any, dialect: Dialect) -> None:
    """Refuse a schema this server does not know, newer or older."""
    cursor = connection.cursor()
    current = schema_version(cursor, dialect)
    connection.commit()
    cursor.close()
    if current != LATEST:
        hint = "run 'chatserver-admin migrate'" if current < LATEST else "upgrade chatserver"
        raise SchemaError(
            f"database schema is version {current}; this server needs {LATEST}: {hint}"
        )


def _fire_now(fire: Callable[[], None]) -> None:
    fire()


class _Pending:
    __slots__ = ("body", "cid", "deferred", "op", "room", "target", "user")

    def __init__(
        self,
        room: str,
        user: str,
        body: str,
        cid: str | None,
        deferred: Deferred,
        op: int = SEND,
        target: int = 0,
    ) -> None:
        self.room = room
        self.user = user
        self.body = body
        self.cid = cid
        self.deferred = deferred
        self.op = op
        self.target = target


class SQLStore:
    """A ``Store`` on an adbapi pool with a bounded, batching writer."""

    log = Logger()

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        dialect: Dialect,
        clock: IReactorTime,
        *,
        queue_max: int,
        batch_max: int,
        writers: int,
        gather: float = 0.0,
    ) -> None:
        self._pool = pool
        self._dialect = dialect
        self._clock = clock
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._writers = writers
        # A transaction starts at least this long after the one before it
        # started, unless a full batch waits: the rest gather meanwhile.
        self._gather = gather
        self._last_start = float("-inf")
        # Waiting messages per room, rooms in the order they started waiting.
        self._rooms: dict[str, deque[_Pending]] = {}
        self._waiting = 0
        self._in_flight = 0
        self._busy_rooms: set[str] = set()  # rooms with a batch in flight
        self._idle_waiters: list[Deferred[None]] = []
        self._soon: IDelayedCall | None = None  # the kick at the end of this turn
        self._closed = False
        self.busy = 0  # interactions handed to the pool and not finished
        self._on_commit: CommitHandler = _fire_now
        # Counters for metrics.
        self.batches = 0
        self.stored = 0
        self.failed = 0
        self.rejected = 0
        self.last_batch_size = 0

    # -- writes ---------------------------------------------------------------

    def start(self, on_commit: CommitHandler) -> None:
        self._on_commit = on_commit

    def append(
        self, room: str, user: str, body: str, cid: str | None = None
    ) -> Deferred[StoredMessage]:
        return self._enqueue(room, user, body, cid, SEND, 0)

    def edit(
        self, room: str, user: str, target: int, body: str, cid: str | None = None
    ) -> Deferred[StoredMessage]:
        return self._enqueue(room, user, body, cid, EDIT, target)

    def delete(
        self, room: str, user: str, target: int, by_admin: bool = False
    ) -> Deferred[StoredMessage]:
        return self._enqueue(room, user, "", None, ADMIN_DELETE if by_admin else DELETE, target)

    def _enqueue(
        self, room: str, user: str, body: str, cid: str | None, op: int, target: int
    ) -> Deferred[StoredMessage]:
        """Edits and deletes queue with their room's messages: one room's events are
        decided in the order they came, each seeing what the ones before did."""
        if self._closed:
            return fail(StoreUnavailable("server is shutting down"))
        if self._waiting >= self._queue_max:
            self.rejected += 1
            return fail(StoreUnavailable("storage is behind; try again shortly"))
        d: Deferred[StoredMessage] = Deferred()
        waiting = self._rooms.get(room)
        if waiting is None:
            waiting = self._rooms[room] = deque()
        waiting.append(_Pending(room, user, body, cid, d, op, target))
        self._waiting += 1
        if self._soon is None:
            # At the end of this reactor turn, not now: started at the first
            # append, a transaction carried that one message alone and the rest
            # of the turn's waited for the next (with small rooms, a message is
            # a read of its own, and a transaction per message cost more than
            # the message). One call per turn, not per message.
            self._soon = self._clock.callLater(0, self._kick_soon)
        elif self._waiting == self._batch_max:
            self._soon.reset(0)  # a full batch does not wait for the gather
        return d

    def _kick_soon(self) -> None:
        self._soon = None
        self._kick()

    def queue_depth(self) -> int:
        return self._waiting

    def _kick(self, now: bool = False) -> None:
        """Start transactions for what waits, as writers allow. Without ``now`` a
        transaction starts no sooner than ``gather`` after the last one started.

        Why: a transaction costs about half a millisecond of CPU on a small VM
        (a pool-thread hand-off each way, PostgreSQL's statement and commit),
        whatever it carries. Started as soon as the previous one committed,
        transactions carried 2-4 messages at moderate rates, and those costs
        took most of the core that PostgreSQL and Redis share with the server.
        A message that arrives after a quiet spell still starts at once.
        """
        while self._waiting and self._in_flight < self._writers:
            if not now and self._gather and self._waiting < self._batch_max:
                wait = self._last_start + self._gather - self._clock.seconds()
                if wait > 0:
                    if self._soon is None:
                        self._soon = self._clock.callLater(wait, self._kick_soon)
                    return
            batch = self._take_batch()
            if not batch:
                return
            self._in_flight += 1
            self._last_start = self._clock.seconds()
            self._write(batch, attempts_left=self._pool.max + 1)

    def _take_batch(self) -> list[_Pending]:
        """Waiting messages of rooms with no batch in flight, oldest rooms first.

        A room is in at most one transaction at a time, so its messages get ids
        in the order they were queued: one sender's messages keep their order.
        Messages wait in per-room queues, so a hot room that is busy costs one
        skip here, not a rescan of everything queued behind it.
        """
        busy = self._busy_rooms
        batch: list[_Pending] = []
        emptied = []
        for room, waiting in self._rooms.items():
            if room in busy:
                continue
            take = min(len(waiting), self._batch_max - len(batch))
            batch.extend(waiting.popleft() for _ in range(take))
            busy.add(room)
            if not waiting:
                emptied.append(room)
            if len(batch) >= self._batch_max:
                break
        for room in emptied:
            del self._rooms[room]
        self._waiting -= len(batch)
        return batch

    def _release(self, batch: list[_Pending]) -> None:
        for p in batch:
            self._busy_rooms.discard(p.room)

    def _write(self, batch: list[_Pending], attempts_left: int) -> None:
        ts = int(self._clock.seconds() * 1000)
        entries: list[Entry] = [(p.room, p.user, p.body, p.cid, p.op, p.target) for p in batch]
        d = self._interaction(self._write_batch, entries, ts)
        if self._dialect.erases_after_commit and any(p.op >= DELETE for p in batch):
            d.addCallback(self._erased)
        d.addCallbacks(
            self._written,
            self._write_failed,
            callbackArgs=(batch, ts),
            errbackArgs=(batch, attempts_left),
        )

    def _write_batch(self, txn: Any, entries: list[Entry], ts: int) -> list[Stored]:
        """Runs in a pool thread: one transaction for the whole batch."""
        try:
            return self._dialect.store_batch(txn, entries, ts)
        except self._dialect.connection_errors as e:
            raise _BeforeCommit(e) from e
        except (Conflict, *self._dialect.conflict_errors) as e:
            # Raised before COMMIT, so adbapi rolls the transaction back.
            raise _BeforeCommit(e) from e

    def _erased(self, results: list[Stored]) -> Deferred[list[Stored]]:
        """A batch that deleted is acked once the database has let go of the
        erased text too (SQLite: its write-ahead log; a no-op elsewhere)."""

        def after(txn: Any) -> None:
            self._dialect.after_erasure(txn)

        def done(outcome: Any) -> list[Stored]:
            if isinstance(outcome, Failure):
                self.log.warn("erasing deleted text: {error}", error=repr(outcome.value))
            return results

        return self._interaction(after).addBoth(done)

    def _written(self, results: list[Stored], batch: list[_Pending], ts: int) -> None:
        self._in_flight -= 1
        self._release(batch)
        self.batches += 1
        self.stored += sum(1 for r in results if not isinstance(r, ChangeRefused) and not r[2])
        self.last_batch_size = len(batch)

        def fire() -> None:
            for p, outcome in zip(batch, results, strict=True):
                if isinstance(outcome, ChangeRefused):
                    p.deferred.errback(outcome)
                    continue
                mid, at, duplicate = outcome
                p.deferred.callback(
                    StoredMessage(
                        p.room,
                        mid,
                        p.user,
                        p.body,
                        at,
                        p.cid,
                        duplicate,
                        p.target if p.op == EDIT else None,
                        p.target if p.op >= DELETE else None,
                    )
                )

        self._on_commit(fire)
        self._after_write()

    def _write_failed(self, failure: Failure, batch: list[_Pending], attempts_left: int) -> None:
        if failure.check(_BeforeCommit) and attempts_left > 1 and not self._closed:
            # A pool connection died while idle (database restart): adbapi has
            # dropped it, so the retry gets a fresh one.
            self._write(batch, attempts_left - 1)
            return
        self._in_flight -= 1
        self._release(batch)
        self.failed += len(batch)
        cause = failure.value.cause if failure.check(_BeforeCommit) else failure.value
        self.log.warn(
            "storing {count} messages failed: {error}", count=len(batch), error=repr(cause)
        )

        def fire() -> None:
            for p in batch:
                p.deferred.errback(StoreUnavailable("message could not be stored; try again"))

        self._on_commit(fire)
        self._after_write()

    def _after_write(self) -> None:
        self._kick()
        if not self._waiting and not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)

    # -- reads, and changes that are safe to run twice ---------------------------

    def _run(self, interaction: Callable[..., Any], *args: Any) -> Deferred:
        if self._soon is not None:
            # Appends waiting to start (this turn's, or gathering) go to the pool
            # first: a history page asked right after a send (by a client
            # pipelining them) still includes it on one connection.
            self._soon.cancel()
            self._soon = None
            self._kick(now=True)

        def run(txn: Any) -> Any:
            try:
                return interaction(txn, *args)
            except self._dialect.connection_errors as e:
                raise _BeforeCommit(e) from e

        def retry(failure: Failure, attempts_left: int) -> Any:
            if failure.check(_BeforeCommit) and attempts_left > 1:
                return self._interaction(run).addErrback(retry, attempts_left - 1)
            if failure.check(_BeforeCommit, *self._dialect.database_errors):
                cause = failure.value.cause if failure.check(_BeforeCommit) else failure.value
                self.log.warn("store read failed: {error}", error=repr(cause))
                raise StoreUnavailable("storage is unavailable; try again")
            return failure

        return self._interaction(run).addErrback(retry, self._pool.max + 1)

    def _interaction(self, func: Callable[..., Any], *args: Any) -> Deferred:
        self.busy += 1

        def done(result: Any) -> Any:
            self.busy -= 1
            return result

        return self._pool.runInteraction(func, *args).addBoth(done)

    @property
    def pool_size(self) -> int:
        return self._pool.max

    def ping(self) -> Deferred[None]:
        """A trivial query: readiness means the database answers now."""

        def q(txn: Any) -> None:
            txn.execute("SELECT 1")
            txn.fetchall()

        return self._run(q)

    def last_id(self, room: str) -> Deferred[int | None]:
        def q(txn: Any) -> int | None:
            txn.execute(self._dialect.sql("SELECT last_id FROM rooms WHERE name = %s"), (room,))
            row = txn.fetchone()
            return row[0] if row and row[0] else None

        return self._run(q)

    def history(
        self, room: str, before: int | None, after: int | None, limit: int
    ) -> Deferred[tuple[list[StoredMessage], bool]]:
        cols = (
            "SELECT id, username, body, ts, cid, edits, deletes, edited, deleted"
            " FROM messages WHERE room = %s"
        )
        if after is not None:
            query = cols + " AND id > %s ORDER BY id ASC LIMIT %s"
            args: tuple = (room, after, limit + 1)
        elif before is not None:
            query = cols + " AND id < %s ORDER BY id DESC LIMIT %s"
            args = (room, before, limit + 1)
        else:
            query = cols + " ORDER BY id DESC LIMIT %s"
            args = (room, limit + 1)
        sql = self._dialect.sql(query)

        def q(txn: Any) -> tuple[list[StoredMessage], bool]:
            txn.execute(sql, args)
            rows = txn.fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            if after is None:
                rows.reverse()
            messages = [
                StoredMessage(
                    room, mid, user, body, at, cid, False, edits, deletes, edited, bool(gone)
                )
                for mid, user, body, at, cid, edits, deletes, edited, gone in rows
            ]
            return messages, more

        return self._run(q)

    # -- access ---------------------------------------------------------------

    def access(self, room: str, user: str, unread_max: int = 0) -> Deferred[Access]:
        sql = self._dialect.sql
        # The room and the user's marker in one statement; the unread count only
        # when there is something after the marker (a join of a room with no news,
        # the common case, costs no statement more than access alone did).
        room_q = sql(
            "SELECT r.private, r.last_id, m.id FROM rooms r LEFT JOIN read_markers m"
            " ON m.room = r.name AND m.username = %s WHERE r.name = %s"
        )
        # The primary key's range from the marker on, stopped at the cap: never
        # a scan of the room, however long its history.
        unread_q = sql(
            "SELECT count(*) FROM (SELECT 1 FROM messages WHERE room = %s AND id > %s"
            " AND username <> %s AND edits IS NULL AND deletes IS NULL AND NOT deleted"
            " LIMIT %s) AS unread"
        )
        member_q = sql("SELECT 1 FROM room_members WHERE room = %s AND username = %s")
        removed_q = sql("SELECT 1 FROM room_removals WHERE room = %s AND username = %s")
        ban_q = sql("SELECT 1 FROM bans WHERE room IN (%s, %s) AND username = %s")

        def q(txn: Any) -> Access:
            txn.execute(room_q, (user, room))
            row = txn.fetchone()
            private, last_id, last_read = False, 0, None
            if row:
                private, last_id, last_read = bool(row[0]), row[1] or 0, row[2]
            member = removed = False
            if private:
                txn.execute(member_q, (room, user))
                member = txn.fetchone() is not None
                if not member:
                    txn.execute(removed_q, (room, user))
                    removed = txn.fetchone() is not None
            txn.execute(ban_q, (room, EVERYWHERE, user))
            banned = txn.fetchone() is not None
            unread = 0
            if unread_max > 0 and not banned and last_id > (last_read or 0):
                txn.execute(unread_q, (room, last_read or 0, user, unread_max))
                unread = txn.fetchone()[0]
            return Access(private, member, banned, removed, last_read, unread)

        return self._run(q)

    def set_read(self, room: str, user: str, id: int) -> Deferred[tuple[int, bool]]:
        sql = self._dialect.sql
        last_q = sql("SELECT last_id FROM rooms WHERE name = %s")
        # Only forward: a marker from a device that read less leaves it where it is.
        upsert = sql(
            "INSERT INTO read_markers (room, username, id) VALUES (%s, %s, %s)"
            " ON CONFLICT (room, username) DO UPDATE SET id = excluded.id"
            " WHERE read_markers.id < excluded.id"
        )
        marker_q = sql("SELECT id FROM read_markers WHERE room = %s AND username = %s")

        def q(txn: Any) -> tuple[int, bool]:
            txn.execute(last_q, (room,))
            row = txn.fetchone()
            if id > (row[0] if row else 0):
                raise NotYetWritten(f"{room} has no message {id} yet")
            txn.execute(upsert, (room, user, id))
            moved = txn.rowcount > 0
            txn.execute(marker_q, (room, user))
            return txn.fetchone()[0], moved

        # Running it twice moves nothing the first did not: the read path's retry is safe.
        return self._run(q)

    def banned_everywhere(self, user: str) -> Deferred[bool]:
        query = self._dialect.sql("SELECT 1 FROM bans WHERE room = %s AND username = %s")

        def q(txn: Any) -> bool:
            txn.execute(query, (EVERYWHERE, user))
            return txn.fetchone() is not None

        return self._run(q)

    def bans_of(self, users: list[str]) -> Deferred[list[tuple[str, str]]]:
        step = BANS_QUERY_CHUNK
        chunks = [users[i : i + step] for i in range(0, len(users), step)]
        sql = self._dialect.sql

        def q(txn: Any) -> list[tuple[str, str]]:
            found: list[tuple[str, str]] = []
            for chunk in chunks:
                marks = ",".join(["%s"] * len(chunk))
                query = f"SELECT room, username FROM bans WHERE username IN ({marks})"
                txn.execute(sql(query), chunk)
                found += [(row[0], row[1]) for row in txn.fetchall()]
            return found

        return self._run(q)

    def memberships(self, room: str, users: list[str]) -> Deferred[dict[str, bool]]:
        step = BANS_QUERY_CHUNK
        chunks = [users[i : i + step] for i in range(0, len(users), step)]
        sql = self._dialect.sql

        def q(txn: Any) -> dict[str, bool]:
            found: dict[str, bool] = {}
            for chunk in chunks:
                marks = ",".join(["%s"] * len(chunk))
                for table, member in (("room_removals", False), ("room_members", True)):
                    query = (
                        f"SELECT username FROM {table} WHERE room = %s AND username IN ({marks})"
                    )
                    txn.execute(sql(query), [room, *chunk])
                    found.update((row[0], member) for row in txn.fetchall())
            return found

        return self._run(q)

    def _change(self, statement: str, args: tuple, *more: tuple[str, tuple]) -> Deferred[None]:
        """Statements run in one transaction (a change and what it undoes go together)."""
        steps = [(self._dialect.sql(statement), args)]
        steps += [(self._dialect.sql(text), more_args) for text, more_args in more]

        def q(txn: Any) -> None:
            for sql, step_args in steps:
                txn.execute(sql, step_args)

        # Every change here is idempotent, so the read path's retry is safe.
        return self._run(q)

    def set_room(self, room: str, private: bool) -> Deferred[None]:
        return self._change(
            "INSERT INTO rooms (name, last_id, private) VALUES (%s, 0, %s)"
            " ON CONFLICT (name) DO UPDATE SET private = excluded.private",
            (room, private),
        )

    def set_member(self, room: str, user: str, member: bool) -> Deferred[None]:
        # A removal is stored, not only the membership deleted: a token's rooms claim
        # would let the user straight back in otherwise.
        insert = "INSERT INTO {} (room, username) VALUES (%s, %s) ON CONFLICT DO NOTHING"
        delete = "DELETE FROM {} WHERE room = %s AND username = %s"
        add, drop = (
            ("room_members", "room_removals") if member else ("room_removals", "room_members")
        )
        return self._change(insert.format(add), (room, user), (delete.format(drop), (room, user)))

    def set_ban(self, room: str, user: str, banned: bool) -> Deferred[None]:
        if banned:
            return self._change(
                "INSERT INTO bans (room, username) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (room, user),
            )
        return self._change("DELETE FROM bans WHERE room = %s AND username = %s", (room, user))

    # -- lifecycle ------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """Fires once every queued message has been written (or has failed)."""
        d: Deferred[None] = Deferred()
        if not self._waiting and not self._in_flight:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    async def _close(self) -> None:
        await self.flush()
        self._closed = True
        self._pool.close()

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())
