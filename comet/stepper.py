"""Generator stepping: a generator handler's code, run a step at a time.

The writer thread never runs a handler's own code: it could block
(``time.sleep``, a database call) and stall every stream. A parked
generator is run in *steps* on a :class:`~comet.steps.StepPool` instead,
each until the generator waits on a hub (:class:`comet.hub.cooperative`
makes that wait return at once and say which subscription it was), ends,
or has produced :data:`~comet.parked.STEP_BUDGET` items. A step posts what
it produced and how it ended to the writer's mailbox
(:class:`~comet.parked.News`); the writer thread hands that news to
:meth:`Stepper.handle`, which writes the items, waits on the subscription
the generator waits on, or starts the next step. A step whose stream ended
meanwhile closes the generator itself; a generator that is suspended when
its stream ends is closed on a pool thread (:meth:`Stepper.close`).
"""
from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from typing import Any, Callable, Generator, Protocol

from .fanout import Fanout
from .hub import Idle, Step, Subscription, cooperative
from .mailbox import Mail
from .parked import (STEP_BUDGET, STEP_HIGH_ITEMS, STEP_HIGH_WATER, End, News, ParkedStream, Phase,
                     StepState, close_generator, delegates_to)
from .steps import StepPool

__all__ = ["Stepper", "Ends"]

log = logging.getLogger("comet")

# (Reading an enum member through its class costs ~0.1 µs on Python 3.11: the
# per-stream and per-item paths below read these instead.)
_ITEM, _DONE = News.ITEM, Phase.DONE


class Ends(Protocol):
    """What stepping needs of the writer (:class:`comet.writer.Writer`)."""

    def end(self, stream: ParkedStream, why: End) -> None:
        """End *stream* (the one way a parked stream ends)."""

    def tell_cursor(self, stream: ParkedStream) -> None:
        """Tell *stream*'s client its cursor now, if it has not been told."""


class Stepper:
    """Runs parked generators' steps on *steps*; a step's news goes to
    *post* (the writer's mailbox), and comes back to :meth:`handle`."""

    def __init__(self, steps: StepPool, post: Callable[[ParkedStream, News, Any], None], fanout: Fanout,
                 writer: Ends) -> None:
        self.steps = steps
        self._post = post
        self._fanout = fanout
        self._writer = writer

    def submit(self, stream: ParkedStream) -> None:
        """Give *stream*'s generator its next step, unless one runs or the
        stream is done."""
        if stream.step_state is not StepState.IDLE or stream.done:
            return
        stream.step_state = StepState.RUNNING
        stream.step = Step()
        self.steps.submit(lambda: self.run(stream))

    def run(self, stream: ParkedStream, enter: bool = True) -> None:
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
                        if stream.poll is not None:
                            self._post(stream, News.CURSOR, cursor)
                    if step.blocked is not None:
                        outcome, value = News.WAITING, step.blocked
                        break
                    continue  # the handler's own "nothing yet": it keeps this thread meanwhile
                self._post(stream, _ITEM, item)
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
            direct = delegates_to(gen, value)
            self._post(stream, News.WAITING, (value, direct, cursor))  # (its cursor after its items: in order)
        elif outcome is News.AGAIN:
            self._post(stream, News.AGAIN, step.blocked)
        else:
            if outcome is News.CANCELLED:
                with context() if context is not None else nullcontext():
                    close_generator(gen)
            self._post(stream, outcome, step.blocked)

    def close(self, stream: ParkedStream, gen: Generator[Any, None, Any]) -> None:
        """Close a generator whose stream ended (its ``finally`` runs), then
        the subscriptions it waited on, then give its place back: on a pool
        thread, never the writer's, for it is the handler's own code."""
        stream.step_state = StepState.CLOSING  # no step is started any more

        def close() -> None:
            with stream.context() if stream.context is not None else nullcontext():
                close_generator(gen)
                stream.close_subscriptions()
            stream.admission.release()

        self.steps.submit(close)  # invariant I4

    def handle(self, inbox: list[Mail]) -> None:
        """What steps reported, in order: items, cursors, how they ended."""
        for stream, kind, value in inbox:
            if kind is _ITEM:
                if stream.phase is not _DONE:
                    self._fanout.emit(stream, [value])
                    if stream.poll is not None and stream.poll.full:
                        self._writer.end(stream, End.ANSWERED)
                continue
            if kind is News.CURSOR:
                poll = stream.poll
                if poll is not None:
                    poll.stands_at(value)
                    if poll.handshake and stream.phase is Phase.OPEN:
                        self._writer.end(stream, End.ANSWERED)
                continue
            stream.step_state, stream.step = StepState.IDLE, None
            if kind is not News.WAITING and value is not None:
                stream.owns(value)  # the subscription the step waited on in place
            if kind is News.WAITING:
                sub, direct, cursor = value
                stream.waits_on(sub)
                stream.direct = direct
                if cursor is not None:
                    stream.known = cursor
                if stream.phase is not Phase.OPEN:
                    self._writer.end(stream, End.STEPPED)
                    continue
                self._fanout.join(stream, sub)
                if stream.given is None and stream.framing.beats_cursor and stream.poll is None:
                    self._writer.tell_cursor(stream)  # its first cursor: at once, not a heartbeat later
                if stream.poll is not None and stream.poll.entries:
                    self._writer.end(stream, End.ANSWERED)
                elif sub.moved():  # moved since the step looked
                    if direct:
                        self._fanout.feed(stream)
                    else:
                        self.submit(stream)
            elif kind is News.AGAIN:
                if stream.phase is not Phase.OPEN:
                    self._writer.end(stream, End.STEPPED)
                else:
                    self.submit(stream)
            elif kind is News.FINISHED or kind is News.FAILED:
                stream.gen = None
                if stream.done:
                    self._writer.end(stream, End.STEPPED)
                elif kind is News.FINISHED or stream.poll is not None:
                    self._writer.end(stream, End.FINISHED)  # (a long-poll answers with what it has)
                else:
                    self._writer.end(stream, End.FAILED)
            else:  # cancelled: the step closed the generator
                stream.gen = None
                self._writer.end(stream, End.STEPPED)  # invariant I3: its news lets go of the rest
