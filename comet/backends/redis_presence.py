"""Presence across processes, in Redis: :class:`~comet.presence.Presence`
for :class:`~comet.backends.redis.RedisHub`.

Design
------
Each process counts its own members' streams (the local registry of
:mod:`comet.presence`) and pushes each changed count to Redis from one
worker thread (``comet-presence-redis``): the *absolute* count, so a push is
idempotent, a reconnect after a blip coalesces into nothing, and a process
whose counts were lost (a Redis restart, an expired lease) simply pushes
them all again. Nothing on a stream's path waits on Redis, and no lock is
held across Redis I/O: ``subscribe(..., member=)`` counts the stream here
and queues the push (fast routes subscribe members on cheroot's accepting
thread); the join is announced once Redis answers.

**A count and its event are one step.** The script that moves a member's
count also appends the ``comet.join`` or ``comet.leave`` to the channel's
stream, with :meth:`RedisHub.publish <comet.backends.redis.RedisHub.publish>`'s
ids and trimming (one Lua function for both), so ``members()`` and the
events agree at every instant and each event is appended exactly once,
whoever retries a push. A ``forget`` deletes the stream and the channel's
presence in one script too, so a join lands wholly before it (and is
forgotten with it) or comes after it. A join that comes after it must
not recreate the channel: each push carries where the pushing process's
mirror of the channel stands (its newest event's id, or nothing for a
mirror with no event), and a push that raises a count is refused while the
stream does not follow that id (its oldest entry's predecessor is newer,
or the stream is gone): the mirror is of a forgotten stream, or behind.
The worker tries it again later; by then the process has either read the
forget (its counts there are dropped and a zero is pushed) or caught up.

Keys (``<prefix>\\0presence:`` first; channel names and members hold no NUL):

* per channel: ``m:<channel>`` hash member -> open streams over every
  process (``0``: leaving, in its grace period); ``c:<channel>`` hash
  ``<process>\\0<member>`` -> that process's open streams; ``l:<channel>``
  hash member -> when its grace period ends (ms, Redis' clock);
* ``leaving`` sorted set ``<channel>\\0<member>`` by the end of its grace:
  the index the sweep reads (each entry is checked against ``l:`` under
  the channel's script, so a stale one is harmless);
* ``p:<process>`` the channels where the process counts streams (added
  before a push that counts someone, removed after one that leaves the
  process counting nobody there);
* ``leases`` sorted set process -> lease expiry; ``disconnects`` a stream.

A member's total going 0 -> 1 is a join, appended by the script of the
process whose push did it (that process runs the ``on_presence``
callbacks, on the ``comet-presence`` thread of :mod:`comet.presence`, so a
slow callback delays no push), unless the member was leaving: then the leave is cancelled (no
flap). 1 -> 0 sets the grace deadline. Each process's worker renews its
lease every ``lease / 4`` seconds and, every quarter second, sweeps: it
retires the processes whose lease expired (their counts are subtracted
channel by channel, as if their streams had closed: a SIGKILLed process
stops counting within a lease) and runs the leave script for each member
whose grace ended, which removes the member and appends the leave in one
step: each leave is appended once, by whichever process swept it. A process
that closes retires itself at once.

``disconnect`` ends the member's streams here at once and appends the member
to the ``disconnects`` stream, which every process's listener thread follows
with a blocking ``XREAD`` on a connection of its own (not the hub's
reader): the others end theirs within a round trip. An entry applies only
to streams opened before it (by its id's time against this machine's clock,
so clocks must agree to well under a second), and a listener cut off from
Redis resumes from the last entry it read, so a blip delays a disconnect
rather than losing it; after the stream's last 1000 entries it is lost.

Redis Cluster: a script may touch one slot only. A channel's presence keys
carry the hash tag of its stream's slot (``<prefix>\\0presence{<tag>}:``,
*tag* as for the forgotten channels' hash: see
:mod:`comet.backends.redis_cluster`), so the stream, its presence and its
slot's forgotten-ids hash go in one script. The global keys (``leases``,
``leaving``, ``p:``, ``disconnects``) share the tag ``{presence}``: they live
on one slot's master (and follow it through a failover or resharding).

Bounds: a push whose reply was lost (Redis froze past the socket timeout,
then ran it) has its event appended but its ``on_presence`` callback not
run (the push again finds nothing to change). A member joining in a
process whose mirror of the channel holds no event yet, in the moment the
channel is forgotten elsewhere, may be counted in the new channel until
that process reads the forget (then it pushes a zero: the member leaves
after the grace period). A stream that expired (``max_idle``) under an open
subscription while a channel of its bucket was forgotten refuses that
process's joins until the channel's next event reaches it.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable, cast

import redis
from redis.crc import key_slot

from ..presence import JOIN, LEAVE, Host, Presence
from .redis_link import DOWN, RedisLink, moving, pipeline_scripts, presence_keys
from .redis_scripts import LIB, PUBLISH_FN

__all__ = ["RedisPresence", "presence_keys"]

log = logging.getLogger("comet")

#: Seconds between two sweeps of a process: leaves and dead processes.
SWEEP_EVERY = 0.25


# A channel's scripts. KEYS: the stream, its slot's forgotten-ids hash, then
# presence_keys(). ``announce`` appends a join or leave as publish() would,
# its settings at ARGV[a..a+5]: maxlen, "~" or "=", max_age ms, max_idle ms,
# bucket, bell (1: Cluster). ``shift`` moves a member's total by delta and
# returns (1, id) for a join (appended with announce's settings at a), (0,
# deadline) while the member is leaving, else (0, 0).
_CHANNEL_LIB = LIB + PUBLISH_FN + """
local function announce(event, member, a)
  return publish(KEYS[1], KEYS[2], ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4],
                 ARGV[a + 5] == '1', {'d', member, 'k', 's', 'e', event})
