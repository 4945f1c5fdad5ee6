"""Presence across processes, in Redis: :class:`~comet.presence.Presence`
for :class:`~comet.backends.redis.RedisHub`.

Design
------
Each process counts its own members' streams (the local registry of
:mod:`comet.presence`) and pushes each changed count to Redis from one
worker thread: the *absolute* count, so a push is idempotent, a reconnect
after a blip coalesces into nothing, and a process whose counts were lost
(a Redis restart, an expired lease) simply pushes them all again. Nothing on
a stream's path waits on Redis: fast routes subscribe members on cheroot's
accepting thread.

Keys (``<prefix>\\0presence:`` first; channel names and members hold no NUL):

* ``c:<process>:<channel>`` hash member -> this process's open streams;
* ``m:<channel>`` hash member -> open streams over every process (``0``:
  leaving, in its grace period);
* ``leaving`` sorted set ``<channel>\\0<member>`` by the time its grace ends;
* ``p:<process>`` the channels where the process counts streams;
* ``leases`` sorted set process -> lease expiry; ``disconnects`` a stream.

Every transition is one Lua script, atomic across processes: a member's
total going 0 -> 1 is a join (published by the process whose push did it)
unless the member was leaving (then the leave is cancelled: no flap); 1 -> 0
puts it in ``leaving``. Each process's worker renews its lease every
``lease / 4`` seconds and, every quarter second, runs the sweep script: it
retires the processes whose lease expired (their counts are subtracted, as
if their streams had closed: a SIGKILLed process stops counting within a
lease) and removes the members whose grace ended, which that worker then
publishes as leaves, so each leave is published once, by whichever process
swept it. A process that closes retires itself at once.

``disconnect`` ends the member's streams here at once and appends the member
to the ``disconnects`` stream, which every process's listener thread follows
with a blocking ``XREAD`` on a connection of its own (not the hub's
reader): the others end theirs within a round trip. An entry applies only
to streams opened before it (by its id's time against this machine's clock,
so clocks must agree to well under a second), and a listener cut off from
Redis resumes from the last entry it read, so a blip delays a disconnect
rather than losing it; after the stream's last 1000 entries it is lost.

Redis Cluster: the scripts compute their keys, and a script may touch one
slot only, so on a cluster every presence key shares one hash tag
(``<prefix>\\0presence{presence}:`` first): all of a hub's presence lives on
one slot's master, and each script names that base as its key, so the
cluster routes it there (and follows it through a failover or resharding).

Bounds: a process that dies between a transition and publishing its event
loses that one event (``members()`` stays right).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.crc import key_slot

from ..errors import BackendUnavailable
from ..presence import JOIN, LEAVE, Presence
from .redis_cluster import _moving, pipeline_scripts

if TYPE_CHECKING:
    from .redis import RedisHub

__all__ = ["RedisPresence"]

log = logging.getLogger("comet")

# Unreachable, or (Redis Cluster) no master serves the slot right now.
_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError, redis.exceptions.TryAgainError,
         redis.exceptions.RedisClusterException)

#: Seconds between two sweeps of a process: leaves and dead processes.
SWEEP_EVERY = 0.25

# Shared: the server's clock, and moving a member's total by delta (returns
# 1 for a join to publish). ARGV[1] is always the keys' base.
_LIB = """
local base = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function shift(channel, member, delta, grace)
  local members = base .. 'm:' .. channel
  local before = tonumber(redis.call('HGET', members, member) or '-1')
  local total = math.max(before, 0) + delta
  local key = channel .. '\\0' .. member
  if total <= 0 then
    if before <= 0 then
      if before < 0 then redis.call('HDEL', members, member) end
      return 0
    end
    redis.call('HSET', members, member, 0)
    redis.call('ZADD', base .. 'leaving', now_ms() + grace, key)
    return 0
  end
  redis.call('HSET', members, member, total)
  if before == 0 then redis.call('ZREM', base .. 'leaving', key) end
  if before < 0 then return 1 end
  return 0
