"""A stream opened "from now" gives its client a cursor before its first event.

Such a stream has no event id until something is published. A client whose
connection dies before then (a laptop sleeps, a NAT forgets) used to resume
"from now" as well, and miss everything published while it was away: on a
quiet channel, the common case. Now the SSE heartbeat carries the stream's
cursor whenever the client has not been given it (``event: comet.heartbeat``,
``id: <cursor>``): in the announcement after the preamble when the cursor is
known then, else at once when the handler's first wait shows it (comet.framing).

Each test opens a stream with no cursor, reads until the heartbeat's id,
drops the connection, publishes 3 events, reconnects with that id and gets
exactly those 3, in order, whatever the handler's shape or hub.
"""
from __future__ import annotations

import json
import time

import cherrypy
import pytest

from comet import Event, Hub, comet
from comet.backends.redis import RedisHub
from comet.cherrypy_tool import engine_plugin
from comet.framing import FRAMINGS, heartbeat
from comet.testing import FaultProxy, SSEParser, StreamClient, http_get, wait_until
from comet.wsgi import comet_app

from conftest import RawStream

HB = 0.5
CHANNEL = "quiet"


def shapes(hub):
    """One endpoint per handler shape, each following CHANNEL from the
    client's cursor (``Last-Event-ID``)."""

    def sub(**opts):
        @comet(transport="sse", heartbeat=HB, **opts)
        def handler(self, last_event_id=None):
            return hub.subscribe(CHANNEL, last_id=last_event_id)
        return cherrypy.expose(handler)

    def gen(**opts):
        @comet(transport="sse", heartbeat=HB, **opts)
        def handler(self, last_event_id=None):
            yield from hub.subscribe(CHANNEL, last_id=last_event_id)
        return cherrypy.expose(handler)

    def greet(**opts):
        # Its cursor is not known when the stream opens (its first item is
        # a greeting): it is told once the generator first waits.
        @comet(transport="sse", heartbeat=HB, **opts)
        def handler(self, last_event_id=None):
            if last_event_id is None:
                yield {"hello": "page"}
            yield from hub.subscribe(CHANNEL, last_id=last_event_id)
        return cherrypy.expose(handler)

    def loop(**opts):
        # A generator that passes events (and the hub's Idle ticks) on
        # itself: not read in place by the writer.
        @comet(transport="sse", heartbeat=HB, **opts)
        def handler(self, last_event_id=None):
            for event in hub.subscribe(CHANNEL, last_id=last_event_id):
                yield event
        return cherrypy.expose(handler)

    def multi(**opts):
        @comet(transport="sse", heartbeat=HB, **opts)
        def handler(self, last_event_id=None):
            yield from hub.subscribe([CHANNEL, "other"], last_id=last_event_id)
        return cherrypy.expose(handler)

    class Root:
        sub_parked, gen_parked, greet_parked, loop_parked, multi_parked = sub(), gen(), greet(), loop(), multi()
        sub_thread, gen_thread, greet_thread, multi_thread = (
            sub(mode="thread"), gen(mode="thread"), greet(mode="thread"), multi(mode="thread"))

    return Root()


def first_cursor(url: str, limit: float = 5.0) -> tuple[str, list, bytes]:
    """Open *url* with no cursor; read until a heartbeat gives an id (within
    *limit* seconds), then drop the connection. The id, the events read
    before it, and the raw body."""
    parser = SSEParser()
    events, raw = [], b""
    deadline = time.monotonic() + limit
    with RawStream(url, timeout=limit) as stream:
        assert stream.status == 200
        while not parser.last_event_id:
            assert time.monotonic() < deadline, f"{url}: no cursor within {limit}s: {raw!r}"
            chunk = stream.chunk()
            raw += chunk
            events += parser.feed(chunk)
    assert all(event.id is None for event in events), events  # it was given by a heartbeat, not an event
    return parser.last_event_id, events, raw


def resumes_exactly(url: str, cursor: str, publish, expected: list[str]) -> None:
    """Publish while no client is connected; reconnecting with *cursor*
    gets exactly what was published, in order."""
    publish()
    with StreamClient(url, last_event_id=cursor) as client:
        got = client.wait_for(len(expected), timeout=5)
        time.sleep(2 * HB)  # a heartbeat or two more: nothing else, nothing twice
        got = list(client.events)
    assert [e.data for e in got] == expected, (url, got)


def three(hub, channel=CHANNEL):
    return lambda: [hub.publish(channel, text) for text in ("a", "b", "c")]


@pytest.mark.parametrize("shape", ["sub_parked", "gen_parked", "greet_parked", "loop_parked",
                                   "sub_thread", "gen_thread", "greet_thread"])
