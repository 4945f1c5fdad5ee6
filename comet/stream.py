"""Streams: a handler's generator turned into response bytes, engine-agnostic.

A :class:`Stream` wraps the generator a handler returns. It is primed before
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

:meth:`Stream.close` always reaches the handler: it closes the generator, so
the handler's ``finally`` blocks run and its subscription is released,
whether the stream ended, the client went away, or the server stopped.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from .counters import Counters
from .errors import CometError, StreamsExhausted
from .framing import content_type, encode_item, encode_longpoll, heartbeat, longpoll_item, new_boundary, preamble
from .framing import Event
from .hub import Idle, Subscription
from .options import Options

__all__ = ["Stream", "StreamPool"]

log = logging.getLogger("comet")

#: At most this many items go into one long-poll answer.
LONGPOLL_MAX_BATCH = 1000
#: Minimum seconds between two disconnect probes of one busy stream.
_PROBE_EVERY = 0.25

Probe = Callable[[], bool]
#: Takes the connection over from the server once headers are out: returns
#: ``(socket, chunked)`` or ``None`` when this connection cannot be parked.
Handoff = Callable[[], "tuple[Any, bool] | None"]

#: Default cap on parked streams per process (each is one socket, ~10 KB).
DEFAULT_MAX_PARKED = 20_000


class StreamPool:
    """Open streams of one server: admission control, counters, shutdown.

    Every stream holds a server worker thread while it is open (thread mode),
    so ``max_streams`` must stay below the server's thread pool or ordinary
    pages stop being served. Beyond the cap :meth:`admit` raises
    :class:`~comet.errors.StreamsExhausted` and adapters answer ``503`` with
    ``Retry-After: retry_after``.

    >>> pool = StreamPool(max_streams=1)
    >>> ticket = pool.admit("sse")
    >>> pool.attach(ticket, object())  # its handler returned a generator: it keeps the thread
    >>> pool.admit("sse")
    Traceback (most recent call last):
    ...
    comet.errors.StreamsExhausted: too many open streams (1 of 1); retry later
    >>> pool.release(ticket)
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
        self._open: dict[int, "Stream | None"] = {}
        self._parked: set[int] = set()
        self._setup: set[int] = set()
        self._parker: Any = None
        self._next = 0
        #: What happened since start (``comet.stats`` shows it): streams
        #: opened, closed, refused (admission) and parked, client disconnects,
        #: heartbeats, items (events and parts) and bytes written, slow
        #: consumers dropped, and streams opened by a fast route at accept
        #: time or through its WSGI middleware (``comet.fastpath``).
        self.counters = Counters(("opened", "closed", "refused", "parked", "disconnects", "heartbeats", "items", "bytes",
                                  "slow_consumers", "routed_fast", "routed_wsgi", "forbidden"))
        self.stopping = False

    def admit(self, transport: str) -> int:
        """Reserve a place for one stream, or raise ``StreamsExhausted``.

        Checks the thread cap: a stream holds a server thread at least while
        its handler runs. :meth:`attach` checks again once it is known
        whether the stream will be parked (which then counts against
        ``max_parked`` only).
        """
        with self._cond:
            self._check(parkable=False, own=0)
            self._next += 1
            self._open[self._next] = None
            self._setup.add(self._next)
            self.counters.add("opened")
            return self._next

    def _check(self, parkable: bool, own: int) -> None:
        # Threaded streams hold a thread for life; streams still being set up
        # (handler running) hold one for a moment and count only at admit.
        # ``own`` discounts the caller's own place when re-checking.
        if parkable:
            if len(self._parked) >= self.max_parked > 0:
                self.counters.add("refused")
                raise StreamsExhausted(f"too many open streams ({len(self._parked)} parked of {self.max_parked}); "
                                       "retry later", self.retry_after)
            return
        threaded = len(self._open) - len(self._parked) - len(self._setup) - own
        if self.max_streams is not None and threaded >= self.max_streams:
            self.counters.add("refused")
            raise StreamsExhausted(f"too many open streams ({threaded} of {self.max_streams}); retry later", self.retry_after)

    def attach(self, ticket: int, stream: "Stream", parkable: bool = False) -> None:
        """Register the stream for *ticket*. A stream that will be parked is
        re-checked against ``max_parked`` (raising ``StreamsExhausted`` and
        releasing the ticket when full)."""
        with self._cond:
            self._setup.discard(ticket)
            try:
                self._check(parkable, own=0 if parkable else 1)
            except StreamsExhausted:
                self._open.pop(ticket, None)
                self._cond.notify_all()
                raise
            if parkable:
                self._parked.add(ticket)  # counts as parked from now: it holds no thread for long
            if ticket in self._open:
                self._open[ticket] = stream
        if self.stopping:
            stream.stop()

    def release(self, ticket: int) -> None:
        with self._cond:
            if self._open.pop(ticket, False) is not False:
                self.counters.add("closed")
            self._parked.discard(ticket)
            self._setup.discard(ticket)
            self._cond.notify_all()

    def park(self, ticket: int, stream: Any) -> None:
        """Move an admitted stream to the parked writer; its thread is free.

        While the pool is stopping (:meth:`close_all` ran) no writer is
        started: the stream is ended at once, as the writer would have.
        """
        from .parked import Parker, end_parked

        with self._cond:
            self._parked.add(ticket)
            self.counters.add("parked")
            parker = None
            if not self.stopping:
                if self._parker is None:
                    self._parker = Parker(self)
                parker = self._parker
        if parker is None:
            end_parked(self, stream, final=True)
        else:
            parker.park(stream)

    def unpark(self, ticket: int) -> None:
        """The hand-off declined at the last moment: the stream keeps its thread."""
        with self._cond:
            self._parked.discard(ticket)

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
        """Ask every open stream to end at its next tick (server stopping).

        Callable from any thread: it only raises flags; each stream's own
        thread closes its generator.
        """
        self.stopping = True
        with self._cond:
            streams = [s for s in self._open.values() if s is not None]
            parker, self._parker = self._parker, None
        for stream in streams:
            stream.stop()
        if parker is not None:
            parker.stop()

    def reopen(self) -> None:
        """Admit streams again after :meth:`close_all` (engine restart)."""
        self.stopping = False