end
-- Does the stream follow a mirror that has read it up to *seen* ('': a
-- mirror with no event)? Not if its oldest entry's predecessor is newer (a
-- new stream since a forget, or a mirror behind), nor if it is gone and
-- its bucket's floor moved past *seen* (forgotten; a stream that expired
-- idle while no channel of its bucket was forgotten is not).
local function current(seen, a)
  if seen == '' then return true end
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #oldest == 0 then
    local floor = redis.call('HGET', KEYS[2], ARGV[a + 4])
    return not floor or not after(floor, seen)
  end
  local fields = oldest[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' then return not after(fields[i + 1], seen) end
  end
  return true
end
local function shift(member, delta, grace, a)
  local before = tonumber(redis.call('HGET', KEYS[3], member) or '-1')
  local total = math.max(before, 0) + delta
  if total <= 0 then
    if before < 0 then return 0, 0 end
    if before == 0 then return 0, tonumber(redis.call('HGET', KEYS[5], member) or '0') end
    local deadline = now_ms() + grace
    redis.call('HSET', KEYS[3], member, 0)
    redis.call('HSET', KEYS[5], member, deadline)
    return 0, deadline
  end
  if before < 0 then
    -- The event first: a script that fails midway is not undone, and a
    -- count without its event would never be announced.
    local id = announce('comet.join', member, a)
    redis.call('HSET', KEYS[3], member, total)
    return 1, id
  end
  redis.call('HSET', KEYS[3], member, total)
  if before == 0 then redis.call('HDEL', KEYS[5], member) end
  return 0, 0
end
"""

# ARGV: process, member, its streams in that process, grace ms, the mirror's
# newest id, then announce's settings. {1, id} for a join (appended), {0,
# deadline} for a member leaving, {0, 0}, or {-1, 0}: refused, try later.
_SET = _CHANNEL_LIB + """
local proc, member, new, grace = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local field = proc .. '\\0' .. member
local old = tonumber(redis.call('HGET', KEYS[4], field) or '0')
if new > old and not current(ARGV[5], 6) then return {-1, 0} end
local joined, result = shift(member, new - old, grace, 6)
if new > 0 then redis.call('HSET', KEYS[4], field, new) elseif old > 0 then redis.call('HDEL', KEYS[4], field) end
return {joined, result}
"""

# ARGV: member, then announce's settings. {1, id} if the member's grace
# ended and it left (appended), {0, deadline} if it ends later, else {0, 0}.
_LEAVE = _CHANNEL_LIB + """
local member = ARGV[1]
if tonumber(redis.call('HGET', KEYS[3], member) or '-1') ~= 0 then return {0, 0} end
local deadline = tonumber(redis.call('HGET', KEYS[5], member) or '0')
if deadline > now_ms() then return {0, deadline} end
local id = announce('comet.leave', member, 2)  -- first, as in shift
redis.call('HDEL', KEYS[3], member)
redis.call('HDEL', KEYS[5], member)
return {1, id}
"""

# ARGV: process, grace ms: the process's counts on this channel go (it
# closed, or its lease expired). Returns member, deadline, ... of those
# now leaving.
_RETIRE = _CHANNEL_LIB + """
local mine = ARGV[1] .. '\\0'
local out = {}
local flat = redis.call('HGETALL', KEYS[4])
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, #mine) == mine then
    redis.call('HDEL', KEYS[4], flat[i])
    local member = string.sub(flat[i], #mine + 1)
    local joined, deadline = shift(member, -tonumber(flat[i + 1]), tonumber(ARGV[2]), 0)
    if joined == 0 and deadline > 0 then
      table.insert(out, member)
      table.insert(out, deadline)
    end
  end
end
return out
"""

# The global scripts: KEYS[1] and ARGV[1] are the global keys' base.
# ARGV: base, process, lease ms. 1 if the lease was not held (new, or taken
# away as expired): then the process pushes every count again.
_RENEW = LIB + """
return redis.call('ZADD', ARGV[1] .. 'leases', now_ms() + tonumber(ARGV[3]), ARGV[2])
"""

# ARGV: base. Returns {{process, {its channels}}, ...} for up to 10
# processes whose lease expired, and the index of leaves due: key, score, ...
_SWEEP = LIB + """
local base, now = ARGV[1], now_ms()
local dead = {}
for _, proc in ipairs(redis.call('ZRANGEBYSCORE', base .. 'leases', '-inf', now, 'LIMIT', 0, 10)) do
  table.insert(dead, {proc, redis.call('SMEMBERS', base .. 'p:' .. proc)})
end
return {dead, redis.call('ZRANGEBYSCORE', base .. 'leaving', '-inf', now, 'WITHSCORES', 'LIMIT', 0, 200)}
"""

# ARGV: base, key, score: the index entry goes unless it was moved later
# meanwhile (the member left again: that deadline counts).
_UNINDEX = LIB + """
local score = redis.call('ZSCORE', ARGV[1] .. 'leaving', ARGV[2])
if score and tonumber(score) <= tonumber(ARGV[3]) then redis.call('ZREM', ARGV[1] .. 'leaving', ARGV[2]) end
return 0
"""

_Result = Any  # a script's reply, or the exception it raised


class RedisPresence(Presence):
    """Presence of a :class:`~comet.backends.redis.RedisHub`, shared by every
    process on the same Redis and prefix (``hub.presence``).

    The hub hands it its *link* to Redis, *mirrored* (where this process's
    mirror of a channel stands: its newest event's id, '' if it holds none)
    and, on a cluster, *regroup* (reload the slot map: a slot moved)."""

    def __init__(self, hub: Host, link: RedisLink, lease: float, *, mirrored: Callable[[str], str],
                 regroup: Callable[[], None] | None = None) -> None:
        super().__init__(hub)
        self.link = link
        self.lease = lease
        self._mirrored = mirrored
        self._regroup = regroup
        #: This process, in Redis' keys (fixed length: the keys stay unambiguous).
        self.process = secrets.token_hex(8)
        self._base = link.prefix + "\x00presence:"
        if link.cluster:  # one hash tag for the global keys (see the module's docstring)
            self._base = link.prefix + "\x00presence{presence}:"
            if key_slot(self._base.encode() + b"a") != key_slot(self._base.encode() + b"b"):
                raise ValueError(f"prefix {link.prefix!r} has an empty hash tag '{{}}': "
                                 "presence keys on a Redis Cluster could not share a slot")
        client = link.redis
        self._set = client.register_script(_SET)
        self._leave = client.register_script(_LEAVE)
        self._retire = client.register_script(_RETIRE)
        self._renew_script = client.register_script(_RENEW)
        self._sweep_script = client.register_script(_SWEEP)
        self._unindex = client.register_script(_UNINDEX)
        # (channel, member) whose count changed, in order: joins are pushed
        # in the order the streams opened
        self._dirty: dict[tuple[str, str], None] = {}
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        #: Pushes and sweeps that failed because Redis was down (retried).
        self.failures = 0

    def start(self) -> None:
        """Start the worker and the disconnect listener (once; on first use)."""
        with self.lock:
            if self._started or self.closed:
                return
            self._started = True
            self._threads = [threading.Thread(target=self._work, name="comet-presence-redis", daemon=True),
                             threading.Thread(target=self._listen, name="comet-presence-listener", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- counts go to Redis ------------------------------------------------------

    def count_changed(self, channel: str, member: str, before: int | None, after: int) -> tuple[Any, ...]:
        if after == 0:
            counts = self.counts[channel]
            del counts[member]  # Redis keeps the grace period, for every process
            if not counts:
                del self.counts[channel]
        self._dirty[(channel, member)] = None
        return ()

    def after_change(self, wakes: tuple[Any, ...]) -> None:
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
            except DOWN as exc:
                self.failures += 1
                log.warning("comet: presence cannot reach Redis (%s); retrying", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self.lease / 4)
            except redis.ResponseError as exc:
                if not (self._regroup is not None and moving(exc)):
                    log.exception("comet: presence worker failed")
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.lease / 4)
                    continue
                # (Cluster) a slot moved or its master failed over: reload
                # the slot map, push again (the counts are absolute).
                self.failures += 1
                self._regroup()
                self._stop.wait(delay)
                delay = min(delay * 2, self.lease / 4)
            except Exception:  # a bug must not stop presence for the life of the hub
                log.exception("comet: presence worker failed")
                self._stop.wait(delay)

    def _call(self, script: Any, args: list[Any]) -> Any:
        """A global script: the base as its key routes it on a cluster."""
        return self.link.script(script, [self._base], [self._base, *args])

    def _global(self) -> redis.Redis:
        """A client of the master of the global keys (a cluster's pipelines
        refuse scripts: a master's own take them)."""
        return self.link.client_of(self._base)

    def _keys(self, channel: str) -> list[str]:
        stream = self.link.key(channel)
        return [stream, self.link.forgotten_for(stream), *self.link.presence_keys(channel)]

    def _settings(self, channel: str) -> list[Any]:
        """announce's settings for *channel* (see _CHANNEL_LIB)."""
        return self.link.appending(channel)

    def _on_channels(self, script: Any, calls: list[tuple[str, list[Any]]]) -> list[_Result]:
        """*script* once per ``(channel, args)``, on each channel's keys: one
        pipeline per master; each reply or error, in order."""
        results: list[_Result] = [None] * len(calls)
        groups: dict[int, tuple[redis.Redis, list[int]]] = {}
        for i, (channel, _) in enumerate(calls):
            client = self.link.client_of(self.link.key(channel))
            groups.setdefault(id(client), (client, []))[1].append(i)
        for client, indexes in groups.values():
            replies = pipeline_scripts(client, script, [(self._keys(calls[i][0]), calls[i][1]) for i in indexes])
            for i, reply in zip(indexes, replies):
                results[i] = reply
        return results

    def _renew(self) -> None:
        if self._call(self._renew_script, [self.process, round(self.lease * 1000)]):
            with self.lock:  # our counts may have been retired: push them all again
                self._dirty.update(((c, m), None) for c, members in self.counts.items() for m in members)

    def _seen(self, channel: str) -> str:
        """Where this process's mirror of *channel* stands: its newest
        event's id ('' if it holds none: see _CHANNEL_LIB's ``current``)."""
        return self._mirrored(channel)

    def _flush(self) -> None:
        with self.lock:  # read under the lock, pushed after it: invariant I8
            dirty, self._dirty = list(self._dirty), {}
            counts = [self.counts.get(c, {}).get(m, 0) for c, m in dirty]
        if not dirty:
            return
        try:
            calls = self._push(dirty, counts)
        except BaseException:
            with self.lock:  # pushed again next time: the counts are absolute
                self._dirty = {**dict.fromkeys(dirty), **self._dirty}
            raise
        self.report(calls)

    def _push(self, dirty: list[tuple[str, str]], counts: list[int]) -> list[tuple[str, str, str]]:
        """Push *counts*; the joins they made, for the callbacks."""
        client = self.link.redis
        grace = round(self.hub.presence_grace * 1000)
        added = {channel for (channel, _), n in zip(dirty, counts) if n > 0}
        if added:  # first: a process that dies after its push is retired there too
            client.sadd(self._base + "p:" + self.process, *added)
        replies = self._on_channels(self._set, [
            (channel, [self.process, member, n, grace, self._seen(channel) if n else "", *self._settings(channel)])
            for (channel, member), n in zip(dirty, counts)])
        joins: list[tuple[str, str, str]] = []
        leaving: dict[str, int] = {}
        again: list[tuple[str, str]] = []
        error: BaseException | None = None
        for key, reply in zip(dirty, replies):
            if isinstance(reply, BaseException):
                if not moving(reply):
                    raise reply
                error = reply
                again.append(key)  # (the slot moved) again after the slot map reloads
            elif reply[0] == 1:
                joins.append((key[0], JOIN, key[1]))
            elif reply[0] == -1:
                again.append(key)  # the mirror is behind or of a forgotten stream: later
            elif reply[1]:
                leaving["\x00".join(key)] = reply[1]
        if again:
            with self.lock:
                self._dirty = {**dict.fromkeys(again), **self._dirty}
        if leaving:
            client.zadd(self._base + "leaving", leaving)
        with self.lock:  # channels where this process counts nobody now: not retired with it
            idle = {channel for (channel, _), n in zip(dirty, counts) if not n} - set(self.counts)
        if idle and error is None:
            client.srem(self._base + "p:" + self.process, *idle)
        if error is not None:
            self.report(joins)
            raise error
        return joins

    def _sweep(self) -> None:
        dead, due = cast("list[Any]", self._call(self._sweep_script, []))
        for proc, channels in dead:
            self._retire_process(proc.decode(), [c.decode() for c in channels])
        keys = [(due[i].decode(), float(due[i + 1])) for i in range(0, len(due), 2)]
        if not keys:
            return
        pairs = [key.split("\x00", 1) for key, _ in keys]
        replies = self._on_channels(self._leave, [(channel, [member, *self._settings(channel)])
                                                  for channel, member in pairs])
        left: list[tuple[str, str, str]] = []
        later: dict[str, int] = {}
        error: BaseException | None = None
        done: list[tuple[list[str], list[Any]]] = []
        for (key, score), (channel, member), reply in zip(keys, pairs, replies):
            if isinstance(reply, BaseException):
                error = reply
            elif reply[0] == 0 and reply[1]:
                later[key] = reply[1]
            else:
                if reply[0] == 1:
                    left.append((channel, LEAVE, member))
                done.append(([self._base], [self._base, key, score]))
        if done:
            for reply in pipeline_scripts(self._global(), self._unindex, done):
                if isinstance(reply, BaseException):
                    raise reply
        if later:
            self.link.redis.zadd(self._base + "leaving", later)
        self.report(left)
        if error is not None:
            raise error

    def _retire_process(self, proc: str, channels: list[str]) -> None:
        """Subtract *proc*'s counts, channel by channel, then drop its lease."""
        grace = round(self.hub.presence_grace * 1000)
        leaving: dict[str, int] = {}
        for channel, reply in zip(channels, self._on_channels(self._retire, [(c, [proc, grace]) for c in channels])):
            if isinstance(reply, BaseException):
                raise reply
            for i in range(0, len(reply), 2):
                leaving[channel + "\x00" + reply[i].decode()] = reply[i + 1]
        if leaving:
            self.link.redis.zadd(self._base + "leaving", leaving)
        self.link.redis.delete(self._base + "p:" + proc)
        self.link.redis.zrem(self._base + "leases", proc)

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
                    conn = self.link.connect(self.link.reader_options)
                reply = cast("list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
                             conn.xread({key: cursor}, count=100, block=500))
                delay = 0.05
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        cursor = entry_id.decode()
                        if fields.get(b"p", b"").decode() != self.process:
                            at = int(cursor.split("-")[0]) / 1000
                            self.end_streams(fields[b"m"].decode(), opened_before=at)
            except DOWN:
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
        ended = self.end_streams(member)
        try:
            self.link.redis.xadd(self._base + "disconnects", {"m": member, "p": self.process},
                                 maxlen=1000, approximate=True)
        except DOWN as exc:
            raise self.link.down(f"cannot disconnect {member!r} elsewhere", exc) from exc
        return ended

    # -- asking, forgetting, closing ----------------------------------------------

    def members(self, channel: str) -> dict[str, int]:
        self.start()  # a process that asks sweeps too
        key = self.link.presence_keys(channel)[0]
        try:  # (a page may ask while it renders: a stalled Redis costs it LOAD_TIMEOUT at most)
            raw = cast("dict[bytes, bytes]", self.link.loader.hgetall(key))
        except DOWN as exc:
            raise self.link.down(f"cannot read the members of {channel!r}", exc) from exc
        return {member.decode(): int(n) for member, n in raw.items()}

    def on_change(self, callback: Any) -> Any:
        self.start()
        return super().on_change(callback)

    def dropped(self, channel: str) -> None:
        with self.lock:
            counts = self.drop(channel)
            self._dirty = {key: None for key in self._dirty if key[0] != channel}
            # Zeros: a count of ours that landed after the forget (see the
            # module's bounds) goes too; otherwise they change nothing.
            self._dirty.update(((channel, member), None) for member in counts)
        if counts:
            self.after_change(())

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
                channels = cast("set[bytes]", self.link.redis.smembers(self._base + "p:" + self.process))
                self._retire_process(self.process, sorted(c.decode() for c in channels))
            except DOWN:
                pass  # the lease expires instead
