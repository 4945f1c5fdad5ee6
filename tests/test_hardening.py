"""The accept path under hostile or careless clients: stray parameters,
methods that must not open a stream, request heads that never finish
(slowloris), and comet's own failures at accept time."""
import contextlib
import socket
import threading
import time
from urllib.parse import urlsplit

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet.testing import StreamClient, http_get, wait_until

from conftest import RawStream, read_until


class Root:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @cherrypy.expose
    def index(self):
        return "plain page"

    @cherrypy.expose
    def echo(self):
        return cherrypy.request.body.read()

    @cherrypy.expose
    @comet(transport="sse")
    def events(self, last_event_id=None, room="lobby"):
        yield "hello"
        yield from self.hub.subscribe(room, last_id=last_event_id)

    @cherrypy.expose
    @comet(transport="chunked")
    def anything(self, **params):
        yield {"params": sorted(params)}
        yield from self.hub.subscribe("lobby")


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send *request* with ``Connection: close``; everything until the
    server closes, within *timeout* in all."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            more = sock.recv(65536)
            if not more:
                return data
            data += more


@pytest.fixture
def server(comet_cherrypy, hub):
    engine_plugin().route("/fast/events", hub, "lobby")
    # A listen backlog big enough for the flood (CherryPy's default is 5:
    # connects beyond it wait for the kernel's SYN retries, whatever comet does).
    return comet_cherrypy(Root(hub), thread_pool=4, global_config={"server.socket_queue_size": 4096})


# -- stray parameters and methods ---------------------------------------------------


@pytest.mark.parametrize("query", ["foo=1", "_=1700000000000", "room=a&extra=b"])
def test_stray_query_parameters_get_a_400_with_the_reason(server, hub, query):
    status, headers, body = http_get(f"{server.url}/events?{query}")
    assert status == 400 and headers["content-type"].startswith("text/plain"), body
    assert b"unexpected parameter" in body and b"this stream takes: last_event_id, room" in body
    assert b"Traceback" not in body
    wait_until(lambda: engine_plugin().pool.open_streams == 0 and hub.subscriptions == 0, what="nothing held")


def test_a_handler_taking_kwargs_gets_every_parameter(server):
    with RawStream(server.url + "/anything?_=1&x=2") as raw:
        assert raw.status == 200
        assert raw.chunk() == b"\n"  # preamble
        assert raw.chunk() == b'{"params":["_","last_event_id","x"]}\n'  # (the resume cursor: None here)


