"""Subscriptions: cursors into a hub's channels, and what they share.

:meth:`Hub.subscribe <comet.Hub.subscribe>` hands out a :class:`Subscription`
(one channel) or a :class:`MultiSubscription` (several, merged in this
process's order of publishing); both are :class:`Feed` objects, what the
parked writer (``comet.writer``) reads them by. See :mod:`comet.hub` for the
design (a cursor, not a queue of copies; gaps said, never silent).

What the subscriptions of one hub share lives in a :class:`Subscriptions`
object the hub composes: the count of open ones, the generation that
``end_subscriptions`` moves on, the registered snapshot functions
(:meth:`Hub.snapshot <comet.Hub.snapshot>`) and the mux fan-outs. It reads
the channels through the hub's store's public interface
(:class:`comet.store.ChannelStore`); this module knows the hub only as an
:class:`Owner` (what a server asks of a feed's hub), so it does not import
:mod:`comet.hub`, which imports it.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Protocol

from .channel import Channel, order_of
from .cooperative import Idle, current_step
from .counters import Counters
from .cursors import parse_id, stored_id
from .framing import Event, TaggedEvent
from .mux import Mux, MuxFanout, Slot
from .store import Channels, ChannelStore, wake

__all__ = ["Subscription", "MultiSubscription", "Feed", "Owner", "Subscriptions", "SnapshotDue", "GAP", "SNAPSHOT",
           "View"]

#: Name of the event a subscription receives when events it should have seen
#: are no longer available. Its ``data`` is ``{"last_id": <the client's
#: cursor>, "resume_id": <id of the gap event>}``; its ``id`` is the cursor to
#: resume from, so clients that store ids need no special case.
GAP = "comet.gap"

#: Name of the event that follows a :data:`GAP` on a channel with a snapshot
#: function (:meth:`Hub.snapshot`): the channel's current state. Its ``id``
#: is the cursor the state is exact at; the gap's data then has
#: ``"snapshot": true``.
SNAPSHOT = "comet.snapshot"

View = Callable[[Event], Any]


class Owner(Protocol):
    """A feed's hub, as a server that serves the feed sees it: a pool ends
    the subscriptions of the hubs its streams follow at shutdown
    (:class:`~comet.Hub` is one)."""

    def end_subscriptions(self) -> None:
        """End every open subscription now; the hub stays usable."""
        ...


class Subscriptions:
    """What the subscriptions of one hub share (the hub makes one, as
    ``Subscriptions(hub, hub.store, hub.counters)``): open ones counted
    (:attr:`open`), their :attr:`generation`, the snapshot functions, the
    fan-outs of subscriptions to several channels."""

    def __init__(self, owner: Owner, store: ChannelStore, counters: Counters) -> None:
        self.owner = owner
        self.store = store
        self.counters = counters
        #: Subscriptions open now (guarded by the store's lock).
        self.open = 0
        #: Moved on by :meth:`end`: a subscription of an older one has ended.
        self.generation = 0
        #: The hub is closed: every subscription has ended.
        self.closed = False
        #: (channels, function) pairs, newest last; replaced, never changed in
        #: place, so a gap reads it without a lock.
        self.snapshots: tuple[tuple[Channels, Callable[[str], Any]], ...] = ()
        #: Each channel's one watcher for the subscriptions to several channels that follow it.
        self.fanouts: dict[Channel, MuxFanout] = {}

    def end(self) -> None:
        """End every open subscription now (``Hub.end_subscriptions``)."""
        with self.store.lock:
            self.generation += 1
        for ch in self.store.all():
            wake(ch)

    def add_snapshot(self, channels: Channels, fn: Callable[[str], Any]) -> Callable[[], None]:
        """Register *fn* for *channels* (``Hub.snapshot``); the function that unregisters it."""
        entry = (channels, fn)
        with self.store.lock:
            self.snapshots = self.snapshots + (entry,)

        def remove() -> None:
            with self.store.lock:
                self.snapshots = tuple(e for e in self.snapshots if e is not entry)

        return remove

    def gap(self, channel: str, last_id: str | None, resume: str) -> Event:
        """The :data:`GAP` event for a client at *last_id* that resumes at *resume* (counted)."""
        self.counters.add("gaps")
        return Event({"last_id": last_id, "resume_id": resume}, id=resume, name=GAP, channel=channel)

    def after_gap(self, channel: str, ch: Channel, gap: Event) -> tuple[int, str, list[Event]] | None:
        """The snapshot that follows *gap*: (cursor seq, its id, the gap and
        the snapshot), or None (no snapshot function, it returned None or
        failed). The caller holds no lock: ``fn`` may use the hub."""
        try:
            fn = next((f for match, f in reversed(self.snapshots)
                       if (match == channel if isinstance(match, str) else match(channel))), None)
            if fn is None:
                return None
            with ch.cond:  # the cursor before the state: nothing published after it is missed
                seq, tail = ch.seq, ch.tail_id()
            state = fn(channel)
            if state is None:
                return None
            if isinstance(state, Event) and state.id is not None and state.id != tail:
                seq, tail = self._snapshot_cursor(channel, ch, state.id)
            snapshot = Event(state.data if isinstance(state, Event) else state, id=tail, name=SNAPSHOT,
                             channel=channel)
            snapshot.text()  # serialise here: a bad state is this function's failure, not the stream's
        except Exception:
            logging.getLogger("comet").exception("comet: snapshot of %r failed; sending the gap alone", channel)
            return None
        return seq, tail, [gap.replace(data={**gap.data, "snapshot": True}), snapshot]

    def _snapshot_cursor(self, channel: str, ch: Channel, event_id: str) -> tuple[int, str]:
        """(seq, id) of the cursor at *event_id*, which a snapshot says it is
        exact at; ``ValueError`` if the buffer cannot resume there."""
        key = parse_id(event_id)
        caught_up = False
        if key > parse_id(ch.tail_id()):
            caught_up = self.store.catch_up(channel, ch)  # another process published it
        with ch.cond:
            if not parse_id(ch.floor) <= key <= parse_id(ch.tail_id()):
                raise ValueError(f"a snapshot at {event_id} is out of the buffer of {channel!r} "
                                 f"({ch.floor} to {ch.tail_id()})")
            seq = ch.first_seq() - 1 + ch.count_upto(key)
        if caught_up:
            wake(ch)
        return seq, event_id

    def watch(self, channel: str, ch: Channel, wake: Callable[[], None]) -> Callable[[], None]:
        """``Hub.watch`` the channel object *ch* a subscription reads, even if
        *channel* was forgotten since: the parked writer must hear of that
        one's last events, not of its successor's."""
        self.store.hold(ch)  # (the subscription holds it: it cannot go meanwhile)
        return self.watching(channel, ch, wake)

    def watching(self, channel: str, ch: Channel, wake: Callable[[], None]) -> Callable[[], None]:
        """Add *wake* to *ch*, held by the caller until the unwatch."""
        with ch.cond:
            ch.watchers = ch.watchers + (wake,)
        done: list[bool] = []

        def unwatch() -> None:
            if done:
                return
            done.append(True)
            with ch.cond:
                ch.watchers = tuple(w for w in ch.watchers if w is not wake)
            self.store.release(channel, ch)

        return unwatch

    def count(self, delta: int) -> None:
        """Count subscriptions opened (+1) and closed (-1)."""
        with self.store.lock:
            self.open += delta


class SnapshotDue:
    """A gap met at subscribe, whose snapshot the first :meth:`Subscription.take` makes."""

    __slots__ = ("gap",)

    def __init__(self, gap: Event) -> None:
        self.gap = gap


class Feed(Protocol):
    """What a server that reads subscriptions without a thread each (the
    parked writer, ``comet.writer``) needs of one besides ``take()``,
    ``cursor``, ``last_id`` and ``ended``: :class:`Subscription` and
    :class:`MultiSubscription` are feeds. The writer watches each channel
    once for every stream reading it, and takes once for every stream at
    the same cursor.

    >>> from comet import Hub
    >>> hub = Hub()
    >>> sub, other = hub.subscribe("room"), hub.subscribe("room")
    >>> unwatch = sub.watch(lambda: print("wake"))
    >>> _ = hub.publish("room", "hi")
    wake
    >>> sub.group_key() == other.group_key(), sub.moved(), sub.has_pending, sub.bounded()
    (True, True, False, False)
    >>> unwatch(); sub.close(); other.close()
    """

    @property
    def hub(self) -> Owner: ...

    def group_key(self) -> tuple[int, str]:
        """Equal for feeds read from one channel object (one watcher, one take)."""

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` whenever a take may give something; returns the unwatch."""

    def bounded(self) -> bool:
        """May a slow client's feed be left unread (it catches up with a state)?"""

    @property
    def has_pending(self) -> bool:
        """Are items waiting that are not the channel's events (no shared take)?"""

    def jump(self, cursor: int, last_id: str) -> None:
        """Advance as another feed at the same cursor just did by its take."""

    def moved(self) -> bool:
        """Has anything happened since the last take?"""

    def wake(self) -> None:
        """Wake whoever waits on this feed."""


