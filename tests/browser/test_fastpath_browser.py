"""Fast routes as a real browser meets them: Chromium's own EventSource and
comet.js (SSE, multipart, NDJSON) on streams cut every second
(``max_duration``), resumed from ``Last-Event-ID`` or ``?last_event_id=`` at
accept time, with nothing lost or repeated."""
import cherrypy

from comet import Hub
from comet.cherrypy_tool import engine_plugin, static_config
from comet.testing import wait_until

PAGE_JS = r"""
window.live = {};
const cursor = document.body.dataset.cursor;
function record(name) { live[name] = {events: [], statuses: []}; return live[name]; }
// The browser's own EventSource: resumes with the Last-Event-ID header.
const native = record("eventsource");
const source = new EventSource("/fast/sse?last_event_id=" + encodeURIComponent(cursor));
source.onmessage = (e) => native.events.push({id: e.lastEventId, data: JSON.parse(e.data)});
source.onerror = () => native.statuses.push("reconnecting");
source.onopen = () => native.statuses.push("open");
for (const t of ["sse", "multipart", "chunked"]) {
  const rec = record("comet.js " + t);
  Comet.subscribe("/fast/" + t, {
    transport: t, lastEventId: cursor, minDelay: 100, maxDelay: 400,
    onEvent: (ev) => rec.events.push({id: ev.id, data: ev.data}),
    onStatus: (s) => rec.statuses.push(s),
  });
}
"""


def test_browsers_resume_on_fast_routes(context, comet_cherrypy):
    hub = Hub(idle=0.2)
    plugin = engine_plugin()
    for transport in ("sse", "multipart", "chunked"):
        plugin.route(f"/fast/{transport}", hub, "ticks", transport=transport, heartbeat=0.5, max_duration=1, retry=200)

    class Root:
        @cherrypy.expose
        def index(self):
            return (f'<!doctype html><body data-cursor="{hub.last_id("ticks")}">'
                    '<script src="/comet/comet.js"></script><script src="/page.js"></script></body>')

        @cherrypy.expose
        def page_js(self):
            cherrypy.response.headers["Content-Type"] = "text/javascript"
            return PAGE_JS

    server = comet_cherrypy(Root(), static_config("/comet"), thread_pool=4)
    pool = plugin.pool
    before = pool.counters.snapshot()
    page = context.new_page()
    try:
        page.goto(server.url + "/")
        wait_until(lambda: hub.subscriptions >= 4, timeout=10, what="four streams connected")
        sent = []
        for n in range(12):  # about 3 s: every stream is cut and resumed
            sent.append(hub.publish("ticks", {"n": n}))
            page.wait_for_timeout(250)
        try:
            page.wait_for_function("Object.values(window.live).every(l => l.events.length >= 12)", timeout=20_000)
        except Exception:
            raise AssertionError(page.evaluate("JSON.stringify(window.live)")) from None
        page.wait_for_timeout(500)  # nothing more may arrive
        live = page.evaluate("window.live")
        for name, got in live.items():
            assert [e["data"] for e in got["events"]] == [{"n": n} for n in range(12)], name
            assert [e["id"] for e in got["events"]] == sent, name
            assert "reconnecting" in got["statuses"], (name, got["statuses"])
        # four streams, each reconnected at least once (the writer ends streams
        # past max_duration at its once-a-second scan); most at accept time
        fast = pool.counters["routed_fast"] - before.get("routed_fast", 0)
        through_wsgi = pool.counters["routed_wsgi"] - before.get("routed_wsgi", 0)
        assert fast + through_wsgi >= 8 and fast >= through_wsgi, (fast, through_wsgi)
    finally:
        page.close()
    wait_until(lambda: hub.subscriptions == 0 and pool.open_streams == 0, timeout=10, what="released when the page closed")
    hub.close()


class ScriptPage:
    """A page loading comet.js, then the class's ``script``."""
    script = ""

    @cherrypy.expose
    def index(self):
        return '<!doctype html><body><script src="/comet/comet.js"></script><script src="/page.js"></script></body>'

    @cherrypy.expose
    def page_js(self):
        cherrypy.response.headers["Content-Type"] = "text/javascript"
        return self.script


REFUSED_JS = r"""
window.out = {};
for (const t of ["sse", "multipart", "chunked"]) {
  // refused by the route's authorize: onDenied once, then nothing more
  const denied = out["denied " + t] = {statuses: [], events: [], denied: null};
  Comet.subscribe("/guarded/" + t + "?token=bad", {
    transport: t, minDelay: 100, maxDelay: 400,
    onEvent: (ev) => denied.events.push(ev.data), onStatus: (s) => denied.statuses.push(s),
    onDenied: (info) => { denied.denied = info; },
  });
}
for (const [name, url, t] of [["sse", "/guarded/sse?token=good", "sse"], ["multipart", "/guarded/multipart?token=good", "multipart"],
                               ["chunked", "/guarded/chunked?token=good", "chunked"], ["longpoll", "/poll", "longpoll"]]) {
  // a cursor the server cannot resume from (400): a gap, then the stream from now
  const stale = out["stale " + name] = {statuses: [], events: [], gaps: []};
  Comet.subscribe(url, {
    transport: t, lastEventId: "9999999999999-1", minDelay: 100, maxDelay: 400,
    onEvent: (ev) => stale.events.push(ev.data), onStatus: (s) => stale.statuses.push(s),
    onGap: (ev) => stale.gaps.push(ev.data),
  });
}
"""


