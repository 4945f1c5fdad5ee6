"""The fault kit: comet.testing.FaultProxy in front of a live comet server.

Each fault is checked by what a client (and the server) observably get,
and the proxy's threads and sockets are counted back to zero at stop."""
import http.client
import json
import socket
import threading
import time

import cherrypy
import pytest

from comet import comet
from comet.testing import FaultProxy, StreamClient, StreamIdle, free_port, http_get, wait_until

from conftest import Tracker, open_fds, read_until


def fault_root(hub, tracker):
    class Root:
        @cherrypy.expose
        def index(self):
            return "plain page"

        @cherrypy.expose
        def big(self, size="20000"):
            return "x" * int(size)

        @cherrypy.expose
        @cherrypy.config(**{"response.stream": True})
        def slow(self):
            def body():
                yield b"first,"
                time.sleep(0.6)
                yield b"last"
            return body()

        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def sse(self, last_event_id=None):
            yield from tracker.track(hub.subscribe("lobby", last_id=last_event_id))

        @cherrypy.expose
        @comet(transport="chunked", heartbeat=0.5)
        def chunked(self, last_event_id=None):
            yield from tracker.track(hub.subscribe("lobby", last_id=last_event_id))

        @cherrypy.expose
        @comet(transport="multipart", heartbeat=0.5)
        def multipart(self, last_event_id=None):
            return hub.subscribe("lobby", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def quiet(self, last_event_id=None):
            yield from tracker.track(hub.subscribe("lobby", last_id=last_event_id))

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=1)
        def longpoll(self, last_event_id=None):
            yield from tracker.track(hub.subscribe("lobby", last_id=last_event_id))

    return Root()


@pytest.fixture
def server(comet_cherrypy, hub):
    tracker = Tracker()
    srv = comet_cherrypy(fault_root(hub, tracker))
    srv.tracker = tracker
    return srv


@pytest.fixture
def proxy(server):
    with FaultProxy(server.url) as p:
        yield p


