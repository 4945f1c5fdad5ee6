"""Channels that come and go, on the in-memory hub: forget(), retention by
time, idle channels forgotten, and the memory they leave behind (none).

The Redis hub's side is tests/test_forget_redis.py.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from array import array

import cherrypy
import pytest

from comet import GAP, Hub, comet
from comet.channel import Channel
from comet.hub import parse_id
from comet.testing import wait_until  # (imported now, not amid a measurement as settle() would)

from conftest import RawStream, settle


_LIBC = ctypes.CDLL("libc.so.6")  # (once: loading it makes objects that would land amid a burst's pages)


def rss_mb() -> float:
    """Resident memory in MB, after handing free heap back to the system.

    glibc keeps freed memory for reuse rather than returning it; trimming
    first makes two readings compare what live objects hold, which is what
    "memory returns to where it started" means."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class sample_cursors:
    """A few event ids kept through a burst of channels as numbers, in an
    array made before it: a string kept from amid the burst would stay
    alone in the allocator's pages around it and keep them all from going
    back to the system, which would be the test's doing, not the hub's."""

    def __init__(self, size: int) -> None:
        self.parts = array("q", [0] * 2 * size)

    def keep(self, index: int, event_id: str) -> None:
        self.parts[2 * index], self.parts[2 * index + 1] = parse_id(event_id)

    def ids(self) -> list[str]:
        return [f"{self.parts[i]}-{self.parts[i + 1]}" for i in range(0, len(self.parts), 2)]


def test_forget_drops_the_channel_and_an_old_cursor_gets_an_exact_gap(hub):
    ids = [hub.publish("game:1", n) for n in range(3)]
    hub.publish("lobby", "stays")
    assert hub.forget("game:1") is True
    assert hub.forget("game:1") is False  # already gone
    assert hub.channels() == ["lobby"] and hub.history("game:1") == []
    new = hub.publish("game:1", "second game")
    assert parse_id(new) > parse_id(ids[-1])  # a later epoch: no id of the old game comes back
    for cursor in ids:  # every cursor of the old game, even its newest
        sub = hub.subscribe("game:1", last_id=cursor)
        gap, event = sub.take()
        assert gap.name == GAP and gap.data == {"last_id": cursor, "resume_id": hub.before(new)}
        assert gap.id == hub.before(new) and event.data == "second game"
        sub.close()
    assert [e.data for e in hub.history("lobby")] == ["stays"]
    assert hub.counters["forgotten"] == 1


def test_ids_of_channels_recreated_within_one_millisecond_never_collide(hub):
    seen: list[str] = []
    for _ in range(200):  # far more than one per millisecond
        seen += [hub.publish("room", n) for n in range(3)]
        hub.forget("room")
    keys = [parse_id(i) for i in seen]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_a_waiting_subscription_takes_what_was_published_then_ends(hub):
    sub = hub.subscribe("game:2")
    got: list = []
    done = threading.Event()

    def follow():
        got.extend(item.data for item in sub if item)
        done.set()

    thread = threading.Thread(target=follow)
    thread.start()
    settle(lambda: hub.subscriptions == 1, what="the subscriber waits")
    hub.publish("game:2", "move")
    hub.publish("game:2", "game over")
    hub.forget("game:2")
    assert done.wait(5), "the subscription did not end"
    thread.join(5)
    assert got == ["move", "game over"] and sub.closed and hub.subscriptions == 0


def test_a_parked_stream_gets_the_last_events_then_finishes_and_resuming_gets_a_gap(app, hub, tracker):
    """Over HTTP: the stream ends with its response properly terminated; the
    client's reconnect with its cursor is told the history is gone."""
    with RawStream(app.url + "/sse?channel=game:3") as raw:
        assert raw.chunk().startswith(b":ok\n\n")  # (and maybe the heartbeat it keeps)
        settle(lambda: hub.subscriptions == 1, what="the stream is parked")
        hub.publish("game:3", "move")
        last = hub.publish("game:3", "game over")
        hub.forget("game:3")
        assert raw.chunk().endswith(b"data: move\n\n")
        assert raw.chunk() == f"id: {last}\ndata: game over\n\n".encode()
        assert raw.chunk() == b""  # the terminating chunk: the response ended
    settle(lambda: tracker.open == 0 and hub.subscriptions == 0, what="the handler's finally")
    assert "game:3" not in hub.channels()
    with RawStream(app.url + "/sse?channel=game:3&last_event_id=" + last) as raw:
        assert raw.chunk().startswith(b":ok\n\n")
        gap = raw.chunk()
        assert b"event: comet.gap\n" in gap and f'"last_id":"{last}"'.encode() in gap
        nxt = hub.publish("game:3", "a new game")  # ...and the stream goes on in the new channel
        assert raw.chunk() == f"id: {nxt}\ndata: a new game\n\n".encode()


