"""CORS in Chromium: a page on one origin (a cheroot WSGI server on one
loopback port) follows comet streams on another (CherryPy on a second
port), on every transport, with comet.js's ``withCredentials`` deciding
whether the stream sees the user's cookie."""
from __future__ import annotations

from pathlib import Path

import cherrypy
import pytest

from comet import Event, Hub, comet
from comet.cherrypy_tool import STATIC_DIR

COMET_JS = (Path(STATIC_DIR) / "comet.js").read_bytes()
TRANSPORTS = ["sse", "multipart", "chunked", "longpoll"]


@pytest.fixture
def origins(comet_wsgi, comet_cherrypy):
    """(page server, stream server, hub): the page's origin is the only one
    the streams allow, with credentials."""
    def pages(environ, start_response):
        if environ["PATH_INFO"] == "/comet.js":
            start_response("200 OK", [("Content-Type", "text/javascript")])
            return [COMET_JS]
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [b"<!doctype html><script src='/comet.js'></script>"]

    page_server = comet_wsgi(pages)
    hub = Hub(idle=0.2)

    def streamer(transport):
        @comet(transport=transport, cors_origins=[page_server.url], cors_credentials=True, heartbeat=1, poll_timeout=2)
        def handler(self, last_event_id=None):
            if last_event_id is None:  # the first request: greet whoever the cookie says
                who = cherrypy.request.cookie.get("who")
                last_event_id = hub.last_id("room")
                yield Event(f"hello {who.value if who else 'nobody'}", id=last_event_id)
            yield from hub.subscribe("room", last_id=last_event_id)
        return cherrypy.expose(handler)

    class Root:
        pass

    for t in TRANSPORTS:
        setattr(Root, t, streamer(t))
    stream_server = comet_cherrypy(Root())
    assert page_server.url.rsplit(":", 1)[1] != stream_server.url.rsplit(":", 1)[1]
    yield page_server, stream_server, hub
    hub.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cross_origin_stream_with_credentials(context, origins, transport):
    page_server, stream_server, hub = origins
    # A cookie of the stream's host (ports do not separate cookies).
    context.add_cookies([{"name": "who", "value": "ann", "url": stream_server.url}])
    page = context.new_page()
    page.goto(page_server.url + "/")
    page.evaluate("""([url, transport]) => {
        window.got = []; window.denied = [];
        Comet.subscribe(url, {transport: transport, withCredentials: true, minDelay: 100,
                              onEvent: (ev) => window.got.push(ev.data),
                              onDenied: (d) => window.denied.push(d)});
    }""", [f"{stream_server.url}/{transport}", transport])
    page.wait_for_function("window.got.length >= 1")
    hub.publish("room", "news")
    page.wait_for_function("window.got.length >= 2")
    assert page.evaluate("window.got.slice(0, 2)") == ["hello ann", "news"]
    assert page.evaluate("window.denied") == []


def test_without_credentials_the_cookie_stays_home(context, origins):
    page_server, stream_server, _ = origins
    context.add_cookies([{"name": "who", "value": "ann", "url": stream_server.url}])
    page = context.new_page()
    page.goto(page_server.url + "/")
    page.evaluate("""(url) => {
        window.got = [];
        Comet.subscribe(url, {transport: "sse", onEvent: (ev) => window.got.push(ev.data)});
    }""", f"{stream_server.url}/sse")
    page.wait_for_function("window.got.length >= 1")
    assert page.evaluate("window.got[0]") == "hello nobody"
