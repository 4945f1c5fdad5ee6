"""The writer's mailbox: what other threads hand the writer thread.

Three kinds of mail reach the writer thread, each from other threads: a
stream to park (the thread that opened it), a step's news (a step thread:
:class:`~comet.parked.News`) and a channel that moved (a publishing thread,
through the hub's watcher). They are queued under one lock, and the first
of a round writes one byte to a socket pair the writer's selector watches;
the writer takes everything queued at once, once per round.

A stream's news that comes before the writer took the stream travels with
it (``ParkedStream.news``) rather than with a wake-up of its own, so the
writer sees a stream's initial items before its first step's news.
"""
from __future__ import annotations

import selectors
import socket
import threading
from typing import Any, Collection

from .parked import News, ParkedStream

__all__ = ["Mailbox", "Mail"]

# (Reading an enum member through its class costs ~0.1 µs on Python 3.11: the
# per-stream and per-item paths below read these instead.)
_ITEM = News.ITEM

#: One step's news: the stream, what it reports, and its value.
Mail = tuple[ParkedStream, News, Any]


class Mailbox:
    """Parks, news and moved channels for one writer thread, and its wake-up
    socket (registered with *selector*, with ``None`` as its data)."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._adds: list[ParkedStream] = []
        self._dirty: set[tuple[int, str]] = set()
        self._inbox: list[Mail] = []
        self._woken = False
        self._exited = False

    # -- from other threads ---------------------------------------------------

    def park(self, stream: ParkedStream) -> bool:
        """Queue a stream to park; ``False`` if the writer has exited."""
        with self._lock:
            if self._exited:
                return False
            stream.news = []
            self._adds.append(stream)
            self._wake()
            return True

    def post(self, stream: ParkedStream, kind: News, value: Any) -> bool:
        """Queue a step's news; ``False`` if the writer has exited."""
        with self._lock:
            if self._exited:
                return False
            if stream.news is not None:  # invariant I5: not taken yet, its park()'s wake-up brings it
                stream.news.append((stream, kind, value))
                return True
            if kind is _ITEM:
                stream.inbox_items += 1
            self._inbox.append((stream, kind, value))
            self._wake()
            return True

    def mark(self, key: tuple[int, str]) -> None:
        """A channel moved (called by publishing threads)."""
        with self._lock:  # invariant I2: a set add and at most one byte, never a channel's lock
            self._dirty.add(key)
            self._wake()

    def wake_now(self) -> None:
        """Wake the writer thread even if a wake-up is on its way (to stop)."""
        with self._lock:
            self._woken = False
            self._wake()

    @property
    def waiting(self) -> int:
        """Streams queued to park, not taken yet."""
        return len(self._adds)

    def _wake(self) -> None:
        # Caller holds the lock.
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # already full of wake-ups, or closing

    # -- on the writer thread -------------------------------------------------

    def drain(self) -> None:
        """The wake-up socket turned readable: empty it."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # Cleared after draining (a byte sent meanwhile must not be swallowed
        # with the flag still set) and under the lock the senders take, before
        # reading what they queued.
        with self._lock:
            self._woken = False  # invariant I6

    def take_adds(self) -> list[tuple[ParkedStream, list[Mail] | None]]:
        """The streams queued to park, each with the news its steps posted
        meanwhile; from now on their steps post to the inbox."""
        with self._lock:
            adds, self._adds = self._adds, []
            taken = []
            for stream in adds:
                taken.append((stream, stream.news))
                stream.news = None
        return taken

    def take_news(self, taken: Collection[ParkedStream]) -> list[Mail]:
        """The steps' news, in order, for streams in *taken* (or ended): a
        stream whose first step outran its park() is not taken yet, and its
        news waits for the next round, after :meth:`take_adds`."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            early = [entry for entry in inbox if entry[0] not in taken and not entry[0].done]
            if early:
                inbox = [entry for entry in inbox if entry[0] in taken or entry[0].done]
                self._inbox[:0] = early
                self._wake()
            for stream, kind, _ in inbox:
                if kind is _ITEM:
                    stream.inbox_items -= 1
        return inbox

    def take_moved(self) -> set[tuple[int, str]]:
        """The channels that moved since the last look."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        return dirty

    def exit(self) -> tuple[list[ParkedStream], list[Mail]]:
        """The writer is exiting: later parks and posts are refused (their
        callers end the stream themselves). Returns what was still queued:
        the streams to park, and all news (theirs included)."""
        with self._lock:
            self._exited = True
            adds, self._adds = self._adds, []
            inbox, self._inbox = self._inbox, []
            for stream in adds:
                inbox += stream.news or ()
                stream.news = None
        return adds, inbox

    def close(self) -> None:
        """Close the wake-up sockets (after :meth:`exit`)."""
        self._wake_r.close()
        self._wake_w.close()
