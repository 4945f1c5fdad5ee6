"""The heartbeat is announced and kept, whatever the handler's shape.

Every stream response says ``Comet-Heartbeat: <seconds>`` (a long-poll's
is its ``poll_timeout``, also in its JSON answer); SSE announces it in a
``comet.heartbeat`` event right after the preamble. Then the server keeps
it: read as raw bytes, no silence on an idle stream outlasts the interval
by much, whichever way the handler is written or served (comet.framing)."""
from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import cherrypy
import pytest

from comet import Hub, comet
from comet.backends.redis import RedisHub
from comet.cherrypy_tool import engine_plugin
from comet.testing import StreamClient, http_get, wait_until
from comet.wsgi import comet_app

from conftest import RawStream, no_cursor

HB = 0.5
#: Longest silence accepted on an idle stream: what comet.js's watchdog
#: allows (2 heartbeats), so a server that keeps to it is never taken for dead.
LONGEST = 2 * HB
BEATS = 4
ANNOUNCED = b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"


@pytest.fixture
def slow_hub():
    # Its subscriptions tick every 3 s when idle: four heartbeats' time.
    # The server must not wait for a tick to keep its heartbeat.
    hub = Hub(idle=3.0)
    yield hub
    hub.close()


def shapes_root(hub):
    def gen(transport, **opts):
        @comet(transport=transport, heartbeat=HB, **opts)
        def handler(self):
            yield from hub.subscribe("quiet")
        return cherrypy.expose(handler)

    def loop(transport, **opts):
        @comet(transport=transport, heartbeat=HB, **opts)
        def handler(self):
            for event in hub.subscribe("quiet"):
                yield event
        return cherrypy.expose(handler)

    def sub(transport, **opts):
        @comet(transport=transport, heartbeat=HB, **opts)
        def handler(self):
            return hub.subscribe("quiet")
        return cherrypy.expose(handler)

    def multi(transport, **opts):
        @comet(transport=transport, heartbeat=HB, **opts)
        def handler(self):
            yield from hub.subscribe(["quiet", "other"])
        return cherrypy.expose(handler)

    def busy(transport):
        # A generator that blocks in its own code before it waits on a hub.
        @comet(transport=transport, heartbeat=HB)
        def handler(self):
            time.sleep(4 * HB)
            yield from hub.subscribe("quiet")
        return cherrypy.expose(handler)

    class ByTool:
        @cherrypy.expose
        def index(self):
            yield from hub.subscribe("quiet")

    class Root:
        index = cherrypy.expose(lambda self: "page")
        gen_sse, gen_chunked, gen_multipart = gen("sse"), gen("chunked"), gen("multipart")
        loop_sse = loop("sse")
        sub_sse, sub_chunked, sub_multipart = sub("sse"), sub("chunked"), sub("multipart")
        busy_sse = busy("sse")
        thread_gen_sse, thread_gen_chunked, thread_gen_multipart = (
            gen("sse", mode="thread"), gen("chunked", mode="thread"), gen("multipart", mode="thread"))
        thread_loop_sse = loop("sse", mode="thread")
        thread_sub_sse = sub("sse", mode="thread")
        multi_sse, thread_multi_sse = multi("sse"), multi("sse", mode="thread")
        direct_sse = gen("sse")  # served at accept time from its second request on
        tool = ByTool()

    return Root()


def gaps(url: str, count: int = BEATS) -> tuple[dict[str, str], bytes, list[float]]:
    """Open *url* raw; its headers, first chunk, and the silences (seconds)
    before each of its next *count* chunks (heartbeats: nothing is published)."""
    with RawStream(url, timeout=10) as raw:
        first = raw.chunk()
        last = time.monotonic()
        silences = []
        while len(silences) < count:
            told = raw.chunk().startswith(b"event: comet.heartbeat\nid: ")
            now = time.monotonic()
            if not told:  # (a generator's cursor, told once when it first waits: not on the heartbeat's clock)
                silences.append(now - last)
            last = now
    return raw.headers, first, silences


def check_kept(results: dict[str, tuple[dict[str, str], bytes, list[float]]]) -> None:
    for name, (headers, first, silences) in results.items():
        assert headers["comet-heartbeat"] == "0.5", name
        if "sse" in name or name in ("tool", "route"):
            assert no_cursor(first) == ANNOUNCED, name  # the announcement comes with the preamble
        assert max(silences) < LONGEST, f"{name}: silences {[round(s, 2) for s in silences]} s, heartbeat {HB} s"
        assert min(silences) > HB / 3, f"{name}: heartbeats {silences} s apart, heartbeat {HB} s"


