"""The hub on its own: ids, replay, gaps, views, threads."""
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comet import GAP, Event, Hub, HubClosed, InvalidEventId
from comet.hub import Idle, parse_id


def drain(sub, n, timeout=5.0):
    """The next n events of a subscription (skipping None ticks), with a deadline."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} events: {out}"
        item = next(sub)
        if isinstance(item, Event):
            out.append(item)
    return out


def test_ids_increase_per_channel_and_sort():
    hub = Hub()
    ids = [hub.publish("a", i) for i in range(12)]
    other = hub.publish("b", "x")
    assert [parse_id(i) for i in ids] == sorted(parse_id(i) for i in ids)
    assert parse_id(ids[-1])[1] == 12 and parse_id(other)[1] == 1
    assert all(i.startswith(f"{hub.epoch}-") for i in ids)


def test_subscribe_from_now_and_resume():
    hub = Hub(idle=0.05)
    first = hub.publish("c", "old")
    live = hub.subscribe("c")
    assert next(live) == Idle(f"{hub.epoch}-1")  # caught up at once, with the cursor
    hub.publish("c", "new1")
    hub.publish("c", "new2")
    assert [e.data for e in drain(live, 2)] == ["new1", "new2"]
    resumed = hub.subscribe("c", last_id=first)
    assert [e.data for e in drain(resumed, 2)] == ["new1", "new2"]
    assert [e.data for e in drain(hub.subscribe("c", hub.before(first)), 1)] == ["old"]


def test_events_published_while_busy_are_not_lost():
    """The classic race: events arrive while the consumer is not waiting."""
    hub = Hub(idle=0.05)
    sub = hub.subscribe("c")
    assert not next(sub)
    for i in range(50):  # consumer is "busy": not inside wait()
        hub.publish("c", i)
    assert [e.data for e in drain(sub, 50)] == list(range(50))


def test_gap_when_cursor_fell_out_of_buffer():
    hub = Hub(buffer_size=3, idle=0.05)
    ids = [hub.publish("c", i) for i in range(6)]
    sub = hub.subscribe("c", last_id=ids[0])
    gap, *rest = drain(sub, 4)
    assert gap.name == GAP and gap.data == {"last_id": ids[0], "resume_id": ids[2]} and gap.id == ids[2]
    assert [e.data for e in rest] == [3, 4, 5]
    # a slow consumer evicted mid-stream also gets a gap, then what is held
    slow = hub.subscribe("c", last_id=ids[5])
    assert not next(slow)
    for i in range(5):
        hub.publish("c", f"burst{i}")
    gap, *rest = drain(slow, 4)
    assert gap.name == GAP and gap.data["last_id"] == ids[5]
    assert [e.data for e in rest] == ["burst2", "burst3", "burst4"]
    assert parse_id(gap.id)[1] + 1 == parse_id(rest[0].id)[1]


def test_cursor_from_a_previous_hub_gets_gap_then_everything():
    old = Hub()
    stale = old.publish("c", "before restart")
    time.sleep(0.002)  # a new epoch, as after a restart
    hub = Hub(idle=0.05)
    hub.publish("c", "after restart")
    gap, event = drain(hub.subscribe("c", last_id=stale), 2)
    assert gap.name == GAP and event.data == "after restart"


@pytest.mark.parametrize("bad", ["", "x", "1", "1-", "-1", "1-2-3", "a-1", "1-1\n", "1" * 30 + "-1"])
def test_malformed_ids(bad):
    hub = Hub()
    if bad == "":
        hub.subscribe("c", last_id=bad).close()  # empty means "from now"
        return
    with pytest.raises(InvalidEventId, match="malformed"):
        hub.subscribe("c", last_id=bad)


def test_ids_from_the_future():
    hub = Hub()
    hub.publish("c", "x")
    with pytest.raises(InvalidEventId, match="future"):
        hub.subscribe("c", last_id=f"{hub.epoch}-2")
    with pytest.raises(InvalidEventId, match="future"):
        hub.subscribe("c", last_id=f"{hub.epoch + 10_000}-1")
    assert isinstance(InvalidEventId("x"), ValueError)


def test_publish_validation():
    hub = Hub(max_event_bytes=100)
    with pytest.raises(TypeError, match="JSON"):
        hub.publish("c", object())
    with pytest.raises(ValueError, match="exceeds"):
        hub.publish("c", "x" * 101)
    with pytest.raises(ValueError, match="CR, LF"):
        hub.publish("c", "x", event="a\nb")
    with pytest.raises(ValueError, match="channel"):
        hub.publish("", "x")
    with pytest.raises(ValueError, match="channel"):
        hub.publish("a\r\nb", "x")
    # nothing was stored by the failed calls
    assert hub.history("c") == []
    with pytest.raises(ValueError):
        Hub(buffer_size=0)


def test_view_filters_and_transforms_per_subscriber():
    hub = Hub(idle=0.05)
    start = hub.last_id("chat")

    def guest(event):
        if event.name == "highlight":
            return None
        if event.name == "hide":
            return event.replace(data={"hidden": event.data["id"]})
        return event

    moderator = hub.subscribe("chat", start)
    public = hub.subscribe("chat", start, view=guest)
    upper = hub.subscribe("chat", start, view=lambda e: e.data.upper() if isinstance(e.data, str) else e)
    hub.publish("chat", "hello", event="shout")
    hub.publish("chat", "spam", event="highlight")
    hub.publish("chat", {"id": 1}, event="hide")
    assert [e.name for e in drain(moderator, 3)] == ["shout", "highlight", "hide"]
    seen = drain(public, 2)
    assert [(e.name, e.data) for e in seen] == [("shout", "hello"), ("hide", {"hidden": 1})]
    assert drain(upper, 1)[0].data == "HELLO"


def test_history():
    hub = Hub(buffer_size=5)
    for i in range(8):
        hub.publish("c", i)
    assert [e.data for e in hub.history("c")] == [3, 4, 5, 6, 7]
    assert [e.data for e in hub.history("c", limit=2)] == [6, 7]
    assert hub.history("c", limit=0) == []


def test_idle_ticks_and_end_subscriptions():
    hub = Hub(idle=0.05)
    sub = hub.subscribe("c")
    started = time.monotonic()
    assert not next(sub) and not next(sub)
    assert time.monotonic() - started < 2
    results = []
    t = threading.Thread(target=lambda: results.extend(sub))
    t.start()
    hub.end_subscriptions()
    t.join(5)
    assert not t.is_alive() and hub.subscriptions == 0
    # the hub is still usable after an engine stop
    assert hub.publish("c", "after") and not next(hub.subscribe("c"))


def test_close_wakes_waiters_and_refuses_use():
    hub = Hub(idle=30)  # only close() can end this wait quickly
    sub = hub.subscribe("c")
    assert not next(sub)
    t = threading.Thread(target=lambda: list(sub))
    t.start()
    started = time.monotonic()
    hub.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - started < 2
    with pytest.raises(HubClosed):
        hub.publish("c", "x")
    with pytest.raises(HubClosed):
        hub.subscribe("c")


def test_slow_consumer_never_blocks_publish():
    hub = Hub(buffer_size=100, idle=0.05)
    stuck = hub.subscribe("c")
    assert not next(stuck)  # never read again
    started = time.monotonic()
    for i in range(20_000):
        hub.publish("c", i)
    assert time.monotonic() - started < 10
    assert len(hub.history("c")) == 100


def test_subscription_count_released_on_close():
    hub = Hub()
    subs = [hub.subscribe("c") for _ in range(10)]
    for s in subs:
        next(s)
    assert hub.subscriptions == 10
    for s in subs:
        s.close()
    assert hub.subscriptions == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    publishers=st.integers(1, 4),
    per_publisher=st.integers(1, 60),
    subscribers=st.integers(1, 5),
    buffer_size=st.integers(1, 400),
)
def test_property_every_subscriber_sees_every_event_once_in_order(publishers, per_publisher, subscribers, buffer_size):
    """Many publisher and subscriber threads: each subscriber sees every event
    exactly once and in id order, or an explicit gap where it fell behind the
    buffer, never a silent loss."""
    hub = Hub(buffer_size=buffer_size, idle=0.02)
    total = publishers * per_publisher
    start = hub.last_id("c")
    results: list[list[Event]] = [[] for _ in range(subscribers)]
    ready = threading.Barrier(subscribers + publishers)

    def consume(out):
        sub = hub.subscribe("c", start)
        ready.wait(5)
        deadline = time.monotonic() + 20
        last = 0
        for event in sub:
            if event:
                out.append(event)
                last = parse_id(event.id)[1]
            if last >= total or time.monotonic() > deadline:
                break
        sub.close()

    def produce(n):
        ready.wait(5)
        for i in range(per_publisher):
            hub.publish("c", {"p": n, "i": i})

    threads = [threading.Thread(target=consume, args=(r,)) for r in results]
    threads += [threading.Thread(target=produce, args=(n,)) for n in range(publishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    published = hub.history("c") if buffer_size >= total else None
    for events in results:
        seqs = []
        for event in events:
            if event.name == GAP:
                assert buffer_size < total, "a gap without eviction"
                seqs.append(("gap", parse_id(event.id)[1]))
            else:
                seqs.append(parse_id(event.id)[1])
        numbers = [s for s in seqs if not isinstance(s, tuple)]
        assert numbers == sorted(set(numbers)), "duplicate or out of order"
        assert numbers[-1] == total
        # every missing number is covered by a gap right before the resumption
        expected = 1
        for s in seqs:
            if isinstance(s, tuple):
                expected = s[1] + 1
                continue
            assert s == expected, f"silent loss before {s}"
            expected = s + 1
        if published is not None:
            assert [e.data for e in events] == [e.data for e in published]
    # per publisher, events are in the order they were published
    for events in results:
        for n in range(publishers):
            mine = [e.data["i"] for e in events if e.name != GAP and e.data["p"] == n]
            assert mine == sorted(mine)
    assert hub.subscriptions == 0


def test_publish_many_is_ordered_validated_first_and_wakes_once():
    hub = Hub()
    woken = []
    hub.watch("batch", lambda: woken.append(1))
    sub = hub.subscribe("batch")
    ids = hub.publish_many("batch", ["a", {"b": 2}, Event("c", name="named", retry=100)], event="plain")
    assert [parse_id(i)[1] for i in ids] == [1, 2, 3] and len(woken) == 1
    got = sub.take()
    assert [(e.data, e.name, e.retry) for e in got] == [("a", "plain", None), ({"b": 2}, "plain", None), ("c", "named", 100)]
    with pytest.raises(ValueError):
        hub.publish_many("batch", ["ok", "x" * (hub.max_event_bytes + 1)])
    assert sub.take() == [] and hub.published == 3  # nothing of the bad batch was stored
    assert hub.publish_many("batch", []) == []
    sub.close()


def test_channels_nobody_published_to_are_forgotten_with_their_last_holder():
    """Clients asking for made-up channels (a fast route's ``{room}``) must
    not grow the hub: a channel never published to goes when its last
    subscription or watcher does, and comes back as it was."""
    hub = Hub()
    subs = [hub.subscribe(f"made-up-{n}") for n in range(1000)]
    assert len(hub.channels()) == 1000
    for sub in subs:
        sub.close()
    assert hub.channels() == []
    assert hub.history("made-up-1") == [] and hub.last_id("made-up-1") == f"{hub.epoch}-0"
    assert hub.channels() == []  # reading creates nothing
    # the same cursor is valid before and after: nothing can tell
    sub = hub.subscribe("room", last_id=f"{hub.epoch}-0")
    unwatch = hub.watch("room", lambda: None)
    sub.close()
    assert hub.channels() == ["room"]  # still watched
    unwatch()
    unwatch()  # twice is harmless
    assert hub.channels() == []
    sub = hub.subscribe("room", last_id=f"{hub.epoch}-0")
    assert sub.take() == []
    # a channel that has events is kept: its history and ids matter
    first = hub.publish("room", "kept")
    sub.close()
    assert hub.channels() == ["room"] and [e.data for e in hub.history("room")] == ["kept"]
    assert [e.data for e in hub.subscribe("room", last_id=hub.before(first)).take()] == ["kept"]
    # a refused subscribe holds nothing
    with pytest.raises(InvalidEventId):
        hub.subscribe("refused", last_id="9999999999999-1")
    assert hub.channels() == ["room"]


class Gate:
    """Wraps a lock or condition: the first time *thread_name* enters, it
    stops there until ``go`` is set. Lets a test put another thread's work
    exactly inside a race window."""

    def __init__(self, inner, thread_name):
        self.inner, self.thread_name = inner, thread_name
        self.reached, self.go = threading.Event(), threading.Event()

    def __enter__(self):
        if threading.current_thread().name == self.thread_name and not self.reached.is_set():
            self.reached.set()
            assert self.go.wait(10)
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_publish_racing_the_last_close_lands_in_the_channel_everyone_sees():
    hub = Hub()
    leaving = hub.subscribe("room")
    ch = hub.store.get("room")
    ch.cond = gate = Gate(ch.cond, "publisher")
    ids = []
    publisher = threading.Thread(target=lambda: ids.append(hub.publish("room", "hello")), name="publisher")
    publisher.start()
    assert gate.reached.wait(10)  # the publisher holds the old channel object, not yet its lock
    leaving.close()  # last holder: the pristine channel is forgotten now
    assert hub.channels() == []
    gate.go.set()
    publisher.join(10)
    assert ids and [e.data for e in hub.history("room")] == ["hello"]
    assert [e.data for e in hub.subscribe("room", last_id=hub.before(ids[0])).take()] == ["hello"]


def test_a_subscribe_racing_the_last_close_holds_the_channel_publishes_go_to():
    hub = Hub()
    leaving = hub.subscribe("room")
    hub.store.lock = gate = Gate(hub.store.lock, "joiner")
    joined = []
    joiner = threading.Thread(target=lambda: joined.append(hub.subscribe("room")), name="joiner")
    joiner.start()
    assert gate.reached.wait(10)  # the joiner looked the channel up, has not counted itself yet
    leaving.close()
    gate.go.set()
    joiner.join(10)
    hub.publish("room", "hello")
    assert [e.data for e in joined[0].take()] == ["hello"]
    joined[0].close()
    assert hub.subscriptions == 0
