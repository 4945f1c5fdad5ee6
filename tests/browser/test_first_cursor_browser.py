"""comet.js resumes from the cursor an SSE heartbeat tells, in headless Chromium.

A page that has received no event yet has no id of its own: the stream's
cursor comes with the heartbeat (comet.framing). Through a proxy that
silently stops forwarding (comet.testing.FaultProxy.blackhole), the page's
watchdog reconnects from that cursor and shows what was published while
its connection was dead, once each, in order. Items with no id of their
own that follow the heartbeat's id (a greeting, a snapshot given with
``initial``) are shown too: EventSource hands them the last id it saw, and
comet.js must not take them for events it has already shown.
"""
from __future__ import annotations

import json
import time

import cherrypy
import pytest

from comet import Event, Hub, comet
from comet.cherrypy_tool import static_config
from comet.testing import FaultProxy

HB = 1  # the server's heartbeat, seconds

PAGE = """<!doctype html><body><script src="/comet/comet.js"></script><script>
window.shown = [];
window.sub = Comet.subscribe("/events/" + new URLSearchParams(location.search).get("shape"), {
  events: ["state"],
  onEvent: (ev) => shown.push([ev.event, ev.id, ev.data]),
});
</script></body>"""


@pytest.fixture
def server(comet_cherrypy):
    hub = Hub(idle=0.2)

    class Events:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=HB)
        def snapshot(self, last_event_id=None):
            # A returned subscription: its cursor is in the announcement,
            # then the state (no id of its own).
            state = [] if last_event_id else [Event({"players": 0}, name="state")]
            return hub.subscribe("room", last_id=last_event_id, initial=state)

        @cherrypy.expose
        @comet(transport="sse", heartbeat=HB)
        def greeting(self, last_event_id=None):
            # A generator: its cursor is told once it first waits.
            if last_event_id is None:
                yield "hello"
                yield "again"
            yield from hub.subscribe("room", last_id=last_event_id)

    class Root:
        events = Events()

        @cherrypy.expose
        def index(self, shape="snapshot"):
            return PAGE

    server = comet_cherrypy(Root(), static_config("/comet"), thread_pool=20)
    server.hub = hub
    yield server
    hub.close()


@pytest.mark.parametrize("shape, first", [
    ("snapshot", [["state", None, {"players": 0}]]),
    ("greeting", [["message", None, "hello"], ["message", None, "again"]]),
])
def test_a_page_with_no_event_yet_shows_what_was_published_while_blackholed(context, server, shape, first):
    hub = server.hub
    with FaultProxy(server.url) as proxy:
        page = context.new_page()
        page.goto(f"{proxy.url}/?shape={shape}")
        cursor = hub.last_id("room")
        page.wait_for_function(f"window.sub && window.sub.lastEventId === {json.dumps(cursor)}", timeout=5_000)
        page.wait_for_function(f"window.shown.length === {len(first)}", timeout=5_000)
        assert page.evaluate("window.shown") == first  # each item with no id shown once
        assert page.evaluate("window.sub.status") == "open"
        proxy.blackhole()
        dropped = time.monotonic()
        sent = [hub.publish("room", {"n": n}) for n in range(3)]
        want = first + [["message", event_id, {"n": n}] for n, event_id in enumerate(sent)]
        try:
            page.wait_for_function(f"window.shown.length >= {len(want)}", timeout=10_000)
        except Exception:
            raise AssertionError(f"not shown 10 s after the blackhole: {page.evaluate('window.shown')}, "
                                 f"status {page.evaluate('window.sub.status')}") from None
        took = time.monotonic() - dropped
        time.sleep(2 * HB)  # a heartbeat or two more: nothing twice
        assert page.evaluate("window.shown") == want
        assert page.evaluate("window.sub.status") == "open"
        assert took < 10, took
        page.close()