class Stream:
    """One response: the handler's items as bytes for ``options.transport``.

    Adapters do: ``admit`` a ticket, build the stream, :meth:`prime` it (a
    :class:`~comet.errors.CometError` with ``http_status`` becomes a 4xx),
    send :meth:`headers`, then either iterate it (streaming transports) or
    send :meth:`longpoll_body`, and finally :meth:`close` it.
    """

    def __init__(self, items: Iterable[Any], options: Options, pool: StreamPool, ticket: int, *,
                 probe: Probe | None = None, resume_id: str | None = None, handoff: Handoff | None = None) -> None:
        self.options = options
        self.transport = options.transport
        self.boundary = options.boundary or (new_boundary() if options.transport == "multipart" else "")
        self.resume_id = resume_id
        self._items: Iterator[Any] = iter(items)
        self._pool = pool
        self._ticket = ticket
        self._probe = probe
        self._stopping = False
        self._closed = False
        self._primed = False
        self._pending: list[Any] = []
        self._preamble = preamble(self.transport, options.retry)
        now = time.monotonic()
        self._last_write = now
        self._last_probe = now
        self._deadline = now + options.max_duration if options.max_duration else None
        self._heartbeat_bytes = heartbeat(self.transport)
        self.disconnected = False
        self.parked = False
        self._channel: str | None = items.channel if isinstance(items, Subscription) else None
        # Only a hub Subscription can be parked: it never blocks, and the
        # writer thread reads it with take(). Generators keep their thread.
        self._handoff = handoff if (isinstance(items, Subscription) and options.mode == "auto"
                                    and self.transport != "longpoll") else None
        pool.attach(ticket, self, parkable=self._handoff is not None)

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
            self._pending.append(next(self._items))
            self._see_channel()
        except StopIteration:
            self._stopping = True

    def headers(self) -> list[tuple[str, str]]:
        """Response headers: type, no caching, no proxy buffering."""
        return [
            ("Content-Type", content_type(self.transport, self.boundary, self.options.content_type)),
            ("Cache-Control", "no-cache"),
            # nginx reads this to turn off proxy buffering for this response.
            ("X-Accel-Buffering", "no"),
        ]

    # -- streaming ----------------------------------------------------------

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> bytes:
        if self._preamble:
            chunk, self._preamble = self._preamble, b""
            return self._count(chunk)
        if self._handoff is not None:
            handoff, self._handoff = self._handoff, None
            if self._park(handoff):
                raise StopIteration
        while True:
            if self._closed or self._stopping:
                raise StopIteration
            item = self._pull()
            if item is None or item.__class__ is Idle:
                now = time.monotonic()
                if self._expired(now):
                    raise StopIteration
                if now - self._last_write >= self.options.heartbeat and self._heartbeat_bytes:
                    self._last_write = now
                    self._pool.counters.add("heartbeats")
                    return self._count(self._heartbeat_bytes)
                continue
            try:
                data = encode_item(item, self.transport, self.boundary, self.options.max_event_bytes)
            except (ValueError, TypeError) as exc:
                # Headers are out: the only safe answer is to end the stream
                # cleanly rather than write something malformed.
                log.error("comet: ending %s stream, cannot encode %r: %s", self.transport, type(item).__name__, exc)
                self._stopping = True
                raise StopIteration from None
            self._last_write = time.monotonic()
            self._pool.counters.add("items")
            return self._count(data)

    def _park(self, handoff: Handoff) -> bool:
        """Headers and preamble are out: give the connection to the writer
        thread and let the server thread go."""
        taken = handoff()
        if taken is None:
            self._pool.unpark(self._ticket)
            return False
        from .parked import ParkedStream

        sock, chunked = taken
        options = self.options
        deadline = time.monotonic() + options.max_duration if options.max_duration else None
        self.parked = True
        self._items.start()
        self._pool.park(self._ticket, ParkedStream(sock, self._items, self.transport, self.boundary, chunked,
                                                   options.heartbeat, deadline, options.max_event_bytes, self._ticket))
        return True

    def _pull(self) -> Any:
        if self._pending:
            return self._pending.pop()
        try:
            item = next(self._items)
        except StopIteration:
            self._stopping = True
            raise
        if self._channel is None:
            self._see_channel()
        return item

    def _see_channel(self) -> None:
        # Only a *suspended* generator shows what it delegates to, so look
        # between items (stats: streams per channel), never from other threads.
        inner = getattr(self._items, "gi_yieldfrom", None)
        if isinstance(inner, Subscription):
            self._channel = inner.channel

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
            try:
                item = self._pull()
            except StopIteration:
                break
            if item is None or item.__class__ is Idle:
                if item is not None and not entries:
                    cursor = item.last_id  # where the subscription stands, even with nothing new
                now = time.monotonic()
                if entries or now >= deadline or self._expired(now):
                    break
                continue
            entries.append(longpoll_item(item))
            if isinstance(item, Event) and item.id is not None:
                cursor = item.id
        self._pool.counters.add("items", len(entries))
        body = encode_longpoll(entries, cursor)
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
        if self.parked:
            return  # the writer thread owns the subscription and the ticket now
        try:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        except Exception:  # a handler's finally failing must not leak the ticket
            log.exception("comet: error while closing a stream handler")
        finally:
            self._pool.release(self._ticket)


def _close_quietly(items: Any) -> None:
    """Close what a handler returned when no stream was built around it
    (admission refused it): its ``finally`` or ``on_close`` cleanup runs."""
    close = getattr(items, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("comet: error while closing a refused stream's handler")


def http_error(exc: BaseException) -> tuple[int, str] | None:
    """``(status, reason)`` for errors that describe bad input, else ``None``."""
    if isinstance(exc, CometError) and exc.http_status is not None:
        return exc.http_status, str(exc)
    return None
