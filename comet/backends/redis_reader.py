"""The reader thread of a :class:`~comet.backends.redis.RedisHub` (not on a cluster).

One thread per process follows every channel the process mirrors with one
blocking ``XREAD`` and hands what it reads to its :class:`Followed` (the
hub's :class:`~comet.backends.redis_store.RedisStore`), which appends it to
the mirrors. A channel that becomes live interrupts the blocked read
(:meth:`StreamReader.nudge`: ``CLIENT UNBLOCK``) so it joins at once. The
reader reconnects with exponential backoff (with jitter) and resumes every
channel from the last id appended. On a cluster a reader per master does
this instead (:mod:`comet.backends.redis_cluster`).
"""
from __future__ import annotations

import logging
import random
import threading
from typing import Protocol, cast

import redis
from redis.typing import KeyT, StreamIdT

from .redis_link import DOWN, Entry, RedisLink

__all__ = ["StreamReader", "Followed"]

log = logging.getLogger("comet")


class Followed(Protocol):
    """What the reader follows and delivers into."""

    def following(self) -> tuple[int, dict[KeyT, StreamIdT]]:
        """The version of what is followed (bumped as channels come and
        go), and the ``XREAD`` arguments: stream key -> the id read up to."""
        ...

    def deliver(self, key: bytes, entries: list[Entry]) -> None:
        """What the reader read from stream *key*."""
        ...

    def reader_ready(self, conn: redis.Redis) -> None:
        """The reader connected on *conn* and reads next (its first read may start here)."""
        ...

    def reader_changed(self, connected: bool) -> None:
        """The reader connected (True, once per connection) or lost Redis."""
        ...


class StreamReader:
    """The thread ``comet-redis-reader`` and its handshakes."""

    def __init__(self, link: RedisLink, followed: Followed, *, block: float, backoff: tuple[float, float]) -> None:
        self._link = link
        self._followed = followed
        self.block = block
        self.backoff = backoff
        #: The reader's Redis client id while it is connected (``CLIENT UNBLOCK`` takes it).
        self.client_id: int | None = None
        #: True while the reader holds a working connection to Redis.
        self.connected = False
        self._seen_version = 0  # the version the reader's current XREAD covers
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="comet-redis-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def nudge(self, version: int) -> None:
        """Make the reader's XREAD include channels up to *version* now.

        CLIENT UNBLOCK only affects a client that is already blocked, so it
        is repeated until the reader is either unblocked or has picked the
        new channel up by itself (a bounded handshake, at most ~0.5 s).
        """
        self._changed.set()
        for _ in range(100):
            if self._seen_version >= version or not self.connected or self.client_id is None:
                return
            try:
                if self._link.loader.client_unblock(self.client_id):
                    return
            except DOWN:
                return
            self._stop.wait(0.005)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._followed.reader_changed(connected)

    def _read_loop(self) -> None:
        delay = self.backoff[0]
        conn: redis.Redis | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._link.connect(self._link.reader_options)
                    self.client_id = conn.client_id()
                    self._followed.reader_ready(conn)
                    self._set_connected(True)
                    delay = self.backoff[0]
                    log.info("comet: Redis reader connected to %s", self._link.where)
                self._read_once(conn)
            except DOWN as exc:
                if self._stop.is_set():
                    break
                if self.connected:
                    log.warning("comet: lost Redis at %s (%s); reconnecting", self._link.where, exc)
                self._set_connected(False)
                self.client_id = None
                if conn is not None:
                    conn.close()
                    conn = None
                self._stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.backoff[1])
            except Exception:  # a bug must not silently stop delivery for the whole process
                log.exception("comet: Redis reader failed; restarting it")
                self._stop.wait(delay)
        self._set_connected(False)
        if conn is not None:
            conn.close()

    def _read_once(self, conn: redis.Redis) -> None:
        self._changed.clear()  # before the snapshot: a channel added after it sets it again
        version, streams = self._followed.following()
        if not streams:
            self._seen_version = version
            self._changed.wait(self.block)
            return
        self._seen_version = version
        # RESP2's shape: [[key, entries], ...], or None when the block timed out.
        reply = cast("list[tuple[bytes, list[Entry]]] | None",
                     conn.xread(streams, count=1000, block=int(self.block * 1000)))
        for key, entries in reply or ():
            self._followed.deliver(key, entries)

    def close(self) -> None:
        """Stop the thread (``CLIENT UNBLOCK`` ends its wait), and join it."""
        self._stop.set()
        self._changed.set()
        if self.client_id is not None:
            try:
                self._link.redis.client_unblock(self.client_id)
            except DOWN:
                pass
        if self._thread.is_alive():
            self._thread.join(self.block + 10)
