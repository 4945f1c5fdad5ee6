"""Several channels on one subscription: ``hub.subscribe([...])``.

One stream follows a room, a private thread and a lobby; each event says its
channel; one cursor (the event id) resumes every channel exactly, and a gap
is reported per channel. On both hubs, every transport, decorated handlers
(generator, returned, thread mode) and fast routes.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import threading
import time
import zlib

import cherrypy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from comet import GAP, Hub, comet
from comet.errors import InvalidEvent, InvalidEventId
from comet.framing import TaggedEvent
from comet.cursors import split_cursor
from comet.hub import (MAX_CHANNELS, MAX_CURSOR, MultiSubscription, channel_tag, cursor_name, is_multi_cursor,
                       multi_cursor, parse_id)
from comet.testing import SSEParser, StreamClient, http_get, wait_until

from conftest import RawStream, settle

TRANSPORTS = ["sse", "multipart", "chunked", "longpoll"]
_names = itertools.count()


@pytest.fixture(params=["memory", "redis"])
def any_hub(request):
    if request.param == "memory":
        made = Hub(buffer_size=50, idle=0.2)
    else:
        from comet.backends.redis import RedisHub

        server = request.getfixturevalue("comet_redis")
        made = RedisHub(server.url, prefix=f"chan{next(_names)}-{time.monotonic_ns()}:", maxlen=50, approximate=False,
                        idle=0.2)
    yield made
    made.close()


def mirror_read(hub, channel: str, last: str) -> None:
    """On Redis, wait until this process's mirror of *channel* has appended
    up to *last* (or dropped the channel). Its reader runs on a thread of its
    own: until then a cursor may still be in the mirror, and a resume from
    it rightly gets every event and no gap."""
    mirrored = getattr(hub.store, "mirrored", None)
    if mirrored is not None:
        wait_until(lambda: mirrored(channel) in ("", last), what=f"the mirror of {channel!r} caught up, or gone")


def take_until(sub, count: int, timeout: float = 5.0) -> list:
    """What *sub* hands out (events, gaps), until *count* items; the Redis
    hub's events arrive through its reader thread."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {got!r} within {timeout}s"
        got += sub.take()
        if len(got) < count:
            time.sleep(0.01)
    return got


def by_channel(events) -> dict[str, list]:
    out: dict[str, list] = {}
    for event in events:
        out.setdefault(event.channel, []).append(event.data)
    return out


# -- the hub ---------------------------------------------------------------------


def test_events_of_several_channels_say_their_channel_in_publish_order(any_hub):
    sub = any_hub.subscribe(["room", "dm:ann:bob"])
    assert isinstance(sub, MultiSubscription) and sub.channels == ("room", "dm:ann:bob")
    plan = [("room", "r1"), ("dm:ann:bob", "d1"), ("elsewhere", "x"), ("room", "r2"), ("dm:ann:bob", "d2")]
    for channel, data in plan:
        any_hub.publish(channel, data)
    got = take_until(sub, 4)
    assert all(isinstance(e, TaggedEvent) and is_multi_cursor(e.id) for e in got)
    assert by_channel(got) == {"room": ["r1", "r2"], "dm:ann:bob": ["d1", "d2"]}
    if isinstance(any_hub, Hub) and type(any_hub) is Hub:  # one process's order of publishing, across channels
        assert [e.data for e in got] == ["r1", "d1", "r2", "d2"]
    assert got[-1].id == sub.last_id
    sub.close()
    assert any_hub.subscriptions == 0


def test_one_cursor_resumes_every_channel_exactly(any_hub):
    channels = ["a", "b", "c"]
    sub = any_hub.subscribe(channels)
    any_hub.publish("a", "a1")
    any_hub.publish("b", "b1")
    first = take_until(sub, 2)
    cursor = first[-1].id
    sub.close()
    for channel, data in [("c", "c1"), ("a", "a2"), ("b", "b2"), ("c", "c2")]:  # while the client is away
        any_hub.publish(channel, data)
    resumed = any_hub.subscribe(channels, last_id=cursor)
    got = take_until(resumed, 4)
    assert by_channel(got) == {"c": ["c1", "c2"], "a": ["a2"], "b": ["b2"]}
    assert resumed.take() == []
    resumed.close()


