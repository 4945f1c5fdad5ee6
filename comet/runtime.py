"""The threads that serve parked streams, started and stopped in one place.

A :class:`~comet.pool.StreamPool` counts streams; the threads that serve
the parked ones belong to its :class:`Runtime`: the writer thread
(:class:`comet.writer.Writer`) and its two step pools (generator steps, and
the requests served at accept time). They start with the first stream that
needs them and stop, ending every parked stream, when the pool closes; a
pool that reopens (an engine restart) starts new ones on first use.

The runtime is told what it needs of its pool (its counters, and how to
follow a hub); it does not know the pool, and the pool knows the writer
only through it.

>>> from comet.counters import Counters
>>> runtime = Runtime(Counters(("items",)), follow=lambda hub: None)
>>> runtime.writer() is runtime.writer()
True
>>> runtime.stop()
>>> runtime.writer() is None
True
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from .counters import Counters
from .writer import Writer

if TYPE_CHECKING:
    from .subscription import Owner

__all__ = ["Runtime"]


class Runtime:
    """The writer thread of one pool's parked streams, and its step pools."""

    def __init__(self, counters: Counters, follow: Callable[["Owner"], None]) -> None:
        self.counters = counters
        self.follow = follow
        self._lock = threading.Lock()
        self._writer: Writer | None = None
        self._stopping = False

    def writer(self) -> Writer | None:
        """The writer, started on first use; ``None`` once :meth:`stop` was
        called (until :meth:`reopen`)."""
        with self._lock:
            if self._stopping:
                return None
            if self._writer is None:
                self._writer = Writer(self.counters, self.follow)
            return self._writer

    def stop(self) -> None:
        """End every parked stream and the threads (their generators'
        ``finally`` runs); callable from any thread."""
        with self._lock:
            self._stopping = True
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()

    def reopen(self) -> None:
        """Start threads again on first use after :meth:`stop`."""
        with self._lock:
            self._stopping = False
