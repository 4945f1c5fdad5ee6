"""Exact counters for stats, shared by the hub and the stream layers."""
from __future__ import annotations

import threading
from array import array
from typing import Iterable

__all__ = ["Counters"]


class Counters:
    """Named counters that any thread may add to; exact under concurrency.

    >>> counters = Counters(("bytes",))
    >>> counters.add("bytes", 10); counters.add("bytes", 5)
    >>> counters["bytes"], counters.snapshot()
    (15, {'bytes': 15})
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._index: dict[str, int] = {}
        # The counts live in an array, not as int objects in a dict: an int
        # made by the last of a burst of adds would stay, alone, in the
        # middle of the allocator's pages the burst used, and keep them all
        # from going back to the system (see tests/test_forget.py).
        self._values = array("q")
        for name in names:
            self._slot(name)

    def _slot(self, name: str) -> int:
        """The index of *name*'s count, made at 0 if new; the caller holds the lock (or owns self)."""
        index = self._index.get(name)
        if index is None:
            self._values.append(0)  # before the index: get() reads without the lock
            index = self._index[name] = len(self._values) - 1
        return index

    def add(self, name: str, n: int = 1) -> None:
        # One uncontended lock is ~0.1 µs: cheap next to a send(), and
        # "+=" without it loses counts between threads.
        with self._lock:
            self._values[self._slot(name)] += n

    def __getitem__(self, name: str) -> int:
        return self.get(name)

    def get(self, name: str, default: int = 0) -> int:
        index = self._index.get(name)
        return default if index is None else self._values[index]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: self._values[index] for name, index in self._index.items()}

    def __repr__(self) -> str:
        return f"Counters({self.snapshot()!r})"
