"""Admission, counters and shutdown for the open streams of one server.

Every stream, however it is served, holds an :class:`Admission` from its
:class:`StreamPool` for as long as it is open. An admission is an object that
releases itself: use it as a context manager while a stream is being opened,
and hand it over to the stream once it runs (:meth:`Admission.hand_over`);
whatever goes wrong before that, leaving the ``with`` block gives the place
back.

>>> pool = StreamPool(max_streams=1)
>>> with pool.admit("sse") as admission:
...     admission.thread(object())   # a stream that keeps a server thread
...     admission.hand_over()
>>> pool.admit("sse")
Traceback (most recent call last):
...
comet.errors.StreamsExhausted: too many open streams (1 of 1); retry later
>>> admission.release()
>>> pool.open_streams
0
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from .counters import Counters
from .errors import StreamsExhausted
from .runtime import Runtime

if TYPE_CHECKING:
    from types import TracebackType

    from .hub import Hub
    from .subscription import Owner
    from .writer import Writer

__all__ = ["StreamPool", "Admission", "DEFAULT_MAX_PARKED"]

#: Default cap on parked streams per process (each is one socket, ~10 KB).
DEFAULT_MAX_PARKED = 20_000


class Admission:
    """One stream's place in its :class:`StreamPool`, released exactly once.

    While a stream is being opened it counts as "in setup" (it holds the
    request's thread for a moment). :meth:`park` or :meth:`thread` then says
    how it will be served, re-checking the matching cap; :meth:`release`
    gives the place back (idempotent, from any thread).
    """

    __slots__ = ("pool", "stream", "parked", "released", "_owned")

    def __init__(self, pool: "StreamPool") -> None:
        self.pool = pool
        self.stream: Any = None
        self.parked = False
        self.released = False
        self._owned = False

    def park(self, stream: Any) -> None:
        """Count this stream as parked (no server thread); may raise
        :class:`~comet.errors.StreamsExhausted` when ``max_parked`` is reached."""
        self.pool._settle(self, stream, parked=True)

    def thread(self, stream: Any) -> None:
        """Count this stream as holding a server thread for its life; may raise
        :class:`~comet.errors.StreamsExhausted` when ``max_streams`` is reached."""
        self.pool._settle(self, stream, parked=False)

    def served_by(self, stream: Any) -> None:
        """The object that now serves the stream (stats read its transport
        and channel)."""
        self.pool._served_by(self, stream)

    def hand_over(self) -> None:
        """The stream owns this admission now and releases it when it ends:
        leaving the ``with`` block no longer does."""
        self._owned = True

    def release(self) -> None:
        """Give the place back (idempotent)."""
        if not self.released:
            self.released = True
            self.pool._release(self)

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: "TracebackType | None") -> None:
        if kind is not None or not self._owned:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "parked" if self.parked else "open"
        return f"<Admission {state}>"


class StreamPool:
    """Open streams of one server: admission control, counters, shutdown.

    A stream that keeps a server worker thread (thread mode: TLS, servers
    other than cheroot, ``mode="thread"``) counts against ``max_streams``,
    which must stay below the server's thread pool or ordinary pages stop
    being served. A parked stream (the default under cheroot, generator
    handlers included) counts against ``max_parked``. Beyond either cap
    :meth:`admit` (or the admission's :meth:`~Admission.park` /
    :meth:`~Admission.thread`) raises :class:`~comet.errors.StreamsExhausted`
    and adapters answer ``503`` with ``Retry-After: retry_after``.
    """

    def __init__(self, max_streams: int | None = None, retry_after: int = 5, max_parked: int = DEFAULT_MAX_PARKED) -> None:
        if max_streams is not None and (not isinstance(max_streams, int) or max_streams < 1):
            raise ValueError(f"max_streams must be a positive int or None, got {max_streams!r}")
        if not isinstance(max_parked, int) or max_parked < 0:
            raise ValueError(f"max_parked must be a non-negative int, got {max_parked!r}")
        if not isinstance(retry_after, int) or retry_after < 0:
            raise ValueError(f"retry_after must be a non-negative int of seconds, got {retry_after!r}")
        self.max_streams = max_streams
        self.max_parked = max_parked
        self.retry_after = retry_after
        self._cond = threading.Condition()
        self._open: dict[Admission, Any] = {}
        self._parked: set[Admission] = set()
        self._setup: set[Admission] = set()
        #: Hubs whose subscriptions this pool's streams follow: ended with
        #: the streams at shutdown, so no hub needs registering.
        self._hubs: "weakref.WeakSet[Owner]" = weakref.WeakSet()
        #: What happened since start (``comet.stats`` shows it): streams
        #: opened, closed, refused (admission) and parked, client disconnects,
        #: heartbeats, items (events and parts) and bytes written, slow
        #: consumers dropped, and streams opened by a fast route at accept
        #: time or through its WSGI middleware (``comet.fastpath``).
        self.counters = Counters(("opened", "closed", "refused", "parked", "disconnects", "heartbeats", "items", "bytes",
                                  "slow_consumers", "routed_fast", "routed_wsgi", "routed_direct", "forbidden"))
        self.stopping = False
        #: The threads that serve its parked streams (comet.runtime).
        self._runtime = Runtime(self.counters, self.follow)

    def admit(self, transport: str) -> Admission:
        """Reserve a place for one stream, or raise ``StreamsExhausted``.

        Checks the thread cap: a stream holds a server thread at least while
        its handler runs. Its admission's :meth:`~Admission.park` or
        :meth:`~Admission.thread` checks again once it is known how it will
        be served.
        """
        admission = Admission(self)
        with self._cond:
            if self.stopping:
                self.counters.add("refused")
                raise StreamsExhausted("the server is shutting down; retry later", self.retry_after)
            self._check(parked=False, own=0)
            self._open[admission] = None
            self._setup.add(admission)
            self.counters.add("opened")
        return admission

    def _check(self, parked: bool, own: int) -> None:
        # Threaded streams hold a thread for life; streams still being set up
        # (handler running) hold one for a moment and count only at admit.
        # ``own`` discounts the caller's own place when re-checking.
        if parked:
            if len(self._parked) >= self.max_parked > 0:
                self.counters.add("refused")
                raise StreamsExhausted(f"too many open streams ({len(self._parked)} parked of {self.max_parked}); "
                                       "retry later", self.retry_after)
            return
        threaded = len(self._open) - len(self._parked) - len(self._setup) - own
        if self.max_streams is not None and threaded >= self.max_streams:
            self.counters.add("refused")
            raise StreamsExhausted(f"too many open streams ({threaded} of {self.max_streams}); retry later", self.retry_after)

    def _settle(self, admission: Admission, stream: Any, parked: bool) -> None:
        with self._cond:
            if admission.released:
                return
            self._setup.discard(admission)
            self._check(parked, own=0 if parked else 1)
            if parked:
                admission.parked = True
                self._parked.add(admission)
                self.counters.add("parked")
            admission.stream = stream
            self._open[admission] = stream

    def _served_by(self, admission: Admission, stream: Any) -> None:
        with self._cond:
            admission.stream = stream
            if admission in self._open:
                self._open[admission] = stream

    def _release(self, admission: Admission) -> None:
        with self._cond:
            if self._open.pop(admission, False) is not False:
                self.counters.add("closed")
            self._parked.discard(admission)
            self._setup.discard(admission)
            self._cond.notify_all()

    def follow(self, hub: "Owner") -> None:
        """Remember a hub this pool's streams subscribe to (automatic)."""
        if hub not in self._hubs:
            self._hubs.add(hub)

    def followed_hubs(self) -> list["Hub"]:
        """The hubs this pool's streams follow now (:meth:`follow`)."""
        from .hub import Hub

        return [hub for hub in self._hubs if isinstance(hub, Hub)]  # (every owner is one)

    def writer(self) -> "Writer | None":
        """The writer thread of parked streams, started on first use; ``None``
        while the pool is stopping."""
        return None if self.stopping else self._runtime.writer()

    @property
    def parked_streams(self) -> int:
        """How many open streams are parked (holding no server thread)."""
        return len(self._parked)

    @property
    def open_streams(self) -> int:
        """How many streams are open now."""
        return len(self._open)

    def census(self) -> dict[str, Any]:
        """Open streams now: in all, parked, by transport and by channel
        (``"?"`` for generators whose channel cannot be told). O(open streams)."""
        with self._cond:
            streams = [s for s in self._open.values() if s is not None]
            parked, setup = len(self._parked), len(self._setup)
        by_transport: dict[str, int] = {}
        by_channel: dict[str, int] = {}
        for stream in streams:
            by_transport[stream.transport] = by_transport.get(stream.transport, 0) + 1
            channel = stream.channel or "?"
            by_channel[channel] = by_channel.get(channel, 0) + 1
        return {"open": len(streams) + setup, "parked": parked, "threaded": len(streams) - parked + setup,
                "by_transport": by_transport, "by_channel": by_channel}

    def close_all(self) -> None:
        """End every open stream (server stopping): parked ones at once,
        threaded ones at their next tick (within a second: their hubs are
        woken). Callable from any thread."""
        with self._cond:
            self.stopping = True
            streams = [s for s in self._open.values() if s is not None]
            hubs = list(self._hubs)
        for stream in streams:
            stop = getattr(stream, "stop", None)
            if stop is not None:
                stop()
        self._runtime.stop()
        for hub in hubs:
            hub.end_subscriptions()
        # Followed again by the streams of the next start: a stopped app's
        # hubs are not this pool's any more (stats, the next shutdown).
        self._hubs.clear()

    def reopen(self) -> None:
        """Admit streams again after :meth:`close_all` (engine restart)."""
        self._runtime.reopen()  # (first: while the pool stops, writer() is None whatever the runtime says)
        with self._cond:
            self.stopping = False