def test_a_gap_is_reported_for_the_channel_that_fell_behind_only(any_hub):
    sub = any_hub.subscribe(["busy", "quiet"])
    any_hub.publish("busy", "seen")
    any_hub.publish("quiet", "q1")
    cursor = take_until(sub, 2)[-1].id
    sub.close()
    for n in range(60):  # more than the buffer (50) holds
        last = any_hub.publish("busy", n)
    any_hub.publish("quiet", "q2")
    mirror_read(any_hub, "busy", last)
    resumed = any_hub.subscribe(["busy", "quiet"], last_id=cursor)
    got: list = []
    wait_until(lambda: got.extend(resumed.take()) or {"q2", 59} <= {e.data for e in got if e.name != GAP}, what="the last of each")
    gaps = [e for e in got if e.name == GAP]
    assert len(gaps) == 1 and gaps[0].channel == "busy"
    assert gaps[0].data["last_id"] != gaps[0].data["resume_id"]
    events = by_channel([e for e in got if e.name != GAP])
    assert events["quiet"] == ["q2"]
    # What is held after the gap: the newest 50 (the Redis mirror may hold a
    # few more, read before Redis trimmed them), always a run ending at 59.
    first = events["busy"][0]
    assert 0 < first <= 10 and events["busy"] == list(range(first, 60))
    # The gap comes before the busy channel's events, and its id already says
    # the busy channel resumes from the gap's point.
    assert got.index(gaps[0]) < min(i for i, e in enumerate(got) if e.channel == "busy" and e.name != GAP)
    resumed.close()


def test_a_plain_id_gets_a_gap_per_channel_and_unknown_channels_are_ignored(hub):
    hub.publish("a", "a1")
    hub.publish("b", "b1")
    plain = hub.subscribe(["a", "b"], last_id=hub.last_id("a"))
    got = plain.take()
    assert [(e.channel, e.name) for e in got] == [("a", GAP), ("a", None), ("b", GAP), ("b", None)]
    plain.close()
    # A cursor of another channel set: the followed channel it names resumes,
    # one it does not name starts from now, one no longer followed is ignored.
    first = hub.subscribe(["a", "old"])
    hub.publish("a", "a2")
    cursor = first.take()[-1].id
    first.close()
    hub.publish("a", "a3")
    hub.publish("new", "before")
    changed = hub.subscribe(["a", "new"], last_id=cursor)
    hub.publish("new", "after")
    assert [(e.channel, e.data) for e in changed.take()] == [("a", "a3"), ("new", "after")]
    changed.close()


def test_bad_channel_lists_and_cursors_are_refused_before_anything_is_held(hub):
    for bad in ([], ["a", "a"], ["a", ""], [f"c{n}" for n in range(MAX_CHANNELS + 1)], "", ["a", 3]):
        with pytest.raises(InvalidEvent):
            hub.subscribe(bad)
    for cursor in ("nonsense", "x.1-1_", "a.b.1-1", "a%G1.1-1", "a%4.1-1", "\u00e9.1-1", "a_b.1-1", "a.1-1-1",
                   "a.1-1_" * 200 + "a.1-1", "a" * 33 + ".1-1", "%C3%A9" * 5 + "abc.1-1", "~" + "a" * 25 + ".1-1",
                   "~" + "a" * 27 + ".1-1", "~" + "A" * 26 + ".1-1", "~" + "a" * 25 + "1.1-1", "~.1-1"):
        with pytest.raises(InvalidEventId):
            hub.subscribe(["a", "b" * 40], last_id=cursor)
    for future in (f"a.{hub.epoch}-99", f"{channel_tag('a')}.{hub.epoch}-99", f"{cursor_name('b' * 40)}.{hub.epoch}-99"):
        with pytest.raises(InvalidEventId, match="future"):
            hub.subscribe(["a", "b" * 40], last_id=future)
    assert hub.subscriptions == 0 and hub.channels() == []


def test_closing_releases_every_channel_and_its_watcher(hub):
    hub.publish("kept", "x")
    sub = hub.subscribe(["kept", "pristine"])
    sub.start()
    assert hub.subscriptions == 1 and sorted(hub.channels()) == ["kept", "pristine"]
    sub.close()
    assert hub.subscriptions == 0 and hub.channels() == ["kept"]  # the never-published one is gone
    assert hub.store.get("kept").watchers == () and hub.store.get("kept").refs == 0


def test_a_waiting_thread_wakes_on_any_channel_and_ends_with_the_hub(hub):
    sub = hub.subscribe(["x", "y"])
    got: list = []
    done = threading.Event()

    def follow():
        for item in sub:
            if item:
                got.append((item.channel, item.data))
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    settle(lambda: sub._waited)
    hub.publish("y", 1)
    settle(lambda: got == [("y", 1)])
    hub.publish("x", 2)
    settle(lambda: got == [("y", 1), ("x", 2)])
    hub.end_subscriptions()
    assert done.wait(5)
    assert hub.subscriptions == 0


def test_forgetting_one_channel_ends_the_stream_after_its_last_events(hub):
    sub = hub.subscribe(["game:1", "lobby"])
    hub.publish("game:1", "over")
    hub.forget("game:1")
    assert [e.data for e in sub.take()] == ["over"]
    assert sub.ended
    sub.close()


