"""Fast routes: hub streams answered and parked where cheroot accepts the
connection. The same guarantees as ``@comet`` parked streams (framing,
heartbeats, resume, gaps, admission, disconnect, shutdown), the same bytes
whichever way (accept time or the WSGI middleware) a request is served."""
import logging
import hashlib
import hmac
import http.client
import re
import socket
import ssl
import threading
import time

import cherrypy
import pytest

from comet import Forbidden, Hub, comet
from comet.hub import MAX_CURSOR
from comet.backends.redis import RedisHub
from comet.cherrypy_tool import engine_plugin
from comet.fastpath import FastRoutes, StreamRequest
from comet.testing import CherryPyServer, HTTPStatusError, StreamClient, http_get, wait_until

from conftest import RawStream, open_fds, read_more, no_cursor


class Root:
    @cherrypy.expose
    def index(self):
        return "plain page"

    @cherrypy.expose
    def missing_page_neighbour(self):
        return "neighbour"


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw_request(port: int, request: bytes, until: bytes | None = b"\r\n\r\n", timeout: float = 10.0) -> bytes:
    """Send *request* on a fresh socket; read until *until* appears, or EOF
    (``until=None``: the server must close after its answer)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while until is None or until not in data:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout}s: {data[-300:]!r}")
            more = sock.recv(65536)
            if not more:
                break
            data += more
        return data


@pytest.fixture
def fast(comet_cherrypy, hub):
    plugin = engine_plugin()
    plugin.route("/events", hub, "lobby", heartbeat=0.5)
    plugin.route("/rooms/{room}/events", hub, "room:{room}", heartbeat=0.5)
    plugin.route("/multipart", hub, "lobby", transport="multipart", boundary="frame", heartbeat=0.5)
    plugin.route("/ndjson", hub, "lobby", transport="chunked", heartbeat=0.5, retry=None)
    # Two server threads: every stream beyond that is proof nothing holds one.
    server = comet_cherrypy(Root(), thread_pool=2)
    return server, hub, plugin.pool


_BASE: dict = {}


@pytest.fixture(autouse=True)
def routed_baseline():
    # The engine's pool (and its counters) outlive each test: count from here.
    _BASE.clear()
    _BASE.update(engine_plugin().pool.counters.snapshot())


def counts(pool):
    """Streams opened (at accept time, through the middleware) during this test."""
    base = _BASE if pool is engine_plugin().pool else {}
    return (pool.counters["routed_fast"] - base.get("routed_fast", 0),
            pool.counters["routed_wsgi"] - base.get("routed_wsgi", 0))


def test_sse_bytes_at_accept(fast):
    server, hub, pool = fast
    with RawStream(server.url + "/events") as raw:
        assert raw.status == 200
        assert raw.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert raw.headers["transfer-encoding"] == "chunked" and raw.headers["x-accel-buffering"] == "no"
        assert raw.headers["cache-control"] == "no-cache" and "date" in raw.headers
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
        assert counts(pool) == (1, 0) and pool.parked_streams == 1
        event_id = hub.publish("lobby", "two\nlines", event="join")
        assert raw.chunk() == f"id: {event_id}\nevent: join\ndata: two\ndata: lines\n\n".encode()
        assert raw.chunk() == b"event: comet.heartbeat\ndata: 0.5\n\n"  # heartbeat from the writer thread


def test_the_middleware_serves_the_same_bytes(fast):
    """A request cheroot gets (here: a %-escaped path, which the accept-time
    parser leaves alone) is served by the WSGI middleware: same stream."""
    server, hub, pool = fast
    with RawStream(server.url + "/events") as a, RawStream(server.url + "/%65vents") as b:
        assert counts(pool) == (1, 1)
        for key in ("content-type", "transfer-encoding", "x-accel-buffering", "cache-control", "server"):
            assert a.headers[key] == b.headers[key], key
        assert a.headers["server"] != "127.0.0.1"  # (cheroot's server_name: the bind address, which names nothing)
        assert no_cursor(a.chunk()) == no_cursor(b.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
        wait_until(lambda: pool.parked_streams == 2, what="both parked")
        hub.publish("lobby", {"n": 1})
        assert a.chunk() == b.chunk()


def test_heads_in_pieces_hold_no_worker(fast):
    """Requests whose heads have not fully arrived wait in cheroot's selector
    (like idle keep-alive connections), not on worker threads: with two
    workers and five half-sent heads, pages still load, then all five
    streams open at accept time once their heads complete."""
    server, hub, pool = fast
    socks = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n")
        status, _, body = http_get(server.url + "/", timeout=5)
        assert (status, body) == (200, b"plain page")
        for sock in socks:
            sock.sendall(b"\r\n")
        for sock in socks:
            data = b""
            data = read_more(sock.recv, data, b":ok\n\n")
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        wait_until(lambda: pool.parked_streams == 5, what="parked")
        assert counts(pool) == (5, 0)
    finally:
        for sock in socks:
            sock.close()


def test_a_head_arriving_in_pieces_holds_no_worker_then_streams(fast):
    """A head still arriving waits in comet's head waiter, not on a worker;
    once complete it is served at accept time like any other."""
    server, hub, pool = fast
    workers = cherrypy.server.httpserver.requests
    hook = cherrypy.server.httpserver._comet_accept
    wait_until(lambda: workers.idle == 2, what="both workers idle")  # thread_pool=2, nothing else running
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\n")
        port = sock.getsockname()[1]
        wait_until(lambda: hook._waiter is not None and any(
            c.remote_port == port for c, _ in list(hook._waiter._conns.values())), what="the head waiting without a worker")
        # (A worker may still be on its way back to idle from the accept; what
        # matters is that none is held by the head while it waits.)
        wait_until(lambda: workers.idle == 2 and not any(getattr(t.conn, "remote_port", None) == port
                                                         for t in workers._threads),
                   timeout=2, what="no worker held while the head waits")
        assert any(c.remote_port == port for c, _ in list(hook._waiter._conns.values()))  # still waiting
        sock.sendall(b"Host: x\r\n\r\n")
        data = b""
        data = read_more(sock.recv, data, b":ok\n\n")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and counts(pool) == (1, 0)
        wait_until(lambda: pool.parked_streams == 1, what="parked")
        hub.publish("lobby", "after")
        data = read_more(sock.recv, data, b"data: after\n")


def test_multipart_chunked_and_http10(fast):
    server, hub, pool = fast
    with RawStream(server.url + "/multipart") as mp, RawStream(server.url + "/ndjson") as nd:
        assert mp.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
        assert nd.headers["content-type"] == "application/x-ndjson; charset=utf-8"
        assert mp.chunk() == b"--frame\r\n" and nd.chunk() == b"\n"
        event_id = hub.publish("lobby", {"k": 1})
        body = f'{{"id":"{event_id}","event":null,"data":{{"k":1}}}}'.encode()
        head = b"Content-Type: application/json\r\n\r\n"
        assert mp.chunk() == head + body + b"\r\n--frame\r\n" + head
        assert nd.chunk() == body + b"\n"
    # HTTP/1.0: no chunked framing; the body runs until the connection closes.
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.0\r\n\r\n")
        data = b""
        data = read_more(sock.recv, data, b"data: 0.5\n\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
        assert no_cursor(body) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
        wait_until(lambda: pool.parked_streams == 1, what="parked")
        event_id = hub.publish("lobby", "plain")
        body = read_more(sock.recv, body, b"data: plain\n\n")
        assert no_cursor(body) == f":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\nid: {event_id}\ndata: plain\n\n".encode()


def test_path_parameters_pick_the_channel(fast):
    server, hub, pool = fast
    with StreamClient(server.url + "/rooms/a/events") as a, StreamClient(server.url + "/rooms/b.2/events") as b:
        wait_until(lambda: pool.parked_streams == 2, what="parked")
        hub.publish("room:a", "for a")
        hub.publish("room:b.2", "for b")
        hub.publish("lobby", "for nobody here")
        assert [e.data for e in a.wait_for(1)] == ["for a"]
        assert [e.data for e in b.wait_for(1)] == ["for b"]
        assert pool.census()["by_channel"] == {"room:a": 1, "room:b.2": 1}
    assert counts(pool) == (2, 0)
    # not a route: CherryPy answers as usual
    assert http_get(server.url + "/rooms/a/b/events")[0] == 404


def test_resume_from_header_or_query_and_gap(comet_cherrypy):
    hub = Hub(buffer_size=3, idle=0.2)
    engine_plugin().route("/events", hub, "lobby", heartbeat=0.5)
    server = comet_cherrypy(Root(), thread_pool=2)
    ids = [hub.publish("lobby", n) for n in range(5)]
    with StreamClient(server.url + "/events", last_event_id=ids[2]) as c:
        assert [e.data for e in c.wait_for(2)] == ["3", "4"]
    with StreamClient(f"{server.url}/events?last_event_id={ids[3]}") as c:
        assert [e.data for e in c.wait_for(1)] == ["4"]
    with StreamClient(server.url + "/events", last_event_id=ids[0]) as c:  # evicted: a gap, then what is held
        events = c.wait_for(4)
        assert events[0].name == "comet.gap" and [e.data for e in events[1:]] == ["2", "3", "4"]
    assert counts(engine_plugin().pool) == (3, 0)
    hub.close()


@pytest.mark.parametrize("header, reason", [
    ("not-an-id", b"malformed event id"),
    ("9999999999999-0", b"from the future"),
    ("x" * (MAX_CURSOR + 1), b"at most %d characters" % MAX_CURSOR),  # (a head over 8 KB is cheroot's)
])
def test_bad_cursor_is_a_400_with_a_reason(fast, header, reason):
    server, hub, pool = fast
    hub.publish("lobby", "x")
    before = pool.counters.snapshot()
    data = raw_request(port_of(server), f"GET /events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {header}\r\n\r\n".encode(),
                       until=None)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request") and b"text/plain" in head
    assert reason in body, body
    assert pool.open_streams == 0 and hub.subscriptions == 0
    assert pool.counters["closed"] - before["closed"] == pool.counters["opened"] - before["opened"]


def test_other_methods_and_malformed_requests(fast, caplog):
    server, hub, pool = fast
    port = port_of(server)
    for method in ("POST", "PUT"):
        data = raw_request(port, f"{method} /events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        assert data.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD, OPTIONS" in data, data
    # HEAD: the stream's headers and no body; OPTIONS: what is allowed; neither opens a stream
    data = raw_request(port, b"HEAD /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", until=None)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: text/event-stream" in head and body == b"", data
    data = raw_request(port, b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", until=None)
    assert data.startswith(b"HTTP/1.1 204") and b"Allow: GET, HEAD, OPTIONS" in data, data
    # a malformed header line: cheroot's own 400, no hang, nothing opened
    data = raw_request(port, b"GET /events HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data
    assert pool.open_streams == 0 and hub.subscriptions == 0
    assert http_get(server.url + "/")[2] == b"plain page"
    assert "Traceback" not in caplog.text  # not ours: left to cheroot quietly, nothing logged


def test_a_keep_alive_connection_can_become_a_stream(fast):
    server, hub, pool = fast
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"plain page"
        conn.request("GET", "/events")  # the same socket, back from cheroot's keep-alive selector
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        assert no_cursor(response.read1(4096)) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
        wait_until(lambda: pool.parked_streams == 1, what="parked")
        hub.publish("lobby", "kept")
        data = b""
        data = read_more(response.read1, data, b"data: kept")
        response.close()  # "Connection: close" handed the socket to the response
    finally:
        conn.close()
    wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="released")


def test_admission_cap_answers_503_with_retry_after(comet_cherrypy, hub):
    engine_plugin().route("/events", hub, "lobby", heartbeat=0.5)
    server = comet_cherrypy(Root(), thread_pool=2, global_config={"comet.max_parked": 3, "comet.retry_after": 7})
    pool = engine_plugin().pool
    clients = [StreamClient(server.url + "/events").open() for _ in range(3)]
    try:
        refused_before = pool.counters["refused"]
        with pytest.raises(HTTPStatusError) as refused:
            StreamClient(server.url + "/events").open()
        assert refused.value.status == 503 and b"parked" in refused.value.body
        assert pool.counters["refused"] - refused_before == 1
        status, headers, _ = http_get(server.url + "/")  # pages still load
        assert status == 200
        data = raw_request(port_of(server), b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", until=None)
        assert data.startswith(b"HTTP/1.1 503") and b"Retry-After: 7\r\n" in data
        assert hub.subscriptions == 3
    finally:
        for c in clients:
            c.close()
        engine_plugin().pool.max_parked = 20_000
        engine_plugin().pool.retry_after = 5


def test_disconnect_cycles_release_everything(fast):
    server, hub, pool = fast
    StreamClient(server.url + "/events").open().close()
    wait_until(lambda: pool.open_streams == 0, what="warm-up released")
    threads, fds = threading.active_count(), open_fds()
    for n in range(60):
        path, transport = [("/events", "sse"), ("/multipart", "multipart"), ("/ndjson", "chunked")][n % 3]
        c = StreamClient(server.url + path, transport=transport).open()
        if n % 2:
            wait_until(lambda: pool.parked_streams == 1, what="parked")
            hub.publish("lobby", n)
            c.wait_for(1)
        c.close()
        wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="released")
    assert counts(pool) == (61, 0)
    wait_until(lambda: threading.active_count() <= threads, what="threads back")
    wait_until(lambda: open_fds() <= fds + 2, what="fds back")


def test_engine_stop_with_300_fast_streams_is_fast():
    hub = Hub(idle=30)
    engine_plugin().route("/events", hub, "lobby")
    server = CherryPyServer(Root(), thread_pool=2).start()
    clients = []
    try:
        for _ in range(300):
            clients.append(StreamClient(server.url + "/events").open())
        wait_until(lambda: engine_plugin().pool.parked_streams == 300, timeout=20, what="300 parked")
        assert hub.subscriptions == 300
    finally:
        elapsed = server.stop()
    assert elapsed < 2.0, f"engine.stop() took {elapsed:.2f}s with 300 fast streams"
    for client in clients:
        client.wait_closed(5)  # each saw the terminating chunk
        client.close()
    assert hub.subscriptions == 0 and engine_plugin().pool.open_streams == 0


def test_plain_wsgi_server(comet_wsgi, hub):
    routes = FastRoutes()
    routes.add("/events", hub, "lobby", heartbeat=0.5)

    def pages(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"page " + environ["PATH_INFO"].encode()]

    server = comet_wsgi(pages, numthreads=2, routes=routes)
    clients = [StreamClient(server.url + "/events").open() for _ in range(10)]
    wait_until(lambda: routes.pool.parked_streams == 10, what="10 parked on 2 threads")
    assert http_get(server.url + "/x")[2] == b"page /x"
    hub.publish("lobby", "hi")
    assert all(c.wait_for(1)[0].data == "hi" for c in clients)
    for c in clients:
        c.close()
    wait_until(lambda: routes.pool.open_streams == 0 and hub.subscriptions == 0, what="released")
    assert counts(routes.pool) == (10, 0)
    # once the pool is closing, new streams are refused with 503, not parked into a stopped writer
    routes.pool.close_all()
    data = raw_request(port_of(server), b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", until=None)
    assert data.startswith(b"HTTP/1.1 503") and b"shutting down" in data
    assert hub.subscriptions == 0


def test_tls_server_serves_routes_through_the_middleware(comet_cherrypy, hub, tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    engine_plugin().route("/events", hub, "lobby", heartbeat=0.5)
    server = comet_cherrypy(Root(), thread_pool=4, global_config={
        "server.ssl_module": "builtin", "server.ssl_certificate": str(cert), "server.ssl_private_key": str(key)})
    pool = engine_plugin().pool
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port_of(server))) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        data = read_more(tls.recv, data, b":ok\n\n")
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        assert counts(pool) == (0, 1) and pool.parked_streams == 0  # TLS keeps its thread
        hub.publish("lobby", "over tls")
        data = read_more(tls.recv, data, b"data: over tls")
    wait_until(lambda: hub.subscriptions == 0 and pool.open_streams == 0, what="released after the TLS client left")


def test_redis_hub_first_use_goes_through_a_worker_then_accept_time(comet_cherrypy, comet_redis, caplog):
    """The accepting thread never waits on Redis: a channel's first subscribe
    (which reads its history) is served by the middleware on a worker, as a
    matter of course (nothing logged)."""
    caplog.set_level(logging.INFO, logger="comet")
    hub = RedisHub(comet_redis.url, prefix="fastpath:")
    try:
        engine_plugin().route("/events", hub, "lobby", heartbeat=0.5)
        server = comet_cherrypy(Root(), thread_pool=2)
        pool = engine_plugin().pool
        first_id = hub.publish("lobby", "before")
        with StreamClient(server.url + "/events", last_event_id=hub.before(first_id)) as first:
            assert [e.data for e in first.wait_for(1)] == ["before"]
            assert counts(pool) == (0, 1)
            wait_until(lambda: hub.connected, what="reader connected")
            with StreamClient(server.url + "/events", last_event_id=hub.before(first_id)) as second:
                assert [e.data for e in second.wait_for(1)] == ["before"]
                assert counts(pool) == (1, 1)
                wait_until(lambda: pool.parked_streams == 2, what="parked")
                hub.publish("lobby", "after")
                assert first.wait_for(2)[1].data == second.wait_for(2)[1].data == "after"
    finally:
        hub.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_routes_are_checked_when_declared():
    routes, hub = FastRoutes(), Hub()
    with pytest.raises(ValueError, match="parameters"):
        routes.add("/rooms/{room}", hub, "room:{name}")
    with pytest.raises(ValueError, match="absolute path"):
        routes.add("events", hub, "lobby")
    with pytest.raises(ValueError, match="parked"):
        routes.add("/poll", hub, "lobby", transport="longpoll")
    with pytest.raises(TypeError, match="unknown comet option"):
        routes.add("/events", hub, "lobby", hearbeat=3)
    routes.add("/events", hub, "lobby")
    with pytest.raises(ValueError, match="exists already"):
        routes.add("/events", hub, "other")
    hub.close()


def test_fast_route_and_comet_handler_side_by_side(comet_cherrypy, hub):
    """A fast route answers before a CherryPy handler at the same path; the
    app's other handlers are untouched."""
    class App(Root):
        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def events(self, last_event_id=None):
            return hub.subscribe("handler-channel", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def other(self, last_event_id=None):
            return hub.subscribe("handler-channel", last_id=last_event_id)

    engine_plugin().route("/events", hub, "lobby", heartbeat=0.5)
    server = comet_cherrypy(App(), thread_pool=4)
    with StreamClient(server.url + "/events") as fast_client, StreamClient(server.url + "/other") as handler_client:
        wait_until(lambda: engine_plugin().pool.parked_streams == 2, what="parked")
        hub.publish("lobby", "fast")
        hub.publish("handler-channel", "handler")
        assert fast_client.wait_for(1)[0].data == "fast"
        assert handler_client.wait_for(1)[0].data == "handler"


# -- who may follow a fast route ------------------------------------------------

SECRET = b"test-secret"


def token_for(channel: str) -> str:
    return hmac.new(SECRET, channel.encode(), hashlib.sha256).hexdigest()


def room_token(request):
    """What an app does: the page (behind CherryPy's own auth) hands out a
    token signed for one channel; the stream checks it without any I/O."""
    if not hmac.compare_digest(request.query.get("token", ""), token_for("room:" + request.params["room"])):
        raise Forbidden("a valid token for this room is needed")
    return True


def answer(port: int, path: str, headers: str = "") -> tuple[bytes, bytes]:
    """Head and body of a refused stream request (``Connection: close`` so
    that the middleware's answer, on a keep-alive capable server, ends too)."""
    data = raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode(), until=None)
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_authorize_admits_a_signed_token_and_refuses_others_with_403(comet_cherrypy, hub):
    plugin = engine_plugin()
    plugin.route("/rooms/{room}/events", hub, "room:{room}", heartbeat=0.5, authorize=room_token)
    server = comet_cherrypy(Root(), thread_pool=2)
    pool, port = plugin.pool, port_of(server)
    forbidden = pool.counters["forbidden"]
    with StreamClient(f"{server.url}/rooms/a/events?token={token_for('room:a')}") as allowed:
        wait_until(lambda: pool.parked_streams == 1, what="parked")
        hub.publish("room:a", "members only")
        assert allowed.wait_for(1)[0].data == "members only"
        assert counts(pool) == (1, 0)
        refusals = [
            f"/rooms/b/events?token={token_for('room:a')}",  # another room's token
            "/rooms/b/events",                                # none
            "/rooms/b/events?token=",
            f"/rooms/%62/events?token={token_for('room:a')}",  # through the middleware
        ]
        for path in refusals:
            head, body = answer(port, path)
            assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"text/plain; charset=utf-8" in head, head
            assert body == b"a valid token for this room is needed\n"
            # answered at accept (comet's own head) or through cheroot: the same name
            assert re.findall(rb"\r\nServer: ([^\r]*)", head) == [cherrypy.server.httpserver.version.encode()], head
        assert pool.counters["forbidden"] - forbidden == len(refusals)
        assert hub.subscriptions == 1 and pool.open_streams == 1 and counts(pool) == (1, 0)
        # the middleware also admits a good token
        with StreamClient(f"{server.url}/rooms/%62/events?token={token_for('room:b')}") as via_wsgi:
            wait_until(lambda: pool.parked_streams == 2, what="parked")
            hub.publish("room:b", "b only")
            assert via_wsgi.wait_for(1)[0].data == "b only"
            assert counts(pool) == (1, 1)
    wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="released")


