"""CherryPy's gzip tool never touches a stream. With ``tools.gzip`` on for
``text/*`` (a common config), a parked stream used to be labelled
``Content-Encoding: gzip`` and then written raw (clients failed with
IncompleteRead), and in thread mode events sat in zlib's buffer. Every
transport, parked and thread mode, over raw sockets: identity-encoded
chunks, each event at once; the site's pages are still compressed."""
import gzip
import json

import cherrypy
import pytest

from comet import Event, comet
from comet.testing import http_get

from conftest import RawStream

# Everything comet serves, and more: */* would match too.
GZIP_CONFIG = {"/": {"tools.gzip.on": True,
                     "tools.gzip.mime_types": ["text/*", "application/*", "multipart/*"]}}


def gzip_root(hub):
    def endpoint(transport, mode):
        @comet(transport=transport, mode=mode, heartbeat=30, poll_timeout=5)
        def handler(self, last_event_id=None):
            # A generator that greets nobody and follows the hub: parked in
            # auto mode, on a thread of its own in thread mode.
            yield from hub.subscribe("lobby", last_id=last_event_id)
        return cherrypy.expose(handler)

    class Root:
        @cherrypy.expose
        def index(self):
            return "plain page " * 100

    for transport in ("sse", "multipart", "chunked", "longpoll"):
        for mode in ("auto", "thread"):
            setattr(Root, f"{transport}_{mode}", endpoint(transport, mode))
    return Root()


@pytest.fixture
def server(comet_cherrypy, hub):
    return comet_cherrypy(gzip_root(hub), GZIP_CONFIG)


def test_pages_are_still_gzipped(server):
    status, headers, body = http_get(server.url + "/", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == b"plain page " * 100


@pytest.mark.parametrize("mode", ["auto", "thread"])
@pytest.mark.parametrize("transport", ["sse", "multipart", "chunked"])
def test_streams_are_never_gzipped(server, hub, transport, mode):
    with RawStream(f"{server.url}/{transport}_{mode}", headers={"Accept-Encoding": "gzip, deflate"}) as raw:
        assert raw.status == 200
        assert "content-encoding" not in raw.headers
        assert raw.headers["transfer-encoding"] == "chunked"
        raw.chunk()  # the preamble: the stream is open
        boundary = raw.headers["content-type"].partition("boundary=")[2].strip('"')
        expected = Event("hello", id=hub.publish("lobby", "hello")).encode(transport, boundary)
        got = b""
        while expected not in got:  # RawStream.chunk raises after its deadline
            got += raw.chunk()
        assert got.endswith(expected)


@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_longpoll_answers_are_never_gzipped(server, hub, mode):
    before = hub.last_id("lobby")
    event_id = hub.publish("lobby", "hello")
    with RawStream(f"{server.url}/longpoll_{mode}?last_event_id={before}", headers={"Accept-Encoding": "gzip"}) as raw:
        assert raw.status == 200
        assert "content-encoding" not in raw.headers
        doc = json.loads(raw.body())
    assert [(e["id"], e["data"]) for e in doc["events"]] == [(event_id, "hello")]
