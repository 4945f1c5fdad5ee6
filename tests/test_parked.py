"""Parked mode: streams that return a Subscription give their server thread
back and are written by one selector thread. Same guarantees as thread mode."""
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet.testing import CherryPyServer, HTTPStatusError, StreamClient, http_get, wait_until
from comet.wsgi import comet_app

from conftest import RawStream, open_fds, read_more, no_cursor

STREAMING = ["sse", "multipart", "chunked"]


class Closes:
    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.count += 1


def parked_root(hub, closes, heartbeat=0.5, **extra):
    def endpoint(transport, **more):
        @comet(transport=transport, heartbeat=heartbeat, **{**extra, **more})
        def handler(self, last_event_id=None, channel="lobby", role="guest"):
            view = None if role == "mod" else (lambda e: None if e.name == "secret" else e)
            sub = hub.subscribe(channel, last_id=last_event_id, view=view)
            sub.on_close(closes)
            return sub
        return cherrypy.expose(handler)

    class Root:
        sse = endpoint("sse")
        multipart = endpoint("multipart")
        chunked = endpoint("chunked")
        threaded = endpoint("sse", mode="thread")

        @cherrypy.expose
        def index(self):
            return "plain page"

    return Root()


@pytest.fixture
def parked(comet_cherrypy, hub):
    closes = Closes()
    # four server threads: every stream below beyond that is proof of parking
    server = comet_cherrypy(parked_root(hub, closes), thread_pool=4)
    return server, hub, closes


def test_parked_sse_bytes_with_chunk_framing(parked):
    server, hub, _ = parked
    with RawStream(server.url + "/sse") as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["transfer-encoding"] == "chunked" and raw.headers["x-accel-buffering"] == "no"
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
        wait_until(lambda: engine_plugin().pool.parked_streams == 1, what="parked")
        event_id = hub.publish("lobby", "two\nlines", event="join")
        assert raw.chunk() == f"id: {event_id}\nevent: join\ndata: two\ndata: lines\n\n".encode()
        assert raw.chunk() == b"event: comet.heartbeat\ndata: 0.5\n\n"  # heartbeat from the writer thread