def test_a_stream_from_now_resumes_after_its_heartbeat_cursor(comet_cherrypy, hub, shape):
    server = comet_cherrypy(shapes(hub))
    url = f"{server.url}/{shape}"
    started = time.monotonic()
    cursor, events, raw = first_cursor(url)
    if shape.startswith("greet"):
        assert [e.data for e in events] == ['{"hello":"page"}']
    else:
        # known when the stream opens: in the announcement after the preamble
        assert raw == b":ok\n\nevent: comet.heartbeat\nid: %s\ndata: 0.5\n\n" % cursor.encode()
    assert time.monotonic() - started < HB, "told at once, not a heartbeat later"
    assert cursor == hub.last_id(CHANNEL)
    resumes_exactly(url, cursor, three(hub), ["a", "b", "c"])


@pytest.mark.parametrize("shape", ["multi_parked", "multi_thread"])
def test_a_multi_channel_stream_resumes_after_its_heartbeat_cursor(comet_cherrypy, hub, shape):
    server = comet_cherrypy(shapes(hub))
    url = f"{server.url}/{shape}"
    cursor, _, _ = first_cursor(url)
    assert cursor.count("_") == 1 and cursor.startswith(CHANNEL + ".")  # the multi cursor, every channel in it

    def publish():
        hub.publish(CHANNEL, "a"), hub.publish("other", "b"), hub.publish(CHANNEL, "c")

    resumes_exactly(url, cursor, publish, ["a", "b", "c"])


def test_a_fast_route_resumes_after_its_heartbeat_cursor(comet_cherrypy, hub):
    engine_plugin().route("/route", hub, CHANNEL, heartbeat=HB)
    server = comet_cherrypy(shapes(hub))
    cursor, _, raw = first_cursor(server.url + "/route")
    assert raw == b":ok\n\nevent: comet.heartbeat\nid: %s\ndata: 0.5\n\n" % cursor.encode()
    resumes_exactly(server.url + "/route", cursor, three(hub), ["a", "b", "c"])


@pytest.mark.parametrize("shape", ["sub_parked", "greet_parked", "multi_parked", "gen_thread"])
def test_redis_hub_streams_resume_after_their_heartbeat_cursor(comet_cherrypy, comet_redis, shape):
    hub = RedisHub(comet_redis.url, prefix=f"first-cursor-{shape}:", idle=0.2)
    try:
        server = comet_cherrypy(shapes(hub))
        url = f"{server.url}/{shape}"
        cursor, _, _ = first_cursor(url)
        resumes_exactly(url, cursor, three(hub), ["a", "b", "c"])
    finally:
        hub.close()


@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_a_long_poll_carries_its_cursor_in_every_answer(comet_cherrypy, hub, mode):
    class Root:
        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=HB, mode=mode)
        def poll(self, last_event_id=None):
            return hub.subscribe(CHANNEL, last_id=last_event_id)

    server = comet_cherrypy(Root())
    status, _, body = http_get(server.url + "/poll")  # no cursor: a handshake, answered at once
    assert status == 200
    handshake = json.loads(body)
    assert handshake["events"] == [] and handshake["cursor"] == hub.last_id(CHANNEL)
    three(hub)()  # while no request is open
    status, _, body = http_get(server.url + "/poll?last_event_id=" + handshake["cursor"])
    answer = json.loads(body)
    assert [e["data"] for e in answer["events"]] == ["a", "b", "c"] and answer["cursor"] == hub.last_id(CHANNEL)


def test_a_view_that_leaves_events_out_still_moves_the_client_cursor(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=HB)
        def events(self, last_event_id=None):
            return hub.subscribe(CHANNEL, last_id=last_event_id, view=lambda e: None if e.name == "mod" else e)

    server = comet_cherrypy(Root())
    with StreamClient(server.url + "/events") as client:
        shown = hub.publish(CHANNEL, "shown")
        assert client.wait_for(1)[0].id == shown
        wait_until(lambda: client.heartbeats >= 1, timeout=5, what="a heartbeat after the event")
        assert client.last_event_id == shown  # the event said it: heartbeats add nothing
        hidden = hub.publish(CHANNEL, "for moderators", event="mod")
        wait_until(lambda: client.last_event_id == hidden, timeout=5, what="the cursor past the hidden event")
    assert [e.data for e in client.events] == ["shown"]


