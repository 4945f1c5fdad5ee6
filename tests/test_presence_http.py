"""Presence over HTTP: a stream opened with a member counts, on every
transport and fast routes; ``hub.disconnect(member=...)`` ends a parked
stream, a generator handler's (parked or in thread mode) and a fast route's,
each response finished cleanly and the handler's ``finally`` run; with Redis
the disconnect comes from another process."""
from __future__ import annotations

import threading
import time

import cherrypy
import pytest

from comet import comet
from comet.fastpath import FastRoutes
from comet.testing import http_get, wait_until
from conftest import Tracker
from test_redis import hubs, prefix  # noqa: F401  (the Redis hub fixtures)

TRANSPORTS = ["sse", "multipart", "chunked", "longpoll"]


def make_root(hub, tracker: Tracker):
    def parked(transport):
        @cherrypy.expose
        @comet(transport=transport, heartbeat=0.5, poll_timeout=30)
        def handler(self, me=None, last_event_id=None):
            sub = hub.subscribe("room", last_id=last_event_id, member=me)
            tracker.started += 1

            @sub.on_close
            def closed():
                tracker.finished += 1

            return sub  # parked on the writer
        return handler

    def generator(mode):
        @cherrypy.expose
        @comet(transport="chunked", heartbeat=0.5, mode=mode)
        def handler(self, me=None, last_event_id=None):
            yield from tracker.track(hub.subscribe("room", last_id=last_event_id, member=me))
            yield "bye\n"
        return handler

    class Root:
        sse, multipart, chunked, longpoll = (parked(t) for t in TRANSPORTS)
        generator_auto, generator_thread = generator("auto"), generator("thread")

    return Root()