def test_comet_js_stops_on_a_refusal_and_restarts_from_a_bad_cursor(context, comet_cherrypy):
    from comet import Forbidden, comet

    hub = Hub(idle=0.2)
    plugin = engine_plugin()

    def authorize(request):
        if request.query.get("token") != "good":
            raise Forbidden("bad token")
        return True

    for transport in ("sse", "multipart", "chunked"):
        plugin.route(f"/guarded/{transport}", hub, "news", transport=transport, heartbeat=0.5, authorize=authorize)

    class Root(ScriptPage):
        script = REFUSED_JS

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=1)
        def poll(self, last_event_id=None):
            return hub.subscribe("news", last_id=last_event_id)

    server = comet_cherrypy(Root(), static_config("/comet"), thread_pool=6)
    pool = plugin.pool
    forbidden = pool.counters["forbidden"]
    page = context.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_function("['sse', 'multipart', 'chunked'].every(t => out['denied ' + t].denied)")
        # SSE asks twice: EventSource (whose error has no status), then one fetch to learn why
        wait_until(lambda: pool.counters["forbidden"] - forbidden == 4, what="four refusals")
        wait_until(lambda: hub.subscriptions >= 3, what="the three streams back from a bad cursor")
        page.wait_for_function("out['stale longpoll'].statuses.includes('open')")
        hub.publish("news", "after the gap")
        page.wait_for_function("Object.keys(out).filter(k => k.startsWith('stale')).every(k => out[k].events.length >= 1)")
        out = page.evaluate("out")
        for transport in ("sse", "multipart", "chunked"):
            got = out["denied " + transport]
            assert got["denied"] == {"status": 403, "reason": "bad token"}, transport
            assert got["statuses"][-1] == "closed" and "open" not in got["statuses"] and got["events"] == [], got
        for name in ("sse", "multipart", "chunked", "longpoll"):
            got = out["stale " + name]
            assert [g["last_id"] for g in got["gaps"]] == ["9999999999999-1"], (name, got)
            assert "from the future" in got["gaps"][0]["reason"], got
            assert got["events"] == ["after the gap"], (name, got)
            assert got["statuses"][-1] == "open", (name, got)
        # a refused subscription never came back
        assert pool.counters["forbidden"] - forbidden == 4
    finally:
        page.close()
    wait_until(lambda: hub.subscriptions == 0, timeout=10, what="released when the page closed")
    hub.close()


RETRY_AFTER_JS = r"""
window.got = {};
for (const t of ["sse", "multipart", "chunked", "longpoll"]) {
  got[t] = [];
  Comet.subscribe("/busy/" + t, {transport: t, minDelay: 100, maxDelay: 400, onEvent: (ev) => got[t].push(ev.data)});
}
"""


def test_comet_js_waits_as_long_as_retry_after_says(context, comet_cherrypy):
    """A 503 with Retry-After (admission control, Redis down) is retried no
    sooner than it says, on every transport, whatever the client's own
    backoff (here 100-400 ms), then the stream opens."""
    import time

    from comet import StreamsExhausted, comet

    hub = Hub(idle=0.2)
    calls: dict[str, list[float]] = {}

    def busy_twice(transport):
        @comet(transport=transport, heartbeat=0.5, poll_timeout=1)
        def handler(self, last_event_id=None):
            calls.setdefault(transport, []).append(time.monotonic())
            if len(calls[transport]) <= 2:
                raise StreamsExhausted("busy, come back later", retry_after=2)
            return hub.subscribe("news", last_id=last_event_id or hub.last_id("news"))
        return cherrypy.expose(handler)

    class Busy:
        sse, multipart, chunked, longpoll = (busy_twice(t) for t in ("sse", "multipart", "chunked", "longpoll"))

    class Root(ScriptPage):
        script = RETRY_AFTER_JS
        busy = Busy()

    server = comet_cherrypy(Root(), static_config("/comet"), thread_pool=8)
    page = context.new_page()
    try:
        page.goto(server.url + "/")
        # SSE: EventSource's failure, then one fetch to read the status: two calls a round
        wait_until(lambda: all(len(calls.get(t, [])) >= 3 for t in ("sse", "multipart", "chunked", "longpoll")),
                   timeout=30, what="every transport past its two refusals")
        # all four, the long-poll included: its first answered poll starts "from now"
        wait_until(lambda: hub.subscriptions >= 4, timeout=10, what="the streams open and the long-poll waiting")
        hub.publish("news", "finally")
        page.wait_for_function("Object.values(got).every(events => events.includes('finally'))", timeout=15_000)
    finally:
        page.close()
    for transport in ("multipart", "chunked", "longpoll"):
        first, second, third = calls[transport][:3]
        # a lower bound only (a slow machine makes it longer): the client's own backoff is 100-400 ms
        assert second - first >= 1.9 and third - second >= 1.9, (transport, calls[transport])
    # SSE: EventSource is refused, the probe right after reads the 503 and its
    # Retry-After, and only then, 2 s later, EventSource comes back
    sse = calls["sse"]
    assert sse[2] - sse[1] >= 1.9, sse
    wait_until(lambda: hub.subscriptions == 0, timeout=10, what="released when the page closed")
    hub.close()
