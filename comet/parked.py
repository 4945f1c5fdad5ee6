"""A parked stream: one response the writer thread serves, and its words.

:class:`ParkedStream` holds a parked response's socket, what feeds it (a
subscription read in place, or a generator run in steps) and its output
buffer. Its life is a :class:`Phase` (open, closing, done) that only moves
forward; :class:`End` says why it ends (:meth:`comet.writer.Writer.end` is
the one way it does), and :class:`News` what a step of its generator
reports to the writer. The small functions below are what several of the
writer's parts share: the chunk framing, a long-poll's answer, the cursor a
client has not been told, and how to tell that a generator delegates to a
subscription.
"""
from __future__ import annotations

import collections
import enum
import logging
import socket
import threading
import time
from typing import Any, Callable, ContextManager, Generator, Iterator, Protocol, Sequence

from .framing import FRAMINGS, Event, encode_longpoll
from .hub import Step, Subscription

__all__ = ["ParkedStream", "LongPoll", "Phase", "End", "News", "StepState", "Place", "GRACEFUL", "LONGPOLL_MAX_BATCH", "STEP_BUDGET",
           "STEP_HIGH_WATER", "STEP_HIGH_ITEMS", "chunk", "answer_bytes", "untold", "last_event_id",
           "inner_subscription", "delegates_to", "close_generator"]

log = logging.getLogger("comet")

#: At most this many items go into one long-poll answer.
LONGPOLL_MAX_BATCH = 1000
#: Items one step may produce before it yields its pool thread to others.
STEP_BUDGET = 64
#: A generator's unsent output above which its steps pause (bytes, items);
#: and a latest-value stream's, above which it is not read (Hub.latest).
STEP_HIGH_WATER = 256 * 1024
STEP_HIGH_ITEMS = 1024

def chunk(payload: bytes) -> bytes:
    """*payload* as one HTTP/1.1 chunk.

    >>> chunk(b"hi")
    b'2\\r\\nhi\\r\\n'
    """
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Phase(enum.Enum):
    """Where a parked stream is in its life; it only moves forward."""

    #: Fed and written.
    OPEN = "open"
    #: Its last bytes are queued (a long-poll's answer, the terminating
    #: chunk): nothing more goes in, and it is closed once they are out.
    CLOSING = "closing"
    #: Its socket is closed and what fed it let go (or being let go).
    DONE = "done"


class End(enum.Enum):
    """Why a parked stream ends: :meth:`comet.writer.Writer.end` takes one, and it says how.

    ``FINISHED``, ``TIMED_OUT``, ``ANSWERED`` and ``UNENCODABLE`` end the
    response properly (:data:`GRACEFUL`): what is queued goes out, then the
    terminating chunk (a long-poll: its answer), then the socket closes.
    ``SENT``, ``GONE``, ``SLOW``, ``FAILED`` and ``STOPPING`` close it at
    once. ``ORPHANED`` is the writer gone, and ``STEPPED`` the release a
    running step left to its news. Whatever the reason, what fed the stream
    is let go once no step runs, and its place in the pool given back.
    """

    #: What fed it ended: its subscription, or its handler returned.
    FINISHED = "finished"
    #: ``max_duration`` passed, or a long-poll's ``poll_timeout``.
    TIMED_OUT = "timed out"
    #: A long-poll has its answer (items, or its first cursor).
    ANSWERED = "answered"
    #: An item cannot be encoded: headers are out, so end cleanly rather
    #: than write something malformed.
    UNENCODABLE = "unencodable"
    #: Its last bytes are out.
    SENT = "sent"
    #: The client went away (EOF, a failed send, a socket already closed).
    GONE = "gone"
    #: The client reads too slowly: its backlog passed ``max_buffer``.
    SLOW = "slow"
    #: Its handler or its subscription's view failed (or a long-poll's item
    #: cannot be encoded).
    FAILED = "failed"
    #: The writer is stopping: the response ends properly as far as the
    #: socket takes it without waiting.
    STOPPING = "stopping"
    #: The writer has exited already: ended on the caller's thread (a step
    #: that returned after it, a ``park()`` that came too late).
    ORPHANED = "orphaned"
    #: Not a new end: a step that was running when its stream ended has
    #: returned, and what fed the stream can be let go now.
    STEPPED = "stepped"


