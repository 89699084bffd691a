"""Presence across instances in Redis or a Redis Cluster: per-room keys, heartbeats.

Every key of a room carries the room as its hash tag, so a room's keys share
one slot and each change of a room is one atomic Lua script on one node:

- ``presence:{ROOM}:users`` hash: user -> number of instances holding a
  connection of theirs in the room. ``HLEN`` is the exact online count.
- ``presence:{ROOM}:watch`` set: the instances with a connection that
  follows the room's presence. Events are published only if it is not empty,
  so rooms nobody watches cost no messages.
- ``presence:{ROOM}:of:ID`` set: the users instance ID holds in the room, so
  what a dead instance held can be taken back.

Beside them, ``presence:instance:ID`` is the set of rooms instance ID has
keys in, and ``presence:instances`` a sorted set of instance ID -> its last
heartbeat, stamped with Redis' own clock (``TIME``), so the instances' clocks
need not agree. A join or leave is one script; every instance sweeps for
instances whose heartbeat is older than ``presence_timeout``, claims one with
``SET NX`` (so one instance reaps it) and takes back room by room what it
held, reporting the users that went offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver.presence import ChangesHandler, Held, PresenceUnavailable

log = Logger()

INSTANCE_PREFIX = b"presence:instance:"
INSTANCES = b"presence:instances"
REAPING_PREFIX = b"presence:reaping:"
SWEEP_INTERVAL = 1.0
REAP_PER_SWEEP = 10  # dead instances looked at per sweep
REAP_CLAIM_SECONDS = 60  # a reaper that dies lets another claim after this

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
"""

# KEYS: users, of:ID, watch. ARGV: user. One integer (the cheapest reply to
# parse): 2 x instances holding the user now, plus 1 if someone watches the room.
ENTER = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[1])
return n * 2 + math.min(redis.call('SCARD', KEYS[3]), 1)
"""

# The same; -1: not held (reaped meanwhile), nothing undone.
LEAVE = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  n = 0
end
return n * 2 + math.min(redis.call('SCARD', KEYS[3]), 1)
"""

# KEYS: users. ARGV: limit. {count, names}: HSCAN stops once it has enough.
ONLINE = """
local n = redis.call('HLEN', KEYS[1])
local names = {}
local limit = tonumber(ARGV[1])
if limit > 0 and n > 0 then
  local cursor = '0'
  repeat
    local r = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', limit)
    cursor = r[1]
    for i = 1, #r[2], 2 do
      if #names < limit then names[#names + 1] = r[2][i] end
    end
  until cursor == '0' or #names >= limit
end
return {n, names}
"""

# KEYS: instances. ARGV: id. 1 if the id was missing (reaped, or Redis restarted).
HEARTBEAT = (
    _NOW
    + """
return redis.call('ZADD', KEYS[1], now_ms(), ARGV[1])
"""
)

