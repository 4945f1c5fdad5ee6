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
lease: it extends :class:`Presence` through the surface its docstring lists.

It knows its hub only as a :class:`Host` (three members of
:class:`~comet.Hub`), and a stream only as a :class:`Stream`: the hub
imports this module, never the reverse.

Locks: one, ``Presence.lock``, never held across I/O or a user's code. In
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
from typing import Callable, Protocol

__all__ = ["JOIN", "LEAVE", "Presence", "Host", "Stream"]

#: The event published on a channel when a member's first stream opens there.
JOIN = "comet.join"
#: ... and when their last stream has been closed for the grace period.
LEAVE = "comet.leave"

log = logging.getLogger("comet")

Callback = Callable[[str, str, str], None]
#: Watchers of a channel, to call once a lock is released.
Wakes = tuple[Callable[[], None], ...]


class Host(Protocol):
    """What presence needs of its hub (:class:`~comet.Hub` is one)."""

    #: Seconds a member whose last stream closed still counts (``0``).
    presence_grace: float

    def has_channel(self, channel: str) -> bool:
        """Whether *channel* is held in this process and not forgotten."""
        ...

    def announce(self, channel: str, name: str, data: str, *, create: bool) -> Wakes | None:
        """Append event *name* with *data* to *channel* here, waking nobody;
        the watchers to wake, or None if nothing was appended."""
        ...


class Stream(Protocol):
    """One of a member's streams: a subscription (single or multi-channel)."""

    def on_close(self, callback: Callable[[], None]) -> Callable[[], None]:
        ...

    def end(self) -> None:
        ...