#: The reasons that end a response properly rather than at once.
GRACEFUL = frozenset({End.FINISHED, End.TIMED_OUT, End.ANSWERED, End.UNENCODABLE})


class StepState(enum.Enum):
    """Whether a parked generator is being run, and by what."""

    #: Suspended (or no generator): the writer may start a step.
    IDLE = "idle"
    #: A step runs on a pool thread (``ParkedStream.step``): its news ends it.
    RUNNING = "running"
    #: Its first step, begun before the stream parked, outlasted
    #: ``comet.pipeline.PRIME_WAIT`` and still runs: its outcome comes as news.
    FIRST = "first"
    #: Its generator is being closed on a pool thread; no step starts again.
    CLOSING = "closing"


class News(enum.Enum):
    """What a generator's step reports to the writer, in order, with a value.

    ``ITEM`` and ``CURSOR`` come while it runs; exactly one of the others
    ends each step.
    """

    #: An item the generator produced.
    ITEM = "item"
    #: The cursor of an ``Idle`` tick it passed on (long-polls: where it stands).
    CURSOR = "cursor"
    #: Suspended, not waiting on a hub (it used its budget, or its own code
    #: yielded "nothing yet"): step it again. Value: the subscription it
    #: waited on in place, if any.
    AGAIN = "again"
    #: Suspended waiting on a hub. Value: ``(subscription, direct, cursor)``.
    WAITING = "waiting"
    #: It returned. Value: as for ``AGAIN``.
    FINISHED = "finished"
    #: It raised. Value: as for ``AGAIN``.
    FAILED = "failed"
    #: Its stream ended while it ran: the step closed it. Value: as for ``AGAIN``.
    CANCELLED = "cancelled"


class LongPoll:
    """A parked long-poll's answer while it is gathered: the items (at most
    :data:`LONGPOLL_MAX_BATCH`), the cursor its client sends back next time,
    and when it answers at the latest.

    >>> poll = LongPoll(deadline=0.0, cursor=None)
    >>> poll.stands_at("e-1"); poll.ready, poll.cursor
    (True, 'e-1')
    """

    __slots__ = ("deadline", "entries", "cursor", "handshake")

    def __init__(self, deadline: float, cursor: str | None) -> None:
        self.deadline = deadline
        self.entries: list[str] = []
        self.cursor = cursor
        #: A long-poll without a cursor answers once it knows one (with what is
        #: ready): the client's next poll starts exactly there.
        self.handshake = cursor is None

    @property
    def full(self) -> bool:
        return len(self.entries) >= LONGPOLL_MAX_BATCH

    @property
    def ready(self) -> bool:
        """Something to answer with now: items, or a handshake's cursor."""
        return bool(self.entries) or self.handshake

    def stands_at(self, cursor: str | None) -> None:
        """Where its subscription stands: the cursor to answer with, unless
        items gathered already carry one (the client resumes after them)."""
        if not self.entries or self.cursor is None:
            self.cursor = cursor

    def answer(self, heartbeat: float) -> bytes:
        """The answer's body (its heartbeat is its ``poll_timeout``)."""
        return encode_longpoll(self.entries, self.cursor, heartbeat)


class Place(Protocol):
    """A stream's place in its pool (:class:`comet.pool.Admission`)."""

    def release(self) -> None:
        """Give the place back (idempotent, from any thread)."""


