"""Signal hubs: channels, ids, a replay buffer, and threads that wait on them.

Design
------
Each channel keeps a bounded buffer of its last events and one lock (with
a ``threading.Condition`` on it once a thread waits there). ``publish()``
appends once and wakes every waiter; it never touches a subscriber, so a
slow or stuck consumer cannot block it.

A subscription is a *cursor* (the sequence number of the last event it
handed out), not a queue of copies. Whenever it wakes it takes everything
after its cursor. An event published while the stream was busy writing is
therefore still in the buffer when the stream comes back: the race of the
classic "wait, then send" loop (notify while nobody waits = lost) cannot
happen. A cursor that fell out of the buffer is told so with an explicit
:data:`GAP` event, never a silent loss.

Ids are ``"<epoch>-<seq>"``: the epoch is the hub's creation time in
milliseconds and ``seq`` counts per channel, the same shape as Redis stream
ids. They compare as ``(epoch, seq)``. A cursor from an older epoch (the
server restarted, the memory hub forgot) gets a gap event and then everything
the new hub still holds; a cursor from the future is rejected with
:class:`~comet.errors.InvalidEventId`. A channel created after one of the
same name was forgotten (:meth:`Hub.forget`) starts a later epoch of its
own, so cursors of the old one get that gap too.

Subscriptions yield an :class:`Idle` marker whenever they are caught up and
again every ``idle`` seconds while nothing happens. It is falsy like
``None`` (which a handler may yield for the same purpose) and means "nothing
to send right now": the stream layer uses it to write heartbeats, notice
disconnected clients and end streams at shutdown, without the hub knowing
about HTTP. It carries the subscription's cursor, so a long-poll answer with
no events still tells the client exactly where to resume.

Where things are
----------------
This module holds :class:`Hub` (the channels of a process: publishing,
subscribing, retention, snapshots, presence). Two parts of its API are
classes of their own that it inherits, each written against a protocol of
what it needs of the hub: reading the channels and what they keep
(:class:`~comet.hub_channels.ChannelMethods`: ``history``, ``last_id``,
``before``, ``channels``, ``is_local``, ``latest``, ``sweep``) in
:mod:`comet.hub_channels`, and presence
(:class:`~comet.hub_presence.PresenceMethods`: ``members``,
``disconnect``, ``on_presence``, ``has_channel``, ``announce``) in
:mod:`comet.hub_presence`. Below it, and knowing nothing of it: where its
channels live, the channel table a backend replaces
(:class:`~comet.store.ChannelStore`, :class:`~comet.store.MemoryStore`;
:class:`~comet.backends.redis_store.RedisStore` is a peer) in
:mod:`comet.store`; the cursors it hands out (:class:`Subscription`,
:class:`MultiSubscription`, :class:`Feed`, what the parked writer reads
them by) and what they share in :mod:`comet.subscription`; event ids,
epochs and cursors in :mod:`comet.cursors`; one channel's buffer in
:mod:`comet.channel`; the cooperative-step protocol (:class:`Step`,
:class:`cooperative`, :class:`Idle`) in :mod:`comet.cooperative`; the mux a
subscription to several channels waits on in :mod:`comet.mux`. Their public
names used before the split are still importable from here.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .channel import Channel
from .cooperative import Idle, Step, cooperative, note_opened, subscriptions_recorded
from .counters import Counters
from .cursors import (MAX_CHANNELS, MAX_CURSOR, MAX_NAME, channel_tag, check_channel, check_member, cursor_name,
                      is_multi_cursor, multi_cursor, parse_id, split_cursor)
from .errors import HubClosed, InvalidEvent, InvalidEventId
from .framing import DEFAULT_MAX_EVENT_BYTES, Event
from .hub_channels import ChannelMethods
from .hub_presence import PresenceMethods
from .mux import Slot
from .store import Channels as Channels, ChannelStore, MaxAge as MaxAge, MemoryStore, wake
from .subscription import GAP, SNAPSHOT, Feed, MultiSubscription, SnapshotDue, Subscription, Subscriptions, View

if TYPE_CHECKING:
    from .presence import Presence

__all__ = ["Hub", "Subscription", "MultiSubscription", "Feed", "Idle", "GAP", "SNAPSHOT", "parse_id", "Step", "cooperative",
           "MAX_CHANNELS", "MAX_CURSOR", "multi_cursor", "cursor_name", "is_multi_cursor", "channel_tag",
           "subscriptions_recorded"]


class Hub(ChannelMethods, PresenceMethods):
    """Channels of events that any thread may publish to and subscribe from.

    >>> hub = Hub()
    >>> first = hub.publish("lobby", "alice joined")
    >>> sub = hub.subscribe("lobby", last_id=hub.before(first))
    >>> next(sub).data
    'alice joined'
    >>> sub.close()

    ``buffer_size`` events are kept per channel for resume and history;
    ``max_event_bytes`` bounds one event's data; ``idle`` is how often (in
    seconds) an idle subscription yields ``None`` so its stream can look
    around (heartbeat, disconnect, shutdown).

    Channels that come and go: ``max_age`` (seconds, or a function of the
    channel's name returning seconds or ``None``) also bounds the buffer by
    time; a channel with no publish for ``max_idle`` seconds and nobody
    subscribed or watching is forgotten (:meth:`forget`) by a sweeper thread
    the hub starts for these two and stops in :meth:`close`.

    Presence (:mod:`comet.presence`): ``subscribe(..., member=...)``,
    :meth:`members`, :meth:`disconnect`; a member whose last stream closed
    still counts for ``presence_grace`` seconds (a reload is not a leave).

    Where the channels live is the hub's :attr:`store` (:mod:`comet.store`):
    by default a :class:`~comet.store.MemoryStore` made from
    ``buffer_size``, ``max_age`` and ``max_idle``; a backend passes its own
    as ``store`` (:class:`~comet.backends.redis.RedisHub` does).
    """

    def __init__(self, buffer_size: int = 1000, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, idle: float = 1.0,
                 max_age: MaxAge = None, max_idle: float | None = None, presence_grace: float = 2.0,
                 store: ChannelStore | None = None) -> None:
        if store is None:  # (it checks max_age and max_idle: first, as always)
            store = MemoryStore(buffer_size, epoch=time.time_ns() // 1_000_000, max_age=max_age, max_idle=max_idle)
        if isinstance(presence_grace, bool) or not isinstance(presence_grace, (int, float)) or presence_grace < 0:
            raise ValueError(f"presence_grace must be a number of seconds >= 0, got {presence_grace!r}")
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}")
        if not isinstance(max_event_bytes, int) or max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be a positive int, got {max_event_bytes!r}")
        if not isinstance(idle, (int, float)) or idle <= 0:
            raise ValueError(f"idle must be a positive number of seconds, got {idle!r}")
        self.buffer_size = buffer_size
        self.max_event_bytes = max_event_bytes
        self.idle = float(idle)
        self._store = store
        self.epoch = store.epoch
        self._lock = store.lock  # (one lock for the table and the hub's few fields below)
        #: ``published`` events and ``gaps`` reported to subscribers, since start.
        self.counters = Counters(("published", "gaps", "forgotten"))
        self.max_age = store.max_age
        self.max_idle = store.max_idle
        self._subs = Subscriptions(self, store, self.counters)  # what the subscriptions share
        #: Seconds a member with no open stream left still counts (see
        #: :mod:`comet.presence`): a reload or a reconnect does not flap.
        self.presence_grace = float(presence_grace)
        self._presence: Presence | None = None  # made on first use
        store.open(self.counters, self._dropped)

    @property
    def store(self) -> ChannelStore:
        """Where this hub's channels live (:mod:`comet.store`)."""
        return self._store

    def _dropped(self, channel: str) -> None:
        """*channel* was forgotten here: its presence goes with it."""
        if self._presence is not None:
            self._presence.dropped(channel)

    @property
    def published(self) -> int:
        """Events published through this hub (this process) since start."""
        return self.counters["published"]

    # -- publishing ---------------------------------------------------------

    def publish(self, channel: str, data: Any, event: str | None = None, *, retry: int | None = None,
                key: str | None = None) -> str:
        """Append an event to *channel*, wake its subscribers, return its id.

        Safe from any thread; never blocks on subscribers. Raises
        ``TypeError`` for data that is not text or JSON-serialisable and
        ``ValueError`` for CR/LF in names or oversize data, before anything
        is stored.

        ``key`` says what the event is the newest value of on a latest-value
        channel (:meth:`latest`; default: the event's name).

        >>> hub = Hub()
        >>> hub.publish("chat", {"text": "hi"}, event="shout").endswith("-1")
        True
        """
        return self._store.publish(channel, self._prepare(channel, data, event, retry, key))

    def publish_many(self, channel: str, items: Iterable[Any], event: str | None = None, *,
                     retry: int | None = None) -> list[str]:
        """Publish several events to *channel* at once, in order; their ids.

        All are validated before any is stored, and subscribers wake once
        for the whole batch (with the Redis hub: one round trip, not one per
        event). Each item is data, or an :class:`~comet.Event` whose own
        ``name`` and ``retry`` are used.

        >>> hub = Hub()
        >>> [i.split("-")[1] for i in hub.publish_many("feed", ["a", "b", Event("c", name="x")])]
        ['1', '2', '3']
        """
        protos = [self._prepare(channel, item.data, item.name, item.retry) if isinstance(item, Event)
                  else self._prepare(channel, item, event, retry) for item in items]
        if not protos:
            return []
        return self._store.publish_many(channel, protos)

    def _prepare(self, channel: str, data: Any, event: str | None, retry: int | None, key: str | None = None) -> Event:
        """Validate and serialise an event to publish, before anything is stored."""
        self._check_channel(channel)
        if key is not None and (not isinstance(key, str) or len(key) > MAX_NAME):
            raise InvalidEvent(f"key must be a str of at most {MAX_NAME} characters, got {key!r:.80}")
        proto = Event(data, name=event, channel=channel, retry=retry, _key=key)
        size = proto.size()  # serialises once, here, outside any lock
        if size > self.max_event_bytes:
            raise InvalidEvent(f"event data of {size} bytes exceeds max_event_bytes={self.max_event_bytes}")
        if self._subs.closed:
            raise HubClosed("publish on a closed hub")
        return proto

    _wake = staticmethod(wake)

    # -- subscribing --------------------------------------------------------

    def subscribe(self, channel: str | Sequence[str], last_id: str | None = None, *, view: View | None = None,
                  idle: float | None = None, initial: Iterable[Any] = (), member: str | None = None) -> "Subscription":
        """Iterate *channel*'s events after *last_id*, in publish order.

        ``last_id=None`` starts with the next event published. Otherwise every
        event after ``last_id`` still in the buffer comes first; if some are
        gone, a :data:`GAP` event says so. ``view(event)`` may return the
        event, a changed one (``event.replace(...)``), other data for the same
        id, or ``None`` to hide it from this subscriber.

        Yields a falsy :class:`Idle` when caught up and every ``idle`` seconds
        while idle. ``initial`` items (a snapshot of state, say) come first.

        The result is a :class:`Subscription`. A stream handler that
        *returns* it (rather than iterating it) lets comet park the stream on
        its writer thread instead of holding a server thread (see
        ``comet.parked``).
        Validation happens here, at the call: a malformed or future
        ``last_id`` raises :class:`~comet.errors.InvalidEventId` at once.

        *channel* may be a list of channels (at most :data:`MAX_CHANNELS`):
        one stream follows them all, and the result is a
        :class:`MultiSubscription`. Its events say their ``channel``, come in
        this process's order of publishing, and carry ids that are a cursor
        on every channel, so one ``last_id`` resumes each channel exactly
        (and a gap is reported per channel).

        ``member="ann"`` makes the subscription one of ann's open streams on
        *channel* while it is open: see :meth:`members`, :meth:`disconnect`
        and :mod:`comet.presence` (with several channels: on each of them).

        >>> hub = Hub()
        >>> _ = hub.publish("c", "secret", event="highlight")
        >>> public = hub.subscribe("c", "0-0", view=lambda e: None if e.name == "highlight" else e)
        >>> next(public).name   # the gap: the cursor is from before this hub
        'comet.gap'
        >>> next(public)   # highlight hidden; caught up
        Idle('...-1')
        """
        if not isinstance(channel, str):
            return self._subscribe_many(channel, last_id, view, idle, initial, member)
        self._check_channel(channel)
        self._check_open(view, member)
        key = None if last_id is None or last_id == "" else parse_id(last_id)
        ch, cursor, resumed, gap = self._open(channel, last_id, key)
        pending = list(initial)
        if gap is not None:
            # A snapshot is made at the first take(), not here: this may be cheroot's accepting thread.
            pending.append(SnapshotDue(gap) if self._subs.snapshots else gap)
        sub = Subscription(self._subs, ch, channel, cursor, resumed, pending, view, self.idle if idle is None else idle)
        if member is not None:
            self.presence.joined(channel, member, sub)  # and sub's on_close leaves
        note_opened(sub)
        return sub

    def _subscribe_many(self, channels: Sequence[str], last_id: str | None, view: View | None, idle: float | None,
                        initial: Iterable[Any], member: str | None) -> "MultiSubscription":
        if not isinstance(channels, (list, tuple)) or not channels or len(channels) > MAX_CHANNELS:
            raise InvalidEvent(f"channels must be a str, or a list of 1 to {MAX_CHANNELS} str, got {channels!r:.80}")
        names: dict[str, str] = {}  # channel: its name in the cursor, in the order given
        for name in channels:
            self._check_channel(name)
            if name in names:
                raise InvalidEvent(f"channel {name!r} is listed twice")
            names[name] = cursor_name(name)
        self._check_open(view, member)
        cursors = split_cursor(last_id, names)
        slots: list[Slot] = []
        try:
            for name, key_name in names.items():
                given, key = cursors.get(name, (None, None))
                ch, cursor, resumed, gap = self._open(name, given, key)
                # Until its gap is sent, a channel's part of the cursor stays the client's.
                slots.append(Slot(name, key_name, ch, cursor, resumed if gap is None else given or resumed, gap))
        except BaseException:
            for slot in slots:
                self._store.release(slot.name, slot.ch)
            raise
        sub = MultiSubscription(self._subs, slots, list(initial), view, self.idle if idle is None else idle)
        if member is not None:
            for slot in slots:
                self.presence.joined(slot.name, member, sub)
        note_opened(sub)
        return sub

    def _check_open(self, view: View | None, member: str | None) -> None:
        if self._subs.closed:
            raise HubClosed("subscribe on a closed hub")
        if view is not None and not callable(view):
            raise TypeError("view must be callable")
        if member is not None:
            check_member(member)

    def _open(self, channel: str, last_id: str | None,
              key: tuple[int, int] | None) -> tuple[Channel, int, str, Event | None]:
        """Hold *channel* for a new subscriber at *last_id* (parsed: *key*):
        the channel, the cursor seq and its id, and a gap event if one is due."""
        ch = self._store.acquire(channel)
        caught_up = False
        try:
            if key is not None and key > parse_id(ch.tail_id()):
                caught_up = self._store.catch_up(channel, ch)  # another process may be ahead of our mirror
            with ch.cond:
                cursor, resumed, gap = self._resolve(channel, ch, last_id, key)
        except BaseException:
            self._store.release(channel, ch)
            raise
        if caught_up:
            self._wake(ch)
        return ch, cursor, resumed, gap

    def _resolve(self, channel: str, ch: Channel, last_id: str | None,
                 key: tuple[int, int] | None) -> tuple[int, str, Event | None]:
        """(cursor seq, its id, gap event or None) for a client at *last_id*."""
        if key is None:
            return ch.seq, ch.tail_id(), None
        tail = ch.tail_id()
        if key > parse_id(tail):
            raise InvalidEventId(f"event id {last_id!r} is from the future: channel {channel!r} is at {tail}")
        if key >= parse_id(ch.floor):
            assert last_id is not None  # key was parsed from it
            return ch.first_seq() - 1 + ch.count_upto(key), last_id, None
        if ch.latest is not None:  # the newest of each key since; take() says if there is a gap
            assert last_id is not None
            return ch.latest_cursor(key), last_id, None
        # Older epoch or evicted: everything held is new to the client.
        return ch.first_seq() - 1, ch.floor, self._subs.gap(channel, last_id, ch.floor)

    # -- snapshots after a gap ------------------------------------------------

    def snapshot(self, channels: Channels, fn: Callable[[str], Any]) -> Callable[[], None]:
        """After a :data:`GAP` on *channels*, send ``fn(channel)``, the
        channel's current state, as a :data:`SNAPSHOT` event, then the live
        events after it; returns the function that unregisters *fn*.

        *channels* is a channel's name or a function of a name (channels
        made on the fly: ``lambda ch: ch.startswith("lobby:")``); the most
        recently registered match wins. ``fn`` returns the state (anything
        an event can carry; ``None``: no snapshot, the gap alone), or an
        :class:`~comet.Event` whose ``id`` is the event id the state is
        exact at (read under the lock your publishes hold, or the last
        event of :meth:`history`). Otherwise the hub reads the channel's
        newest id *before* calling ``fn``: ``fn`` must reflect at least
        every event up to it; events published while it runs follow the
        snapshot even if it already reflects them, so they must be safe to
        apply twice. A ``fn`` that raises is logged and the gap goes alone.
        It runs on the thread that serves the stream, outside the hub's
        locks: keep it quick.

        >>> hub = Hub(buffer_size=2)
        >>> ids = [hub.publish("score", n) for n in range(5)]
        >>> remove = hub.snapshot("score", lambda channel: {"total": 10})
        >>> sub = hub.subscribe("score", last_id=ids[0])
        >>> [(e.name, e.data) for e in sub.take()][1:]
        [('comet.snapshot', {'total': 10})]
        >>> _ = hub.publish("score", 5)
        >>> [e.data for e in sub.take()]
        [5]
        >>> sub.close(); remove()
        """
        if isinstance(channels, str):
            self._check_channel(channels)
        elif not callable(channels):
            raise TypeError(f"channels must be a channel name or a function of one, got {channels!r}")
        if not callable(fn):
            raise TypeError(f"the snapshot function must be callable, got {fn!r}")
        return self._subs.add_snapshot(channels, fn)

    # -- subscriptions and watchers ---------------------------------------------

    @property
    def subscriptions(self) -> int:
        """Subscriptions currently open (leak checks count these)."""
        return self._subs.open

    def watch(self, channel: str, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` (from the publishing thread, after the event is
        stored) on every publish to *channel*, and on :meth:`end_subscriptions`.
        Returns the function that stops watching. Keep ``wake`` tiny."""
        return self._subs.watching(channel, self._store.acquire(channel), wake)

    # -- presence (the rest of its API: comet.hub_presence) -----------------------

    @property
    def presence(self) -> "Presence":
        """This hub's presence registry (:mod:`comet.presence`), made on first use."""
        presence = self._presence
        if presence is None:
            with self._lock:
                if self._presence is None:
                    self._presence = self._store.presence(self)
                presence = self._presence
        return presence

    # -- lifecycle ----------------------------------------------------------

    def end_subscriptions(self) -> None:
        """End every open subscription now (engine stop); the hub stays usable."""
        self._subs.end()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: the hub refuses further use."""
        return self._subs.closed

    def close(self) -> None:
        """End every subscription and refuse further use."""
        if self._presence is not None:
            # First, while the hub still works: a backend's presence retires
            # this process there (RedisHub: its counts go, and its members'
            # leaves are appended by the same scripts after their grace).
            self._presence.close()
        self._subs.closed = True
        self.end_subscriptions()
        self._store.close()  # the sweeper (a backend: its threads and connections too)

    # -- channels that come and go --------------------------------------------

    def forget(self, channel: str) -> bool:
        """Drop *channel*: its buffer, its ids, its place in the hub. True if
        it existed here.

        Open subscriptions first receive what was published before the
        forget, then end (a parked stream finishes its response), as at
        shutdown: the channel is over, and a client reconnecting with its
        cursor gets a :data:`GAP` event, since the channel's history is
        gone. Ids of a channel of the same name created later never collide
        with old cursors: they start a new epoch.

        >>> hub = Hub()
        >>> old = hub.publish("game:7", "over")
        >>> hub.forget("game:7"), hub.channels()
        (True, [])
        >>> _ = hub.publish("game:7", "new game")
        >>> sub = hub.subscribe("game:7", last_id=old)
        >>> [(e.name, e.data) for e in sub.take()][0][0]
        'comet.gap'
        >>> sub.close()
        """
        self._check_channel(channel)
        self._forget_members(channel)  # first: a join being published lands before the channel goes
        return self._store.forget(channel)

    def _forget_members(self, channel: str) -> None:
        """*channel* is over: nobody leaves it. (Backends: in every process.)"""
        if self._presence is not None:  # (none made: nobody ever joined here)
            self._presence.forget(channel)

    # -- helpers ------------------------------------------------------------

    _check_channel = staticmethod(check_channel)

    def __repr__(self) -> str:
        return f"<Hub epoch={self.epoch} channels={len(self._store)} subscriptions={self._subs.open}>"


