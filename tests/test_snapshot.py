"""Snapshots after a gap (``hub.snapshot``): a client whose cursor fell out of
the buffer gets ``comet.gap``, the channel's current state as
``comet.snapshot``, then the live events after it, neither skipping nor
repeating what the snapshot reflects; on the hub, on every transport, on fast
routes and on Redis (tests/test_redis.py patterns)."""
from __future__ import annotations

import json
import logging
import threading

import cherrypy
import pytest

from comet import GAP, SNAPSHOT, Event, Hub, Part, comet
from comet.backends.redis import RedisHub
from comet.cherrypy_tool import engine_plugin
from comet.testing import HTTPStatusError, RedisServer, StreamClient, wait_until

from conftest import Tracker, make_root

TRANSPORTS = ["sse", "multipart", "chunked", "longpoll"]


def drain(sub, n: int, timeout: float = 5.0) -> list:
    """The next *n* items of a subscription, Idle ticks skipped."""
    got: list = []
    wait_until(lambda: got.extend(e for e in sub.take() if e) or len(got) >= n, timeout, what=f"{n} events")
    return got


def named(items) -> list:
    return [(e.name, e.data) for e in items]


# -- the hub ------------------------------------------------------------------


def test_a_gap_at_subscribe_brings_the_state_then_what_follows_it():
    hub = Hub(buffer_size=3)
    ids = [hub.publish("score", n) for n in range(6)]
    hub.snapshot("score", lambda channel: {"channel": channel, "total": 15})
    sub = hub.subscribe("score", last_id=ids[0])
    gap, snap = sub.take()
    assert gap.name == GAP and gap.id == ids[2]
    assert gap.data == {"last_id": ids[0], "resume_id": ids[2], "snapshot": True}
    assert (snap.name, snap.data, snap.id, snap.channel) == (SNAPSHOT, {"channel": "score", "total": 15}, ids[5], "score")
    assert sub.last_id == ids[5] and sub.take() == []  # the held events are in the snapshot: not again
    later = hub.publish("score", 6)
    assert [(e.id, e.data) for e in sub.take()] == [(later, 6)]
    sub.close()
    assert hub.subscriptions == 0 and hub.channels() == ["score"]
    hub.close()


def test_falling_behind_while_subscribed_brings_the_state_too():
    hub = Hub(buffer_size=3)
    states = []
    hub.snapshot("feed", lambda channel: states.append(channel) or "state")
    sub = hub.subscribe("feed")
    first = hub.publish("feed", "seen")
    assert [e.data for e in sub.take()] == ["seen"]
    ids = hub.publish_many("feed", range(10))  # more than the buffer, before the subscriber looks
    gap, snap = sub.take()
    assert gap.data == {"last_id": first, "resume_id": ids[6], "snapshot": True}
    assert (snap.name, snap.data, snap.id) == (SNAPSHOT, "state", ids[-1]) and states == ["feed"]
    assert sub.take() == []
    hub.publish("feed", "next")
    assert [e.data for e in sub.take()] == ["next"]
    sub.close()
    hub.close()


def test_a_thread_iterating_gets_gap_state_and_events_in_order():
    hub = Hub(buffer_size=2, idle=0.05)
    ids = [hub.publish("c", n) for n in range(5)]
    hub.snapshot("c", lambda channel: [0, 1, 2, 3, 4])
    got = []

    def reader():
        sub = hub.subscribe("c", last_id=ids[0])
        for item in sub:
            if item:
                got.append(item)
            if len(got) == 3:
                break
        sub.close()

    thread = threading.Thread(target=reader)
    thread.start()
    wait_until(lambda: hub.subscriptions == 1, 5, what="reader subscribed")
    hub.publish("c", 5)
    thread.join(5)
    assert not thread.is_alive()
    assert named(got) == [(GAP, {"last_id": ids[0], "resume_id": ids[2], "snapshot": True}),
                          (SNAPSHOT, [0, 1, 2, 3, 4]), (None, 5)]
    wait_until(lambda: hub.subscriptions == 0, 5, what="subscription released")
    hub.close()


