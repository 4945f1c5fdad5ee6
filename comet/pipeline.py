"""Opening a stream, written once for every way in.

The CherryPy handler and tool (:mod:`comet.cherrypy_tool`), the WSGI app
(:mod:`comet.wsgi`) and the accept-time routes (:mod:`comet.fastpath`) are
thin translators around :func:`open_stream`, which does, in order:

1. the method: ``GET`` streams, ``HEAD`` gets the headers alone, ``OPTIONS``
   and anything else never open a stream;
2. admission: a place in the :class:`~comet.pool.StreamPool`
   (``503`` + ``Retry-After`` when full or stopping), held by an
   :class:`~comet.pool.Admission` that releases itself on any error;
3. the handler: called, then run up to its first item, so that bad input it
   finds (a malformed cursor, a ``Forbidden``) is still a plain-text 4xx;
4. how to serve it: *parked* on the writer thread when the server lets comet
   take the connection (cheroot without TLS; every handler shape, long-polls
   included), else in *thread mode* on the request's thread;
5. the headers, and a body the adapter hands to its server.

Errors become a :class:`Refusal` (status, reason, headers) that each adapter
writes in its own way; nothing here knows an HTTP server.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import nullcontext
from http import HTTPStatus
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol

from .errors import CometError
from .framing import content_type, heartbeat_seconds
from .hub import Idle, Step, Subscription, cooperative
from .liveness import watch_peer
from .options import Options
from .pool import Admission, StreamPool
from .stream import Stream, close_quietly
from .parked import News, ParkedStream, StepState, chunk, inner_subscription

__all__ = ["open_stream", "Opened", "Refusal", "Connection", "Parking", "refusal_for", "ALLOW", "OWNED"]

log = logging.getLogger("comet")

#: Seconds the request's thread waits for a generator's first step: errors
#: raised within it are still a 4xx; a first step that takes longer goes on
#: without holding the request's thread.
PRIME_WAIT = 0.1

#: The methods a stream URL answers.
ALLOW = "GET, HEAD, OPTIONS"


class Refusal(Exception):
    """A stream request answered with an error instead: ``status``, a
    plain-text ``reason`` and extra ``headers`` (``Retry-After``, ``Allow``).

    >>> Refusal(405, "a stream answers GET", [("Allow", ALLOW)]).body()
    b'a stream answers GET\\n'
    """

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []

    @property
    def status_line(self) -> str:
        return f"{self.status} {HTTPStatus(self.status).phrase}"

    def body(self) -> bytes:
        return b"" if self.status in (204, 304) else (self.reason + "\n").encode("utf-8")


def refusal_for(exc: BaseException) -> Refusal | None:
    """The answer for an error raised while a stream is being opened, or
    ``None`` for a server bug (the adapter lets it through as a 500).

    >>> from comet.errors import StreamsExhausted
    >>> r = refusal_for(StreamsExhausted("full", retry_after=3))
    >>> r.status, r.headers
    (503, [('Retry-After', '3')])
    """
    if isinstance(exc, Refusal):
        return exc
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, CometError) and exc.http_status is not None:
        headers = [("Retry-After", str(retry_after))] if retry_after is not None else []
        if exc.http_status == 503 and not headers:
            headers = [("Retry-After", "2")]
        return Refusal(exc.http_status, str(exc), headers)
    return None


class Connection(Protocol):
    """What a server adapter offers a stream about its connection
    (``comet.internals.CherootConnection`` is cheroot's)."""

    #: Can the stream take the connection over and park?
    parkable: bool

    def closed(self) -> bool:
        """Has the client gone? (Thread mode polls this at each tick.)"""

    def take(self) -> tuple[socket.socket, bool]:
        """Send the response head now and hand over the socket:
        ``(socket, chunked)``. The server writes nothing more on it."""


class Owned:
    """The connection of a socket comet owns already (a fast route, a
    direct request): parkable, handed to :meth:`Parking.park` by its owner."""

    parkable = True

    def closed(self) -> bool:  # pragma: no cover - parked streams never poll
        return False

    def take(self) -> tuple[socket.socket, bool]:  # pragma: no cover - the owner parks directly
        raise RuntimeError("the owner of this socket parks it")


#: The one :class:`Owned`.
OWNED = Owned()


class Opened:
    """What an adapter sends: ``status`` 200, ``headers`` and ``body`` (an
    iterable of bytes: a :class:`Parking` that parks when first iterated, a
    thread-mode :class:`~comet.stream.Stream`, or a list of bytes)."""

    def __init__(self, headers: list[tuple[str, str]], body: Iterable[bytes], status: int = 200) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def status_line(self) -> str:
        return f"{self.status} {HTTPStatus(self.status).phrase}"


def stream_headers(options: Options, boundary: str, *, parked_longpoll: bool = False) -> list[tuple[str, str]]:
    """Response headers: type, no caching, no proxy buffering, and the
    longest silence the server promises (a long-poll's is its timeout)."""
    headers = [
        ("Content-Type", content_type(options.transport, boundary, options.content_type)),
        ("Cache-Control", "no-cache"),
        # nginx reads this to turn off proxy buffering for this response.
        ("X-Accel-Buffering", "no"),
        ("Comet-Heartbeat", heartbeat_seconds(options.heartbeat if options.framing.streaming else options.poll_timeout)),
    ]
    if parked_longpoll:
        # The writer answers and then closes: say so, so clients do not try
        # to reuse the connection.
        headers.append(("Connection", "close"))
    return headers


def open_stream(call: Callable[[], Any], options: Options, pool: StreamPool, *, method: str = "GET",
                resume_id: str | None = None, connection: Connection | None = None,
                context: Callable[[], ContextManager[Any]] | None = None, first_step_here: bool = False,
                started: Callable[[], None] | None = None) -> Opened:
    """Open one stream: see the module's introduction. Raises
    :class:`Refusal`, or whatever the handler raised that is not an input
    error (the adapter's 500). ``context``, if given, is entered around each
    later step of a parked generator (on a pool thread): the framework's
    per-request state, so the handler's code keeps seeing its own request.
    ``first_step_here``: this thread is a step thread already (a direct
    request, :mod:`comet.direct`): run a generator's first step on it,
    with no hand-off and no :data:`PRIME_WAIT`. ``started``, if given, is
    called once a thread-mode stream's first step is done, before a
    long-poll waits for its answer (the adapter unlocks the user's session).

    >>> from comet import Hub
    >>> hub, pool = Hub(), StreamPool()
    >>> opened = open_stream(lambda: hub.subscribe("news"), Options(transport="longpoll", poll_timeout=0.1), pool)
    >>> opened.status, b"".join(opened.body)
    (200, b'{"events":[],"cursor":"...-0","heartbeat":0.1}')
    >>> open_stream(lambda: None, Options(), pool, method="POST")
    Traceback (most recent call last):
    ...
    comet.pipeline.Refusal: 405 a stream answers GET (and HEAD, OPTIONS)
    """
    method = method.upper()
    boundary = options.framing.boundary(options.boundary)
    if method == "HEAD":
        return Opened(stream_headers(options, boundary), [])
    if method == "OPTIONS":
        raise Refusal(204, "", [("Allow", ALLOW)])
    if method != "GET":
        raise Refusal(405, "a stream answers GET (and HEAD, OPTIONS)", [("Allow", ALLOW)])
    park = connection is not None and connection.parkable and options.mode == "auto"
    items: Any = None
    stream: Stream | None = None
    restore: Callable[[], None] | None = None
    try:
        with pool.admit(options.transport) as admission:
            items = call()
            if park:
                assert connection is not None
                body: Iterable[bytes] = Parking(items, options, admission, boundary, resume_id, connection, context,
                                                first_step_here)
                headers = stream_headers(options, boundary, parked_longpoll=not options.framing.streaming)
            else:
                # (a thread-mode stream's socket, when the server shows it: TLS included)
                restore = watch_peer(getattr(connection, "tcp_socket", None), options.heartbeat)
                stream = Stream(items, options, admission, closed=connection.closed if connection else None,
                                resume_id=resume_id, boundary=boundary)
                stream.prime()
                if started is not None:
                    started()
                admission.thread(stream)
                headers = stream_headers(options, boundary)
                if not options.framing.streaming:
                    try:
                        answer = stream.longpoll_body()
                    finally:
                        stream.close()
                        restore()
                    body = [answer]
                    headers.append(("Content-Length", str(len(answer))))
                else:
                    body = _Restoring(stream, restore)
            admission.hand_over()
    except Exception as exc:
        close_quietly(items)
        if stream is not None:
            stream.close_opened()  # what the handler subscribed to before it failed or was refused
        if restore is not None:
            restore()  # (the refusal goes out on a connection that may be kept alive)
        refusal = refusal_for(exc)
        if refusal is None:
            raise
        raise refusal from None
    if isinstance(items, Subscription):
        pool.follow(items.hub)
    return Opened(headers, body)


class _Restoring:
    """A thread-mode stream as the body: closing it also gives the socket
    back the options it had before :func:`~comet.liveness.watch_peer`. The
    connection outlives the stream when it is kept alive, and closing it
    instead would cost a long-poll client a new TCP (and, in thread mode,
    often TLS) handshake per poll."""

    def __init__(self, stream: Stream, restore: Callable[[], None]) -> None:
        self.stream = stream
        self._restore = restore

    def __iter__(self) -> "_Restoring":
        return self

    def __next__(self) -> bytes:
        return next(self.stream)

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self._restore()


class Parking:
    """The body of a stream to park: iterated once by the server (after the
    headers are set), it takes the connection over, hands the stream to the
    writer thread and ends, freeing the server's thread. ``park()`` does the
    same for a socket comet already owns (a fast route).

    A generator handler's first step (up to its first item) runs on the
    step pool while the request's thread waits up to :data:`PRIME_WAIT`
    seconds: errors it raises at once are still answered as 4xx, and one
    that blocks before its first item (a slow query) does not hold a server
    thread: its stream opens and the step goes on, as later ones do.
    """

    def __init__(self, items: Any, options: Options, admission: Admission, boundary: str, resume_id: str | None,
                 connection: Connection | None, context: Callable[[], ContextManager[Any]] | None = None,
                 first_step_here: bool = False) -> None:
        self.context = context
        self.options = options
        self.admission = admission
        self.boundary = boundary
        self.resume_id = resume_id
        self.connection = connection
        self.transport = options.transport
        self._sub: Subscription | None = None
        self._gen: Any = None
        self._first: list[Any] = []
        self._done = False
        self._lock = threading.Lock()
        self._late = False  # the first step outlasted PRIME_WAIT: it finishes on its own
        self._outcome: tuple[News, Any, Subscription | None] | None = None
        self._stream: ParkedStream | None = None
        self._abandoned = False
        self._channel: str | None = None
        self._first_opened: Subscription | list[Subscription] | None = None  # what its first step subscribed to
        self._cursor: str | None = None  # of an Idle tick its first step passed on
        if isinstance(items, Subscription):
            self._sub = items
            self._channel = items.channel
            self.context = None  # no handler code runs later: the request need not stay
        elif hasattr(items, "__next__") and hasattr(items, "send"):  # a generator
            self._gen = items
        else:  # any other iterable: a list, a tuple, an iterator over them; its items need no waiting
            self._gen = _as_generator(items)
        admission.park(self)  # counted (and capped) from now: the handler's first step may look at stats
        if self._gen is not None:
            if first_step_here:
                self._apply(self._first_step(enter=False))
            else:
                self._prime()

    @property
    def channel(self) -> str | None:
        return self._channel

    @property
    def late(self) -> bool:
        """Did the handler's first step outlast :data:`PRIME_WAIT` (it is
        still running, or finished after the response started)?"""
        return self._late

    def _prime(self) -> None:
        writer = self.admission.pool.writer()
        if writer is None:  # stopping: nothing else to run it on
            self._apply(self._first_step())
            return
        ready = threading.Event()

        def first_step() -> None:
            outcome = self._first_step()
            with self._lock:  # invariant I11: who takes the outcome is decided here
                self._outcome = outcome
                late, stream, abandoned = self._late, self._stream, self._abandoned
            if not late:
                ready.set()
            elif abandoned:
                self._release()
            elif stream is not None:
                self._deliver(outcome, stream)
            # else: park() is on its way and delivers it

        writer.steps.submit(first_step)
        if not ready.wait(PRIME_WAIT):
            with self._lock:
                if self._outcome is None:
                    self._late = True
                    return
        assert self._outcome is not None
        self._apply(self._outcome)

    def _first_step(self, enter: bool = True) -> tuple[News, Any, Subscription | None]:
        # enter=False: this is the request's own thread, in its context already.
        step: Step[Subscription] = Step()
        with (self.context() if enter and self.context is not None else nullcontext()), cooperative(step):
            try:
                first = next(self._gen)
            except StopIteration:
                self._first_opened = step.opened
                return News.FINISHED, None, step.blocked
            except BaseException as exc:
                self._first_opened = step.opened
                return News.FAILED, exc, step.blocked
        self._first_opened = step.opened  # closed with the generator, should it leave them open
        return News.ITEM, first, step.blocked or inner_subscription(self._gen)

    def _apply(self, outcome: tuple[News, Any, Subscription | None]) -> None:
        """The first step's outcome, in time to shape the response."""
        kind, value, sub = outcome
        if kind is News.FINISHED or kind is News.FAILED:
            close_quietly(self._gen)
            self._gen = None
            close_quietly(sub)  # what it iterated or opened, if a for loop left it open
            self._close_first_opened()
            if kind is News.FAILED:
                raise value
            return
        if sub is not None:
            self._channel = sub.channel
        if value.__class__ is Idle:
            self._cursor = value.last_id  # (a generator that starts with ``yield from`` a subscription)
        elif value is not None:
            self._first.append(value)

    def _deliver(self, outcome: tuple[News, Any, Subscription | None], stream: ParkedStream) -> None:
        """A late first step's outcome, to the writer as a step's would be."""
        writer = self.admission.pool.writer()
        kind, value, sub = outcome
        if writer is None or stream.done:
            self._release()  # stopping, or ended meanwhile: the stream is closed; let the handler go
            return
        opened, self._first_opened = self._first_opened, None
        if opened is not None:
            stream.adopt(opened)  # (the writer waits for this outcome: nothing else touches the stream)
        if kind is News.FAILED:
            log.error("comet: a stream handler failed before its first item", exc_info=value)
            writer.post(stream, News.FAILED, sub)
        elif kind is News.FINISHED:
            writer.post(stream, News.FINISHED, sub)
        else:
            if sub is not None:
                stream.hint = sub.channel
            if value is not None and value.__class__ is not Idle:
                writer.post(stream, News.ITEM, value)
            writer.post(stream, News.AGAIN, sub)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        assert self.connection is not None
        sock, chunked = self.connection.take()
        self.park(sock, chunked)
        raise StopIteration

    def park(self, sock: socket.socket, chunked: bool, head: bytes = b"", step_here: bool = False) -> None:
        """Hand the stream to the writer: *head* (a response head comet
        writes itself), the preamble, then the stream. ``step_here``: this
        thread is a step thread (a direct request): it runs a generator's
        next step itself, up to its wait on a hub, instead of handing it to
        another thread (the step the writer would have started at once)."""
        self._done = True
        options = self.options
        watch_peer(sock, options.heartbeat)  # a client that vanishes is noticed (comet.liveness)
        deadline = time.monotonic() + options.max_duration if options.max_duration else None
        longpoll = None if options.framing.streaming else options.poll_timeout
        # (a long-poll's heartbeat is its poll_timeout: what its answer announces)
        stream = ParkedStream(sock, self.transport, self.boundary, chunked, longpoll or options.heartbeat, deadline,
                              options.max_event_bytes, self.admission, sub=self._sub, gen=self._gen,
                              longpoll=longpoll, cursor=self.resume_id)
        stream.initial = self._first
        if self._first_opened is not None and self._gen is not None and not self._late:
            stream.adopt(self._first_opened)  # (a late first step's come with its outcome)
        stream.hint = self._channel
        stream.context = self.context
        if self._late:
            stream.step_state = StepState.FIRST  # still running: the writer waits for its outcome
        self.admission.served_by(stream)
        # The stream's cursor in its announcement when the client has none
        # yet (comet.framing): a reconnect a second later resumes there. (A
        # client that resumed has one; a gap it may get next carries its own.)
        cursor = self._sub.last_id if self._sub is not None else self._cursor
        stream.known = self._cursor
        if cursor is not None and self.resume_id is None and options.framing.beats_cursor:
            stream.given = cursor
        else:
            cursor = None
        start = options.framing.preamble(options.retry, self.boundary, options.heartbeat, cursor)
        if head or start:
            stream.queue(head + ((chunk(start) if chunked else start) if start else b""))
        if self._sub is not None:
            self._sub.start()
        writer = self.admission.pool.writer()
        if writer is None:  # stopping: end it as the writer would have
            stream.close_socket()
            self._done = False
            self.close()
            return
        stepping_here = step_here and self._gen is not None and not self._late
        if stepping_here:
            stream.step_state = StepState.RUNNING  # the writer starts no step of its own
            stream.step = Step()
        writer.park(stream)
        if stepping_here:
            writer.step_here(stream)  # (a direct request's thread is in its context still)
        if self._late:
            with self._lock:
                self._stream = stream
                outcome = self._outcome
            if outcome is not None:
                self._deliver(outcome, stream)

    def close(self) -> None:
        """The server is done with the body: if it was never parked (the
        client went away first, an error), release everything."""
        if not self._done:
            self._done = True
            with self._lock:
                if self._late and self._outcome is None:
                    self._abandoned = True  # the first step releases everything when it returns
                    return
            self._release()

    def _release(self) -> None:
        try:
            with self.context() if self.context is not None and self._gen is not None else nullcontext():
                close_quietly(self._gen if self._gen is not None else self._sub)
                self._close_first_opened()
        finally:
            self.admission.release()

    def _close_first_opened(self) -> None:
        opened, self._first_opened = self._first_opened, None
        for sub in opened if isinstance(opened, list) else (opened,):
            close_quietly(sub)

    def stop(self) -> None:
        """Nothing to do before it is parked; the writer ends it after."""


def _as_generator(items: Iterable[Any]) -> Iterator[Any]:
    yield from items
