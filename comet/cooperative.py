"""The cooperative-step protocol: how a generator is stepped without a thread.

A generator handler that iterates a subscription would make its thread wait
for the next event. Stepped inside :class:`cooperative`, the wait returns at
once instead: the subscription records itself in the :class:`Step`
(``blocked``) and yields a falsy :class:`Idle` tick, so the stepper (the
parked writer, ``comet.writer``) suspends the generator and resumes it when
that channel moves. The hub only reads the current step
(:func:`current_step`) and notes the subscriptions it makes
(:func:`note_opened`); it knows nothing of streams, and this module nothing
of hubs: a step holds whatever subscription type its stepper names
(``Step[Subscription]``), anything with a ``closed`` flag.

The state is one thread-local: a step runs on one thread at a time.
"""
from __future__ import annotations

import threading
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Step", "cooperative", "Idle", "Opened", "current_step", "note_opened", "subscriptions_recorded"]


class Opened(Protocol):
    """What a step keeps of a subscription it saw opened: whether it is closed
    (:class:`comet.hub.Subscription` is one)."""

    @property
    def closed(self) -> bool: ...


S = TypeVar("S", bound=Opened)


class Step(Generic[S]):
    """What a cooperative stepper learns from one step of a generator: the
    subscription it would have waited on (``blocked``), if any. Set
    ``cancelled`` to end, instead, any subscription iterated in the step."""

    __slots__ = ("blocked", "cancelled", "opened")

    def __init__(self) -> None:
        self.blocked: S | None = None
        self.cancelled = False
        #: What the step subscribed to (one, or a list of several): the
        #: stepper closes it with the generator, should the generator not.
        self.opened: S | list[S] | None = None


_steps = threading.local()


def current_step() -> Step[Any] | None:
    """The step running on this thread (inside :class:`cooperative`), if any:
    a subscription iterated now records itself there rather than wait."""
    return getattr(_steps, "current", None)


def subscriptions_recorded(seen: list[S] | None) -> list[S] | None:
    """Until called again, every subscription opened on this thread (out
    of a :func:`cooperative` step) notes itself in *seen* (None: stop);
    returns what was set before. A thread-mode stream closes them with its
    generator: a ``for`` loop it broke out of leaves one open, and nothing
    else would close it."""
    before: list[S] | None = getattr(_steps, "seen", None)
    _steps.seen = seen
    return before


def note_opened(sub: Opened) -> None:
    """*sub* was just made: the step or stream running here owns it."""
    step = getattr(_steps, "current", None)
    if step is not None:
        opened = step.opened
        if opened is None or (not isinstance(opened, list) and opened.closed):
            step.opened = sub
        elif isinstance(opened, list):
            opened[:] = [other for other in opened if not other.closed]  # (one made and closed per loop: stays short)
            opened.append(sub)
        else:
            step.opened = [opened, sub]
        return
    seen = getattr(_steps, "seen", None)
    if seen is not None:
        seen[:] = [other for other in seen if not other.closed]  # (one made and closed per loop: stays short)
        seen.append(sub)


class cooperative:
    """Run generator steps in which iterating a :class:`~comet.hub.Subscription`
    never waits: with nothing new, it records itself in ``step.blocked`` and
    yields a tick, so the caller can suspend the generator and resume it when
    the channel moves. This is how comet serves generator handlers without a
    thread each (``comet.writer``); the hub itself knows nothing of streams.

    >>> from comet import Hub
    >>> hub = Hub()
    >>> def handler():
    ...     yield "hello"
    ...     yield from hub.subscribe("room")
    >>> gen, step = handler(), Step()
    >>> with cooperative(step):
    ...     items = [next(gen), next(gen), next(gen)]
    >>> items[0], bool(items[1]), bool(items[2]), step.blocked.channel
    ('hello', False, False, 'room')
    >>> gen.close()
    """

    # A class, not a @contextmanager: it is entered around every step of
    # every generator stream, and a generator-based one costs several times more.
    __slots__ = ("step", "previous")

    def __init__(self, step: Step[Any]) -> None:
        self.step = step
        self.previous: Step[Any] | None = None

    def __enter__(self) -> Step[Any]:
        self.previous = getattr(_steps, "current", None)
        _steps.current = self.step
        return self.step

    def __exit__(self, *exc: object) -> None:
        _steps.current = self.previous


class Idle:
    """Falsy "nothing new" marker with the cursor (``last_id``) reached so far.

    >>> bool(Idle("1-5")), Idle("1-5").last_id
    (False, '1-5')
    """

    __slots__ = ("last_id",)

    def __init__(self, last_id: str) -> None:
        self.last_id = last_id

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Idle) and other.last_id == self.last_id

    def __repr__(self) -> str:
        return f"Idle({self.last_id!r})"