def test_authorize_sees_headers_cookies_and_the_peer_either_way(comet_cherrypy, hub, caplog):
    seen = []

    def authorize(request):
        seen.append(request)
        if request.headers.get("authorization") == "Bearer bug":
            raise RuntimeError("a bug in the callback")
        if request.cookies.get("member") == "banned":
            raise PermissionError("banned from the lobby")
        return request.cookies.get("member") == "yes"

    engine_plugin().route("/events", hub, "lobby", heartbeat=0.5, authorize=authorize)
    server = comet_cherrypy(Root(), thread_pool=2)
    pool, port = engine_plugin().pool, port_of(server)
    for path in ("/events", "/%65vents"):  # at accept, through the middleware
        seen.clear()
        headers = {"Cookie": 'theme=dark; member="yes"', "Authorization": "Bearer ok", "X-Forwarded-For": "10.1.2.3"}
        with RawStream(f"{server.url}{path}?room=x&room=y&flag", headers=headers) as raw:
            assert raw.status == 200 and no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
        [request] = seen
        assert request.path == "/events" and request.params == {}
        assert request.query == {"room": "y", "flag": ""}
        assert request.cookies == {"theme": "dark", "member": "yes"}
        assert request.headers["authorization"] == "Bearer ok" and request.headers["x-forwarded-for"] == "10.1.2.3"
        assert request.remote_addr == "127.0.0.1"
        # a falsy answer, a PermissionError, a bug: 403, 403 with its message, 500 (logged); never a stream
        head, body = answer(port, path, "Cookie: member=no\r\n")
        assert head.startswith(b"HTTP/1.1 403") and body == b"not allowed to follow this stream\n"
        head, body = answer(port, path, "Cookie: member=banned\r\n")
        assert head.startswith(b"HTTP/1.1 403") and body == b"banned from the lobby\n"
        caplog.clear()
        head, body = answer(port, path, "Cookie: member=yes\r\nAuthorization: Bearer bug\r\n")
        assert head.startswith(b"HTTP/1.1 500") and body == b"internal server error\n"
        assert "a bug in the callback" in caplog.text
        wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="nothing left open")
    assert http_get(server.url + "/")[2] == b"plain page"


