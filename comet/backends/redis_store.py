"""The channels of a :class:`~comet.backends.redis.RedisHub`: Redis streams, mirrored here.

A :class:`RedisStore` is the hub's :class:`~comet.store.ChannelStore`
(see :mod:`comet.store` for the interface; :class:`~comet.store.MemoryStore`
is its peer). Each channel is a Redis stream; the
:class:`~comet.channel.Channel` here is its *mirror*, loaded at first use
(``channel()``: one read shared by the threads that want it meanwhile,
bounded by :data:`~comet.backends.redis_link.LOAD_TIMEOUT`) and followed
from then on by one reader thread (a blocking ``XREAD``; on a cluster, a
reader per master, :mod:`comet.backends.redis_cluster`, delivering into
this store as their :class:`~comet.backends.redis_cluster.Sink`). The
design and the failure model are told in :mod:`comet.backends.redis`.

Locks: as every store's, a channel's (``ch.cond``) then the store's
(``lock``); never held across Redis I/O.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, cast

import redis
from redis.typing import KeyT, StreamIdT

from ..channel import Channel
from ..counters import Counters
from ..cursors import bucket, parse_id, stored_id
from ..errors import BackendUnavailable
from ..framing import Event, Part, to_json
from ..presence import Host, Presence
from ..store import ChannelStore, MaxAge, wake
from .redis_cluster import ClusterFollower
from .redis_link import DOWN, LOAD_TIMEOUT, Entry, RedisLink
from .redis_presence import RedisPresence
from .redis_publish import Publisher
from .redis_reader import StreamReader
from .redis_scripts import FORGET, LOAD

__all__ = ["RedisStore", "script_args", "event_of", "append_entries", "fill_latest"]

log = logging.getLogger("comet")


class RedisStore(ChannelStore):
    """Channels kept in Redis streams, mirrored in this process.

    Made by :class:`~comet.backends.redis.RedisHub` from its arguments
    (see there); its :class:`~comet.backends.redis_link.RedisLink` holds
    the clients, scripts and key names. A channel's ids are Redis', so the
    epoch is 0 and the first cursor of an empty channel is ``"0-0"``.
    """

    def __init__(self, url: str, options: dict[str, Any], buffer_size: int, *, prefix: str = "comet:",
                 max_age: MaxAge = None, max_idle: float | None = None, block: float = 5.0,
                 backoff: tuple[float, float] = (0.05, 5.0), maxlen: int = 1000, approximate: bool = True,
                 replicas: int = 0, replica_timeout: float = 1.0, batch_publishes: bool = True,
                 presence_lease: float = 10.0) -> None:
        super().__init__(buffer_size, epoch=0, max_age=max_age, max_idle=max_idle)
        self._link = link = RedisLink(url, options, prefix=prefix, block=block, maxlen=maxlen,
                                      approximate=approximate, max_age=max_age, max_idle=self.max_idle)
        #: Where Redis is, for messages (no password).
        self.where = link.where
        self._cluster = link.cluster
        self.redis = link.redis
        self._loader = link.loader
        self.block = block
        self.backoff = backoff
        self.maxlen = maxlen
        self.approximate = approximate
        self._replicas = (replicas, replica_timeout, batch_publishes)
        self.presence_lease = presence_lease
        self._load_script = self.redis.register_script(LOAD)
        self._forget_script = self.redis.register_script(FORGET)
        self._forgets_key = link.forgets_key
        self._forgets_cursor: str | None = None  # the reader's: set at the first load or connect
        # Channels this process is forgetting now (forget() calls in flight),
        # and the note of such a forget the reader read meanwhile: forget()
        # drops the mirror itself, after handing its subscribers the rest.
        self._forgetting: dict[str, int] = {}
        self._deferred: dict[str, str] = {}
        self.publisher: Publisher | None = None  # made by open(), with the hub's counters
        self._loading: dict[str, _Load] = {}  # channel -> the read of its history under way
        self._live: dict[bytes, str] = {}  # stream key -> channel, for the reader
        # stream key -> id of the newest event mirrored: the reader's XREAD
        # arguments, kept current by _append so a read costs no per-channel work
        self._cursors: dict[bytes, str] = {}
        self._version = 0  # bumped when a channel becomes live
        #: True while the reader (on a cluster: every master's) holds a working connection to Redis.
        self.connected = False
        #: Times the reader (re)connected; 1 after the first connect.
        self.connects = 0
        #: What follows the live channels: one reader thread, or on a cluster a reader per master.
        self.reader = StreamReader(link, self, block=block, backoff=backoff)
        self.follower: ClusterFollower | None = None

    def open(self, counters: Counters, dropped: Callable[[str], None] | None = None) -> None:
        """Count into the hub's *counters*, then start following Redis (the
        reader thread, or the cluster's readers) and the sweeper."""
        self.counters = counters
        counters.add("round_trips", 0)
        replicas, replica_timeout, batch = self._replicas
        self.publisher = Publisher(self._link, counters, replicas=replicas, replica_timeout=replica_timeout,
                                   batch=batch)
        counters.add("loads", 0)  # of a channel's history, at its first use here
        if self._cluster:  # a reader per master instead (redis_cluster)
            self.follower = ClusterFollower(self, self._link, block=self.block, backoff=self.backoff)
            self.reader_ready(self.redis)  # forgets from now on
            self.follower.follow(self._forgets_key.encode())
        else:
            self.reader.start()
        super().open(counters, dropped)

    def presence(self, host: Host) -> Presence:
        return RedisPresence(host, self._link, self.presence_lease, mirrored=self.mirrored,
                             regroup=self.follower.regroup if self.follower is not None else None)

    def mirrored(self, channel: str) -> str:
        """Where this process's mirror of *channel* stands: its newest
        event's id, '' if it holds none (what presence's pushes carry)."""
        ch = self.get(channel)
        if ch is None:
            return ""
        with ch.cond:
            return ch.tail_id() if ch.seq else ""

    # -- publishing ---------------------------------------------------------

    def publish(self, channel: str, proto: Event) -> str:
        """``XADD`` the event to *channel*'s stream; Redis' id. Every process
        following *channel* receives it, in one order. Nothing is retried:
        :class:`~comet.errors.BackendUnavailable` if Redis cannot be reached."""
        assert self.publisher is not None, "open() first"
        try:
            event_id = self.publisher.publish(self._key(channel), self._fields(proto))
        except DOWN as exc:
            raise self._link.down(f"cannot publish to {channel!r}", exc) from exc
        self.counters.add("published")
        return event_id.decode()

    def publish_many(self, channel: str, protos: list[Event]) -> list[str]:
        """Several events in one round trip (``MULTI``/``EXEC``: all of them or none)."""
        assert self.publisher is not None, "open() first"
        try:
            ids = self.publisher.publish_many(self._key(channel), [self._fields(proto) for proto in protos])
        except DOWN as exc:
            raise self._link.down(f"cannot publish to {channel!r}", exc) from exc
        self.counters.add("published", len(ids))
        return [i.decode() for i in ids]

    def _fields(self, proto: Event) -> list[str | int | bytes]:
        return script_args(proto, self.maxlen, self.approximate)

    def epoch_of(self, name: str) -> int:
        return 0  # ids are Redis': a new channel's floor is "0-0" or what Redis says (LOAD)

    # -- channels that come and go --------------------------------------------

    def forget(self, channel: str) -> bool:
        """Delete *channel*'s stream from Redis; every process following it
        ends its subscriptions there, after what was published before. True
        if the stream or a mirror here existed."""
        key = self._key(channel)
        # The stream and its presence go in one script: a join or leave is
        # counted and appended to the stream in one script too, so it lands
        # wholly before the forget or is refused after it (redis_presence).
        # This process's counts go with its mirror (_forget_here); a forget
        # that fails changes nothing.
        # This process's subscribers first take what was published before the
        # forget: the script returns what this mirror's reader had not
        # appended yet (read in the same step as the delete: nothing between).
        ch = self.get(channel)
        tail = ""
        if ch is not None:
            with ch.cond:
                tail = ch.tail_id() if ch.live and not ch.dead else ""
        keys = [key, self._forgotten_for(key), *self._link.presence_keys(channel)]
        args: list[str | int] = [bucket(channel), channel, tail, self.buffer_size]
        with self.lock:  # this process's own note must not drop the mirror before the rest is in it
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
            here = super().forget(channel)  # wakes the subscribers: they take the rest, then end
            done = True
            if self._cluster and reply is not None:  # the note goes to another slot: written on its own, with its bell
                try:
                    note = self.redis.xadd(self._forgets_key, {"c": channel, "l": reply[0]}, maxlen=1000)
                    self.redis.spublish(self._forgets_key, note)
                except DOWN as exc:
                    raise self._link.down(f"forgot {channel!r}, but could not tell the other processes", exc) from exc
            return reply is not None or here
        finally:
            with self.lock:
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
        with self.lock:
            if channel in self._forgetting:  # forget() here drops it, after the rest (or this, if it fails)
                self._deferred[channel] = last
                return
        ch = self.get(channel)
        if ch is None:
            return
        with ch.cond:
            oldest = stored_id(ch.events[0]) if ch.events else ch.tail_id()
            stale = ch.seq > 0 and parse_id(oldest) <= parse_id(last)
        if stale:
            self.forget_channel(channel, ch)

    def sweep(self) -> int:
        """As every store's; and streams this process has subscribers on
        stay in Redis, idle or not (their expiry is extended)."""
        forgotten = super().sweep()
        if self.max_idle is not None:
            held = [self._key(name) for name, ch in self.items() if ch.refs and ch.live]
            ttl = round(self.max_idle * 1000)
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for key in held:
                        pipe.pexpire(key, ttl)
                    pipe.execute()
            except DOWN:
                pass  # the reader reconnects; the next sweep tries again
        return forgotten

    # -- the local mirror ---------------------------------------------------

    def current(self, name: str) -> Channel:
        """The mirror, made live and caught up (read-your-writes: what this
        process published is there before the answer)."""
        ch = self.channel(name)
        if self.catch_up(name, ch):
            wake(ch)
        return ch

    def _key(self, channel: str) -> str:
        return self._link.key(channel)

    def _forgotten_for(self, key: str) -> str:
        return self._link.forgotten_for(key)

    def channel(self, name: str) -> Channel:
        """*name*'s mirror, loaded from Redis at its first use here."""
        ch = super().channel(name)
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
        with self.lock:
            load = self._loading.get(name)
            lead = load is None or load.ch is not ch  # (a load of a channel since forgotten is not this one's)
            if lead:
                load = self._loading[name] = _Load(ch)
        assert load is not None
        if not lead:
            load.wait(name, self.where)
            return  # live, or forgotten meanwhile (as after a read of one's own)
        version = None
        try:
            version = self._load(name, ch)
        except BaseException as exc:
            load.error = exc
            raise
        finally:
            with self.lock:
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
                with self.lock:
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
                fill_latest(name, ch, entries, self.buffer_size)
            else:
                self._append(name, ch, entries)  # the oldest entry's predecessor becomes the floor
            ch.live = True
            with self.lock:
                self._live[key.encode()] = name
                self._cursors[key.encode()] = ch.tail_id()
                self._version += 1
                return self._version

    def _append(self, channel: str, ch: Channel, entries: list[Entry]) -> bool:
        """:func:`append_entries`, and the reader reads on from the new tail."""
        added = append_entries(channel, ch, entries)
        if added and ch.live:
            self._cursors[self._key(channel).encode()] = ch.tail_id()
        return added

    def unfollow(self, name: str) -> None:
        # The reader's next XREAD leaves the key out; entries its current one
        # still returns for it are skipped (deliver).
        key = self._key(name).encode()
        self._live.pop(key, None)
        self._cursors.pop(key, None)
        self._version += 1
        if self.follower is not None:
            self.follower.unfollow(key)

    def is_local(self, name: str, last_id: str | None) -> bool:
        ch = self.get(name)
        if ch is None or not ch.live or not self.connected:
            return False  # first use reads Redis; a reader cut off may be behind
        if not last_id:
            return True
        try:
            return parse_id(last_id) <= parse_id(ch.tail_id())  # else a catch-up read
        except ValueError:
            return True  # subscribe refuses it without I/O

    def catch_up(self, name: str, ch: Channel) -> bool:
        with ch.cond:
            tail = ch.tail_id()
        try:  # no lock held: the read may take up to LOAD_TIMEOUT
            entries = cast("list[Entry]", self._loader.xrange(self._key(name), min="(" + tail,
                                                               count=self.buffer_size))
        except DOWN as exc:
            raise self._link.down(f"cannot read channel {name!r}", exc) from exc
        with ch.cond:
            return not ch.dead and self._append(name, ch, entries)  # (what the reader appended meanwhile is skipped)

    # -- the reader thread, and the cluster's readers' Sink --------------------

    def _nudge(self, version: int) -> None:
        """Have the channels up to *version* followed now."""
        if self.follower is None:
            self.reader.nudge(version)
            return
        with self.lock:
            new = [key for key in self._cursors if key not in self.follower.owner]
        for key in new:
            self.follower.follow(key)

    def following(self) -> tuple[int, dict[KeyT, StreamIdT]]:
        """The version of the live channels, and the reader's ``XREAD`` arguments."""
        with self.lock:
            version = self._version
            # a copy typed as xread asks (a dict[bytes, str] is not one: dict is invariant)
            streams: dict[KeyT, StreamIdT] = dict(self._cursors.items())
        if self._forgets_cursor is not None:
            streams[self._forgets_key] = self._forgets_cursor
        return version, streams

    def reader_ready(self, conn: redis.Redis) -> None:
        """The reader connected: forgets are read from now on (mirrors start after them)."""
        if self._forgets_cursor is None:
            newest = cast("list[Entry]", conn.xrevrange(self._forgets_key, count=1))
            self._forgets_cursor = newest[0][0].decode() if newest else "0-0"

    def deliver(self, key: bytes, entries: list[Entry]) -> None:
        """What a reader read from stream *key*: into its channel's mirror."""
        if key == self._forgets_key.encode():
            for event_id, fields in entries:
                self._forgets_cursor = event_id.decode()
                self._forgotten_elsewhere(fields[b"c"].decode(), fields[b"l"].decode())
            return
        name = self._live.get(key)
        ch = self.get(name) if name is not None else None
        if name is None or ch is None:
            return  # forgotten meanwhile: whoever uses it next reads it from Redis
        with ch.cond:
            if ch.dead:
                return
            added = self._append(name, ch, entries)
        if added:
            wake(ch)

    def cursor(self, key: bytes) -> str | None:
        """Where a read of stream *key* starts (None: not followed now)."""
        if key == self._forgets_key.encode():
            return self._forgets_cursor
        return self._cursors.get(key)

    def reader_changed(self, connected: bool) -> None:
        """A reader (dis)connected; on a cluster: connected while all of them are."""
        if connected:
            self.connects += 1
        self.connected = self.follower.connected if self.follower is not None else connected

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Stop the sweeper, the reader thread(s); close the connections."""
        super().close()
        if self.follower is not None:
            self.follower.close()
        self.reader.close()
        self._link.close()


def script_args(proto: Event, maxlen: int, approximate: bool) -> list[str | int | bytes]:
    """The publish script's arguments for one event (an entry's fields: see :func:`event_of`)."""
    args: list[str | int | bytes] = [maxlen, "~" if approximate else "="]
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


def event_of(channel: str, event_id: bytes, fields: dict[bytes, bytes]) -> Event:
    """The event a stream entry of *channel* holds (written by :func:`script_args`)."""
    name = fields.get(b"e")
    retry = fields.get(b"r")
    kind = fields.get(b"k")
    text: str | None = None
    data: Any
    if kind == b"b":  # a Part (see script_args)
        headers = tuple((k, v) for k, v in json.loads(fields[b"h"])) if b"h" in fields else ()
        data = Part(fields[b"d"], fields[b"t"].decode(), headers)
    else:
        text = fields[b"d"].decode()
        data = json.loads(text) if kind == b"j" else text
    key = fields.get(b"y")
    # With the publisher's serialisation ("text"), reused by every stream.
    return Event(data, id=event_id.decode(), name=name.decode() if name is not None else None,
                 channel=channel, retry=int(retry) if retry is not None else None,
                 _key=key.decode() if key is not None else None, _wire={} if text is None else {"text": text})


def append_entries(channel: str, ch: Channel, entries: list[Entry]) -> bool:
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
        ch.append(event_of(channel, event_id, fields))
        tail = key
        added = True
    return added


def fill_latest(name: str, ch: Channel, entries: list[Entry], buffer_size: int) -> None:
    """Fill an empty latest-value mirror from a compacted load (see
    _LOAD): the newest of each key, then the last ``buffer_size``
    entries. Each goes into the channel's table of keys; the buffer keeps
    the last ones, consecutive. The caller holds ``ch.cond``."""
    oldest = entries[0][1].get(b"p")
    if oldest is not None and parse_id(oldest.decode()) > parse_id(ch.tail_id()):
        ch.reset(oldest.decode())  # what the table knows starts there (as with append_entries)
    for event_id, fields in entries:
        ch.append(event_of(name, event_id, fields))
    window = entries[-min(len(entries), buffer_size)][1].get(b"p")
    if window is not None:  # (not the newest one skipped: what comes before the window is not held)
        ch.floor = window.decode()


class _Load:
    """A channel's first read in this process, under way: what the threads
    that want the channel meanwhile wait for (see ``RedisStore._activate``)."""

    __slots__ = ("ch", "done", "error", "started")

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self.started = time.monotonic()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self, name: str, where: str) -> None:
        """Wait for the read of channel *name* (Redis at *where*) to end;
        ``BackendUnavailable`` if it failed or is late."""
        # The reader's read is bounded by LOAD_TIMEOUT (its socket's); a
        # little more here, for its thread to be scheduled, and its own
        # error, not a timeout of ours, is what everyone gets.
        if not self.done.wait(max(0.0, self.started + LOAD_TIMEOUT + 0.25 - time.monotonic())):
            raise BackendUnavailable(f"cannot read channel {name!r}: Redis at {where} did not answer "
                                     f"within {LOAD_TIMEOUT} s")
        if self.error is not None:
            raise BackendUnavailable(str(self.error))