def test_heartbeats_of_a_stream_that_has_its_id_stay_cached(comet_cherrypy, hub):
    server = comet_cherrypy(shapes(hub))
    with RawStream(server.url + "/sub_parked") as raw:
        assert b"\nid: " in raw.chunk()  # the announcement: the cursor
        assert raw.chunk() == b"event: comet.heartbeat\ndata: 0.5\n\n"  # then plain heartbeats
        event_id = hub.publish(CHANNEL, "x")
        assert raw.chunk() == b"id: %s\ndata: x\n\n" % event_id.encode()
        assert raw.chunk() == b"event: comet.heartbeat\ndata: 0.5\n\n"
    framing = FRAMINGS["sse"]
    assert framing.beat("", HB) is framing.beat("", HB)  # the same bytes object every time
    assert heartbeat("sse", HB, cursor="1-2") == b"event: comet.heartbeat\nid: 1-2\ndata: 0.5\n\n"
    assert heartbeat("sse", HB, cursor="1-2\ndata: forged") == heartbeat("sse", HB)  # never a forged field


def test_stream_client_resumes_after_the_heartbeat_cursor_through_a_blackhole(comet_cherrypy, hub):
    """Issue 26's case for the Python client: a connection that dies
    silently before the first event."""
    server = comet_cherrypy(shapes(hub))
    with FaultProxy(server.url) as proxy, \
            StreamClient(proxy.url + "/gen_parked", idle_timeout="auto") as client:
        wait_until(lambda: client.last_event_id == hub.last_id(CHANNEL), timeout=5, what="the heartbeat's cursor")
        proxy.blackhole()
        three(hub)()
        got = client.wait_for(3, timeout=10)
        assert client.reconnects >= 1
        time.sleep(2 * HB)
        assert [e.data for e in client.events] == ["a", "b", "c"], got


def test_an_event_without_id_after_the_cursor_is_still_delivered(comet_cherrypy, hub):
    """Items with no id of their own (a snapshot given with ``initial``)
    follow the announcement's id: the stream still shows each once."""
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=HB)
        def events(self, last_event_id=None):
            return hub.subscribe(CHANNEL, last_id=last_event_id,
                                 initial=[] if last_event_id else [Event({"n": 1}, name="state"), "two"])

    server = comet_cherrypy(Root())
    with StreamClient(server.url + "/events") as client:
        got = client.wait_for(2)
        assert [(e.name, e.data) for e in got] == [("state", '{"n":1}'), (None, "two")]
        cursor = client.last_event_id
    assert cursor == hub.last_id(CHANNEL)
    resumes_exactly(server.url + "/events", cursor, three(hub), ["a", "b", "c"])


@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_a_client_that_resumed_gets_no_cursor_before_its_gap(comet_cherrypy, mode):
    """A client that sent a cursor has one: the announcement stays plain,
    and the gap (its cursor fell out of the buffer) carries the new id."""
    small = Hub(buffer_size=3, idle=0.2)
    try:
        class Root:
            @cherrypy.expose
            @comet(transport="sse", heartbeat=HB, mode=mode)
            def events(self, last_event_id=None):
                return small.subscribe(CHANNEL, last_id=last_event_id)

        server = comet_cherrypy(Root())
        ids = [small.publish(CHANNEL, n) for n in range(6)]
        with RawStream(server.url + "/events", headers={"Last-Event-ID": ids[0]}) as raw:
            body = raw.chunk()
            while b"event: comet.gap" not in body:
                body += raw.chunk()
        assert body.startswith(b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\nid: %s\nevent: comet.gap\n" % ids[2].encode())
    finally:
        small.close()


@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_a_wsgi_stream_resumes_after_its_heartbeat_cursor(comet_wsgi, hub, mode):
    app = comet_app(lambda environ: hub.subscribe(CHANNEL, last_id=environ["comet.last_event_id"]),
                    transport="sse", heartbeat=HB, mode=mode)
    server = comet_wsgi(app, pools=[app.pool])
    cursor, _, raw = first_cursor(server.url + "/")
    assert raw == b":ok\n\nevent: comet.heartbeat\nid: %s\ndata: 0.5\n\n" % cursor.encode()
    resumes_exactly(server.url + "/", cursor, three(hub), ["a", "b", "c"])


@pytest.mark.parametrize("shape", ["gen_parked", "greet_parked"])
def test_a_direct_request_resumes_after_its_heartbeat_cursor(comet_cherrypy, hub, shape):
    """From its second request on, a handler is served at accept time
    (comet.direct): its generator's first step runs there."""
    plugin = engine_plugin()
    server = comet_cherrypy(shapes(hub))
    url = f"{server.url}/{shape}"
    with RawStream(url):  # the first goes through the pipeline...
        pass
    before = plugin.pool.counters.snapshot().get("routed_direct", 0)
    cursor, _, _ = first_cursor(url)
    assert plugin.pool.counters.snapshot()["routed_direct"] > before  # ...this one was direct
    resumes_exactly(url, cursor, three(hub), ["a", "b", "c"])
