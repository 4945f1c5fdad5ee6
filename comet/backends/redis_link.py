"""What :class:`~comet.backends.redis.RedisHub`, its presence and its
cluster readers share: one :class:`RedisLink` to Redis.

The hub makes the link and hands it to
:class:`~comet.backends.redis_presence.RedisPresence` and
:class:`~comet.backends.redis_cluster.ClusterFollower`; none of them reaches
into another. The link holds the clients and their options (a plain Redis,
the master Sentinel names, or a Redis Cluster), runs the scripts (on a
cluster: on the master of their keys' slot), names the keys (a channel's
stream, the forgotten channels' floors, a channel's presence), and knows the
retention settings every writer of a stream applies. The errors that mean
"Redis is not there now" are :data:`DOWN`; the replies that mean "that slot
is elsewhere now" are told by :func:`moving`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..cursors import bucket
from ..errors import BackendUnavailable
from ..hub import MaxAge

__all__ = ["RedisLink", "DOWN", "Entry", "moving", "slot_tag", "presence_keys", "client_for", "cluster_client",
           "run_script", "pipeline_scripts", "Sentinels", "LOAD_TIMEOUT", "SLOTS"]

#: Seconds a read on a request's path may wait for Redis before the stream
#: is refused (503): a channel's first use in this process, a catch-up.
LOAD_TIMEOUT = 0.6

SLOTS = 16384

#: Unreachable, or (Redis Cluster) the slot has no master right now or is moving.
DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError, redis.exceptions.TryAgainError,
        redis.exceptions.RedisClusterException)

#: One stream entry as these clients return it: (id, fields). redis-py
#: types replies for every client setting (str with ``decode_responses``,
#: dicts with RESP3); the clients here use neither, so replies are cast once
#: where they arrive.
Entry = tuple[bytes, dict[bytes, bytes]]

# Replies that mean "this master does not serve that slot (now)".
MOVING = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "CROSSSLOT")


def moving(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and str(exc).split(" ", 1)[0].upper() in MOVING or \
        type(exc).__name__ in ("MovedError", "AskError", "TryAgainError", "ClusterDownError", "ClusterCrossSlotError")



@functools.lru_cache(maxsize=1)
def _slot_tags() -> tuple[str, ...]:
    tags: list[str | None] = [None] * SLOTS
    left, n = SLOTS, 0
    while left:
        slot = key_slot(str(n).encode())
        if tags[slot] is None:
            tags[slot] = str(n)
            left -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def slot_tag(slot: int) -> str:
    """The smallest decimal number (as text) whose CRC16 falls on *slot*: a
    hash tag ``{tag}`` that puts a key on that slot.

    >>> slot_tag(key_slot(b"comet:room")) == slot_tag(key_slot(b"{" + slot_tag(key_slot(b"comet:room")).encode() + b"}"))
    True
    """
    return _slot_tags()[slot]


def parse_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[[user]:password@]h1:p1,h2:p2[/0]``: its seed nodes
    and the options it says (username, password)."""
    rest = url[len("redis+cluster://"):]
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only: expected redis+cluster://host:port[,host:port...], got {url!r}")
    nodes: list[tuple[str, int]] = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"expected host:port in {url!r}, got {host!r}")
        nodes.append((name, int(port)))
    options: dict[str, Any] = {}
    if auth:
        user, _, password = auth.partition(":")
        if user:
            options["username"] = user
        if password:
            options["password"] = password
    return nodes, options


def cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    """A redis-py cluster client for a ``redis+cluster://`` URL; *options*
    go to each node's connections (``retry`` to the cluster client)."""
    nodes, auth = parse_url(url)
    options = {**auth, **options}
    options.pop("single_connection_client", None)
    options.pop("health_check_interval", None)
    retry = options.pop("retry", None)
    seeds = [cast(Any, ClusterNode)(h, p) for h, p in nodes]  # (untyped in redis-py)
    return RedisCluster(startup_nodes=seeds, retry=retry, **options)


