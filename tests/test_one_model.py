"""One model for every generator handler, under load, in its own process.

The issue's "Done when": 20 generators that sleep 2 s between items beside
1,000 hub streams on the default pool (CherryPy's ``thread_pool`` of 10):
every hub stream gets every event with p99 under 250 ms, the sleepers keep
ticking, pages answer within 1 s, SIGTERM exits within 2 s.

The app is tests/apps/one_model_app.py. The clients are raw sockets read by
one selector loop in this process (HTTP/1.1 chunked framing decoded here,
SSE parsed by comet.testing.SSEParser); a publisher thread and a page
prober run beside it. Every wait has a deadline.
"""
from __future__ import annotations

import resource
import selectors
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

from comet.testing import AppProcess, SSEParser, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
APP = "tests/apps/one_model_app.py"
READY = "one_model_app ready"  # tests/apps/one_model_app.py's READY

HUB_STREAMS = 1000
SLEEPERS = 20
EVENTS = 30          # published one every PUBLISH_EVERY seconds
PUBLISH_EVERY = 0.2
P99_BOUND = 0.25     # seconds, publish (before the request) to receive
PAGE_BOUND = 1.0     # seconds for GET /
EXIT_BOUND = 2.0     # seconds from SIGTERM to the process's exit
STEADY = 6.5         # seconds of the measured phase (at least)
TICK_GAP_BOUND = 3.0  # seconds between two ticks of one sleeper (it sleeps 2)


class Client:
    """One raw HTTP/1.1 GET whose chunked SSE body is decoded as it arrives."""

    __slots__ = ("sock", "kind", "n", "buf", "head", "status", "parser", "items", "clean_end", "eof", "error")

    def __init__(self, sock: socket.socket, kind: str, n: int) -> None:
        self.sock = sock
        self.kind = kind
        self.n = n
        self.buf = b""
        self.head = False
        self.status: int | None = None
        self.parser = SSEParser()
        self.items: list[tuple[float, str]] = []  # (receive time, data)
        self.clean_end = False  # the terminating chunk arrived
        self.eof = False
        self.error: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        if not self.head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
            self.head = True
            lines = head.split("\r\n")
            self.status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if self.status != 200 or headers.get("transfer-encoding") != "chunked":
                self.error = f"{lines[0]} {headers}"
                return
        while not self.clean_end and not self.error:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self.buf[:line_end].split(b";")[0], 16)
            if size == 0:
                self.clean_end = True
                return
            if len(self.buf) < line_end + 2 + size + 2:
                return
            payload = self.buf[line_end + 2:line_end + 2 + size]
            if self.buf[line_end + 2 + size:line_end + 4 + size] != b"\r\n":
                self.error = f"chunk not followed by CRLF: {self.buf[:80]!r}"
                return
            self.buf = self.buf[line_end + 4 + size:]
            for event in self.parser.feed(payload):
                self.items.append((now, event.data))