def test_channels_by_name_or_function_the_newest_match_wins_and_remove():
    hub = Hub(buffer_size=1)
    hub.snapshot(lambda ch: ch.startswith("lobby:"), lambda ch: "any lobby")
    remove = hub.snapshot("lobby:7", lambda ch: "lobby 7")
    for ch in ("lobby:1", "lobby:7", "other"):
        hub.publish_many(ch, [1, 2])
    def first_take(ch):
        sub = hub.subscribe(ch, last_id="0-0")  # from before this hub: a gap
        try:
            return named(sub.take())
        finally:
            sub.close()
    assert first_take("lobby:1")[1] == (SNAPSHOT, "any lobby")
    assert first_take("lobby:7")[1] == (SNAPSHOT, "lobby 7")
    assert [name for name, _ in first_take("other")] == [GAP, None]  # no snapshot: the gap, then what is held
    remove()
    remove()  # twice is harmless
    assert first_take("lobby:7")[1] == (SNAPSHOT, "any lobby")
    with pytest.raises(TypeError, match="channel name or a function"):
        hub.snapshot(7, lambda ch: None)
    with pytest.raises(TypeError, match="callable"):
        hub.snapshot("x", "not a function")
    hub.close()


def test_no_state_a_failing_or_unencodable_one_is_the_gap_alone(caplog):
    hub = Hub(buffer_size=2)
    ids = [hub.publish("c", n) for n in range(4)]
    answers = iter([None, ZeroDivisionError("boom"), {"not": {1, 2}}])

    def fn(channel):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    hub.snapshot("c", fn)
    for failed in (False, True, True):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="comet"):
            sub = hub.subscribe("c", last_id=ids[0])
            assert named(sub.take()) == [(GAP, {"last_id": ids[0], "resume_id": ids[1]}), (None, 2), (None, 3)]
            sub.close()
        assert bool(caplog.records) == failed
        if failed:
            assert "snapshot of 'c' failed; sending the gap alone" in caplog.text
    hub.close()


def test_the_function_may_use_the_hub_and_no_lock_is_held():
    hub = Hub(buffer_size=2)
    ids = [hub.publish("c", n) for n in range(4)]

    def fn(channel):
        held = [e.data for e in hub.history(channel)]
        hub.publish("other", "from inside")  # no deadlock: the hub's locks are free
        return {"held": held, "last": hub.last_id(channel)}

    hub.snapshot("c", fn)
    sub = hub.subscribe("c", last_id=ids[0])
    assert named(sub.take())[1] == (SNAPSHOT, {"held": [2, 3], "last": ids[3]})
    sub.close()
    hub.close()


def test_a_state_with_its_own_id_resumes_exactly_there():
    hub = Hub(buffer_size=3)
    ids = [hub.publish("c", n) for n in range(6)]
    # A cache two events behind: the events after it follow the snapshot.
    hub.snapshot("c", lambda channel: Event([0, 1, 2, 3], id=ids[3]))
    sub = hub.subscribe("c", last_id=ids[0])
    assert [(e.name, e.id, e.data) for e in sub.take()] == [
        (GAP, ids[2], {"last_id": ids[0], "resume_id": ids[2], "snapshot": True}),
        (SNAPSHOT, ids[3], [0, 1, 2, 3]), (None, ids[4], 4), (None, ids[5], 5)]
    sub.close()
    # An id the buffer cannot resume from is the function's failure: the gap alone.
    hub.snapshot("c", lambda channel: Event("too old", id=ids[0]))
    sub = hub.subscribe("c", last_id=ids[0])
    assert [name for name, _ in named(sub.take())] == [GAP, None, None, None]
    sub.close()
    hub.close()


