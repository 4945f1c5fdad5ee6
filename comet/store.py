"""Where a hub keeps its channels: the table of :class:`~comet.channel.Channel` objects.

A :class:`~comet.Hub` publishes, subscribes and serves subscriptions; the
channels themselves (which exist, who holds them, when one is dropped, the
epoch a new one starts, retention by age and idleness, latest-value
channels) live in a *store* the hub composes. Backends are peer stores,
not subclasses of the hub that override its insides (the model is Django
Channels' ``BaseChannelLayer``): :class:`MemoryStore` keeps everything in
this process; :class:`comet.backends.redis_store.RedisStore` keeps each
channel in a Redis stream and the :class:`~comet.channel.Channel` here as its
mirror.

:class:`ChannelStore` holds what every store shares and names the
extension points a backend implements or extends (its public methods):

* :meth:`~ChannelStore.publish`, :meth:`~ChannelStore.publish_many`:
  store prepared events, return their ids;
* :meth:`~ChannelStore.channel`: the channel by that name, made current
  (a backend loads it on first use);
* :meth:`~ChannelStore.current`: the channel as a read should see it
  (``None``: none here); :meth:`~ChannelStore.catch_up`: append what
  the shared store has and this process lacks (a cursor from elsewhere
  may be ahead); :meth:`~ChannelStore.is_local`: would a subscribe be
  answered without waiting on the network;
* :meth:`~ChannelStore.forget`, :meth:`~ChannelStore.sweep`,
  :meth:`~ChannelStore.unfollow` (a channel was dropped here),
  :meth:`~ChannelStore.epoch_of`;
* :meth:`~ChannelStore.presence`: the hub's presence registry;
* :meth:`~ChannelStore.open` (the hub hands over its counters) and
  :meth:`~ChannelStore.close`.

Locks: a channel's (``ch.cond``), then the store's (:attr:`ChannelStore.lock`),
never the other way round. A publish holds the channel's lock while it
appends, so a channel is never dropped in the middle of one.
"""
from __future__ import annotations

import logging
import threading
import time
from array import array
from typing import Callable, Optional, Union

from .channel import Channel
from .counters import Counters
from .cursors import EPOCH_BUCKETS, bucket
from .framing import Event
from .presence import Host, Presence

__all__ = ["ChannelStore", "MemoryStore", "wake", "Channels", "MaxAge"]

#: A channel's name, or a function of a name saying whether it is one of them.
Channels = Union[str, Callable[[str], bool]]
#: Seconds, or a function of the channel's name giving seconds (or ``None``).
MaxAge = Union[float, Callable[[str], Optional[float]], None]


def _nothing(name: str) -> None:
    pass


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def wake(ch: Channel) -> None:
    """Wake *ch*'s waiters, then its watchers (outside the lock)."""
    with ch.cond:
        ch.notify_all()
        watchers = ch.watchers
    for wake_one in watchers:  # e.g. the parked-stream writer: one call per channel, not per stream
        wake_one()


