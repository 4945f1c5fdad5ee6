"""The writer: every parked stream of a server, on one thread.

Under cheroot a stream gives its server thread back as soon as its response
headers are out (it is *parked*): its socket moves to the :class:`Writer`,
one thread around a selector (epoll on Linux). That holds for every handler
shape:

* a handler that **returns** a subscription: the writer reads it with
  :meth:`~comet.hub.Subscription.take` whenever its channel moves;
* a **generator** handler: it is run in *steps* on a small elastic pool
  (:mod:`comet.steps`), each step going until the generator waits on a hub
  (:class:`comet.hub.cooperative` makes that wait return at once and say which
  subscription it was), ends, or has produced a batch. The stream then waits
  in the writer, costing no thread, until that subscription's channel moves.
  A generator suspended in ``yield from subscription`` is served exactly like
  a returned subscription (its items pass through unchanged), so fan-out does
  not even wake it; it resumes when the subscription ends. A step that blocks
  in the handler's own code (``time.sleep``, a database call) keeps its pool
  thread: that stream has a thread of its own for as long as it blocks,
  and the pool starts another thread for everyone else;
* a **long-poll** is parked the same way: the writer answers when something
  arrives or ``poll_timeout`` passes, then closes the connection.

The writer is woken once per publish per channel (:meth:`comet.Hub.watch`).
Events are encoded, and chunk-framed, once per transport: the same bytes
object goes to every socket at the same cursor. Each socket has a bounded
output buffer: a consumer whose backlog passes ``max_buffer`` bytes is
disconnected rather than allowed to grow memory (it reconnects with its last
id and resumes, with a gap event if it fell out of the replay buffer);
a generator producing faster than its client reads is paused instead, and
so is a stream of a latest-value channel (:meth:`comet.Hub.latest`): it is
not read while its backlog is over ``STEP_HIGH_WATER``, and when the socket
has drained it takes the newest value of each key it missed, so its memory
is bounded by that mark plus the channel's state.
Heartbeats, ``max_duration`` and long-poll timeouts come from a timer heap;
a client that went away is noticed when its socket turns readable with EOF.
:meth:`Writer.stop` ends every stream at once (terminating chunk, close) and
runs every generator's ``finally``.
"""
from __future__ import annotations

import collections
import enum
import heapq
import logging
import selectors
import socket
import threading
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Generator, Iterator, Protocol, Sequence

from .counters import Counters
from .framing import FRAMINGS, Event, encode_longpoll, longpoll_item
from .hub import Feed, Idle, Step, Subscription, cooperative
from .steps import StepPool

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Writer", "ParkedStream", "Phase", "News", "End", "LONGPOLL_MAX_BATCH", "chunk"]

log = logging.getLogger("comet")

