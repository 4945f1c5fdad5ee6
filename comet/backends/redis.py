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

The hub composes its parts: its channels live in a
:class:`~comet.backends.redis_store.RedisStore` (the peer of the memory
hub's :class:`~comet.store.MemoryStore`: see :mod:`comet.store`), which
holds a :class:`~comet.backends.redis_link.RedisLink` (clients, scripts,
cluster routing, key names) that it hands to its
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

from typing import Any

from redis.backoff import NoBackoff
from redis.retry import Retry

from ..cursors import check_channel
from ..framing import DEFAULT_MAX_EVENT_BYTES
from ..hub import Hub
from ..store import MaxAge
from .redis_link import LOAD_TIMEOUT, client_for
from .redis_publish import GroupCommit
from .redis_scripts import PUBLISH, PUBLISH_CLUSTER
from .redis_store import RedisStore

__all__ = ["RedisHub", "LOAD_TIMEOUT", "client_for"]

# The scripts under the names the docs and other languages' publishers know.
_PUBLISH, _PUBLISH_CLUSTER = PUBLISH, PUBLISH_CLUSTER
_GroupCommit = GroupCommit  # (where tests/test_redis.py finds it)


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
        # No retry: XADD is not idempotent (see the module docstring). Bounded
        # timeouts: a publishing request thread never hangs on a dead Redis.
        options: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0,
                                   "retry": Retry(NoBackoff(), 0), "health_check_interval": 0, **redis_options}
        if url.startswith("redis+cluster://") and replicas:
            raise ValueError("replicas (a durable publish with WAIT) is not supported on Redis Cluster yet")
        if url.startswith("redis+cluster://") and replicas:
            raise ValueError("replicas (a durable publish with WAIT) is not supported on Redis Cluster yet")
        store = RedisStore(url, options, buffer_size or maxlen, prefix=prefix, max_age=max_age, max_idle=max_idle,
                           block=float(block), backoff=(float(backoff[0]), float(backoff[1])), maxlen=maxlen,
                           approximate=approximate, replicas=replicas, replica_timeout=float(replica_timeout),
                           batch_publishes=batch_publishes, presence_lease=float(presence_lease))
        try:
            super().__init__(buffer_size or maxlen, max_event_bytes=max_event_bytes, idle=idle,
                             presence_grace=presence_grace, store=store)
        except BaseException:
            store.close()
            raise
        self._redis_store = store
        self.presence_lease = float(presence_lease)  # a dead process's members count this long at most
        self.url = url
        self.maxlen = maxlen
        self.approximate = approximate
        self.prefix = prefix
        self.block = float(block)
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.replicas = replicas
        self.replica_timeout = float(replica_timeout)
        self.redis = store.redis

    @property
    def store(self) -> RedisStore:
        """Where this hub's channels live: Redis streams, mirrored here."""
        return self._redis_store

    @property
    def connected(self) -> bool:
        """True while the reader holds a working connection to Redis (on a
        cluster: while every master's reader does)."""
        return self._redis_store.connected

    @property
    def connects(self) -> int:
        """Times the reader (re)connected; 1 after the first connect."""
        return self._redis_store.connects

    def forget(self, channel: str) -> bool:
        """Delete *channel*'s stream from Redis; every process following it
        ends its subscriptions there (after what was published before), as
        :meth:`Hub.forget` does. A later stream of that name starts after
        the newest id it had, so old cursors get an exact gap. True if the
        stream or a local mirror existed."""
        check_channel(channel)
        # The stream and its presence go in one script (redis_store): a join
        # or leave is counted and appended to the stream in one script too,
        # so it lands wholly before the forget or is refused after it.
        return self._redis_store.forget(channel)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return (f"<RedisHub {self._redis_store.where} {state} channels={len(self.store)} "
                f"subscriptions={self.subscriptions}>")