def test_publishers_racing_the_snapshot_nothing_skipped_nothing_repeated():
    """An app that changes its state and publishes under one lock, and reads
    the state with the channel's id under the same lock, gets an exact
    snapshot: the client's state plus the events after it is every number
    once, however the publishes interleave with the snapshot."""
    hub = Hub(buffer_size=4, idle=0.05)
    lock, state = threading.Lock(), []
    stop = threading.Event()

    def publisher():
        n = 0
        while not stop.is_set() and n < 20000:
            with lock:
                state.append(n)
                hub.publish("count", n)
            n += 1

    def snapshot(channel):
        with lock:
            return Event(list(state), id=hub.last_id(channel))

    hub.snapshot("count", snapshot)
    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for _ in range(20):
            wait_until(lambda: len(state) > 8, 5, what="some events")
            sub = hub.subscribe("count", last_id="0-0")  # from before this hub: a gap
            seen: list[int] = []
            snapshots = 0
            for _ in range(200):
                for e in sub.take():
                    if e.name == SNAPSHOT:
                        seen, snapshots = list(e.data), snapshots + 1  # the state replaces what the client had
                    elif e.name is None:
                        seen.append(e.data)
            sub.close()
            assert snapshots >= 1
            assert seen == list(range(seen[-1] + 1)), "a number skipped or repeated"
    finally:
        stop.set()
        thread.join(10)
    hub.close()


def test_without_an_id_the_snapshot_reflects_at_least_its_cursor():
    """The default: the hub reads the tail before calling the function, so
    whatever the snapshot misses comes after it; what was published while
    it ran may come twice (the documented price: idempotent events)."""
    hub = Hub(buffer_size=4)
    state: set[int] = set()
    stop = threading.Event()

    def publisher():
        n = 0
        while not stop.is_set() and n < 20000:
            state.add(n)  # the state first, then the event: as an app does
            hub.publish("set", n)
            n += 1

    hub.snapshot("set", lambda channel: sorted(state))
    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        wait_until(lambda: len(state) > 8, 5, what="some events")
        for _ in range(20):
            sub = hub.subscribe("set", last_id="0-0")
            items = sub.take()
            snap = next(e for e in items if e.name == SNAPSHOT)
            upto = int(snap.id.split("-")[1])  # seq n+1 is the number n
            assert set(range(upto)) <= set(snap.data)  # nothing up to its id is missing
            after = [e for e in items[items.index(snap) + 1:]] + sub.take()
            assert all(int(e.id.split("-")[1]) > upto for e in after if e.name is None)
            sub.close()
    finally:
        stop.set()
        thread.join(10)
    hub.close()


def test_an_image_stream_snapshot_can_be_the_current_frame():
    hub = Hub(buffer_size=1)
    ids = [hub.publish("cam", Part(bytes([n]) * 4, "image/jpeg")) for n in range(3)]
    hub.snapshot("cam", lambda channel: hub.history(channel)[-1].data)
    sub = hub.subscribe("cam", last_id=ids[0])
    gap, frame = sub.take()
    assert frame.data == Part(bytes([2]) * 4, "image/jpeg") and frame.id == ids[2]
    sub.close()
    hub.close()


# -- over HTTP: every transport ----------------------------------------------


def item_of(item) -> tuple:
    """(name, id, data) of an item, whatever transport parsed it."""
    if isinstance(item, Part):
        item = json.loads(item.body)
    if isinstance(item, dict):
        return item["event"], item["id"], item["data"]
    data = item.data
    try:
        data = json.loads(data)
    except (TypeError, ValueError):
        pass
    return item.name, item.id, data


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_sends_gap_snapshot_then_live(comet_cherrypy, transport):
    hub, tracker = Hub(buffer_size=3, idle=0.2), Tracker()
    server = comet_cherrypy(make_root(hub, tracker))
    hub.snapshot("lobby", lambda channel: {"players": ["ann", "bob"]})
    ids = [hub.publish("lobby", n) for n in range(6)]
    with StreamClient(f"{server.url}/{transport}", transport=transport, last_event_id=ids[0]) as client:
        first = client.wait_for(2)
        live = hub.publish("lobby", "live")
        got = [item_of(i) for i in client.wait_for(3)]
    assert got == [("comet.gap", ids[2], {"last_id": ids[0], "resume_id": ids[2], "snapshot": True}),
                   ("comet.snapshot", ids[5], {"players": ["ann", "bob"]}),
                   (None, live, "live")], first
    wait_until(lambda: hub.subscriptions == 0 and tracker.open == 0, 5, what="stream released")
    hub.close()


class Page:
    @cherrypy.expose
    def index(self):
        return "plain page"


