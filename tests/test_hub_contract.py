"""One contract, three hubs: every documented behaviour of a hub (docs/hubs.md,
docs/channels.md, docs/latest.md, docs/presence.md and the API docstrings),
run against the in-memory ``Hub``, ``RedisHub`` on a real redis-server and
``RedisHub`` on a real Redis Cluster, so the hubs cannot drift apart again
(the forget gap did: ``RedisHub`` resumed a forgotten channel's cursor into
its successor without a ``comet.gap``).

Each test says what a user relies on, in the same words for every hub. The
Redis hubs deliver through a reader thread: a test that must know a
subscription saw *everything* publishes a marker last and reads up to it.
One redis-server (the session's) and one cluster for the module; every test
has channel names (and a prefix) of its own.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable

import cherrypy
import pytest

from comet import GAP, SNAPSHOT, Event, Hub, comet
from comet.errors import HubClosed, InvalidEvent, InvalidEventId
from comet.hub import MAX_CHANNELS, MAX_CURSOR, Idle, cursor_name, parse_id
from comet.presence import JOIN, LEAVE
from comet.testing import wait_until

from conftest import RawStream

KINDS = ["memory", "redis", "cluster"]
_tests = itertools.count()
MARK = "comet.contract.marker"


@pytest.fixture(scope="module")
def redis_cluster():
    from comet.processes import RedisClusterNodes

    with RedisClusterNodes() as nodes:
        yield nodes


class Hubs:
    """Makes the hubs of one test: ``make(**options)`` is one process's hub
    (with Redis, every hub a test makes shares its store: ``make()`` twice
    is two processes); all are closed after the test. ``keep=N`` bounds what
    each channel holds (``buffer_size``; with Redis an exact ``maxlen``);
    ``mirror=N`` what a process holds of it where that differs (Redis:
    ``buffer_size``; the memory hub holds only that)."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind, self.url = kind, url
        self.prefix = f"contract{next(_tests)}-{time.monotonic_ns()}:"
        self.made: list[Hub] = []

    @property
    def redis(self) -> bool:
        return self.kind != "memory"

    def make(self, keep: int = 1000, mirror: int | None = None, **options: Any) -> Hub:
        options.setdefault("idle", 0.2)
        if self.kind == "memory":
            hub = Hub(buffer_size=mirror or keep, **options)
        else:
            from comet.backends.redis import RedisHub

            hub = RedisHub(self.url, prefix=self.prefix, maxlen=keep, approximate=False, buffer_size=mirror, **options)
        self.made.append(hub)
        return hub

    def close(self) -> None:
        for hub in self.made:
            hub.close()


@pytest.fixture(params=KINDS)
def hubs(request):
    kind = request.param
    url = None
    if kind == "redis":
        url = request.getfixturevalue("comet_redis").url
    elif kind == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    made = Hubs(kind, url)
    yield made
    made.close()


@pytest.fixture
def hub(hubs):
    return hubs.make()


# -- reading what a subscription hands out -------------------------------------------


