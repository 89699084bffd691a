"""Presence across instances in Redis: per-room hashes, per-instance sets, heartbeats.

- ``presence:room:ROOM`` is a hash of user -> number of instances holding a
  connection of theirs in the room. ``HLEN`` is the exact online count.
- ``presence:instance:ID`` is the set of ``room NUL user`` pairs instance ID
  holds, and of ``SOH room`` for the rooms it watches, so that what a dead
  instance held can be taken back.
- ``presence:watch:ROOM`` is the set of instances with a connection that
  follows the room's presence: an event is published only if it is not
  empty, so rooms nobody watches cost no messages.
- ``presence:instances`` is a sorted set of instance ID -> its last heartbeat,
  in Redis' own clock (``TIME``), so the instances' clocks need not agree.

Every change is one Lua script, atomic in Redis: a join or a leave is one
command whatever the room's size. Every instance sweeps for instances whose
heartbeat is older than ``presence_timeout`` and reaps them (the reap is
atomic, so one instance reaps each), reporting the users that went offline.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatserver.presence import ChangesHandler, PresenceUnavailable

log = Logger()

ROOM_PREFIX = b"presence:room:"
INSTANCE_PREFIX = b"presence:instance:"
INSTANCES = b"presence:instances"
WATCH_PREFIX = b"presence:watch:"
SWEEP_INTERVAL = 1.0
REAP_PER_SWEEP = 10  # dead instances reaped per sweep (each is one script)

_SPLIT = """
local function split(p)
  local sep = string.find(p, '\\0', 1, true)
  return string.sub(p, 1, sep - 1), string.sub(p, sep + 1)
end
local function is_watch(p)
  return string.byte(p, 1) == 1
end
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
"""

# KEYS: room hash, instance set, watch set. ARGV: user, pair. One integer (an
# integer reply is the cheapest to parse): 2 x instances holding the user now,
# plus 1 if some instance watches the room.
ENTER = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[2])
return n * 2 + math.min(redis.call('SCARD', KEYS[3]), 1)
"""

# The same; -1: not held (reaped meanwhile), nothing undone.
LEAVE = """
if redis.call('SREM', KEYS[2], ARGV[2]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  n = 0
end
return n * 2 + math.min(redis.call('SCARD', KEYS[3]), 1)
"""

# KEYS: watch set, instance set. ARGV: id, entry, 1 to watch or 0 to stop.
WATCH = """
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
else
  redis.call('SREM', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS: room hash. ARGV: limit. {count, names}: HSCAN stops once it has enough.
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
    _SPLIT
    + """
return redis.call('ZADD', KEYS[1], now_ms(), ARGV[1])
"""
)

# KEYS: instances. ARGV: timeout ms, own id, limit. The ids past the timeout.
SWEEP = (
    _SPLIT
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

# KEYS: instances, its set. ARGV: id, room prefix, watch prefix. The pairs that
# went offline.
REAP = (
    _SPLIT
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return {} end
local gone = {}
for _, p in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if is_watch(p) then
    redis.call('SREM', ARGV[3] .. string.sub(p, 2), ARGV[1])
  else
    local room, user = split(p)
    local key = ARGV[2] .. room
    local n = redis.call('HINCRBY', key, user, -1)
    if n <= 0 then
      redis.call('HDEL', key, user)
      gone[#gone + 1] = p
    end
  end
end
redis.call('DEL', KEYS[2])
return gone
"""
)

# KEYS: instances, own set. ARGV: id, room prefix, watch prefix, entries held...
# Changes, each '1' or '0' (online or offline) followed by its pair.
REBUILD = (
    _SPLIT
    + """
local want = {}
for i = 4, #ARGV do want[ARGV[i]] = true end
local had = {}
for _, p in ipairs(redis.call('SMEMBERS', KEYS[2])) do had[p] = true end
local changes = {}
for p in pairs(had) do
  if not want[p] and is_watch(p) then
    redis.call('SREM', ARGV[3] .. string.sub(p, 2), ARGV[1])
    redis.call('SREM', KEYS[2], p)
  elseif not want[p] then
    local room, user = split(p)
    local key = ARGV[2] .. room
    local n = redis.call('HINCRBY', key, user, -1)
    if n <= 0 then
      redis.call('HDEL', key, user)
      changes[#changes + 1] = '0' .. p
    end
    redis.call('SREM', KEYS[2], p)
  end
end
for p in pairs(want) do
  if not had[p] and is_watch(p) then
    redis.call('SADD', ARGV[3] .. string.sub(p, 2), ARGV[1])
    redis.call('SADD', KEYS[2], p)
  elseif not had[p] then
    local room, user = split(p)
    if redis.call('HINCRBY', ARGV[2] .. room, user, 1) == 1 then
      changes[#changes + 1] = '1' .. p
    end
    redis.call('SADD', KEYS[2], p)
  end
end
redis.call('ZADD', KEYS[1], now_ms(), ARGV[1])
return changes
"""
)


SCRIPTS = {
    "enter": ENTER,
    "leave": LEAVE,
    "watch": WATCH,
    "online": ONLINE,
    "heartbeat": HEARTBEAT,
    "sweep": SWEEP,
    "reap": REAP,
    "rebuild": REBUILD,
}


def _pair(room: str, user: str) -> bytes:
    return room.encode() + b"\0" + user.encode()