def test_stream_request_reads_what_browsers_send():
    request = StreamRequest("/r/1", {"r": "1"}, "a=1&a=2&b=%20x&empty=", {
        "cookie": 'sid=abc; sid=shadowed; quoted="v 1"; junk; =nameless'}, "::1")
    assert request.query == {"a": "2", "b": " x", "empty": ""}
    assert request.cookies == {"sid": "abc", "quoted": "v 1"}
    assert StreamRequest("/", {}, "", {}, "").cookies == {} and "from ::1" in repr(request)
    with pytest.raises(TypeError, match="authorize must be a callable"):
        FastRoutes().add("/events", Hub(), "lobby", authorize="yes")


def test_made_up_rooms_do_not_grow_the_hub(fast):
    """Anyone may ask for ``/rooms/<anything>/events``: channels nobody
    published to go away with their last stream, whichever way it was served."""
    server, hub, pool = fast
    hub.publish("room:real", "kept")
    for n in range(150):
        path = f"/rooms/made-up-{n}/events" if n % 3 else f"/rooms/made%2Dup-{n}/events"  # %-escaped: the middleware
        with StreamClient(server.url + path) as client:
            client.wait_for(0)
            if n % 2:
                wait_until(lambda: pool.parked_streams == 1, what="parked")
    wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="released")
    assert counts(pool) == (100, 50)
    assert hub.channels() == ["room:real"]


