"""Snapshots after a gap in a real browser: the in-memory shoutbox restarts
under open pages, which redraw the server's current state from the
``comet.snapshot`` (comet.js ``onSnapshot``) without reloading."""
from .test_examples_browser import post_shout

TEXTS = "[...document.querySelectorAll('#shouts li .what')].map((e) => e.textContent)"


def test_a_restarted_shoutbox_redraws_its_state_and_keeps_the_unsent_text(context, example_server):
    server = example_server("examples.shoutbox")
    post_shout(server.url, "bob", "before the restart")
    # Two tabs of one browser share one stream (shared: true): the snapshot
    # must reach the tab that does not hold it, too.
    pages = [context.new_page(), context.new_page()]
    for page in pages:
        page.goto(server.url + "/")
        page.wait_for_selector('#status[data-status="open"]')
        assert page.evaluate(TEXTS) == ["before the restart"]
        page.evaluate("window.notReloaded = true")
    writer = pages[0]
    writer.fill("#nick", "ann")
    writer.fill("#text", "still typing this")

    server.stop()  # the in-memory hub forgets everything
    for page in pages:
        page.wait_for_selector('#status[data-status="reconnecting"]')
    restarted = example_server("examples.shoutbox", port=server.port)
    post_shout(restarted.url, "cat", "after the restart")
    for page in pages:
        # the old shout stays, greyed, under a note: the new server no longer has it
        page.wait_for_function(f"JSON.stringify({TEXTS}) === JSON.stringify(['before the restart', 'after the restart'])",
                               timeout=30_000)
        assert page.locator("#shouts li.gone + #gone-note").is_visible()
        page.wait_for_selector('#status[data-status="open"]')
    post_shout(restarted.url, "cat", "live again")  # ordered after anything that could come twice
    for page in pages:
        page.wait_for_function(f"{TEXTS}.includes('live again')")
        assert page.evaluate(TEXTS) == ["before the restart", "after the restart", "live again"]  # nothing twice
        assert page.evaluate("window.notReloaded") is True
        assert page.is_hidden("#empty")
    assert writer.input_value("#text") == "still typing this" and writer.input_value("#nick") == "ann"


PAGE_JS = r"""
window.got = {};
// Six streams at most: a browser opens 6 connections per origin over HTTP/1.1.
for (const t of ["sse", "multipart", "chunked", "longpoll"]) {
  for (const own of t === "sse" || t === "longpoll" ? [true, false] : [true]) {  // without onSnapshot, onEvent has it
    const log = got[t + (own ? "" : " no onSnapshot")] = [];
    const entry = (kind) => (ev) => log.push([kind, ev.event, ev.id, ev.data]);
    Comet.subscribe("/stream/" + t, Object.assign({
      transport: t, events: ["tick"], lastEventId: document.body.dataset.stale,
      onEvent: entry("onEvent"), onGap: entry("onGap"),
    }, own ? { onSnapshot: entry("onSnapshot") } : {}));
  }
}
"""


def test_comet_js_hands_the_snapshot_to_on_snapshot_on_every_transport(context, comet_cherrypy):
    import cherrypy

    from comet import Hub, comet
    from comet.cherrypy_tool import engine_plugin, static_config
    hub = Hub(buffer_size=2, idle=0.2)
    engine_plugin().add_hub(hub)
    hub.snapshot("unit", lambda channel: {"state": "now"})
    ids = [hub.publish("unit", n, event="tick") for n in range(4)]

    def streamer(transport):
        @comet(transport=transport, heartbeat=0.5, poll_timeout=1)
        def handler(self, last_event_id=None):
            return hub.subscribe("unit", last_id=last_event_id)
        return handler

    class Stream:
        pass

    for t in ["sse", "multipart", "chunked", "longpoll"]:
        setattr(Stream, t, cherrypy.expose(streamer(t)))

    class Root:
        stream = Stream()

        @cherrypy.expose
        def index(self):
            return (f'<!doctype html><body data-stale="{ids[0]}">'
                    '<script src="/comet/comet.js"></script><script src="/page.js"></script></body>')

        @cherrypy.expose
        def page_js(self):
            cherrypy.response.headers["Content-Type"] = "text/javascript"
            return PAGE_JS

    server = comet_cherrypy(Root(), static_config("/comet"))
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("Object.values(window.got).length === 6 && Object.values(window.got).every((l) => l.length >= 2)")
    live = hub.publish("unit", "live", event="tick")
    page.wait_for_function("Object.values(window.got).every((l) => l.length >= 3)")
    got = page.evaluate("window.got")
    for name, log in got.items():
        assert [entry[:2] for entry in log[:3]] == [
            ["onGap", "comet.gap"], ["onEvent" if "no onSnapshot" in name else "onSnapshot", "comet.snapshot"],
            ["onEvent", "tick"]], (name, log)
        assert log[0][3]["snapshot"] is True and log[1][2:] == [ids[-1], {"state": "now"}], (name, log)
        assert log[2][2:] == [live, "live"] and len(log) == 3, (name, log)


def test_a_restarted_shoutbox_with_nothing_new_still_redraws(context, example_server):
    """The restarted server has nothing past the page's cursor, so its
    snapshot carries the very id the page last saw: it is not "already
    shown", the page still learns the old shouts are gone."""
    server = example_server("examples.shoutbox")
    post_shout(server.url, "bob", "before the restart")
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector('#status[data-status="open"]')
    server.stop()
    page.wait_for_selector('#status[data-status="reconnecting"]')
    example_server("examples.shoutbox", port=server.port)
    page.wait_for_selector("#shouts li.gone + #gone-note", timeout=30_000)
    page.wait_for_selector('#status[data-status="open"]')
    assert page.evaluate(TEXTS) == ["before the restart"]
