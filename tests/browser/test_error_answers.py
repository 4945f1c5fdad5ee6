"""comet.js's fetch streams (chunked, multipart) answered with an error page:
a 5xx with a body (CherryPy's HTML error page, as a failing app or a proxy's
502 sends) is not the stream. The page must not call it "open" nor read the
page as events: it shows "reconnecting", comes back, and once the stream is
served it is "open" and shows what was published, once each, in order.

(A multipart page also refuses such a body for its lack of a boundary; the
chunked one reads any body as NDJSON, so only the status check stops it.)

The page, its report (window.subs) and the helpers are those of
test_real_networks.py.
"""
from __future__ import annotations

import time

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import static_config
from comet.testing import wait_until

from .test_real_networks import HB, PageRoot, Tab, check_events, page_url, wait_shown

FETCH_TRANSPORTS = ["chunked", "multipart"]
ERRORS = [500, 502]  # what the first connections of each stream are answered, in turn


@pytest.fixture
def failing_server(comet_cherrypy):
    """The stream at /events/<transport> answers its first connections with
    ERRORS (an HTML error page each), then streams; ``server.answered``
    lists, per transport, what each connection got (a status, or "stream")."""
    hub = Hub(idle=0.2)
    answered: dict[str, list[object]] = {t: [] for t in FETCH_TRANSPORTS}

    def stream(transport):
        @comet(transport=transport, heartbeat=HB, poll_timeout=HB)
        def handler(self, last_event_id=None):
            seen = answered[transport]
            if len(seen) < len(ERRORS):
                seen.append(ERRORS[len(seen)])
                raise cherrypy.HTTPError(seen[-1], "the backend is down")
            seen.append("stream")
            return hub.subscribe("net", last_id=last_event_id)
        return cherrypy.expose(handler)

    class Events:
        chunked, multipart = (stream(t) for t in FETCH_TRANSPORTS)

    server = comet_cherrypy(PageRoot(hub, Events()), static_config("/comet"), thread_pool=20)
    server.hub, server.answered = hub, answered
    yield server
    hub.close()


def test_an_error_page_is_not_the_stream(context, failing_server):
    """Each stream's first two connections get a 500, then a 502, with an
    HTML body: the page goes connecting -> reconnecting -> open (never
    "open" on an error page), and shows the event published before the
    stream was served and the one after, once each, in order."""
    hub, answered = failing_server.hub, failing_server.answered
    page = context.new_page()
    # minDelay 200 ms: the two retries take well under a second.
    page.goto(page_url(failing_server.url, FETCH_TRANSPORTS, heartbeat=HB, minDelay=200))
    tab = Tab("chromium", page)
    sent = [hub.publish("net", {"n": 0})]  # after the page's cursor: shown once served
    wait_until(lambda: all(len(a) > len(ERRORS) for a in answered.values()), timeout=8,
               what=f"each stream served after its errors: {answered}")
    tab.wait_for("window.allOpen()", timeout=5)
    wait_shown([tab], 1, time.time() + 3, "served after the errors")
    sent.append(hub.publish("net", {"n": 1}))
    wait_shown([tab], 2, time.time() + 3, "streaming")
    for t, sub in tab.report().items():
        assert answered[t][:len(ERRORS) + 1] == ERRORS + ["stream"], (t, answered)
        # (An error page read as the stream: "open" on its first bytes.)
        assert [s for s, _ in sub["statuses"]] == ["connecting", "reconnecting", "open"], (t, sub)
    check_events([tab], sent)  # and no line of an error page shown as an event