def collect(sub, done: Callable[[list], bool], timeout: float = 5.0) -> list:
    """What *sub* hands out (Idle markers left out) until ``done(items)``."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, f"only {got!r} within {timeout}s"
        more = [item for item in sub.take() if item]
        got += more
        if not more and not done(got):
            time.sleep(0.01)
    return got


def upto_marker(hub: Hub, sub, channel: str, timeout: float = 5.0) -> list:
    """Everything *sub* hands out before a marker published now on *channel*
    (earlier markers left out): exactly what it had to give, once the
    marker shows it saw all."""
    token = f"marker {next(_tests)}"
    hub.publish(channel, token, event=MARK)
    got = collect(sub, lambda items: any(getattr(i, "data", None) == token for i in items), timeout)
    assert got[-1].data == token, got
    return [item for item in got if getattr(item, "name", None) != MARK]


def names(events) -> list:
    return [e.name for e in events]


def datas(events) -> list:
    return [e.data for e in events]


def ended_within(sub, timeout: float) -> list:
    """Iterate *sub* on this thread (as a thread-mode stream does) until it
    ends; the events it handed out. Fails if it is still open at *timeout*."""
    got: list = []
    deadline = time.monotonic() + timeout
    for item in sub:
        if item:
            got.append(item)
        assert time.monotonic() < deadline, f"still open after {timeout}s, having handed out {got!r}"
    return got


# -- publishing and ids --------------------------------------------------------------


def test_ids_increase_per_channel_and_history_keeps_every_event_in_order(hub):
    ids = [hub.publish("room", {"n": n}, event="move") for n in range(5)]
    assert [parse_id(i) for i in ids] == sorted(parse_id(i) for i in ids) and len(set(ids)) == 5
    history = hub.history("room")
    assert [e.id for e in history] == ids and datas(history) == [{"n": n} for n in range(5)]
    assert names(history) == ["move"] * 5
    assert datas(hub.history("room", limit=2)) == [{"n": 3}, {"n": 4}] and hub.history("room", limit=0) == []
    assert hub.last_id("room") == ids[-1]
    assert hub.history("never") == []


def test_data_of_every_json_type_comes_back_as_it_went_in(hub):
    values = [{"a": [1, 2.5, None, True]}, ["x", {"y": "ü → 😀"}], "text", 42, 1.5, True, None, ""]
    first = hub.publish("types", values[0])
    for value in values[1:]:
        hub.publish("types", value)
    sub = hub.subscribe("types", last_id=hub.before(first))
    got = upto_marker(hub, sub, "types")
    sub.close()
    assert datas(got) == values and datas(hub.history("types"))[:-1] == values


def test_publish_many_stores_in_order_and_names_each_item(hub):
    ids = hub.publish_many("jobs", [{"state": "queued"}, Event({"state": "done"}, name="final")], event="progress")
    assert len(ids) == 2 and parse_id(ids[0]) < parse_id(ids[1])
    assert [(e.id, e.name, e.data) for e in hub.history("jobs")] == [
        (ids[0], "progress", {"state": "queued"}), (ids[1], "final", {"state": "done"})]


def test_bad_channels_and_events_are_refused(hub):
    for channel in ("", "x" * 201, "a\nb", "a\x00b", 7):
        with pytest.raises(InvalidEvent):
            hub.publish(channel, "x")
        with pytest.raises(InvalidEvent):
            hub.subscribe(channel)
    with pytest.raises(InvalidEvent):
        hub.publish("room", "x" * (hub.max_event_bytes + 1))
    assert hub.history("room") == []


# -- subscribing, resuming -----------------------------------------------------------


def test_a_subscription_without_a_cursor_starts_with_the_next_event(hub):
    hub.publish("room", "before")
    sub = hub.subscribe("room")
    hub.publish("room", "after")
    assert datas(upto_marker(hub, sub, "room")) == ["after"]
    sub.close()


def test_a_cursor_resumes_exactly_after_it(hub):
    ids = [hub.publish("room", n) for n in range(6)]
    for k in (0, 3, 5):
        sub = hub.subscribe("room", last_id=ids[k])
        assert datas(upto_marker(hub, sub, "room")) == list(range(k + 1, 6)), k
        sub.close()


def test_before_replays_from_an_event_on(hub):
    first = hub.publish("room", "first")
    hub.publish("room", "second")
    sub = hub.subscribe("room", last_id=hub.before(first))
    assert datas(upto_marker(hub, sub, "room")) == ["first", "second"]
    sub.close()


def test_last_id_of_a_channel_is_a_cursor_for_everything_after_now(hub):
    cursor = hub.last_id("fresh")
    parse_id(cursor)
    hub.publish("fresh", "one")
    sub = hub.subscribe("fresh", last_id=cursor)
    assert datas(upto_marker(hub, sub, "fresh")) == ["one"]  # no gap: nothing was missed
    sub.close()


def test_events_published_while_the_subscriber_is_busy_are_not_lost(hub):
    sub = hub.subscribe("busy")
    for n in range(50):
        hub.publish("busy", n)
    assert datas(upto_marker(hub, sub, "busy")) == list(range(50))
    sub.close()


def test_malformed_and_future_cursors_are_refused_and_hold_nothing(hub):
    last = hub.publish("room", "x")
    epoch, seq = parse_id(last)
    for bad in ("nonsense", "1-", "-1", "1-2-3", "a.b", " 1-1", "1-1 "):
        with pytest.raises(InvalidEventId):
            hub.subscribe("room", last_id=bad)
    with pytest.raises(InvalidEventId, match="future"):
        hub.subscribe("room", last_id=f"{epoch + 10**6}-{seq}")
    assert hub.subscriptions == 0


def test_views_hide_or_change_events_per_subscriber(hub):
    guest = hub.subscribe("room", view=lambda e: None if e.name == "mod" else e)
    loud = hub.subscribe("room", view=lambda e: e.replace(data=str(e.data).upper()) if e.name != MARK else e)
    hub.publish("room", "warned", event="mod")
    hub.publish("room", "hello", event="message")
    assert [(e.name, e.data) for e in upto_marker(hub, guest, "room")] == [("message", "hello")]
    got = collect(loud, lambda items: len(items) == 3)
    assert [(e.name, e.data) for e in got[:2]] == [("mod", "WARNED"), ("message", "HELLO")]
    guest.close(), loud.close()


def test_initial_items_come_first_and_on_close_runs_once(hub):
    closed: list = []
    sub = hub.subscribe("room", initial=[Event({"users": []}, name="snapshot")])
    sub.on_close(lambda: closed.append(1))
    assert sub.take()[0].name == "snapshot"
    sub.close()
    sub.close()
    assert closed == [1] and hub.subscriptions == 0


def test_a_caught_up_subscription_yields_a_falsy_idle_carrying_its_cursor(hubs):
    hub = hubs.make(idle=0.1)
    last = hub.publish("room", "x")
    sub = hub.subscribe("room", last_id=last)
    idle = next(sub)
    assert isinstance(idle, Idle) and not idle and idle.last_id == last
    sub.close()


def test_channels_nobody_published_to_do_not_outlive_their_subscribers(hub):
    sub = hub.subscribe("made-up")
    unwatch = hub.watch("made-up-too", lambda: None)
    assert {"made-up", "made-up-too"} <= set(hub.channels())
    sub.close()
    unwatch()
    wait_until(lambda: not {"made-up", "made-up-too"} & set(hub.channels()), 2.0, what="made-up channels gone")
    hub.publish("real", 1)
    sub = hub.subscribe("real")
    sub.close()
    assert "real" in hub.channels()  # one with events stays


def test_watch_calls_wake_on_every_publish(hub):
    woken = threading.Event()
    unwatch = hub.watch("room", woken.set)
    hub.publish("room", 1)
    assert woken.wait(5)
    unwatch()


# -- gaps ------------------------------------------------------------------------------


def test_a_cursor_that_fell_out_of_the_buffer_gets_a_gap_then_what_is_held(hubs):
    hub = hubs.make(keep=3)
    ids = [hub.publish("ticker", n) for n in range(10)]
    late = hub.subscribe("ticker", last_id=ids[2])
    got = collect(late, lambda items: len(items) >= 4)
    gap = got[0]
    assert gap.name == GAP and gap.data == {"last_id": ids[2], "resume_id": ids[6]} and gap.id == ids[6]
    assert datas(got[1:]) == [7, 8, 9]
    late.close()


def test_a_subscriber_that_falls_behind_while_subscribed_gets_a_gap(hubs):
    hub = hubs.make(keep=3)
    first = hub.publish("ticker", 0)
    sub = hub.subscribe("ticker", last_id=first)
    ids = [first] + [hub.publish("ticker", n) for n in range(1, 10)]
    wait_until(lambda: hub.history("ticker")[-1].id == ids[-1], 5.0, what="the hub caught up")
    got = collect(sub, lambda items: items and items[-1].data == 9)
    assert got[0].name == GAP and got[0].data == {"last_id": first, "resume_id": ids[6]} and got[0].id == ids[6]
    assert datas(got[1:]) == [7, 8, 9]
    sub.close()


def test_a_snapshot_follows_a_gap_and_the_stream_goes_on_from_its_id(hubs):
    hub = hubs.make(keep=3)
    scores = {"ann": 0}
    lock = threading.Lock()

    def point():
        with lock:
            scores["ann"] += 1
            return hub.publish("match", {"point": "ann"})

    def exact(channel):
        with lock:
            return Event(dict(scores), id=hub.last_id(channel))

    remove = hub.snapshot("match", exact)
    old = point()
    for _ in range(5):
        point()
    late = hub.subscribe("match", last_id=old)
    gap, state = collect(late, lambda items: len(items) >= 2)
    assert gap.name == GAP and gap.data["snapshot"] is True
    assert state.name == SNAPSHOT and state.data == {"ann": 6} and state.id == hub.last_id("match")
    point()
    assert datas(upto_marker(hub, late, "match")) == [{"point": "ann"}]
    late.close()
    remove()
    again = hub.subscribe("match", last_id=old)  # unregistered: the gap alone, then what is held
    got = collect(again, lambda items: len(items) >= 4)
    assert got[0].name == GAP and "snapshot" not in got[0].data and SNAPSHOT not in names(got)
    again.close()


# -- latest-value channels -------------------------------------------------------------


def test_a_latest_value_channel_resumes_with_the_newest_value_of_each_key(hubs):
    hub = hubs.make(mirror=10)  # (Redis keeps all: docs/latest.md, "With Redis")
    hub.latest(lambda channel: channel.startswith("score:"))
    hub.history("score:semi")  # this process follows the channel from the start
    ids = [hub.publish("score:semi", {"points": n}, key=f"team{n % 3}") for n in range(60)]
    wait_until(lambda: hub.last_id("score:semi") == ids[-1], 5.0, what="the hub caught up")
    back = hub.subscribe("score:semi", last_id=ids[10])  # evicted long ago
    assert [e.data["points"] for e in collect(back, lambda items: len(items) >= 3)] == [57, 58, 59]
    back.close()
    caught = hub.subscribe("score:semi", last_id=ids[58])
    assert [e.data["points"] for e in collect(caught, lambda items: len(items) >= 1)] == [59]
    caught.close()


def test_a_latest_value_reader_ends_with_every_key_at_its_newest_value(hubs):
    hub = hubs.make(mirror=10)
    hub.latest("prices")
    board = hub.subscribe("prices")
    for n in range(100):
        hub.publish("prices", n, key="red" if n % 2 else "blue")
    seen: dict = {}
    deadline = time.monotonic() + 5
    while seen != {"blue": 98, "red": 99}:
        assert time.monotonic() < deadline, seen
        for e in board.take():
            if e:
                assert e.name != GAP
                seen[e._key or e.name] = e.data
    board.close()


def test_a_process_that_follows_a_latest_value_channel_late_knows_every_key(hubs):
    """A process that starts following a latest-value channel after far more
    events than it mirrors knows the newest value of every key, as one that
    followed it from the start: a cursor resumes with the keys changed since
    it, no gap, however old (the channel's start: every key's value)."""
    writer = hubs.make(mirror=5)
    writer.latest("board")
    first = writer.publish("board", "k2 value", key="k2")
    ids = [writer.publish("board", n, key=f"k{n % 2}") for n in range(20)]
    reader = hubs.make(mirror=5) if hubs.redis else writer  # another process (Redis), else the same hub
    reader.latest("board")
    back = reader.subscribe("board", last_id=first)
    assert [(e.name, e.data) for e in collect(back, lambda items: len(items) >= 2)] == [(None, 18), (None, 19)]
    back.close()
    assert reader.last_id("board") == ids[-1]
    start = reader.subscribe("board", last_id=reader.before(first))
    assert datas(collect(start, lambda items: len(items) >= 3)) == ["k2 value", 18, 19]
    start.close()


# -- forget ----------------------------------------------------------------------------


def test_forget_ends_open_subscriptions_after_what_was_published_before(hub):
    """Also when the Redis hub's reader has not appended them yet (it lost
    them in 4 of 100 runs on Redis, 27 on a cluster, before the forget read
    them first)."""
    sub = hub.subscribe("game:7")
    multi = hub.subscribe(["game:7", "lobby"])
    hub.publish("game:7", "move")
    hub.publish("game:7", "over", event="over")
    assert hub.forget("game:7") is True
    assert datas(ended_within(sub, 5)) == ["move", "over"]
    assert datas(ended_within(multi, 5)) == ["move", "over"]
    sub.close(), multi.close()
    assert "game:7" not in hub.channels() and hub.history("game:7") == []


def test_a_forget_right_after_publishing_still_hands_out_what_came_before(hub):
    """The same, 50 times in a row: the Redis hub's reader is usually a
    round trip behind the publisher when the forget comes."""
    lost = []
    for n in range(50):
        sub = hub.subscribe(f"race:{n}")
        hub.publish(f"race:{n}", "move")
        hub.publish(f"race:{n}", "over")
        hub.forget(f"race:{n}")
        got = datas(ended_within(sub, 5))
        sub.close()
        if got != ["move", "over"]:
            lost.append((n, got))
    assert lost == []


def test_forget_says_whether_the_channel_existed(hub):
    hub.publish("game:8", 1)
    assert hub.forget("game:8") is True
    assert hub.forget("game:8") is False and hub.forget("never-was") is False


def test_a_cursor_of_a_forgotten_channel_gets_a_gap_into_its_successor(hub):
    """docs/hubs.md: a client that reconnects with its cursor gets a
    comet.gap whose resume_id is the new channel's start; a channel of the
    same name created later never resumes an old cursor silently."""
    hub.publish("game:9", "first game")
    old = hub.publish("game:9", "last move")
    hub.forget("game:9")
    back = hub.subscribe("game:9", last_id=old)  # the channel is empty now
    [gap] = collect(back, lambda items: len(items) >= 1)
    assert gap.name == GAP and gap.data["last_id"] == old
    new = hub.publish("game:9", "a new game")
    assert datas(upto_marker(hub, back, "game:9")) == ["a new game"]
    back.close()
    later = hub.subscribe("game:9", last_id=old)  # and once the successor has events
    got = upto_marker(hub, later, "game:9")
    assert names(got)[0] == GAP and datas(got[1:]) == ["a new game"]
    assert parse_id(got[0].id) < parse_id(new)
    later.close()


def test_a_forget_reaches_every_process(hubs):
    if not hubs.redis:
        pytest.skip("one process")
    one, two = hubs.make(), hubs.make()
    old = one.publish("game:10", "move")
    there = two.subscribe("game:10", last_id=Hub.before(old))
    assert datas(collect(there, lambda items: len(items) >= 1)) == ["move"]
    one.forget("game:10")
    assert ended_within(there, 5) == []
    there.close()
    one.publish("game:10", "new game")
    back = two.subscribe("game:10", last_id=old)
    got = collect(back, lambda items: len(items) >= 2)
    assert names(got)[0] == GAP and datas(got[1:]) == ["new game"]
    back.close()


# -- max_age, max_idle -----------------------------------------------------------------


def test_history_never_returns_an_event_older_than_max_age_even_before_a_sweep(hubs):
    # A function for max_age: the sweeper then runs only every 10 s, far after this test.
    hub = hubs.make(max_age=lambda channel: 0.5 if channel.startswith("short:") else None)
    stale = hub.publish("short:typing", "old")
    kept = hub.publish("long:typing", "kept")
    sub = hub.subscribe("short:typing", last_id=hub.before(stale))
    assert datas(collect(sub, lambda items: len(items) >= 1)) == ["old"]
    born = time.monotonic()
    wait_until(lambda: time.monotonic() > born + 0.7, 2.0, what="the event to age")
    assert hub.history("short:typing") == []
    assert [e.id for e in hub.history("long:typing")] == [kept]
    fresh = hub.publish("short:typing", "new")
    assert [e.id for e in hub.history("short:typing")] == [fresh]
    back = hub.subscribe("short:typing", last_id=hub.before(stale))  # a cursor before what aged: a gap
    got = collect(back, lambda items: len(items) >= 2)
    assert names(got)[0] == GAP and datas(got[1:]) == ["new"]
    back.close()
    sub.close()


def test_a_subscriber_behind_events_that_aged_out_gets_a_gap(hubs):
    hub = hubs.make(max_age=0.4)
    first = hub.publish("short", 1)
    sub = hub.subscribe("short", last_id=hub.before(first))
    born = time.monotonic()
    wait_until(lambda: time.monotonic() > born + 0.6, 2.0, what="the event to age")
    hub.publish("short", 2)
    got = collect(sub, lambda items: items and items[-1].data == 2)
    assert names(got)[0] == GAP and datas(got)[-1:] == [2] and 1 not in datas(got)
    sub.close()


def test_a_channel_idle_for_max_idle_with_nobody_on_it_is_forgotten(hubs):
    hub = hubs.make(max_idle=0.3)
    old = hub.publish("lobby:1", "over")
    held = hub.publish("lobby:2", "still playing")
    player = hub.subscribe("lobby:2", last_id=held)
    wait_until(lambda: "lobby:1" not in hub.channels(), 5.0, what="the idle channel forgotten")
    stay = time.monotonic()
    wait_until(lambda: time.monotonic() > stay + 0.6, 2.0, what="two more idle periods")
    hub.sweep()
    assert "lobby:2" in hub.channels() and [e.id for e in hub.history("lobby:2")] == [held]
    player.close()
    hub.sweep()  # idle since its publish, but max_idle counts from the last player's leaving
    assert [e.id for e in hub.history("lobby:2")] == [held]
    back = hub.subscribe("lobby:1", last_id=old)
    hub.publish("lobby:1", "a new game")
    got = collect(back, lambda items: len(items) >= 2)
    assert names(got)[0] == GAP and datas(got[1:]) == ["a new game"]
    back.close()


# -- several channels ------------------------------------------------------------------


def test_one_subscription_follows_several_channels_and_its_cursor_resumes_each(hub):
    sub = hub.subscribe(["room", "dm:ann:bob"])
    hub.publish("dm:ann:bob", "psst")
    hub.publish("room", "hello all")
    got = collect(sub, lambda items: len(items) >= 2)
    assert sorted((e.channel, e.data) for e in got) == [("dm:ann:bob", "psst"), ("room", "hello all")]
    cursor = got[-1].id
    sub.close()
    hub.publish("room", "while away")
    hub.publish("dm:ann:bob", "also while away")
    hub.publish("news", "not followed")
    back = hub.subscribe(["room", "dm:ann:bob", "new"], last_id=cursor)  # a channel more: from now
    hub.publish("new", "fresh")
    got = collect(back, lambda items: len(items) >= 3)
    by = {}
    for e in got:
        by.setdefault(e.channel, []).append(e.data)
    assert by == {"room": ["while away"], "dm:ann:bob": ["also while away"], "new": ["fresh"]}
    back.close()


def test_with_several_channels_a_gap_is_reported_for_the_one_that_fell_behind(hubs):
    hub = hubs.make(keep=3)
    sub = hub.subscribe(["busy", "quiet"])
    hub.publish("quiet", "q1")
    hub.publish("busy", 0)
    got = collect(sub, lambda items: len(items) >= 2)
    cursor = got[-1].id
    sub.close()
    last = [hub.publish("busy", n) for n in range(1, 10)][-1]
    hub.publish("quiet", "q2")
    wait_until(lambda: hub.last_id("busy") == last, 5.0, what="the hub caught up")
    back = hub.subscribe(["busy", "quiet"], last_id=cursor)
    got = collect(back, lambda items: len(items) >= 5)
    gaps = [e for e in got if e.name == GAP]
    assert [e.channel for e in gaps] == ["busy"]
    assert [e.data for e in got if e.channel == "busy" and e.name != GAP] == [7, 8, 9]
    assert [e.data for e in got if e.channel == "quiet"] == ["q2"]
    back.close()


def test_a_plain_id_for_several_channels_gets_a_gap_on_each(hub):
    hub.publish("a", 1)
    hub.publish("b", 2)
    sub = hub.subscribe(["a", "b"], last_id=hub.last_id("a"))
    got = collect(sub, lambda items: len(items) >= 4)
    assert sorted((e.channel, e.name or "", e.data if e.name != GAP else None) for e in got) == [
        ("a", "", 1), ("a", GAP, None), ("b", "", 2), ("b", GAP, None)]
    sub.close()


# -- presence ----------------------------------------------------------------------------


def test_members_join_once_leave_after_the_grace_and_the_events_say_so(hubs):
    hub = hubs.make(presence_grace=0.3)
    room = hub.subscribe("room")
    ann = hub.subscribe("room", member="ann")
    also = hub.subscribe("room", member="ann")
    wait_until(lambda: hub.members("room") == {"ann": 2}, 5.0, what="ann's two streams counted")
    ann.close()
    also.close()
    again = hub.subscribe("room", member="ann")  # a reload within the grace: no flap
    wait_until(lambda: hub.members("room") == {"ann": 1}, 5.0, what="ann back")
    again.close()
    wait_until(lambda: hub.members("room") == {}, 5.0, what="ann gone after the grace")
    got = upto_marker(hub, room, "room")
    assert [(e.name, e.data) for e in got] == [(JOIN, "ann"), (LEAVE, "ann")]
    room.close()


def test_on_presence_hears_each_join_and_leave_once(hubs):
    hub = hubs.make(presence_grace=0.1)
    heard: list = []
    stop = hub.on_presence(lambda channel, event, member: heard.append((channel, event, member)))
    sub = hub.subscribe("hall", member="bob")
    wait_until(lambda: heard == [("hall", JOIN, "bob")], 5.0, what="the join heard")
    sub.close()
    wait_until(lambda: heard == [("hall", JOIN, "bob"), ("hall", LEAVE, "bob")], 5.0, what="the leave heard")
    stop()


def test_members_are_shared_by_every_process(hubs):
    if not hubs.redis:
        pytest.skip("one process")
    one, two = hubs.make(), hubs.make()
    page = one.subscribe("room", member="ann")
    wait_until(lambda: two.members("room") == {"ann": 1}, 5.0, what="the other process sees ann")
    page.close()


def test_disconnect_ends_every_stream_of_one_member_only(hubs):
    hub = hubs.make()
    mine = hub.subscribe("room", member="ann")
    multi = hub.subscribe(["room", "dm:ann"], member="ann")
    theirs = hub.subscribe("room", member="bob")
    assert hub.disconnect(member="ann") == 2
    wait_until(lambda: mine.ended and multi.ended, 5.0, what="ann's streams ended")
    assert not theirs.ended
    for sub in (mine, multi, theirs):
        sub.close()


def test_disconnect_reaches_every_process(hubs):
    if not hubs.redis:
        pytest.skip("one process")
    one, two = hubs.make(), hubs.make()
    page = one.subscribe("room", member="ann")
    other = one.subscribe("room", member="bob")
    two.disconnect(member="ann")
    wait_until(lambda: page.ended, 5.0, what="ann's stream on the other process ended")
    assert not other.ended
    page.close(), other.close()


def test_forget_forgets_the_members_without_leave_events(hubs):
    hub = hubs.make(presence_grace=0.1)
    ann = hub.subscribe("lobby:3", member="ann")
    wait_until(lambda: hub.members("lobby:3") == {"ann": 1}, 5.0, what="ann counted")
    watcher = hub.subscribe("lobby:3")
    hub.forget("lobby:3")
    ended_within(ann, 5)
    assert all(e.name != LEAVE for e in ended_within(watcher, 5))
    ann.close(), watcher.close()
    assert hub.members("lobby:3") == {}


# -- shutdown ------------------------------------------------------------------------------


def test_end_subscriptions_ends_every_subscription_and_the_hub_stays_usable(hub):
    one, many = hub.subscribe("a"), hub.subscribe(["a", "b"])
    hub.end_subscriptions()
    assert ended_within(one, 5) == [] and ended_within(many, 5) == []
    one.close(), many.close()
    hub.publish("a", "still works")
    assert datas(hub.history("a")) == ["still works"]


def test_close_refuses_further_use(hub):
    sub = hub.subscribe("a")
    hub.close()
    assert ended_within(sub, 5) == []
    sub.close()
    with pytest.raises(HubClosed):
        hub.subscribe("a")


# -- streams a forget ends, served by a live server ------------------------------------------


@pytest.mark.parametrize("serving", ["parked", "thread", "generator"])
@pytest.mark.parametrize("ending", ["forget", "disconnect"])
def test_forget_and_disconnect_end_streams_promptly_however_served(hubs, comet_cherrypy, serving, ending):
    """A forget (of the channel) or a disconnect (of the member) finishes
    the open response at once: not at the next heartbeat (30 s here) nor
    the next idle tick (10 s)."""
    hub = hubs.make(idle=10)

    class Root:
        @cherrypy.expose
        @comet(transport="chunked", heartbeat=30)
        def parked(self):
            return hub.subscribe("game:11", member="ann")

        @cherrypy.expose
        @comet(transport="chunked", heartbeat=30, mode="thread")
        def thread(self):
            yield from hub.subscribe("game:11", member="ann")

        @cherrypy.expose
        @comet(transport="chunked", heartbeat=30)
        def generator(self):
            yield from hub.subscribe("game:11", member="ann")

    server = comet_cherrypy(Root())
    with RawStream(server.url + "/" + serving) as raw:
        assert raw.chunk() == b"\n"  # the preamble
        wait_until(lambda: hub.subscriptions == 1, 5.0, what="the stream subscribed")
        if ending == "forget":
            hub.forget("game:11")
        else:
            hub.disconnect(member="ann")
        asked = time.monotonic()
        while True:  # (ann's join may come first)
            chunk = raw.chunk()
            if chunk == b"":  # the terminating chunk: the response ended
                break
            assert b"comet.join" in chunk, chunk
        took = time.monotonic() - asked
    assert took < 2.0, f"the stream ended {took:.2f}s after the {ending}"
    wait_until(lambda: hub.subscriptions == 0, 5.0, what="the subscription released")


# -- more of what the docs promise -------------------------------------------------------


def test_retry_and_binary_parts_travel_with_their_events(hub):
    from comet.framing import Part

    part = Part(b"\xff\xd8\x00jpeg", "image/jpeg", headers=(("X-Frame", "7"),))
    first = hub.publish("cam", part, event="frame", retry=2500)
    sub = hub.subscribe("cam", last_id=Hub.before(first))
    [got] = upto_marker(hub, sub, "cam")
    sub.close()
    assert (got.data, got.name, got.retry) == (part, "frame", 2500)
    assert hub.history("cam")[0].data == part


def test_idle_ticks_repeat_while_nothing_happens(hubs):
    hub = hubs.make(idle=0.05)
    sub = hub.subscribe("quiet")
    ticks = 0
    deadline = time.monotonic() + 5
    for item in sub:
        assert isinstance(item, Idle) and time.monotonic() < deadline
        ticks += 1
        if ticks == 3:
            break
    sub.close()


def test_a_snapshot_comes_for_channels_matched_by_a_function_and_may_be_declined(hubs):
    hub = hubs.make(keep=2)
    hub.snapshot(lambda channel: channel.startswith("lobby:"), lambda channel: None if channel == "lobby:gone" else
                 {"state of": channel})
    for channel in ("lobby:1", "lobby:gone"):
        old = hub.publish(channel, 0)
        for n in range(1, 5):
            hub.publish(channel, n)
        late = hub.subscribe(channel, last_id=old)
        got = collect(late, lambda items: len(items) >= 2)
        late.close()
        assert got[0].name == GAP
        if channel == "lobby:1":
            assert got[0].data["snapshot"] is True and got[1].name == SNAPSHOT
            assert got[1].data == {"state of": "lobby:1"} and got[1].id == hub.last_id(channel)
        else:  # None: no snapshot, the gap alone, then what is held
            assert "snapshot" not in got[0].data and got[1].name != SNAPSHOT


def test_a_snapshot_function_that_fails_leaves_the_gap_alone(hubs, caplog):
    hub = hubs.make(keep=2)

    def broken(channel):
        raise RuntimeError("the database is down")

    hub.snapshot("match", broken)
    old = hub.publish("match", 0)
    for n in range(1, 5):
        hub.publish("match", n)
    late = hub.subscribe("match", last_id=old)
    got = collect(late, lambda items: len(items) >= 3)
    late.close()
    assert got[0].name == GAP and "snapshot" not in got[0].data and datas(got[1:]) == [3, 4]


def test_a_latest_value_channel_keys_by_event_name_and_a_forgotten_cursor_gets_a_gap_and_the_state(hubs):
    hub = hubs.make(mirror=5)
    hub.latest("lobby:seats")
    hub.history("lobby:seats")
    old = hub.publish("lobby:seats", "ann", event="seat1")
    hub.publish("lobby:seats", "bob", event="seat2")
    for n in range(20):
        hub.publish("lobby:seats", f"guest{n}", event="seat3")
    last = hub.publish("lobby:seats", None, event="seat1")  # ann stood up
    wait_until(lambda: hub.last_id("lobby:seats") == last, 5.0, what="the hub caught up")
    back = hub.subscribe("lobby:seats", last_id=old)
    got = collect(back, lambda items: len(items) >= 3)
    back.close()
    assert [(e.name, e.data) for e in got] == [("seat2", "bob"), ("seat3", "guest19"), ("seat1", None)]
    hub.forget("lobby:seats")
    hub.publish("lobby:seats", "cat", event="seat2")
    again = hub.subscribe("lobby:seats", last_id=old)
    got = collect(again, lambda items: len(items) >= 2)
    again.close()
    assert got[0].name == GAP and [(e.name, e.data) for e in got[1:]] == [("seat2", "cat")]


def test_forgetting_one_of_several_channels_ends_the_stream_after_its_last_events(hub):
    sub = hub.subscribe(["game:12", "lobby"])
    hub.publish("lobby", "hi")
    assert [(e.channel, e.data) for e in collect(sub, lambda items: len(items) >= 1)] == [("lobby", "hi")]
    hub.publish("game:12", "over")
    hub.forget("game:12")
    assert [(e.channel, e.data) for e in ended_within(sub, 5)] == [("game:12", "over")]
    sub.close()


def test_a_member_of_several_channels_is_a_member_of_each(hubs):
    hub = hubs.make(presence_grace=0.1)
    sub = hub.subscribe(["room", "dm:ann:bob"], member="ann")
    wait_until(lambda: hub.members("room") == {"ann": 1} and hub.members("dm:ann:bob") == {"ann": 1}, 5.0,
               what="ann on both channels")
    assert hub.members("elsewhere") == {} and hub.disconnect(member="nobody") == 0
    sub.close()
    wait_until(lambda: hub.members("room") == {} and hub.members("dm:ann:bob") == {}, 5.0, what="ann gone")


def test_a_reconnect_to_another_process_within_the_grace_is_not_a_leave(hubs):
    if not hubs.redis:
        pytest.skip("one process")
    one, two = hubs.make(presence_grace=1.0), hubs.make(presence_grace=1.0)
    room = one.subscribe("room")
    ann = one.subscribe("room", member="ann")
    wait_until(lambda: two.members("room") == {"ann": 1}, 5.0, what="ann counted everywhere")
    ann.close()
    there = two.subscribe("room", member="ann")  # the reconnect lands on the other process
    wait_until(lambda: one.members("room") == {"ann": 1}, 5.0, what="ann back")
    assert [(e.name, e.data) for e in upto_marker(one, room, "room")] == [(JOIN, "ann")]
    there.close()
    wait_until(lambda: one.members("room") == {}, 5.0, what="ann gone after the grace")
    assert [(e.name, e.data) for e in upto_marker(one, room, "room")] == [(LEAVE, "ann")]
    room.close()


def test_a_cursor_resumes_channels_whatever_their_names_even_forged_to_collide(hubs):
    """Contract D: a cursor names each channel by its name, so no name can
    make two channels share a piece (the old CRC-32 tags could be forged in
    microseconds); a cursor resumes each channel exactly, on every process."""
    from test_channels import twin_of

    room, other = "shouts", "room.1_%x é"
    twin = twin_of(room, "dm:ann:z")
    one = hubs.make()
    sub = one.subscribe([room, twin, other])
    one.publish(room, "s1")
    [first] = collect(sub, lambda items: len(items) >= 1)  # its cursor: room at s1, the others before anything
    sub.close()
    one.publish(twin, "t1")
    one.publish(other, "o1")
    one.publish(twin, "t2")
    one.publish(room, "s2")
    two = hubs.make() if hubs.redis else one  # another process, where there is one
    back = two.subscribe([other, twin, room], last_id=first.id)
    got = collect(back, lambda items: len(items) >= 4)
    back.close()
    by: dict = {}
    for e in got:
        by.setdefault(e.channel, []).append(e.data)
    assert by == {twin: ["t1", "t2"], other: ["o1"], room: ["s2"]}
    assert not any(e.name == GAP for e in got)


def test_a_cursor_of_64_long_names_stays_short_and_resumes_each_channel_on_every_process(hubs):
    """Contract D: a name over 32 characters (encoded) is named by a hash,
    so 64 long non-ASCII names make a cursor under MAX_CURSOR (it fits an
    8 KB request head) that still resumes every channel exactly, on another
    process too; a channel named like a hash is a channel of its own."""
    channels = [f"{n:02d}:" + "ü😀" * 60 for n in range(MAX_CHANNELS - 2)]
    channels += [cursor_name(channels[0]), "é" * 5 + "ab"]  # "~<hash of the first>" (a %7E piece); 32 characters
    one = hubs.make()
    sub = one.subscribe(channels)
    for channel in channels:
        one.publish(channel, "before")
    got = collect(sub, lambda items: len(items) >= MAX_CHANNELS)
    sub.close()
    assert sorted(e.channel for e in got) == sorted(channels)
    assert all(len(e.id) <= MAX_CURSOR for e in got) and MAX_CURSOR < 5000  # (a 160 KB cursor before)
    seen = {e.channel for e in got[:MAX_CHANNELS // 2]}  # the cursor of the 32nd: half the channels after "before"
    for channel in channels[::-1]:
        one.publish(channel, "while away")
    two = hubs.make() if hubs.redis else one  # another process, where there is one
    back = two.subscribe(channels[::-1], last_id=got[MAX_CHANNELS // 2 - 1].id)
    again = collect(back, lambda items: len(items) >= MAX_CHANNELS + MAX_CHANNELS // 2)
    again += upto_marker(two, back, channels[1])  # and nothing more
    back.close()
    by: dict = {}
    for e in again:
        by.setdefault(e.channel, []).append(e.data)
    assert by == {c: ["while away"] if c in seen else ["before", "while away"] for c in channels}


def test_a_subscriber_too_slow_while_subscribed_gets_the_gap_and_a_snapshot(hubs):
    hub = hubs.make(keep=3)
    state = {"n": 0}

    def bump():
        state["n"] += 1
        return hub.publish("counter", state["n"])

    hub.snapshot("counter", lambda channel: dict(state))
    sub = hub.subscribe("counter", last_id=bump())
    last = [bump() for _ in range(8)][-1]
    wait_until(lambda: hub.last_id("counter") == last, 5.0, what="the hub caught up")
    got = collect(sub, lambda items: len(items) >= 2)
    assert got[0].name == GAP and got[0].data["snapshot"] is True
    assert got[1].name == SNAPSHOT and got[1].data == {"n": 9} and got[1].id == last
    bump()
    assert datas(upto_marker(hub, sub, "counter")) == [10]
    sub.close()
    assert hub.counters["gaps"] >= 1


def test_several_channels_get_the_newest_value_of_each_key_on_latest_value_channels(hubs):
    hub = hubs.make(mirror=5)
    hub.latest("board")
    sub = hub.subscribe(["board", "chat"])
    hub.publish("board", "start", key="k2")  # (Redis: the mirror follows the board from here)
    hub.publish("chat", "first")
    got = collect(sub, lambda items: len(items) >= 2)
    cursor = got[-1].id
    sub.close()
    last = [hub.publish("board", n, key=f"k{n % 2}") for n in range(20)][-1]
    hub.publish("chat", "second")
    wait_until(lambda: hub.last_id("board") == last, 5.0, what="the hub caught up")
    back = hub.subscribe(["board", "chat"], last_id=cursor)
    got = collect(back, lambda items: len(items) >= 3)
    back.close()
    assert sorted((e.channel, str(e.data)) for e in got) == [("board", "18"), ("board", "19"), ("chat", "second")], got
    assert GAP not in names(got)


def test_on_close_runs_when_the_hub_ends_a_subscription(hub):
    closed: list = []
    sub = hub.subscribe("game:13", member="ann")
    sub.on_close(lambda: closed.append("game"))
    other = hub.subscribe("room:13")
    other.on_close(lambda: closed.append("room"))
    hub.forget("game:13")
    ended_within(sub, 5)
    sub.close()
    hub.end_subscriptions()
    ended_within(other, 5)
    other.close()
    assert closed == ["game", "room"] and hub.subscriptions == 0


def test_close_stops_the_sweeper(hubs):
    hub = hubs.make(max_age=10, max_idle=10)
    wait_until(lambda: any(t.name == "comet-hub-sweeper" for t in threading.enumerate()), 5.0, what="a sweeper")
    before = sum(t.name == "comet-hub-sweeper" for t in threading.enumerate())
    hub.close()
    wait_until(lambda: sum(t.name == "comet-hub-sweeper" for t in threading.enumerate()) == before - 1, 5.0,
               what="its sweeper gone")


def test_a_cursor_at_the_newest_evicted_event_resumes_without_a_gap(hubs):
    hub = hubs.make(keep=3)
    ids = [hub.publish("ticker", n) for n in range(10)]
    wait_until(lambda: hub.last_id("ticker") == ids[-1], 5.0, what="the hub caught up")
    sub = hub.subscribe("ticker", last_id=ids[6])  # exactly the newest event no longer held
    assert datas(collect(sub, lambda items: len(items) >= 3)) == [7, 8, 9]  # (a marker would evict 7)
    sub.close()


def test_last_id_after_a_forget_is_a_cursor_into_the_next_channel_of_that_name(hub):
    hub.publish("game:14", "old game")
    hub.forget("game:14")
    cursor = hub.last_id("game:14")
    hub.publish("game:14", "new game")
    sub = hub.subscribe("game:14", last_id=cursor)
    assert datas(upto_marker(hub, sub, "game:14")) == ["new game"]  # no gap: nothing was missed
    sub.close()


def test_a_member_counts_zero_during_the_grace(hubs):
    hub = hubs.make(presence_grace=1.0)
    sub = hub.subscribe("room", member="ann")
    wait_until(lambda: hub.members("room") == {"ann": 1}, 5.0, what="ann counted")
    sub.close()
    wait_until(lambda: hub.members("room") == {"ann": 0}, 5.0, what="ann in her grace")
    wait_until(lambda: hub.members("room") == {}, 5.0, what="ann gone")


def test_with_several_channels_the_one_that_fell_behind_gets_its_snapshot_and_views_see_each_event(hubs):
    hub = hubs.make(keep=3)
    hub.snapshot("busy", lambda channel: {"state of": channel})
    sub = hub.subscribe(["busy", "quiet"], view=lambda e: None if e.name == "secret" else e)
    hub.publish("quiet", "q1")
    hub.publish("quiet", "hidden", event="secret")
    hub.publish("busy", 0)
    got = collect(sub, lambda items: len(items) >= 2)
    assert sorted((e.channel, e.data) for e in got) == [("busy", 0), ("quiet", "q1")]
    cursor = got[-1].id
    sub.close()
    last = [hub.publish("busy", n) for n in range(1, 10)][-1]
    wait_until(lambda: hub.last_id("busy") == last, 5.0, what="the hub caught up")
    # (the same view: the hidden event may come after the cursor, on another master of a cluster)
    back = hub.subscribe(["busy", "quiet"], last_id=cursor, view=lambda e: None if e.name == "secret" else e)
    got = collect(back, lambda items: len(items) >= 2)
    back.close()
    assert [(e.channel, e.name) for e in got] == [("busy", GAP), ("busy", SNAPSHOT)]
    assert got[0].data["snapshot"] is True and got[1].data == {"state of": "busy"}


def test_disconnect_counts_the_streams_open_in_this_process(hubs):
    if not hubs.redis:
        pytest.skip("one process")
    one, two = hubs.make(), hubs.make()
    page = one.subscribe("room", member="ann")
    assert two.disconnect(member="ann") == 0  # none here: ended where they are
    wait_until(lambda: page.ended, 5.0, what="ann's stream on the other process ended")
    page.close()


def test_a_channel_someone_follows_is_kept_however_idle_on_every_process(hubs):
    """max_idle forgets a channel nobody follows: with Redis, a subscriber on
    any process keeps the channel's stream (and so its history) for all."""
    if not hubs.redis:
        pytest.skip("one process")
    follower, publisher = hubs.make(max_idle=0.3), hubs.make(max_idle=0.3)
    sub = follower.subscribe("lobby:15")
    first = publisher.publish("lobby:15", "still here")
    quiet = time.monotonic()
    wait_until(lambda: time.monotonic() > quiet + 1.2, 3.0, what="four idle periods")
    late = hubs.make()  # a process that never followed it
    assert [e.id for e in late.history("lobby:15")] == [first]
    sub.close()