def test_views_see_each_channel_event(hub):
    sub = hub.subscribe(["a", "b"], view=lambda e: None if e.data == "hidden" else f"{e.channel}:{e.data}")
    for channel, data in [("a", "hidden"), ("b", "x"), ("a", "y")]:
        hub.publish(channel, data)
    got = sub.take()
    assert [e.data for e in got] == ["b:x", "a:y"]
    cursor = got[-1].id
    sub.close()
    again = hub.subscribe(["a", "b"], last_id=cursor)
    assert again.take() == []  # the hidden event is behind the cursor too
    again.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["p", "q", "r", "s"]), st.booleans()), min_size=1, max_size=60))
def test_property_reconnects_lose_and_repeat_nothing_on_any_channel(steps):
    """Publishes on four channels (one not followed) interleaved with
    reconnects from the last id seen: every followed channel's events arrive
    exactly once, in order."""
    hub = Hub(buffer_size=1000, idle=0.05)
    channels = ["p", "q", "r"]
    published: dict[str, list[int]] = {c: [] for c in channels}
    received: dict[str, list[int]] = {c: [] for c in channels}
    sub = hub.subscribe(channels)
    cursor = sub.last_id
    for n, (channel, reconnect) in enumerate(steps):
        hub.publish(channel, n)
        if channel in published:
            published[channel].append(n)
        if reconnect:
            for event in sub.take()[:random.Random(n).randint(0, 3)]:  # the client saw only some of it
                received[event.channel].append(event.data)
                cursor = event.id
            sub.close()
            sub = hub.subscribe(channels, last_id=cursor)
    for event in sub.take():
        assert event.name != GAP
        received[event.channel].append(event.data)
    sub.close()
    assert received == published
    hub.close()


def test_redis_reconnects_lose_and_repeat_nothing_on_any_channel(comet_redis):
    from comet.backends.redis import RedisHub

    hub = RedisHub(comet_redis.url, prefix=f"chanprop-{time.monotonic_ns()}:", idle=0.2)
    rng = random.Random(7)
    channels = ["p", "q", "r"]
    published: dict[str, list[int]] = {c: [] for c in channels}
    received: dict[str, list[int]] = {c: [] for c in channels}
    sub = hub.subscribe(channels)
    cursor = sub.last_id
    try:
        for n in range(120):
            channel = rng.choice(channels + ["s"])
            hub.publish(channel, n)
            if channel in published:
                published[channel].append(n)
            if rng.random() < 0.2:
                for event in sub.take()[:rng.randint(0, 3)]:
                    received[event.channel].append(event.data)
                    cursor = event.id
                sub.close()
                sub = hub.subscribe(channels, last_id=cursor)
        total = sum(map(len, published.values())) - sum(map(len, received.values()))
        for event in take_until(sub, total):
            received[event.channel].append(event.data)
        assert received == published
    finally:
        sub.close()
        hub.close()


# -- over HTTP --------------------------------------------------------------------


def data_of(item):
    """(channel, data) of an item read by StreamClient on any transport."""
    if isinstance(item, dict):  # chunked NDJSON
        return item["channel"], item["data"]
    if hasattr(item, "body"):  # a multipart Part
        doc = json.loads(item.body)
        return doc["channel"], doc["data"]
    if isinstance(item.data, str) and item.data.startswith("{"):  # SSE data is text
        return item.channel, json.loads(item.data)
    return item.channel, item.data


@pytest.fixture
def channels_app(comet_cherrypy, hub):
    """The three shapes of handler, on every transport, following two channels."""

    def handler(transport, shape, **options):
        @cherrypy.expose
        @comet(transport=transport, heartbeat=0.5, poll_timeout=5, **options)
        def stream(self, last_event_id=None, thread="t1"):
            channels = ["room", f"dm:{thread}"]
            if shape == "returned":
                return hub.subscribe(channels, last_id=last_event_id)
            if shape == "transform":
                return ({**e.data, "via": "transform"} if isinstance(e.data, dict) and e else e
                        for e in hub.subscribe(channels, last_id=last_event_id))
            return generator(channels, last_event_id)

        def generator(channels, last_event_id):
            yield from hub.subscribe(channels, last_id=last_event_id)
        return stream

    class Root:
        pass

    for transport in TRANSPORTS:
        for shape in ("returned", "generator"):
            setattr(Root, f"{transport}_{shape}", handler(transport, shape))
        setattr(Root, f"{transport}_thread", handler(transport, "generator", mode="thread"))
    return comet_cherrypy(Root())


