"""Presence on both hubs: subscribe(member=...), members(), comet.join and
comet.leave with a grace period, disconnect(member=...). The Redis hub runs
against a real redis-server; two RedisHubs stand for two processes, and a
real process killed with SIGKILL stops counting within its lease. Streams
over HTTP (every transport, parked, generator and thread mode, fast routes)
are in tests/test_presence_http.py."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from comet import Hub, InvalidEvent
from comet.presence import JOIN, LEAVE
from comet.testing import wait_until
from test_redis import hubs, prefix  # noqa: F401  (the Redis hub fixtures)

GRACE = 0.4
_barriers = iter(range(10**9))


def presence_barrier(hub) -> None:
    """Return once *hub*'s presence pushes queued so far are done: a join
    queued now is published only after them (pushes go in order), so wait
    for it (a member and channel of their own)."""
    n = next(_barriers)
    member, channel = f"barrier{n}", f"barrier:{n}"
    sub = hub.subscribe(channel, member=member)
    wait_until(lambda: [(e.name, e.data) for e in hub.history(channel)] == [(JOIN, member)],
               what="the presence pushes queued before")
    sub.close()


def leave_barrier(hub) -> None:
    """Return once a member whose last stream closes now has left (after the
    grace period): a leave due no later than that is published by then."""
    n = next(_barriers)
    member, channel = f"barrier{n}", f"barrier:{n}"
    sub = hub.subscribe(channel, member=member)
    wait_until(lambda: [(e.name, e.data) for e in hub.history(channel)] == [(JOIN, member)], what="its join")
    sub.close()
    wait_until(lambda: [(e.name, e.data) for e in hub.history(channel)] == [(JOIN, member), (LEAVE, member)],
               timeout=GRACE + 5, what="its leave, after the grace period")



@pytest.fixture(params=["memory", "redis"])
def processes(request):
    """``make()`` -> a hub; with Redis each is another process's, sharing
    one Redis; in memory, every "process" is the same hub."""
    if request.param == "memory":
        hub = Hub(idle=0.2, presence_grace=GRACE)
        yield lambda **options: hub
        timer = hub.presence._timer
        hub.close()
        assert timer is None or not timer.is_alive()  # this hub's; other tests' hubs may still have theirs
    else:
        make = request.getfixturevalue("hubs")
        yield lambda **options: make(**{"idle": 0.2, "presence_grace": GRACE, "presence_lease": 2.0, **options})


class Watcher:
    """Collects the join and leave events of a channel, in order."""

    def __init__(self, hub: Hub, channel: str) -> None:
        self.sub = hub.subscribe(channel)
        self.seen: list[tuple[str, str]] = []

    def events(self) -> list[tuple[str, str]]:
        self.seen += [(e.name, e.data) for e in self.sub.take() if e and e.name in (JOIN, LEAVE)]
        return self.seen

    def wait(self, expected: list[tuple[str, str]], timeout: float = 5.0) -> None:
        wait_until(lambda: self.events() == expected, timeout, what=f"events {expected}")


def test_members_count_streams_and_join_and_leave_once(processes):
    hub = processes()
    watcher = Watcher(hub, "room")
    one, two = hub.subscribe("room", member="ann"), hub.subscribe("room", member="ann")
    bob = hub.subscribe("room", member="bob")
    wait_until(lambda: hub.members("room") == {"ann": 2, "bob": 1}, what="two members")
    watcher.wait([(JOIN, "ann"), (JOIN, "bob")])
    one.close()
    wait_until(lambda: hub.members("room") == {"ann": 1, "bob": 1}, what="one of ann's streams")
    two.close()  # ann's last stream: she counts 0 for the grace period, then leaves
    wait_until(lambda: hub.members("room") == {"ann": 0, "bob": 1}, what="ann leaving")
    assert watcher.events() == [(JOIN, "ann"), (JOIN, "bob")]
    watcher.wait([(JOIN, "ann"), (JOIN, "bob"), (LEAVE, "ann")])
    assert hub.members("room") == {"bob": 1}
    bob.close()
    watcher.wait([(JOIN, "ann"), (JOIN, "bob"), (LEAVE, "ann"), (LEAVE, "bob")])
    assert hub.members("room") == {} and hub.members("elsewhere") == {}
    watcher.sub.close()


def test_a_reconnect_within_the_grace_period_does_not_flap(processes):
    a, b = processes(), processes()
    watcher = Watcher(a, "room")
    sub = a.subscribe("room", member="ann")
    watcher.wait([(JOIN, "ann")])
    for hub in (a, b, a):  # reloads, on this process and on another
        sub.close()
        sub = hub.subscribe("room", member="ann")
    deadline = time.monotonic() + 3 * GRACE
    while time.monotonic() < deadline:  # well past the grace period: still one join, no leave
        assert watcher.events() == [(JOIN, "ann")]
        time.sleep(0.05)
    assert a.members("room") == b.members("room") == {"ann": 1}
    sub.close()
    watcher.wait([(JOIN, "ann"), (LEAVE, "ann")])
    watcher.sub.close()


def test_a_reload_within_the_grace_period_is_neither_a_leave_nor_a_join(processes):
    """The grace period, pinned as a user notices it: ann reloads her page
    (her stream is closed for most of a second, longer than a sweep or a
    timer takes) on this process, then on another: the page following the
    room sees no leave and no second join, and on_presence hears nothing;
    meanwhile members() counts her 0. Once she is gone longer than the
    grace period, she leaves, once."""
    grace = 1.5
    a, b = processes(presence_grace=grace), processes(presence_grace=grace)
    a.presence_grace = grace  # (the memory "processes" are one hub, made with the default)
    watcher = Watcher(a, "room")
    heard: list[tuple[str, str, str]] = []
    for hub in {id(a): a, id(b): b}.values():
        hub.on_presence(lambda *change: change[0] == "room" and heard.append(change))  # (not the barrier's)
    sub = a.subscribe("room", member="ann")
    watcher.wait([(JOIN, "ann")])
    wait_until(lambda: heard == [("room", JOIN, "ann")], what="the join heard")
    for hub in (a, b):  # a reload on this process, then one that lands on another
        sub.close()
        wait_until(lambda: a.members("room") == {"ann": 0}, what="ann's last stream closed: counting 0")
        time.sleep(grace / 2.5)  # the page reloads: past a sweep (0.25 s), within the grace period
        assert watcher.events() == [(JOIN, "ann")] and a.members("room") == {"ann": 0}
        sub = hub.subscribe("room", member="ann")
        wait_until(lambda: a.members("room") == {"ann": 1}, what="ann back")
    leave_barrier(a)  # a leave of ann due since her first reload (or after it) would be out by then
    assert watcher.events() == [(JOIN, "ann")], "a reload was published as a leave and a join"
    assert heard == [("room", JOIN, "ann")]
    sub.close()
    closed = time.monotonic()
    watcher.wait([(JOIN, "ann"), (LEAVE, "ann")], timeout=grace + 5)
    assert time.monotonic() - closed >= grace * 0.9  # not before the grace period ended
    wait_until(lambda: heard == [("room", JOIN, "ann"), ("room", LEAVE, "ann")], what="the leave heard")
    assert a.members("room") == {}
    watcher.sub.close()


def test_members_and_events_across_processes(processes):
    a, b = processes(), processes()
    on_b = Watcher(b, "room")
    heard: list[tuple[str, str, str]] = []
    for hub in {id(a): a, id(b): b}.values():
        hub.on_presence(lambda *change: heard.append(change))
    ann, bob = a.subscribe("room", member="ann"), b.subscribe("room", member="bob")
    for hub in (a, b):
        wait_until(lambda: hub.members("room") == {"ann": 1, "bob": 1}, what="both members, seen from each")
    on_b.wait([(JOIN, "ann"), (JOIN, "bob")]) if a is b else wait_until(
        lambda: sorted(on_b.events()) == [(JOIN, "ann"), (JOIN, "bob")], what="both joins")
    ann.close()
    bob.close()
    wait_until(lambda: sorted(on_b.events()) == sorted([(JOIN, "ann"), (JOIN, "bob"), (LEAVE, "ann"), (LEAVE, "bob")]),
               what="both leaves")
    # each change heard once, by the one process that published it (the
    # callback runs after the publish: the watcher may see the event first)
    expected = sorted([("room", JOIN, "ann"), ("room", JOIN, "bob"), ("room", LEAVE, "ann"), ("room", LEAVE, "bob")])
    wait_until(lambda: len(heard) >= 4, what="every change heard")
    assert sorted(heard) == expected
    on_b.sub.close()


def test_disconnect_ends_a_members_streams_on_every_process(processes):
    a, b = processes(), processes()
    mine = [a.subscribe("room", member="ann"), b.subscribe("dm:ann:bob", member="ann")]
    other = b.subscribe("room", member="bob")
    ended = threading.Event()

    def follow():  # thread mode: iterating ends
        for _ in mine[1]:
            pass
        ended.set()

    thread = threading.Thread(target=follow)
    thread.start()
    wait_until(lambda: b.subscriptions >= 1, what="the follower waits")
    started = time.monotonic()
    assert a.disconnect(member="ann") == (2 if a is b else 1)  # ended here at once
    assert mine[0].ended
    assert ended.wait(5), "the other process's stream did not end"
    assert time.monotonic() - started < 1.5  # "within a second", with room for a busy machine
    thread.join(5)
    assert mine[1].closed and not other.ended
    assert a.disconnect(member="nobody") == 0
    for sub in mine + [other]:
        sub.close()
    wait_until(lambda: a.members("room") == {} and a.members("dm:ann:bob") == {}, what="everyone left")


def test_callbacks_run_on_the_presence_thread_and_never_hold_up_a_subscribe(processes):
    """on_presence callbacks run on comet's presence thread, in order, with
    no lock of comet's held: one may ask members() and forget the channel,
    and one that takes its time never delays a stream opening (which may be
    on cheroot's accepting thread)."""
    hub = processes()
    heard: list[tuple[str, str, str, int | None]] = []
    release = threading.Event()

    def callback(channel: str, event: str, member: str) -> None:
        heard.append((threading.current_thread().name, event, member, hub.members(channel).get(member)))
        if member == "slow":
            release.wait(10)
        if event == LEAVE and member == "ann":
            hub.forget(channel)  # as the lobby does when the last player leaves

    hub.on_presence(callback)
    slow = hub.subscribe("room", member="slow")
    wait_until(lambda: len(heard) == 1, what="the slow callback to start")
    started = time.monotonic()
    ann = hub.subscribe("room", member="ann")  # while a callback is busy
    assert time.monotonic() - started < 0.5
    # counted (with Redis: pushed) while the slow callback still runs
    wait_until(lambda: hub.members("room") == {"slow": 1, "ann": 1}, what="ann counted")
    release.set()
    wait_until(lambda: len(heard) == 2, what="ann's join heard")
    slow.close()
    wait_until(lambda: len(heard) == 3, what="slow's leave heard")
    ann.close()
    wait_until(lambda: len(heard) == 4, what="ann's leave heard")
    assert heard == [("comet-presence", JOIN, "slow", 1), ("comet-presence", JOIN, "ann", 1),
                     ("comet-presence", LEAVE, "slow", None), ("comet-presence", LEAVE, "ann", None)]
    wait_until(lambda: "room" not in hub.channels(), what="the callback's forget")


def test_a_disconnect_spares_streams_opened_after_it(processes):
    a, b = processes(), processes()
    earlier = b.subscribe("room", member="ann")
    a.disconnect(member="ann")
    later = b.subscribe("room", member="ann")
    # once b has applied the disconnect (ended the stream opened before it)
    wait_until(lambda: earlier.take() is not None and earlier.ended, what="the earlier stream to end")
    later.take()
    assert not later.ended
    earlier.close()
    later.close()


def test_forgetting_a_channel_forgets_its_members_without_leaves(processes):
    hub = processes()
    sub = hub.subscribe("game", member="ann")
    wait_until(lambda: hub.members("game") == {"ann": 1}, what="ann")
    hub.forget("game")
    wait_until(lambda: sub.take() is not None and sub.ended, what="the subscription to end (after its own join)")
    sub.close()
    assert hub.members("game") == {}
    leave_barrier(hub)
    assert "game" not in hub.channels() and hub.history("game") == []  # no leave event recreated it


def test_members_and_the_events_agree_at_every_instant(processes):
    """A member's count and its join are one step: whenever members() shows
    a member, the channel already holds their join (with Redis the count
    was once written a moment before the join was published)."""
    hub = processes()
    hub.publish("room", "open")
    subs = []
    done = threading.Event()

    def join() -> None:
        for n in range(40):
            subs.append(hub.subscribe("room", member=f"m{n}"))
            done.wait(0.005)  # (a pace the test's looks interleave with)
        done.set()

    thread = threading.Thread(target=join)
    thread.start()
    looks, deadline = 0, time.monotonic() + 10
    while not done.is_set() or set(hub.members("room")) != {f"m{n}" for n in range(40)}:
        assert time.monotonic() < deadline, "the members never all joined"
        members = set(hub.members("room"))
        joined = {e.data for e in hub.history("room") if e.name == JOIN}
        assert members <= joined, f"counted before their join was published: {sorted(members - joined)}"
        looks += 1
    thread.join(5)
    assert looks > 5
    for sub in subs:
        sub.close()


def test_a_join_pushed_after_a_forget_does_not_recreate_the_channel(hubs):
    """With Redis, a join is pushed by the presence thread a moment after
    the stream opened. A forget that lands first wins: the late push is
    refused (its process's mirror is of the forgotten stream), so neither
    the channel nor the count comes back, and no join is ever appended."""
    hub = hubs(idle=0.2, presence_grace=GRACE)
    presence = hub.presence
    hub.publish("game", "started")  # the mirror holds an event: where this process stands
    reached, gate = threading.Event(), threading.Event()
    push = presence._on_channels

    def held(script, calls):
        if script is presence._set and any(channel == "game" for channel, _ in calls):
            reached.set()
            gate.wait(10)  # pushed after the forget below
        return push(script, calls)

    presence._on_channels = held
    sub = hub.subscribe("game", member="ann")
    assert reached.wait(5), "the push never started"
    assert hub.forget("game") is True
    gate.set()
    wait_until(lambda: sub.take() is not None and sub.ended, what="the subscription to end")
    sub.close()
    presence_barrier(hub)  # ann's pushes (refused, then her zero) are done
    assert "game" not in hub.channels()
    assert hub.members("game") == {} and hub.history("game") == []
    later = hub.subscribe("game", member="bob")  # the channel's successor counts members as usual
    wait_until(lambda: hub.members("game") == {"bob": 1}, what="bob")
    assert [(e.name, e.data) for e in hub.history("game")] == [(JOIN, "bob")]
    later.close()


def test_a_join_from_a_process_that_missed_the_forget_is_refused(hubs, comet_redis, prefix):
    """Process b has not yet read a's forget of "game" (its reader is held
    back here) when ann joins it on b: b's push comes from a mirror of the
    forgotten stream, so Redis refuses it until b reads the forget; then b
    drops its mirror, ann's stream ends, and nothing recreated the game."""
    import redis

    a, b = hubs(idle=0.2, presence_grace=GRACE), hubs(idle=0.2, presence_grace=GRACE)
    a.publish("game", "started")
    follower = b.subscribe("game")
    wait_until(lambda: b.history("game") != [], what="b's mirror of the game")
    held, forgotten = threading.Event(), b.store._forgotten_elsewhere

    def later(channel, last):
        held.wait(10)  # b's reader reads the forget only when the test says so
        forgotten(channel, last)

    b.store._forgotten_elsewhere = later
    admin = redis.Redis.from_url(comet_redis.url)
    try:
        assert a.forget("game") is True
        ann = b.subscribe("game", member="ann")
        presence_barrier(b)  # b's push of ann, refused (again while b has not read the forget)
        assert not admin.exists(prefix + "game"), "a late join recreated the forgotten game"
        assert a.members("game") == {}
        held.set()
        wait_until(lambda: follower.take() is not None and follower.ended and ann.take() is not None and ann.ended,
                   what="b's streams of the game to end")
        ann.close()
        follower.close()
        leave_barrier(b)  # b's zero for ann pushed, and what it could be due after the grace
        assert not admin.exists(prefix + "game") and a.members("game") == {}
    finally:
        held.set()
        admin.close()


def test_a_process_lists_only_the_channels_where_it_counts_someone(hubs, comet_redis):
    """Redis keeps, per process, the channels to retire its counts from
    when its lease runs out: lobbies that come and go must not grow it."""
    import redis

    hub = hubs(idle=0.2, presence_grace=0.1)
    kept = hub.subscribe("lobby:kept", member="ann")
    for n in range(20):
        hub.subscribe(f"lobby:{n}", member="bob").close()
    wait_until(lambda: all(hub.members(f"lobby:{n}") == {} for n in range(20)), what="bob gone everywhere")
    admin = redis.Redis.from_url(comet_redis.url)
    try:
        key = hub.presence._base + "p:" + hub.presence.process
        wait_until(lambda: admin.smembers(key) == {b"lobby:kept"}, what="only the lobby ann is in")
    finally:
        admin.close()
    kept.close()


@pytest.mark.parametrize("bad", ["", "a\nb", "x" * 201, 7, "nul\x00"])
def test_a_bad_member_is_refused_before_anything_is_made(processes, bad):
    hub = processes()
    with pytest.raises(InvalidEvent, match="member must be"):
        hub.subscribe("room", member=bad)
    with pytest.raises(InvalidEvent, match="member must be"):
        hub.disconnect(member=bad)
    assert hub.subscriptions == 0 and "room" not in hub.channels()


def test_bad_presence_settings_fail_at_construction(comet_redis):
    with pytest.raises(ValueError, match="presence_grace must be"):
        Hub(presence_grace=-1)
    from comet.backends.redis import RedisHub

    with pytest.raises(ValueError, match="presence_lease must be"):
        RedisHub(comet_redis.url, presence_lease=0)


_VICTIM = """
import sys, time
from comet.backends.redis import RedisHub
hub = RedisHub(sys.argv[1], prefix=sys.argv[2], presence_lease=1.0, presence_grace=0.3)
sub = hub.subscribe("room", member="zed")
while hub.members("room") != {"zed": 1}:
    time.sleep(0.02)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_process_killed_with_sigkill_stops_counting_within_its_lease(hubs, comet_redis, prefix):
    hub = hubs(idle=0.2, presence_grace=0.3, presence_lease=1.0)
    watcher = Watcher(hub, "room")
    hub.members("room")  # this process takes part in sweeping
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, comet_redis.url, prefix], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        assert hub.members("room") == {"zed": 1}
        watcher.wait([(JOIN, "zed")])
        victim.kill()  # no on_close, no retire: only the lease tells
        killed = time.monotonic()
        victim.wait(10)
        watcher.wait([(JOIN, "zed"), (LEAVE, "zed")], timeout=10)
        # lease 1 s + grace 0.3 s + sweeps of 0.25 s; generous for a busy machine
        assert time.monotonic() - killed < 4
        assert hub.members("room") == {}
    finally:
        victim.kill()
        victim.wait(10)
        victim.stdout.close()
    watcher.sub.close()


def test_a_closing_process_retires_at_once_and_its_members_leave_after_the_grace(hubs):
    a, b = hubs(idle=0.2, presence_grace=0.3), hubs(idle=0.2, presence_grace=0.3)
    watcher = Watcher(b, "room")
    a.subscribe("room", member="ann")
    wait_until(lambda: b.members("room") == {"ann": 1}, what="ann seen from b")
    a.close()  # engine stop: its streams end, its counts go
    watcher.wait([(JOIN, "ann"), (LEAVE, "ann")])
    wait_until(lambda: b.members("room") == {}, what="ann gone from b's count too")
    watcher.sub.close()