class Presence:
    """The presence of one hub in this process (``hub.presence``).

    A backend that shares presence across processes extends it through
    these, and nothing else of it:

    * :attr:`lock`, the registry's lock (what changes with the counts goes
      under it), and :attr:`counts`, guarded by it;
    * the hooks :meth:`count_changed` (under the lock) and
      :meth:`after_change` (after it);
    * :meth:`report` (callbacks for joins and leaves it decided),
      :meth:`end_streams` and :meth:`drop`.

    Example: :class:`comet.backends.redis_presence.RedisPresence`.
    """

    def __init__(self, hub: Host) -> None:
        self.hub = hub
        #: The registry's lock: never held across I/O or a user's code.
        self.lock = threading.Lock()
        #: channel -> member -> open streams here (0: leaving, in grace)
        self.counts: dict[str, dict[str, int]] = {}
        # member -> {(subscription, channel): opened at (time.time())}; a
        # subscription to several channels is one of the member's streams on each.
        self._streams: dict[str, dict[tuple[Stream, str], float]] = {}
        self._callbacks: tuple[Callback, ...] = ()
        self._calls: list[tuple[str, str, str]] = []  # (channel, event, member) for the callbacks, in order
        self._deadlines: list[tuple[float, str, str]] = []  # (monotonic, channel, member): a heap
        self._leaving: dict[tuple[str, str], float] = {}  # the deadline that counts, per (channel, member)
        self._wake = threading.Condition(self.lock)
        self._timer: threading.Thread | None = None
        self.closed = False

    # -- streams come and go ---------------------------------------------------

    def joined(self, channel: str, member: str, sub: Stream) -> None:
        """*sub* is one of *member*'s streams on *channel* until it closes.
        Never waits on anything but this registry's lock."""
        with self.lock:
            if self.closed or not self.hub.has_channel(channel):
                return  # forgotten as it opened: the subscription ends, nobody joins
            self._streams.setdefault(member, {})[(sub, channel)] = time.time()
            counts = self.counts.setdefault(channel, {})
            before = counts.get(member)
            counts[member] = (before or 0) + 1
            wakes = self.count_changed(channel, member, before, (before or 0) + 1)  # invariant I10
        self.after_change(wakes)
        sub.on_close(lambda: self._left(channel, member, sub))

    def _left(self, channel: str, member: str, sub: Stream) -> None:
        with self.lock:
            subs = self._streams.get(member)
            if subs is None or subs.pop((sub, channel), None) is None:
                return  # forgotten with its channel, or the registry closed
            if not subs:
                del self._streams[member]
            counts = self.counts.get(channel)
            if counts is None or member not in counts:
                return
            before = counts[member]
            counts[member] = after = before - 1
            wakes = self.count_changed(channel, member, before, after)
        self.after_change(wakes)

    def count_changed(self, channel: str, member: str, before: int | None, after: int) -> Wakes:
        """Hook: *member*'s streams here on *channel* went from *before*
        (None: not a member) to *after*, already in :attr:`counts`; the
        caller holds the lock. The memory hub decides joins and leaves here
        (a join's event goes in now, in the same hold as its count); a
        backend queues the count for its worker. Returns the watchers to
        wake once the lock is released (see :meth:`after_change`)."""
        if before is None:
            return self._append(channel, JOIN, member, create=False)
        if before == 0 and after > 0:
            self._leaving.pop((channel, member), None)  # back within the grace period: no event
        elif after == 0:
            deadline = time.monotonic() + self.hub.presence_grace
            self._leaving[(channel, member)] = deadline
            heapq.heappush(self._deadlines, (deadline, channel, member))
            self._wake.notify()
        return ()

    def after_change(self, wakes: Wakes) -> None:
        """Hook: after a change, outside the lock: wake the channel's
        watchers, and start the presence thread if it has something to do."""
        for wake in wakes:
            wake()
        if (self._deadlines or self._calls) and self._timer is None:
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self._timer is not None or self.closed:
                return
            self._timer = threading.Thread(target=self._run, name="comet-presence", daemon=True)
            self._timer.start()

    # -- events ------------------------------------------------------------------

    def _append(self, channel: str, event: str, member: str, *, create: bool) -> Wakes:
        """Append *event* of *member* to *channel* (only if held here unless
        *create*; a join of a channel forgotten meanwhile goes with it), as
        :meth:`Hub.publish <comet.Hub.publish>` does; the caller holds the
        lock. Returns the watchers to wake after it."""
        watchers = self.hub.announce(channel, event, member, create=create)
        if watchers is None:
            return ()
        if self._callbacks:
            self._calls.append((channel, event, member))
            self._wake.notify()
        return watchers

    def report(self, calls: list[tuple[str, str, str]]) -> None:
        """Have the presence thread run the callbacks for *calls*
        ``(channel, event, member)``, in order: a backend's worker decides
        joins and leaves in its shared store. Takes the lock."""
        if not calls or not self._callbacks:
            return
        with self.lock:
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
        with self.lock:
            self._callbacks += (callback,)

        def stop() -> None:
            with self.lock:
                self._callbacks = tuple(c for c in self._callbacks if c is not callback)

        return stop

    # -- the presence thread: grace periods and callbacks ------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self._calls and (
                        not self._deadlines or self._deadlines[0][0] > time.monotonic()):
                    self._wake.wait(self._deadlines[0][0] - time.monotonic() if self._deadlines else None)
                if self.closed:
                    return
                wakes: list[Callable[[], None]] = []
                for channel, member in self._due():
                    wakes += self._append(channel, LEAVE, member, create=True)  # invariant I10: one hold
                calls, self._calls = self._calls, []
            for wake in wakes:  # watchers and callbacks after the lock: invariant I8
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
            counts = self.counts.get(channel, {})
            if counts.get(member) != 0:
                continue
            del counts[member]
            if not counts:
                del self.counts[channel]
            gone.append((channel, member))
        return gone

    # -- asking and ending -----------------------------------------------------

    def members(self, channel: str) -> dict[str, int]:
        """See :meth:`Hub.members <comet.Hub.members>`."""
        with self.lock:
            return dict(self.counts.get(channel, {}))

    def disconnect(self, member: str) -> int:
        """See :meth:`Hub.disconnect <comet.Hub.disconnect>`."""
        return self.end_streams(member)

    def end_streams(self, member: str, opened_before: float | None = None) -> int:
        """End *member*'s streams here (only those opened before
        *opened_before*, a ``time.time()``, if given); how many. Takes the
        lock, ends them after it."""
        with self.lock:
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
        with self.lock:
            self.drop(channel)

    def drop(self, channel: str) -> dict[str, int]:
        """:meth:`dropped` for a caller that holds the lock; the counts it
        dropped."""
        counts = self.counts.pop(channel, {})
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
        with self.lock:
            self.closed = True
            self._wake.notify()
            timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(5)
