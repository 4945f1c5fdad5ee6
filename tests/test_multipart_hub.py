"""Hubs carry binary parts: ``hub.publish(channel, Part(jpeg, "image/jpeg"))``
on the in-process Hub and on RedisHub (a real redis-server), with resume and
gaps as for any event; one channel followed as multipart (the part itself,
exact bytes) and as SSE / NDJSON (base64 JSON) at once, over live servers."""
from __future__ import annotations

import base64
import itertools
import json
import re

import cherrypy
import pytest

from comet import GAP, Event, Hub, InvalidEvent, Part, comet
from comet.testing import StreamClient, wait_until

from conftest import RawStream

_names = itertools.count()

# Binary that text would mangle: NUL, CR/LF, "--", invalid UTF-8.
FRAMES = [Part(b"\xff\xd8\x00\r\n--\xfe%d\xff\xd9" % n, "image/jpeg") for n in range(3)]


@pytest.fixture(params=["memory", "redis"])
def hub(request):
    if request.param == "memory":
        made = Hub(buffer_size=3, idle=0.2)
    else:
        from comet.backends.redis import RedisHub

        redis_server = request.getfixturevalue("comet_redis")
        made = RedisHub(redis_server.url, prefix=f"mp{next(_names)}:", maxlen=3, approximate=False, idle=0.2)
    yield made
    made.close()


def drain(sub, n, timeout=5.0):
    got = []
    wait_until(lambda: got.extend(e for e in sub.take() if e) or len(got) >= n, timeout, what=f"{n} events")
    return got


def test_parts_resume_like_any_event(hub):
    ids = [hub.publish("cam", frame) for frame in FRAMES]
    sub = hub.subscribe("cam", last_id=ids[0])
    try:
        got = drain(sub, 2)
        assert [e.data for e in got] == FRAMES[1:]  # same bytes, type and headers
        assert [e.id for e in got] == ids[1:]
    finally:
        sub.close()
    # a view of the same channel mixes text and parts in one order
    ids.append(hub.publish("cam", "caption"))
    ids += hub.publish_many("cam", [Part(b"\x89PNG\r\n", "image/png", (("X-Frame", "4"),)), Event(FRAMES[0], name="key")])
    sub = hub.subscribe("cam", last_id=ids[3])
    try:
        got = drain(sub, 2)
        assert [e.data for e in got] == [Part(b"\x89PNG\r\n", "image/png", (("X-Frame", "4"),)), FRAMES[0]]
        assert got[1].name == "key"
    finally:
        sub.close()


def test_an_evicted_cursor_gets_a_gap_then_the_parts(hub):
    ids = [hub.publish("cam", frame) for frame in FRAMES * 2]  # the buffer keeps 3
    sub = hub.subscribe("cam", last_id=ids[0])
    try:
        got = drain(sub, 4)
        assert got[0].name == GAP
        assert [e.data for e in got[1:]] == FRAMES
    finally:
        sub.close()


def test_oversize_and_empty_parts_are_refused_before_publish():
    hub = Hub(max_event_bytes=10)
    with pytest.raises(InvalidEvent, match="exceeds"):
        hub.publish("cam", Part(b"x" * 11, "image/jpeg"))
    hub.publish("cam", Part(b"x" * 10, "image/jpeg"))  # the body's size counts, not its base64
    with pytest.raises(InvalidEvent, match="empty"):
        hub.publish("cam", Part(b"", "image/jpeg"))
    hub.close()


@pytest.fixture
def cam_server(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="multipart", heartbeat=0.5)
        def cam(self, last_event_id=None):
            return hub.subscribe("cam", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def events(self, last_event_id=None):
            return hub.subscribe("cam", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="chunked", heartbeat=0.5)
        def ndjson(self, last_event_id=None):
            return hub.subscribe("cam", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="multipart", heartbeat=0.5, mode="thread")
        def cam_thread(self):  # the same on a thread of its own (comet/stream.py)
            yield from hub.subscribe("cam")

    return comet_cherrypy(Root())


def test_one_channel_as_multipart_and_as_sse(cam_server, hub):
    with StreamClient(cam_server.url + "/cam", transport="multipart") as mp, \
            StreamClient(cam_server.url + "/events") as sse, \
            StreamClient(cam_server.url + "/ndjson", transport="chunked") as nd:
        wait_until(lambda: hub.subscriptions >= 3, what="three viewers")
        ids = [hub.publish("cam", frame) for frame in FRAMES]
        assert mp.wait_for(3)[:3] == FRAMES
        for client in (sse, nd):
            got = client.wait_for(3)
            data = [e.data if client is sse else e["data"] for e in got]
            data = [json.loads(d) if isinstance(d, str) else d for d in data]
            assert [(d["content_type"], base64.b64decode(d["base64"])) for d in data] == [
                ("image/jpeg", f.body) for f in FRAMES]
            assert [e.id if client is sse else e["id"] for e in got] == ids
        last = sse.events[-1].id
    # SSE resumes after the last id it saw, like any event
    hub.publish("cam", FRAMES[0])
    with StreamClient(cam_server.url + "/events", last_event_id=last) as again:
        [event] = again.wait_for(1)
        assert base64.b64decode(json.loads(event.data)["base64"]) == FRAMES[0].body


@pytest.mark.parametrize("path", ["/cam", "/cam_thread"])
def test_multipart_viewer_bytes_and_image_heartbeat(cam_server, hub, path):
    """The bytes an <img> gets from a hub channel, parked or on a thread:
    the preamble, each frame followed by the next one's headers, and, while
    nothing is published, the last frame again (tests/test_framing.py has why)."""
    with RawStream(cam_server.url + path) as raw:
        boundary = re.fullmatch(r"multipart/x-mixed-replace; boundary=(\S+)", raw.headers["content-type"])[1]
        head, delimiter = b"Content-Type: image/jpeg\r\n\r\n", f"\r\n--{boundary}\r\n".encode()
        assert raw.chunk() == f"--{boundary}\r\n".encode()
        assert raw.chunk() == b"Comet-Heartbeat: 1\r\n"  # no frame yet, heartbeat=0.5
        hub.publish("cam", FRAMES[0])
        assert raw.chunk() == head + FRAMES[0].body + delimiter + head
        hub.publish("cam", FRAMES[1])
        assert raw.chunk() == FRAMES[1].body + delimiter + head
        assert raw.chunk() == FRAMES[1].body + delimiter + head  # the heartbeat
