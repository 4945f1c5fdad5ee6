"""A thread-mode stream's socket options end with the stream (comet.liveness).

``watch_peer`` gives a stream's socket a short ``TCP_USER_TIMEOUT`` and
keepalive. A parked stream's connection closes with it; a thread-mode one's
may stay open (HTTP keep-alive: a long-poll answer, or a stream its handler
ended) and serve ordinary requests next, which must find the socket as it
was: a page or a download to a slow client is not cut after a few seconds
of unacknowledged data.

The app reads the options of its own request's socket
(``comet.internals.connection_for(...).tcp_socket``); one client connection
asks for them, runs a thread-mode stream, and asks again.
"""
from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import urlsplit

import cherrypy
import pytest

from comet import Event, comet
from comet.internals import connection_for
from comet.liveness import watch_peer
from comet.wsgi import comet_app

_TCP = socket.IPPROTO_TCP
OPTIONS = {name: (level, getattr(socket, name)) for level, name in [
    (_TCP, "TCP_USER_TIMEOUT"), (socket.SOL_SOCKET, "SO_KEEPALIVE"),
    (_TCP, "TCP_KEEPIDLE"), (_TCP, "TCP_KEEPINTVL"), (_TCP, "TCP_KEEPCNT")] if hasattr(socket, name)}

pytestmark = pytest.mark.skipif("TCP_USER_TIMEOUT" not in OPTIONS, reason="no TCP_USER_TIMEOUT on this platform")


def options_of(sock: socket.socket) -> dict[str, int]:
    return {name: sock.getsockopt(level, opt) for name, (level, opt) in OPTIONS.items()}


def own_options(environ: dict) -> dict:
    """The options of the socket this request came on, and its peer's port
    (the test checks it is still the same connection)."""
    sock = connection_for(environ).tcp_socket
    assert sock is not None
    return {**options_of(sock), "peer_port": sock.getpeername()[1]}


class Root:
    @cherrypy.expose
    @cherrypy.tools.json_out()
    def options(self):
        return own_options(cherrypy.request.wsgi_environ)

    @cherrypy.expose
    @comet(transport="longpoll", mode="thread", heartbeat=1)
    def poll(self):
        yield Event(own_options(cherrypy.request.wsgi_environ))  # (the stream's own, while it runs)

    @cherrypy.expose
    @comet(transport="sse", mode="thread", heartbeat=1)
    def refused(self):
        raise cherrypy.HTTPError(403, "not yours")  # in its first step: the stream's options are set by then
        yield

    @cherrypy.expose
    @comet(transport="sse", mode="thread", heartbeat=1)
    def once(self):
        yield Event(own_options(cherrypy.request.wsgi_environ))  # then the handler ends the stream


def ask(conn: http.client.HTTPConnection, path: str, status: int = 200) -> tuple[dict[str, str], bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    assert response.status == status, body
    assert not response.will_close, "the connection was to stay open (keep-alive)"
    return {k.lower(): v for k, v in response.getheaders()}, body


def during(path: str, body: bytes) -> dict:
    if path.startswith("/poll"):
        return json.loads(body)["events"][0]["data"]
    lines = [line for line in body.decode().splitlines() if line.startswith("data:")]
    return json.loads(lines[-1][5:])  # (after the announcement's)


@pytest.mark.parametrize("path", ["/poll", "/once"])
def test_a_connection_kept_alive_after_a_thread_mode_stream_has_its_options_back(comet_cherrypy, path):
    server = comet_cherrypy(Root())
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        before = json.loads(ask(conn, "/options")[1])
        port = conn.sock.getsockname()[1]
        assert before["peer_port"] == port and before["TCP_USER_TIMEOUT"] == 0
        stream = during(path, ask(conn, path)[1])
        # The stream's socket was watched (2 heartbeats + 4 s)...
        assert stream["peer_port"] == port and stream["TCP_USER_TIMEOUT"] == 6000 and stream["SO_KEEPALIVE"] == 1
        # ... and the next request on the same connection finds it as it was.
        after = json.loads(ask(conn, "/options")[1])
        assert after == before
    finally:
        conn.close()


def test_a_thread_mode_stream_refused_in_its_first_step_gives_them_back(comet_cherrypy):
    server = comet_cherrypy(Root())
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        before = json.loads(ask(conn, "/options")[1])
        assert ask(conn, "/refused", 403)[1] == b"not yours\n"
        assert json.loads(ask(conn, "/options")[1]) == before
    finally:
        conn.close()


def test_the_wsgi_adapter_gives_the_options_back_too(comet_wsgi):
    def handler(environ):
        yield Event(own_options(environ))

    poll = comet_app(handler, transport="longpoll", mode="thread", heartbeat=1)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/options":
            body = json.dumps(own_options(environ)).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return poll(environ, start_response)

    server = comet_wsgi(app)
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        before = json.loads(ask(conn, "/options")[1])
        stream = during("/poll", ask(conn, "/poll")[1])
        assert stream["TCP_USER_TIMEOUT"] == 6000 and stream["peer_port"] == before["peer_port"]
        assert json.loads(ask(conn, "/options")[1]) == before
    finally:
        conn.close()


def test_watch_peer_restores_what_was_there():
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(_TCP, socket.TCP_USER_TIMEOUT, 123_000)  # an app's own choice
        mine = options_of(sock)
        restore = watch_peer(sock, heartbeat=1)
        assert options_of(sock)["TCP_USER_TIMEOUT"] == 6000
        restore()
        assert options_of(sock) == mine
        restore()  # (twice: nothing more)
        assert options_of(sock) == mine
    watch_peer(None, 1)()  # nothing to watch, nothing to restore
    with socket.socket(socket.AF_UNIX) as unix:
        watch_peer(unix, 1)()
