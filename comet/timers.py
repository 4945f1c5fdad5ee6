"""The writer's timer heap: when each parked stream needs a look.

A parked stream is due at its next heartbeat, its ``max_duration`` or its
long-poll's ``poll_timeout``, whichever comes first
(:meth:`~comet.parked.ParkedStream.next_due`). One heap holds one entry per
stream; the writer thread sleeps in its selector until the earliest, and
handles the streams that are due (:meth:`Timers.due`). Only the writer
thread touches it.
"""
from __future__ import annotations

import heapq
from typing import Any, Iterator

from .parked import ParkedStream

__all__ = ["Timers"]


class Timers:
    """A heap of ``[due, serial, stream]`` entries, one per stream; an ended
    stream's entry stays as a tombstone (its stream ``None``) until popped or
    compacted away."""

    def __init__(self) -> None:
        self.entries: list[list[Any]] = []  # [due, serial, stream or None once it ended]
        self.dead = 0
        self._serial = 0

    def next_due(self) -> float | None:
        """When the earliest entry is due (``None``: there is none)."""
        return self.entries[0][0] if self.entries else None

    def schedule(self, stream: ParkedStream, now: float = 0.0) -> None:
        """Put *stream* in the heap at its next due time (replacing its
        entry), unless nothing is ever due for it."""
        stream.due = stream.next_due()
        if stream.due <= now:
            # Its heartbeat is overdue but waits behind bytes the socket has
            # not taken (a client that reads nothing, or vanished): look
            # again a heartbeat later, not at once, forever (a busy loop that
            # would stall every stream of this writer).
            stream.due = now + stream.heartbeat
        if stream.due != float("inf"):
            self.unschedule(stream)  # (one entry per stream: any earlier one is void)
            self._serial += 1
            stream.timer = [stream.due, self._serial, stream]
            heapq.heappush(self.entries, stream.timer)

    def unschedule(self, stream: ParkedStream) -> None:
        """Let go of a stream's timer now, not at its due time: the heap
        would keep an ended stream (its socket object, buffers, request)
        alive up to a heartbeat interval after its client left, and a
        connect/disconnect storm would pile them up. Its entry stays as a
        tombstone; the heap is compacted, in place (:meth:`due` may be
        walking it), once they are half of it."""
        entry, stream.timer = stream.timer, None
        if entry is None:
            return
        entry[2] = None
        self.dead += 1
        if self.dead > 64 and 2 * self.dead > len(self.entries):
            self.entries[:] = [e for e in self.entries if e[2] is not None]
            heapq.heapify(self.entries)
            self.dead = 0

    def due(self, now: float) -> Iterator[ParkedStream]:
        """The streams due by *now*, earliest first, each taken out of the
        heap (:meth:`schedule` puts one back)."""
        entries = self.entries
        while entries and entries[0][0] <= now:
            stream = heapq.heappop(entries)[2]
            if stream is None:  # (ended: see unschedule)
                self.dead -= 1
                continue
            stream.timer = None
            yield stream
