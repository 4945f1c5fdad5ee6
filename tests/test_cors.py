"""CORS on every adapter, over raw sockets: a decorated handler,
``tools.comet`` config, a WSGI app and a fast route answer an allowed
``Origin`` with ``Access-Control-Allow-Origin`` (and credentials when
asked), say nothing to other origins, answer a preflight ``OPTIONS``, and
put the headers on refusals too, so a cross-origin page can read why.
(Chromium across two origins: tests/browser/test_cors_browser.py.)"""
from __future__ import annotations

import socket

import cherrypy
import pytest

from comet import Options, comet
from comet.cherrypy_tool import engine_plugin
from comet.testing import http_get
from comet.wsgi import comet_app

from conftest import RawStream, read_until, no_cursor

PAGE = "http://www.example.com"
OTHER = "http://evil.example"


def preflight(url: str, origin: str, asked: str = "last-event-id") -> tuple[int, dict[str, str], bytes]:
    return http_get(url, method="OPTIONS", headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                                    "Access-Control-Request-Headers": asked})


@pytest.fixture
def cherrypy_server(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", cors_origins=[PAGE], cors_credentials=True)
        def events(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)

        @cherrypy.expose
        def configured(self, last_event_id=None):
            yield from hub.subscribe("room", last_id=last_event_id)

    config = {"/configured": {"tools.comet.on": True, "tools.comet.transport": "chunked",
                              "tools.comet.cors_origins": [PAGE, "http://other.example:8080"]}}
    return comet_cherrypy(Root(), config)


def test_decorated_handler_allows_its_origin_with_credentials(cherrypy_server, hub):
    with RawStream(cherrypy_server.url + "/events", headers={"Origin": PAGE}) as raw:
        assert raw.status == 200
        assert raw.headers["access-control-allow-origin"] == PAGE
        assert raw.headers["access-control-allow-credentials"] == "true"
        assert raw.headers["vary"] == "Origin"
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 15\n\n"  # and it streams


def test_other_origins_get_no_cors_headers(cherrypy_server):
    with RawStream(cherrypy_server.url + "/events", headers={"Origin": OTHER}) as raw:
        assert raw.status == 200
        assert not any(name.startswith("access-control-") for name in raw.headers)


def test_preflight_is_answered(cherrypy_server):
    status, headers, body = preflight(cherrypy_server.url + "/events", PAGE, "Last-Event-ID, Cache-Control")
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == PAGE
    assert headers["access-control-allow-methods"] == "GET, HEAD"
    assert headers["access-control-allow-headers"] == "Last-Event-ID, Cache-Control"
    assert headers["access-control-allow-credentials"] == "true"
    status, headers, _ = preflight(cherrypy_server.url + "/events", OTHER)
    assert status == 204 and "access-control-allow-origin" not in headers


def test_refusals_carry_cors_headers(cherrypy_server):
    status, headers, body = http_get(cherrypy_server.url + "/events?nope=1", headers={"Origin": PAGE})
    assert status == 400 and b"nope" in body
    assert headers["access-control-allow-origin"] == PAGE
    status, headers, _ = http_get(cherrypy_server.url + "/events", headers={"Origin": PAGE, "Last-Event-ID": "x" * 300})
    assert status == 400 and headers["access-control-allow-origin"] == PAGE


def test_tools_comet_config_takes_a_list_of_origins(cherrypy_server):
    with RawStream(cherrypy_server.url + "/configured", headers={"Origin": "http://other.example:8080"}) as raw:
        assert raw.status == 200 and raw.headers["access-control-allow-origin"] == "http://other.example:8080"
        assert "access-control-allow-credentials" not in raw.headers


def test_wsgi_app_any_origin(comet_wsgi, hub):
    app = comet_app(lambda environ: hub.subscribe("room"), transport="multipart", cors_origins="*")
    server = comet_wsgi(app)
    with RawStream(server.url + "/", headers={"Origin": OTHER}) as raw:
        assert raw.status == 200 and raw.headers["access-control-allow-origin"] == "*"
        assert "vary" not in raw.headers and "access-control-allow-credentials" not in raw.headers
    status, headers, _ = preflight(server.url + "/", OTHER)
    assert status == 204 and headers["access-control-allow-origin"] == "*"
    status, headers, _ = http_get(server.url + "/", method="POST", headers={"Origin": OTHER})
    assert status == 405 and headers["access-control-allow-origin"] == "*"


def test_fast_route_at_accept_time_and_its_preflight(comet_cherrypy, hub):
    engine_plugin().route("/fast/{room}", hub, channel="room:{room}", cors_origins=[PAGE], cors_credentials=True)
    class Root:
        pass

    server = comet_cherrypy(Root())
    before = engine_plugin().pool.counters["routed_fast"]
    host, port = server.url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /fast/a HTTP/1.1\r\nHost: x\r\nOrigin: {PAGE}\r\n\r\n".encode())
        head = read_until(sock, b"\r\n\r\n").decode("latin-1")
    assert head.startswith("HTTP/1.1 200 OK")
    assert f"Access-Control-Allow-Origin: {PAGE}\r\n" in head and "Access-Control-Allow-Credentials: true\r\n" in head
    assert engine_plugin().pool.counters["routed_fast"] == before + 1  # answered where cheroot accepted it
    status, headers, _ = preflight(server.url + "/fast/a", PAGE)
    assert status == 204 and headers["access-control-allow-origin"] == PAGE


@pytest.mark.parametrize("options, message", [
    ({"cors_origins": "*", "cors_credentials": True}, "browsers refuse '\\*' with credentials"),
    ({"cors_credentials": True}, "browsers refuse '\\*' with credentials"),
    ({"cors_origins": ["https://www.example.com/"]}, "no path"),
    ({"cors_origins": [42]}, "cors_origins must be"),
    ({"cors_origins": [PAGE], "cors_credentials": "yes"}, "cors_credentials must be True or False"),
])
def test_bad_cors_options_fail_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        Options(**options)
    with pytest.raises(ValueError, match=message):
        comet(**options)


@pytest.mark.parametrize("origin", [PAGE + ".evil.net", PAGE + ":8080", PAGE[:-1], PAGE + "/", "https://www.example.com",
                                    "null"])
def test_origins_are_matched_exactly_not_by_prefix(cherrypy_server, origin):
    """https://www.example.com.evil.net is another site: it gets no CORS
    headers (credentials least of all) on a stream, a preflight or a refusal.
    (Break: origins matched by prefix.)"""
    with RawStream(cherrypy_server.url + "/events", headers={"Origin": origin}) as raw:
        assert raw.status == 200
        assert not any(name.startswith("access-control-") for name in raw.headers), raw.headers
    status, headers, _ = preflight(cherrypy_server.url + "/events", origin)
    assert status == 204 and not any(name.startswith("access-control-allow") for name in headers), headers
    status, headers, _ = http_get(cherrypy_server.url + "/events?nope=1", headers={"Origin": origin})
    assert status == 400 and not any(name.startswith("access-control-") for name in headers), headers


def test_fast_route_refusals_at_accept_time_carry_cors_headers(comet_cherrypy, hub):
    """A cross-origin page can read why a fast route refused it (403, 400,
    503), answered where cheroot accepted the connection.
    (Break: no CORS headers on a refusal at accept time.)"""
    plugin = engine_plugin()
    plugin.route("/fast/{room}", hub, channel="room:{room}", cors_origins=[PAGE], cors_credentials=True,
                 authorize=lambda request: request.params["room"] != "closed")

    class Root:
        pass

    server = comet_cherrypy(Root(), global_config={"comet.max_parked": 1, "comet.retry_after": 3})
    host, port = server.url.rsplit("//", 1)[1].split(":")

    def refused(path: str, extra: str = "") -> str:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nOrigin: {PAGE}\r\n{extra}\r\n".encode())
            return read_until(sock, None).decode("latin-1")

    counters = plugin.pool.counters
    forbidden, through_wsgi = counters["forbidden"], counters["routed_wsgi"]
    for status, path, extra in ((403, "/fast/closed", ""), (400, "/fast/a", "Last-Event-ID: not-an-id\r\n")):
        answer = refused(path, extra)
        assert answer.startswith(f"HTTP/1.1 {status} "), answer
        assert f"Access-Control-Allow-Origin: {PAGE}\r\n" in answer and "Access-Control-Allow-Credentials: true\r\n" in answer
    assert counters["forbidden"] == forbidden + 1  # (the 403 was the fast route's own)
    assert counters["routed_wsgi"] == through_wsgi  # (none went on to cheroot and the route's WSGI app)
    with RawStream(server.url + "/fast/a") as held:  # the one stream max_parked allows
        assert held.status == 200
        answer = refused("/fast/b")
    assert answer.startswith("HTTP/1.1 503 ") and "Retry-After: 3\r\n" in answer, answer
    assert f"Access-Control-Allow-Origin: {PAGE}\r\n" in answer and "Access-Control-Expose-Headers: Retry-After" in answer
    assert counters["routed_wsgi"] == through_wsgi


def test_without_cors_options_a_stream_says_nothing_about_origins(comet_cherrypy, hub):
    """No ``cors_origins``: the response is the same whatever the Origin, so
    it carries no CORS header and no ``Vary: Origin`` (caches may share it)."""
    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)

    server = comet_cherrypy(Root())
    stream = RawStream(server.url + "/events", headers={"Origin": OTHER})
    try:
        assert stream.status == 200
        assert not [k for k in stream.headers if k.startswith("access-control-")], stream.headers
        assert "origin" not in stream.headers.get("vary", "").lower(), stream.headers
    finally:
        stream.close()
    assert Options().cors_headers(PAGE) == []