class ChannelStore:
    """The channels of one hub in this process: made, held, dropped.

    A subscription or a watcher *holds* its channel (:meth:`acquire`, then
    :meth:`release`); a channel nobody ever published to is dropped when
    its last holder leaves, one nobody holds after ``max_idle`` seconds
    without a publish by :meth:`sweep` (a sweeper thread started by
    :meth:`open` when retention asks for one). A channel dropped after its
    ids were handed out gives its successor a later epoch, so old cursors
    get a gap.

    >>> store = MemoryStore(10, epoch=7)
    >>> store.open(Counters(("published", "forgotten")))
    >>> ch = store.acquire("room")
    >>> store.names(), store.get("room") is ch
    (['room'], True)
    >>> store.release("room", ch)   # nobody published: the channel goes with its last holder
    >>> store.names()
    []
    >>> store.close()
    """

    #: Drop a channel nobody ever published to once nobody holds it. A
    #: dropped pristine channel comes back exactly as it was (no events,
    #: floor ``<epoch>-0``), so no cursor can tell.
    forget_pristine = True

    def __init__(self, buffer_size: int, *, epoch: int, max_age: MaxAge = None,
                 max_idle: float | None = None) -> None:
        if max_age is not None and not callable(max_age):
            _positive("max_age", max_age)
        if max_idle is not None:
            _positive("max_idle", max_idle)
        self.buffer_size = buffer_size
        #: The epoch of the ids of channels made now (see :meth:`epoch_of`).
        self.epoch = epoch
        self.max_age = max_age
        self.max_idle = None if max_idle is None else float(max_idle)
        #: Guards the table (and, in the hub, its own few fields).
        self.lock = threading.Lock()
        self._channels: dict[str, Channel] = {}
        self.counters = Counters(("published", "forgotten"))  # until open() hands over the hub's
        self._dropped_here: Callable[[str], None] = _nothing
        # Channels dropped since the dict was last copied, and per bucket the
        # epoch a new channel gets: arrays made now, not int objects made as
        # channels go. An object made in the middle of a burst of channels
        # and kept stays alone in the allocator's pages the burst used, and
        # keeps them all from going back to the system (tests/test_forget.py).
        self._dropped = array("q", [0])
        self._epochs = array("q", [epoch]) * EPOCH_BUCKETS
        self._floor: str | None = None  # "<epoch>-0", shared by the channels of the store's epoch
        self._latest: tuple[Channels, ...] = ()
        self._sweeping = threading.Event()
        self._sweeper: threading.Thread | None = None

    # -- the hub's side ---------------------------------------------------------

    def open(self, counters: Counters, dropped: Callable[[str], None] | None = None) -> None:
        """Start serving a hub: count into its *counters*, call
        ``dropped(name)`` once a channel is forgotten here (presence), and
        start the sweeper if retention asks for one."""
        self.counters = counters
        self._dropped_here = dropped or _nothing
        if self._sweeper is None and (self.max_age is not None or self.max_idle is not None):
            self._sweeper = threading.Thread(target=self._sweep_loop, name="comet-hub-sweeper", daemon=True)
            self._sweeper.start()

    def close(self) -> None:
        """Stop the sweeper (backends: their threads and connections too)."""
        self._sweeping.set()
        if self._sweeper is not None and self._sweeper is not threading.current_thread():
            self._sweeper.join(10)

    def presence(self, host: Host) -> Presence:
        """A new presence registry for the hub *host* (made at its first
        use): this process's (backends: shared by every process)."""
        return Presence(host)

    # -- the table --------------------------------------------------------------

    def get(self, name: str) -> Channel | None:
        """*name*'s channel if it is here now; makes nothing."""
        return self._channels.get(name)

    def items(self) -> list[tuple[str, Channel]]:
        """(name, channel) for the channels here."""
        with self.lock:
            return list(self._channels.items())

    def names(self) -> list[str]:
        """The names of the channels here."""
        with self.lock:
            return list(self._channels)

    def all(self) -> list[Channel]:
        """The channels here."""
        with self.lock:
            return list(self._channels.values())

    def __len__(self) -> int:
        return len(self._channels)

    def channel(self, name: str) -> Channel:
        """*name*'s channel, made if new (backends: made current first)."""
        ch = self._channels.get(name)
        if ch is None:
            with self.lock:
                epoch = self.epoch_of(name)
                max_age = self.max_age(name) if callable(self.max_age) else self.max_age
                fresh = Channel(self.buffer_size, self._floor_of(epoch), epoch, max_age)
                if self._latest and self.is_latest(name):
                    fresh.keep_latest()
                ch = self._channels.setdefault(name, fresh)
        return ch

    def _floor_of(self, epoch: int) -> str:
        """A new channel's floor, ``"<epoch>-0"``: one string for every
        channel of the store's epoch, not one each (the caller holds the lock)."""
        if epoch != self.epoch:
            return f"{epoch}-0"
        if self._floor is None:
            self._floor = f"{epoch}-0"
        return self._floor

    def epoch_of(self, name: str) -> int:
        """The epoch a new channel *name* gets."""
        epoch = self._epochs[bucket(name)]
        return self.epoch if epoch == self.epoch else epoch  # (the store's: one int, not one per channel)

    def acquire(self, name: str) -> Channel:
        """*name*'s channel, held (by a subscription or watcher) until :meth:`release`."""
        while True:
            ch = self.channel(name)
            with self.lock:
                if self._channels.get(name) is ch:  # not forgotten in between
                    ch.refs += 1
                    return ch

    def hold(self, ch: Channel) -> None:
        """Hold *ch* once more (its holder holds it already: it cannot go meanwhile)."""
        with self.lock:
            ch.refs += 1

    def release(self, name: str, ch: Channel) -> None:
        """Let go of *ch*, held by :meth:`acquire` or :meth:`hold`."""
        with self.lock:
            ch.refs -= 1
            if not ch.refs:
                ch.touched = time.monotonic()  # max_idle counts from the last subscriber's leaving
            if ch.refs or ch.seq or not self.forget_pristine:
                return
        # Lock order (invariant I7): a channel's, then the store's (as a
        # backend's activation takes them). A publish holds the channel's lock
        # while it appends, so a channel is never forgotten in the middle of
        # one (invariant I15).
        with ch.cond:
            if ch.seq or ch.watchers or ch.dead:
                return
            with self.lock:
                if ch.refs or self._channels.get(name) is not ch:
                    return
                self._drop(name, ch)

    # -- extension points: reading and publishing ---------------------------------

    def publish(self, channel: str, proto: Event) -> str:
        """Store *proto* (validated and serialised by the hub) as *channel*'s
        newest event, wake its subscribers, count it; its id."""
        raise NotImplementedError

    def publish_many(self, channel: str, protos: list[Event]) -> list[str]:
        """Store several events at once, in order (wake once); their ids."""
        raise NotImplementedError

    def current(self, name: str) -> Channel | None:
        """*name*'s channel as a read (``history``, ``last_id``) should see
        it; ``None`` if there is none here. Backends catch up first."""
        return self._channels.get(name)

    def catch_up(self, name: str, ch: Channel) -> bool:
        """Append what the shared store has and *ch* lacks yet; True if any
        (the caller wakes *ch*). The caller holds no lock: it is I/O. A
        store of this process is always current."""
        return False

    def is_local(self, name: str, last_id: str | None) -> bool:
        """Would a subscribe to *name* at *last_id* be answered without
        waiting on the network? Always, here."""
        return True

    # -- extension points: channels that come and go ------------------------------

    def forget(self, name: str) -> bool:
        """Forget *name* (its buffer, its ids); True if it existed. Its
        subscriptions take what was published before, then end."""
        ch = self._channels.get(name)
        return ch is not None and self.forget_channel(name, ch)

    def forget_channel(self, name: str, ch: Channel) -> bool:
        """Forget *ch* if it is still *name*'s channel here (and tell the hub)."""
        with ch.cond:
            with self.lock:
                if ch.dead or self._channels.get(name) is not ch:
                    return False
                self._drop(name, ch)
        self.counters.add("forgotten")
        self._dropped_here(name)
        wake(ch)  # its subscriptions take what is left, then end
        return True

    def unfollow(self, name: str) -> None:
        """*name* was dropped here (the caller holds its lock and the
        store's): backends stop following it."""

    def _drop(self, name: str, ch: Channel) -> None:
        """Remove *ch*; the caller holds its lock and the store's."""
        ch.dead = True
        del self._channels[name]
        self._dropped[0] += 1
        if self._dropped[0] > 2 * len(self._channels) + 1000:
            # A dict never shrinks by deletion: copy it once most of it has gone.
            self._channels, self._dropped[0] = dict(self._channels), 0
        if ch.seq:  # its ids were handed out: a successor starts a later epoch
            at = bucket(name)
            self._epochs[at] = max(self._epochs[at] + 1, ch.epoch + 1, time.time_ns() // 1_000_000)
        self.unfollow(name)

    def _sweep_loop(self) -> None:
        while not self._sweeping.wait(self._sweep_every()):
            try:
                self.sweep()
            except Exception:  # a bug must not stop retention for the life of the hub
                logging.getLogger("comet").exception("comet: hub sweep failed")

    def _sweep_every(self) -> float:
        bounds = [b for b in (self.max_idle, self.max_age if not callable(self.max_age) else None) if b is not None]
        return min(max(min(bounds, default=10.0) / 4, 0.05), 10.0)

    def sweep(self) -> int:
        """Apply ``max_age`` and ``max_idle`` now; how many channels were forgotten."""
        now = time.monotonic()
        with self.lock:
            # Names only: one list, no tuple per channel (a million small
            # objects made and freed on every sweep would pin allocator pages).
            names = list(self._channels)
        idle_before = None if self.max_idle is None else now - self.max_idle
        forgotten = 0
        for name in names:
            ch = self._channels.get(name)
            if ch is None:
                continue
            if ch.times:  # (an unlocked look; expire() decides under the lock)
                with ch.cond:
                    ch.expire(now)
            if idle_before is not None and ch.touched < idle_before and not ch.refs:
                forgotten += self._forget_idle(name, ch, idle_before)
        return forgotten

    def _forget_idle(self, name: str, ch: Channel, idle_before: float) -> bool:
        """Forget *ch* if it is still idle and unheld (checked under its locks)."""
        with ch.cond:
            with self.lock:
                if ch.dead or ch.refs or ch.touched >= idle_before or self._channels.get(name) is not ch:
                    return False
                self._drop(name, ch)
        self.counters.add("forgotten")
        return True

    # -- latest-value channels ------------------------------------------------------

    def latest(self, channels: Channels) -> None:
        """Make *channels* latest-value channels, those here now included
        (``Hub.latest``; *channels* is validated by the hub)."""
        with self.lock:
            self._latest = self._latest + (channels,)
            existing = [ch for name, ch in self._channels.items() if self.is_latest(name)]
        for ch in existing:
            with ch.cond:
                ch.keep_latest()

    def is_latest(self, name: str) -> bool:
        """Is *name* a latest-value channel?"""
        return any(match == name if isinstance(match, str) else match(name) for match in self._latest)


class MemoryStore(ChannelStore):
    """The channels of a hub that lives in this process alone: ids are
    ``"<epoch>-<seq>"``, numbered here.

    >>> store = MemoryStore(10, epoch=7)
    >>> store.open(Counters(("published", "forgotten")))
    >>> store.publish("room", Event("hi", channel="room"))
    '7-1'
    >>> [e.data for e in store.current("room").events]
    ['hi']
    """

    def publish(self, channel: str, proto: Event) -> str:
        while True:
            ch = self.channel(channel)
            with ch.cond:
                if ch.dead:  # forgotten as we looked it up: publish into its successor (invariant I15)
                    continue
                event_id = f"{ch.epoch}-{ch.seq + 1}"
                ch.append(proto.stored_as(event_id))
                ch.notify_all()  # in the same lock hold as the append (invariant I1): the hot path
                watchers = ch.watchers
            break
        self.counters.add("published")
        for wake_one in watchers:  # e.g. the parked-stream writer: one call per channel, not per stream
            wake_one()
        return event_id

    def publish_many(self, channel: str, protos: list[Event]) -> list[str]:
        ids: list[str] = []
        while not ids:
            ch = self.channel(channel)
            with ch.cond:
                if ch.dead:
                    continue
                for proto in protos:
                    event_id = f"{ch.epoch}-{ch.seq + 1}"
                    ch.append(proto.stored_as(event_id))
                    ids.append(event_id)
                ch.notify_all()
                watchers = ch.watchers
        self.counters.add("published", len(ids))
        for wake_one in watchers:
            wake_one()
        return ids
