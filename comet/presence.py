"""Presence: who has a stream open on a channel, and ending a member's streams.

``hub.subscribe(channel, member="ann")`` makes a subscription one of ann's
open streams on *channel*; :meth:`Hub.members <comet.Hub.members>` says who
is there (member -> open streams) and :meth:`Hub.disconnect
<comet.Hub.disconnect>` ends a member's streams::

    >>> from comet import Hub
    >>> hub = Hub(presence_grace=0)
    >>> seen = hub.subscribe("room")
    >>> ann = hub.subscribe("room", member="ann")
    >>> hub.members("room")
    {'ann': 1}
    >>> [(e.name, e.data) for e in seen.take()]
    [('comet.join', 'ann')]
    >>> ann.close()
    >>> from comet.testing import wait_until
    >>> _ = wait_until(lambda: hub.members("room") == {})
    >>> [(e.name, e.data) for e in seen.take()]
    [('comet.leave', 'ann')]
    >>> seen.close(); hub.close()

Design
------
A member *joins* a channel when their first stream opens and *leaves* when
their last one has been closed for ``presence_grace`` seconds: a reload, a
network blip or a reconnect to another process within the grace period is
neither a leave nor a join, so nobody sees a flap. Each is published on the
channel as an event, :data:`JOIN` (``comet.join``) or :data:`LEAVE`
(``comet.leave``), whose data is the member, and reported to the callbacks
given to :meth:`Hub.on_presence <comet.Hub.on_presence>` in the one process
that published it. Meanwhile a member whose last stream closed is still in
``members()``, counting ``0``: what a page renders from ``members()`` agrees
with the events it receives next.

This module is the registry of one process: channel -> member -> open
streams, member -> subscriptions (to end them), and one presence thread
for the grace periods and the callbacks, started on first need and stopped
with the hub. :class:`~comet.backends.redis.RedisHub` keeps the counts in
Redis instead (:mod:`comet.backends.redis_presence`), per process under a
lease.

Locks: one, ``Presence._lock``, never held across I/O or a user's code. In
this process a member's count and its join or leave event change together
under it (the event is appended to the channel's buffer in the same hold),
so ``members()`` and the events agree at every instant; the channel's
watchers are woken and the ``on_presence`` callbacks run after it is
released, the callbacks on the presence thread, in order (never on the
thread that subscribed, which may be cheroot's accepting thread).

Forgetting a channel (:meth:`Hub.forget <comet.Hub.forget>`) forgets its
presence too, without leave events: the channel is over.
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from .framing import Event

if TYPE_CHECKING:
    from .hub import Hub, Subscription, _Channel

__all__ = ["JOIN", "LEAVE", "Presence"]

#: The event published on a channel when a member's first stream opens there.
JOIN = "comet.join"
#: ... and when their last stream has been closed for the grace period.
LEAVE = "comet.leave"

log = logging.getLogger("comet")

Callback = Callable[[str, str, str], None]


class Presence:
    """The presence of one hub in this process (``hub.presence``)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._lock = threading.Lock()
        #: channel -> member -> open streams here (0: leaving, in grace)
        self._counts: dict[str, dict[str, int]] = {}
        # member -> {(subscription, channel): opened at (time.time())}; a
        # subscription to several channels is one of the member's streams on each.
        self._streams: dict[str, dict[tuple[Subscription, str], float]] = {}
        self._callbacks: tuple[Callback, ...] = ()
        self._calls: list[tuple[str, str, str]] = []  # (channel, event, member) for the callbacks, in order
        self._deadlines: list[tuple[float, str, str]] = []  # (monotonic, channel, member): a heap
        self._leaving: dict[tuple[str, str], float] = {}  # the deadline that counts, per (channel, member)
        self._wake = threading.Condition(self._lock)
        self._timer: threading.Thread | None = None
        self.closed = False

    # -- streams come and go ---------------------------------------------------

    def joined(self, channel: str, member: str, sub: Subscription) -> None:
        """*sub* is one of *member*'s streams on *channel* until it closes.
        Never waits on anything but this registry's lock."""
        with self._lock:
            ch = self.hub._channels.get(channel)
            if self.closed or ch is None or ch.dead:
                return  # forgotten as it opened: the subscription ends, nobody joins
            self._streams.setdefault(member, {})[(sub, channel)] = time.time()
            counts = self._counts.setdefault(channel, {})
            before = counts.get(member)
            counts[member] = (before or 0) + 1
            wakes = self._changed(channel, member, before, (before or 0) + 1)
        self._after(wakes)
        sub.on_close(lambda: self._left(channel, member, sub))

    def _left(self, channel: str, member: str, sub: Subscription) -> None:
        with self._lock:
            subs = self._streams.get(member)
            if subs is None or subs.pop((sub, channel), None) is None:
                return  # forgotten with its channel, or the registry closed
            if not subs:
                del self._streams[member]
            counts = self._counts.get(channel)
            if counts is None or member not in counts:
                return
            before = counts[member]
            counts[member] = after = before - 1
            wakes = self._changed(channel, member, before, after)
        self._after(wakes)

    def _changed(self, channel: str, member: str, before: int | None, after: int) -> tuple[Callable[[], None], ...]:
        """*member*'s streams here on *channel* went from *before* (None: not
        a member) to *after*; the caller holds the lock. The memory hub
        decides joins and leaves here (a join's event goes in now, in the
        same hold as its count); a backend queues the count for its worker.
        Returns the watchers to wake once the lock is released."""
        if before is None:
            ch = self.hub._channels.get(channel)
            return self._append(ch, channel, JOIN, member) if ch is not None else ()
        if before == 0 and after > 0:
            self._leaving.pop((channel, member), None)  # back within the grace period: no event
        elif after == 0:
            deadline = time.monotonic() + self.hub.presence_grace
            self._leaving[(channel, member)] = deadline
            heapq.heappush(self._deadlines, (deadline, channel, member))
            self._wake.notify()
        return ()

    def _after(self, wakes: tuple[Callable[[], None], ...]) -> None:
        """After a change, outside the lock: wake the channel's watchers, and
        start the presence thread if it has something to do."""
        for wake in wakes:
            wake()
        if (self._deadlines or self._calls) and self._timer is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._timer is not None or self.closed:
                return
            self._timer = threading.Thread(target=self._run, name="comet-presence", daemon=True)
            self._timer.start()

    # -- events ------------------------------------------------------------------

    def _append(self, ch: _Channel | None, channel: str, event: str, member: str) -> tuple[Callable[[], None], ...]:
        """Append *event* of *member* to *ch* (a new channel of that name if
        None), as :meth:`Hub.publish <comet.Hub.publish>` does; the caller
        holds the lock. Returns the watchers to wake after it."""
        hub = self.hub
        if hub._closed:
            return ()
        while True:
            target = hub._channel(channel) if ch is None else ch
            with target.cond:
                if target.dead:
                    if ch is not None:
                        return ()  # forgotten meanwhile: the join goes with it
                    continue
                target.append(Event(member, id=f"{target.epoch}-{target.seq + 1}", name=event, channel=channel))
                target.notify_all()
                watchers = target.watchers
            break
        hub.counters.add("published")
        if self._callbacks:
            self._calls.append((channel, event, member))
            self._wake.notify()
        return watchers

    def _queue(self, calls: list[tuple[str, str, str]]) -> None:
        """Have the presence thread run the callbacks for *calls*, in order
        (a backend's worker decides joins and leaves in its shared store)."""
        if not calls or not self._callbacks:
            return
        with self._lock:
            self._calls += calls
            self._wake.notify()
        self._start()

    def _tell(self, calls: list[tuple[str, str, str]]) -> None:
        """Run the callbacks for *calls* (on the presence thread, no lock held)."""
        callbacks = self._callbacks
        for channel, event, member in calls:
            for callback in callbacks:
                try:
                    callback(channel, event, member)
                except Exception:
                    log.exception("comet: presence callback failed")

    def on_change(self, callback: Callback) -> Callable[[], None]:
        """See :meth:`Hub.on_presence <comet.Hub.on_presence>`."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        with self._lock:
            self._callbacks += (callback,)

        def stop() -> None:
            with self._lock:
                self._callbacks = tuple(c for c in self._callbacks if c is not callback)

        return stop

    # -- the presence thread: grace periods and callbacks ------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self.closed and not self._calls and (
                        not self._deadlines or self._deadlines[0][0] > time.monotonic()):
                    self._wake.wait(self._deadlines[0][0] - time.monotonic() if self._deadlines else None)
                if self.closed:
                    return
                wakes: list[Callable[[], None]] = []
                for channel, member in self._due():
                    wakes += self._append(None, channel, LEAVE, member)  # count and event in one hold
                calls, self._calls = self._calls, []
            for wake in wakes:
                wake()
            self._tell(calls)

    def _due(self) -> list[tuple[str, str]]:
        """Members whose grace period is over, removed from the counts (the
        caller holds the lock)."""
        gone = []
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, channel, member = heapq.heappop(self._deadlines)
            if self._leaving.get((channel, member)) != deadline:
                continue  # came back, or left again later: that later deadline counts
            del self._leaving[(channel, member)]
            counts = self._counts.get(channel, {})
            if counts.get(member) != 0:
                continue
            del counts[member]
            if not counts:
                del self._counts[channel]
            gone.append((channel, member))
        return gone

    # -- asking and ending -----------------------------------------------------

    def members(self, channel: str) -> dict[str, int]:
        """See :meth:`Hub.members <comet.Hub.members>`."""
        with self._lock:
            return dict(self._counts.get(channel, {}))

    def disconnect(self, member: str) -> int:
        """See :meth:`Hub.disconnect <comet.Hub.disconnect>`."""
        return self._end_local(member, None)

    def _end_local(self, member: str, opened_before: float | None) -> int:
        """End *member*'s streams here (only those opened before
        *opened_before*, a ``time.time()``, if given); how many."""
        with self._lock:
            subs = list({sub: None for (sub, _), opened in self._streams.get(member, {}).items()
                         if opened_before is None or opened < opened_before})
        for sub in subs:
            sub.end()
        return len(subs)

    def forget(self, channel: str) -> None:
        """*channel* is being forgotten by this process: see :meth:`dropped`."""
        self.dropped(channel)

    def dropped(self, channel: str) -> None:
        """*channel* is over: drop its members here, announcing nothing."""
        with self._lock:
            self._drop(channel)

    def _drop(self, channel: str) -> dict[str, int]:
        """:meth:`dropped` under the lock; the counts it dropped."""
        counts = self._counts.pop(channel, {})
        for member in counts:  # (a member with streams here is counted)
            self._leaving.pop((channel, member), None)
            subs = self._streams.get(member, {})
            for key in [k for k in subs if k[1] == channel]:
                del subs[key]
            if not subs:
                self._streams.pop(member, None)
        return counts

    def close(self) -> None:
        """Stop the presence thread (the hub is closing): pending leaves are
        not published, pending callbacks not run."""
        with self._lock:
            self.closed = True
            self._wake.notify()
            timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(5)
