"""Parked streams: many idle streams, one writer thread.

A classic stream holds a server worker thread for its whole life, so open
streams are capped by the thread pool. A *parked* stream gives its thread
back once the response headers are out: its socket moves to the
:class:`Parker`, one thread around a selector (epoll on Linux), which

* is woken once per publish per channel (:meth:`comet.Hub.watch`), takes
  what each parked subscription has not seen (:meth:`Subscription.take`) and
  writes it. Events are encoded, and chunk-framed, once per transport and the
  same bytes object goes to every socket;
* keeps a bounded output buffer per socket. A consumer whose buffer passes
  ``max_buffer`` bytes is disconnected rather than allowed to grow memory or
  slow anyone down; its client reconnects with its last id and resumes (with
  a gap event if it fell out of the replay buffer);
* writes heartbeats, ends streams past ``max_duration``, and notices a client
  that went away when its socket turns readable with EOF;
* on :meth:`stop`, ends every stream (terminating chunk, close) at once.

Only a :class:`~comet.hub.Subscription` *returned* by a handler can be
parked: an arbitrary generator may block, so it keeps its thread. TLS sockets
stay in thread mode (their writes may need reads).
"""
from __future__ import annotations

import collections
import logging
import selectors
import socket
import threading
import time
from typing import Any

from .framing import Event, encode_item, heartbeat
from .hub import Subscription

__all__ = ["Parker", "ParkedStream", "end_parked"]

log = logging.getLogger("comet")

_SCAN_EVERY = 1.0


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class ParkedStream:
    """One parked response: its socket, subscription and output buffer."""

    __slots__ = ("sock", "sub", "transport", "boundary", "chunked", "heartbeat", "deadline", "max_bytes",
                 "ticket", "out", "out_size", "last_write", "writing", "done", "key", "on_end")

    def __init__(self, sock: socket.socket, sub: Subscription, transport: str, boundary: str, chunked: bool,
                 heartbeat: float, deadline: float | None, max_bytes: int, ticket: int, on_end: Any = None) -> None:
        self.sock = sock
        self.sub = sub
        self.transport = transport
        self.boundary = boundary
        self.chunked = chunked
        self.heartbeat = heartbeat
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.ticket = ticket
        self.out: collections.deque = collections.deque()
        self.out_size = 0
        self.last_write = time.monotonic()
        self.writing = False
        self.done = False
        self.key = (id(sub.hub), sub.channel)
        self.on_end = on_end

    @property
    def channel(self) -> str:
        return self.sub.channel

    def stop(self) -> None:
        """Nothing to do: :meth:`Parker.stop` ends every parked stream."""


