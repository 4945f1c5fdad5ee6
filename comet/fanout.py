"""Fan-out: what a channel's publish writes to the streams waiting on it.

Streams that wait on the same channel form a group, with one watcher on the
hub (:meth:`~comet.hub.Feed.watch`): a publish marks the group's channel in
the writer's mailbox, and the writer thread then writes what is new to each
stream of the group (:meth:`Fanout.dispatch`). Events are encoded, and
chunk-framed, once per transport: streams read in place at the same cursor
get the very same bytes object (the event's encoding cache), so a broadcast
costs one encoding and one ``send()`` per socket. A generator that
transforms events is given a step instead; a long-poll gathers its answer.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from .counters import Counters
from .framing import Event, longpoll_item
from .hub import Feed
from .parked import STEP_HIGH_WATER, End, ParkedStream, Phase, StepState, chunk, last_event_id

if TYPE_CHECKING:
    from .subscription import Owner

__all__ = ["Fanout", "Writes"]

log = logging.getLogger("comet")

# (Reading an enum member through its class costs ~0.1 µs on Python 3.11: the
# per-stream and per-item paths below read these instead.)
_OPEN, _DONE, _IDLE = Phase.OPEN, Phase.DONE, StepState.IDLE


class Writes(Protocol):
    """What fan-out needs of the writer (:class:`comet.writer.Writer`)."""

    counters: Counters

    def flush(self, stream: ParkedStream) -> None:
        """Send what is queued on *stream*, as far as its socket takes it."""

    def end(self, stream: ParkedStream, why: End) -> None:
        """End *stream* (the one way a parked stream ends)."""

    def step(self, stream: ParkedStream) -> None:
        """Give *stream*'s generator a step."""


class Fanout:
    """The groups of parked streams by channel, and writing to them."""

    def __init__(self, writes: Writes, mark: Callable[[tuple[int, str]], None], follow: Callable[["Owner"], None]) -> None:
        self._writes = writes
        self._mark = mark  # (the mailbox's: called by publishing threads)
        self._follow = follow
        self._groups: dict[tuple[int, str], set[ParkedStream]] = {}
        self._unwatch: dict[tuple[int, str], Callable[[], None]] = {}

    def join(self, stream: ParkedStream, sub: Feed) -> None:
        """Wait on *sub*'s channel: the writer hears of every publish to it."""
        # The channel object, not just its name: a forgotten channel's streams
        # must not share a group (and its watcher) with its successor's.
        key = sub.group_key()
        if stream.key == key:
            return
        self.leave(stream)
        stream.key = key
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = set()
            self._unwatch[key] = sub.watch(lambda: self._mark(key))
            self._follow(sub.hub)  # its subscriptions end with the pool's streams at shutdown
        group.add(stream)

    def leave(self, stream: ParkedStream) -> None:
        """Stop waiting on its channel (its group's watcher goes with the last)."""
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

    def dispatch(self, moved: set[tuple[int, str]]) -> None:
        """Write what is new to every stream waiting on a channel that moved."""
        for key in moved:
            self._fan_out(list(self._groups.get(key, ())))

    def _fan_out(self, streams: list[ParkedStream]) -> None:
        """Write what is new to every stream waiting on one channel.

        The hot path of a broadcast. Streams read directly, at the same
        cursor, with no view, nothing queued and chunked SSE/NDJSON framing
        receive the very same bytes: one take(), one join, then one send()
        each. Everything else goes through feed, or (a generator that
        transforms events) gets a step.
        """
        shared: dict[tuple[int, str], tuple[int, bytes, int, str, str | None]] = {}
        now = time.monotonic()
        items = sent_bytes = 0
        for stream in streams:
            if stream.phase is _DONE or stream.step_state is not _IDLE:
                continue
            sub = stream.sub
            assert sub is not None
            if not stream.direct:
                self._writes.step(stream)
                continue
            if stream.out_size > STEP_HIGH_WATER and stream.bounded():
                stream.paused = True  # flush() reads it again once the socket has taken most of it
                continue
            if (sub.view is not None or stream.out or sub.has_pending or not stream.chunked or sub.ended
                    or not stream.framing.shared_bytes or stream.poll is not None):
                self.feed(stream)
                continue
            key = (sub.cursor, stream.transport)
            hit = shared.get(key)
            if hit is None:
                taken = sub.take()
                try:
                    data = b"".join([self._wire(stream, item) for item in taken])
                except (ValueError, TypeError) as exc:
                    log.error("comet: ending parked %s stream, cannot encode: %s", stream.transport, exc)
                    self._writes.end(stream, End.UNENCODABLE)
                    continue
                hit = shared[key] = (sub.cursor, data, len(taken), sub.last_id, last_event_id(taken))
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
                self._writes.counters.add("disconnects")
                self._writes.end(stream, End.GONE)
                continue
            sent_bytes += sent
            stream.last_write = now
            if sent < len(data):
                stream.out.append(memoryview(data)[sent:])
                stream.out_size += len(data) - sent
                self._writes.flush(stream)  # registers for writability, enforces the cap
        self._writes.counters.add("items", items)
        self._writes.counters.add("bytes", sent_bytes)

    def feed(self, stream: ParkedStream) -> None:
        """Write what the subscription read in place of its stream has."""
        sub = stream.sub
        assert sub is not None
        if sub.ended:
            if stream.gen is not None:
                self._writes.step(stream)  # the generator goes on after its ``yield from``
            else:
                if stream.poll is not None:
                    stream.poll.stands_at(sub.last_id)  # ended with no news (a disconnect): still a whole answer
                self._writes.end(stream, End.FINISHED)
            return
        if stream.out_size > STEP_HIGH_WATER and stream.bounded():
            stream.paused = True
            return
        try:
            items = sub.take()
        except Exception:
            log.exception("comet: a parked subscription's view failed; ending the stream")
            self._writes.end(stream, End.FAILED)
            return
        self.emit(stream, items)
        poll = stream.poll
        if poll is not None:
            poll.stands_at(sub.last_id)  # where the hub stands, even with nothing new
            if poll.ready and not stream.done:
                self._writes.end(stream, End.ANSWERED)

    def emit(self, stream: ParkedStream, items: Sequence[Any]) -> None:
        """Queue *items* on *stream* (a long-poll: gather them) and write."""
        if not items or stream.phase is not _OPEN:
            return
        poll = stream.poll
        if poll is not None:
            for item in items:
                if poll.full:
                    break
                try:
                    poll.entries.append(longpoll_item(item))
                except (ValueError, TypeError) as exc:
                    log.error("comet: ending long-poll, cannot encode %r: %s", type(item).__name__, exc)
                    self._writes.end(stream, End.FAILED)
                    return
                if isinstance(item, Event) and item.id is not None:
                    poll.cursor = item.id
            self._writes.counters.add("items", len(items))
            return
        for item in items:
            try:
                stream.queue(self._wire(stream, item))
            except (ValueError, TypeError) as exc:
                log.error("comet: ending parked %s stream, cannot encode %r: %s", stream.transport, type(item).__name__, exc)
                self._writes.end(stream, End.UNENCODABLE)
                return
            if isinstance(item, Event) and item.id is not None:
                stream.given = item.id
        self._writes.counters.add("items", len(items))
        self._writes.flush(stream)

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
