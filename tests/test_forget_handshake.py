"""Starting exactly where the page's render left off.

A page renders the channel's cursor (``hub.last_id``) and its client
subscribes with it: nothing published between the render and the first
request is lost, on any transport. A long-poll without a cursor is a
handshake: it answers at once with the current cursor (and whatever is
ready), so the client's next poll starts exactly there.
"""
from __future__ import annotations

import json
import re
import time

import cherrypy
import pytest

from comet import Event, comet
from comet.testing import StreamClient, http_get

from conftest import settle

TRANSPORTS = ["sse", "multipart", "chunked", "longpoll"]


def data_of(item):
    if isinstance(item, dict):
        return item["data"]
    if hasattr(item, "body"):  # a multipart Part
        return json.loads(item.body)["data"]
    return item.data


@pytest.fixture
def page_app(comet_cherrypy, hub):
    """A page that renders the room's cursor, and the room's stream on every
    transport (the long-poll in both serving modes)."""

    def stream(transport, **options):
        @cherrypy.expose
        @comet(transport=transport, heartbeat=0.5, poll_timeout=30, **options)
        def handler(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)
        return handler

    class Root:
        @cherrypy.expose
        def index(self):
            return f'<body data-cursor="{hub.last_id("room")}"><script src="/comet/comet.js"></script></body>'

        sse, multipart, chunked, longpoll = (stream(t) for t in TRANSPORTS)
        longpoll_thread = stream("longpoll", mode="thread")

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=30)
        def snapshot(self, last_event_id=None):
            yield Event({"players": 2}, name="snapshot")
            yield from hub.subscribe("room", last_id=last_event_id)

    return comet_cherrypy(Root())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nothing_published_after_the_render_is_lost(page_app, hub, transport):
    hub.publish("room", "before the page")
    status, _, page = http_get(page_app.url + "/")
    cursor = re.search(rb'data-cursor="([^"]+)"', page)[1].decode()
    for n in range(3):  # while the page loads its script, before the stream is open
        hub.publish("room", f"after the render {n}")
    with StreamClient(page_app.url + "/" + transport, transport=transport, last_event_id=cursor) as client:
        got = client.wait_for(3)
        hub.publish("room", "live")
        got += client.wait_for(lambda items: len(items) >= 4)[3:]
    assert [data_of(i) for i in got] == ["after the render 0", "after the render 1", "after the render 2", "live"]


@pytest.mark.parametrize("path", ["longpoll", "longpoll_thread"])
def test_a_cursorless_longpoll_is_a_handshake(page_app, hub, path):
    """Parked and in thread mode: the first poll answers at once (not after
    poll_timeout=30 s) with the exact current cursor; the next poll, with
    it, gets everything published in between."""
    last = hub.publish("room", "old news")
    started = time.monotonic()
    status, headers, body = http_get(page_app.url + "/" + path, timeout=20)
    assert time.monotonic() - started < 15  # far from the 30 s a poll waits for news
    assert (status, body) == (200, ('{"events":[],"cursor":"%s","heartbeat":30}' % last).encode())
    published = [hub.publish("room", n) for n in range(2)]  # between two polls: not lost
    status, _, body = http_get(page_app.url + f"/{path}?last_event_id={last}", timeout=20)
    doc = json.loads(body)
    assert [e["data"] for e in doc["events"]] == [0, 1] and doc["cursor"] == published[-1]
    settle(lambda: hub.subscriptions == 0, what="both polls released")


def test_a_cursorless_longpoll_of_an_empty_channel_and_with_a_snapshot(page_app, hub):
    status, _, body = http_get(page_app.url + "/longpoll", timeout=20)
    assert json.loads(body) == {"events": [], "cursor": hub.last_id("room"), "heartbeat": 30}
    # a generator's snapshot comes in the handshake, with the cursor after it
    status, _, body = http_get(page_app.url + "/snapshot", timeout=20)
    doc = json.loads(body)
    assert [e["event"] for e in doc["events"]] == ["snapshot"] and doc["cursor"] == hub.last_id("room")
    hub.publish("room", "next")
    status, _, body = http_get(page_app.url + "/snapshot?last_event_id=" + doc["cursor"], timeout=20)
    assert [e["data"] for e in json.loads(body)["events"]] == [{"players": 2}, "next"]


def test_streamclient_without_a_cursor_loses_nothing_after_its_handshake(page_app, hub):
    """What comet.js does too: the handshake's cursor becomes the next poll's."""
    with StreamClient(page_app.url + "/longpoll", transport="longpoll") as client:
        settle(lambda: hub.subscriptions == 1, what="the second poll waiting")
        ids = [hub.publish("room", n) for n in range(3)]
        assert [e.id for e in client.wait_for(3)] == ids
