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
streams, member -> subscriptions (to end them), and one timer thread for
the grace periods, started on the first leave and stopped with the hub.
:class:`~comet.backends.redis.RedisHub` keeps the counts in Redis instead
(:mod:`comet.backends.redis_presence`), per process under a lease.

Forgetting a channel (:meth:`Hub.forget <comet.Hub.forget>`) forgets its
presence too, without leave events: the channel is over.
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .hub import Hub, Subscription

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
        # Held from deciding a join or leave to publishing it: a leave and the
        # join that follows it are published in that order, and a forget waits
        # for a join being published (it lands before the channel goes).
        # Reentrant: a presence callback may forget a channel.
        self._order = threading.RLock()
        #: channel -> member -> open streams here (0: leaving, in grace)
        self._counts: dict[str, dict[str, int]] = {}
        #: member -> their open subscriptions -> (channel, when opened: time.time())
        # member -> {(subscription, channel): opened at}; a subscription to
        # several channels is one of the member's streams on each.
        self._streams: dict[str, dict[tuple[Subscription, str], float]] = {}
        self._callbacks: tuple[Callback, ...] = ()
        self._deadlines: list[tuple[float, str, str]] = []  # (monotonic, channel, member): a heap
        self._leaving: dict[tuple[str, str], float] = {}  # the deadline that counts, per (channel, member)
        self._wake = threading.Condition(self._lock)
        self._timer: threading.Thread | None = None
        self.closed = False

    # -- streams come and go ---------------------------------------------------

    def joined(self, channel: str, member: str, sub: Subscription) -> None:
        """*sub* is one of *member*'s streams on *channel* until it closes."""
        with self._order:
            with self._lock:
                if self.closed:
                    return
                self._streams.setdefault(member, {})[(sub, channel)] = time.time()
                counts = self._counts.setdefault(channel, {})
                before = counts.get(member)
                counts[member] = (before or 0) + 1
            self._changed(channel, member, before, (before or 0) + 1)
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
        self._changed(channel, member, before, after)

    def _changed(self, channel: str, member: str, before: int | None, after: int) -> None:
        """*member*'s streams here on *channel* went from *before* (None: not
        a member) to *after*. The memory hub decides joins and leaves
        here; a backend pushes the count to its shared store instead."""
        if before is None:
            self._announce(channel, JOIN, member)
        elif before == 0 and after > 0:
            with self._lock:
                self._leaving.pop((channel, member), None)  # back within the grace period: no event
        elif after == 0:
            self._leave_later(channel, member)

    # -- grace periods ---------------------------------------------------------

    def _leave_later(self, channel: str, member: str) -> None:
        deadline = time.monotonic() + self.hub.presence_grace
        with self._lock:
            if self.closed:
                return
            self._leaving[(channel, member)] = deadline
            heapq.heappush(self._deadlines, (deadline, channel, member))
            if self._timer is None:
                self._timer = threading.Thread(target=self._run, name="comet-presence", daemon=True)
                self._timer.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self.closed and (not self._deadlines or self._deadlines[0][0] > time.monotonic()):
                    self._wake.wait(self._deadlines[0][0] - time.monotonic() if self._deadlines else None)
                if self.closed:
                    return
            with self._order:
                for channel, member in self._due():
                    self._announce(channel, LEAVE, member)

    def _due(self) -> list[tuple[str, str]]:
        """Members whose grace period is over, removed from the counts."""
        gone = []
        now = time.monotonic()
        with self._lock:
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

    # -- events ------------------------------------------------------------------

    def _announce(self, channel: str, event: str, member: str) -> None:
        """Publish a join or leave on *channel*, then tell the callbacks."""
        try:
            self.hub.publish(channel, member, event=event)
        except Exception:  # a closed hub, a backend down: presence itself stays right
            log.warning("comet: could not publish %s of %r on %r", event, member, channel, exc_info=True)
        for callback in self._callbacks:
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
        with self._order:
            self.dropped(channel)

    def dropped(self, channel: str) -> None:
        """*channel* is over: drop its members here, announcing nothing."""
        with self._lock:
            counts = self._counts.pop(channel, {})
            for member in counts:
                self._leaving.pop((channel, member), None)
                subs = self._streams.get(member, {})
                for key in [k for k in subs if k[1] == channel]:
                    del subs[key]
                if not subs:
                    self._streams.pop(member, None)

    def close(self) -> None:
        """Stop the timer (the hub is closing): pending leaves are not published."""
        with self._lock:
            self.closed = True
            self._wake.notify()
            timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(5)
