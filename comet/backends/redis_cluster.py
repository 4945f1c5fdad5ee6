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

import logging
import random
import threading
import time
import uuid
from typing import Any, Protocol, cast

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from .redis_link import SLOTS, Entry, RedisLink, cluster_client, moving, parse_url, pipeline_scripts, run_script, slot_tag

__all__ = ["ClusterFollower", "Sink", "slot_tag", "SLOTS", "cluster_client", "parse_url", "pipeline_scripts",
           "run_script"]

log = logging.getLogger("comet")

# The connection to a master is lost (what makes a reader reconnect).
_LOST = (redis.ConnectionError, redis.TimeoutError)


class Sink(Protocol):
    """Where the readers deliver what they read: the hub's mirrors."""

    def cursor(self, key: bytes) -> str | None:
        """Where a read of stream *key* starts (None: not followed now)."""
        ...

    def deliver(self, key: bytes, entries: list[Entry]) -> None:
        """What a reader read from stream *key*."""
        ...

    def reader_changed(self, connected: bool) -> None:
        """A reader connected (True, once per connection) or lost its master."""
        ...


class ClusterFollower:
    """Which reader follows which stream key: one :class:`_NodeReader` per
    master that serves a live channel, regrouped when slots move."""

    def __init__(self, sink: Sink, link: RedisLink, *, block: float, backoff: tuple[float, float]) -> None:
        self.sink = sink
        self.link = link
        self.block = block
        self.backoff = backoff
        self.client = cast(RedisCluster, link.redis)
        self.options = {k: v for k, v in link.options.items()
                        if k not in ("retry", "single_connection_client", "health_check_interval")}
        self.lock = threading.Lock()
        self._regroup_lock = threading.Lock()
        self.readers: dict[str, _NodeReader] = {}  # node name ("host:port") -> its reader
        self.retired: list[_NodeReader] = []  # readers regrouped away, still ending: joined at close
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
                self.retired = [r for r in self.retired if r.thread.is_alive()] + retired
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
            readers += self.retired  # (a reader regrouped away may still be on its way out)
            self.retired = []
        for reader in readers:
            reader.retire()
        for reader in readers:
            reader.thread.join(self.block + 10)


class _NodeReader:
    """One master's reader: SSUBSCRIBE to its stream keys, XREAD each slot's
    rung keys on a bell (see the module's introduction)."""

    def __init__(self, follower: ClusterFollower, host: str, port: int) -> None:
        self.follower = follower
        self.sink = follower.sink
        self.block = follower.block
        self.host, self.port = host, port
        self.keys: set[bytes] = set()  # guarded by follower.lock
        self.version = 0  # bumped when keys change (under follower.lock)
        self.connected = False
        self.retired = threading.Event()
        self.wake_channel = f"{follower.link.prefix}\x00wake:{uuid.uuid4().hex}"  # a classic channel: no slot
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
        backoff = self.follower.backoff
        delay = backoff[0]
        while not self._stopped():
            conn = redis.Redis(host=self.host, port=self.port, **self.follower.options)
            bells = cast(Any, conn).pubsub()  # (untyped in redis-py)
            try:
                bells.subscribe(self.wake_channel)
                self._expect(bells, {self.wake_channel.encode()}, set())
                self.connected = True
                self.sink.reader_changed(True)
                delay = backoff[0]
                self._follow(conn, bells)
            except _LOST as exc:
                if self._stopped():
                    break
                if self.connected:
                    log.warning("comet: lost Redis Cluster master %s:%d (%s); reconnecting", self.host, self.port, exc)
                self._lost(delay)
                delay = min(delay * 2, backoff[1])
            except redis.ResponseError as exc:
                if not moving(exc):
                    log.exception("comet: Redis Cluster reader failed; restarting it")
                self._lost(delay)
            except Exception:  # a bug must not silently stop delivery for these channels
                log.exception("comet: Redis Cluster reader failed; restarting it")
                self._lost(delay)
            finally:
                bells.close()
                conn.close()
        self.connected = False
        self.sink.reader_changed(False)

    def _lost(self, delay: float) -> None:
        self.connected = False
        self.sink.reader_changed(False)
        self.follower.stop.wait(delay * random.uniform(0.5, 1.0))
        self.follower.regroup()

    def _expect(self, bells: Any, subscribed: set[bytes], rung: set[bytes]) -> None:
        """Wait for the confirmations of subscriptions just sent (a bell may
        come first; it is kept in *rung*): only then is a read safe, as no
        bell rung after it can be missed."""
        waiting = set(subscribed)
        while waiting:
            message = bells.get_message(timeout=self.block)
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
                rung, sweep_at = set(keys), now + self.block
            rung &= keys
            if rung:
                rung = self._read(conn, rung)
                if rung:  # more to read, or a slot half moved: look again shortly
                    self.follower.stop.wait(0.02)
                    continue
            with self.follower.lock:
                if self.version != seen:
                    continue  # keys changed (its wake may have been read with a confirmation)
            message = bells.get_message(timeout=max(0.0, min(sweep_at - time.monotonic(), self.block)))
            while message is not None:
                self._message(message, rung, set())
                message = bells.get_message(timeout=0)

    def _read(self, conn: redis.Redis, keys: set[bytes]) -> set[bytes]:
        """XREAD *keys*, one command per slot, in one round trip; the keys to
        read again (a full batch came, or the slot is moving)."""
        by_slot: dict[int, dict[Any, Any]] = {}
        for key in keys:
            cursor = self.sink.cursor(key)
            if cursor is not None:
                by_slot.setdefault(key_slot(key), {})[key] = cursor
        if not by_slot:
            return set()
        with conn.pipeline(transaction=False) as pipe:
            for streams in by_slot.values():
                pipe.xread(streams, count=1000)
            replies = pipe.execute(raise_on_error=False)
        again: set[bytes] = set()
        moved = False
        for streams, reply in zip(by_slot.values(), replies):
            if isinstance(reply, BaseException):
                if not moving(reply):
                    raise reply
                moved = True
                again.update(streams)
                continue
            for key, entries in reply or ():
                self.sink.deliver(key, entries)
                if len(entries) >= 1000:
                    again.add(key)
        if moved:
            self.follower.regroup()
        return again