class ParkedStream:
    """One parked response: its socket, what feeds it, and its output buffer.

    Fed by ``sub`` (a returned subscription), or by ``gen`` (a generator run
    in steps; ``sub`` is then the subscription it waits on, and ``direct``
    says the generator is suspended in ``yield from sub``, so the writer
    may read ``sub`` in its place).
    """

    __slots__ = ("sock", "sub", "gen", "transport", "boundary", "chunked", "heartbeat", "beat", "deadline",
                 "max_bytes", "admission", "out", "out_size", "last_write", "writing", "phase", "key", "direct",
                 "step_state", "step", "inbox_items", "drained", "poll", "due", "initial", "news", "hint", "shut",
                 "framing", "context", "paused", "earlier", "timer", "given", "known", "__weakref__")

    def __init__(self, sock: socket.socket, transport: str, boundary: str, chunked: bool, heartbeat_every: float,
                 deadline: float | None, max_bytes: int, admission: Place, *, sub: Subscription | None = None,
                 gen: Generator[Any, None, Any] | None = None, longpoll: float | None = None,
                 cursor: str | None = None) -> None:
        self.sock = sock
        self.sub = sub
        self.gen = gen
        self.transport = transport
        self.boundary = boundary
        self.chunked = chunked
        self.heartbeat = heartbeat_every
        self.framing = FRAMINGS[transport]
        #: Entered around each step of the generator: the framework's
        #: per-request state (CherryPy's ``cherrypy.request``) for its code.
        self.context: Callable[[], ContextManager[Any]] | None = None
        self.beat = self.framing.heartbeat
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.admission = admission
        self.out: collections.deque[bytes | memoryview] = collections.deque()
        self.out_size = 0
        self.last_write = time.monotonic()
        self.writing = False
        self.phase = Phase.OPEN
        self.key: tuple[int, str] | None = None
        self.direct = gen is None and sub is not None
        self.step_state = StepState.IDLE
        self.step: Step[Subscription] | None = None
        self.inbox_items = 0  # produced by a step, not yet taken by the writer (under the mailbox's lock)
        #: Set by the writer as a generator's backlog drains; made by the
        #: first step that has to wait for that (most never do).
        self.drained: threading.Event | None = None
        #: A long-poll's answer as it is gathered (None: a streaming
        #: transport, or a long-poll answered already).
        self.poll = None if longpoll is None else LongPoll(time.monotonic() + longpoll, cursor)
        self.due = 0.0
        self.initial: Sequence[Any] = ()  # items a generator produced before it was parked
        #: What its steps reported while the stream waited to be taken by the
        #: writer (under the mailbox's lock; None once taken): it comes with
        #: the stream, without a wake-up of its own.
        self.news: list[tuple[ParkedStream, News, Any]] | None = None
        self.hint: str | None = None  # its channel, seen before its first step
        self.shut = False  # the socket is closed (under _SHUT)
        self.paused = False  # a latest-value stream left unread until its backlog drains
        #: Subscriptions the generator waited on before ``sub`` and left open
        #: (it broke out of a ``for`` over one): closed with the generator.
        self.earlier: list[Subscription] | None = None
        #: Its entry in the writer's timer heap, ``[due, serial, stream]``.
        self.timer: list[Any] | None = None
        #: The last id its client was given (its resume id, an event's, a
        #: heartbeat's): SSE heartbeats tell a cursor past it (comet.framing).
        self.given = cursor
        #: Where a generator that is not read in place stands: the cursor of
        #: the last ``Idle`` tick it passed on (None: it passed none).
        self.known: str | None = None

    def bounded(self) -> bool:
        """Read in place of its stream from a latest-value subscription: when
        its client is slow it waits unread (and then catches up with the
        newest value of each key) rather than being disconnected."""
        return self.direct and self.sub is not None and self.sub.bounded()

    @property
    def done(self) -> bool:
        """Its socket is closed (:attr:`Phase.DONE`)."""
        return self.phase is Phase.DONE

    @property
    def channel(self) -> str | None:
        """The channel this stream follows, as far as can be told (stats)."""
        if self.sub is not None:
            return self.sub.channel
        return self.hint

    def waits_on(self, sub: Subscription) -> None:
        """The generator now waits on *sub*; one it waited on before stays
        its own to close (a ``for`` loop it broke out of does not close
        it, and the generator may come back to it)."""
        old, self.sub = self.sub, sub
        if old is not None and old is not sub:
            self.owns(old)

    def adopt(self, opened: Subscription | list[Subscription]) -> None:
        """What a step subscribed to (``Step.opened``) is the generator's:
        closed with it, should it not close it itself."""
        for sub in opened if isinstance(opened, list) else (opened,):
            if self.sub is None:
                self.sub = sub  # (until it waits on one: usually this one)
            else:
                self.owns(sub)

    def owns(self, sub: Subscription) -> None:
        """*sub* was iterated by the generator: close it with the generator
        if it is still open then."""
        if sub is self.sub or sub.closed:
            return
        earlier = [s for s in self.earlier if not s.closed and s is not sub] if self.earlier else []
        earlier.append(sub)
        self.earlier = earlier

    def queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)

    def next_due(self) -> float:
        """When the timer heap should look at this stream again."""
        due = self.last_write + self.heartbeat if self.beat and self.poll is None else float("inf")
        if self.deadline is not None:
            due = min(due, self.deadline)
        if self.poll is not None:
            due = min(due, self.poll.deadline)
        return due

    def close_socket(self, final: bool = True, last: bool = True) -> None:
        """Close its socket (once, whichever thread gets here first): with
        ``last``, first end the response properly (a long-poll's answer, the
        terminating chunk); with ``final``, send what is queued, as far as
        the socket takes it without blocking. :meth:`comet.writer.Writer.end` calls it;
        so does a stream that never reached a writer (it was stopping)."""
        with _SHUT:  # invariant I9: at shutdown a step thread and the writer may both get here
            if self.shut:
                return
            self.shut = True
        sock = self.sock
        if last:
            if self.poll is not None:
                self.queue(answer_bytes(self))
            elif self.chunked:
                self.queue(b"0\r\n\r\n")  # the client may reconnect at once
        try:
            if final:
                sock.setblocking(False)
                while self.out:
                    data = self.out[0]
                    sent = sock.send(data)
                    if sent < len(data):
                        break
                    self.out.popleft()
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        self.out.clear()
        self.out_size = 0
        if self.drained is not None:
            self.drained.set()

    def close_subscriptions(self) -> None:
        """Close the subscriptions its generator waited on. One closed in
        ``yield from sub`` closed it already; one that iterated it in a
        ``for`` loop did not, and nothing else would: the hub would count it
        open, and its ``on_close`` callbacks (presence) would never run."""
        subs = [*self.earlier, self.sub] if self.earlier else [self.sub]
        self.earlier = None
        for sub in subs:
            if sub is not None:
                try:
                    sub.close()
                except Exception:
                    log.exception("comet: closing a parked subscription failed")

    def wake_step(self) -> None:
        """A step blocked in a subscription's wait notices it was cancelled
        within that subscription's idle tick; wake it now instead."""
        step = self.step
        sub = step.blocked if step is not None else None
        if sub is not None:
            sub.wake()

    def stop(self) -> None:
        """Nothing to do: :meth:`comet.writer.Writer.stop` ends every parked stream."""


