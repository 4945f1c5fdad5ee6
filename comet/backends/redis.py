"""The same hub across processes and machines, on Redis Streams.

:class:`RedisHub` has :class:`~comet.Hub`'s API. Swap it in and every
process that points at the same Redis shares every channel::

    hub = RedisHub("redis://127.0.0.1:6379/0")      # instead of Hub()

Design
------
Each channel is one Redis stream (key ``<prefix><channel>``). ``publish()``
is one ``XADD ... MAXLEN ~ maxlen`` (in a tiny Lua script) and returns Redis'
id, so ids are global per channel and sort in publish order everywhere: a
client that reconnects to another process hands back its ``Last-Event-ID``
and resumes there exactly. The script also stores each entry's predecessor
id (field ``p``): whoever reads an entry knows whether anything came between
it and what they already hold, even after trimming removed it, so a gap is
always detected exactly (no spurious gap for a cursor that is exactly the
newest trimmed event, no silent loss). Redis 7.0's ``XINFO`` cannot tell:
trimming does not update ``max-deleted-entry-id``.

Each process keeps the in-memory hub's machinery as a *mirror*: a channel
becomes live here the first time something subscribes to it, reads its
history or watches it (``XREVRANGE``: the newest ``buffer_size`` events),
and from then on **one reader thread per process** follows every live
channel with a blocking ``XREAD`` and appends what it reads to the local
buffers. Appending wakes local waiters and the parked-stream writer exactly
as a local publish does, so the per-event cost is one read per process plus
the local fan-out, whatever the number of local streams. A new live channel
interrupts the blocked read with ``CLIENT UNBLOCK`` so it joins at once.

Publishing threads share round trips: while one publish is on the wire,
others that arrive queue up, and the next of them sends the whole queue as
one pipeline (group commit, :mod:`comet.backends.redis_publish`;
``batch_publishes=False`` turns it off).

The hub composes its parts: a :class:`~comet.backends.redis_link.RedisLink`
(clients, scripts, cluster routing, key names) that it hands to its
:class:`~comet.backends.redis_publish.Publisher`, its presence
(:mod:`comet.backends.redis_presence`) and, on a cluster, its readers
(:mod:`comet.backends.redis_cluster`), which deliver into its mirrors.

Order: every process appends in Redis' order, so all subscribers everywhere
see one order per channel. A process also receives its own publishes through
the reader (one round trip later), which keeps that order single.

Failure model
-------------
* Redis unreachable at ``publish()``: :class:`~comet.errors.BackendUnavailable`
  at once (after redis-py's connect timeout). comet does **not** retry a
  publish: ``XADD`` is not idempotent, and a retry after a reply was lost
  would store the event twice. The caller decides (the examples answer 503).
* The first subscription to a channel in a process needs Redis (to load the
  history), as does one whose cursor is ahead of this process's mirror (a
  catch-up read); if Redis is down or does not answer within
  :data:`LOAD_TIMEOUT` (0.6 s), that subscribe raises ``BackendUnavailable``
  and the adapters answer 503 with ``Retry-After``. No lock is held while it
  waits: the channel's other streams go on. Streams that open a channel's
  first subscriptions at once share one read (``counters["loads"]``). Nothing else on a request's path
  waits on Redis: presence is pushed by its own thread
  (:mod:`comet.backends.redis_presence`).
* The reader reconnects with exponential backoff (``backoff=(first, max)``
  seconds, with jitter) and resumes every channel from the last id it
  appended, so nothing Redis kept is lost. Streams stay open meanwhile:
  heartbeats come from the local machinery, not from Redis.
* If Redis trimmed events this process never read (it was cut off longer
  than ``maxlen`` events), the predecessor ids show the hole and local
  subscribers get the usual :data:`~comet.GAP` event, never a silent loss.
* A Redis restarted *without* persistence forgets its streams; new ids keep
  growing (they are timestamps), so clients simply continue.

Connection settings (password, ``rediss://`` TLS, db, timeouts, ...) go in
the URL or as keyword arguments, passed through to ``redis.Redis.from_url``.

High availability
-----------------
``redis+sentinel://host:port,host:port,host:port/<service>[/db]`` follows
the master that Redis Sentinel names for *service*, through failovers
(redis-py's :class:`redis.sentinel.Sentinel`). While a failover is under way
publishes raise ``BackendUnavailable`` at once (the old master refuses
connections; the sentinels still name it until they have elected another),
the reader reconnects to the new master and resumes every channel from its
last id, and streams keep their heartbeats meanwhile.

``redis+cluster://h1:p1,h2:p2,h3:p3`` spreads channels over a Redis
Cluster's masters: see :mod:`comet.backends.redis_cluster` (a reader per
master, woken by a bell the publish script rings; regrouped by the slot map
after a resharding or a failover).

Replication is asynchronous, so a failover can lose the last events the old
master acknowledged before its replica had them. ``replicas=N`` makes
publishing durable: each publish (each batch) is followed by ``WAIT N`` on
the same connection, in the same round trip, and is acknowledged only once
N replicas have it; if they don't within ``replica_timeout`` seconds, the
publish raises ``BackendUnavailable`` (the event may still be delivered: it
is on the master, just not safe). Then a failover to one of those replicas
loses nothing that was acknowledged.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any, Iterable, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import KeyT, StreamIdT

from ..cursors import bucket, parse_id, stored_id
from ..errors import BackendUnavailable
from ..framing import DEFAULT_MAX_EVENT_BYTES, Event, Part, to_json
from ..channel import Channel
from ..hub import Hub, MaxAge
from ..presence import Presence
from .redis_cluster import ClusterFollower
from .redis_link import DOWN, LOAD_TIMEOUT, Entry, RedisLink, client_for
from .redis_presence import RedisPresence
from .redis_publish import GroupCommit, Publisher
from .redis_scripts import FORGET, LOAD, PUBLISH, PUBLISH_CLUSTER

__all__ = ["RedisHub", "LOAD_TIMEOUT", "client_for"]

log = logging.getLogger("comet")

# The scripts under the names the docs and other languages' publishers know.
_PUBLISH, _PUBLISH_CLUSTER = PUBLISH, PUBLISH_CLUSTER
_GroupCommit = GroupCommit  # (where tests/test_redis.py finds it)


class _Readers:
    """What this hub's cluster readers deliver into (a
    :class:`~comet.backends.redis_cluster.Sink`): its mirrors."""

    def __init__(self, hub: RedisHub) -> None:
        self.hub = hub

    def cursor(self, key: bytes) -> str | None:
        return self.hub._cursor(key)

    def deliver(self, key: bytes, entries: list[Entry]) -> None:
        self.hub._deliver(key, entries)

    def reader_changed(self, connected: bool) -> None:
        if connected:
            self.hub.connects += 1
        self.hub._cluster_state()


class RedisHub(Hub):
    """A :class:`~comet.Hub` whose channels live in Redis streams.

    Example (``tests/test_redis.py`` runs the same against a real server)::

        hub = RedisHub("redis://127.0.0.1:6379/0", maxlen=500)
        first = hub.publish("lobby", {"player": "ann"}, event="joined")
        sub = hub.subscribe("lobby", last_id=hub.before(first))
        assert next(sub).data == {"player": "ann"}   # in this or any process
        sub.close()
        hub.close()

    ``maxlen`` bounds each channel's history in Redis (``approximate`` trims
    in whole macro nodes, cheaply; the exact bound may be exceeded by up to
    about a hundred events). ``buffer_size`` (default ``maxlen``) is what
    each process mirrors. ``block`` is the reader's longest ``XREAD`` wait in
    seconds; ``backoff`` its reconnect delays. ``batch_publishes`` lets
    concurrent publishing threads share round trips (see the module's
    introduction); it is on by default. ``replicas=N`` acknowledges a
    publish only once N replicas have it (``WAIT``; see High availability
    in the module's introduction), within ``replica_timeout`` seconds. Other
    keywords (``password``, ``socket_timeout``, ``ssl_ca_certs``,
    ``client_name``, ...) go to ``redis.Redis.from_url``.

    *url* may also be ``redis+sentinel://h1:p1,h2:p2,h3:p3/<service>[/db]``:
    the master Sentinel names for *service*, followed through failovers.

    ``max_age`` trims events older than that from Redis (``XTRIM MINID`` at
    each publish) and from the mirrors; with ``max_idle`` a stream expires
    in Redis that long after its last publish unless some process has a
    subscriber on it (each process's sweeper extends those), and each
    process drops its idle mirrors. :meth:`forget` deletes the stream and
    every process ends its subscriptions to it.

    Presence (``member=``, ``members()``, ``disconnect()``) is shared by
    every process too (:mod:`comet.backends.redis_presence`): a process
    that dies stops counting within ``presence_lease`` seconds.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, maxlen: int = 1000, approximate: bool = True,
                 prefix: str = "comet:", buffer_size: int | None = None,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, idle: float = 1.0, block: float = 5.0,
                 backoff: tuple[float, float] = (0.05, 5.0), batch_publishes: bool = True,
                 replicas: int = 0, replica_timeout: float = 1.0, max_age: MaxAge = None,
                 max_idle: float | None = None, presence_grace: float = 2.0, presence_lease: float = 10.0,
                 **redis_options: Any) -> None:
        if not isinstance(maxlen, int) or maxlen < 1:
            raise ValueError(f"maxlen must be a positive int, got {maxlen!r}")
        if not isinstance(prefix, str) or any(c in prefix for c in "\r\n\x00"):
            raise ValueError(f"prefix must be a str without CR, LF or NUL, got {prefix!r}")
        if not isinstance(block, (int, float)) or not 0 < block <= 60:
            raise ValueError(f"block must be between 0 and 60 seconds, got {block!r}")
        if len(backoff) != 2 or not 0 < backoff[0] <= backoff[1]:
            raise ValueError(f"backoff must be (first, max) seconds with 0 < first <= max, got {backoff!r}")
        if not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be a non-negative int, got {replicas!r}")
        if not isinstance(replica_timeout, (int, float)) or not 0 < replica_timeout <= 60:
            raise ValueError(f"replica_timeout must be between 0 and 60 seconds, got {replica_timeout!r}")
        if isinstance(presence_lease, bool) or not isinstance(presence_lease, (int, float)) or presence_lease <= 0:
            raise ValueError(f"presence_lease must be a positive number of seconds, got {presence_lease!r}")
        super().__init__(buffer_size or maxlen, max_event_bytes=max_event_bytes, idle=idle, max_age=max_age,
                         max_idle=max_idle, presence_grace=presence_grace)
        self.presence_lease = float(presence_lease)  # a dead process's members count this long at most
        self.epoch = 0  # ids are Redis', so the first cursor of an empty channel is "0-0"
        self.url = url
        self.maxlen = maxlen
        self.approximate = approximate
        self.prefix = prefix
        self.block = float(block)
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.replicas = replicas
        self.replica_timeout = float(replica_timeout)
        # No retry: XADD is not idempotent (see the module docstring). Bounded
        # timeouts: a publishing request thread never hangs on a dead Redis.
        options: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0,
                                   "retry": Retry(NoBackoff(), 0), "health_check_interval": 0, **redis_options}
        if url.startswith("redis+cluster://") and replicas:
            raise ValueError("replicas (a durable publish with WAIT) is not supported on Redis Cluster yet")
        # What this hub, its presence and its cluster readers share (redis_link).
        self._link = link = RedisLink(url, options, prefix=prefix, block=self.block, maxlen=maxlen,
                                      approximate=approximate, max_age=max_age, max_idle=self.max_idle)
        self._cluster = link.cluster
        self.redis = link.redis
        self._loader = link.loader
        self._load_script = self.redis.register_script(LOAD)
        self._forget_script = self.redis.register_script(FORGET)
        self._forgets_key = link.forgets_key
        self._forgets_cursor: str | None = None  # the reader's: set at the first load or connect
        # Channels this process is forgetting now (forget() calls in flight),
        # and the note of such a forget the reader read meanwhile: forget()
        # drops the mirror itself, after handing its subscribers the rest.
        self._forgetting: dict[str, int] = {}
        self._deferred: dict[str, str] = {}
        self.counters.add("round_trips", 0)
        self._publisher = Publisher(link, self.counters, replicas=replicas, replica_timeout=self.replica_timeout,
                                    batch=batch_publishes)
        self._send_batch = self._publisher.send_batch  # (one round trip for a batch: tests send their own)
        self.counters.add("loads", 0)  # of a channel's history, at its first use here
        self._loading: dict[str, _Load] = {}  # channel -> the read of its history under way
        self._live: dict[bytes, str] = {}  # stream key -> channel, for the reader
        # stream key -> id of the newest event mirrored: the reader's XREAD
        # arguments, kept current by _append so a read costs no per-channel work
        self._cursors: dict[bytes, str] = {}
        self._version = 0  # bumped when a channel becomes live
        self._seen_version = 0  # the version the reader's current XREAD covers
        self._reader_id: int | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        #: True while the reader holds a working connection to Redis.
        self.connected = False
        #: Times the reader (re)connected; 1 after the first connect.
        self.connects = 0
        self._reader = threading.Thread(target=self._read_loop, name="comet-redis-reader", daemon=True)
        self._follower: ClusterFollower | None = None
        if self._cluster:  # a reader per master instead (redis_cluster)
            self._follower = ClusterFollower(_Readers(self), link, block=self.block, backoff=self.backoff)
            newest = cast("list[Entry]", self.redis.xrevrange(self._forgets_key, count=1))
            self._forgets_cursor = newest[0][0].decode() if newest else "0-0"
            self._follower.follow(self._forgets_key.encode())
        else:
            self._reader.start()
        self._start_sweeper()

    def _start_sweeper(self) -> None:
        if hasattr(self, "_reader"):  # not from Hub.__init__: once this hub is ready
            super()._start_sweeper()

    def _make_presence(self) -> Presence:
        return RedisPresence(self, self._link, self.presence_lease, mirrored=self._mirrored,
                             regroup=self._follower.regroup if self._follower is not None else None)

    def _mirrored(self, channel: str) -> str:
        """Where this process's mirror of *channel* stands: its newest
        event's id, '' if it holds none (what presence's pushes carry)."""
        ch = self._channels.get(channel)
        if ch is None:
            return ""
        with ch.cond:
            return ch.tail_id() if ch.seq else ""

    # -- publishing ---------------------------------------------------------

    def publish(self, channel: str, data: Any, event: str | None = None, *, retry: int | None = None,
                key: str | None = None) -> str:
        """``XADD`` the event to *channel*'s stream and return Redis' id.

        Every process subscribed to *channel* receives it, in one order.
        Raises :class:`~comet.errors.BackendUnavailable` if Redis cannot be
        reached; nothing is retried (no duplicates).
        """
        proto = self._prepare(channel, data, event, retry, key)
        try:
            event_id = self._publisher.publish(self._key(channel), self._fields(proto))
        except DOWN as exc:
            raise self._link.down(f"cannot publish to {channel!r}", exc) from exc
        self.counters.add("published")
        return event_id.decode()

    def publish_many(self, channel: str, items: Iterable[Any], event: str | None = None, *,
                     retry: int | None = None) -> list[str]:
        """Publish several events in one round trip (``MULTI``/``EXEC``: all
        of them or none); their Redis ids. See :meth:`Hub.publish_many`."""
        protos = [self._prepare(channel, item.data, item.name, item.retry) if isinstance(item, Event)
                  else self._prepare(channel, item, event, retry) for item in items]
        if not protos:
            return []
        try:
            ids = self._publisher.publish_many(self._key(channel), [self._fields(proto) for proto in protos])
        except DOWN as exc:
            raise self._link.down(f"cannot publish to {channel!r}", exc) from exc
        self.counters.add("published", len(ids))
        return [i.decode() for i in ids]

    def _fields(self, proto: Event) -> list[str | int | bytes]:
        """The publish script's arguments for one event."""
        args: list[str | int | bytes] = [self.maxlen, "~" if self.approximate else "="]
        if isinstance(proto.data, Part):  # binary as it is, with its type ("t") and headers ("h")
            args += ["d", bytes(proto.data.body), "k", "b", "t", proto.data.content_type]
            if proto.data.headers:
                args += ["h", to_json(proto.data.headers)]
        else:
            args += ["d", proto.text(), "k", "s" if isinstance(proto.data, str) else "j"]
        if proto.name is not None:
            args += ["e", proto.name]
        if proto.retry is not None:
            args += ["r", proto.retry]
        if proto._key is not None:  # a latest-value channel's key (Hub.latest)
            args += ["y", proto._key]
        return args

    def _epoch_of(self, channel: str) -> int:
        return 0  # ids are Redis': a new channel's floor is "0-0" or what Redis says (_LOAD)

    # -- channels that come and go --------------------------------------------

    def forget(self, channel: str) -> bool:
        """Delete *channel*'s stream from Redis; every process following it
        ends its subscriptions there (after what was published before), as
        :meth:`Hub.forget` does. A later stream of that name starts after
        the newest id it had, so old cursors get an exact gap. True if the
        stream or a local mirror existed."""
        self._check_channel(channel)
        key = self._key(channel)
        # The stream and its presence go in one script: a join or leave is
        # counted and appended to the stream in one script too, so it lands
        # wholly before the forget or is refused after it (redis_presence).
        # This process's counts go with its mirror (_forget_here); a forget
        # that fails changes nothing.
        # This process's subscribers first take what was published before the
        # forget: the script returns what this mirror's reader had not
        # appended yet (read in the same step as the delete: nothing between).
        ch = self._channels.get(channel)
        tail = ""
        if ch is not None:
            with ch.cond:
                tail = ch.tail_id() if ch.live and not ch.dead else ""
        keys = [key, self._forgotten_for(key), *self._link.presence_keys(channel)]
        args: list[str | int] = [bucket(channel), channel, tail, self.buffer_size]
        with self._lock:  # this process's own note must not drop the mirror before the rest is in it
            self._forgetting[channel] = self._forgetting.get(channel, 0) + 1
        done = False
        try:
            try:
                reply = self._link.script(self._forget_script, keys, args) if self._cluster else \
                    self._forget_script(keys=[*keys, self._forgets_key], args=args)
            except DOWN as exc:
                raise self._link.down(f"cannot forget {channel!r}", exc) from exc
            if reply is not None and reply[1] and ch is not None:
                # (a script's reply: entries as [id, [field, value, ...]])
                entries: list[Entry] = [(i, dict(zip(f[::2], f[1::2]))) for i, f in reply[1]]
                with ch.cond:
                    if not ch.dead:  # (dropped meanwhile only by another forget of this channel here)
                        self._append(channel, ch, entries)  # (what the reader appended meanwhile is skipped)
            here = self._forget_here(channel)  # wakes the subscribers: they take the rest, then end
            done = True
            if self._cluster and reply is not None:  # the note goes to another slot: written on its own, with its bell
                try:
                    note = self.redis.xadd(self._forgets_key, {"c": channel, "l": reply[0]}, maxlen=1000)
                    self.redis.spublish(self._forgets_key, note)
                except DOWN as exc:
                    raise self._link.down(f"forgot {channel!r}, but could not tell the other processes", exc) from exc
            return reply is not None or here
        finally:
            with self._lock:
                left = self._forgetting.pop(channel) - 1
                if left:
                    self._forgetting[channel] = left
                deferred = None if left else self._deferred.pop(channel, None)
            if deferred is not None and not done:  # the script ran, though its reply was lost
                self._forgotten_elsewhere(channel, deferred)

    def _forgotten_elsewhere(self, channel: str, last: str) -> None:
        """The reader read a forget of *channel* up to *last*: drop the mirror
        if it holds anything of that stream (a mirror loaded since holds only
        its successor's events), as the forgetting process did."""
        with self._lock:
            if channel in self._forgetting:  # forget() here drops it, after the rest (or this, if it fails)
                self._deferred[channel] = last
                return
        ch = self._channels.get(channel)
        if ch is None:
            return
        with ch.cond:
            oldest = stored_id(ch.events[0]) if ch.events else ch.tail_id()
            stale = ch.seq > 0 and parse_id(oldest) <= parse_id(last)
        if stale:
            self._forget_channel(channel, ch)

    def sweep(self) -> int:
        forgotten = super().sweep()
        if self.max_idle is not None:
            # Streams this process has subscribers on stay in Redis, idle or not.
            with self._lock:
                held = [self._key(name) for name, ch in self._channels.items() if ch.refs and ch.live]
            ttl = round(self.max_idle * 1000)
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for key in held:
                        pipe.pexpire(key, ttl)
                    pipe.execute()
            except DOWN:
                pass  # the reader reconnects; the next sweep tries again
        return forgotten

    sweep.__doc__ = Hub.sweep.__doc__

    # -- reading (read-your-writes: catch up before answering) --------------

    def history(self, channel: str, limit: int | None = None) -> list[Event]:
        self._check_channel(channel)
        ch = self._channel(channel)
        if self._catch_up(channel, ch):
            self._wake(ch)
        return super().history(channel, limit)

    history.__doc__ = Hub.history.__doc__

    def last_id(self, channel: str) -> str:
        self._check_channel(channel)
        ch = self._channel(channel)
        if self._catch_up(channel, ch):
            self._wake(ch)
        with ch.cond:
            return ch.tail_id()

    last_id.__doc__ = Hub.last_id.__doc__

    # -- the local mirror ---------------------------------------------------

    def _key(self, channel: str) -> str:
        return self._link.key(channel)

    def _forgotten_for(self, key: str) -> str:
        return self._link.forgotten_for(key)

    def _channel(self, name: str) -> Channel:
        ch = super()._channel(name)
        if not ch.live:
            self._activate(name, ch)
        return ch

    def _activate(self, name: str, ch: Channel) -> None:
        """Load *name*'s history into the mirror and have the reader follow it.

        One thread reads (the first to come); the others arriving before the
        mirror is live wait for its read, so a reconnect storm into one room
        costs Redis one load, not one per stream. No lock is held while
        waiting or reading, and it answers within ``LOAD_TIMEOUT`` or raises
        (every waiter gets the reader's error): it is on a request's path.
        """
        if ch.live:
            return
        with self._lock:
            load = self._loading.get(name)
            lead = load is None or load.ch is not ch  # (a load of a channel since forgotten is not this one's)
            if lead:
                load = self._loading[name] = _Load(ch)
        assert load is not None
        if not lead:
            # The reader's read is bounded by LOAD_TIMEOUT (its socket's); a
            # little more here, for its thread to be scheduled, and its own
            # error, not a timeout of ours, is what everyone gets.
            if not load.done.wait(max(0.0, load.started + LOAD_TIMEOUT + 0.25 - time.monotonic())):
                raise BackendUnavailable(f"cannot read channel {name!r}: Redis at {self._link.where} did not answer "
                                         f"within {LOAD_TIMEOUT} s")
            if load.error is not None:
                raise BackendUnavailable(str(load.error))
            return  # live, or forgotten meanwhile (as after a read of one's own)
        version = None
        try:
            version = self._load(name, ch)
        except BaseException as exc:
            load.error = exc
            raise
        finally:
            with self._lock:
                if self._loading.get(name) is load:
                    del self._loading[name]
            load.done.set()  # (before the reader is nudged: the mirror serves from now on)
        if version is not None:
            self._nudge(version)

    def _load(self, name: str, ch: Channel) -> int | None:
        """The read behind :meth:`_activate` (one thread's per channel at a
        time); the reader's version to nudge it to, or None."""
        key = self._key(name)
        self.counters.add("loads")
        try:
            if self._forgets_cursor is None:  # forgets from now on: this mirror starts after them
                newest = cast("list[Entry]", self._loader.xrevrange(self._forgets_key, count=1))
                with self._lock:
                    if self._forgets_cursor is None:
                        self._forgets_cursor = newest[0][0].decode() if newest else "0-0"
            with ch.cond:
                latest = ch.latest is not None
            raw, floor, compacted = self._link.script(
                self._load_script, [key, self._forgotten_for(key)],
                [self.buffer_size, self._link.max_age_ms(name), self._link.max_idle_ms, bucket(name),
                 1 if latest else 0], client=self._loader)
        except DOWN as exc:
            raise self._link.down(f"cannot read channel {name!r}", exc) from exc
        # (a script's reply: entries as [id, [field, value, ...]])
        entries: list[Entry] = [(i, dict(zip(f[::2], f[1::2]))) for i, f in reversed(raw)]
        with ch.cond:
            if ch.live or ch.dead:
                return None  # forgotten meanwhile
            if floor:
                ch.floor = floor.decode()  # no event (left): where any next one follows
            if compacted and ch.latest is not None:
                self._fill_latest(name, ch, entries)
            else:
                self._append(name, ch, entries)  # the oldest entry's predecessor becomes the floor
            ch.live = True
            with self._lock:
                self._live[key.encode()] = name
                self._cursors[key.encode()] = ch.tail_id()
                self._version += 1
                return self._version

    def _fill_latest(self, name: str, ch: Channel, entries: list[Entry]) -> None:
        """Fill an empty latest-value mirror from a compacted load (see
        _LOAD): the newest of each key, then the last ``buffer_size``
        entries. Each goes into the channel's table of keys; the buffer keeps
        the last ones, consecutive. The caller holds ``ch.cond``."""
        oldest = entries[0][1].get(b"p")
        if oldest is not None and parse_id(oldest.decode()) > parse_id(ch.tail_id()):
            ch.reset(oldest.decode())  # what the table knows starts there (as with _append)
        for event_id, fields in entries:
            ch.append(self._event(name, event_id, fields))
        window = entries[-min(len(entries), self.buffer_size)][1].get(b"p")
        if window is not None:  # (not the newest one skipped: what comes before the window is not held)
            ch.floor = window.decode()

    def _forget(self, name: str) -> None:
        # The reader's next XREAD leaves the key out; entries its current one
        # still returns for it are skipped (_deliver).
        key = self._key(name).encode()
        self._live.pop(key, None)
        self._cursors.pop(key, None)
        self._version += 1
        if self._follower is not None:
            self._follower.unfollow(key)

    def _local(self, channel: str, last_id: str | None) -> bool:
        ch = self._channels.get(channel)
        if ch is None or not ch.live or not self.connected:
            return False  # first use reads Redis; a reader cut off may be behind
        if not last_id:
            return True
        try:
            return parse_id(last_id) <= parse_id(ch.tail_id())  # else a catch-up read
        except ValueError:
            return True  # subscribe refuses it without I/O

    def _catch_up(self, channel: str, ch: Channel) -> bool:
        with ch.cond:
            tail = ch.tail_id()
        try:  # no lock held: the read may take up to LOAD_TIMEOUT
            entries = cast("list[Entry]", self._loader.xrange(self._key(channel), min="(" + tail,
                                                               count=self.buffer_size))
        except DOWN as exc:
            raise self._link.down(f"cannot read channel {channel!r}", exc) from exc
        with ch.cond:
            return not ch.dead and self._append(channel, ch, entries)  # (what the reader appended meanwhile is skipped)

    def _append(self, channel: str, ch: Channel, entries: list[Entry]) -> bool:
        """Append entries newer than the mirror's tail; the caller holds ``ch.cond``.

        An entry whose predecessor is newer than our tail means events were
        trimmed before we read them: the buffer is reset there, so every
        cursor before the hole gets a gap event.
        """
        tail = parse_id(ch.tail_id())
        added = False
        for event_id, fields in entries:
            key = parse_id(event_id.decode())
            if key <= tail:
                continue
            prev = fields.get(b"p")
            if prev is not None and parse_id(prev.decode()) > tail:
                if ch.events or ch.live:
                    log.warning("comet: events of %r up to %s were trimmed before this process read them",
                                channel, prev.decode())
                ch.reset(prev.decode())
            ch.append(self._event(channel, event_id, fields))
            tail = key
            added = True
        if added and ch.live:
            self._cursors[self._key(channel).encode()] = ch.tail_id()
        return added

    @staticmethod
    def _event(channel: str, event_id: bytes, fields: dict[bytes, bytes]) -> Event:
        name = fields.get(b"e")
        retry = fields.get(b"r")
        kind = fields.get(b"k")
        text: str | None = None
        data: Any
        if kind == b"b":  # a Part (see _fields)
            headers = tuple((k, v) for k, v in json.loads(fields[b"h"])) if b"h" in fields else ()
            data = Part(fields[b"d"], fields[b"t"].decode(), headers)
        else:
            text = fields[b"d"].decode()
            data = json.loads(text) if kind == b"j" else text
        key = fields.get(b"y")
        event = Event(data, id=event_id.decode(), name=name.decode() if name is not None else None,
                      channel=channel, retry=int(retry) if retry is not None else None,
                      _key=key.decode() if key is not None else None)
        if text is not None:
            event._wire["text"] = text  # the publisher's serialisation, reused by every stream
        return event

    # -- the reader thread --------------------------------------------------

    def _nudge(self, version: int) -> None:
        """Make the reader's XREAD include channels up to *version* now.

        CLIENT UNBLOCK only affects a client that is already blocked, so it
        is repeated until the reader is either unblocked or has picked the
        new channel up by itself (a bounded handshake, at most ~0.5 s).
        """
        self._changed.set()
        if self._follower is not None:
            with self._lock:
                new = [key for key in self._cursors if key not in self._follower.owner]
            for key in new:
                self._follower.follow(key)
            return
        for _ in range(100):
            if self._seen_version >= version or not self.connected or self._reader_id is None:
                return
            try:
                if self._loader.client_unblock(self._reader_id):
                    return
            except DOWN:
                return
            self._stop.wait(0.005)

    def _read_loop(self) -> None:
        delay = self.backoff[0]
        conn: redis.Redis | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._link.connect(self._link.reader_options)
                    self._reader_id = conn.client_id()
                    if self._forgets_cursor is None:  # forgets from now on (mirrors start after them)
                        newest = cast("list[Entry]", conn.xrevrange(self._forgets_key, count=1))
                        self._forgets_cursor = newest[0][0].decode() if newest else "0-0"
                    self.connects += 1
                    self.connected = True
                    delay = self.backoff[0]
                    log.info("comet: Redis reader connected to %s", self._link.where)
                self._read_once(conn)
            except DOWN as exc:
                if self._stop.is_set():
                    break
                if self.connected:
                    log.warning("comet: lost Redis at %s (%s); reconnecting", self._link.where, exc)
                self.connected = False
                self._reader_id = None
                if conn is not None:
                    conn.close()
                    conn = None
                self._stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.backoff[1])
            except Exception:  # a bug must not silently stop delivery for the whole process
                log.exception("comet: Redis reader failed; restarting it")
                self._stop.wait(delay)
        self.connected = False
        if conn is not None:
            conn.close()

    def _read_once(self, conn: redis.Redis) -> None:
        self._changed.clear()  # before the snapshot: a channel added after it sets it again
        with self._lock:
            version = self._version
            # a copy typed as xread asks (a dict[bytes, str] is not one: dict is invariant)
            streams: dict[KeyT, StreamIdT] = dict(self._cursors.items())
        if self._forgets_cursor is not None:
            streams[self._forgets_key] = self._forgets_cursor
        if not streams:
            self._seen_version = version
            self._changed.wait(self.block)
            return
        self._seen_version = version
        # RESP2's shape: [[key, entries], ...], or None when the block timed out.
        reply = cast("list[tuple[bytes, list[Entry]]] | None",
                     conn.xread(streams, count=1000, block=int(self.block * 1000)))
        for key, entries in reply or ():
            self._deliver(key, entries)

    def _deliver(self, key: bytes, entries: list[Entry]) -> None:
        """What a reader read from stream *key*: into its channel's mirror."""
        if key == self._forgets_key.encode():
            for event_id, fields in entries:
                self._forgets_cursor = event_id.decode()
                self._forgotten_elsewhere(fields[b"c"].decode(), fields[b"l"].decode())
            return
        name = self._live.get(key)
        ch = self._channels.get(name) if name is not None else None
        if name is None or ch is None:
            return  # forgotten meanwhile: whoever uses it next reads it from Redis
        with ch.cond:
            if ch.dead:
                return
            added = self._append(name, ch, entries)
        if added:
            self._wake(ch)

    def _cursor(self, key: bytes) -> str | None:
        """Where a read of stream *key* starts (None: not followed now)."""
        if key == self._forgets_key.encode():
            return self._forgets_cursor
        return self._cursors.get(key)

    def _cluster_state(self) -> None:
        """A cluster reader (dis)connected: connected while all of them are."""
        if self._follower is not None:
            self.connected = self._follower.connected

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """End every subscription, stop the reader thread, close connections."""
        super().close()
        self._stop.set()
        self._changed.set()
        if self._follower is not None:
            self._follower.close()
        if self._reader_id is not None:
            try:
                self.redis.client_unblock(self._reader_id)
            except DOWN:
                pass
        if self._reader.is_alive():
            self._reader.join(self.block + 10)
        self._link.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<RedisHub {self._link.where} {state} channels={len(self._channels)} subscriptions={self._subscriptions}>"


class _Load:
    """A channel's first read in this process, under way: what the threads
    that want the channel meanwhile wait for (see ``RedisHub._activate``)."""

    __slots__ = ("ch", "done", "error", "started")

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self.started = time.monotonic()
        self.done = threading.Event()
        self.error: BaseException | None = None