class Subscription:
    """A cursor into one channel: what :meth:`Hub.subscribe` returns.

    Iterate it (thread mode: blocks up to ``idle`` seconds at a time, yielding
    :class:`Idle` ticks), or call :meth:`take` for what is ready now without
    blocking (parked mode). :meth:`close` ends it and runs the callbacks
    given to :meth:`on_close`, exactly once, whoever serves it.

    >>> from comet import Hub
    >>> hub = Hub()
    >>> sub = hub.subscribe("room", initial=["snapshot"])
    >>> _ = hub.publish("room", "hello")
    >>> [getattr(item, "data", item) for item in sub.take()]
    ['snapshot', 'hello']
    >>> sub.close()
    """

    def __init__(self, subs: Subscriptions, ch: Channel, channel: str, cursor: int, last_id: str, pending: list[Any],
                 view: View | None, idle: float) -> None:
        #: The hub it reads.
        self.hub: Owner = subs.owner
        self._subs = subs
        self.channel = channel
        self.view = view
        self.idle = idle
        self.cursor = cursor  # local seq of the last event taken
        self._last_id = last_id  # ... and its id
        self._ch = ch
        # Each of 10,000 streams keeps its subscription: what most never need
        # is made when first needed (fewer objects for the garbage collector
        # to go over, and less memory): the empty tuples are placeholders.
        self._pending: list[Any] | tuple[()] = pending or ()
        self._generation = subs.generation
        self._ready: deque[Any] | None = None  # taken, not yet handed out by __next__
        self._tick = False  # a caught-up tick is due after the batch in _ready
        self._waited = False
        self._callbacks: list[Callable[[], None]] | tuple[()] = ()
        self._counted = False
        self._ending = False
        self.closed = False

    @property
    def last_id(self) -> str:
        """The id to resume after: the last event taken."""
        return self._last_id

    # -- the Feed protocol: what the parked writer (comet.writer) needs --

    def jump(self, cursor: int, last_id: str) -> None:
        """Advance as another subscription at the same cursor just did: the
        parked writer shares one take() among equal cursors."""
        self.cursor, self._last_id = cursor, last_id

    def group_key(self) -> tuple[int, str]:
        """Subscriptions with equal keys read one channel object: the writer
        serves them as one group (one watcher, one shared take)."""
        return id(self._ch), self.channel

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` whenever this subscription may have something new
        (the writer waits on channels, not on threads); returns the unwatch."""
        return self._subs.watch(self.channel, self._ch, wake)

    def bounded(self) -> bool:
        """Does a take give at most the channel's state (latest-value
        channels, :meth:`Hub.latest`)? Then a server may leave it unread
        while its client is slow, instead of disconnecting the client."""
        return self._ch.latest is not None

    @property
    def has_pending(self) -> bool:
        """Are initial items or a gap waiting to be taken? Then the next take
        is this subscription's own: the writer does not share it."""
        return bool(self._pending)

    def moved(self) -> bool:
        """Has anything happened since the last take? (The writer asks after
        a step, so a publish during the step is not missed.)"""
        return self.ended or self._ch.seq != self.cursor

    def wake(self) -> None:
        """Wake whoever waits on this subscription (a thread, or the writer):
        how a cancelled step blocked in its wait notices at once."""
        wake(self._ch)

    @property
    def ended(self) -> bool:
        """True once the hub closed or ended its subscriptions (engine stop),
        or forgot the channel and everything published before was taken."""
        return (self.closed or self._ending or self._subs.closed or self._generation != self._subs.generation
                or (self._ch.dead and self.cursor >= self._ch.seq and not self._pending))

    def end(self) -> None:
        """End this subscription from any thread, as engine stop would: a
        thread iterating it, the parked writer or a generator stepped on it
        sees :attr:`ended` and finishes the stream (``Hub.disconnect``)."""
        self._ending = True
        self.wake()

    def on_close(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run *callback* when the subscription closes (the client went away,
        the server stopped): presence, cleanup. Usable as a decorator."""
        if not self._callbacks:
            self._callbacks = []
        self._callbacks.append(callback)
        return callback

    def start(self) -> None:
        """Count this subscription as open (iteration and parking do this)."""
        if not self._counted and not self.closed:
            self._counted = True
            self._subs.count(1)

    def take(self) -> list[Any]:
        """Everything ready for this subscriber now, cursor advanced; never blocks.

        A subscriber that fell behind the buffer gets a :data:`GAP` event
        first. ``view`` is applied here, once per event for this subscriber.
        """
        out = self._take_pending()
        if out and isinstance(out[-1], SnapshotDue):
            out[-1:] = self._after_gap(out[-1].gap)
        ch = self._ch
        with ch.cond:
            behind, start, batch, floor = ch.after(self.cursor)
        if ch.dead and (behind or batch):
            # Forgotten: this was the last take. Whoever serves it (the parked
            # writer) must come back once more to see it ended.
            self.wake()
        if behind:
            gap = self._subs.gap(self.channel, self._last_id, floor)
            self.cursor, self._last_id = start - 1, floor
            told = self._after_gap(gap)
            out.extend(told)
            if len(told) > 1:  # the snapshot holds the batch; what follows it comes next take
                batch = []
        if batch:
            self.cursor = start + len(batch) - 1
            self._last_id = stored_id(batch[-1])
            view = self.view
            if view is None:
                out.extend(batch)
            else:
                for event in batch:
                    shown = view(event)
                    if shown is None:
                        continue
                    out.append(shown if isinstance(shown, Event) else event.replace(data=shown))
        return out

    def _take_pending(self) -> list[Any]:
        """What was ready before the channel is read: items taken by
        ``__next__`` and not handed out yet, then the initial items and a
        gap (in order); a new list."""
        pending, ready = self._pending, self._ready
        self._pending, self._ready = (), None
        out = list(ready) if ready else []
        out += pending
        return out

    def _after_gap(self, gap: Event) -> list[Event]:
        """*gap*, and the channel's snapshot if it has one: the cursor then
        moves to where the snapshot is exact."""
        found = self._subs.after_gap(self.channel, self._ch, gap)
        if found is None:
            return [gap]
        self.cursor, self._last_id, shown = found
        return shown

    def __iter__(self) -> "Subscription":
        return self

    def __next__(self) -> Any:
        """The next event, or a falsy :class:`Idle` tick: at once when caught
        up, after each batch, and every ``idle`` seconds while nothing comes.

        Iterated by a thread, it waits on the channel. Iterated inside
        :func:`cooperative` (how comet steps a generator handler without a
        thread of its own), it never waits: it tells the stepper which
        subscription it would wait on and returns a tick at once.
        """
        if self.closed:
            raise StopIteration
        self.start()
        while True:
            if self._ready:
                return self._ready.popleft()
            self._ready = None
            if self._tick:
                self._tick = False
                return Idle(self._last_id)
            items = self.take()
            if items:
                self._ready = deque(items)
                self._tick = True  # a tick after each batch: "caught up"
                continue
            if self.ended:
                self.close()  # ended by the hub: release it as a close would
                raise StopIteration
            if not self._waited:
                self._waited = True  # report "caught up" once before any wait, so streams can send headers
                return Idle(self._last_id)
            step = current_step()
            if step is not None:
                if step.cancelled:  # the stream this runs for has ended: end the handler's loop too
                    self.close()
                    raise StopIteration
                if step.blocked is None:
                    step.blocked = self
                    return Idle(self._last_id)
                # The handler swallowed the tick and asked again in the same
                # step: it cannot be suspended, so this step waits (the
                # stepper gives the stream a thread of its own meanwhile).
            ch = self._ch
            with ch.cond:
                # Re-checked under the lock: a publish between take() and here
                # has moved ch.seq, so we do not wait for it (no lost wake-up: invariant I1).
                if ch.seq == self.cursor and not self.ended:
                    ch.wait(self.idle)
            items = self.take()
            if items:
                self._ready = deque(items)
                self._tick = True
                continue
            return Idle(self._last_id)

    def close(self) -> None:
        """End the subscription; runs the ``on_close`` callbacks once."""
        if self.closed:
            return
        self.closed = True
        self._ready = None
        if self._counted:
            self._subs.count(-1)
        self._release_channels()
        callbacks, self._callbacks = self._callbacks, ()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one failing cleanup must not skip the others
                logging.getLogger("comet").exception("comet: on_close callback failed")

    def _release_channels(self) -> None:
        self._subs.store.release(self.channel, self._ch)

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} at {self.last_id}{' closed' if self.closed else ''}>"


class MultiSubscription(Subscription):
    """A subscription to several channels (``hub.subscribe([...])``).

    Its items are :class:`~comet.framing.TaggedEvent`: each says its
    ``channel``, and its ``id`` is the subscription's cursor on every
    channel (``<name>.<id>`` pieces joined by ``_``, the name as
    :func:`cursor_name` writes it), which
    ``hub.subscribe(channels, last_id=...)`` takes back to resume each
    channel exactly. Events of one channel come in order; events of
    different channels in the order they were published in this process.
    Served exactly like a :class:`Subscription`: iterated, returned,
    ``yield from``.

    >>> from comet import Hub
    >>> hub = Hub()
    >>> sub = hub.subscribe(["room", "dm:ann:bob"])
    >>> _ = hub.publish("dm:ann:bob", "psst"), hub.publish("room", "hello all")
    >>> [(e.channel, e.data) for e in sub.take()]
    [('dm:ann:bob', 'psst'), ('room', 'hello all')]
    >>> resumed = hub.subscribe(["room", "dm:ann:bob"], last_id=sub.last_id)
    >>> _ = hub.publish("room", "again")
    >>> [e.data for e in resumed.take()]
    ['again']
    >>> sub.close(), resumed.close()
    (None, None)
    """

    def __init__(self, subs: Subscriptions, slots: list[Slot], pending: list[Any], view: View | None,
                 idle: float) -> None:
        self._slots = slots
        #: The channels followed, in the order given.
        self.channels = tuple(slot.name for slot in slots)
        mux = Mux()
        label = slots[0].name + (f" (+{len(slots) - 1})" if len(slots) > 1 else "")
        super().__init__(subs, mux, label, 0, self._cursor(), pending, view, idle)
        self._mux = mux
        for slot in slots:
            MuxFanout.join(subs.fanouts, slot.ch, mux)

    def _cursor(self) -> str:
        return "_".join([slot.piece for slot in self._slots])

    def bounded(self) -> bool:
        return all(slot.ch.latest is not None for slot in self._slots)

    @property
    def ended(self) -> bool:
        """As for one channel; and once any followed channel was forgotten
        and everything published to it before was taken."""
        if super().ended:
            return True
        return any(slot.ch.dead and slot.cursor >= slot.ch.seq for slot in self._slots) and not self._pending

    def take(self) -> list[Any]:
        out = self._take_pending()
        mux = self._mux
        with mux.cond:  # read first: a publish from now on moves it again, so no wake-up is lost
            self.cursor = mux.seq
        merged: list[tuple[int, int, Slot, Event]] = []
        for slot in self._slots:
            ch = slot.ch
            with ch.cond:
                behind, start, batch, floor = ch.after(slot.cursor)
            if ch.dead and (behind or batch):
                self.wake()  # forgotten: whoever serves us must come back to see it ended
            gap, slot.gap = slot.gap, None
            if behind:
                gap = (self._subs.gap(slot.name, slot.last, floor) if gap is None else
                       Event({"last_id": slot.last, "resume_id": floor}, id=floor, name=GAP, channel=slot.name))
                slot.cursor = start - 1
            if gap is not None:
                found = self._subs.after_gap(slot.name, ch, gap) if self._subs.snapshots else None
                told = [gap]
                if found is not None:  # the state at the snapshot's cursor, then what came after it
                    slot.cursor, _, told = found
                    with ch.cond:
                        _, start, batch, _ = ch.after(slot.cursor)
                order = order_of(batch[0]) if batch else 0
                merged.extend((order, 0, slot, event) for event in told)
            if batch:
                slot.cursor = start + len(batch) - 1
                merged.extend((order_of(event), 1, slot, event) for event in batch)
        if len(self._slots) > 1:
            merged.sort(key=lambda entry: (entry[0], entry[1]))
        view = self.view
        for _, kind, slot, event in merged:
            slot.at(stored_id(event))
            shown: Any = event
            if kind and view is not None:
                shown = view(event)
                if shown is None:
                    continue
                if not isinstance(shown, Event):
                    shown = event.replace(data=shown)
            out.append(TaggedEvent.of(shown, self._cursor(), slot.name))
        if merged:
            self._last_id = self._cursor()
        return out

    def close(self) -> None:
        if self.closed:
            return
        for slot in self._slots:
            MuxFanout.leave(self._subs.fanouts, slot.ch, self._mux)
        super().close()

    def _release_channels(self) -> None:
        for slot in self._slots:
            self._subs.store.release(slot.name, slot.ch)

    def __repr__(self) -> str:
        return f"<MultiSubscription {list(self.channels)!r} at {self.last_id}{' closed' if self.closed else ''}>"
