"""comet.js's stream probe: a fetch subscription (chunked, multipart) that
fell back to long-poll (pollUrl) behind a buffering proxy tries its stream
again now and then beside the polls. A probe the server answers with a
non-200 that has a body (a 503 "at capacity") is not a stream getting
through: the page stays on long-poll, and streams again only once the
stream is served.

The page, its report (window.subs) and the helpers are those of
test_real_networks.py; the server here can refuse its streams on demand.
"""
from __future__ import annotations

import time

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import static_config
from comet.testing import FaultProxy, wait_until

from .test_real_networks import HB, PageRoot, Tab, check_events, page_url, wait_shown

FETCH_TRANSPORTS = ["chunked", "multipart"]


@pytest.fixture
def probe_server(comet_cherrypy):
    """The streams at /events/<transport> answer ``server.refuse`` (an HTTP
    status) while it is set, and count each refusal in ``server.refused``."""
    hub = Hub(idle=0.2)
    refused: dict[str, int] = {t: 0 for t in FETCH_TRANSPORTS}

    def stream(transport):
        @comet(transport=transport, heartbeat=HB, poll_timeout=HB)
        def handler(self, last_event_id=None):
            if server.refuse is not None:
                refused[transport] += 1
                raise cherrypy.HTTPError(server.refuse, "full")
            return hub.subscribe("net", last_id=last_event_id)
        return cherrypy.expose(handler)

    class Events:
        chunked, multipart = (stream(t) for t in FETCH_TRANSPORTS)

        @cherrypy.expose
        @comet(transport="longpoll", heartbeat=HB, poll_timeout=HB)
        def poll(self, last_event_id=None):  # where a held-back stream falls back (pollUrl)
            return hub.subscribe("net", last_id=last_event_id)

    server = comet_cherrypy(PageRoot(hub, Events()), static_config("/comet"), thread_pool=20)
    server.hub, server.refuse, server.refused = hub, None, refused
    yield server
    hub.close()


def test_a_probe_answered_503_keeps_the_page_on_longpoll(context, probe_server):
    """Fallen back behind a buffering proxy, then the proxy lets streams
    through but the server answers them 503 "full" (a body, not a stream):
    each probe fails, the page stays on long-poll and shows what is
    published; once the server serves streams again, the next probe gets
    through and the page streams."""
    hub, subs = probe_server.hub, "window.subs"
    with FaultProxy(probe_server.url) as proxy:
        proxy.buffer_responses(True)
        page = context.new_page()
        page.goto(page_url(proxy.url, FETCH_TRANSPORTS, heartbeat=HB, pollUrl="/events/poll", retryStreamAfter=4000))
        tab = Tab("chromium", page)
        sent = [hub.publish("net", {"n": 0})]
        for t in FETCH_TRANSPORTS:
            tab.wait_for(f"{subs}.{t}.sub.transport === 'longpoll'", timeout=15)
        # The first probe comes 4 s (retryStreamAfter) after the fallback
        # (room for a loaded machine): by then the proxy passes streams, and
        # the server refuses them.
        probe_server.refuse = 503
        # (A probe already open would get its held bytes: through, a stream.)
        assert tab.evaluate(f"Object.values({subs}).every((s) => s.sub._streamProbe === null)"), tab.report()
        proxy.buffer_responses(False)
        wait_shown([tab], 1, time.time() + 5, "on long-poll")
        wait_until(lambda: all(probe_server.refused.values()), timeout=12, what="a probe per transport, refused")
        for t in FETCH_TRANSPORTS:
            tab.wait_for(f"{subs}.{t}.sub._streamProbe === null", timeout=5)
        for t, sub in tab.report().items():
            assert sub["transport"] == "longpoll", (t, sub)
            assert [f[:2] for f in sub["fallbacks"]] == [[t, "longpoll"]], (t, sub)
        sent.append(hub.publish("net", {"n": 1}))
        wait_shown([tab], 2, time.time() + 2 * HB + 2, "still on long-poll, after a refused probe")
        check_events([tab], sent)
        # Served again: the next probe (8 s after the refused one) streams.
        probe_server.refuse = None
        for t in FETCH_TRANSPORTS:
            tab.wait_for(f"{subs}.{t}.sub.transport === '{t}' && {subs}.{t}.sub.status === 'open'", timeout=20)
        sent.append(hub.publish("net", {"n": 2}))
        wait_shown([tab], 3, time.time() + 3, "streaming again")
        for t, sub in check_events([tab], sent)["chromium"].items():
            assert [f[:2] for f in sub["fallbacks"]] == [[t, "longpoll"], ["longpoll", t]], (t, sub)