def test_answers_name_the_server_not_its_address(fast):
    """cheroot puts its ``server_name`` in ``Server``, which CherryPy sets to
    the bind address: the routes' answers, at accept time and through the
    middleware (a %-escaped path), name the server as its pages do."""
    server, hub, pool = fast
    port = port_of(server)
    answers = [raw_request(port, b"GET /events?last_event_id=bad HTTP/1.1\r\nHost: x\r\n\r\n", until=None),
               raw_request(port, b"GET /%65vents?last_event_id=bad HTTP/1.1\r\nHost: x\r\n\r\n", until=b"digits"),
               raw_request(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", until=b":ok"),
               raw_request(port, b"GET /%65vents HTTP/1.1\r\nHost: x\r\n\r\n", until=b":ok")]
    for data in answers:
        head = data.partition(b"\r\n\r\n")[0]
        # as CherryPy's own server object names itself ("CherryPy/x Cheroot/y")
        assert re.findall(rb"\r\nServer: ([^\r]*)", head) == [cherrypy.server.httpserver.version.encode()], head
    wait_until(lambda: pool.open_streams == 0, what="streams released")


def test_fast_routes_alone_as_a_wsgi_app_answer_404_off_their_routes(comet_wsgi, hub):
    """``FastRoutes.wsgi()`` with no app behind it serves its routes and
    answers anything else 404 with a reason, not a 500."""
    routes = FastRoutes()
    routes.add("/events", hub, "lobby", heartbeat=0.5)
    try:
        server = comet_wsgi(routes.wsgi())
        status, _, body = http_get(server.url + "/elsewhere")
        assert status == 404 and b"no such stream" in body, (status, body)
        with RawStream(server.url + "/events") as raw:
            assert raw.status == 200 and raw.headers["content-type"].startswith("text/event-stream")
    finally:
        routes.pool.close_all()