@pytest.mark.parametrize("shape", ["returned", "generator", "thread"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_says_the_channel_and_resumes_every_channel(channels_app, hub, transport, shape):
    url = f"{channels_app.url}/{transport}_{shape}?thread=t1"
    start = hub.subscribe(["room", "dm:t1"])  # a cursor on both, as a page renders it
    cursor = start.last_id
    start.close()
    hub.publish("room", "r1")
    hub.publish("dm:t1", {"text": "psst"})
    hub.publish("dm:t2", "not mine")
    with StreamClient(url, transport=transport, last_event_id=cursor) as client:
        got = client.wait_for(2)
        hub.publish("room", "r2")
        got = client.wait_for(3)
        last = client.last_event_id if transport == "longpoll" else None
    assert [data_of(i) for i in got] == [("room", "r1"), ("dm:t1", {"text": "psst"}), ("room", "r2")]
    if transport == "sse":
        last = got[-1].id
    elif transport == "chunked":
        last = got[-1]["id"]
    elif transport == "multipart":
        last = json.loads(got[-1].body)["id"]
    assert is_multi_cursor(last)
    hub.publish("dm:t1", "while away")
    hub.publish("room", "r3")
    with StreamClient(url, transport=transport, last_event_id=last) as client:
        again = client.wait_for(2)
        hub.publish("dm:t1", "live")
        again = client.wait_for(3)
    assert [data_of(i) for i in again] == [("dm:t1", "while away"), ("room", "r3"), ("dm:t1", "live")]
    settle(lambda: hub.subscriptions == 0, what="every subscription released")


def test_sse_wire_form_a_bare_eventsource_can_read(channels_app, hub):
    """The documented bytes: the data is {"channel", "data"}; the id is the
    cursor on every channel; named events keep their name."""
    with RawStream(channels_app.url + "/sse_returned?thread=t9") as raw:
        assert raw.status == 200
        raw.chunk()  # the preamble
        hub.publish("dm:t9", "hi", event="dm")
        wire = b""
        while b"data:" not in wire:
            wire = raw.chunk()
    cursor = f"room.{hub.last_id('room')}_dm:t9.{hub.last_id('dm:t9')}"
    assert wire == f'id: {cursor}\nevent: dm\ndata: {{"channel":"dm:t9","data":"hi"}}\n\n'.encode()
    [event] = SSEParser().feed(wire)  # comet.testing's parser (like comet.js) unwraps it
    assert (event.channel, event.data, event.name, event.id) == ("dm:t9", "hi", "dm", cursor)


def test_a_longpoll_handshake_gives_a_cursor_on_every_channel(channels_app, hub):
    hub.publish("room", "old")
    status, _, body = http_get(channels_app.url + "/longpoll_returned?thread=t3")
    doc = json.loads(body)
    assert status == 200 and doc["events"] == [] and is_multi_cursor(doc["cursor"])
    hub.publish("dm:t3", "new")
    status, _, body = http_get(channels_app.url + f"/longpoll_returned?thread=t3&last_event_id={doc['cursor']}")
    [event] = json.loads(body)["events"]
    assert event["channel"] == "dm:t3" and event["data"] == "new"


def test_a_malformed_cursor_is_a_400_with_a_reason(channels_app):
    status, _, body = http_get(channels_app.url + "/sse_returned", headers={"Last-Event-ID": "zz.1-1_nonsense"})
    assert status == 400 and b"malformed event id" in body


# -- fast routes ---------------------------------------------------------------------


def test_a_fast_route_may_follow_several_channels(comet_cherrypy, hub):
    from comet.cherrypy_tool import engine_plugin

    engine_plugin().route("/follow/{user}", hub, ["room", "dm:{user}", "presence"], heartbeat=0.5)
    from comet.stats import mount

    root = type("Root", (), {})()
    mount(root)
    server = comet_cherrypy(root)
    cursor_sub = hub.subscribe(["room", "dm:ann", "presence"])
    cursor = cursor_sub.last_id
    cursor_sub.close()
    hub.publish("dm:ann", "for ann")
    hub.publish("dm:bob", "for bob")
    with StreamClient(server.url + "/follow/ann", last_event_id=cursor) as client:
        hub.publish("presence", {"joined": "bob"})
        got = client.wait_for(2)
        status, _, stats = http_get(server.url + "/comet/stats/json")
    assert [(e.channel, e.data) for e in got] == [("dm:ann", "for ann"), ("presence", '{"joined":"bob"}')]
    streams = json.loads(stats)["streams"]
    assert streams["open"] == 1 and streams["by_channel"] == {"room (+2)": 1}
    assert engine_plugin().pool.counters["routed_fast"] >= 1
    with pytest.raises(ValueError, match="list of 1 to"):
        engine_plugin().route("/bad/{x}", hub, ["room:{y}"])


def test_a_channel_that_fell_behind_gets_its_snapshot_on_a_stream_of_several(any_hub):
    any_hub.snapshot("score", lambda channel: {"total": 99})
    sub = any_hub.subscribe(["score", "chat"])
    any_hub.publish("chat", "hi")
    cursor = take_until(sub, 1)[-1].id
    sub.close()
    for n in range(60):  # more than the buffer (50) holds
        last = any_hub.publish("score", n)
    any_hub.publish("chat", "still here")
    mirror_read(any_hub, "score", last)
    resumed = any_hub.subscribe(["score", "chat"], last_id=cursor)
    got = take_until(resumed, 3)
    assert [(e.channel, e.name) for e in got[:2]] == [("score", GAP), ("score", "comet.snapshot")]
    assert got[1].data == {"total": 99} and got[0].data["snapshot"] is True
    assert [(e.channel, e.data) for e in got[2:]] == [("chat", "still here")]
    any_hub.publish("score", "live")
    assert [(e.channel, e.data) for e in take_until(resumed, 1)] == [("score", "live")]
    # The snapshot's id resumes there: nothing before it comes back.
    resumed.close()
    again = any_hub.subscribe(["score", "chat"], last_id=got[1].id)
    assert [e.data for e in take_until(again, 2)] == ["still here", "live"]
    again.close()


def test_a_member_on_a_stream_of_several_channels_is_present_on_each(any_hub):
    any_hub.presence_grace = 0.2
    watcher = any_hub.subscribe(["room", "dm:ann:bob"])
    sub = any_hub.subscribe(["room", "dm:ann:bob"], member="ann")
    sub.start()
    settle(lambda: any_hub.members("room") == {"ann": 1} and any_hub.members("dm:ann:bob") == {"ann": 1})
    joins = take_until(watcher, 2)
    assert sorted((e.channel, e.name, e.data) for e in joins) == [
        ("dm:ann:bob", "comet.join", "ann"), ("room", "comet.join", "ann")]
    assert any_hub.disconnect(member="ann") == 1  # one stream, however many channels
    settle(lambda: sub.ended, what="the stream of several channels ended")
    sub.close()
    leaves = take_until(watcher, 2)
    assert sorted((e.channel, e.name) for e in leaves) == [("dm:ann:bob", "comet.leave"), ("room", "comet.leave")]
    settle(lambda: any_hub.members("room") == {} and any_hub.members("dm:ann:bob") == {})
    watcher.close()


def test_a_redis_fast_route_of_several_channels_resumes_at_accept_time(comet_cherrypy, comet_redis):
    """On RedisHub: the first stream (the mirrors are cold) goes through a
    worker, the next ones are answered where cheroot accepts them, and one
    cursor resumes both channels exactly."""
    from comet.backends.redis import RedisHub
    from comet.cherrypy_tool import engine_plugin

    hub = RedisHub(comet_redis.url, prefix=f"chanfast-{time.monotonic_ns()}:", idle=0.2)
    try:
        engine_plugin().route("/follow/{user}", hub, ["room", "dm:{user}"], heartbeat=0.5)
        server = comet_cherrypy(type("Root", (), {})(), thread_pool=2)
        pool = engine_plugin().pool
        with StreamClient(server.url + "/follow/ann") as first:
            wait_until(lambda: hub.connected and hub.subscriptions == 1, what="first stream subscribed")
            hub.publish("dm:ann", "d1")
            hub.publish("room", "r1")
            got = first.wait_for(2)
        assert sorted((e.channel, e.data) for e in got) == [("dm:ann", "d1"), ("room", "r1")]
        cursor = got[-1].id
        hub.publish("room", "r2")
        hub.publish("dm:ann", "d2")
        wait_until(lambda: [e.data for e in hub.history("dm:ann")][-1:] == ["d2"], what="the mirror caught up")
        fast_before = pool.counters["routed_fast"]
        with StreamClient(server.url + "/follow/ann", last_event_id=cursor) as again:
            more = again.wait_for(2)
        assert sorted((e.channel, e.data) for e in more) == [("dm:ann", "d2"), ("room", "r2")]
        assert pool.counters["routed_fast"] > fast_before  # the resumed one at accept time
    finally:
        hub.close()


# -- cursors no one can collide ----------------------------------------------------
#
# The first cursor format named each channel by its CRC-32 (``channel_tag``), and
# refused to follow two channels of one tag: anyone who could name a channel could
# break someone else's stream. These forge such collisions in microseconds.


def forge_crc32(prefix: str, target: int, length: int = 19) -> str:
    """``prefix`` + *length* letters of ``acegikmo`` whose UTF-8 has CRC-32
    *target*. CRC-32 is affine over GF(2): flipping bits 1-3 of each letter
    changes the checksum by a fixed vector each, so the flips that reach
    *target* are a solution of 32 linear equations (Gaussian elimination)."""
    base = prefix + "a" * length
    zero = zlib.crc32(bytes(len(base.encode())))
    start = len(prefix.encode())
    basis: dict[int, tuple[int, int]] = {}  # highest bit: (checksum change, flips making it)
    for flip in range(length * 3):
        delta = bytearray(len(base.encode()))
        delta[start + flip // 3] = 2 << (flip % 3)
        change, flips = zlib.crc32(bytes(delta)) ^ zero, 1 << flip
        for top in sorted(basis, reverse=True):
            if change >> top & 1:
                change, flips = change ^ basis[top][0], flips ^ basis[top][1]
        if change:
            basis[change.bit_length() - 1] = (change, flips)
    want, flips = target ^ zlib.crc32(base.encode()), 0
    for top in sorted(basis, reverse=True):
        if want >> top & 1:
            want, flips = want ^ basis[top][0], flips ^ basis[top][1]
    assert want == 0, "no solution: use more letters"
    out = bytearray(base.encode())
    for flip in range(length * 3):
        if flips >> flip & 1:
            out[start + flip // 3] ^= 2 << (flip % 3)
    return out.decode()


def twin_of(channel: str, prefix: str) -> str:
    """Another channel, starting with *prefix*, with *channel*'s CRC-32 (and so its old tag)."""
    twin = forge_crc32(prefix, zlib.crc32(channel.encode()))
    assert twin != channel and zlib.crc32(twin.encode()) == zlib.crc32(channel.encode())
    assert channel_tag(twin) == channel_tag(channel)
    return twin


def test_the_cursor_names_each_channel_by_its_name_percent_encoded():
    assert multi_cursor({"shouts": "1700000000000-3", "dm:ann:bob": "1700000000000-5"}) == \
        "shouts.1700000000000-3_dm:ann:bob.1700000000000-5"
    assert multi_cursor({"room.1": "1-2", "a_b%": "3-4", "é~ ": "5-6"}) == "room%2E1.1-2_a%5Fb%25.3-4_%C3%A9%7E%20.5-6"
    cursor = "room%2e1.1-2_x.7-8"  # lowercase hex is read too
    assert split_cursor(cursor, ["room.1", "y"]) == {"room.1": ("1-2", (1, 2))}


def sha_name(channel: str) -> str:
    return "~" + base64.b32encode(hashlib.sha256(channel.encode("utf-8", "surrogatepass")).digest()[:16]).decode() \
        .rstrip("=").lower()


def test_a_name_longer_than_32_characters_encoded_is_named_by_a_hash():
    """A cursor's size cannot depend on what users call things: a piece is
    at most 32 characters of name (or ``~`` and 26 of hash), ``.`` and an id."""
    for kept in ("a" * 32, "é" * 5 + "ab", "~" * 10 + "ab", "%" * 10 + "ab"):
        assert len(cursor_name(kept)) == 32 and cursor_name(kept)[0] != "~"
    for long in ("a" * 33, "é" * 5 + "abc", "~" * 11, "😀" * 200, "\ud800" * 4, "room.1" * 6):
        assert cursor_name(long) == sha_name(long) and len(sha_name(long)) == 27
    assert len({cursor_name(c) for c in ("a" * 33, "a" * 34, "b" * 33)}) == 3
    cursor = multi_cursor({"a" * 32: "1-2", "a" * 33: "3-4"})
    assert cursor == f"{'a' * 32}.1-2_{sha_name('a' * 33)}.3-4"
    assert split_cursor(cursor, ["a" * 33, "a" * 32]) == {"a" * 32: ("1-2", (1, 2)), "a" * 33: ("3-4", (3, 4))}
    assert split_cursor(cursor, ["a" * 34]) == {}  # another long name: not named


def test_a_name_that_looks_like_a_hash_is_not_the_channel_of_that_hash(any_hub):
    """``~`` is always encoded in a name piece: a user who names a channel
    after another channel's hash gets a piece of its own (``%7E...``)."""
    hub = any_hub
    long = "lobby:" + "ü" * 40
    lookalike = cursor_name(long)  # "~<26 letters>", the long channel's piece name, as a channel name
    assert lookalike[0] == "~" and cursor_name(lookalike) == "%7E" + lookalike[1:]
    sub = hub.subscribe([long, lookalike])
    sub.start()
    hub.publish(long, "l1")
    hub.publish(lookalike, "k1")
    got = take_until(sub, 2)
    sub.close()
    assert [(e.channel, e.data) for e in got] == [(long, "l1"), (lookalike, "k1")]
    hub.publish(lookalike, "k2")
    hub.publish(long, "l2")
    back = hub.subscribe([lookalike, long], last_id=got[0].id)  # long after l1, the lookalike before k1
    assert by_channel(take_until(back, 3)) == {lookalike: ["k1", "k2"], long: ["l2"]}
    back.close()
    at = {long: parse_id(hub.last_id(long)), lookalike: parse_id(hub.last_id(lookalike))}
    only_hash = f"{lookalike}.{hub.last_id(long)}"  # the hash's piece resumes the long channel only
    assert split_cursor(only_hash, [long, lookalike]) == {long: (hub.last_id(long), at[long])}
    only_name = f"%7E{lookalike[1:]}.{hub.last_id(lookalike)}"
    assert split_cursor(only_name, [long, lookalike]) == {lookalike: (hub.last_id(lookalike), at[lookalike])}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(st.characters(blacklist_characters="\r\n\x00"), min_size=1, max_size=200),
                       st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=1,
                       max_size=MAX_CHANNELS))
def test_property_any_channel_names_make_a_cursor_that_gives_each_channel_its_own_id(ids):
    cursor = multi_cursor({channel: f"{e}-{s}" for channel, (e, s) in ids.items()})
    assert is_multi_cursor(cursor) and len(cursor) <= MAX_CURSOR
    assert split_cursor(cursor, list(ids)) == {channel: (f"{e}-{s}", (e, s)) for channel, (e, s) in ids.items()}


def test_channels_whose_old_tags_collide_share_a_stream_and_resume_exactly(any_hub):
    hub = any_hub
    room = "room:main"
    twin = twin_of(room, "room:")
    other = "room.1_b%"  # the separators themselves, in a name
    sub = hub.subscribe([room, twin, other])  # refused with a 400 before: "share a cursor tag"
    sub.start()
    hub.publish(room, "r1")
    hub.publish(twin, "t1")
    hub.publish(other, "o1")
    got = take_until(sub, 3)
    sub.close()
    assert [(e.channel, e.data) for e in got] == [(room, "r1"), (twin, "t1"), (other, "o1")]
    hub.publish(twin, "t2")
    hub.publish(room, "r2")
    # From the first event's cursor: room after r1, the twin and the other from before theirs.
    resumed = hub.subscribe([room, twin, other], last_id=got[0].id)
    more = take_until(resumed, 4)
    assert [(e.channel, e.data) for e in more] == [(twin, "t1"), (other, "o1"), (twin, "t2"), (room, "r2")]
    assert not any(e.name == GAP for e in more)
    resumed.close()
    again = hub.subscribe([twin, room], last_id=more[-1].id)  # another order, one channel fewer
    hub.publish(room, "r3")
    assert [(e.channel, e.data) for e in take_until(again, 1)] == [(room, "r3")]
    again.close()


def test_a_cursor_resumes_colliding_channels_exactly_on_another_process(comet_redis):
    from comet.backends.redis import RedisHub

    prefix = f"chancoll-{time.monotonic_ns()}:"
    room = "room:main"
    twin = twin_of(room, "dm:ann:")
    one = RedisHub(comet_redis.url, prefix=prefix, idle=0.2)
    other = RedisHub(comet_redis.url, prefix=prefix, idle=0.2)
    try:
        sub = one.subscribe([room, twin])
        sub.start()
        one.publish(room, "r1")
        one.publish(twin, "t1")
        cursor = take_until(sub, 2)[0].id  # room at r1; the twin before t1
        sub.close()
        one.publish(twin, "t2")
        one.publish(room, "r2")
        there = other.subscribe([room, twin], last_id=cursor)
        got = take_until(there, 3)  # (another process's order across channels may differ)
        assert by_channel(got) == {twin: ["t1", "t2"], room: ["r2"]}
        there.close()
    finally:
        one.close()
        other.close()


def test_an_old_cursor_still_resumes_where_its_tag_names_one_followed_channel(hub):
    room, news = "room:main", "news"
    twin = twin_of(room, "room:")
    for channel in (room, twin, news):
        hub.publish(channel, channel + " 1")
    old = "_".join(f"{channel_tag(c)}.{hub.last_id(c)}" for c in (room, twin, news))
    for channel in (room, twin, news):
        hub.publish(channel, channel + " 2")
    sub = hub.subscribe([room, news], last_id=old)
    assert [(e.channel, e.data) for e in sub.take()] == [(room, "room:main 1"[:-1] + "2"), (news, "news 2")]
    sub.close()
    # A tag two followed channels share says nothing: both start from now; never a refusal.
    sub = hub.subscribe([room, twin, news], last_id=old)
    hub.publish(twin, "live")
    assert [(e.channel, e.data) for e in sub.take()] == [(news, "news 2"), (twin, "live")]
    sub.close()


def test_a_fast_route_follows_a_channel_a_user_named_to_collide(comet_cherrypy, hub):
    from comet.cherrypy_tool import engine_plugin

    engine_plugin().route("/follow/{user}", hub, ["shouts", "dm:{user}"], heartbeat=0.5)
    server = comet_cherrypy(type("Root", (), {})())
    user = twin_of("shouts", "dm:")[3:]
    with StreamClient(server.url + f"/follow/{user}") as client:
        wait_until(lambda: hub.subscriptions == 1, what="the stream subscribed")
        hub.publish("shouts", "hello")
        hub.publish(f"dm:{user}", "psst")
        got = client.wait_for(2)
    assert [(e.channel, e.data) for e in got] == [("shouts", "hello"), (f"dm:{user}", "psst")]
    hub.publish("shouts", "while away")
    with StreamClient(server.url + f"/follow/{user}", last_event_id=got[0].id) as client:
        again = client.wait_for(2)
    assert [(e.channel, e.data) for e in again] == [(f"dm:{user}", "psst"), ("shouts", "while away")]


def test_the_shoutbox_a_name_forged_to_collide_with_the_room_breaks_nobody(comet_cherrypy):
    """The attack on record: a user name that makes ``dm:ann:<name>``
    collide with ``shouts``; one private message to ann, and her stream
    (room, online list, messages) answered 400 on every connect."""
    from examples.shoutbox.app import RateLimiter, make_app
    from examples.shoutbox.pm import NAME, Accounts
    from test_examples_pm import User

    hub = Hub(buffer_size=1000, idle=0.2)
    root, config = make_app(hub, mod_secret="s3cret", rate=RateLimiter(limit=1000, window=60), accounts=Accounts())
    server = comet_cherrypy(root, config)
    name = twin_of("shouts", "dm:ann:z")[len("dm:ann:"):]
    assert NAME.fullmatch(name)  # a valid user name
    ann, mallory = User(server.url, "ann"), User(server.url, name)
    assert mallory.send("ann", "hi")[0] == 200
    thread = f"ann:{name}"
    with ann.stream(thread, last_event_id=ann.cursor()) as stream:  # the page's own cursor, built by the app
        assert stream.status == 200
        assert mallory.send("ann", "second")[0] == 200
        stream.wait_for(lambda evs: any(e.name == "pm" for e in evs))
        cursor = stream.events[-1].id
    wait_until(lambda: hub.subscriptions == 0, 2.0, what="the server saw the client go")
    status, _, _ = ann.json("/shout", {"nick": "ann", "text": "while away", "csrf": ann.csrf()})
    assert status == 200
    assert mallory.send("ann", "third")[0] == 200
    with ann.stream(thread, last_event_id=cursor) as stream:
        stream.wait_for(lambda evs: any(e.name == "pm" for e in evs) and any(e.name == "shout" for e in evs))
        news = [(e.channel, e.name) for e in stream.events if e.name in ("pm", "shout")]
        assert news == [("shouts", "shout"), (f"dm:ann:{name}", "pm")]
        assert [json.loads(e.data)["text"] for e in stream.events if e.name == "pm"] == ["third"]


@pytest.mark.parametrize("route", ["handler", "fast"])
def test_the_longest_cursor_resumes_every_channel_over_http(comet_cherrypy, hub, route):
    """64 channels, half at the longest name a cursor keeps (32 characters
    encoded), half of 200 emoji (named by a hash, 27 characters), ids padded
    to 20 digits: within 160 characters of the longest cursor (MAX_CURSOR),
    one Last-Event-ID header inside the 8 KB head a fast route reads, and
    it resumes every channel."""
    channels = [f"{n:02d}" + "é" * 5 for n in range(32)] + [f"{n:02d}" + "😀" * 198 for n in range(32)]

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=1)
        def events(self, last_event_id=None):
            return hub.subscribe(channels, last_id=last_event_id)

    if route == "fast":
        from comet.cherrypy_tool import engine_plugin

        engine_plugin().route("/events", hub, channels, transport="sse", heartbeat=1)
        Root = type("Root", (), {})  # type: ignore[misc]
    server = comet_cherrypy(Root())
    with StreamClient(server.url + "/events") as client:
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        for channel in channels:
            hub.publish(channel, "before")
        got = client.wait_for(MAX_CHANNELS)
    assert [(e.channel, e.data) for e in got] == [(c, "before") for c in channels]
    assert len(got[-1].id) < MAX_CURSOR  # (real ids are shorter than 20 digits)
    cursor = multi_cursor({c: "%020d-%020d" % parse_id(hub.last_id(c)) for c in channels})
    where = {c: key for c, (_, key) in split_cursor(got[-1].id, channels).items()}
    assert len(cursor) == MAX_CURSOR - 32 * 5 and {c: key for c, (_, key) in split_cursor(cursor, channels).items()} == where
    for channel in channels[::-1]:
        hub.publish(channel, "while away")
    with StreamClient(server.url + "/events", last_event_id=cursor) as client:
        again = client.wait_for(MAX_CHANNELS)
    assert [(e.channel, e.data) for e in again] == [(c, "while away") for c in channels[::-1]]
    assert len(again[0].id) < MAX_CURSOR and split_cursor(again[-1].id, channels) == {
        c: (hub.last_id(c), parse_id(hub.last_id(c))) for c in channels}
