"""Behaviour users rely on, pinned as they would notice it breaking: each
test here failed under a deliberate one-line break of what it pins (named
in its docstring), through a live server."""
from __future__ import annotations

import json

import cherrypy
import pytest

from comet import GAP, Hub, comet
from comet.stats import metrics_wsgi
from comet.testing import StreamClient, http_get, wait_until
from comet.wsgi import comet_app

from conftest import RawStream


def test_a_multipart_json_client_is_told_it_lost_events(comet_cherrypy):
    """A JSON (not image) multipart stream resuming from a cursor that fell
    out of the buffer gets a comet.gap part first, then what is left.
    (Break: the gap sent as a heartbeat, as an image stream's is.)"""
    hub = Hub(buffer_size=3, idle=0.2)

    class Root:
        @cherrypy.expose
        @comet(transport="multipart", heartbeat=0.5)
        def feed(self, last_event_id=None):
            return hub.subscribe("feed", last_id=last_event_id)

    server = comet_cherrypy(Root())
    seen = hub.publish("feed", {"n": 0})
    for n in range(1, 7):
        hub.publish("feed", {"n": n})
    try:
        with StreamClient(server.url + "/feed", transport="multipart", last_event_id=seen) as client:
            parts = client.wait_for(4, timeout=10)
        docs = [json.loads(part.body) for part in parts[:4]]
        assert [part.content_type for part in parts[:4]] == ["application/json"] * 4
        assert docs[0]["event"] == GAP
        assert [doc["data"] for doc in docs[1:]] == [{"n": 4}, {"n": 5}, {"n": 6}]
    finally:
        hub.close()


def test_metrics_without_channels_name_no_channel(comet_wsgi):
    """metrics_wsgi(channels=False): no per-channel series, no channel name
    anywhere in the answer. (Break: the flag not passed on.)"""
    hub = Hub(idle=0.2)
    events = comet_app(lambda environ: hub.subscribe("room:the-secret-one"), transport="chunked")
    quiet, full = metrics_wsgi(events.pool, [hub], channels=False), metrics_wsgi(events.pool, [hub])

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        return {"/quiet": quiet, "/full": full}.get(path, events)(environ, start_response)

    server = comet_wsgi(app, pools=[events.pool])
    try:
        with StreamClient(server.url + "/events", transport="chunked"):
            wait_until(lambda: b"room:the-secret-one" in http_get(server.url + "/full")[2], what="the channel counted")
            status, _, body = http_get(server.url + "/quiet")
        assert status == 200 and b"comet_streams_open 1" in body
        assert b"comet_streams_by_channel" not in body and b"the-secret-one" not in body
    finally:
        hub.close()


@pytest.mark.parametrize("late", [False, True])
def test_a_parked_generators_first_none_is_not_an_event(comet_cherrypy, hub, late):
    """A generator that yields None first ("nothing yet") sends nothing for
    it: the client's first event is the first real one, whether its first
    step is done at once or outlasts PRIME_WAIT (and is delivered late).
    (Break: the first step's None kept as an item, sent as data: null.)"""
    import time

    from comet.pipeline import PRIME_WAIT

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def events(self):
            if late:
                time.sleep(PRIME_WAIT * 3)  # (a slow first step: a handler's database call)
            yield None
            yield from hub.subscribe("news")

    server = comet_cherrypy(Root())
    with RawStream(server.url + "/events") as raw:
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        hub.publish("news", "first real")
        got = b""
        while b"first real" not in got:
            got += raw.chunk()
    assert b"null" not in got and b"data: first real\n" in got, got


@pytest.mark.parametrize("shape", ["returned", "generator"])
@pytest.mark.parametrize("locking", ["implicit", "early"])
@pytest.mark.parametrize("transport", ["sse", "longpoll"])
def test_a_stream_in_thread_mode_leaves_its_users_other_pages_loading(comet_cherrypy, hub, locking, transport, shape):
    """With tools.sessions, a stream that keeps its thread (mode="thread",
    as under a WSGI server; a parked one ends its request at once) does not
    keep the user's session locked: the same user's pages load while it is
    open, a long-poll's wait included. (Break: the session not released
    once the stream's first step is done: open_stream's ``started``.)"""

    class Root:
        @cherrypy.expose
        def login(self, name):
            cherrypy.session["user"] = name
            return "ok"

        @cherrypy.expose
        def page(self):
            return f"page of {cherrypy.session.get('user')}"

        @cherrypy.expose
        @comet(transport=transport, heartbeat=0.5, poll_timeout=5, mode="thread")
        def events(self, last_event_id=None):
            channel = "user:" + cherrypy.session["user"]
            if shape == "returned":
                return hub.subscribe(channel, last_id=last_event_id)
            return self._follow(channel, last_event_id)

        def _follow(self, channel, last_event_id):
            yield from hub.subscribe(channel, last_id=last_event_id)

    server = comet_cherrypy(Root(), global_config={"tools.sessions.on": True, "tools.sessions.locking": locking})
    _, headers, _ = http_get(server.url + "/login?name=ann")
    cookie = {"Cookie": headers["set-cookie"].split(";")[0]}
    cursor = hub.last_id("user:ann") if transport == "longpoll" else None
    with StreamClient(server.url + "/events", transport=transport, headers=cookie, last_event_id=cursor):
        wait_until(lambda: hub.subscriptions == 1, what="streaming")
        status, _, body = http_get(server.url + "/page", headers=cookie, timeout=3)
        assert (status, body) == (200, b"page of ann")
    wait_until(lambda: hub.subscriptions == 0, what="released")