class Clients:
    """Every client socket, read by one selector loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.all: list[Client] = []

    def open(self, path: str, kind: str, n: int, headers: dict[str, str] | None = None) -> Client:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAccept: text/event-stream\r\n{extra}\r\n"
                     .encode("latin-1"))
        sock.setblocking(False)
        client = Client(sock, kind, n)
        self.all.append(client)
        self.selector.register(sock, selectors.EVENT_READ, client)
        return client

    def pump(self, done, deadline: float, what: str) -> None:
        """Read every socket until ``done()`` holds; TimeoutError at *deadline*
        (a ``time.monotonic()``)."""
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            if not self.selector.get_map():
                raise AssertionError(f"every client socket closed while waiting for {what}")
            for key, _ in self.selector.select(min(left, 0.05)):
                client: Client = key.data
                try:
                    data = client.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data = b""
                    client.error = client.error or f"recv: {exc}"
                now = time.time()
                if data:
                    client.feed(data, now)
                else:
                    client.eof = True
                    self.selector.unregister(client.sock)

    def close(self) -> None:
        for client in self.all:
            try:
                self.selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.sock.close()
        self.selector.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))  # the app process inherits it


class Prober(threading.Thread):
    """GET / every *every* seconds, recording (phase, seconds or None, error)."""

    def __init__(self, url: str, every: float = 0.4) -> None:
        super().__init__(name="page-prober", daemon=True)
        self.url = url
        self.every = every
        self.phase = "start"
        self.times: list[tuple[str, float | None, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            phase, started = self.phase, time.monotonic()
            try:
                status, _, body = http_get(self.url + "/", timeout=5)
                elapsed: float | None = time.monotonic() - started
                error = "" if status == 200 and b"one model" in body else f"HTTP {status}"
            except Exception as exc:  # TimeoutError, a reset, a malformed answer
                elapsed, error = None, str(exc)
            self.times.append((phase, elapsed, error))
            self.stop.wait(self.every)


class Publisher(threading.Thread):
    """Publish EVENTS events, one every PUBLISH_EVERY seconds, each carrying
    time.time() taken just before its request."""

    def __init__(self, url: str) -> None:
        super().__init__(name="publisher", daemon=True)
        self.url = url
        self.sent: list[tuple[int, float, float]] = []  # (seq, ts, request seconds)
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.abort = threading.Event()

    def run(self) -> None:
        try:
            start = time.monotonic()
            for seq in range(EVENTS):
                if self.abort.wait(max(0.0, start + seq * PUBLISH_EVERY - time.monotonic())):
                    return
                ts = time.time()
                status, _, body = http_get(f"{self.url}/publish?seq={seq}&ts={ts!r}", timeout=5)
                assert status == 200, f"publish {seq}: HTTP {status} {body[:200]!r}"
                self.sent.append((seq, ts, time.time() - ts))
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished.set()


@pytest.mark.slow
def test_sleepers_beside_a_thousand_hub_streams_on_the_default_pool():
    _raise_fd_limit(4 * (HUB_STREAMS + SLEEPERS) + 200)
    app = AppProcess([APP, "--port", "{port}"], cwd=ROOT, ready=READY)
    clients: Clients | None = None
    prober: Prober | None = None
    publisher: Publisher | None = None
    report: list[str] = []
    try:
        app.start()
        url = app.url
        status, _, cursor = http_get(url + "/last_id", timeout=5)
        assert status == 200, cursor
        # Every stream resumes after this cursor: an event published before
        # its subscription exists (it greets first, then subscribes) is
        # still delivered, exactly once.
        resume = {"Last-Event-ID": cursor.decode("ascii")}
        prober = Prober(url)
        prober.start()

        # -- a thousand hub streams, then twenty sleepers ----------------------
        clients = Clients(app.port)
        prober.phase = "connect hub streams"
        started = time.monotonic()
        hub_clients = [clients.open("/events", "hub", i, resume) for i in range(HUB_STREAMS)]
        clients.pump(lambda: all(c.items or c.error or c.eof for c in hub_clients), time.monotonic() + 30,
                     "every hub stream's greeting")
        greeted = time.monotonic() - started
        for c in hub_clients:
            assert not c.error and not c.eof, f"hub stream {c.n}: {c.error or 'closed'}"
            assert c.items[0][1] == "hello", f"hub stream {c.n} began with {c.items[:1]!r}"
        report.append(f"1000 hub streams greeted in {greeted:.2f}s")

        prober.phase = "connect sleepers"
        started = time.monotonic()
        sleepers = [clients.open(f"/sleepy?n={i}", "sleepy", i) for i in range(SLEEPERS)]
        # Each blocks 2 s before its first item: its request's thread waits
        # only PRIME_WAIT (0.1 s) for it, then the stream opens and the step
        # goes on on the step pool, so twenty of them do not hold CherryPy's
        # ten threads and GET / keeps answering (asserted below).
        clients.pump(lambda: all(c.items or c.error or c.eof for c in sleepers), time.monotonic() + 15,
                     "every sleeper's first tick")
        for c in sleepers:
            assert not c.error and not c.eof, f"sleeper {c.n}: {c.error or 'closed'}"
        report.append(f"20 sleepers' first ticks in {time.monotonic() - started:.2f}s")

        wait_until(lambda: http_get(url + "/subscriptions", timeout=5)[2] == str(HUB_STREAMS).encode(),
                   timeout=10, interval=0.05, what=f"{HUB_STREAMS} hub subscriptions")

        # -- the measured phase ---------------------------------------------------
        prober.phase = "steady"
        window_start = time.time()
        steady_ends = time.monotonic() + STEADY
        publisher = Publisher(url)
        publisher.start()

        def all_in() -> bool:
            if not publisher.finished.is_set() or time.monotonic() < steady_ends:
                return False
            if publisher.error is not None:
                return True
            return all(len(c.items) > EVENTS or c.error or c.eof for c in hub_clients)

        clients.pump(all_in, time.monotonic() + STEADY + 15, "every event on every hub stream")
        window_end = time.time()
        prober.phase = "after"
        if publisher.error is not None:
            raise publisher.error
        assert [seq for seq, _, _ in publisher.sent] == list(range(EVENTS))

        # Every hub stream: the greeting, then every event once, in order.
        latencies: list[float] = []
        per_event: dict[int, list[float]] = {seq: [] for seq in range(EVENTS)}
        expected = [f"{seq} {ts!r}" for seq, ts, _ in publisher.sent]
        for c in hub_clients:
            assert not c.error and not c.eof, f"hub stream {c.n}: {c.error or 'closed early'}"
            got = [data for _, data in c.items[1:]]
            assert got == expected, f"hub stream {c.n} got {got!r}, expected {expected!r}"
            for (received, data), (seq, ts, _) in zip(c.items[1:], publisher.sent):
                latency = received - ts
                latencies.append(latency)
                per_event[seq].append(latency)
        p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
        report.append(f"latency over {len(latencies)} deliveries: p50 {p50 * 1000:.1f} ms, "
                      f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
        report.append("per event (publish request ms / p50 / max ms): " + ", ".join(
            f"{seq}:{req * 1000:.0f}/{statistics.median(per_event[seq]) * 1000:.0f}/{max(per_event[seq]) * 1000:.0f}"
            for seq, _, req in publisher.sent))

        # The sleepers kept ticking, every two seconds, all along.
        gaps: list[float] = []
        for c in sleepers:
            assert not c.error and not c.eof, f"sleeper {c.n}: {c.error or 'closed early'}"
            ticks = [received for received, data in c.items]
            assert all(data.startswith(f"tick {c.n} ") for _, data in c.items), c.items
            in_window = [t for t in ticks if window_start <= t <= window_end]
            assert len(in_window) >= 2, (
                f"sleeper {c.n} ticked {len(in_window)} times in {window_end - window_start:.1f}s: {ticks}")
            gaps += [b - a for a, b in zip(ticks, ticks[1:])]
        report.append(f"sleeper tick gaps over {len(gaps)}: min {min(gaps):.3f}s, "
                      f"median {statistics.median(gaps):.3f}s, max {max(gaps):.3f}s "
                      f"(window {window_end - window_start:.1f}s)")

        # Pages answered within a second while it all went on.
        prober.stop.set()
        prober.join(10)
        steady_pages = [(elapsed, error) for phase, elapsed, error in prober.times if phase == "steady"]
        loaded_pages = [(elapsed, error) for phase, elapsed, error in prober.times if phase == "connect sleepers"]
        for phase in ("connect hub streams", "connect sleepers", "steady"):
            times = [e for p, e, _ in prober.times if p == phase]
            shown = ", ".join("timeout" if e is None else f"{e * 1000:.0f}" for e in times)
            report.append(f"GET / during {phase} (ms): {shown}")

        print("\n" + "\n".join(report))
        assert p99 < P99_BOUND, f"p99 {p99 * 1000:.1f} ms >= {P99_BOUND * 1000:.0f} ms\n" + "\n".join(report)
        assert max(gaps) < TICK_GAP_BOUND, f"a sleeper stalled: {max(gaps):.2f}s between ticks\n" + "\n".join(report)
        assert len(steady_pages) >= 5, prober.times
        for elapsed, error in steady_pages + loaded_pages:
            assert not error and elapsed is not None and elapsed < PAGE_BOUND, (
                f"GET / took {elapsed} ({error})\n" + "\n".join(report))

        # -- SIGTERM ---------------------------------------------------------------
        started = time.monotonic()
        code = app.stop(timeout=10)
        exit_took = time.monotonic() - started
        print(f"SIGTERM to exit: {exit_took:.3f}s (exit code {code})")
        assert code == 0, f"exit code {code}:\n{app.log()[-3000:]}"
        assert exit_took < EXIT_BOUND, f"SIGTERM to exit took {exit_took:.2f}s"
        clients.pump(lambda: all(c.eof for c in clients.all), time.monotonic() + 5, "every stream's EOF")
        unclean = [f"{c.kind} {c.n}" for c in clients.all if not c.clean_end]
        assert not unclean, f"{len(unclean)} streams ended without their terminating chunk: {unclean[:10]}"
    finally:
        if publisher is not None:
            publisher.abort.set()
            publisher.join(10)
        if prober is not None:
            prober.stop.set()
            prober.join(10)
        if clients is not None:
            clients.close()
        if app.process is not None:
            print(app.log()[-3000:], file=sys.stderr)
        app.close()


# -- in process: what a generator's code sees, and a slow first step ------------------


def test_a_generators_later_steps_see_their_own_request(comet_cherrypy, hub):
    """Steps run on comet's step threads; cherrypy.request is still the
    stream's own there."""
    import cherrypy

    from comet import comet

    from conftest import RawStream

    class Root:
        @cherrypy.expose
        @comet(transport="chunked")
        def events(self):
            yield "start\n"
            for event in hub.subscribe("room"):
                yield f"{cherrypy.request.headers.get('X-Who')}:{event.data}\n" if event else event

    server = comet_cherrypy(Root(), thread_pool=2)
    with RawStream(server.url + "/events", headers={"X-Who": "alice"}) as alice, \
            RawStream(server.url + "/events", headers={"X-Who": "bob"}) as bob:
        for raw in (alice, bob):
            assert raw.chunk() == b"\n" and raw.chunk() == b"start\n"
        wait_until(lambda: hub.subscriptions == 2, what="both subscribed")
        hub.publish("room", "hi")
        assert alice.chunk() == b"alice:hi\n" and bob.chunk() == b"bob:hi\n"
    # A for loop does not close what it iterates: comet closes the
    # subscription a closed generator waited on (its on_close runs).
    wait_until(lambda: hub.subscriptions == 0, what="both subscriptions closed with their streams")