end
local function retire(proc, grace)
  local set = base .. 'p:' .. proc
  for _, channel in ipairs(redis.call('SMEMBERS', set)) do
    local counts = base .. 'c:' .. proc .. ':' .. channel
    local flat = redis.call('HGETALL', counts)
    for i = 1, #flat, 2 do shift(channel, flat[i], -tonumber(flat[i + 1]), grace) end
    redis.call('DEL', counts)
  end
  redis.call('DEL', set)
  redis.call('ZREM', base .. 'leases', proc)
end
"""

# ARGV: base, process, channel, member, its streams in that process, grace ms.
_SET = _LIB + """
local proc, channel, member, new = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local counts = base .. 'c:' .. proc .. ':' .. channel
local old = tonumber(redis.call('HGET', counts, member) or '0')
if new == old then return 0 end
if new > 0 then
  redis.call('HSET', counts, member, new)
  redis.call('SADD', base .. 'p:' .. proc, channel)
else
  redis.call('HDEL', counts, member)
end
return shift(channel, member, new - old, tonumber(ARGV[6]))
"""

# ARGV: base, process, lease ms. 1 if the lease was not held (new, or taken
# away as expired): then the process pushes every count again.
_RENEW = _LIB + """
return redis.call('ZADD', base .. 'leases', now_ms() + tonumber(ARGV[3]), ARGV[2])
"""

# ARGV: base, grace ms (for dead processes' members). Returns the members
# whose grace ended, as channel, member, channel, member, ...
_SWEEP = _LIB + """
local grace, now = tonumber(ARGV[2]), now_ms()
for _, proc in ipairs(redis.call('ZRANGEBYSCORE', base .. 'leases', '-inf', now, 'LIMIT', 0, 10)) do
  retire(proc, grace)
end
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', base .. 'leaving', '-inf', now, 'LIMIT', 0, 200)) do
  redis.call('ZREM', base .. 'leaving', key)
  local sep = string.find(key, '\\0', 1, true)
  local channel, member = string.sub(key, 1, sep - 1), string.sub(key, sep + 1)
  local members = base .. 'm:' .. channel
  if tonumber(redis.call('HGET', members, member) or '-1') == 0 then
    redis.call('HDEL', members, member)
    table.insert(out, channel)
    table.insert(out, member)
  end
end
return out
"""

# ARGV: base, process, grace ms: a process closing.
_RETIRE = _LIB + """
retire(ARGV[2], tonumber(ARGV[3]))
return 0
"""

# ARGV: base, channel: forgotten, nobody leaves it.
_FORGET = _LIB + """
local channel = ARGV[2]
for _, member in ipairs(redis.call('HKEYS', base .. 'm:' .. channel)) do
  redis.call('ZREM', base .. 'leaving', channel .. '\\0' .. member)
end
redis.call('DEL', base .. 'm:' .. channel)
for _, proc in ipairs(redis.call('ZRANGE', base .. 'leases', 0, -1)) do
  redis.call('DEL', base .. 'c:' .. proc .. ':' .. channel)
