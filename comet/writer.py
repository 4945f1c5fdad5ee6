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

The writer is this module's selector loop and socket I/O, and the one way a
stream ends (:meth:`Writer.end`, with an :class:`~comet.parked.End`); its
other jobs have a module each: what other threads hand it
(:mod:`comet.mailbox`), the streams themselves (:mod:`comet.parked`),
fan-out and the encoding cache (:mod:`comet.fanout`), the timer heap
(:mod:`comet.timers`) and generator stepping (:mod:`comet.stepper`).
:class:`comet.runtime.Runtime` starts and stops it.
"""
from __future__ import annotations

import logging
import selectors
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .counters import Counters
from .fanout import Fanout
from .hub import Subscription
from .mailbox import Mailbox
from .parked import (GRACEFUL, LONGPOLL_MAX_BATCH, STEP_HIGH_WATER, End, News, ParkedStream, Phase, StepState, answer_bytes,
                     chunk, close_generator, untold)
from .stepper import Stepper
from .steps import StepPool
from .timers import Timers

if TYPE_CHECKING:
    from .subscription import Owner

# (ParkedStream, its words and its limits are comet.parked's; named here too.)
__all__ = ["Writer", "ParkedStream", "Phase", "News", "End", "LONGPOLL_MAX_BATCH", "STEP_HIGH_WATER"]

log = logging.getLogger("comet")

#: Queued pieces up to this many bytes in all go out in one send().
COALESCE = 16 * 1024

# (Reading an enum member through its class costs ~0.1 µs on Python 3.11: the
# per-stream and per-item paths below read these instead.)
_OPEN, _CLOSING, _DONE = Phase.OPEN, Phase.CLOSING, Phase.DONE


class Writer:
    """The writer thread for the parked streams of one pool
    (:class:`comet.runtime.Runtime` starts and stops it): it adds to
    *counters*, and calls *follow* with the hub of each channel it waits on
    (its subscriptions end with the pool's streams at shutdown)."""

    def __init__(self, counters: Counters, follow: Callable[[Owner], None], max_buffer: int = 1 << 20) -> None:
        self.counters = counters
        self.max_buffer = max_buffer
        self.steps = StepPool()
        #: Where requests to ``@comet`` handlers served directly are opened
        #: (:mod:`comet.direct`): a storm of them is worked off by one
        #: thread (a second one only contends with it and the accepting
        #: thread for the GIL: 10,000 connects took 20 % longer), with more
        #: only while one is stuck in a handler's code.
        self.connects = StepPool(core=1, limit=64, name="comet-connect", patience=0.02)
        self._selector = selectors.DefaultSelector()
        self.mailbox = Mailbox(self._selector)
        self.timers = Timers()
        self.fanout = Fanout(self, self.mailbox.mark, follow)
        self.stepper = Stepper(self.steps, self.post, self.fanout, self)
        self._streams: set[ParkedStream] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="comet-writer", daemon=True)
        self._thread.start()

    # -- from other threads ---------------------------------------------------

    def park(self, stream: ParkedStream) -> None:
        """Hand a stream over (from the thread that opened it). A writer that
        has already exited ends the stream at once instead."""
        if not self.mailbox.park(stream):
            self.end(stream, End.ORPHANED)

    def post(self, stream: ParkedStream, kind: News, value: Any = None) -> None:
        """What a step of *stream*'s generator reports (from its thread):
        an item produced, a cursor, or how the step ended (see :class:`News`).
        A writer that has exited ends the stream at once instead."""
        if self.mailbox.post(stream, kind, value) or kind is News.ITEM or kind is News.CURSOR:
            return
        if kind is News.WAITING:
            stream.waits_on(value[0])
        elif isinstance(value, Subscription):
            stream.owns(value)
        self.end(stream, End.ORPHANED)

    def step_here(self, stream: ParkedStream) -> None:
        """Run the step a parked stream was given (``stream.step``) on this
        thread, which is in the stream's request context already (a direct
        request's): up to the generator's wait on a hub, as a pool thread
        would."""
        self.stepper.run(stream, enter=False)

    @property
    def parked(self) -> int:
        return len(self._streams) + self.mailbox.waiting

    def stop(self, timeout: float = 5.0) -> None:
        """End every parked stream and the thread; run generators' cleanup."""
        self._stopping = True
        self.mailbox.wake_now()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.connects.stop()
        self.steps.stop()

    # -- the writer thread ------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                due = self.timers.next_due()
                timeout = None if due is None else max(0.0, due - time.monotonic())
                for key, mask in self._selector.select(timeout if timeout is None or timeout < 1.0 else 1.0):
                    stream = key.data
                    if stream is None:
                        self.mailbox.drain()
                        continue
                    if mask & selectors.EVENT_READ and stream.phase is not _DONE:
                        self._readable(stream)
                    if mask & selectors.EVENT_WRITE and stream.phase is not _DONE:
                        self.flush(stream)
                self._take_adds()
                self.stepper.handle(self.mailbox.take_news(self._streams))
                self.fanout.dispatch(self.mailbox.take_moved())
                self._timers_due(time.monotonic())
                self.connects.nudge()
        except Exception:
            log.exception("comet: parked-stream writer crashed; ending its streams")
        finally:
            self._exit()

    def _exit(self) -> None:
        # Later park() and post() calls end their stream themselves.
        adds, inbox = self.mailbox.exit()
        for stream, kind, value in inbox:
            if kind is News.AGAIN or kind is News.WAITING:  # that step has returned: the generator is suspended
                stream.step_state = StepState.IDLE
                if kind is News.WAITING:
                    stream.waits_on(value[0])  # closed with the generator (a for loop would not)
                elif value is not None:
                    stream.owns(value)
            elif kind is not News.ITEM and kind is not News.CURSOR:  # ... or done with
                stream.step_state = StepState.IDLE
                stream.gen = None
                if value is not None:
                    stream.owns(value)
        for stream in dict.fromkeys(list(self._streams) + adds + [entry[0] for entry in inbox]):
            if not stream.done:
                self.end(stream, End.STOPPING)
            elif stream.step_state is StepState.IDLE:
                # Ended earlier while a step ran, whose news came after the
                # loop's last look: _close() left the release to that news.
                self.end(stream, End.STEPPED)  # invariant I3
        self._selector.close()
        self.mailbox.close()

    def _take_adds(self) -> None:
        for stream, early in self.mailbox.take_adds():
            try:
                if stream.sock.gettimeout() != 0.0:  # (taken at accept, it is already: a syscall saved)
                    stream.sock.setblocking(False)
                self._selector.register(stream.sock, selectors.EVENT_READ, stream)
            except (OSError, ValueError):
                self.end(stream, End.GONE)
                if early:
                    self.stepper.handle(early)  # a step that has returned releases it now
                continue
            self._streams.add(stream)
            self.timers.schedule(stream)
            initial, stream.initial = stream.initial, ()
            self.fanout.emit(stream, initial)
            if early:  # its steps' news, after the initial items as they came (also if that found it gone)
                self.stepper.handle(early)
            elif stream.done:
                continue  # writing the first items found the client gone: ended, released
            elif stream.gen is not None:
                self.stepper.submit(stream)
            else:
                assert stream.sub is not None
                self.fanout.join(stream, stream.sub)
                self.fanout.feed(stream)  # initial items, a gap, or what was published meanwhile
            if stream.out and not stream.writing and not stream.done:
                self.flush(stream)  # the head and preamble

    def step(self, stream: ParkedStream) -> None:
        """Give *stream*'s generator its next step (fan-out's news)."""
        self.stepper.submit(stream)

    # -- socket I/O -----------------------------------------------------------------

    def flush(self, stream: ParkedStream) -> None:
        """Send what is queued on *stream*, as far as its socket takes it
        without blocking; watch for writability while some is left."""
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
            if stream.phase is _CLOSING:
                self.end(stream, End.SENT)
                return
        if stream.gen is not None and stream.out_size <= STEP_HIGH_WATER and stream.drained is not None:
            stream.drained.set()
        if stream.paused and stream.out_size <= STEP_HIGH_WATER // 2 and stream.phase is _OPEN:
            stream.paused = False
            self.fanout.feed(stream)  # what it missed meanwhile: the newest value of each key

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

    def tell_cursor(self, stream: ParkedStream) -> None:
        """A heartbeat carrying the stream's cursor now, if its client has
        not been given it: a reconnect a moment later then resumes there."""
        cursor = untold(stream)
        if cursor is None or stream.phase is not Phase.OPEN:
            return
        beat = stream.framing.beat(stream.boundary, stream.heartbeat, cursor)
        stream.queue(chunk(beat) if stream.chunked else beat)
        self.flush(stream)

    # -- timers -----------------------------------------------------------------

    def _timers_due(self, now: float) -> None:
        for stream in self.timers.due(now):
            if stream.phase is not Phase.OPEN:
                continue
            if (stream.deadline is not None and now >= stream.deadline) or (
                    stream.poll is not None and now >= stream.poll.deadline):
                self.end(stream, End.TIMED_OUT)
                continue
            if stream.beat and stream.poll is None and now - stream.last_write >= stream.heartbeat and not stream.out:
                cursor = untold(stream) if stream.framing.beats_cursor else None
                beat = stream.framing.beat(stream.boundary, stream.heartbeat, cursor)  # multipart: depends on what was written
                stream.queue(chunk(beat) if stream.chunked else beat)
                self.counters.add("heartbeats")
                self.flush(stream)
                if stream.done:
                    continue
            self.timers.schedule(stream, now)

    # -- ending -------------------------------------------------------------------

    def end(self, stream: ParkedStream, why: End) -> None:
        """End *stream*, whatever ended it (see :class:`End`): the one way a
        parked stream ends. Idempotent. On the writer thread, but for
        ``End.ORPHANED``: any thread, once the writer has exited.

        ``End.STEPPED`` is not a new end: a step that ran when its stream
        ended has returned. What feeds the stream is let go once no step runs: a generator is
        closed on a pool thread (its ``finally`` is the handler's code), the
        subscriptions it waited on are closed (their ``on_close`` callbacks
        run), and the stream's admission is given back.
        """
        if why is End.STEPPED:
            self._let_go(stream)
        elif why is End.ORPHANED:
            self._orphan(stream)
        elif why in GRACEFUL:
            if stream.poll is not None and stream.phase is Phase.OPEN:
                stream.queue(answer_bytes(stream))  # a long-poll's one answer: what it gathered, and its cursor
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
        self.flush(stream)
        if not stream.done and stream.out:
            # Nothing more goes in; the socket drains, then closes (End.SENT).
            self.fanout.leave(stream)
            if stream.step_state is StepState.IDLE:
                self._let_go(stream)

    def _close(self, stream: ParkedStream, final: bool) -> None:
        # Close the socket now (``final``: ending the response properly as
        # far as it takes without waiting) and let go of what feeds it.
        if stream.done:
            return
        last = final and stream.phase is Phase.OPEN
        stream.phase = Phase.DONE
        self._streams.discard(stream)
        self.timers.unschedule(stream)
        self.fanout.leave(stream)
        try:
            self._selector.unregister(stream.sock)
        except (KeyError, ValueError, OSError):
            pass
        stream.close_socket(final, last)
        if stream.gen is not None and stream.step_state is not StepState.IDLE:
            if stream.step_state is StepState.RUNNING and stream.step is not None:
                stream.step.cancelled = True  # invariant I3: the step closes the generator itself
                stream.wake_step()
            # else: its first step (StepState.FIRST) is still running; it
            # closes the generator when it returns
        else:
            self._let_go(stream)

    def _let_go(self, stream: ParkedStream) -> None:
        # Let go of what feeds a stream that ends, once no step runs (a step
        # that was running when it ended comes here with its news: STEPPED).
        gen, stream.gen = stream.gen, None
        if gen is not None:
            self.stepper.close(stream, gen)  # invariant I4: the handler's own code, never on this thread
        elif stream.done:
            try:
                stream.close_subscriptions()  # runs the handler's on_close callbacks (presence, cleanup)
            finally:
                stream.admission.release()

    def _orphan(self, stream: ParkedStream) -> None:
        # End a stream after the writer has exited, on this thread.
        last = stream.phase is Phase.OPEN
        stream.phase = Phase.DONE
        stream.close_socket(True, last)
        gen, stream.gen = stream.gen, None
        if gen is not None:
            close_generator(gen)
        stream.close_subscriptions()
        stream.admission.release()