@pytest.mark.parametrize("transport", ["sse", "chunked", "longpoll"])
def test_parked_streams_falling_behind_share_one_snapshot(comet_cherrypy, transport):
    """Streams that return the subscription are written by the parked
    writer, which takes once for the streams at one cursor: a burst
    larger than the buffer brings each of them the gap, the same snapshot,
    then exactly the events after it."""
    hub = Hub(buffer_size=3, idle=0.2)
    calls = []
    hub.snapshot("room", lambda channel: calls.append(channel) or {"n": len(calls)})

    class Root(Page):
        @cherrypy.expose
        @comet(transport=transport, heartbeat=0.5, poll_timeout=2)
        def events(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)

    server = comet_cherrypy(Root())
    start = hub.last_id("room")
    clients = [StreamClient(server.url + "/events", transport=transport, last_event_id=start).open() for _ in range(3)]
    try:
        wait_until(lambda: hub.subscriptions == 3, 5, what="3 streams waiting")
        ids = hub.publish_many("room", range(10))  # one wake for ten events: the writer finds itself behind
        ids += [hub.publish("room", "after")]
        for client in clients:
            got = [item_of(i) for i in client.wait_for(lambda evs: any(item_of(e)[0] == "comet.snapshot" for e in evs))]
            # the same read may already hold events after the snapshot
            at = [i[0] for i in got].index("comet.snapshot")
            assert at == 1, got  # nothing before the gap: the burst fell out of the buffer at once
            gap, snap = got[0], got[1]
            assert gap[0] == "comet.gap" and gap[2]["snapshot"] is True
            rest = ids[ids.index(snap[1]) + 1:]  # exactly what the snapshot does not hold
            got = [item_of(i) for i in client.wait_for(2 + len(rest))]
            assert [i[1] for i in got[2:]] == rest
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: hub.subscriptions == 0, 5, what="streams released")
    # Once per group of streams the writer finds at one cursor (usually all
    # three; a stream that was still being set up takes on its own).
    assert 1 <= len(calls) <= 3, calls
    hub.close()


def test_fast_routes_send_gap_snapshot_then_live(comet_cherrypy):
    hub = Hub(buffer_size=3, idle=0.2)
    plugin = engine_plugin()
    plugin.route("/rooms/{room}/events", hub, "room:{room}", heartbeat=0.5)
    plugin.route("/rooms/{room}/ndjson", hub, "room:{room}", transport="chunked", heartbeat=0.5)
    plugin.route("/rooms/{room}/parts", hub, "room:{room}", transport="multipart", heartbeat=0.5)
    server = comet_cherrypy(Page(), thread_pool=2)
    hub.snapshot(lambda ch: ch.startswith("room:"), lambda ch: {"room": ch[5:]})
    ids = [hub.publish("room:a", n) for n in range(5)]
    fast = plugin.pool.counters["routed_fast"]
    for path, transport in (("events", "sse"), ("ndjson", "chunked"), ("parts", "multipart")):
        with StreamClient(f"{server.url}/rooms/a/{path}", transport=transport, last_event_id=ids[0]) as client:
            client.wait_for(2)
            live = hub.publish("room:a", path)
            got = [item_of(i) for i in client.wait_for(3)]
        gap = got.pop(0)
        assert gap[0] == "comet.gap" and gap[2] == {"last_id": ids[0], "resume_id": gap[1], "snapshot": True}
        assert got == [("comet.snapshot", hub.before(live), {"room": "a"}), (None, live, path)]
    assert plugin.pool.counters["routed_fast"] - fast >= 3  # answered at accept time
    wait_until(lambda: hub.subscriptions == 0, 5, what="streams released")
    hub.close()


# -- Redis --------------------------------------------------------------------


def test_redis_gap_at_subscribe_and_state_from_another_process(comet_redis):
    a = RedisHub(comet_redis.url, prefix="snap1:", maxlen=3, approximate=False)
    b = RedisHub(comet_redis.url, prefix="snap1:", maxlen=3, approximate=False)
    try:
        ids = [a.publish("lobby:x", n) for n in range(6)]
        # The state exact at the newest event B can read (history reads Redis).
        b.snapshot(lambda ch: ch.startswith("lobby:"),
                   lambda ch: Event([e.data for e in b.history(ch)], id=b.history(ch)[-1].id))
        sub = b.subscribe("lobby:x", last_id=ids[0])
        gap, snap = drain(sub, 2)
        assert gap.data == {"last_id": ids[0], "resume_id": ids[2], "snapshot": True}
        assert (snap.name, snap.id, snap.data) == (SNAPSHOT, ids[5], [3, 4, 5])
        live = a.publish("lobby:x", "live")
        assert [(e.id, e.data) for e in drain(sub, 1)] == [(live, "live")]
        sub.close()
    finally:
        a.close()
        b.close()