def _watch_entry(room: str) -> bytes:
    return b"\x01" + room.encode()


def _unpair(pair: bytes) -> tuple[str, str]:
    room, _, user = pair.partition(b"\0")
    return room.decode(), user.decode()


class RedisPresence:
    """The presence state on the broker's Redis (``RedisBroker.command``)."""

    def __init__(self, broker: Any, clock: IReactorTime, timeout: float) -> None:
        self._broker = broker
        self._clock = clock
        self._timeout = timeout
        self.instance = os.urandom(8).hex().encode()
        self._instance_key = INSTANCE_PREFIX + self.instance
        self._shas = {
            name: hashlib.sha1(text.encode()).hexdigest().encode() for name, text in SCRIPTS.items()
        }
        self._on_changes: ChangesHandler = lambda changes: None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self._on_lost: Callable[[], object] = lambda: None
        self.commands = 0
        self.reaped = 0  # instances this one reaped

    # -- commands ---------------------------------------------------------------

    def _script(self, name: str, keys: list[bytes], args: list[Any]) -> Deferred[Any]:
        """EVALSHA, and EVAL once Redis says it does not know the script (a restart)."""
        self.commands += 1
        d = self._command(b"EVALSHA", self._shas[name], len(keys), *keys, *args)

        def unknown(failure: Failure) -> Any:
            if "NOSCRIPT" not in failure.getErrorMessage():
                return failure
            self.commands += 1
            return self._command(b"EVAL", SCRIPTS[name], len(keys), *keys, *args)

        return d.addErrback(unknown)

    def _command(self, *args: Any) -> Deferred[Any]:
        try:
            d = self._broker.command(*args)
        except Exception as e:
            return fail(PresenceUnavailable(str(e)))

        def checked(reply: Any) -> Any:
            if isinstance(reply, Exception):  # an error reply, as the fast path gives it
                raise reply
            return reply

        return d.addCallback(checked)

    # -- the state ----------------------------------------------------------------

    def start(self, on_changes: ChangesHandler, on_lost: Callable[[], object]) -> None:
        self._on_changes = on_changes
        self._on_lost = on_lost
        self._heartbeat.start(self._timeout / 3, now=True).addErrback(self._loop_failed)
        self._sweeper.start(SWEEP_INTERVAL, now=False).addErrback(self._loop_failed)

    def _loop_failed(self, failure: Failure) -> None:
        log.failure("presence: a timer loop stopped", failure)

    def enter(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        keys = [ROOM_PREFIX + room.encode(), self._instance_key, WATCH_PREFIX + room.encode()]
        d = self._script("enter", keys, [user.encode(), _pair(room, user)])
        return d.addCallback(lambda r: (int(r) >> 1 == 1, bool(int(r) & 1)))

    def leave(self, room: str, user: str) -> Deferred[tuple[bool, bool]]:
        keys = [ROOM_PREFIX + room.encode(), self._instance_key, WATCH_PREFIX + room.encode()]
        d = self._script("leave", keys, [user.encode(), _pair(room, user)])
        return d.addCallback(
            lambda r: (int(r) >= 0 and int(r) >> 1 == 0, int(r) > 0 and bool(int(r) & 1))
        )

    def watch(self, room: str) -> Deferred[None]:
        return self._watch(room, b"1")

    def unwatch(self, room: str) -> Deferred[None]:
        return self._watch(room, b"0")

    def _watch(self, room: str, on: bytes) -> Deferred[None]:
        keys = [WATCH_PREFIX + room.encode(), self._instance_key]
        d = self._script("watch", keys, [self.instance, _watch_entry(room), on])
        return d.addCallback(lambda _: None)

    def online(self, room: str, limit: int) -> Deferred[tuple[list[str], int]]:
        d = self._script("online", [ROOM_PREFIX + room.encode()], [limit])

        def parsed(reply: list[Any]) -> tuple[list[str], int]:
            count, names = reply
            return sorted({n.decode() for n in names})[:limit], int(count)

        return d.addCallback(parsed)

    def rebuild(self, held: set[tuple[str, str]], watched: set[str]) -> Deferred[None]:
        entries = [_pair(room, user) for room, user in held]
        entries += [_watch_entry(room) for room in watched]
        d = self._script(
            "rebuild",
            [INSTANCES, self._instance_key],
            [self.instance, ROOM_PREFIX, WATCH_PREFIX, *entries],
        )

        def changed(reply: list[bytes]) -> None:
            changes = [(*_unpair(c[1:]), c[:1] == b"1") for c in reply]  # '1'/'0' + pair
            if changes:
                self._on_changes(changes)

        return d.addCallback(changed)

    # -- liveness -----------------------------------------------------------------

    def _beat(self) -> Deferred[None]:
        d = self._script("heartbeat", [INSTANCES], [self.instance])

        def beaten(missing: Any) -> Any:
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
        gone = await self._script(
            "reap", [INSTANCES, INSTANCE_PREFIX + instance], [instance, ROOM_PREFIX, WATCH_PREFIX]
        )
        if instance != self.instance:
            self.reaped += 1
            log.info(
                "presence: instance {instance} stopped answering; {count} users went offline",
                instance=instance.decode(),
                count=len(gone),
            )
        if gone:
            self._on_changes([(*_unpair(p), False) for p in gone])

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