def raw_get(url: str, path: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def test_passes_everything_through_by_default(proxy, server, hub):
    assert proxy.url.startswith("http://127.0.0.1:") and proxy.url != server.url
    assert http_get(proxy.url + "/big?size=100000")[2] == b"x" * 100000
    with StreamClient(proxy.url + "/sse") as client:
        assert proxy.connections == 1
        wait_until(lambda: server.tracker.open == 1, what="the stream to start")
        hub.publish("lobby", "hi")
        assert client.wait_for(1)[0].data == "hi"
    wait_until(lambda: proxy.connections == 0, what="the proxy to see the client go")
    wait_until(lambda: server.tracker.open == 0, what="the server to see the client go")


def test_upstream_as_host_and_port_and_a_bad_upstream(server):
    host, port = server.url.removeprefix("http://").split(":")
    with FaultProxy((host, int(port))) as proxy:
        assert http_get(proxy.url + "/")[2] == b"plain page"
    with pytest.raises(ValueError, match="host and a port"):
        FaultProxy("http://127.0.0.1")
    with FaultProxy("https://127.0.0.1:1") as tls:  # TLS passes through: the URL keeps its scheme
        assert tls.url == f"https://127.0.0.1:{tls.port}"


def test_an_upstream_that_refuses_is_a_reset_through_the_proxy():
    with FaultProxy(("127.0.0.1", free_port())) as proxy:
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            http_get(proxy.url + "/", timeout=5)
        wait_until(lambda: proxy.connections == 0, what="the refused connection gone")


def test_blackhole_keeps_the_socket_and_forwards_nothing(proxy, server, hub):
    with StreamClient(proxy.url + "/sse") as client:
        wait_until(lambda: client.heartbeats >= 1, what="a heartbeat through the proxy")
        proxy.blackhole()
        seen = len(client.raw)
        hub.publish("lobby", "lost")
        time.sleep(1.5)  # three heartbeats' worth of silence, observed
        assert len(client.raw) == seen and client.events == [] and not client.ended
        assert proxy.connections == 1
        # New connections pass while the old one stays dead.
        with StreamClient(proxy.url + "/sse") as fresh:
            wait_until(lambda: server.tracker.open == 2, what="the second stream to start")
            hub.publish("lobby", "seen")
            assert fresh.wait_for(lambda evs: any(e.data == "seen" for e in evs))
        assert client.events == []


def test_offline_then_restore(proxy, server, hub):
    with StreamClient(proxy.url + "/sse") as old:
        proxy.offline()
        # A new connection is accepted and then hears nothing: no headers.
        with pytest.raises(TimeoutError):
            StreamClient(proxy.url + "/sse").open(timeout=1.0)
        hub.publish("lobby", "while offline")
        proxy.restore()
        with StreamClient(proxy.url + "/sse") as fresh:
            wait_until(lambda: server.tracker.open == 2, what="the new stream to start")
            hub.publish("lobby", "back")
            assert [e.data for e in fresh.wait_for(1)] == ["back"]
        assert old.events == [] and not old.ended  # still blackholed, as a forgetful NAT leaves it


def test_delay_adds_latency_each_way(proxy):
    started = time.monotonic()
    http_get(proxy.url + "/")
    quick = time.monotonic() - started
    proxy.delay(0.3)
    started = time.monotonic()
    assert http_get(proxy.url + "/")[2] == b"plain page"
    slow = time.monotonic() - started
    assert slow >= 0.6 > quick, (slow, quick)  # the request, then the answer
    proxy.delay(0)
    started = time.monotonic()
    http_get(proxy.url + "/")
    assert time.monotonic() - started < 0.6
    with pytest.raises(ValueError):
        proxy.delay(-1)


def test_throttle_limits_bandwidth(proxy):
    proxy.throttle(40_000)
    started = time.monotonic()
    status, _, body = http_get(proxy.url + "/big?size=40000")
    took = time.monotonic() - started
    assert status == 200 and body == b"x" * 40000
    assert 0.8 <= took < 5, took  # 40 kB (and its headers) at 40 kB/s
    proxy.throttle(None)
    started = time.monotonic()
    http_get(proxy.url + "/big?size=40000")
    assert time.monotonic() - started < 0.5


def test_cut_ends_a_response_in_the_middle_of_an_event(proxy, server, hub):
    sock = raw_get(proxy.url, "/quiet")  # no heartbeat among the 40 bytes
    try:
        head = read_until(sock, b":ok\n\n")
        wait_until(lambda: server.tracker.open == 1, what="the stream to start")
        proxy.cut(after_bytes=40)
        hub.publish("lobby", "y" * 500)
        rest = read_until(sock, None)  # until the proxy closes it
    finally:
        sock.close()
    assert b"data: yyy" in rest and not rest.endswith(b"\n\n")  # no whole event
    assert len(rest) == 40, (head, rest)
    wait_until(lambda: server.tracker.open == 0, what="the server to see the cut")
    assert proxy.connections == 0


def test_cut_spares_connections_opened_later(proxy, server, hub):
    proxy.cut(after_bytes=0)
    with StreamClient(proxy.url + "/sse") as client:
        wait_until(lambda: server.tracker.open == 1, what="the stream to start")
        hub.publish("lobby", "whole")
        assert client.wait_for(1)[0].data == "whole"


def test_reset_gives_the_client_connection_reset(proxy, server, hub):
    with StreamClient(proxy.url + "/sse") as client:
        wait_until(lambda: server.tracker.open == 1, what="the stream to start")
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            client.wait_for(1, timeout=5)
    wait_until(lambda: server.tracker.open == 0, what="the server to see the reset")
    assert proxy.connections == 0


def test_buffer_responses_delays_a_finite_answer_until_complete(proxy):
    sock = raw_get(proxy.url, "/slow")
    try:
        first = read_until(sock, b"first,")
        assert b"last" not in first  # unbuffered, the first piece comes at once
    finally:
        sock.close()
    proxy.buffer_responses(True)
    sock = raw_get(proxy.url, "/slow")
    try:
        started = time.monotonic()
        sock.settimeout(10)
        got = sock.recv(65536)
        took = time.monotonic() - started
        got = read_until(sock, b"\r\n0\r\n\r\n", timeout=5) if not got.endswith(b"0\r\n\r\n") else got
    finally:
        sock.close()
    assert took >= 0.5, took  # nothing until the handler's last piece
    assert b"first," in got and got.endswith(b"0\r\n\r\n")


def test_buffer_responses_keeps_keepalive_answers_apart(proxy):
    proxy.buffer_responses(True)
    conn = http.client.HTTPConnection(*proxy.url.removeprefix("http://").split(":"), timeout=10)
    try:
        for size in (10, 70000, 3):
            conn.request("GET", f"/big?size={size}")
            assert conn.getresponse().read() == b"x" * size
        assert proxy.connections == 1  # one connection carried all three
    finally:
        conn.close()


def test_buffer_responses_holds_a_stream_forever_and_longpoll_gets_through(proxy, server, hub):
    proxy.buffer_responses(True)
    client = StreamClient(proxy.url + "/sse")
    with pytest.raises(TimeoutError):
        client.open(timeout=1.5)  # three heartbeats, and not even the headers
    with StreamClient(proxy.url + "/longpoll", transport="longpoll", last_event_id=hub.last_id("lobby")) as poll:
        hub.publish("lobby", "through")
        assert [e.data for e in poll.wait_for(1)] == ["through"]
    proxy.buffer_responses(False)
    with StreamClient(proxy.url + "/sse") as client:
        wait_until(lambda: server.tracker.open >= 1, what="the stream to start")
        hub.publish("lobby", "streamed")
        assert client.wait_for(1)[0].data == "streamed"


def proxy_threads() -> int:
    return sum(t.name.startswith("comet-faultproxy") for t in threading.enumerate())


def test_stop_releases_every_thread_and_socket(server, hub):
    with StreamClient(server.url + "/sse"):  # the server's own writer starts with its first stream
        wait_until(lambda: server.tracker.open == 1, what="a first stream")
    wait_until(lambda: server.tracker.open == 0, what="the first stream to end")
    fds = open_fds()
    proxy = FaultProxy(server.url)
    assert proxy_threads() == 1
    socks = [raw_get(proxy.url, "/sse") for _ in range(3)]
    wait_until(lambda: proxy.connections == 3 and server.tracker.open == 3, what="three streams")
    proxy.blackhole()
    socks += [raw_get(proxy.url, "/sse")]
    proxy.delay(5)  # bytes pending in the proxy at stop
    socks += [raw_get(proxy.url, "/")]
    proxy.offline()
    socks += [raw_get(proxy.url, "/")]
    wait_until(lambda: proxy.connections == 6, what="six connections")
    proxy.stop()
    proxy.stop()  # idempotent
    assert proxy_threads() == 0 and proxy.connections == 0
    for sock in socks:
        sock.close()
    # The server's ends close as it sees the proxy go (this process holds both).
    wait_until(lambda: server.tracker.open == 0, what="the server to see every proxied stream go")
    wait_until(lambda: open_fds() == fds, what=f"{fds} open files again")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    with pytest.raises(RuntimeError, match="stopped"):
        proxy.blackhole()


# -- the Python client's watchdog (StreamClient idle_timeout) ----------------------


def data_of(item):
    """An event's data whatever the transport's item (Event, NDJSON dict, JSON Part)."""
    if hasattr(item, "body"):
        item = json.loads(item.body)
    return item["data"] if isinstance(item, dict) else item.data


@pytest.mark.parametrize("transport", ["sse", "chunked", "multipart", "longpoll"])
def test_idle_timeout_auto_reconnects_a_blackholed_stream_and_resumes(proxy, server, hub, transport):
    """No byte for two announced heartbeats: the connection is dead; the
    client opens a new one after the last id it saw, as comet.js does."""
    path = "/sse" if transport == "sse" else "/" + transport
    with StreamClient(proxy.url + path, transport, idle_timeout="auto", last_event_id=hub.last_id("lobby")) as client:
        hub.publish("lobby", "before")
        client.wait_for(1)
        wait_until(lambda: client.heartbeat is not None, what="the announced heartbeat")
        # (a long-poll: its next request waits at the server, not between two polls)
        polls = 2 if transport == "longpoll" else 1  # the one that brought "before", the one waiting now
        wait_until(lambda: transport == "multipart" or (server.tracker.started == polls and server.tracker.open == 1),
                   what="a request waiting at the server")
        assert client.heartbeat == (1.0 if transport == "longpoll" else 0.5)
        proxy.blackhole()
        started = time.monotonic()
        hub.publish("lobby", "during 1")
        hub.publish("lobby", "during 2")
        got = client.wait_for(3, timeout=10)
        took = time.monotonic() - started
        assert [data_of(e) for e in got] == ["before", "during 1", "during 2"]  # resumed: none lost, none twice
        assert client.reconnects == 1 and took < 2 * 2 * client.heartbeat + 2, took
        assert proxy.connections == 2 if transport != "longpoll" else proxy.connections >= 1  # the dead one is kept


def test_without_idle_timeout_a_blackholed_stream_just_stays_silent(proxy, server, hub):
    with StreamClient(proxy.url + "/sse") as client:
        wait_until(lambda: server.tracker.open == 1, what="the stream to start")
        proxy.blackhole()
        hub.publish("lobby", "lost")
        with pytest.raises(TimeoutError):
            client.wait_for(1, timeout=2)  # four heartbeats
        assert client.reconnects == 0 and not client.ended


def test_idle_timeout_without_reconnect_ends_the_client_with_stream_idle(proxy, server, hub):
    with StreamClient(proxy.url + "/sse", idle_timeout=1.0, reconnect=False) as client:
        wait_until(lambda: server.tracker.open == 1, what="the stream to start")
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(StreamIdle, match="nothing for 1s"):
            client.wait_for(1, timeout=5)
        assert 0.9 < time.monotonic() - started < 3 and client.ended and client.reconnects == 0


def test_idle_timeout_keeps_trying_through_an_outage_and_catches_up(proxy, server, hub):
    """Connecting into a dead network counts as silence too: attempts time
    out one after another, and once the network is back the client is
    current after the last event it saw."""
    with StreamClient(proxy.url + "/sse", idle_timeout=0.8, last_event_id=hub.last_id("lobby")) as client:
        wait_until(lambda: server.tracker.open == 1, what="the stream to start")
        proxy.offline()
        published = [hub.publish("lobby", f"offline {n}") for n in range(3)]
        wait_until(lambda: client.reconnects >= 2, timeout=5, what="attempts into the dead network")
        assert client.events == []
        proxy.restore()
        started = time.monotonic()
        got = client.wait_for(3, timeout=5)
        assert [e.id for e in got] == published and time.monotonic() - started < 2 * 0.8 + 1


def test_idle_timeout_is_checked():
    for bad in (0, -1, "soon", True):
        with pytest.raises(ValueError, match="idle_timeout"):
            StreamClient("http://127.0.0.1:1/", idle_timeout=bad)