end
return 0
"""


class RedisPresence(Presence):
    """Presence of a :class:`~comet.backends.redis.RedisHub`, shared by every
    process on the same Redis and prefix (``hub.presence``)."""

    def __init__(self, hub: RedisHub, lease: float) -> None:
        super().__init__(hub)
        self.redis_hub = hub
        self.lease = lease
        #: This process, in Redis' keys (fixed length: the keys stay unambiguous).
        self.process = secrets.token_hex(8)
        self._base = hub.prefix + "\x00presence:"
        if hub._cluster:  # one hash tag: every script touches one slot (see the module's docstring)
            self._base = hub.prefix + "\x00presence{presence}:"
            if key_slot(self._base.encode() + b"a") != key_slot(self._base.encode() + b"b"):
                raise ValueError(f"prefix {hub.prefix!r} has an empty hash tag '{{}}': "
                                 "presence keys on a Redis Cluster could not share a slot")
        client = hub.redis
        self._set = client.register_script(_SET)
        self._renew_script = client.register_script(_RENEW)
        self._sweep_script = client.register_script(_SWEEP)
        self._retire = client.register_script(_RETIRE)
        self._forget = client.register_script(_FORGET)
        # (channel, member) whose count changed, in order: joins are published
        # in the order the streams opened
        self._dirty: dict[tuple[str, str], None] = {}
        # Channels forgotten while the worker pushes a batch (_pushing): a
        # join in that batch is not published, and its count is forgotten again.
        self._forgotten: set[str] = set()
        self._pushing = False
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        #: Pushes and sweeps that failed because Redis was down (retried).
        self.failures = 0

    def start(self) -> None:
        """Start the worker and the disconnect listener (once; on first use)."""
        with self._lock:
            if self._started or self.closed:
                return
            self._started = True
            self._threads = [threading.Thread(target=self._work, name="comet-presence", daemon=True),
                             threading.Thread(target=self._listen, name="comet-presence-listener", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- counts go to Redis ------------------------------------------------------

    def _changed(self, channel: str, member: str, before: int | None, after: int) -> None:
        with self._lock:
            if after == 0 and self._counts.get(channel, {}).get(member) == 0:
                counts = self._counts[channel]
                del counts[member]  # Redis keeps the grace period, for every process
                if not counts:
                    del self._counts[channel]
            self._dirty[(channel, member)] = None
        self.start()
        self._kick.set()

    def _work(self) -> None:
        renew_at = sweep_at = 0.0
        delay = 0.05
        while not self._stop.is_set():
            self._kick.clear()
            try:
                now = time.monotonic()
                if now >= renew_at:
                    self._renew()
                    renew_at = now + self.lease / 4
                self._flush()
                if now >= sweep_at:
                    self._sweep()
                    sweep_at = now + min(SWEEP_EVERY, self.lease / 4)
                delay = 0.05
                self._kick.wait(max(0.0, min(renew_at, sweep_at) - time.monotonic()))
            except _DOWN as exc:
                self.failures += 1
                log.warning("comet: presence cannot reach Redis (%s); retrying", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self.lease / 4)
            except redis.ResponseError as exc:
                if not (self.redis_hub._follower is not None and _moving(exc)):
                    raise
                # (Cluster) the presence slot moved or its master failed over:
                # reload the slot map, push again (the counts are absolute).
                self.failures += 1
                self.redis_hub._follower.regroup()
                self._stop.wait(delay)
                delay = min(delay * 2, self.lease / 4)
            except Exception:  # a bug must not stop presence for the life of the hub
                log.exception("comet: presence worker failed")
                self._stop.wait(delay)

    def _call(self, script: Any, args: list[Any]) -> Any:
        # The base as the script's key routes it on a cluster (its keys share its slot).
        return self.redis_hub._script(script, [self._base], [self._base, *args])

    def _renew(self) -> None:
        if self._call(self._renew_script, [self.process, round(self.lease * 1000)]):
            with self._lock:  # our counts may have been retired: push them all again
                self._dirty.update(((c, m), None) for c, members in self._counts.items() for m in members)

    def _flush(self) -> None:
        with self._lock:
            dirty, self._dirty = list(self._dirty), {}
            counts = [self._counts.get(c, {}).get(m, 0) for c, m in dirty]
            self._forgotten.clear()
            self._pushing = bool(dirty)
        if not dirty:
            return
        try:
            self._push(dirty, counts)
        finally:
            with self._lock:
                self._pushing = False
                self._forgotten.clear()

    def _push(self, dirty: list[tuple[str, str]], counts: list[int]) -> None:
        grace = round(self.hub.presence_grace * 1000)
        error: BaseException | None = None
        try:
            if self.redis_hub._cluster:
                calls = [([self._base], [self._base, self.process, channel, member, n, grace])
                         for (channel, member), n in zip(dirty, counts)]
                joins = pipeline_scripts(self.redis_hub._master(self._base), self._set, calls)
                failed = [key for key, joined in zip(dirty, joins) if isinstance(joined, BaseException)]
                if failed:  # (the slot moved) those again after the slot map reloads; the rest are done
                    error = next(j for j in joins if isinstance(j, BaseException))
                    with self._lock:
                        self._dirty = {**dict.fromkeys(failed), **self._dirty}
            else:
                with self.redis_hub.redis.pipeline(transaction=False) as pipe:
                    for (channel, member), n in zip(dirty, counts):
                        self._set(keys=[self._base], args=[self._base, self.process, channel, member, n, grace],
                                  client=pipe)
                    joins = pipe.execute()
        except BaseException:
            with self._lock:  # pushed again next time: the counts are absolute
                self._dirty = {**dict.fromkeys(dirty), **self._dirty}
            raise
        with self._order:
            for (channel, member), joined in zip(dirty, joins):
                with self._lock:  # (asked each time: a presence callback may forget a channel)
                    forgotten = channel in self._forgotten
                if forgotten:
                    continue  # forgotten while this batch was pushed: nobody joins it
                if joined and not isinstance(joined, BaseException):
                    self._announce(channel, JOIN, member)
            with self._lock:
                again = {channel for channel, _ in dirty} & self._forgotten
            for channel in again:
                self._call(self._forget, [channel])  # a count pushed after the forget goes too
        if error is not None:
            raise error

    def _sweep(self) -> None:
        flat = cast("list[bytes]", self._call(self._sweep_script, [round(self.hub.presence_grace * 1000)]))
        with self._order:
            for i in range(0, len(flat), 2):
                self._announce(flat[i].decode(), LEAVE, flat[i + 1].decode())

    # -- disconnects ---------------------------------------------------------------

    def _listen(self) -> None:
        key = self._base + "disconnects"
        # Disconnects from a moment before this process counted anyone: an
        # entry ends only streams opened before it anyway.
        cursor = f"{int(time.time() * 1000) - 2000}-0"
        conn: redis.Redis | None = None
        delay = 0.05
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self.redis_hub._connect(self.redis_hub._reader_options)
                reply = cast("list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
                             conn.xread({key: cursor}, count=100, block=500))
                delay = 0.05
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        cursor = entry_id.decode()
                        if fields.get(b"p", b"").decode() != self.process:
                            at = int(cursor.split("-")[0]) / 1000
                            self._end_local(fields[b"m"].decode(), opened_before=at)
            except _DOWN:
                if conn is not None:
                    conn.close()
                    conn = None
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
            except Exception:
                log.exception("comet: presence listener failed")
                self._stop.wait(delay)
        if conn is not None:
            conn.close()

    def disconnect(self, member: str) -> int:
        ended = self._end_local(member, None)
        try:
            self.redis_hub.redis.xadd(self._base + "disconnects", {"m": member, "p": self.process},
                                      maxlen=1000, approximate=True)
        except _DOWN as exc:
            raise BackendUnavailable(f"cannot disconnect {member!r} elsewhere: Redis at {self.redis_hub._where} "
                                     f"is unreachable ({exc})") from exc
        return ended

    # -- asking, forgetting, closing ----------------------------------------------

    def members(self, channel: str) -> dict[str, int]:
        self.start()  # a process that asks sweeps too
        try:
            raw = cast("dict[bytes, bytes]", self.redis_hub.redis.hgetall(self._base + "m:" + channel))
        except _DOWN as exc:
            raise BackendUnavailable(f"cannot read the members of {channel!r}: Redis at {self.redis_hub._where} "
                                     f"is unreachable ({exc})") from exc
        return {member.decode(): int(n) for member, n in raw.items()}

    def on_change(self, callback: Any) -> Any:
        self.start()
        return super().on_change(callback)

    def dropped(self, channel: str) -> None:
        super().dropped(channel)
        with self._lock:
            self._dirty = {key: None for key in self._dirty if key[0] != channel}
            if self._pushing:  # a join in the batch in flight must not recreate it (else nothing to remember)
                self._forgotten.add(channel)

    def forget(self, channel: str) -> None:
        with self._order:  # a join being published lands first; one pushed but not yet published is dropped
            self.dropped(channel)
            try:
                self._call(self._forget, [channel])
            except _DOWN as exc:
                raise BackendUnavailable(f"cannot forget the members of {channel!r}: Redis at "
                                         f"{self.redis_hub._where} is unreachable ({exc})") from exc

    def close(self) -> None:
        """Stop the threads and retire this process: its members leave
        after the grace period unless they reconnect elsewhere."""
        super().close()
        self._stop.set()
        self._kick.set()
        for thread in self._threads:
            thread.join(5)
        if self._started:
            try:
                self._call(self._retire, [self.process, round(self.hub.presence_grace * 1000)])
            except _DOWN:
                pass  # the lease expires instead