@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_a_forget_ends_generator_streams_in_either_mode(comet_cherrypy, hub, mode):
    """A generator handler that goes on after its subscription ends (a
    farewell line), parked or on a thread of its own."""

    class Root:
        @cherrypy.expose
        @comet(transport="chunked", mode=mode)
        def game(self):
            yield from hub.subscribe("game:4")
            yield "the game is over\n"

    server = comet_cherrypy(Root())
    with RawStream(server.url + "/game") as raw:
        assert raw.chunk() == b"\n"  # the preamble
        settle(lambda: hub.subscriptions == 1, what="the stream waits")
        last = hub.publish("game:4", "checkmate")
        hub.forget("game:4")
        assert raw.chunk() == ('{"id":"%s","event":null,"data":"checkmate"}\n' % last).encode()
        assert raw.chunk() == b"the game is over\n"
        assert raw.chunk() == b""
    settle(lambda: hub.subscriptions == 0, what="the subscription released")


def test_events_older_than_max_age_leave_the_buffer():
    hub = Hub(idle=0.2, max_age=lambda channel: 0.3 if channel.startswith("short:") else None)
    try:
        old = hub.publish("short:a", "old")
        hub.publish("long:a", "kept")
        settle(lambda: hub.history("short:a") == [], what="the old event to expire")
        fresh = hub.publish("short:a", "fresh")
        assert [e.data for e in hub.history("short:a")] == ["fresh"]
        sub = hub.subscribe("short:a", last_id=hub.before(old))
        gap, event = sub.take()
        assert gap.name == GAP and gap.data["resume_id"] == old and event.id == fresh
        sub.close()
        assert [e.data for e in hub.history("long:a")] == ["kept"]
    finally:
        hub.close()


def test_max_age_for_every_channel_and_the_sweeper_ends_with_the_hub():
    hub = Hub(idle=0.2, max_age=0.2)
    try:
        hub.publish("a", 1)
        ch = hub.store.get("a")
        settle(lambda: not ch.events, what="the sweeper to drop the old event")  # nobody read it
    finally:
        hub.close()
    assert not [t for t in threading.enumerate() if t.name == "comet-hub-sweeper"]
    with pytest.raises(ValueError, match="max_age must be a positive number of seconds, got 0"):
        Hub(max_age=0)
    with pytest.raises(ValueError, match="max_idle must be a positive number of seconds, got -1"):
        Hub(max_idle=-1)


def test_idle_channels_without_subscribers_are_forgotten():
    hub = Hub(idle=0.2, max_idle=0.3)
    try:
        gone = hub.publish("idle", "x")
        hub.publish("followed", "y")
        sub = hub.subscribe("followed")
        settle(lambda: "idle" not in hub.channels(), what="the idle channel to be forgotten")
        assert "followed" in hub.channels()  # a subscriber keeps it
        sub.close()
        settle(lambda: hub.channels() == [], what="the channel its subscriber left")
        again = hub.subscribe("idle", last_id=gone)
        hub.publish("idle", "z")
        assert [e.name for e in again.take()] == [GAP, None]
        again.close()
    finally:
        hub.close()