@pytest.mark.parametrize("mode, ticks", [("auto", "yielded"), ("auto", "swallowed"), ("thread", "yielded")])
def test_every_subscription_a_generator_waited_on_closes_with_it(comet_cherrypy, hub, mode, ticks):
    """A generator that breaks out of a ``for`` over one subscription and
    waits on another: when its client goes, both close, not just the last
    (their on_close runs: presence leaves, the hub counts none). Whether it
    yields the subscriptions' ticks (it parks) or swallows them (its steps
    wait in place), and in thread mode. (A thread-mode handler that
    swallows ticks never hears that its client left: not a case here.)"""
    import cherrypy

    from comet import comet

    from conftest import RawStream

    closed: list[str] = []

    class Root:
        @cherrypy.expose
        @comet(transport="chunked", mode=mode)
        def events(self):
            lobby = hub.subscribe("lobby")
            lobby.on_close(lambda: closed.append("lobby"))
            for event in lobby:
                if event:
                    yield f"lobby:{event.data}\n"
                    break  # the game starts: on to its channel
                if ticks == "yielded":
                    yield event
            game = hub.subscribe("game")
            game.on_close(lambda: closed.append("game"))
            for event in game:
                if event or ticks == "yielded":
                    yield f"game:{event.data}\n" if event else event

    server = comet_cherrypy(Root(), thread_pool=2)
    with RawStream(server.url + "/events") as raw:
        assert raw.chunk() == b"\n"
        wait_until(lambda: hub.subscriptions == 1, what="waiting in the lobby")
        hub.publish("lobby", "go")
        assert raw.chunk() == b"lobby:go\n"
        wait_until(lambda: hub.subscriptions == 2, what="waiting on the game too")
        hub.publish("game", "move")
        assert raw.chunk() == b"game:move\n"
    wait_until(lambda: hub.subscriptions == 0, what="both subscriptions closed with the stream")
    assert sorted(closed) == ["game", "lobby"]