class Request(threading.Thread):
    """A GET in a thread of its own: its whole response, once it ends."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.result: tuple | None = None
        self.start()

    def run(self) -> None:
        self.result = http_get(self.url, timeout=20)

    def done(self, timeout: float = 5.0) -> tuple:
        self.join(timeout)
        assert self.result is not None, f"{self.url} did not finish"
        return self.result


def follow_then_disconnect(hub, url: str, tracker: Tracker, ended_by=None):
    """Open *url* as ann (already a member, so no join event is pending and
    the long-poll waits), disconnect ann, and return the finished response."""
    already = hub.subscribe("room", member="ann")
    wait_until(lambda: hub.members("room") == {"ann": 1}, what="ann")
    cursor = hub.last_id("room")
    request = Request(f"{url}?me=ann&last_event_id={cursor}")
    wait_until(lambda: hub.members("room") == {"ann": 2}, what="the stream counted as ann's")
    started = time.monotonic()
    (ended_by or hub).disconnect(member="ann")
    status, headers, body = request.done()
    assert time.monotonic() - started < 3  # within a second or so, not at a heartbeat or poll timeout
    assert already.ended
    already.close()
    wait_until(lambda: tracker.open == 0 and hub.subscriptions == 0, what="the handler's cleanup")
    wait_until(lambda: hub.members("room") == {}, what="ann to leave after the grace period")
    return status, headers, body


@pytest.mark.parametrize("path", TRANSPORTS + ["generator_auto", "generator_thread"])
def test_disconnect_ends_every_kind_of_stream_cleanly(comet_cherrypy, path):
    from comet import Hub

    hub = Hub(idle=0.2, presence_grace=0.2)
    tracker = Tracker()
    server = comet_cherrypy(make_root(hub, tracker))
    try:
        status, headers, body = follow_then_disconnect(hub, f"{server.url}/{path}", tracker)
        assert status == 200
        if path == "longpoll":
            assert b'"events":[]' in body  # answered, with its cursor
        elif path.startswith("generator"):
            assert body.endswith(b"bye\n")  # the handler went on after its subscription ended
        assert tracker.started == tracker.finished >= 1
    finally:
        hub.close()


def test_disconnect_from_another_process_ends_a_stream_here(comet_cherrypy, hubs):
    here, there = hubs(idle=0.2, presence_grace=0.2), hubs(idle=0.2, presence_grace=0.2)
    tracker = Tracker()
    server = comet_cherrypy(make_root(here, tracker))
    status, _, body = follow_then_disconnect(here, f"{server.url}/generator_auto", tracker, ended_by=there)
    assert status == 200 and body.endswith(b"bye\n")


@pytest.mark.parametrize("redis", [False, True], ids=["memory", "redis"])
def test_a_fast_route_stream_counts_for_its_member_and_ends_on_disconnect(comet_wsgi, hubs, redis):
    from comet import Hub

    hub = hubs(idle=0.2, presence_grace=0.2) if redis else Hub(idle=0.2, presence_grace=0.2)
    routes = FastRoutes()
    routes.add("/rooms/{room}/events", hub, "room:{room}", heartbeat=0.5,
               authorize=lambda request: request.query.get("me") != "mallory",
               member=lambda request: request.query.get("me") or None)
    server = comet_wsgi(lambda environ, start_response: [], numthreads=2, routes=routes)
    try:
        anonymous = Request(server.url + "/rooms/a/events")
        wait_until(lambda: routes.pool.parked_streams == 1, what="the witness to follow the room")
        ann = Request(server.url + "/rooms/a/events?me=ann")
        wait_until(lambda: hub.members("room:a") == {"ann": 1} and routes.pool.parked_streams == 2,
                   what="ann counted, the anonymous stream not")
        assert http_get(server.url + "/rooms/a/events?me=mallory")[0] == 403
        assert hub.disconnect(member="ann") == 1
        status, _, body = ann.done()
        assert status == 200  # ended by the disconnect (its own join may not have reached it:
        # members() counts ann a moment before the join is published)
        assert anonymous.is_alive()  # not ann's: still open
        wait_until(lambda: hub.members("room:a") == {}, what="ann to leave")
        routes.pool.close_all()
        status, _, body = anonymous.done()
        assert status == 200 and b"event: comet.join\ndata: ann\n" in body  # the witness saw ann join
        wait_until(lambda: hub.subscriptions == 0, what="every subscription released")
    finally:
        if not redis:
            hub.close()


def test_a_leave_after_the_grace_period_reaches_a_parked_stream_at_once(comet_cherrypy):
    """The presence thread publishes a leave when a grace period ends: the
    parked streams following the channel must be woken for it, not find it
    at their next heartbeat (30 s here)."""
    from comet import Hub
    from conftest import read_until

    hub = Hub(presence_grace=0.2)

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def watch(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)

    try:
        server = comet_cherrypy(Root())
        import socket as socket_module
        from urllib.parse import urlsplit

        parts = urlsplit(server.url)
        with socket_module.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(f"GET /watch HTTP/1.1\r\nHost: {parts.hostname}\r\n\r\n".encode())
            read_until(sock, b"comet.heartbeat", timeout=10)
            ann = hub.subscribe("room", member="ann")
            read_until(sock, b"comet.join", timeout=10)
            ann.close()
            left = time.monotonic()
            read_until(sock, b"comet.leave", timeout=10)
            assert time.monotonic() - left < 8.0, "the leave waited for something else than its grace period"
    finally:
        hub.close()


def test_no_presence_thread_without_callbacks_on_redis(hubs):
    """On Redis the backend's worker decides joins and leaves; the presence
    thread only runs on_join/on_leave callbacks, so a hub without any starts
    none, however many members come and go."""
    def presence_threads():
        return len([t for t in threading.enumerate() if t.name == "comet-presence"])

    before = presence_threads()
    hub = hubs(presence_grace=0.1)
    ann = hub.subscribe("room", member="ann")
    wait_until(lambda: hub.members("room") == {"ann": 1}, timeout=10, what="ann counted")
    ann.close()
    wait_until(lambda: hub.members("room") == {}, timeout=10, what="ann gone")
    assert presence_threads() == before
