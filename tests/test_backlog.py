"""A front that holds a storm (#29, point 4): comet gives a cheroot server a
listen backlog sized for streams, on CherryPy and on ``comet.wsgi``, and
1,000 clients opening a stream at the same moment all stream within 5 s.

The backlog is read where the kernel keeps it: ``ss -ltn`` shows a listening
socket's backlog as its Send-Q.
"""
from __future__ import annotations

import logging
import shutil
import subprocess

import cherrypy
import pytest

from comet import Hub, comet
from comet.internals import size_backlog
from comet.testing import http_get
from comet.wsgi import BACKLOG, comet_app, install_gateway

from storm import storm

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")

STORM = 1000


def backlog_of(port: int) -> int:
    """The listen backlog of the socket listening on 127.0.0.1:*port*."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert len(rows) == 1, out
    return int(rows[0][2])  # State Recv-Q Send-Q ...: Send-Q is the backlog


def somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


class Room:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @cherrypy.expose
    def index(self) -> str:
        return "page"

    @cherrypy.expose
    @comet(transport="sse")
    def events(self, last_event_id=None):
        yield from self.hub.subscribe("room", last_id=last_event_id)


def test_cherrypy_left_at_its_default_listens_with_comets_backlog(comet_cherrypy):
    server = comet_cherrypy(Room(Hub()))
    assert cherrypy.server.socket_queue_size == 5  # CherryPy's default, as a new app has it
    assert backlog_of(port_of(server.url)) == min(BACKLOG, somaxconn())


def test_an_explicit_small_backlog_is_kept_with_a_warning_naming_the_setting(comet_cherrypy, caplog, monkeypatch):
    import comet.internals.connection as connection

    monkeypatch.setattr(connection, "_warned_backlog", set())  # once per process: this test needs its own
    with caplog.at_level(logging.WARNING, logger="comet"):
        server = comet_cherrypy(Room(Hub()), global_config={"server.socket_queue_size": 64})
    assert backlog_of(port_of(server.url)) == 64
    said = [r.getMessage() for r in caplog.records if "backlog" in r.getMessage()]
    assert said and "server.socket_queue_size" in said[0] and "64" in said[0], said


def test_wsgi_on_cheroot_gets_the_backlog_before_and_after_it_listens():
    from cheroot import wsgi

    hub = Hub()
    app = comet_app(lambda environ: hub.subscribe("room"), transport="sse")
    before = wsgi.Server(("127.0.0.1", 0), app)
    install_gateway(before)  # as documented: before serving
    before.prepare()
    after = wsgi.Server(("127.0.0.1", 0), app)
    after.prepare()  # already listening with cheroot's 5 ...
    try:
        assert backlog_of(after.bind_addr[1]) == 5
        install_gateway(after)  # ... listens again, with comet's
        for server in (before, after):
            assert server.request_queue_size == BACKLOG
            assert backlog_of(server.bind_addr[1]) == min(BACKLOG, somaxconn())
        explicit = wsgi.Server(("127.0.0.1", 0), app, request_queue_size=300)
        assert size_backlog(explicit) == 300 and explicit.request_queue_size == 300  # a choice is kept
    finally:
        for server in (before, after):
            server.stop()
        hub.close()


def test_a_thousand_clients_opening_at_once_all_stream_within_5_s(comet_cherrypy):
    """The storm a deploy or a network blip makes: every page's stream at
    once. With CherryPy's backlog of 5 the accept queue overflows and the
    late ones wait on SYN retries (1 s, 3 s, 7 s ...)."""
    hub = Hub()
    server = comet_cherrypy(Room(hub), thread_pool=10)
    result = storm(server.url + "/events", STORM, deadline=5.0)
    try:
        assert result.all_open, result.summary()
        assert all(first.startswith(b":ok") or b"comet.heartbeat" in first for first in result.first_bytes)
        assert http_get(server.url + "/", timeout=5)[2] == b"page"  # pages still answer beside 1,000 streams
    finally:
        result.close()
        hub.close()