def run_script(client: Any, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run *script* through the cluster *client* on the master of its keys'
    slot (redirections followed).

    A master may lack the script: a replica promoted by a failover (Redis
    does not replicate its script cache), a restarted or flushed node. Then
    ``EVAL`` of its text, routed by the same keys, runs it there once and
    caches it: no retry of anything that ran (``NOSCRIPT`` means it did not).
    redis-py's own retry (``SCRIPT LOAD`` on the masters its slot map knows,
    then ``EVALSHA`` again) fails while that map is behind the cluster.
    """
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return client.eval(script.script, len(keys), *keys, *args)


def pipeline_scripts(client: redis.Redis, script: Script,
                     calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
    """*script* once per ``(keys, args)`` in one round trip on one master's
    *client* (redis-py's cluster pipelines refuse scripts); each call's reply
    or error, in order. Calls answered ``NOSCRIPT`` (they never ran) go once
    more after ``SCRIPT LOAD`` on that same master."""
    def send(indexes: Sequence[int]) -> list[Any]:
        with client.pipeline(transaction=False) as pipe:
            for i in indexes:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

    results = send(range(len(calls)))
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        client.script_load(script.script)
        for i, result in zip(missing, send(missing)):
            results[i] = result
    return results


def presence_keys(prefix: str, cluster: bool, stream_key: str, channel: str) -> list[str]:
    """The keys of *channel*'s presence (members, counts, leave deadlines),
    on its stream's slot on a cluster (see :mod:`comet.backends.redis_presence`)."""
    tag = f"{{{slot_tag(key_slot(stream_key.encode()))}}}" if cluster else ""
    base = f"{prefix}\x00presence{tag}:"
    return [base + "m:" + channel, base + "c:" + channel, base + "l:" + channel]


class Sentinels:
    """Where a ``redis+sentinel://`` URL points: its sentinels, asked for the
    current master of one service each time a connection is made."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        rest = url[len("redis+sentinel://"):]
        auth, _, rest = rest.rpartition("@")
        hosts, _, path = rest.partition("/")
        parts = [p for p in path.split("/") if p]
        if not hosts or not parts or len(parts) > 2:
            raise ValueError(f"expected redis+sentinel://host:port[,host:port...]/service[/db], got {url!r}")
        self.addresses: list[tuple[str, int]] = []
        for host in hosts.split(","):
            name, _, port = host.rpartition(":")
            if not name or not port.isdigit():
                raise ValueError(f"expected host:port in {url!r}, got {host!r}")
            self.addresses.append((name, int(port)))
        self.service = parts[0]
        try:
            self.db = int(parts[1]) if len(parts) == 2 else 0
        except ValueError:
            raise ValueError(f"the database in {url!r} must be a number, got {parts[1]!r}") from None
        self.password = auth.partition(":")[2] or None if auth else None
        # The sentinels get the same bounded timeouts: asking a dead sentinel
        # must not hang a publish either.
        self.sentinel: Any = cast(Any, Sentinel)(self.addresses, sentinel_kwargs={  # (untyped in redis-py)
            "socket_timeout": options.get("socket_timeout"), "socket_connect_timeout": options.get("socket_connect_timeout")})

    def client(self, options: dict[str, Any]) -> redis.Redis:
        options = dict(options)
        single = options.pop("single_connection_client", False)
        if self.password is not None:
            options.setdefault("password", self.password)
        client: redis.Redis = self.sentinel.master_for(self.service, db=self.db, **options)
        if single:  # the pool's connection kwargs cannot say it: a client setting
            client = redis.Redis(connection_pool=client.connection_pool, single_connection_client=True,
                                 retry=options.get("retry") or Retry(NoBackoff(), 0))
        return client

    def close(self) -> None:
        for sentinel in self.sentinel.sentinels:
            sentinel.close()

    def __str__(self) -> str:
        return f"the master of {self.service!r} per sentinels " + ",".join(f"{h}:{p}" for h, p in self.addresses)


def client_for(url: str, options: dict[str, Any]) -> redis.Redis:
    """A redis-py client for *url* (``redis+sentinel://`` included); see
    :func:`comet.backends.redis_client`."""
    if url.startswith("redis+sentinel://"):
        return Sentinels(url, options).client(options)
    if url.startswith("redis+cluster://"):
        return cast(redis.Redis, cluster_client(url, options))  # same commands, routed by key
    return redis.Redis.from_url(url, **options)


class RedisLink:
    """One hub's way to Redis, shared with its presence and its cluster
    readers (see the module's docstring).

    *options* go to redis-py (bounded timeouts, no retry: see
    :class:`~comet.backends.redis.RedisHub`); ``redis`` is the client for
    writes and ``loader`` the one for reads on a request's path (they wait
    :data:`LOAD_TIMEOUT` at most); ``reader_options`` make a reader's own
    connection, whose reads may block *block* seconds.
    """

    def __init__(self, url: str, options: dict[str, Any], *, prefix: str, block: float, maxlen: int,
                 approximate: bool, max_age: MaxAge, max_idle: float | None) -> None:
        self.url = url
        self.options = options  # (each cluster reader's connection takes them too)
        self.prefix = prefix
        self.maxlen = maxlen
        self.approximate = approximate
        self.max_age = max_age
        self.max_idle = max_idle
        self.sentinels = Sentinels(url, options) if url.startswith("redis+sentinel://") else None
        self.cluster = url.startswith("redis+cluster://")
        self.redis = self.connect(options)
        # Reads on a request's path (a channel's first use here, a cursor
        # ahead of the mirror, waking the reader for it): a stalled Redis
        # costs that request a 503 within LOAD_TIMEOUT, not the socket timeout.
        # (A timeout is between two reads of the socket: a long reply that
        # keeps coming is not cut.)
        timeout = options["socket_timeout"]
        connect = options["socket_connect_timeout"]
        self.loader = self.connect({**options, "socket_timeout": min(timeout or LOAD_TIMEOUT, LOAD_TIMEOUT),
                                    "socket_connect_timeout": min(connect or LOAD_TIMEOUT, LOAD_TIMEOUT)})
        read_timeout = block + (options["socket_timeout"] or 5.0)
        # One connection, always the same: CLIENT UNBLOCK must name the one that blocks.
        self.reader_options = {**options, "socket_timeout": read_timeout, "single_connection_client": True}
        self.where: str = (str(self.sentinels) if self.sentinels is not None
                           else "the cluster " + url[len("redis+cluster://"):].rpartition("@")[2] if self.cluster
                           else self.redis.connection_pool.connection_kwargs.get("host", url))
        # Outside every channel's key (names never hold NUL): the newest id of
        # forgotten channels by bucket, and the stream of forgets.
        self.forgotten_key = prefix + "\x00forgotten"
        self.forgets_key = prefix + "\x00forgets"

    def connect(self, options: dict[str, Any]) -> redis.Redis:
        """A new client of this link's Redis with *options*."""
        if self.cluster:
            # Typed as the plain client it stands in for: every command sent
            # has the same signature on both (routed by key here).
            return cast(redis.Redis, cluster_client(self.url, options))
        if self.sentinels is not None:
            return self.sentinels.client(options)
        return redis.Redis.from_url(self.url, **options)

    def down(self, what: str, exc: BaseException) -> BackendUnavailable:
        """The error for *what* failed because Redis is unreachable (*exc*)."""
        return BackendUnavailable(f"{what}: Redis at {self.where} is unreachable ({exc})")

    # -- scripts ------------------------------------------------------------

    def script(self, script: Script, keys: list[str], args: list[Any], client: redis.Redis | None = None) -> Any:
        """Run *script* (through *client*, default :attr:`redis`). On a
        cluster, on the master of *keys*' slot, recovering from a master that
        lacks it (a failover's new master: see :func:`run_script`); on a
        single Redis ``Script`` reloads itself after ``NOSCRIPT``."""
        if self.cluster:
            return run_script(client or self.redis, script, keys, args)
        return script(keys=keys, args=args, client=client or self.redis)

    def master(self, key: str) -> redis.Redis:
        """(Cluster) a client of the master that serves *key*'s slot:
        redis-py's cluster pipelines refuse scripts, a master's own take them."""
        cluster = cast(RedisCluster, self.redis)
        client: redis.Redis = cluster.nodes_manager.get_node_from_slot(key_slot(key.encode())).redis_connection
        return client

    def client_of(self, key: str) -> redis.Redis:
        """The client whose pipelines reach *key*: its master's on a cluster."""
        return self.master(key) if self.cluster else self.redis

    # -- keys ------------------------------------------------------------------

    def key(self, channel: str) -> str:
        """*channel*'s stream."""
        return self.prefix + channel

    def forgotten_for(self, key: str) -> str:
        """The hash of forgotten channels' newest ids that stream *key*'s
        scripts use: one per hub, or on a cluster one per slot (a script
        touches one slot)."""
        if self.cluster:
            return f"{self.forgotten_key}{{{slot_tag(key_slot(key.encode()))}}}"
        return self.forgotten_key

    def presence_keys(self, channel: str) -> list[str]:
        """*channel*'s presence keys (see :func:`presence_keys`)."""
        return presence_keys(self.prefix, self.cluster, self.key(channel), channel)

    # -- retention: what every writer of a stream applies --------------------------

    def max_age_ms(self, channel: str) -> int:
        """*channel*'s ``max_age`` in ms (0: none)."""
        max_age = self.max_age(channel) if callable(self.max_age) else self.max_age
        return 0 if max_age is None else max(1, round(max_age * 1000))

    @property
    def max_idle_ms(self) -> int:
        return round((self.max_idle or 0) * 1000)

    def retained(self, key: str, args: list[str | int | bytes]) -> list[str | int | bytes]:
        """The publish script's arguments: an event's *args*, then max_age
        ms, max_idle ms and the epoch bucket of the channel of stream *key*."""
        channel = key[len(self.prefix):]
        return args + [self.max_age_ms(channel), self.max_idle_ms, bucket(channel)]

    def appending(self, channel: str) -> list[Any]:
        """How a script appends to *channel*'s stream, as publish() does:
        maxlen, "~" or "=", max_age ms, max_idle ms, bucket, bell (1: Cluster)."""
        return [self.maxlen, "~" if self.approximate else "=", self.max_age_ms(channel), self.max_idle_ms,
                bucket(channel), 1 if self.cluster else 0]

    def close(self) -> None:
        self.redis.close()
        self.loader.close()
        if self.sentinels is not None:
            self.sentinels.close()