# KEYS: instances. ARGV: timeout ms, own id, limit. The ids past the timeout.
SWEEP = (
    _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]),
                        'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(dead) do
  if id ~= ARGV[2] then out[#out + 1] = id end
end
return out
"""
)

# KEYS: users, of:ID, watch. ARGV: id. The users of the room that went offline.
REAP_ROOM = """
local gone = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local n = redis.call('HINCRBY', KEYS[1], user, -1)
  if n <= 0 then
    redis.call('HDEL', KEYS[1], user)
    gone[#gone + 1] = user
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return gone
"""

# KEYS: users, of:ID, watch. ARGV: id, 1 if watching or 0, users held...
# This instance's part of the room made what it holds now. Changes: '1' or
# '0' (online or offline) followed by the user.
REBUILD_ROOM = """
local want = {}
for i = 3, #ARGV do want[ARGV[i]] = true end
local changes = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if want[user] then
    want[user] = nil
  else
    redis.call('SREM', KEYS[2], user)
    local n = redis.call('HINCRBY', KEYS[1], user, -1)
    if n <= 0 then
      redis.call('HDEL', KEYS[1], user)
      changes[#changes + 1] = '0' .. user
    end
  end
end
for user in pairs(want) do
  redis.call('SADD', KEYS[2], user)
  if redis.call('HINCRBY', KEYS[1], user, 1) == 1 then
    changes[#changes + 1] = '1' .. user
  end
end
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[3], ARGV[1])
else
  redis.call('SREM', KEYS[3], ARGV[1])
end
return changes
"""

SCRIPTS = {
    "enter": ENTER,
    "leave": LEAVE,
    "online": ONLINE,
    "heartbeat": HEARTBEAT,
    "sweep": SWEEP,
    "reap_room": REAP_ROOM,
    "rebuild_room": REBUILD_ROOM,
}


def _room_keys(room: str, instance: bytes) -> list[bytes]:
    tag = b"presence:{" + room.encode() + b"}:"
    return [tag + b"users", tag + b"of:" + instance, tag + b"watch"]


class RedisPresence:
    """The presence state through the broker's keyed commands (``command(key, ...)``:
    one Redis, or the master of the key's slot in a cluster)."""

    def __init__(self, broker: Any, clock: IReactorTime, timeout: float) -> None:
        self._broker = broker
        self._clock = clock
        self._timeout = timeout
        self.instance = os.urandom(8).hex().encode()
        self._instance_key = INSTANCE_PREFIX + self.instance
        self._on_changes: ChangesHandler = lambda changes: None
        self._on_lost: Callable[[], object] = lambda: None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self._rooms: set[str] = set()  # rooms listed under this instance's key
        self.commands = 0
        self.reaped = 0  # instances this one reaped

    # -- commands ---------------------------------------------------------------

    def _script(self, name: str, keys: list[bytes], args: list[Any]) -> Deferred[Any]:
        """EVAL with the script's text every time, not EVALSHA: an EVALSHA that
        meets NOSCRIPT (a restarted node, a cluster node that never ran it) is
        sent again later, behind commands sent after it, and presence depends on
        its commands running in the order they were sent. Redis keeps each
        script compiled by its hash, so the text costs only its bytes."""
        return self._command(keys[0], b"EVAL", SCRIPTS[name], len(keys), *keys, *args)

    def _command(self, key: bytes, *args: Any) -> Deferred[Any]:
        self.commands += 1
        try:
            d = self._broker.command(key, *args)
        except Exception as e:
            return fail(PresenceUnavailable(str(e)))

        def checked(reply: Any) -> Any:
            if isinstance(reply, Exception):  # an error reply, as a fast path gives it
                raise reply
            return reply

        return d.addCallback(checked)

    def _listed(self, room: str) -> Deferred[Any]:
        """The room goes under this instance's key (once), so a reaper finds it."""
        if room in self._rooms:
            return succeed(None)
        self._rooms.add(room)
        d = self._command(self._instance_key, b"SADD", self._instance_key, room.encode())

        def failed(failure: Failure) -> Failure:
            self._rooms.discard(room)
            return failure

        return d.addErrback(failed)

    # -- the state ----------------------------------------------------------------

    def start(self, on_changes: ChangesHandler, on_lost: Callable[[], object]) -> None:
        self._on_changes = on_changes
        self._on_lost = on_lost
        self._heartbeat.start(self._timeout / 3, now=True).addErrback(self._loop_failed)
        self._sweeper.start(SWEEP_INTERVAL, now=False).addErrback(self._loop_failed)

    def _loop_failed(self, failure: Failure) -> None:
        log.failure("presence: a timer loop stopped", failure)

    def enter(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        # Both sent now, in this order (an ``online`` asked next must come after
        # the enter); a failed listing fails the enter too: the caller rebuilds.
        listed = self._listed(room)
        d = self._script("enter", _room_keys(room, self.instance), [user.encode()])
        both = gatherResults([listed, d], consumeErrors=True)
        return both.addCallback(lambda r: (int(r[1]) >> 1 == 1, bool(int(r[1]) & 1)))

    def leave(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        d = self._script("leave", _room_keys(room, self.instance), [user.encode()])
        return d.addCallback(
            lambda r: (int(r) >= 0 and int(r) >> 1 == 0, int(r) > 0 and bool(int(r) & 1))
        )

    def watch(self, room: str) -> Deferred[None]:
        return self._watch(room, b"SADD")

    def unwatch(self, room: str) -> Deferred[None]:
        return self._watch(room, b"SREM")

    def _watch(self, room: str, verb: bytes) -> Deferred[None]:
        listed = self._listed(room) if verb == b"SADD" else succeed(None)
        watch_key = _room_keys(room, self.instance)[2]
        d = self._command(watch_key, verb, watch_key, self.instance)
        return gatherResults([listed, d], consumeErrors=True).addCallback(lambda _: None)

    def online(self, room: str, limit: int) -> Deferred[tuple[list[str], int]]:
        d = self._script("online", _room_keys(room, self.instance)[:1], [limit])

        def parsed(reply: list[Any]) -> tuple[list[str], int]:
            count, names = reply
            return sorted({n.decode() for n in names})[:limit], int(count)

        return d.addCallback(parsed)

    def rebuild(self, held: Held) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rebuild(held))

    async def _rebuild(self, held: Held) -> None:
        """Room by room: the rooms held now, and those listed under our key before
        (whose part may have to go). Each room's users are read from ``held`` as
        its script is sent: joins and leaves sent before it are in it, and those
        sent after it (on the same connection) apply after it."""
        listed = await self._command(self._instance_key, b"SMEMBERS", self._instance_key)
        changes: list[tuple[str, str, bool]] = []
        for room in sorted({r.decode() for r in listed} | held.rooms()):
            users = [user.encode() for user in held.users_in(room)]
            on = b"1" if held.watches(room) else b"0"
            reply = await self._script(
                "rebuild_room", _room_keys(room, self.instance), [self.instance, on, *users]
            )
            changes += [(room, c[1:].decode(), c[:1] == b"1") for c in reply]
        # The listing: rooms let go of leave it; those held now are in it (a room
        # listed meanwhile by a join stays, as it is held).
        keep = held.rooms()
        gone = sorted(r for r in (r.decode() for r in listed) if r not in keep)
        self._rooms.difference_update(gone)  # a join from now on lists its room again
        if gone:
            await self._command(
                self._instance_key, b"SREM", self._instance_key, *(r.encode() for r in gone)
            )
        if keep:
            await self._command(
                self._instance_key, b"SADD", self._instance_key, *(r.encode() for r in sorted(keep))
            )
        self._rooms = keep | self._rooms
        await self._script("heartbeat", [INSTANCES], [self.instance])
        if changes:
            self._on_changes(changes)

    # -- liveness -----------------------------------------------------------------

    def _beat(self) -> Deferred[None]:
        d = self._script("heartbeat", [INSTANCES], [self.instance])

        def beaten(missing: Any) -> None:
            if int(missing):
                # Our entry was gone: Redis restarted, or others reaped us while
                # our heartbeats did not arrive. Our users are ours again.
                self._on_lost()

        return d.addCallback(beaten).addErrback(self._quiet, "heartbeat")

    def _sweep(self) -> Deferred[None]:
        timeout_ms = int(self._timeout * 1000)
        d = self._script("sweep", [INSTANCES], [timeout_ms, self.instance, REAP_PER_SWEEP])

        async def reap_all(dead: list[bytes]) -> None:
            for instance in dead:
                await self.reap(instance)

        d.addCallback(lambda dead: Deferred.fromCoroutine(reap_all(dead)))
        return d.addErrback(self._quiet, "sweep")

    async def reap(self, instance: bytes) -> None:
        """Take back what ``instance`` held, if this one claims it first."""
        claim = REAPING_PREFIX + instance
        claimed = await self._command(
            claim, b"SET", claim, self.instance, b"NX", b"EX", REAP_CLAIM_SECONDS
        )
        if claimed is None:
            return  # another instance reaps it
        key = INSTANCE_PREFIX + instance
        rooms = await self._command(key, b"SMEMBERS", key)
        gone: list[tuple[str, str, bool]] = []
        for room in sorted(r.decode() for r in rooms):
            users = await self._script("reap_room", _room_keys(room, instance), [instance])
            gone += [(room, user.decode(), False) for user in users]
        await self._command(key, b"DEL", key)
        await self._command(INSTANCES, b"ZREM", INSTANCES, instance)
        await self._command(claim, b"DEL", claim)
        if instance != self.instance:
            self.reaped += 1
            log.info(
                "presence: instance {instance} stopped answering; {count} users went offline",
                instance=instance.decode(),
                count=len(gone),
            )
        if gone:
            self._on_changes(gone)

    def _quiet(self, failure: Failure, what: str) -> None:
        # Redis away: the broker logs that; the rebuild after it fixes the state.
        log.debug("presence {what} failed: {error}", what=what, error=failure.getErrorMessage())

    def stop(self) -> Deferred[None]:
        for loop in (self._heartbeat, self._sweeper):
            if loop.running:
                loop.stop()
        # Goodbye: what this instance held goes at once, not after the timeout.
        d = Deferred.fromCoroutine(self.reap(self.instance))
        return d.addErrback(self._quiet, "goodbye")
