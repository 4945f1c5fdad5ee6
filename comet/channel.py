"""One channel's replay buffer: the events a hub keeps, and who waits on them.

A :class:`Channel` holds the newest ``size`` events of one channel under one
lock (``cond``) and numbers them locally (``seq``), so a subscription's
cursor is a number and a caught-up read is O(new events). Events that fell
out of the buffer (or that a backend knows of but never held) are summed up
by ``floor``: a cursor before it gets a gap. Threads wait on the channel
(``wait``/``notify_all``); the parked writer and cooperative steps are called
back instead (``watchers``). A latest-value channel (``Hub.latest``) keeps
the newest event of each key as well. The hub owns channels (creates,
holds, forgets them); this module only stores and reads.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Callable

from .cursors import parse_id, stored_id
from .framing import Event

__all__ = ["Channel", "order_of"]

#: This process's order of publishing, over every channel of every hub.
_ORDER = itertools.count(1)


def order_of(event: Event) -> int:
    """Where *event* stands in this process's order of publishing, over every
    channel (0: never stored): how a subscription to several channels merges
    them."""
    return event._order


class Channel:
    """One channel's buffer. ``seq`` numbers events locally (a cursor is a
    seq, so a caught-up take is O(new)); ``floor`` is the id of the newest
    event known to exist but no longer (or never) held, so any cursor at or
    after it is served without a gap."""

    __slots__ = ("cond", "waiting", "events", "seq", "watchers", "floor", "live", "refs", "dead", "epoch", "max_age",
                 "times", "touched", "latest", "latest_floor", "latest_seq")

    def __init__(self, size: int, floor: str, epoch: int = 0, max_age: float | None = None) -> None:
        # The channel's lock (``with ch.cond``). Threads that wait on the
        # channel do so through wait() and notify_all(): a Condition costs
        # about 1 KB (a dict, a deque of waiters), 40 % of an idle channel,
        # and most channels never have a waiting thread (parked streams and
        # cooperative steps use ``watchers``), so it is made for the first.
        self.cond = threading.Lock()
        self.waiting: threading.Condition | None = None
        self.events: deque[Event] = deque(maxlen=size)
        self.seq = 0  # seq of the newest event; events[-1] when any
        self.watchers: tuple[Callable[[], None], ...] = ()
        self.floor = floor
        self.live = False  # backends: the buffer mirrors the shared store
        self.refs = 0  # subscriptions and watchers holding it (under the hub's lock)
        self.dead = False  # forgotten by the hub: look the channel up again
        self.epoch = epoch  # of the ids the memory hub gives this channel
        self.max_age = max_age
        # When each held event arrived (monotonic), only for time-based retention.
        self.times: deque[float] | None = None if max_age is None else deque(maxlen=size)
        self.touched = time.monotonic()  # last publish, or last subscriber gone: for max_idle
        # A latest-value channel (Hub.latest): key -> (seq, newest event of that key),
        # in order of seq; it knows every event after latest_floor (seq latest_seq).
        self.latest: dict[str | None, tuple[int, Event]] | None = None
        self.latest_floor: str | None = None  # None: the floor as of the first event kept
        self.latest_seq = 0

    def wait(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for :meth:`notify_all`; the caller holds ``cond``."""
        waiting = self.waiting
        if waiting is None:
            waiting = self.waiting = threading.Condition(self.cond)
        waiting.wait(timeout)

    def notify_all(self) -> None:
        """Wake every thread in :meth:`wait`; the caller holds ``cond``."""
        if self.waiting is not None:
            self.waiting.notify_all()

    def append(self, event: Event) -> None:
        """Store *event* as the newest; the caller holds ``cond``."""
        if len(self.events) == self.events.maxlen:
            self.floor = stored_id(self.events[0])
        object.__setattr__(event, "_order", next(_ORDER))  # (frozen: set once, as it is stored)
        self.events.append(event)
        self.seq += 1
        if self.latest is not None:
            self._keep(event, self.seq)
        self.touched = now = time.monotonic()
        if self.times is not None:
            self.times.append(now)
            self.expire(now)

    def expire(self, now: float) -> None:
        """Drop events older than ``max_age``: they become the floor, so a
        cursor before them gets a gap. The caller holds ``cond``."""
        times = self.times
        if times is None or self.max_age is None:
            return
        limit = now - self.max_age
        while times and times[0] < limit:
            times.popleft()
            self.floor = stored_id(self.events.popleft())

    def reset(self, floor: str) -> None:
        """Forget the buffer: events up to *floor* may exist that nobody here
        saw, so every cursor before it gets a gap. The caller holds ``cond``."""
        self.events.clear()
        if self.times is not None:
            self.times.clear()
        self.floor = floor
        self.seq += 1
        if self.latest is not None:  # values of keys changed in the hole are unknown
            self.latest_floor, self.latest_seq = floor, self.seq

    def tail_id(self) -> str:
        return stored_id(self.events[-1]) if self.events else self.floor

    def first_seq(self) -> int:
        """seq of the oldest held event (``seq + 1`` when none)."""
        return self.seq - len(self.events) + 1

    def count_upto(self, key: tuple[int, int]) -> int:
        """How many held events have ids <= *key* (bisect: ids are sorted)."""
        events, lo, hi = self.events, 0, len(self.events)
        while lo < hi:
            mid = (lo + hi) // 2
            if parse_id(stored_id(events[mid])) <= key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def after(self, cursor: int) -> tuple[bool, int, list[Event], str]:
        """(fell_behind, seq of the first returned event, events after
        *cursor*, floor); the caller holds ``cond``."""
        if self.times is not None:
            self.expire(time.monotonic())
        new = self.seq - cursor
        if new <= 0:
            return False, 0, [], self.floor
        if self.latest is not None:
            return self._compact(cursor)
        held = len(self.events)
        if new > held:
            return True, self.seq - held + 1, list(self.events), self.floor
        # Index from the right end: O(new), not O(buffer), for a caught-up cursor.
        events = self.events
        return False, cursor + 1, [events[i] for i in range(held - new, held)], self.floor

    # -- latest-value channels (Hub.latest): kept apart from the buffer above --

    def keep_latest(self) -> None:
        """Keep the newest event of each key from now on, starting with the
        events held; the caller holds ``cond`` (or nobody sees *self* yet)."""
        if self.latest is not None:
            return
        self.latest = {}
        first = self.first_seq()
        for i, event in enumerate(self.events):
            self._keep(event, first + i)
        self.latest_floor, self.latest_seq = (self.floor if self.events else None), first - 1

    def _keep(self, event: Event, seq: int) -> None:
        latest = self.latest
        assert latest is not None
        if self.latest_floor is None:
            self.latest_floor = self.floor  # (a backend may set the floor before the first event)
        key = event.latest_key
        latest.pop(key, None)  # re-inserted last: the dict stays in order of seq
        latest[key] = (seq, event)

    def latest_since(self) -> str:
        """The id after which every event's key is known."""
        return self.floor if self.latest_floor is None else self.latest_floor

    def _compact(self, cursor: int) -> tuple[bool, int, list[Event], str]:
        """``after()`` for a latest-value channel: the newest event of each key
        changed after *cursor*, oldest first (O(keys changed)); behind when
        the cursor is from before what the channel knows of its keys."""
        assert self.latest is not None
        batch: list[Event] = []
        for seq, event in reversed(self.latest.values()):
            if seq <= cursor:
                break
            batch.append(event)
        batch.reverse()
        return cursor < self.latest_seq, self.seq - len(batch) + 1, batch, self.latest_since()

    def latest_cursor(self, key: tuple[int, int]) -> int:
        """The cursor seq from which :meth:`_compact` gives exactly the keys
        changed after the event id *key* (-1: from before what is known)."""
        assert self.latest is not None
        if key < parse_id(self.latest_since()):
            return -1
        cursor = self.seq
        for seq, event in reversed(self.latest.values()):
            if parse_id(stored_id(event)) <= key:
                break
            cursor = seq - 1
        return cursor
