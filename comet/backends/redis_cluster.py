"""RedisHub on Redis Cluster: where a channel's keys live, and who reads them.

``redis+cluster://h1:p1,h2:p2,h3:p3`` spreads channels over the cluster's
16384 hash slots (a channel's stream key ``<prefix><channel>`` decides its
slot; a hash tag ``{...}`` in the name groups channels on one slot). Redis
Cluster allows a command, a script included, to touch keys of one slot only,
and ``XREAD`` cannot wait on streams of different slots, so three things
differ from a single Redis:

* Keys a script touches beside the stream share its slot: forgotten
  channels' newest ids live in one hash per slot,
  ``<prefix>\\x00forgotten{<tag>}``, where *tag* is :func:`slot_tag`: the
  smallest decimal number whose CRC16 falls on that slot.
* The publish script rings a bell after its ``XADD``: ``SPUBLISH <stream key>
  <id>``, a shard channel served by the master of the stream's own slot.
* Each process runs one reader thread per master it needs
  (:class:`_NodeReader`). It ``SSUBSCRIBE``\\s to the stream keys of its live
  channels on that master and, on each bell, reads the rung streams with
  ``XREAD`` (no ``BLOCK``), one per slot, pipelined in one round trip. Every
  ``block`` seconds it reads all of them anyway: writers that ring no bell
  (a plain ``XADD``) are delivered within that time, and a lost connection
  is noticed.

Resharding and failover: a reader that gets ``MOVED``, ``ASK``,
``TRYAGAIN`` or ``CLUSTERDOWN``, that is told its shard channels were
unsubscribed (Redis does that when their slot leaves the master), or that
loses its master, asks :class:`ClusterFollower` to regroup: the slot map is
reloaded and every key moves, with its cursor, to the reader of the master
that serves it now. Cursors are the hub's (the id of the newest event
mirrored), so a read after the move resumes exactly where the last one
stopped: nothing is read twice into the mirror, nothing is skipped, and the
predecessor ids keep gaps exact as on a single Redis. While a slot is half
moved its channels wait (their reads answer ``ASK``/``TRYAGAIN``) until the
move completes.
"""
from __future__ import annotations

import functools
import logging
import random
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Sequence, cast

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from .redis import RedisHub, _Entry

log = logging.getLogger("comet")

SLOTS = 16384

_DOWN = (redis.ConnectionError, redis.TimeoutError)
# Replies that mean "this master does not serve that slot (now)".
_MOVING = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "CROSSSLOT")