def test_a_thread_mode_stream_refused_at_the_cap_leaves_no_subscription(comet_cherrypy, hub):
    """Two thread-mode handlers subscribe in a ``for`` loop before their
    first item, side by side, with room for one stream thread: the one
    refused (503) once its handler has run has its subscription closed."""
    import cherrypy

    from comet import comet

    from conftest import RawStream

    both_running = threading.Barrier(2)

    class Root:
        @cherrypy.expose
        @comet(transport="chunked", mode="thread")
        def events(self):
            sub = hub.subscribe("room")
            both_running.wait(5)  # both are admitted and in their handlers: one will be refused after
            for event in sub:
                yield f"{event.data}\n" if event else event

    server = comet_cherrypy(Root(), global_config={"comet.max_streams": 1})
    streams: list[RawStream] = []
    openers = [threading.Thread(target=lambda: streams.append(RawStream(server.url + "/events"))) for _ in range(2)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(10)
    try:
        assert sorted(raw.status for raw in streams) == [200, 503]
        wait_until(lambda: hub.subscriptions == 1, what="only the stream served to stay subscribed")
    finally:
        for raw in streams:
            raw.close()
    wait_until(lambda: hub.subscriptions == 0, what="the served stream's subscription closed")


def test_a_generator_slow_to_start_holds_no_server_thread(comet_cherrypy, hub):
    """A handler that blocks before its first item (a slow query) gets its
    headers after PRIME_WAIT; its first step goes on on the step pool."""
    import cherrypy

    from comet import comet

    from conftest import RawStream, chunk_past_cursor

    class Root:
        @cherrypy.expose
        def index(self):
            return "page"

        @cherrypy.expose
        @comet(transport="sse")
        def slow(self):
            time.sleep(1.5)
            yield "late"
            yield from hub.subscribe("room")

    server = comet_cherrypy(Root(), thread_pool=2, global_config={"server.socket_queue_size": 64})
    streams: list[RawStream] = []
    opener_errors: list[BaseException] = []

    def open_one() -> None:
        try:
            streams.append(RawStream(server.url + "/slow"))
        except BaseException as exc:  # reported below
            opener_errors.append(exc)

    openers = [threading.Thread(target=open_one) for _ in range(6)]
    started = time.monotonic()
    for t in openers:
        t.start()
    try:
        for t in openers:
            t.join(10)
        assert not opener_errors and len(streams) == 6
        assert time.monotonic() - started < 1.4, "headers waited for the first items"  # 6 on 2 threads
        page_started = time.monotonic()
        assert http_get(server.url + "/", timeout=5)[2] == b"page"
        assert time.monotonic() - page_started < 1.0
        for raw in streams:
            assert raw.status == 200 and raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 15\n\n"
            assert raw.chunk() == b"data: late\n\n"
        wait_until(lambda: hub.subscriptions == 6, what="all six on to their subscriptions")
        hub.publish("room", "after")
        for raw in streams:
            assert chunk_past_cursor(raw).endswith(b"data: after\n\n")
    finally:
        for raw in streams:
            raw.close()


def test_engine_stop_closes_every_generator_busy_or_slow_to_start(comet_cherrypy):
    """Shutdown runs every handler's finally: generators that never wait
    (their steps keep returning with more to do) and generators still in
    a first step longer than PRIME_WAIT."""
    import cherrypy

    from comet import comet
    from comet.cherrypy_tool import engine_plugin

    from conftest import RawStream

    closed: list[str] = []

    class Root:
        @cherrypy.expose
        @comet(transport="chunked")
        def flood(self):
            try:
                n = 0
                while True:
                    n += 1
                    yield f"{n}\n"
            finally:
                closed.append("flood")

        @cherrypy.expose
        @comet(transport="sse")
        def slow(self):
            try:
                time.sleep(1.0)
                yield "late"
            finally:
                closed.append("slow")

    server = comet_cherrypy(Root(), thread_pool=4, global_config={"server.socket_queue_size": 64})
    raws = [RawStream(server.url + "/flood") for _ in range(20)] + [RawStream(server.url + "/slow") for _ in range(3)]
    try:
        wait_until(lambda: engine_plugin().pool.parked_streams == 23, what="all parked")
        assert server.stop() < 2.0
        wait_until(lambda: len(closed) == 23 and engine_plugin().pool.open_streams == 0, timeout=10,
                   what=f"every finally ran (so far {len(closed)}: {sorted(set(closed))})")
        assert closed.count("flood") == 20 and closed.count("slow") == 3
    finally:
        for raw in raws:
            raw.close()
