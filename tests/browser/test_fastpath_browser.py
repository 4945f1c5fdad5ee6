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