def test_redis_events_trimmed_while_the_reader_was_away_bring_the_state(prefix="snap2:"):
    with RedisServer() as server:
        a = RedisHub(server.url, prefix=prefix, maxlen=5, approximate=False)
        b = RedisHub(server.url, prefix=prefix, maxlen=5, approximate=False, backoff=(1.0, 1.0))
        try:
            b.snapshot("hole", lambda ch: "the state")
            sub = b.subscribe("hole")
            seen = a.publish("hole", "seen")
            assert drain(sub, 1)[0].id == seen
            a.redis.execute_command("CLIENT", "KILL", "ID", b.store.reader.client_id)
            wait_until(lambda: not b.connected, 5, what="reader cut off")
            ids = [a.publish("hole", i) for i in range(12)]
            gap, snap = drain(sub, 2, timeout=10)
            assert gap.name == GAP and gap.data == {"last_id": seen, "resume_id": ids[-6], "snapshot": True}
            assert (snap.name, snap.data, snap.id) == (SNAPSHOT, "the state", ids[-1])
            live = a.publish("hole", "live")
            assert [e.id for e in drain(sub, 1)] == [live]
            sub.close()
        finally:
            a.close()
            b.close()


# -- the examples -------------------------------------------------------------


def test_the_lobby_sends_its_state_after_a_gap(comet_cherrypy):
    from examples.lobby_game.app import make_app

    from test_examples import Browser

    hub = Hub(idle=0.2)
    root, config = make_app(hub, size=3, grace=0.5)
    server = comet_cherrypy(root, config)
    try:
        b = Browser(server.url)
        ann = b.json("/join", {"name": "room1", "player": "ann"})[1]
        stale = "1-0"  # a cursor from long before: a gap
        with StreamClient(f"{server.url}/events/room1?player={ann['token']}", last_event_id=stale) as client:
            gap, snap = client.wait_for(2)
            assert gap.name == GAP and json.loads(gap.data)["snapshot"] is True
            state = json.loads(snap.data)
            assert snap.name == SNAPSHOT and [p["name"] for p in state["players"]] == ["ann"]
            b.json("/join", {"name": "room1", "player": "bob"})
            client.wait_for(lambda evs: any(e.name == "state" and len(json.loads(e.data)["players"]) == 2 for e in evs))
        with pytest.raises(HTTPStatusError, match="404"):  # a lobby nobody is in: refused, no snapshot
            StreamClient(f"{server.url}/events/nobody-here", last_event_id=stale).open()
    finally:
        import cherrypy

        cherrypy.engine.unsubscribe("stop", root.lobbies.close)
        cherrypy.engine.unsubscribe("start", root.lobbies.start)


def test_the_shoutbox_snapshot_is_its_render_exact_at_its_cursor(comet_cherrypy):
    from examples.shoutbox.app import make_app

    hub = Hub(buffer_size=5, idle=0.2)
    root, config = make_app(hub)
    server = comet_cherrypy(root, config)
    ids = [hub.publish("shouts", {"nick": "bot", "text": f"m{n}", "at": 0}, event="shout") for n in range(8)]
    hub.publish("shouts", {"target": ids[6]}, event="delete")
    with StreamClient(server.url + "/events", last_event_id=ids[0]) as client:
        gap, snap = client.wait_for(2)
        assert json.loads(gap.data)["snapshot"] is True and snap.id == hub.last_id("shouts")
        assert [s["text"] for s in json.loads(snap.data)["shouts"]] == ["m4", "m5", "m7"]  # m6 deleted
        assert [s["id"] for s in json.loads(snap.data)["shouts"]] == [ids[4], ids[5], ids[7]]
        live = hub.publish("shouts", {"nick": "bot", "text": "live", "at": 0}, event="shout")
        assert [e.id for e in client.wait_for(3)[2:]] == [live]