class Parker:
    """The writer thread for parked streams of one :class:`~comet.stream.StreamPool`."""

    def __init__(self, pool: Any, max_buffer: int = 1 << 20) -> None:
        self.pool = pool
        self.max_buffer = max_buffer
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._adds: list[ParkedStream] = []
        self._dirty: set = set()
        self._woken = False
        self._groups: dict[tuple, set[ParkedStream]] = {}
        self._unwatch: dict[tuple, Any] = {}
        self._streams: set[ParkedStream] = set()
        self._stopping = False
        self._exited = False
        self._thread = threading.Thread(target=self._run, name="comet-parker", daemon=True)
        self._thread.start()

    # -- from other threads ---------------------------------------------------

    def park(self, stream: ParkedStream) -> None:
        """Hand a stream over (from the worker thread that sent its headers).
        A writer that has already exited ends the stream at once instead."""
        with self._lock:
            if not self._exited:
                self._adds.append(stream)
                stream = None
        if stream is not None:
            end_parked(self.pool, stream, final=True)
            return
        self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # already full of wake-ups, or closing

    def _mark(self, key: tuple) -> None:
        # Called by publishing threads: record the channel, wake the writer.
        with self._lock:
            self._dirty.add(key)
        self._wake()

    @property
    def parked(self) -> int:
        return len(self._streams) + len(self._adds)

    def stop(self, timeout: float = 5.0) -> None:
        """End every parked stream and the thread."""
        self._stopping = True
        self._woken = False
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the writer thread ------------------------------------------------------

    def _run(self) -> None:
        next_scan = time.monotonic() + _SCAN_EVERY
        try:
            while not self._stopping:
                timeout = max(0.0, next_scan - time.monotonic())
                for key, mask in self._selector.select(timeout):
                    stream = key.data
                    if stream is None:
                        self._drain_wake()
                    elif mask & selectors.EVENT_READ and not stream.done:
                        self._readable(stream)
                    if stream is not None and mask & selectors.EVENT_WRITE and not stream.done:
                        self._flush(stream)
                self._take_adds()
                self._dispatch()
                now = time.monotonic()
                if now >= next_scan:
                    self._scan(now)
                    next_scan = now + _SCAN_EVERY
        except Exception:
            log.exception("comet: parked-stream writer crashed; ending its streams")
        finally:
            with self._lock:
                self._exited = True  # later park() calls end their stream themselves
                adds, self._adds = self._adds, []
            for stream in list(self._streams) + adds:
                self._end(stream, final=True)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # Clear the flag after draining (a byte sent meanwhile must not be
        # swallowed with the flag still set: every later wake would be
        # skipped) and before reading the dirty set (a mark that saw the flag
        # set is in the set we are about to read).
        self._woken = False

    def _take_adds(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
        for stream in adds:
            try:
                stream.sock.setblocking(False)
                self._selector.register(stream.sock, selectors.EVENT_READ, stream)
            except (OSError, ValueError):
                self._end(stream)
                continue
            self._streams.add(stream)
            group = self._groups.get(stream.key)
            if group is None:
                group = self._groups[stream.key] = set()
                key = stream.key
                self._unwatch[key] = stream.sub.hub.watch(stream.sub.channel, lambda: self._mark(key))
            group.add(stream)
            self._feed(stream)  # initial items, a gap, or what was published meanwhile
            if stream.out and not stream.writing and not stream.done:
                self._flush(stream)  # a fast route's response head

    def _dispatch(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for key in dirty:
            self._fan_out(list(self._groups.get(key, ())))

    def _fan_out(self, streams: list[ParkedStream]) -> None:
        """Write what is new to every stream of one channel.

        The hot path of a broadcast. Streams at the same cursor with no view,
        nothing queued and chunked SSE/NDJSON framing receive the very same
        bytes: one take(), one join, then one send() each. Everything else
        (views, multipart boundaries, backlogs) goes through _feed.
        """
        shared: dict[tuple[int, str], tuple[int, bytes, int, str]] = {}
        now = time.monotonic()
        items = sent_bytes = 0
        for stream in streams:
            sub = stream.sub
            if (sub.view is not None or stream.out or sub._pending or not stream.chunked
                    or stream.transport == "multipart" or stream.done):
                self._feed(stream)
                continue
            if sub.ended:
                self._end(stream, final=True)
                continue
            key = (sub.cursor, stream.transport)
            hit = shared.get(key)
            if hit is None:
                taken = sub.take()
                try:
                    data = b"".join([self._wire(stream, item) for item in taken])
                except (ValueError, TypeError) as exc:
                    log.error("comet: ending parked %s stream, cannot encode: %s", stream.transport, exc)
                    self._end(stream)
                    continue
                hit = shared[key] = (sub.cursor, data, len(taken), sub.last_id)
            else:
                sub._jump(hit[0], hit[3])
            data = hit[1]
            if not data:
                continue
            items += hit[2]
            try:
                sent = stream.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.pool.counters.add("disconnects")
                self._end(stream)
                continue
            sent_bytes += sent
            stream.last_write = now
            if sent < len(data):
                stream.out.append(memoryview(data)[sent:])
                stream.out_size += len(data) - sent
                self._flush(stream)  # registers for writability, enforces the cap
        self.pool.counters.add("items", items)
        self.pool.counters.add("bytes", sent_bytes)

    def _feed(self, stream: ParkedStream) -> None:
        sub = stream.sub
        if sub.ended:
            self._end(stream, final=True)
            return
        try:
            items = sub.take()
        except Exception:
            log.exception("comet: a parked subscription's view failed; ending the stream")
            self._end(stream)
            return
        for item in items:
            try:
                data = self._wire(stream, item)
            except (ValueError, TypeError) as exc:
                log.error("comet: ending parked %s stream, cannot encode %r: %s", stream.transport, type(item).__name__, exc)
                self._end(stream)
                return
            stream.out.append(data)
            stream.out_size += len(data)
        if items:
            self.pool.counters.add("items", len(items))
            self._flush(stream)

    def _wire(self, stream: ParkedStream, item: Any) -> bytes:
        # Shared events are encoded and chunk-framed once per transport; the
        # same bytes object is written to every socket.
        if isinstance(item, Event) and stream.transport != "multipart" and stream.chunked:
            key = stream.transport + "+chunk"
            wire = item._wire.get(key)
            if wire is None:
                wire = item._wire[key] = _chunk(encode_item(item, stream.transport, "", stream.max_bytes))
            return wire
        payload = encode_item(item, stream.transport, stream.boundary, stream.max_bytes)
        return _chunk(payload) if stream.chunked else payload

    def _flush(self, stream: ParkedStream) -> None:
        out = stream.out
        sock = stream.sock
        try:
            while out:
                data = out[0]
                sent = sock.send(data)
                self.pool.counters.add("bytes", sent)
                stream.out_size -= sent
                if sent < len(data):
                    out[0] = memoryview(data)[sent:]
                    break
                out.popleft()
        except BlockingIOError:
            pass
        except OSError:
            self.pool.counters.add("disconnects")
            self._end(stream)
            return
        stream.last_write = time.monotonic()
        if out:
            if stream.out_size > self.max_buffer:
                log.info("comet: disconnecting a slow consumer (%d bytes unsent)", stream.out_size)
                self.pool.counters.add("slow_consumers")
                self._end(stream)
                return
            if not stream.writing:
                stream.writing = True
                self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, stream)
        elif stream.writing:
            stream.writing = False
            self._selector.modify(sock, selectors.EVENT_READ, stream)

    def _readable(self, stream: ParkedStream) -> None:
        try:
            data = stream.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the client went away
            self.pool.counters.add("disconnects")
            self._end(stream)
        # Anything else is a pipelined request we will never answer; ignore it.

    def _scan(self, now: float) -> None:
        for stream in list(self._streams):
            if stream.done:
                continue
            if stream.sub.ended or (stream.deadline is not None and now >= stream.deadline):
                self._end(stream, final=True)
            elif now - stream.last_write >= stream.heartbeat and not stream.out:
                beat = heartbeat(stream.transport)
                stream.out.append(_chunk(beat) if stream.chunked else beat)
                stream.out_size += len(stream.out[-1])
                self.pool.counters.add("heartbeats")
                self._flush(stream)

    def _end(self, stream: ParkedStream, final: bool = False) -> None:
        if stream.done:
            return
        stream.done = True
        self._streams.discard(stream)
        group = self._groups.get(stream.key)
        if group is not None:
            group.discard(stream)
            if not group:
                del self._groups[stream.key]
                unwatch = self._unwatch.pop(stream.key, None)
                if unwatch is not None:
                    unwatch()
        try:
            self._selector.unregister(stream.sock)
        except (KeyError, ValueError, OSError):
            pass
        end_parked(self.pool, stream, final)


def end_parked(pool: Any, stream: ParkedStream, final: bool = False) -> None:
    """Close a parked stream's response and release what it holds: its
    socket, its subscription (whose ``on_close`` callbacks run) and its
    place in *pool*. ``final``: end it properly (what is queued, then the
    terminating chunk) as far as the socket takes it without blocking."""
    stream.done = True
    sock = stream.sock
    try:
        if final:
            sock.setblocking(False)
            while stream.out:
                data = stream.out[0]
                sent = sock.send(data)
                if sent < len(data):
                    break
                stream.out.popleft()
            if stream.chunked and not stream.out:
                sock.send(b"0\r\n\r\n")  # the client may reconnect at once
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    stream.out.clear()
    try:
        stream.sub.close()  # runs the handler's on_close callbacks (presence, cleanup)
    finally:
        pool.release(stream.ticket)