def test_100k_channels_forgotten_or_expired_leave_no_memory_behind():
    """100,000 channels with one event each, half forgotten and half
    expired: memory returns within 10 % of the start, old cursors get gaps,
    a channel in use all along is undisturbed."""
    n = 100_000
    hub = Hub(idle=0.2, max_idle=8.0)  # about the time it takes to create them all here
    try:
        steady = hub.subscribe("steady")
        before_all = hub.publish("steady", "first")
        sample = (0, 1, n // 2, n - 1)  # forgotten (even) and expired (odd)
        kept = sample_cursors(len(sample))
        gc.collect()
        start_rss, start_blocks = rss_mb(), sys.getallocatedblocks()

        def make_rooms() -> None:  # (a function: no loop variable from the burst outlives it)
            for i in range(n):
                event_id = hub.publish(f"room:{i}", i)
                if i in sample:
                    kept.keep(sample.index(i), event_id)

        def forget_half() -> None:
            for i in range(0, n, 2):
                hub.forget(f"room:{i}")  # (False for the rooms the sweeper forgot meanwhile)

        make_rooms()
        peak_rss, peak_blocks = rss_mb(), sys.getallocatedblocks()
        forget_half()
        wait_until(lambda: hub.channels() == ["steady"], timeout=30, what="idle rooms to be forgotten")
        gc.collect()
        end_rss, end_blocks = rss_mb(), sys.getallocatedblocks()
        print(f"\nmemory hub, {n} channels: objects (allocated blocks) {start_blocks} -> {peak_blocks} -> {end_blocks}; "
              f"RSS {start_rss:.1f} -> {peak_rss:.1f} -> {end_rss:.1f} MB")
        # Every object the rooms needed is gone (a few bookkeeping ones stay)...
        assert end_blocks < start_blocks * 1.01, (start_blocks, end_blocks)
        # ... and RSS comes back within 10 % of the start.
        assert end_rss < start_rss * 1.10, (start_rss, end_rss)
        cursors = dict(zip(sample, kept.ids()))
        assert not [o for o in gc.get_objects() if isinstance(o, Channel) and o.dead]
        for i in sample:  # exact gaps
            new = hub.publish(f"room:{i}", "again")
            sub = hub.subscribe(f"room:{i}", last_id=cursors[i])
            gap, event = sub.take()
            assert gap.data == {"last_id": cursors[i], "resume_id": hub.before(new)} and event.data == "again"
            sub.close()
        hub.publish("steady", "last")
        assert [e.data for e in steady.take()] == ["first", "last"]
        assert hub.history("steady")[0].id == before_all
        steady.close()
    finally:
        hub.close()


def test_forgets_racing_a_publisher_lose_nothing_silently(hub):
    """A publisher, a thread forgetting the channel again and again, and a
    client that resumes from its cursor whenever its subscription ends:
    every event published is either received, in order, or inside a gap
    the client was told about."""
    published: list[str] = []
    done = threading.Event()

    def publish():
        for n in range(3000):
            published.append(hub.publish("race", n))
            if n % 100 == 99:
                done.wait(0.002)  # room for the forgetter: the race must happen, often
        done.set()

    def forget():
        while not done.is_set():
            hub.forget("race")
            done.wait(0.002)

    cursor = hub.last_id("race")  # the client starts before the first event
    threads = [threading.Thread(target=publish), threading.Thread(target=forget)]
    for t in threads:
        t.start()
    received, gaps = follow_through_forgets(hub, hub, "race", cursor, done)
    for t in threads:
        t.join(10)
    assert_nothing_lost_silently(published, received, gaps)
    assert hub.counters["forgotten"] >= 3 and gaps  # the race did happen


def follow_through_forgets(reader: Hub, writer: Hub, channel: str, cursor: str, done: threading.Event
                           ) -> tuple[list[str], list[tuple[str, str]]]:
    """A client of *reader* that resumes from its cursor whenever its
    subscription ends (a forget ends it), until *done* and caught up with
    *writer*: the ids it received, and the gaps (last_id, resume_id) it was
    told about."""
    received: list[str] = []
    gaps: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sub = reader.subscribe(channel, last_id=cursor)
        for item in sub:
            if not item:
                if done.is_set() and cursor == writer.last_id(channel):
                    break
                continue
            if item.name == GAP:
                gaps.append((item.data["last_id"], item.data["resume_id"]))
            else:
                received.append(item.id)
            cursor = item.id
        sub.close()
        if done.is_set() and cursor == writer.last_id(channel):
            break
    assert done.is_set() and cursor == writer.last_id(channel), "the client never caught up"
    return received, gaps


def assert_nothing_lost_silently(published: list[str], received: list[str], gaps: list[tuple[str, str]]) -> None:
    """Received in order and never twice; every event not received lies
    inside a gap the client was told about."""
    keys = [parse_id(i) for i in received]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    seen = set(received)
    missing = [i for i in published if i not in seen]
    assert all(any(parse_id(a) < parse_id(i) <= parse_id(b) for a, b in gaps) for i in missing), (missing[:5], gaps[:5])