def test_parked_delivery_is_immediate_publish_after_publish(parked):
    """Every publish wakes the writer: no event waits for the periodic scan."""
    server, hub, _ = parked
    # Streams parking at the same moment race the writer's wake-up handling
    # (as a crowd connecting does); so do concurrent publishers below.
    clients = [StreamClient(server.url + "/sse") for _ in range(60)]
    openers = [threading.Thread(target=c.open) for c in clients]
    for t in openers:
        t.start()
    for t in openers:
        t.join(30)
    try:
        wait_until(lambda: engine_plugin().pool.parked_streams == 60, timeout=20, what="parked")
        # Concurrent publishers race the writer's wake-up handling; a lost
        # wake-up would leave every later publish waiting for the 1 s scan.
        workers = [threading.Thread(target=lambda: [hub.publish("lobby", "burst") for _ in range(200)]) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        for c in clients:
            c.wait_for(800, timeout=30)
        clients_seen = [len(c.events) for c in clients]
        delays = []
        for n in range(30):
            started = time.monotonic()
            hub.publish("lobby", n)
            for c, seen in zip(clients, clients_seen):
                c.wait_for(seen + n + 1)
            delays.append(time.monotonic() - started)
            if n % 3 == 0:
                time.sleep(0.05)  # let the writer go idle in select() between some publishes
        delays.sort()
        assert delays[len(delays) // 2] < 0.25, f"median delivery {delays[len(delays) // 2]:.3f}s: a wake-up was lost"
    finally:
        for c in clients:
            c.close()


def test_parked_multipart_and_chunked_bytes(parked):
    server, hub, _ = parked
    with RawStream(server.url + "/multipart") as mp, RawStream(server.url + "/chunked") as ch:
        boundary = mp.headers["content-type"].split("boundary=")[1]
        assert mp.chunk() == f"--{boundary}\r\n".encode() and ch.chunk() == b"\n"
        wait_until(lambda: engine_plugin().pool.parked_streams == 2, what="parked")
        event_id = hub.publish("lobby", {"k": 1})
        body = f'{{"id":"{event_id}","event":null,"data":{{"k":1}}}}'.encode()
        head, delimiter = b"Content-Type: application/json\r\n\r\n", f"\r\n--{boundary}\r\n".encode()
        assert mp.chunk() == head + body + delimiter + head
        assert ch.chunk() == body + b"\n"
        # heartbeats; multipart's: an empty part after a JSON part (tests/test_framing.py)
        assert mp.chunk() == delimiter + head and ch.chunk() == b"\n"


@pytest.mark.parametrize("transport", STREAMING)
def test_many_parked_streams_on_four_threads_and_pages_still_load(parked, transport):
    server, hub, _ = parked
    clients = [StreamClient(f"{server.url}/{transport}", transport=transport).open() for _ in range(40)]
    try:
        wait_until(lambda: engine_plugin().pool.parked_streams == 40, what="40 parked")
        started = time.monotonic()
        assert http_get(server.url + "/")[2] == b"plain page"
        assert time.monotonic() - started < 2
        hub.publish("lobby", "to all")
        for c in clients:
            item = c.wait_for(1)[0]
            data = json.loads(item.body)["data"] if transport == "multipart" else item["data"] if transport == "chunked" else item.data
            assert data == "to all"
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("transport", STREAMING)
def test_parked_disconnect_runs_on_close_at_once(parked, transport):
    server, hub, closes = parked
    client = StreamClient(f"{server.url}/{transport}", transport=transport).open()
    wait_until(lambda: hub.subscriptions == 1 and engine_plugin().pool.parked_streams == 1, what="parked")
    client.close()
    gone = time.monotonic()
    wait_until(lambda: closes.count == 1 and hub.subscriptions == 0 and engine_plugin().pool.open_streams == 0,
               what="released")
    assert time.monotonic() - gone < 0.5 * 3  # well within one heartbeat (0.5 s) plus scheduling slack


def test_parked_resume_and_gap(comet_cherrypy):
    hub, closes = Hub(buffer_size=5, idle=0.2), Closes()
    server = comet_cherrypy(parked_root(hub, closes), thread_pool=4)
    ids = [hub.publish("lobby", n) for n in range(3)]
    with StreamClient(server.url + "/sse", last_event_id=ids[0]) as c:
        assert [e.data for e in c.wait_for(2)] == ["1", "2"]
        wait_until(lambda: engine_plugin().pool.parked_streams == 1, what="parked")
        ids.append(hub.publish("lobby", 3))
        assert [e.id for e in c.wait_for(3)] == ids[1:]
    more = [hub.publish("lobby", n) for n in range(4, 12)]  # evicts ids[3] from the 5-event buffer
    with StreamClient(server.url + "/sse", last_event_id=ids[3]) as c:
        gap, *rest = c.wait_for(6)
        assert gap.name == "comet.gap" and [e.id for e in rest] == more[-5:]


def test_parked_per_subscriber_view(parked):
    server, hub, _ = parked
    with StreamClient(server.url + "/sse") as guest, StreamClient(server.url + "/sse?role=mod") as mod:
        wait_until(lambda: engine_plugin().pool.parked_streams == 2, what="parked")
        hub.publish("lobby", "hidden", event="secret")
        hub.publish("lobby", "public")
        assert [e.data for e in mod.wait_for(2)] == ["hidden", "public"]
        assert [e.data for e in guest.wait_for(1)] == ["public"]


def test_mode_thread_keeps_its_thread(parked):
    server, hub, _ = parked
    with StreamClient(server.url + "/threaded") as c:
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        assert engine_plugin().pool.parked_streams == 0 and engine_plugin().pool.open_streams == 1
        hub.publish("lobby", "x")
        assert c.wait_for(1)[0].data == "x"


def test_engine_stop_with_300_parked_streams_is_fast():
    hub, closes = Hub(idle=30), Closes()
    server = CherryPyServer(parked_root(hub, closes), thread_pool=4).start()
    clients = []
    try:
        for _ in range(300):
            clients.append(StreamClient(server.url + "/sse").open())
        wait_until(lambda: engine_plugin().pool.parked_streams == 300, timeout=20, what="300 parked")
    finally:
        elapsed = server.stop()
    assert elapsed < 2.0, f"engine.stop() took {elapsed:.2f}s with 300 parked streams"
    for client in clients:
        client.wait_closed(5)  # each saw the terminating chunk
        client.close()
    assert closes.count == 300 and hub.subscriptions == 0 and engine_plugin().pool.open_streams == 0


def test_parked_admission_cap(comet_cherrypy, hub):
    closes = Closes()
    server = comet_cherrypy(parked_root(hub, closes), thread_pool=4, global_config={"comet.max_parked": 3})
    try:
        clients = [StreamClient(server.url + "/sse").open() for _ in range(3)]
        wait_until(lambda: engine_plugin().pool.parked_streams == 3, what="3 parked")
        with pytest.raises(HTTPStatusError) as refused:
            StreamClient(server.url + "/sse").open()
        assert refused.value.status == 503 and b"parked" in refused.value.body
        assert http_get(server.url + "/")[0] == 200
        # a refused stream's subscription was closed: its on_close ran, nothing is held
        wait_until(lambda: closes.count == 1 and hub.subscriptions == 3, what="refused stream cleaned up")
        for c in clients:
            c.close()
    finally:
        engine_plugin().pool.max_parked = 20_000


@pytest.fixture
def parked_on_redis(comet_cherrypy, comet_redis):
    from comet.backends.redis import RedisHub

    hub = RedisHub(comet_redis.url, prefix=f"parked-{uuid.uuid4().hex[:8]}:", idle=0.2)
    closes = Closes()
    server = comet_cherrypy(parked_root(hub, closes), thread_pool=4)
    yield server, hub, closes
    hub.close()


def test_slow_consumer_is_disconnected_and_never_blocks_publish(parked):
    _slow_consumer_never_blocks_publish(*parked)


def test_slow_consumer_never_blocks_a_publish_through_redis(parked_on_redis):
    """The same with a RedisHub: a publish is acknowledged by Redis and the
    stuck stream's process reads its copy from Redis; nothing in between
    waits for the slow client."""
    _slow_consumer_never_blocks_publish(*parked_on_redis)


def _slow_consumer_never_blocks_publish(server, hub, closes):
    stuck = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read again
    with StreamClient(server.url + "/sse") as healthy:
        wait_until(lambda: engine_plugin().pool.parked_streams == 2, what=f"both parked (now {engine_plugin().pool.parked_streams}, open {engine_plugin().pool.open_streams})")
        blob = "x" * 60_000
        publishing = 0.0
        for batch in range(15):  # ~9 MB: past the kernel buffers (up to 4 MB on loopback) and the 1 MiB cap
            started = time.monotonic()
            for _ in range(10):
                hub.publish("lobby", blob)
            publishing += time.monotonic() - started
            # a reader that keeps up stays connected; the stuck one falls behind
            assert len(healthy.wait_for(10 * (batch + 1), timeout=20)) == 10 * (batch + 1)
        assert publishing < 5, "publish must not wait for slow consumers"
        wait_until(lambda: closes.count == 1 and engine_plugin().pool.parked_streams == 1, timeout=10,
                   what="slow consumer dropped")
        assert engine_plugin().pool.counters.get("slow_consumers", 0) >= 1
    stuck.close()


def test_parked_cycles_leak_nothing(parked):
    server, hub, closes = parked
    pool = engine_plugin().pool
    StreamClient(server.url + "/sse").open().close()
    wait_until(lambda: pool.open_streams == 0, what="warm-up released")
    threads, fds = threading.active_count(), open_fds()
    for n in range(60):
        transport = STREAMING[n % 3]
        c = StreamClient(f"{server.url}/{transport}", transport=transport).open()
        if n % 2:
            wait_until(lambda: pool.parked_streams == 1, what="parked")
            hub.publish("lobby", n)
            c.wait_for(1)
        c.close()
        wait_until(lambda: pool.open_streams == 0, what="released")
    assert closes.count == 61 and hub.subscriptions == 0
    wait_until(lambda: threading.active_count() <= threads, what="threads back")
    wait_until(lambda: open_fds() <= fds + 2, what="fds back")


def test_parked_under_plain_wsgi(comet_wsgi, hub):
    closes = Closes()

    @comet_app(transport="sse", heartbeat=0.5)
    def app(environ):
        sub = hub.subscribe("lobby", last_id=environ["comet.last_event_id"])
        sub.on_close(closes)
        return sub

    server = comet_wsgi(app, numthreads=2)
    clients = [StreamClient(server.url + "/").open() for _ in range(10)]
    wait_until(lambda: app.pool.parked_streams == 10, what="10 parked on 2 threads")
    hub.publish("lobby", "hi")
    assert all(c.wait_for(1)[0].data == "hi" for c in clients)
    for c in clients:
        c.close()
    wait_until(lambda: closes.count == 10 and app.pool.open_streams == 0, what="released")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_tls_streams_fall_back_to_thread_mode(comet_cherrypy, hub, certificate, caplog):
    """TLS connections are cheroot's: the accept-time hook leaves them
    alone (no error logged), and their streams keep their threads."""
    cert, key = certificate
    caplog.set_level("ERROR", logger="comet")
    closes = Closes()
    server = comet_cherrypy(parked_root(hub, closes), thread_pool=8, global_config={
        "server.ssl_module": "builtin", "server.ssl_certificate": cert, "server.ssl_private_key": key})
    port = int(server.url.rsplit(":", 1)[1])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        data = read_more(tls.recv, data, b":ok\n\n")
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        assert engine_plugin().pool.parked_streams == 0  # TLS keeps its thread
        hub.publish("lobby", "over tls")
        data = read_more(tls.recv, data, b"data: over tls")
    wait_until(lambda: closes.count == 1, what="released after the TLS client left")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_stream_parked_while_the_pool_stops_is_ended_and_the_next_start_parks_again():
    """A stream that reaches park() after close_all (a client reconnecting
    while the engine stops) is ended and released at once; it must not
    leave a stopped writer behind for the pool's next start."""
    from comet.options import Options
    from comet.pipeline import open_stream
    from comet.pool import StreamPool

    hub, pool = Hub(idle=30), StreamPool()

    class Owned:  # a socket comet owns already, as a fast route's
        parkable = True

        def closed(self):
            return False

        def take(self):
            raise AssertionError("not used: the test parks the socket itself")

    def parked_pair():
        server_side, client_side = socket.socketpair()
        opened = open_stream(lambda: hub.subscribe("lobby"), Options(), pool, connection=Owned())
        return (opened.body, server_side), client_side

    def read_until(sock, marker):
        sock.settimeout(5)
        data = b""
        while marker not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
        return data

    first, first_client = parked_pair()
    pool.close_all()
    first[0].park(first[1], True)
    announced = b":ok\n\nevent: comet.heartbeat\nid: %s\ndata: 15\n\n" % hub.last_id("lobby").encode()  # (its cursor)
    assert read_until(first_client, b"0\r\n\r\n") == b"%x\r\n%s\r\n0\r\n\r\n" % (len(announced), announced)  # head, then the last chunk
    assert first_client.recv(10) == b""  # and closed
    assert pool.open_streams == 0 and pool.parked_streams == 0 and hub.subscriptions == 0
    pool.reopen()
    second, second_client = parked_pair()
    second[0].park(second[1], True)
    hub.publish("lobby", "after restart")
    assert b"data: after restart" in read_until(second_client, b"data: after restart")
    pool.close_all()
    wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="released")
    first_client.close()
    second_client.close()
    hub.close()