#: At most this many items go into one long-poll answer.
LONGPOLL_MAX_BATCH = 1000
#: Items one step may produce before it yields its pool thread to others.
STEP_BUDGET = 64
#: A generator's unsent output above which its steps pause (bytes, items);
#: and a latest-value stream's, above which it is not read (Hub.latest).
STEP_HIGH_WATER = 256 * 1024
STEP_HIGH_ITEMS = 1024
#: Queued pieces up to this many bytes in all go out in one send().
COALESCE = 16 * 1024


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
    """Why a parked stream ends: :meth:`Writer.end` takes one, and it says how.

    ``FINISHED``, ``TIMED_OUT``, ``ANSWERED`` and ``UNENCODABLE`` end the
    response properly: what is queued goes out, then the terminating chunk
    (a long-poll: its answer), then the socket closes. The others close it
    at once.
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


#: The reasons that end a response properly rather than at once.
_GRACEFUL = frozenset({End.FINISHED, End.TIMED_OUT, End.ANSWERED, End.UNENCODABLE})


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
                 "stepping", "step", "inbox_items", "drained", "longpoll", "entries", "cursor", "due", "initial", "news", "hint", "shut",
                 "framing", "context", "handshake", "paused", "earlier", "timer", "given", "known", "__weakref__")

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
        self.stepping = False
        self.step: Step[Subscription] | None = None
        self.inbox_items = 0  # produced by a step, not yet taken by the writer (under the writer's lock)
        #: Set by the writer as a generator's backlog drains; made by the
        #: first step that has to wait for that (most never do).
        self.drained: threading.Event | None = None
        #: Long-poll: when to answer at the latest (None: a streaming transport).
        self.longpoll = None if longpoll is None else time.monotonic() + longpoll
        self.entries: list[str] = []
        self.cursor = cursor
        #: A long-poll without a cursor answers once it knows one (with what is
        #: ready): the client's next poll starts exactly there.
        self.handshake = longpoll is not None and cursor is None
        self.due = 0.0
        self.initial: Sequence[Any] = ()  # items a generator produced before it was parked
        #: What its steps reported while the stream waited to be taken by the
        #: writer (under the writer's lock; None once taken): it comes with
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
        due = self.last_write + self.heartbeat if self.beat and self.longpoll is None else float("inf")
        if self.deadline is not None:
            due = min(due, self.deadline)
        if self.longpoll is not None:
            due = min(due, self.longpoll)
        return due

    def close_socket(self, final: bool = True, last: bool = True) -> None:
        """Close its socket (once, whichever thread gets here first): with
        ``last``, first end the response properly (a long-poll's answer, the
        terminating chunk); with ``final``, send what is queued, as far as
        the socket takes it without blocking. :meth:`Writer.end` calls it;
        so does a stream that never reached a writer (it was stopping)."""
        with _SHUT:  # at shutdown a step thread and the writer may both get here
            if self.shut:
                return
            self.shut = True
        sock = self.sock
        if last:
            if self.longpoll is not None:
                self.queue(_answer_bytes(self))
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

    def stop(self) -> None:
        """Nothing to do: :meth:`Writer.stop` ends every parked stream."""


class Writer:
    """The writer thread for the parked streams of one pool
    (:class:`comet.runtime.Runtime` starts and stops it): it adds to
    *counters*, and calls *follow* with the hub of each channel it waits on
    (its subscriptions end with the pool's streams at shutdown)."""

    def __init__(self, counters: Counters, follow: Callable[[Hub], None], max_buffer: int = 1 << 20) -> None:
        self.counters = counters
        self.follow = follow
        self.max_buffer = max_buffer
        self.steps = StepPool()
        #: Where requests to ``@comet`` handlers served directly are opened
        #: (:mod:`comet.direct`): a storm of them is worked off by one
        #: thread (a second one only contends with it and the accepting
        #: thread for the GIL: 10,000 connects took 20 % longer), with more
        #: only while one is stuck in a handler's code.
        self.connects = StepPool(core=1, limit=64, name="comet-connect", patience=0.02)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._adds: list[ParkedStream] = []
        self._dirty: set[tuple[int, str]] = set()
        self._inbox: list[tuple[ParkedStream, News, Any]] = []
        self._woken = False
        self._groups: dict[tuple[int, str], set[ParkedStream]] = {}
        self._unwatch: dict[tuple[int, str], Callable[[], None]] = {}
        self._streams: set[ParkedStream] = set()
        self._timers: list[list[Any]] = []  # [due, serial, stream or None once it ended]
        self._dead_timers = 0
        self._serial = 0
        self._stopping = False
        self._exited = False
        self._thread = threading.Thread(target=self._run, name="comet-writer", daemon=True)
        self._thread.start()

    # -- from other threads ---------------------------------------------------

    def park(self, stream: ParkedStream) -> None:
        """Hand a stream over (from the thread that opened it). A writer that
        has already exited ends the stream at once instead."""
        with self._lock:
            if not self._exited:
                stream.news = []
                self._adds.append(stream)
                self._wake()
                return
        self.end(stream, End.ORPHANED)

    def post(self, stream: ParkedStream, kind: News, value: Any = None) -> None:
        """What a step of *stream*'s generator reports (from its thread):
        an item produced, a cursor, or how the step ended (see :class:`News`).
        A writer that has exited ends the stream at once instead."""
        with self._lock:
            exited = self._exited
            if not exited:
                if stream.news is not None:  # not taken yet: the wake-up of its park() is on its way
                    stream.news.append((stream, kind, value))
                    return
                if kind is News.ITEM:
                    stream.inbox_items += 1
                self._inbox.append((stream, kind, value))
                self._wake()
        if exited and kind is not News.ITEM and kind is not News.CURSOR:
            if kind is News.WAITING:
                stream.waits_on(value[0])
            elif isinstance(value, Subscription):
                stream.owns(value)
            self.end(stream, End.ORPHANED)

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # already full of wake-ups, or closing

    def _mark(self, key: tuple[int, str]) -> None:
        # Called by publishing threads: record the channel, wake the writer.
        with self._lock:
            self._dirty.add(key)
            self._wake()

    @property
    def parked(self) -> int:
        return len(self._streams) + len(self._adds)

    def stop(self, timeout: float = 5.0) -> None:
        """End every parked stream and the thread; run generators' cleanup."""
        self._stopping = True
        with self._lock:
            self._woken = False
            self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.connects.stop()
        self.steps.stop()

    # -- the writer thread ------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, mask in self._selector.select(timeout if timeout is None or timeout < 1.0 else 1.0):
                    stream = key.data
                    if stream is None:
                        self._drain_wake()
                        continue
                    if mask & selectors.EVENT_READ and not stream.done:
                        self._readable(stream)
                    if mask & selectors.EVENT_WRITE and not stream.done:
                        self._flush(stream)
                self._take_adds()
                self._take_inbox()
                self._dispatch()
                self._timers_due(time.monotonic())
                self.connects.nudge()
        except Exception:
            log.exception("comet: parked-stream writer crashed; ending its streams")
        finally:
            with self._lock:
                self._exited = True  # later park() calls end their stream themselves
                adds, self._adds = self._adds, []
                inbox, self._inbox = self._inbox, []
                for stream in adds:
                    inbox += stream.news or ()
                    stream.news = None
            for stream, kind, value in inbox:
                if kind is News.AGAIN or kind is News.WAITING:  # that step has returned: the generator is suspended
                    stream.stepping = False
                    if kind is News.WAITING:
                        stream.waits_on(value[0])  # closed with the generator (a for loop would not)
                    elif value is not None:
                        stream.owns(value)
                elif kind is not News.ITEM and kind is not News.CURSOR:  # ... or done with
                    stream.stepping = False
                    stream.gen = None
                    if value is not None:
                        stream.owns(value)
            for stream in dict.fromkeys(list(self._streams) + adds + [entry[0] for entry in inbox]):
                if not stream.done:
                    self.end(stream, End.STOPPING)
                elif not stream.stepping:
                    # Ended earlier while a step ran, whose news came after the
                    # loop's last look: _close() left the release to that news.
                    self._let_go(stream)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # Cleared after draining (a byte sent meanwhile must not be swallowed
        # with the flag still set) and under the lock the senders take, before
        # reading what they queued.
        with self._lock:
            self._woken = False

    def _take_adds(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            news = []
            for stream in adds:
                news.append(stream.news)
                stream.news = None  # from now on its steps post to the inbox
        for stream, early in zip(adds, news):
            try:
                if stream.sock.gettimeout() != 0.0:  # (taken at accept, it is already: a syscall saved)
                    stream.sock.setblocking(False)
                self._selector.register(stream.sock, selectors.EVENT_READ, stream)
            except (OSError, ValueError):
                self.end(stream, End.GONE)
                if early:
                    self._handle_news(early)  # a step that has returned releases it now
                continue
            self._streams.add(stream)
            self._schedule(stream)
            initial, stream.initial = stream.initial, ()
            self._emit(stream, initial)
            if early:  # its steps' news, after the initial items as they came (also if that found it gone)
                self._handle_news(early)
            elif stream.done:
                continue  # writing the first items found the client gone: ended, released
            elif stream.gen is not None:
                self._submit_step(stream)
            else:
                assert stream.sub is not None
                self._join(stream, stream.sub)
                self._feed(stream)  # initial items, a gap, or what was published meanwhile
            if stream.out and not stream.writing and not stream.done:
                self._flush(stream)  # the head and preamble

    def _join(self, stream: ParkedStream, sub: Feed) -> None:
        """Wait on *sub*'s channel: the writer hears of every publish to it."""
        # The channel object, not just its name: a forgotten channel's streams
        # must not share a group (and its watcher) with its successor's.
        key = sub.group_key()
        if stream.key == key:
            return
        self._leave(stream)
        stream.key = key
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = set()
            self._unwatch[key] = sub.watch(lambda: self._mark(key))
            self.follow(sub.hub)  # its subscriptions end with the pool's streams at shutdown
        group.add(stream)

    def _leave(self, stream: ParkedStream) -> None:
        key, stream.key = stream.key, None
        if key is None:
            return
        group = self._groups.get(key)
        if group is not None:
            group.discard(stream)
            if not group:
                del self._groups[key]
                unwatch = self._unwatch.pop(key, None)
                if unwatch is not None:
                    unwatch()

    def _dispatch(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for key in dirty:
            self._fan_out(list(self._groups.get(key, ())))

    def _fan_out(self, streams: list[ParkedStream]) -> None:
        """Write what is new to every stream waiting on one channel.

        The hot path of a broadcast. Streams read directly, at the same
        cursor, with no view, nothing queued and chunked SSE/NDJSON framing
        receive the very same bytes: one take(), one join, then one send()
        each. Everything else goes through _feed, or (a generator that
        transforms events) gets a step.
        """
        shared: dict[tuple[int, str], tuple[int, bytes, int, str, str | None]] = {}
        now = time.monotonic()
        items = sent_bytes = 0
        for stream in streams:
            if stream.done or stream.stepping:
                continue
            sub = stream.sub
            assert sub is not None
            if not stream.direct:
                self._submit_step(stream)
                continue
            if stream.out_size > STEP_HIGH_WATER and stream.bounded():
                stream.paused = True  # _flush reads it again once the socket has taken most of it
                continue
            if (sub.view is not None or stream.out or sub.has_pending or not stream.chunked or sub.ended
                    or not stream.framing.shared_bytes or stream.longpoll is not None):
                self._feed(stream)
                continue
            key = (sub.cursor, stream.transport)
            hit = shared.get(key)
            if hit is None:
                taken = sub.take()
                try:
                    data = b"".join([self._wire(stream, item) for item in taken])
                except (ValueError, TypeError) as exc:
                    log.error("comet: ending parked %s stream, cannot encode: %s", stream.transport, exc)
                    self.end(stream, End.UNENCODABLE)
                    continue
                hit = shared[key] = (sub.cursor, data, len(taken), sub.last_id, _last_event_id(taken))
            else:
                sub.jump(hit[0], hit[3])
            data = hit[1]
            if not data:
                continue
            if hit[4] is not None:
                stream.given = hit[4]
            items += hit[2]
            try:
                sent = stream.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.counters.add("disconnects")
                self.end(stream, End.GONE)
                continue
            sent_bytes += sent
            stream.last_write = now
            if sent < len(data):
                stream.out.append(memoryview(data)[sent:])
                stream.out_size += len(data) - sent
                self._flush(stream)  # registers for writability, enforces the cap
        self.counters.add("items", items)
        self.counters.add("bytes", sent_bytes)

    def _feed(self, stream: ParkedStream) -> None:
        """Write what the subscription read in place of its stream has."""
        sub = stream.sub
        assert sub is not None
        if sub.ended:
            if stream.gen is not None:
                self._submit_step(stream)  # the generator goes on after its ``yield from``
            else:
                if stream.longpoll is not None and (not stream.entries or stream.cursor is None):
                    stream.cursor = sub.last_id  # ended with no news (a disconnect): still a whole answer
                self.end(stream, End.FINISHED)
            return
        if stream.out_size > STEP_HIGH_WATER and stream.bounded():
            stream.paused = True
            return
        try:
            items = sub.take()
        except Exception:
            log.exception("comet: a parked subscription's view failed; ending the stream")
            self.end(stream, End.FAILED)
            return
        self._emit(stream, items)
        if stream.longpoll is not None:
            if not stream.entries or stream.cursor is None:
                stream.cursor = sub.last_id  # where the hub stands, even with nothing new
            if (stream.entries or stream.handshake) and not stream.done:
                self.end(stream, End.ANSWERED)

    def _emit(self, stream: ParkedStream, items: Sequence[Any]) -> None:
        if not items or stream.phase is not Phase.OPEN:
            return
        if stream.longpoll is not None:
            for item in items:
                if len(stream.entries) >= LONGPOLL_MAX_BATCH:
                    break
                try:
                    stream.entries.append(longpoll_item(item))
                except (ValueError, TypeError) as exc:
                    log.error("comet: ending long-poll, cannot encode %r: %s", type(item).__name__, exc)
                    self.end(stream, End.FAILED)
                    return
                if isinstance(item, Event) and item.id is not None:
                    stream.cursor = item.id
            self.counters.add("items", len(items))
            return
        for item in items:
            try:
                stream.queue(self._wire(stream, item))
            except (ValueError, TypeError) as exc:
                log.error("comet: ending parked %s stream, cannot encode %r: %s", stream.transport, type(item).__name__, exc)
                self.end(stream, End.UNENCODABLE)
                return
            if isinstance(item, Event) and item.id is not None:
                stream.given = item.id
        self.counters.add("items", len(items))
        self._flush(stream)

    def _wire(self, stream: ParkedStream, item: Any) -> bytes:
        # Shared events are encoded and chunk-framed once per transport; the
        # same bytes object is written to every socket.
        framing = stream.framing
        if isinstance(item, Event) and framing.shared_bytes and stream.chunked:
            key = stream.transport + "+chunk"
            wire = item._wire.get(key)
            if not isinstance(wire, bytes):
                wire = item._wire[key] = chunk(framing.encode(item, "", stream.max_bytes))
            return wire
        payload = framing.encode(item, stream.boundary, stream.max_bytes)
        return chunk(payload) if stream.chunked else payload

    def _flush(self, stream: ParkedStream) -> None:
        out = stream.out
        sock = stream.sock
        if len(out) > 1 and stream.out_size <= COALESCE:
            joined = b"".join(out)  # one send, not one per piece (a new stream's head, greeting, first items)
            out.clear()
            out.append(joined)
        try:
            while out:
                data = out[0]
                sent = sock.send(data)
                self.counters.add("bytes", sent)
                stream.out_size -= sent
                if sent < len(data):
                    out[0] = memoryview(data)[sent:]
                    break
                out.popleft()
        except BlockingIOError:
            pass
        except OSError:
            self.counters.add("disconnects")
            self.end(stream, End.GONE)
            return
        stream.last_write = time.monotonic()
        if out:
            if stream.out_size > self.max_buffer and not stream.bounded():
                log.info("comet: disconnecting a slow consumer (%d bytes unsent)", stream.out_size)
                self.counters.add("slow_consumers")
                self.end(stream, End.SLOW)
                return
            if not stream.writing:
                stream.writing = True
                self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, stream)
        else:
            if stream.writing:
                stream.writing = False
                self._selector.modify(sock, selectors.EVENT_READ, stream)
            if stream.phase is Phase.CLOSING:
                self.end(stream, End.SENT)
                return
        if stream.gen is not None and stream.out_size <= STEP_HIGH_WATER and stream.drained is not None:
            stream.drained.set()
        if stream.paused and stream.out_size <= STEP_HIGH_WATER // 2 and stream.phase is Phase.OPEN:
            stream.paused = False
            self._feed(stream)  # what it missed meanwhile: the newest value of each key

    def _readable(self, stream: ParkedStream) -> None:
        try:
            data = stream.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the client went away
            self.counters.add("disconnects")
            self.end(stream, End.GONE)
        # Anything else is a pipelined request we will never answer; ignore it.

    def _tell_cursor(self, stream: ParkedStream) -> None:
        """A heartbeat carrying the stream's cursor now, if its client has
        not been given it: a reconnect a moment later then resumes there."""
        cursor = _untold(stream)
        if cursor is None or stream.phase is not Phase.OPEN:
            return
        beat = stream.framing.beat(stream.boundary, stream.heartbeat, cursor)
        stream.queue(chunk(beat) if stream.chunked else beat)
        self._flush(stream)

    # -- timers -----------------------------------------------------------------

    def _schedule(self, stream: ParkedStream, now: float = 0.0) -> None:
        stream.due = stream.next_due()
        if stream.due <= now:
            # Its heartbeat is overdue but waits behind bytes the socket has
            # not taken (a client that reads nothing, or vanished): look
            # again a heartbeat later, not at once, forever (a busy loop that
            # would stall every stream of this writer).
            stream.due = now + stream.heartbeat
        if stream.due != float("inf"):
            self._unschedule(stream)  # (one entry per stream: any earlier one is void)
            self._serial += 1
            stream.timer = [stream.due, self._serial, stream]
            heapq.heappush(self._timers, stream.timer)

    def _unschedule(self, stream: ParkedStream) -> None:
        """Let go of a stream's timer now, not at its due time: the heap
        would keep an ended stream (its socket object, buffers, request)
        alive up to a heartbeat interval after its client left, and a
        connect/disconnect storm would pile them up. Its entry stays as a
        tombstone; the heap is compacted, in place (``_timers_due`` may be
        walking it), once they are half of it."""
        entry, stream.timer = stream.timer, None
        if entry is None:
            return
        entry[2] = None
        self._dead_timers += 1
        if self._dead_timers > 64 and 2 * self._dead_timers > len(self._timers):
            self._timers[:] = [e for e in self._timers if e[2] is not None]
            heapq.heapify(self._timers)
            self._dead_timers = 0

    def _timers_due(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            stream = heapq.heappop(timers)[2]
            if stream is None:  # (ended: see _unschedule)
                self._dead_timers -= 1
                continue
            stream.timer = None
            if stream.phase is not Phase.OPEN:
                continue
            if (stream.deadline is not None and now >= stream.deadline) or (
                    stream.longpoll is not None and now >= stream.longpoll):
                self.end(stream, End.TIMED_OUT)
                continue
            if stream.beat and stream.longpoll is None and now - stream.last_write >= stream.heartbeat and not stream.out:
                cursor = _untold(stream) if stream.framing.beats_cursor else None
                beat = stream.framing.beat(stream.boundary, stream.heartbeat, cursor)  # multipart: depends on what was written
                stream.queue(chunk(beat) if stream.chunked else beat)
                self.counters.add("heartbeats")
                self._flush(stream)
                if stream.done:
                    continue
            self._schedule(stream, now)

    # -- generator steps --------------------------------------------------------

    def _submit_step(self, stream: ParkedStream) -> None:
        if stream.stepping or stream.done:
            return
        stream.stepping = True
        stream.step = Step()
        self.steps.submit(lambda: self._step(stream))

    def step_here(self, stream: ParkedStream) -> None:
        """Run the step a parked stream was given (``stream.step``) on this
        thread, which is in the stream's request context already (a direct
        request's): up to the generator's wait on a hub, as a pool thread
        would."""
        self._step(stream, enter=False)

    def _step(self, stream: ParkedStream, enter: bool = True) -> None:
        """Run *stream*'s generator until it waits on a hub (on a pool
        thread). ``enter=False``: this thread is in the stream's request
        context already (the request's own thread)."""
        gen, step = stream.gen, stream.step
        assert gen is not None and step is not None
        produced = 0
        outcome = News.AGAIN
        value: Subscription | None = None
        cursor: str | None = None  # of the last Idle tick the generator passed on
        context = stream.context if enter else None
        with cooperative(step), (context() if context is not None else nullcontext()):
            while True:
                if step.cancelled:
                    outcome = News.CANCELLED
                    break
                try:
                    item = next(gen)
                except StopIteration:
                    outcome = News.FINISHED
                    break
                except Exception:
                    log.exception("comet: a stream handler failed; ending its stream")
                    outcome = News.FAILED
                    break
                if item is None or item.__class__ is Idle:
                    if item is not None:
                        cursor = item.last_id
                        if stream.longpoll is not None:
                            self.post(stream, News.CURSOR, cursor)
                    if step.blocked is not None:
                        outcome, value = News.WAITING, step.blocked
                        break
                    continue  # the handler's own "nothing yet": it keeps this thread meanwhile
                self.post(stream, News.ITEM, item)
                produced += 1
                if produced >= STEP_BUDGET:
                    break  # let others have the thread; the writer steps us again
                while not step.cancelled and (stream.out_size > STEP_HIGH_WATER or stream.inbox_items > STEP_HIGH_ITEMS):
                    if stream.drained is None:
                        stream.drained = threading.Event()
                    stream.drained.clear()  # the writer sets it as the backlog drains
                    stream.drained.wait(0.25)
        if step.opened is not None:
            stream.adopt(step.opened)  # (on this thread: the writer leaves them be while a step runs)
        if outcome is News.WAITING:
            assert value is not None
            direct = _delegates_to(gen, value)
            self.post(stream, News.WAITING, (value, direct, cursor))  # (its cursor after its items: in order)
        elif outcome is News.AGAIN:
            self.post(stream, News.AGAIN, step.blocked)
        else:
            if outcome is News.CANCELLED:
                with context() if context is not None else nullcontext():
                    _close_generator(gen)
            self.post(stream, outcome, step.blocked)

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            # A stream whose first step outran its park() is not taken yet:
            # its news waits for the next round, after _take_adds.
            early = [entry for entry in inbox if entry[0] not in self._streams and not entry[0].done]
            if early:
                inbox = [entry for entry in inbox if entry[0] in self._streams or entry[0].done]
                self._inbox[:0] = early
                self._wake()
            for stream, kind, _ in inbox:
                if kind is News.ITEM:
                    stream.inbox_items -= 1
        self._handle_news(inbox)

    def _handle_news(self, inbox: list[tuple[ParkedStream, News, Any]]) -> None:
        """What steps reported, in order: items, cursors, how they ended."""
        for stream, kind, value in inbox:
            if kind is News.ITEM:
                if not stream.done:
                    self._emit(stream, [value])
                    if stream.longpoll is not None and len(stream.entries) >= LONGPOLL_MAX_BATCH:
                        self.end(stream, End.ANSWERED)
                continue
            if kind is News.CURSOR:
                if stream.longpoll is not None and (not stream.entries or stream.cursor is None):
                    stream.cursor = value
                if stream.longpoll is not None and stream.handshake and stream.phase is Phase.OPEN:
                    self.end(stream, End.ANSWERED)
                continue
            stream.stepping, stream.step = False, None
            if kind is not News.WAITING and value is not None:
                stream.owns(value)  # the subscription the step waited on in place
            if kind is News.WAITING:
                sub, direct, cursor = value
                stream.waits_on(sub)
                stream.direct = direct
                if cursor is not None:
                    stream.known = cursor
                if stream.phase is not Phase.OPEN:
                    self._let_go(stream)
                    continue
                self._join(stream, sub)
                if stream.given is None and stream.framing.beats_cursor and stream.longpoll is None:
                    self._tell_cursor(stream)  # its first cursor: at once, not a heartbeat later
                if stream.longpoll is not None and stream.entries:
                    self.end(stream, End.ANSWERED)
                elif sub.moved():  # moved since the step looked
                    if direct:
                        self._feed(stream)
                    else:
                        self._submit_step(stream)
            elif kind is News.AGAIN:
                if stream.phase is not Phase.OPEN:
                    self._let_go(stream)
                else:
                    self._submit_step(stream)
            elif kind is News.FINISHED or kind is News.FAILED:
                stream.gen = None
                if stream.done:
                    self._let_go(stream)
                elif kind is News.FINISHED or stream.longpoll is not None:
                    self.end(stream, End.FINISHED)  # (a long-poll answers with what it has)
                else:
                    self.end(stream, End.FAILED)
            else:  # cancelled: the step closed the generator
                stream.gen = None
                self._let_go(stream)

    # -- ending -------------------------------------------------------------------

    def end(self, stream: ParkedStream, why: End) -> None:
        """End *stream*, whatever ended it (see :class:`End`): the one way a
        parked stream ends. Idempotent. On the writer thread, but for
        ``End.ORPHANED``: any thread, once the writer has exited.

        What feeds the stream is let go once no step runs: a generator is
        closed on a pool thread (its ``finally`` is the handler's code), the
        subscriptions it waited on are closed (their ``on_close`` callbacks
        run), and the stream's admission is given back.
        """
        if why is End.ORPHANED:
            self._orphan(stream)
        elif why in _GRACEFUL:
            if stream.longpoll is not None and stream.phase is Phase.OPEN:
                stream.queue(_answer_bytes(stream))  # a long-poll's one answer: what it gathered, and its cursor
                stream.phase = Phase.CLOSING
            self._finish(stream)
        else:
            self._close(stream, final=why is End.STOPPING)

    def _finish(self, stream: ParkedStream) -> None:
        # What is queued, the terminating chunk, then close once it is all out.
        if stream.done:
            return
        if stream.phase is Phase.OPEN:  # (a long-poll's answer is queued already)
            if stream.chunked and stream.framing.streaming:
                stream.queue(b"0\r\n\r\n")  # the client may reconnect at once
            stream.phase = Phase.CLOSING
        self._flush(stream)
        if not stream.done and stream.out:
            # Nothing more goes in; the socket drains, then closes (End.SENT).
            self._leave(stream)
            if not stream.stepping:
                self._let_go(stream)

    def _close(self, stream: ParkedStream, final: bool) -> None:
        # Close the socket now (``final``: ending the response properly as
        # far as it takes without waiting) and let go of what feeds it.
        if stream.done:
            return
        last = final and stream.phase is Phase.OPEN
        stream.phase = Phase.DONE
        self._streams.discard(stream)
        self._unschedule(stream)
        self._leave(stream)
        try:
            self._selector.unregister(stream.sock)
        except (KeyError, ValueError, OSError):
            pass
        stream.close_socket(final, last)
        if stream.gen is not None and stream.stepping:
            if stream.step is not None:
                stream.step.cancelled = True  # the step closes the generator itself
                _wake_blocked(stream)
            # else: its first step (comet.pipeline.PRIME_WAIT) is still
            # running; it closes the generator when it returns
        else:
            self._let_go(stream)

    def _let_go(self, stream: ParkedStream) -> None:
        # Let go of what feeds a stream that ends, once no step runs (a step
        # that was running when it ended calls this with its news).
        gen, stream.gen = stream.gen, None
        if gen is not None:
            stream.stepping = True  # no step is started any more

            def close() -> None:
                with stream.context() if stream.context is not None else nullcontext():
                    _close_generator(gen)
                    _close_waited_on(stream)
                stream.admission.release()

            self.steps.submit(close)  # the handler's own code: never on this thread
        elif stream.done:
            try:
                _close_waited_on(stream)  # runs the handler's on_close callbacks (presence, cleanup)
            finally:
                stream.admission.release()

    def _orphan(self, stream: ParkedStream) -> None:
        # End a stream after the writer has exited, on this thread.
        last = stream.phase is Phase.OPEN
        stream.phase = Phase.DONE
        stream.close_socket(True, last)
        gen, stream.gen = stream.gen, None
        if gen is not None:
            _close_generator(gen)
        _close_waited_on(stream)
        stream.admission.release()


_SHUT = threading.Lock()


def _untold(stream: ParkedStream) -> str | None:
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


def _last_event_id(items: Sequence[Any]) -> str | None:
    """The id the last of *items* that has one gives its client."""
    for item in reversed(items):
        if isinstance(item, Event) and item.id is not None:
            return item.id
    return None


def _answer_bytes(stream: ParkedStream) -> bytes:
    """A long-poll's answer, whole: it is answered from now on."""
    body = encode_longpoll(stream.entries, stream.cursor, stream.heartbeat)  # (a long-poll's: poll_timeout)
    stream.longpoll = None
    return chunk(body) + b"0\r\n\r\n" if stream.chunked else body


def _delegates_to(gen: Generator[Any, None, Any], sub: Subscription) -> bool:
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


def _close_generator(gen: Iterator[Any]) -> None:
    try:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    except Exception:  # a handler's finally failing must not leak its place
        log.exception("comet: error while closing a stream handler")


def _close_waited_on(stream: ParkedStream) -> None:
    """Close the subscriptions a stream's generator waited on. One closed
    in ``yield from sub`` closed it already; one that iterated it in a
    ``for`` loop did not, and nothing else would: the hub would count it
    open, and its ``on_close`` callbacks (presence) would never run."""
    subs = [*stream.earlier, stream.sub] if stream.earlier else [stream.sub]
    stream.earlier = None
    for sub in subs:
        if sub is not None:
            try:
                sub.close()
            except Exception:
                log.exception("comet: closing a parked subscription failed")


def _wake_blocked(stream: ParkedStream) -> None:
    """A step blocked in a subscription's wait notices it was cancelled
    within that subscription's idle tick; wake it now instead."""
    step = stream.step
    sub = step.blocked if step is not None else None
    if sub is not None:
        sub.wake()