def _moving(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and str(exc).split(" ", 1)[0].upper() in _MOVING or \
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


class ClusterFollower:
    """Which reader follows which stream key: one :class:`_NodeReader` per
    master that serves a live channel, regrouped when slots move."""

    def __init__(self, hub: "RedisHub", client: RedisCluster, options: dict[str, Any]) -> None:
        self.hub = hub
        self.client = client
        self.options = {k: v for k, v in options.items()
                        if k not in ("retry", "single_connection_client", "health_check_interval")}
        self.lock = threading.Lock()
        self._regroup_lock = threading.Lock()
        self.readers: dict[str, _NodeReader] = {}  # node name ("host:port") -> its reader
        self.owner: dict[bytes, str] = {}  # stream key -> node name
        self.stop = threading.Event()
        self.regroups = 0

    @property
    def connected(self) -> bool:
        with self.lock:
            return all(r.connected for r in self.readers.values() if r.keys)

    def _node_of(self, key: bytes) -> ClusterNode:
        return self.client.nodes_manager.get_node_from_slot(key_slot(key))

    def follow(self, key: bytes) -> None:
        """Have the reader of *key*'s master follow it from the hub's cursor."""
        node = self._node_of(key)
        with self.lock:
            reader = self._assign(key, node)
        reader.changed()

    def unfollow(self, key: bytes) -> None:
        with self.lock:
            name = self.owner.pop(key, None)
            reader = self.readers.get(name) if name is not None else None
            if reader is not None:
                reader.keys.discard(key)
                reader.version += 1
        if reader is not None:
            reader.changed()

    def _assign(self, key: bytes, node: ClusterNode) -> "_NodeReader":
        """Move *key* to *node*'s reader (the caller holds ``self.lock``)."""
        old = self.owner.get(key)
        if old is not None and old != node.name and old in self.readers:
            self.readers[old].keys.discard(key)
            self.readers[old].version += 1
        reader = self.readers.get(node.name)
        if reader is None:
            reader = self.readers[node.name] = _NodeReader(self, node.host, int(node.port))
            reader.start()
        reader.keys.add(key)
        reader.version += 1
        self.owner[key] = node.name
        return reader

    def regroup(self) -> None:
        """Reload the slot map and move every key to the reader of the master
        that serves it now (a resharding or a failover happened)."""
        if not self._regroup_lock.acquire(blocking=False):
            return  # another reader is at it: its result covers this one
        try:
            self.regroups += 1
            try:
                self.client.nodes_manager.initialize()
            except (redis.RedisError, OSError) as exc:  # (RedisClusterException is a RedisError)
                log.warning("comet: cannot reload the Redis Cluster's slot map (%s); retrying", exc)
                return
            nodes = {key: self._node_of(key) for key in list(self.owner)}
            with self.lock:
                touched = {self._assign(key, node) for key, node in nodes.items()
                           if key in self.owner and self.owner[key] != node.name}
                idle = [name for name, r in self.readers.items() if not r.keys]
                retired = [self.readers.pop(name) for name in idle]
            for reader in touched:
                reader.changed()
            for reader in retired:
                reader.retire()
            if touched:
                log.info("comet: Redis Cluster slots moved; %d reader(s) regrouped", len(touched))
        finally:
            self._regroup_lock.release()

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            readers = list(self.readers.values())
            self.readers.clear()
        for reader in readers:
            reader.retire()
        for reader in readers:
            reader.thread.join(self.hub.block + 10)


class _NodeReader:
    """One master's reader: SSUBSCRIBE to its stream keys, XREAD each slot's
    rung keys on a bell (see the module's introduction)."""

    def __init__(self, follower: ClusterFollower, host: str, port: int) -> None:
        self.follower = follower
        self.hub = follower.hub
        self.host, self.port = host, port
        self.keys: set[bytes] = set()  # guarded by follower.lock
        self.version = 0  # bumped when keys change (under follower.lock)
        self.connected = False
        self.retired = threading.Event()
        self.wake_channel = f"{self.hub.prefix}\x00wake:{uuid.uuid4().hex}"  # a classic channel: no slot
        self.thread = threading.Thread(target=self._run, name=f"comet-redis-reader-{host}:{port}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def changed(self) -> None:
        """Make the reader look at its keys again now (a wake message on its
        own connection: it is waiting for messages there)."""
        if not self.connected:
            return  # it reads its keys when it connects
        try:
            client: Any = self.follower.client  # (get_node is untyped in redis-py)
            client.publish(self.wake_channel, b"", target_nodes=client.get_node(self.host, self.port))
        except (redis.RedisError, OSError, AttributeError):
            pass  # it sweeps every `block` seconds anyway

    def retire(self) -> None:
        self.retired.set()
        self.changed()

    def _stopped(self) -> bool:
        return self.retired.is_set() or self.follower.stop.is_set()

    def _run(self) -> None:
        backoff = self.hub.backoff
        delay = backoff[0]
        while not self._stopped():
            conn = redis.Redis(host=self.host, port=self.port, **self.follower.options)
            bells = cast(Any, conn).pubsub()  # (untyped in redis-py)
            try:
                bells.subscribe(self.wake_channel)
                self._expect(bells, {self.wake_channel.encode()}, set())
                self.connected = True
                self.hub.connects += 1
                self.hub._cluster_state()
                delay = backoff[0]
                self._follow(conn, bells)
            except _DOWN as exc:
                if self._stopped():
                    break
                if self.connected:
                    log.warning("comet: lost Redis Cluster master %s:%d (%s); reconnecting", self.host, self.port, exc)
                self._lost(delay)
                delay = min(delay * 2, backoff[1])
            except redis.ResponseError as exc:
                if not _moving(exc):
                    log.exception("comet: Redis Cluster reader failed; restarting it")
                self._lost(delay)
            except Exception:  # a bug must not silently stop delivery for these channels
                log.exception("comet: Redis Cluster reader failed; restarting it")
                self._lost(delay)
            finally:
                bells.close()
                conn.close()
        self.connected = False
        self.hub._cluster_state()

    def _lost(self, delay: float) -> None:
        self.connected = False
        self.hub._cluster_state()
        self.follower.stop.wait(delay * random.uniform(0.5, 1.0))
        self.follower.regroup()

    def _expect(self, bells: Any, subscribed: set[bytes], rung: set[bytes]) -> None:
        """Wait for the confirmations of subscriptions just sent (a bell may
        come first; it is kept in *rung*): only then is a read safe, as no
        bell rung after it can be missed."""
        waiting = set(subscribed)
        while waiting:
            message = bells.get_message(timeout=self.hub.block)
            if message is None:
                raise redis.TimeoutError(f"no confirmation of SSUBSCRIBE from {self.host}:{self.port}")
            self._message(message, rung, waiting)

    def _message(self, message: dict[str, Any], rung: set[bytes], waiting: set[bytes]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "smessage":
            rung.add(channel)
        elif kind in ("subscribe", "ssubscribe"):
            waiting.discard(channel)
        elif kind == "sunsubscribe" and channel in self.keys:
            # Not asked for: the slot left this master (a resharding).
            self.follower.regroup()

    def _follow(self, conn: redis.Redis, bells: Any) -> None:
        subscribed: set[bytes] = set()
        seen = -1
        rung: set[bytes] = set()
        sweep_at = 0.0
        while not self._stopped():
            with self.follower.lock:
                version, keys = self.version, set(self.keys)
            if version != seen:
                added, removed = keys - subscribed, subscribed - keys
                for key in removed:
                    bells.sunsubscribe(key)
                for key in added:  # one command each: SSUBSCRIBE takes channels of one slot
                    bells.ssubscribe(key)
                self._expect(bells, added, rung)
                subscribed, seen = keys, version
                rung |= added
            now = time.monotonic()
            if now >= sweep_at:
                rung, sweep_at = set(keys), now + self.hub.block
            rung &= keys
            if rung:
                rung = self._read(conn, rung)
                if rung:  # more to read, or a slot half moved: look again shortly
                    self.follower.stop.wait(0.02)
                    continue
            with self.follower.lock:
                if self.version != seen:
                    continue  # keys changed (its wake may have been read with a confirmation)
            message = bells.get_message(timeout=max(0.0, min(sweep_at - time.monotonic(), self.hub.block)))
            while message is not None:
                self._message(message, rung, set())
                message = bells.get_message(timeout=0)

    def _read(self, conn: redis.Redis, keys: set[bytes]) -> set[bytes]:
        """XREAD *keys*, one command per slot, in one round trip; the keys to
        read again (a full batch came, or the slot is moving)."""
        by_slot: dict[int, dict[Any, Any]] = {}
        for key in keys:
            cursor = self.hub._cursor(key)
            if cursor is not None:
                by_slot.setdefault(key_slot(key), {})[key] = cursor
        if not by_slot:
            return set()
        with conn.pipeline(transaction=False) as pipe:
            for streams in by_slot.values():
                pipe.xread(streams, count=1000)
            replies = pipe.execute(raise_on_error=False)
        again: set[bytes] = set()
        moving = False
        for streams, reply in zip(by_slot.values(), replies):
            if isinstance(reply, BaseException):
                if not _moving(reply):
                    raise reply
                moving = True
                again.update(streams)
                continue
            for key, entries in reply or ():
                self.hub._deliver(key, entries)
                if len(entries) >= 1000:
                    again.add(key)
        if moving:
            self.follower.regroup()
        return again

