"""Thread mode: a handler's items turned into response bytes by the request's thread.

Under cheroot streams are parked (:mod:`comet.writer`) and hold no thread.
Where comet cannot take the connection over (TLS, WSGI servers other than
cheroot, ``mode="thread"``) a :class:`Stream` wraps the generator a handler returns. It is primed before
any header goes out (so bad input found by the handler, a malformed cursor
say, still becomes a 4xx), then iterated by the server thread, one chunk per
item, flushed at once by the server.

The handler may yield ``None`` to say "nothing to send right now";
:meth:`comet.Hub.subscribe` yields an :class:`~comet.hub.Idle` marker (which
also carries its cursor) when caught up and every ``idle`` second. Each is a
tick at which the stream writes a heartbeat if the
connection has been silent for ``heartbeat`` seconds, ends if the client has
gone (``probe``) or the server is stopping (:meth:`StreamPool.close_all`), or
the stream's ``max_duration`` is over. A handler that blocks without yielding
cannot be interrupted: yield ``None`` from long waits.

The heartbeat is a promise (comet.framing announces it), so its tick must
not wait for the hub's ``idle``: before each pull, the subscriptions the
handler waits on are told to wake by the next heartbeat at the latest.

:meth:`Stream.close` always reaches the handler: it closes the generator, so
the handler's ``finally`` blocks run and its subscription is released,
whether the stream ended, the client went away, or the server stopped.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Iterator

from .framing import Event, encode_longpoll, longpoll_item
from .hub import Idle, Subscription, subscriptions_recorded
from .options import Options
from .pool import Admission, StreamPool
from .parked import LONGPOLL_MAX_BATCH, inner_subscription

__all__ = ["Stream", "StreamPool", "close_quietly"]

log = logging.getLogger("comet")

#: Minimum seconds between two disconnect probes of one busy stream.
_PROBE_EVERY = 0.25

Probe = Callable[[], bool]


class Stream:
    """One response: the handler's items as bytes for ``options.transport``.

    :func:`comet.pipeline.open_stream` builds it with an admission and primes
    it (a :class:`~comet.errors.CometError` with ``http_status`` becomes a
    4xx); the server then iterates it (streaming transports), or it answers
    with :meth:`longpoll_body`; :meth:`close` ends it.
    """

    def __init__(self, items: Iterable[Any], options: Options, admission: Admission, *,
                 closed: Probe | None = None, resume_id: str | None = None, boundary: str = "") -> None:
        self.options = options
        self.transport = options.transport
        self.boundary = boundary
        self.resume_id = resume_id
        self._items: Iterator[Any] = iter(items)
        self._admission = admission
        self._pool: StreamPool = admission.pool
        self._probe = closed
        self._stopping = False
        self._closed = False
        self._primed = False
        self._pending: list[Any] = []
        #: Subscriptions the handler opened (comet.hub.subscriptions_recorded).
        self._opened: list[Subscription] = []
        self._framing = options.framing
        self._preamble = self._framing.preamble(options.retry, boundary, options.heartbeat)
        now = time.monotonic()
        self._last_write = now
        self._last_probe = now
        self._deadline = now + options.max_duration if options.max_duration else None
        self._heartbeat_bytes = self._framing.heartbeat
        self._idles: dict[int, tuple[Subscription, float]] = {}  # the handler's subscriptions, their own idle
        self.disconnected = False
        self._channel: str | None = items.channel if isinstance(items, Subscription) else None
        #: The last id the client was given, and where the handler stands (its
        #: last Idle tick's cursor): SSE heartbeats tell the second when it
        #: differs (see comet.framing).
        self._given = resume_id
        self._cursor: str | None = items.last_id if isinstance(items, Subscription) else None

    @property
    def channel(self) -> str | None:
        """The hub channel this stream follows, if it can be told: a returned
        subscription, or one a generator was seen doing ``yield from``."""
        return self._channel

    # -- setup --------------------------------------------------------------

    def prime(self) -> None:
        """Run the handler up to its first item, before any header is sent.

        Errors the handler raises here propagate to the adapter, which turns
        a ``CometError`` with ``http_status`` into a 4xx response.
        """
        if self._primed:
            return
        self._primed = True
        if isinstance(self._items, Subscription):
            return  # validated when it was created; pulling now would start thread-mode iteration
        try:
            first = self._next()
            self._pending.append(first)
            if first.__class__ is Idle:
                self._cursor = first.last_id  # (told in the preamble)
            self._see_channel()
        except StopIteration:
            self._stopping = True

    # -- streaming ----------------------------------------------------------

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> bytes:
        if self._preamble:
            chunk, self._preamble = self._preamble, b""
            cursor = self._untold() if self._given is None else None  # (see comet.pipeline.Parking.park)
            if cursor is not None:
                chunk = self._framing.preamble(self.options.retry, self.boundary, self.options.heartbeat, cursor)
            return self._count(chunk)
        while True:
            if self._closed or self._stopping:
                raise StopIteration
            if self._heartbeat_bytes and not self._pending:
                self._wake_by(self._last_write + self.options.heartbeat)
            item = self._pull()
            if item is None or item.__class__ is Idle:
                if item is not None:
                    self._cursor = item.last_id
                now = time.monotonic()
                if self._expired(now):
                    raise StopIteration
                due = now - self._last_write >= self.options.heartbeat
                # A first cursor is told at once, not a heartbeat later.
                if self._heartbeat_bytes and (due or (self._given is None and self._cursor is not None
                                                      and self._framing.beats_cursor)):
                    self._last_write = now
                    if due:
                        self._pool.counters.add("heartbeats")
                    return self._count(self._framing.beat(self.boundary, self.options.heartbeat, self._untold()))
                continue
            try:
                data = self._framing.encode(item, self.boundary, self.options.max_event_bytes)
            except (ValueError, TypeError) as exc:
                # Headers are out: the only safe answer is to end the stream
                # cleanly rather than write something malformed.
                log.error("comet: ending %s stream, cannot encode %r: %s", self.transport, type(item).__name__, exc)
                self._stopping = True
                raise StopIteration from None
            self._last_write = time.monotonic()
            if isinstance(item, Event) and item.id is not None:
                self._given = item.id
            self._pool.counters.add("items")
            return self._count(data)

    def _pull(self) -> Any:
        if self._pending:
            return self._pending.pop()
        try:
            item = self._next()
        except StopIteration:
            self._stopping = True
            raise
        if self._channel is None:
            self._see_channel()
        return item

    def _untold(self) -> str | None:
        """The handler's cursor, if the client has not been given it (SSE
        only); it counts as given from now on."""
        cursor = self._cursor
        if cursor is None or cursor == self._given or not self._framing.beats_cursor:
            return None
        self._given = cursor
        return cursor

    def _wake_by(self, due: float) -> None:
        """Bound the next wait of the subscriptions this thread may block on
        so that the tick for a heartbeat due at *due* comes in time."""
        subs = [self._items] if isinstance(self._items, Subscription) else self._opened
        left = max(0.005, due - time.monotonic())
        for sub in subs:
            key = id(sub)
            if key not in self._idles:
                self._idles[key] = (sub, sub.idle)  # (kept: an id is unique while its object lives)
            sub.idle = min(self._idles[key][1], left)

    def _next(self) -> Any:
        before = subscriptions_recorded(self._opened)
        try:
            return next(self._items)
        finally:
            subscriptions_recorded(before)

    def _see_channel(self) -> None:
        # Only a *suspended* generator shows what it delegates to, so look
        # between items (stats: streams per channel), never from other threads.
        # Its hub is followed, so that shutdown wakes this thread's wait at
        # once rather than at the subscription's next idle tick.
        inner = inner_subscription(self._items)
        if inner is not None:
            self._channel = inner.channel
            self._pool.follow(inner.hub)

    def _count(self, data: bytes) -> bytes:
        self._pool.counters.add("bytes", len(data))
        return data

    def _expired(self, now: float) -> bool:
        """At a tick: has the client gone, the server begun stopping, or the
        stream's time run out?"""
        if self._stopping:
            return True
        if self._deadline is not None and now >= self._deadline:
            return True
        if self._probe is not None and now - self._last_probe >= _PROBE_EVERY:
            self._last_probe = now
            if self._probe():
                self.disconnected = True
                self._pool.counters.add("disconnects")
                return True
        return False

    # -- long-poll ----------------------------------------------------------

    def longpoll_body(self) -> bytes:
        """Wait for at least one item (or ``poll_timeout``), then answer with
        everything available at once and the cursor to send back next time."""
        deadline = time.monotonic() + self.options.poll_timeout
        entries: list[str] = []
        cursor = self.resume_id
        while len(entries) < LONGPOLL_MAX_BATCH and not self._stopping:
            if not self._pending:
                self._wake_by(deadline)  # its empty answer is its heartbeat: on time too
            try:
                item = self._pull()
            except StopIteration:
                break
            if item is None or item.__class__ is Idle:
                if item is not None and (not entries or cursor is None):
                    cursor = item.last_id  # where the subscription stands, even with nothing new
                now = time.monotonic()
                if entries or now >= deadline or self._expired(now):
                    break
                if item is not None and self.resume_id is None:
                    break  # a handshake: a poll without a cursor learns one at once
                continue
            entries.append(longpoll_item(item))
            if isinstance(item, Event) and item.id is not None:
                cursor = item.id
        self._pool.counters.add("items", len(entries))
        body = encode_longpoll(entries, cursor, self.options.poll_timeout)
        self._count(body)
        return body

    # -- ending -------------------------------------------------------------

    def stop(self) -> None:
        """Ask the stream to end at its next tick; safe from any thread."""
        self._stopping = True

    def close(self) -> None:
        """End the stream: close the handler's generator (its ``finally``
        runs) and give back the admission ticket. Idempotent; call it from the
        thread that iterates the stream."""
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        except Exception:  # a handler's finally failing must not leak the ticket
            log.exception("comet: error while closing a stream handler")
        finally:
            self.close_opened()
            self._admission.release()

    def close_opened(self) -> None:
        """Close what the handler subscribed to and left open (a ``for``
        loop does not close what it iterates; ``yield from`` does)."""
        opened, self._opened = self._opened, []
        for sub in opened:
            close_quietly(sub)


def close_quietly(items: Any) -> None:
    """Close what a handler returned when no stream was built around it
    (admission refused it): its ``finally`` or ``on_close`` cleanup runs."""
    close = getattr(items, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("comet: error while closing a refused stream's handler")