@pytest.mark.parametrize("path", ["/events", "/fast/events"])
def test_head_answers_headers_only_and_opens_nothing(server, hub, path):
    opened_before = engine_plugin().pool.counters["opened"]
    data = exchange(port_of(server), f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: text/event-stream" in head, data
    assert body == b""
    assert engine_plugin().pool.counters["opened"] == opened_before and hub.subscriptions == 0


@pytest.mark.parametrize("path", ["/events", "/fast/events"])
@pytest.mark.parametrize("request_line,status", [
    ("OPTIONS {path} HTTP/1.1", b"204"),
    ("POST {path} HTTP/1.1", b"405"),
    ("DELETE {path} HTTP/1.1", b"405"),
])
def test_options_and_post_never_open_a_stream(server, hub, path, request_line, status):
    opened_before = engine_plugin().pool.counters["opened"]
    body = b"text=hi"
    data = exchange(port_of(server), (request_line.format(path=path) + "\r\nHost: x\r\nConnection: close\r\n"
                                      "Content-Type: application/x-www-form-urlencoded\r\n"
                                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    assert data.startswith(b"HTTP/1.1 " + status), data
    assert b"Allow: GET, HEAD, OPTIONS" in data and b"Traceback" not in data
    assert engine_plugin().pool.counters["opened"] == opened_before and hub.subscriptions == 0


# -- request heads that never finish --------------------------------------------------


def _stall(port: int, n: int, prefix: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if prefix:
            sock.sendall(prefix)
        socks.append(sock)
    return socks


def _page_times(url: str, n: int = 5) -> list[float]:
    times = []
    for _ in range(n):
        started = time.monotonic()
        status, _, body = http_get(url, timeout=5)
        assert status == 200 and body == b"plain page"
        times.append(time.monotonic() - started)
    return times


# b"": clients that connect and send nothing (a browser's preconnect, a TCP
# health check): at accept time there is nothing to peek, and waiting for it
# there would hold every other accept.
@pytest.mark.parametrize("count,prefix", [(500, b"GE"), (500, b"GET /fast/events HT"), (5000, b"GET / HTTP/1.1\r\nHo"),
                                          (500, b"")])
def test_stalled_request_heads_hold_no_worker_and_burn_no_cpu(server, count, prefix):
    port = port_of(server)
    workers = cherrypy.server.httpserver.requests
    socks = _stall(port, count, prefix)
    try:
        hook = cherrypy.server.httpserver._comet_accept
        wait_until(lambda: hook._waiter is not None and len(hook._waiter._conns) >= count, timeout=20,
                   what=f"{count} stalled heads waiting")
        assert workers.idle == 4  # none of them on a worker thread
        cpu, wall = time.process_time(), time.monotonic()
        times = _page_times(server.url + "/")
        time.sleep(max(0.0, 2.0 - (time.monotonic() - wall)))  # a measuring window, not a wait for an event
        used = (time.process_time() - cpu) / (time.monotonic() - wall)
        print(f"{count} stalled heads {prefix!r}: pages {max(times) * 1000:.0f} ms at most, server {used:.1%} of a core")
        assert max(times) < 1.0, times
        assert used < 0.10, f"{used:.0%} of a core with {count} stalled heads"
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: len(hook._waiter._conns) == 0, timeout=10, what="stalled heads gone with their clients")


def test_a_head_that_never_completes_gets_408_after_the_server_timeout(comet_cherrypy, hub):
    server = comet_cherrypy(Root(hub), thread_pool=2, global_config={"server.socket_timeout": 1})
    started = time.monotonic()
    data = exchange(port_of(server), b"GET / HTTP/1.1\r\nHost", timeout=10)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout") and b"took too long" in data, data
    assert 0.9 < time.monotonic() - started < 5


def test_a_reused_socket_gets_its_own_full_timeout(comet_cherrypy, hub):
    """A connection whose head completed leaves its deadline behind in the
    waiter; the next connection on the same file descriptor must not be
    timed out at that stale deadline, only at its own."""
    timeout = 3.0
    server = comet_cherrypy(Root(hub), thread_pool=2, global_config={"server.socket_timeout": timeout})
    hook = cherrypy.server.httpserver._comet_accept
    port = port_of(server)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as first, contextlib.ExitStack() as spares:
        first.sendall(b"GET / HTT")
        wait_until(lambda: hook._waiter is not None and len(hook._waiter._conns) == 1, what="the first head waiting")
        fd = next(iter(hook._waiter._conns))
        # Spare sockets take whatever lower descriptors are free now, so the
        # one freed next (the first connection's) is what the server's next
        # accept gets.
        second, *_ = [spares.enter_context(socket.socket()) for _ in range(8)]
        first.sendall(b"P/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_until(first, b"plain page").startswith(b"HTTP/1.1 200 OK")
        assert first.recv(1) == b""  # cheroot closed its side: the descriptor is free again
        wait_until(lambda: hook._waiter._conns == {}, what="the waiter empty")
        time.sleep(timeout / 2)  # the stale deadline now falls in the middle of the next connection's wait
        second.settimeout(10)
        second.connect(("127.0.0.1", port))
        started = time.monotonic()
        second.sendall(b"GET / HTT")
        wait_until(lambda: len(hook._waiter._conns) == 1, what="the second head waiting")
        if fd not in hook._waiter._conns:
            pytest.skip(f"the second connection did not reuse descriptor {fd}: {list(hook._waiter._conns)}")
        data = read_until(second, b"took too long", timeout=10)
        waited = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data
    assert waited > 0.8 * timeout, f"timed out after {waited:.1f} s, at the first connection's deadline"


def test_clients_that_reset_before_sending_log_nothing(server, hub, caplog):
    """A client that connects and resets at once (a scanner, a browser
    cancelling a preconnect) is a closed connection, not an error."""
    import struct

    caplog.set_level("WARNING", logger="comet")
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
        sock.close()
    data = exchange(port_of(server), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK"), data
    assert not [r for r in caplog.records if r.name == "comet"], caplog.text


def test_a_head_completed_later_is_served(server, hub):
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) as sock:
        sock.sendall(b"GET / HTT")
        hook = cherrypy.server.httpserver._comet_accept
        wait_until(lambda: hook._waiter is not None and len(hook._waiter._conns) == 1, what="waiting")
        sock.sendall(b"P/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while not data.endswith(b"plain page") and time.monotonic() < deadline:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"plain page"), data


@pytest.mark.parametrize("head_in_pieces", [False, True])
def test_a_connection_handed_back_is_cheroots_again_timeout_and_all(server, hub, head_in_pieces):
    """comet peeks at each head on a non-blocking socket. A connection it
    leaves to cheroot gets its timeout back: a request body still on its
    way is waited for, not an error or a closed connection."""
    head = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 1000\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) as sock:
        if head_in_pieces:  # through the head waiter
            sock.sendall(head[:9])
            hook = cherrypy.server.httpserver._comet_accept
            wait_until(lambda: hook._waiter is not None and len(hook._waiter._conns) == 1, what="waiting")
            sock.sendall(head[9:])
        else:
            sock.sendall(head)
        sock.settimeout(0.5)  # the slow client: nothing may come back while its body is on its way
        with pytest.raises(socket.timeout):
            sock.recv(1)
        sock.settimeout(5)
        sock.sendall(b"x" * 1000)
        data = read_until(sock, b"x" * 1000)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"x" * 1000), data[:200]


# -- comet failing at accept time -----------------------------------------------------


def test_a_failure_in_the_accept_hook_hands_the_connection_to_cheroot(server, hub, monkeypatch):
    """As if a cheroot internal comet peeks at were renamed: pages and
    streams still work, through cheroot's own path."""
    import comet.internals.accept

    def broken(sock):
        raise AttributeError("'HTTPConnection' object has no attribute 'renamed'")

    monkeypatch.setattr(comet.internals.accept, "_peek", broken)
    routed_before = engine_plugin().pool.counters["routed_wsgi"]
    assert _page_times(server.url + "/", 3)
    with StreamClient(server.url + "/fast/events") as client:
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        hub.publish("lobby", "through the middleware")
        assert client.wait_for(1)[0].data == "through the middleware"
    assert engine_plugin().pool.counters["routed_wsgi"] == routed_before + 1


def test_a_failure_in_a_fast_route_before_reading_hands_the_connection_back(server, hub, monkeypatch):
    from comet.fastpath import FastRoutes

    calls = []

    def broken(self, head):
        calls.append(head)
        raise KeyError("a bug in comet")

    monkeypatch.setattr(FastRoutes, "_parse", broken)
    assert _page_times(server.url + "/", 2)
    assert calls  # the hook ran, failed, and cheroot served the page anyway


def test_a_part_whose_headers_cannot_go_on_the_wire_is_refused_at_construction():
    from comet import InvalidEvent, Part

    for kw in ({"content_type": "image/\u2713"}, {"headers": (("X-Name", "caf\u00e9 \u2713"),)},
               {"headers": (("X-\u2713", "1"),)}):
        with pytest.raises(InvalidEvent, match="Latin-1"):
            Part(b"\xff\xd8frame", **kw)
    assert Part(b"\xff\xd8frame", "image/jpeg", (("X-Name", "caf\u00e9"),)).head().endswith(b"caf\xe9\r\n\r\n")


def test_a_unicode_channel_name_keeps_a_multipart_viewer_of_several_channels(comet_cherrypy, hub):
    """A binary part of channel "cam:✓" says its channel in a header that
    can carry it (%-escaped UTF-8), and the viewer goes on to the next."""
    from urllib.parse import unquote

    from comet import Part

    class Cams:
        @cherrypy.expose
        @comet(transport="multipart", heartbeat=0.5)
        def both(self):
            return hub.subscribe(["cam:\u2713", "cam:b"])

    server = comet_cherrypy(Cams())
    with StreamClient(server.url + "/both", transport="multipart") as client:
        wait_until(lambda: hub.subscriptions >= 1, what="subscribed")
        hub.publish("cam:\u2713", Part(b"\xff\xd8one", "image/jpeg"))
        hub.publish("cam:b", Part(b"\xff\xd8two", "image/jpeg"))
        hub.publish("cam:\u2713", Part(b"\xff\xd8three", "image/jpeg"))
        got = client.wait_for(3, timeout=10)
    assert [(p.body, unquote(dict(p.headers)["Comet-Channel"])) for p in got[:3]] == [
        (b"\xff\xd8one", "cam:\u2713"), (b"\xff\xd8two", "cam:b"), (b"\xff\xd8three", "cam:\u2713")]
    assert dict(got[0].headers)["Comet-Channel"] == "cam:%E2%9C%93"
    wait_until(lambda: hub.subscriptions == 0, what="released")


def test_a_closed_stream_is_freed_at_once_not_at_its_next_heartbeat(comet_cherrypy, hub):
    """2,000 streams opened and dropped: none stays alive in the writer
    (its timer heap held each until its next heartbeat, 15 s away)."""
    import gc

    from comet.writer import ParkedStream

    class Quiet:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=15)
        def events(self):
            return hub.subscribe("quiet")

    server = comet_cherrypy(Quiet())
    pool = engine_plugin().pool

    def alive() -> int:
        gc.collect()
        return sum(type(o) is ParkedStream for o in gc.get_objects())

    before = alive()
    address = urlsplit(server.url)
    request = f"GET /events HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n".encode()
    for _ in range(400):  # (5 at a time: the listen backlog is 5, and a dropped SYN waits a second)
        socks = []
        for _ in range(5):
            socks.append(socket.create_connection((address.hostname, address.port), timeout=10))
            socks[-1].sendall(request)
        for sock in socks:
            read_until(sock, b":ok")
            sock.close()
    wait_until(lambda: hub.subscriptions == 0 and pool.parked_streams == 0, timeout=20, what="every stream closed")
    # (The writer loop's variables may still name the last one it served.)
    wait_until(lambda: alive() <= before + 1, timeout=3, what="closed streams freed")


def test_the_timer_heap_keeps_one_entry_per_open_stream_through_mass_disconnects(comet_cherrypy, hub):
    """150 clients leave at once (their timers become tombstones and the heap
    is compacted) while 20 stay: each of those keeps one timer, and its
    heartbeats."""
    class Beats:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.3)
        def events(self):
            return hub.subscribe("beats")

    server = comet_cherrypy(Beats())
    pool = engine_plugin().pool
    address = urlsplit(server.url)
    opened = []
    try:
        for _ in range(170):
            sock = socket.create_connection((address.hostname, address.port), timeout=10)
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            read_until(sock, b":ok")
            opened.append(sock)
        for sock in opened[:150]:
            sock.close()
        wait_until(lambda: pool.parked_streams == 20, timeout=10, what="150 streams ended")
        writer = pool.writer()
        live = [e for e in list(writer.timers.entries) if e[2] is not None]
        assert len(live) == 20 and len({id(e[2]) for e in live}) == 20
        assert len(writer.timers.entries) - writer.timers.dead == 20 and len(writer.timers.entries) < 170
        for sock in opened[150:]:
            beats, deadline = b"", time.monotonic() + 5
            while beats.count(b"event: comet.heartbeat") < 3 and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                beats += sock.recv(4096)
            assert beats.count(b"event: comet.heartbeat") >= 3, beats
    finally:
        for sock in opened:
            sock.close()
    wait_until(lambda: pool.parked_streams == 0, timeout=10, what="all closed")