def test_every_handler_shape_keeps_the_heartbeat(comet_cherrypy, slow_hub):
    plugin = engine_plugin()
    plugin.route("/route", slow_hub, "quiet", heartbeat=HB)
    server = comet_cherrypy(shapes_root(slow_hub), {"/tool": {"tools.comet.on": True, "tools.comet.heartbeat": HB}})
    before = plugin.pool.counters.snapshot().get("routed_direct", 0)
    with RawStream(server.url + "/direct_sse"):  # the first goes through the pipeline...
        pass
    names = ["gen_sse", "gen_chunked", "gen_multipart", "loop_sse", "sub_sse", "sub_chunked", "sub_multipart",
             "busy_sse", "thread_gen_sse", "thread_gen_chunked", "thread_gen_multipart", "thread_loop_sse",
             "thread_sub_sse", "multi_sse", "thread_multi_sse", "direct_sse", "tool", "route"]
    with ThreadPoolExecutor(len(names)) as pool:
        runs = {name: pool.submit(gaps, f"{server.url}/{name}" + ("/" if name == "tool" else "")) for name in names}
        results = {name: run.result(timeout=30) for name, run in runs.items()}
    assert plugin.pool.counters.snapshot()["routed_direct"] > before  # ...the second was direct
    check_kept(results)


def test_wsgi_streams_keep_the_heartbeat(comet_wsgi, slow_hub):
    apps = {
        "/sse": comet_app(lambda environ: slow_hub.subscribe("quiet"), transport="sse", heartbeat=HB),
        "/gen_sse": comet_app(lambda environ: (e for e in slow_hub.subscribe("quiet")), transport="sse", heartbeat=HB),
        "/thread_sse": comet_app(lambda environ: slow_hub.subscribe("quiet"), transport="sse", heartbeat=HB, mode="thread"),
        "/chunked": comet_app(lambda environ: slow_hub.subscribe("quiet"), transport="chunked", heartbeat=HB),
    }
    pools = [app.pool for app in apps.values()]

    def router(environ, start_response):
        return apps[environ["PATH_INFO"]](environ, start_response)

    server = comet_wsgi(router, pools=pools)
    with ThreadPoolExecutor(len(apps)) as pool:
        runs = {path.strip("/"): pool.submit(gaps, server.url + path) for path in apps}
        check_kept({name: run.result(timeout=30) for name, run in runs.items()})


@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_a_long_poll_announces_its_poll_timeout(comet_cherrypy, slow_hub, mode):
    hub = slow_hub  # (its idle, 3 s, must not delay the empty answer)

    class Root:
        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=0.4, mode=mode)
        def poll(self, last_event_id=None):
            return hub.subscribe("quiet", last_id=last_event_id)

    server = comet_cherrypy(Root())
    status, headers, body = http_get(server.url + "/poll")  # a handshake: the cursor at once
    assert status == 200 and headers["comet-heartbeat"] == "0.4" and json.loads(body)["heartbeat"] == 0.4
    started = time.monotonic()
    status, headers, body = http_get(server.url + "/poll?last_event_id=" + json.loads(body)["cursor"])
    took = time.monotonic() - started
    assert json.loads(body) == {"events": [], "cursor": hub.last_id("quiet"), "heartbeat": 0.4}
    assert 0.3 < took < 2 * 0.4, took  # the empty answer is the long-poll's heartbeat: kept too


def test_stream_client_reads_the_announced_heartbeat(comet_cherrypy, hub):
    server = comet_cherrypy(shapes_root(hub))
    for transport, path in (("sse", "/sub_sse"), ("chunked", "/sub_chunked"), ("multipart", "/sub_multipart")):
        with StreamClient(server.url + path, transport=transport) as client:
            wait_until(lambda: client.heartbeat == HB, what=f"{transport}: the announced heartbeat")
            wait_until(lambda: client.heartbeats >= 1, timeout=3 * HB + 2, what=f"{transport}: a heartbeat")
            assert client.events == []  # heartbeats and the announcement are not events
            hub.publish("quiet", "after a beat")
            assert len(client.wait_for(1)) == 1


def test_cors_exposes_the_heartbeat_header(comet_cherrypy, hub):
    page = "http://page.example"

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=HB, cors_origins=[page])
        def events(self):
            return hub.subscribe("quiet")

    engine_plugin().route("/fast", hub, "quiet", heartbeat=HB, cors_origins=[page])
    server = comet_cherrypy(Root())
    for path in ("/events", "/fast"):
        with RawStream(server.url + path, headers={"Origin": page}) as raw:
            exposed = [h.strip() for h in raw.headers["access-control-expose-headers"].split(",")]
            assert "Comet-Heartbeat" in exposed and raw.headers["comet-heartbeat"] == "0.5", path
            assert no_cursor(raw.chunk()) == ANNOUNCED


def test_redis_hub_streams_keep_the_heartbeat(comet_cherrypy, comet_redis):
    hub = RedisHub(comet_redis.url, prefix="heartbeat:", idle=3.0)
    try:
        server = comet_cherrypy(shapes_root(hub))
        names = ["gen_sse", "sub_chunked", "thread_gen_sse", "thread_multi_sse"]
        with ThreadPoolExecutor(len(names)) as pool:
            runs = {name: pool.submit(gaps, f"{server.url}/{name}") for name in names}
            check_kept({name: run.result(timeout=30) for name, run in runs.items()})
    finally:
        hub.close()