_SHUT = threading.Lock()


def untold(stream: ParkedStream) -> str | None:
    """The stream's cursor, if its client has not been given it (a stream
    opened "from now" before its first event, or events a view left out);
    it counts as given from now on. Read in place, a subscription's cursor
    is exact (everything taken is written); a generator's is that of the
    last ``Idle`` tick it passed on, after the items before it."""
    sub = stream.sub
    cursor = sub.last_id if stream.direct and sub is not None else stream.known
    if cursor is None or cursor == stream.given:
        return None
    stream.given = cursor
    return cursor


def last_event_id(items: Sequence[Any]) -> str | None:
    """The id the last of *items* that has one gives its client."""
    for item in reversed(items):
        if isinstance(item, Event) and item.id is not None:
            return item.id
    return None


def answer_bytes(stream: ParkedStream) -> bytes:
    """A long-poll's answer, whole: it is answered from now on."""
    poll, stream.poll = stream.poll, None
    assert poll is not None
    body = poll.answer(stream.heartbeat)  # (a long-poll's heartbeat: its poll_timeout)
    return chunk(body) + b"0\r\n\r\n" if stream.chunked else body


def delegates_to(gen: Generator[Any, None, Any], sub: Subscription) -> bool:
    """Is *gen* suspended in ``yield from sub`` (through any depth of
    ``yield from`` generators)? Then *sub*'s items are exactly what *gen*
    would yield, and the writer may read *sub* in its place."""
    return inner_subscription(gen) is sub


def inner_subscription(gen: Any) -> Subscription | None:
    """The subscription a suspended generator delegates to with ``yield
    from`` (through any depth of generators), if any."""
    inner: Any = gen
    for _ in range(32):
        inner = getattr(inner, "gi_yieldfrom", None)
        if isinstance(inner, Subscription):
            return inner
        if inner is None or not hasattr(inner, "gi_yieldfrom"):
            return None
    return None


def close_generator(gen: Iterator[Any]) -> None:
    """Close a handler's generator: its ``finally`` runs; an error in it is logged."""
    try:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    except Exception:  # a handler's finally failing must not leak its place
        log.exception("comet: error while closing a stream handler")
