"""Latest-value channels (``Hub.latest``): a subscriber is given the newest
event of each key changed since its previous read, so one that falls
behind catches up with the state instead of a gap, and a slow client is
left unread (its memory bounded) instead of being disconnected."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comet import GAP, Event, Hub
from comet.errors import InvalidEvent


def values(items) -> list:
    return [(e.name, e.data) for e in items if e]


def test_a_read_gives_the_newest_event_of_each_key_changed_since_the_last_one():
    hub = Hub(buffer_size=4)
    hub.latest("seats")
    sub = hub.subscribe("seats")
    hub.publish("seats", "ann", event="seat1")
    hub.publish("seats", "bob", event="seat2")
    hub.publish("seats", None, event="seat1")  # default key: the event's name
    assert values(sub.take()) == [("seat2", "bob"), ("seat1", None)]  # in order of their newest event
    for n in range(50):  # far past the buffer of 4: no gap, the state
        hub.publish("seats", n, event=f"seat{n % 3}")
    hub.publish("seats", "x", event="other", key="seat0")  # an explicit key
    assert values(sub.take()) == [("seat2", 47), ("seat1", 49), ("other", "x")]
    assert sub.last_id == hub.last_id("seats") and sub.take() == []
    assert hub.counters["gaps"] == 0
    sub.close()


def test_other_channels_keep_every_event():
    hub = Hub(buffer_size=4)
    hub.latest(lambda ch: ch.startswith("score:"))
    state, log = hub.subscribe("score:1"), hub.subscribe("log")
    for n in range(3):
        hub.publish("score:1", n, event="total")
        hub.publish("log", n, event="total")
    assert values(state.take()) == [("total", 2)]
    assert values(log.take()) == [("total", 0), ("total", 1), ("total", 2)]
    for n in range(10):
        hub.publish("log", n)
    assert [e.name for e in log.take()][0] == GAP
    state.close(), log.close()


def test_a_cursor_out_of_the_buffer_resumes_without_a_gap_one_from_before_the_channel_with_one():
    hub = Hub(buffer_size=2)
    hub.latest("c")
    ids = [hub.publish("c", n, key=f"k{n % 4}") for n in range(20)]
    resumed = hub.subscribe("c", last_id=ids[13])  # long evicted: k2, k3 changed only before
    assert [e.data for e in resumed.take()] == [16, 17, 18, 19]
    resumed = hub.subscribe("c", last_id=ids[17])  # evicted too (the buffer holds 18 and 19)
    assert [e.data for e in resumed.take()] == [18, 19]
    assert hub.counters["gaps"] == 0
    old = hub.subscribe("c", last_id="1-1")  # another epoch: what it missed is unknown
    gap, *rest = old.take()
    assert gap.name == GAP and gap.data == {"last_id": "1-1", "resume_id": f"{hub.epoch}-0"}
    assert [e.data for e in rest] == [16, 17, 18, 19] and old.last_id == ids[-1]
    resumed.close(), old.close()


def test_declared_on_a_channel_in_use_it_starts_from_what_is_held():
    hub = Hub(buffer_size=3)
    ids = [hub.publish("c", n, key=f"k{n % 2}") for n in range(6)]
    behind = hub.subscribe("c", last_id=ids[3])
    older = hub.subscribe("c", last_id=ids[0])
    hub.latest("c")
    hub.publish("c", 6, key="k0")
    hub.publish("c", 7, key="k0")
    assert [e.data for e in behind.take()] == [5, 7]
    gap, *rest = older.take()  # before what is held: k0 and k1 may have changed unseen
    assert gap.name == GAP and [e.data for e in rest] == [5, 7]
    behind.close(), older.close()


def test_thread_mode_iteration_catches_up_with_the_state():
    hub = Hub(buffer_size=2, idle=0.05)
    hub.latest("c")
    sub = hub.subscribe("c")
    assert not next(sub)
    for n in range(10):
        hub.publish("c", n, key=f"k{n % 3}")
    got = [next(sub) for _ in range(4)]
    assert [e.data for e in got[:3]] == [7, 8, 9] and not got[3]
    sub.close()


def test_several_channels_on_one_subscription():
    hub = Hub(buffer_size=2)
    hub.latest("state")
    sub = hub.subscribe(["state", "chat"])
    assert not sub._bounded()  # chat keeps every event: this one may not be left unread
    for n in range(6):
        hub.publish("state", n, key=f"k{n % 2}")
        hub.publish("chat", n)
    got = sub.take()
    # in publish order; the chat's evicted events are a gap, the state's are not missed
    assert [(e.channel, e.data) for e in got if e.name != GAP] == [("state", 4), ("chat", 4), ("state", 5), ("chat", 5)]
    assert [e.channel for e in got if e.name == GAP] == ["chat"]
    resumed = hub.subscribe(["state", "chat"], last_id=got[0].id)  # the cursor before all that: the same again
    assert [(e.channel, e.data) for e in resumed.take()] == [(e.channel, e.data) for e in got[1:]]
    resumed.close()
    sub.close()
    only = hub.subscribe(["state"], last_id=None)
    assert only._bounded()
    only.close()


def test_a_bad_key_is_refused_before_anything_is_stored():
    hub = Hub()
    with pytest.raises(InvalidEvent, match="key must be a str"):
        hub.publish("c", 1, key=7)
    with pytest.raises(InvalidEvent, match="key must be a str"):
        hub.publish("c", 1, key="k" * 201)
    with pytest.raises(TypeError, match="channels must be"):
        hub.latest(7)
    assert hub.channels() == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.integers(0, 4), st.just("take"), st.tuples(st.just("resume"), st.integers(0, 200))),
                max_size=80), st.integers(1, 5))
def test_every_read_is_the_newest_of_each_key_changed_since_the_previous(ops, size):
    """Model: whatever the buffer size and however reads and resumes fall
    between publishes, a read gives, for each key changed since the cursor,
    its newest event, in publish order; a memory hub never reports a gap."""
    hub = Hub(buffer_size=size)
    hub.latest("c")
    sub = hub.subscribe("c")
    published: list[tuple[str, int, str]] = []  # (key, n, id)
    seen = 0  # how many published events the subscription's cursor covers

    def expected(after: int) -> list[int]:
        newest: dict[str, int] = {}
        for i in range(after, len(published)):
            newest[published[i][0]] = i
        return sorted(newest.values())

    for op in ops:
        if op == "take":
            assert [e.data for e in sub.take()] == expected(seen)
            seen = len(published)
        elif isinstance(op, tuple):
            if published:
                at = op[1] % len(published)
                resumed = hub.subscribe("c", last_id=published[at][2])
                assert [e.data for e in resumed.take()] == expected(at + 1)
                resumed.close()
        else:
            n = len(published)
            published.append((f"k{op}", n, hub.publish("c", n, key=f"k{op}")))
    assert [e.data for e in sub.take()] == expected(seen)
    assert hub.counters["gaps"] == 0
    sub.close()
