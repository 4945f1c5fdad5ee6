"""Tests written for mutants that survived tests/mutation/mutate.py: each
pins down a behaviour the rest of the suite left open (see
tests/mutation/results.md). Real threads, servers and sockets; every wait
has a deadline."""
from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import cherrypy
import pytest

from comet import Hub, InvalidEvent, comet
from comet.cherrypy_tool import engine_plugin

from comet.pool import StreamPool
from comet.steps import StepPool
from comet.testing import http_get, wait_until
from comet.wsgi import comet_app

from conftest import RawStream, read_until, no_cursor, chunk_past_cursor


@pytest.fixture
def release():
    """An event the blocking jobs wait on; set at teardown whatever happens."""
    gate = threading.Event()
    yield gate
    gate.set()


def test_step_pool_starts_its_core_threads_up_front():
    pool = StepPool(core=2, limit=4)
    try:
        assert pool.threads == 2
    finally:
        pool.stop()


def test_a_blocked_step_gets_a_thread_of_its_own_so_the_next_step_runs(release):
    pool = StepPool(core=1, limit=4)
    started, ran = threading.Event(), threading.Event()
    try:
        pool.submit(lambda: (started.set(), release.wait(10)))
        assert started.wait(5)
        pool.submit(ran.set)
        assert ran.wait(5), "a step queued behind a blocked one never ran"
        # 2, or 3 on a loaded machine: a job submitted before the core thread
        # first reaches its idle wait starts a thread of its own.
        assert 2 <= pool.threads <= 3
    finally:
        release.set()
        pool.stop()


def test_the_step_pool_never_grows_past_its_limit(release):
    pool = StepPool(core=1, limit=1)
    started, ran = threading.Event(), threading.Event()
    try:
        pool.submit(lambda: (started.set(), release.wait(10)))
        assert started.wait(5)
        pool.submit(ran.set)
        assert pool.threads == 1
        assert not ran.wait(0.2)
        release.set()
        assert ran.wait(5)
    finally:
        release.set()
        pool.stop()


def test_stop_runs_the_jobs_no_thread_was_free_to_take(release):
    """Cleanup jobs queued behind handlers stuck in their own code are run
    by stop() itself, never lost."""
    pool = StepPool(core=1, limit=1)
    started, ran = threading.Event(), threading.Event()
    try:
        pool.submit(lambda: (started.set(), release.wait(10)))
        assert started.wait(5)
        pool.submit(ran.set)
        pool.stop(timeout=0.2)
        assert ran.is_set(), "stop() returned with a queued job never run"
    finally:
        release.set()


def test_a_wsgi_pool_refuses_with_retry_after_5_by_default(comet_wsgi, hub):
    """StreamPool's retry_after defaults to 5 s, as comet.retry_after does."""
    pool = StreamPool(max_parked=1)

    @comet_app(transport="sse", heartbeat=5, pool=pool)
    def events(environ):
        return hub.subscribe("lobby")

    server = comet_wsgi(events)
    with RawStream(server.url + "/") as first:
        assert first.status == 200 and no_cursor(first.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n"
        wait_until(lambda: pool.parked_streams == 1, what="the first stream parked")
        status, headers, body = http_get(server.url + "/")
        assert status == 503 and headers["retry-after"] == "5", (status, headers, body)


def test_a_thread_iterating_a_quiet_subscription_waits_idle_seconds_per_tick():
    """Iterated by a thread, a subscription waits on its channel between
    ticks (one every ``idle`` seconds), never spins."""
    hub = Hub(idle=0.5)
    try:
        sub = hub.subscribe("quiet")
        assert not next(sub)  # caught up, at once
        started = time.monotonic()
        ticks = 0
        while time.monotonic() - started < 1.2:
            assert not next(sub)
            ticks += 1
        assert ticks <= 4, f"{ticks} ticks in 1.2 s with idle=0.5: the subscription does not wait"
        sub.close()
    finally:
        hub.close()


def test_an_event_of_exactly_max_event_bytes_is_published():
    """The limit is inclusive: max_event_bytes bytes pass, one more do not."""
    hub = Hub(max_event_bytes=10)
    try:
        hub.publish("room", "x" * 10)
        with pytest.raises(InvalidEvent):
            hub.publish("room", "x" * 11)
    finally:
        hub.close()


def test_closing_a_subscription_twice_counts_it_closed_once():
    hub = Hub(idle=0.2)
    try:
        closed = []
        first, second = hub.subscribe("room"), hub.subscribe("room")
        first.on_close(lambda: closed.append(1))
        assert not next(first) and not next(second)  # both open (counted)
        assert hub.subscriptions == 2
        first.close()
        first.close()
        assert hub.subscriptions == 1 and closed == [1]
        hub.publish("room", "still here")
        event = next(second)
        assert event and event.data == "still here"
        second.close()
        assert hub.subscriptions == 0
    finally:
        hub.close()


def slow_root(hub, started, finished, delay):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=5)
        def slow(self):
            started.set()
            try:
                time.sleep(delay)  # a slow query before the first item: longer than PRIME_WAIT
                yield "late"
                yield from hub.subscribe("room")
            finally:
                finished.set()

    return Root()


def test_a_first_item_later_than_prime_wait_still_reaches_the_parked_stream(comet_cherrypy, hub):
    started, finished = threading.Event(), threading.Event()
    server = comet_cherrypy(slow_root(hub, started, finished, 0.5), thread_pool=4)
    with RawStream(server.url + "/slow") as raw:
        assert raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n"  # headers after PRIME_WAIT, before the first item
        assert raw.chunk() == b"data: late\n\n"
        wait_until(lambda: hub.subscriptions == 1, what="the handler on to its subscription")
        hub.publish("room", "after")
        assert chunk_past_cursor(raw).endswith(b"data: after\n\n")
    assert finished.wait(5)




def test_stopping_the_server_ends_a_thread_mode_stream_that_waits_on_no_hub(comet_cherrypy):
    """Engine stop ends every open stream: a thread-mode handler that polls
    something of its own (no hub to wake) is stopped at its next tick too."""
    ended = threading.Event()

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=5, mode="thread")
        def ticking(self):
            try:
                while True:
                    time.sleep(0.05)
                    yield None  # nothing yet
            finally:
                ended.set()

    server = comet_cherrypy(Root(), thread_pool=4)
    with RawStream(server.url + "/ticking") as raw:
        assert raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n"
        wait_until(lambda: engine_plugin().pool.open_streams == 1, what="the stream open")
        stopper = threading.Thread(target=server.stop, daemon=True)
        stopper.start()
        # close_all() stops it at its next tick (0.05 s here); 1 s is the documented bound
        assert ended.wait(1.0), "the stream went on after the server stopped"
        stopper.join(10)


def test_a_generator_stream_keeps_flowing_after_thousands_of_empty_steps(comet_cherrypy, hub):
    """A handler that filters its channel wakes for every publish and often
    yields nothing: its steps must not pile up as backpressure."""
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=5)
        def filtered(self):
            for event in hub.subscribe("lobby"):
                if not event or event.data != "skip":  # ticks go on up: the step can hand back
                    yield event

    server = comet_cherrypy(Root(), thread_pool=4)
    with RawStream(server.url + "/filtered") as raw:
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n"
        wait_until(lambda: engine_plugin().pool.parked_streams == 1, what="the stream parked")
        for _ in range(1500):
            hub.publish("lobby", "skip")
            time.sleep(0.001)
        for n in range(3):
            hub.publish("lobby", f"real {n}")
            assert raw.chunk().endswith(f"data: real {n}\n\n".encode())


def test_stopping_the_server_lets_the_step_threads_go(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=5)
        def gen(self):
            yield from hub.subscribe("lobby")

    server = comet_cherrypy(Root(), thread_pool=4)
    with RawStream(server.url + "/gen") as raw:
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n"
        writer = engine_plugin().pool.writer()
        assert writer is not None and writer.steps.threads >= 1
        server.stop()
    wait_until(lambda: writer.steps.threads == 0, what="the step threads gone after the server stopped")





def test_a_parked_long_poll_answers_as_soon_as_an_event_comes(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=20)
        def poll(self, last_event_id=None):
            return hub.subscribe("lobby", last_id=last_event_id)

    server = comet_cherrypy(Root(), thread_pool=4)
    first = hub.publish("lobby", "before")
    answer = []
    poller = threading.Thread(target=lambda: answer.append(http_get(f"{server.url}/poll?last_event_id={first}",
                                                                       timeout=30)), daemon=True)
    poller.start()
    wait_until(lambda: engine_plugin().pool.parked_streams == 1, what="the long-poll parked")
    hub.publish("lobby", "now")
    poller.join(5)
    assert answer, "the long-poll was not answered within 5 s of the event (poll_timeout is 20 s)"
    status, _, body = answer[0]
    assert status == 200 and [e["data"] for e in json.loads(body)["events"]] == ["now"], body


@pytest.fixture
def backed_up(comet_cherrypy):
    """A parked SSE stream whose client has read nothing while 200 KB events
    were published until its socket buffers filled and the writer queued the
    rest: (hub, client socket, writer, stream, events published)."""
    hub = Hub(max_event_bytes=1 << 20)

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def sse(self):
            return hub.subscribe("lobby")

    server = comet_cherrypy(Root(), thread_pool=4)
    parts = urlsplit(server.url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b"GET /sse HTTP/1.1\r\nHost: localhost\r\n\r\n")
            read_until(sock, b":ok\n\n")
            writer = engine_plugin().pool.writer()
            wait_until(lambda: len(writer._streams) == 1, what="the stream parked")
            (stream,) = writer._streams
            published = 0
            while not stream.writing and published < 60:  # at most 12 MB: far beyond any socket buffer
                hub.publish("lobby", "x" * 200_000)
                published += 1
                time.sleep(0.05)  # the writer sends it, and queues what the socket did not take
            assert stream.writing, "no backlog formed"
            yield hub, sock, writer, stream, published
    finally:
        hub.close()


def test_what_a_broadcast_send_does_not_take_is_queued_and_flushed(backed_up):
    """The writer's shared-bytes path: a send() that takes part of the
    bytes (the client reads nothing; its socket buffers fill) queues the
    rest, which arrives once the client reads."""
    hub, sock, _, _, published = backed_up
    hub.publish("lobby", "end")
    data = read_until(sock, b"data: end\n\n", timeout=20)
    assert data.count(b"x") == published * 200_000, f"{data.count(b'x')} of {published * 200_000} bytes"


def test_a_client_that_hangs_up_on_a_parked_stream_counts_as_a_disconnect(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def sse(self):
            return hub.subscribe("lobby")

    server = comet_cherrypy(Root(), thread_pool=4)
    pool = engine_plugin().pool
    before = pool.counters["disconnects"]
    with RawStream(server.url + "/sse") as raw:
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 30\n\n"
        wait_until(lambda: pool.parked_streams == 1, what="the stream parked")
    wait_until(lambda: pool.parked_streams == 0, what="the hang-up seen")
    assert pool.counters["disconnects"] == before + 1


def test_a_handler_busy_in_its_own_code_when_its_client_leaves_is_closed_after_its_step(comet_cherrypy):
    """The writer never closes a generator another thread is running: the
    step in progress is cancelled and closes it when it returns."""
    ended = threading.Event()

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def busy(self):
            try:
                yield "first"
                while True:
                    time.sleep(0.3)  # the handler's own work, inside a step
                    yield "tick"
            finally:
                ended.set()

    server = comet_cherrypy(Root(), thread_pool=4)
    with RawStream(server.url + "/busy") as raw:
        assert raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 30\n\n"
        assert raw.chunk() == b"data: first\n\n"
        wait_until(lambda: engine_plugin().pool.parked_streams == 1, what="the stream parked")
    assert ended.wait(5), "the handler was not closed after its client left"


def test_generators_that_never_wait_are_closed_when_their_clients_hang_up(comet_cherrypy):
    """A handler that floods (never waits on a hub) hands its step back
    every STEP_BUDGET items; a hang-up that lands between a step's end and
    the writer taking it still closes the generator: 20 tries, 20 closed."""
    lock = threading.Lock()
    ended = [0]

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def flood(self):
            try:
                n = 0
                while True:
                    n += 1
                    yield str(n)
            finally:
                with lock:
                    ended[0] += 1

    server = comet_cherrypy(Root(), thread_pool=4)
    for _ in range(20):
        with RawStream(server.url + "/flood") as raw:
            assert raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 30\n\n"
            for _ in range(50):
                raw.chunk()
    wait_until(lambda: ended[0] == 20, timeout=10, what="the 20 handlers closed")


def test_retry_zero_is_a_valid_reconnect_delay_and_negative_is_not(comet_cherrypy, hub):
    """retry: 0 (reconnect at once) is a valid SSE field, end to end."""
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def sse(self):
            return hub.subscribe("lobby")

    server = comet_cherrypy(Root(), thread_pool=4)
    with RawStream(server.url + "/sse") as raw:
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 30\n\n"
        wait_until(lambda: engine_plugin().pool.parked_streams == 1, what="the stream parked")
        event_id = hub.publish("lobby", "now", retry=0)
        assert raw.chunk() == f"id: {event_id}\nretry: 0\ndata: now\n\n".encode()
    with pytest.raises(InvalidEvent):
        hub.publish("lobby", "never", retry=-1)
    from comet import Options

    assert Options(transport="sse", retry=0).retry == 0  # the stream's own retry too
    with pytest.raises(ValueError, match="retry"):
        Options(transport="sse", retry=-1)


def thread_mode_root(hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30, mode="thread")
        def sse(self):
            return hub.subscribe("lobby")

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=5, mode="thread")
        def poll(self, last_event_id=None):
            return hub.subscribe("lobby", last_id=last_event_id)

    return Root()


def test_a_thread_mode_stream_shows_its_channel_in_the_census(comet_cherrypy, hub):
    server = comet_cherrypy(thread_mode_root(hub), thread_pool=4)
    pool = engine_plugin().pool
    with RawStream(server.url + "/sse") as raw:
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 30\n\n"
        wait_until(lambda: pool.census()["open"] == 1, what="the stream open")
        census = pool.census()
        assert census["threaded"] == 1 and census["by_channel"] == {"lobby": 1}, census


def test_a_thread_mode_long_poll_answers_at_most_a_batch_and_counts_its_items(comet_cherrypy):
    hub = Hub(buffer_size=1200)
    try:
        server = comet_cherrypy(thread_mode_root(hub), thread_pool=4)
        pool = engine_plugin().pool
        first = hub.publish("lobby", "0")
        for n in range(1, 1101):
            hub.publish("lobby", str(n))
        before = pool.counters["items"]
        status, _, body = http_get(f"{server.url}/poll?last_event_id={first}")
        events = json.loads(body)["events"]
        assert status == 200 and [e["data"] for e in events] == [str(n) for n in range(1, 1001)]
        assert pool.counters["items"] - before == 1000
    finally:
        hub.close()


def test_a_redis_hub_takes_the_edge_settings_and_counts_unbatched_publishes(comet_redis):
    """maxlen=1 and block=60 are in range; publishes without group commit
    are counted as the batched ones are."""
    from comet.backends.redis import RedisHub

    hub = RedisHub(comet_redis.url, prefix=f"kills-{time.monotonic_ns()}:", maxlen=1, approximate=False, block=60,
                   batch_publishes=False)
    try:
        hub.publish("room", "one")
        last = hub.publish("room", "two")
        assert hub.counters["published"] == 2
        assert [e.data for e in hub.history("room")] == ["two"] and hub.last_id("room") == last
    finally:
        hub.close()


def test_under_another_wsgi_server_a_stream_notices_its_client_left(hub):
    """Where comet cannot take the connection over (here the standard
    library's wsgiref), it finds the socket behind wsgi.input and probes it:
    a client that hangs up on a quiet stream ends it and its handler."""
    import wsgiref.simple_server

    ended = threading.Event()

    @comet_app(transport="sse", heartbeat=5, pool=StreamPool())  # a probe finds it gone, long before a heartbeat would
    def events(environ):
        try:
            yield from hub.subscribe("quiet")
        finally:
            ended.set()

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, events, handler_class=Quiet)
    server.daemon_threads = True
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    serving.start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
        with sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            read_until(sock, b":ok\n\n")
        assert ended.wait(3), "the stream never noticed its client had gone"
    finally:
        server.shutdown()
        server.server_close()
        serving.join(10)


def test_a_slow_first_step_that_ends_just_before_its_stream_parks_is_delivered_once(comet_cherrypy, hub, caplog):
    """The first step outlasts PRIME_WAIT, then ends after the headers are
    decided but before the stream is parked: park() delivers its item, and
    the step itself must leave it to park() (no error, no duplicate)."""
    from comet import pipeline

    gate = threading.Event()

    def hold_until_first_step_done():
        body = cherrypy.serving.response.body
        if isinstance(body, pipeline.Parking):
            gate.set()  # the handler's first step may now finish
            wait_until(lambda: body._outcome is not None, what="the first step's outcome")

    cherrypy.tools.hold_first_step = cherrypy.Tool("before_finalize", hold_until_first_step_done, priority=90)

    class Root:
        @cherrypy.expose
        @cherrypy.tools.hold_first_step()
        @comet(transport="sse", heartbeat=5)
        def late(self):
            assert gate.wait(5)  # only once the request thread has given up waiting (PRIME_WAIT)
            yield "first"
            yield from hub.subscribe("room")

    server = comet_cherrypy(Root(), thread_pool=4)
    caplog.set_level("ERROR", logger="comet")
    with RawStream(server.url + "/late") as raw:
        assert raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n"
        assert raw.chunk() == b"data: first\n\n"
        wait_until(lambda: hub.subscriptions == 1, what="the handler on to its subscription")
        hub.publish("room", "next")
        assert chunk_past_cursor(raw).endswith(b"data: next\n\n")  # "first" came once: the next chunk is the event
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds *thread* has used (Linux: /proc/self/task/<tid>/stat)."""
    import os

    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_writer_goes_idle_once_a_backlog_has_drained(backed_up):
    """A backed-up stream has the writer watch for writability; once the
    backlog is out it must stop, or select() returns at once forever and
    the writer spins a core."""
    hub, sock, writer, stream, _ = backed_up
    hub.publish("lobby", "end")
    read_until(sock, b"data: end\n\n", timeout=20)
    wait_until(lambda: stream.out_size == 0, what="the backlog out")
    before = _thread_cpu(writer._thread)
    time.sleep(1.0)  # an idle second, measured
    busy = _thread_cpu(writer._thread) - before
    assert busy < 0.3, f"the idle writer used {busy:.2f} s of CPU in 1 s"


def test_a_generator_goes_on_after_its_subscription_ends(comet_cherrypy):
    hub = Hub(idle=0.2)

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=5)
        def gen(self):
            yield from hub.subscribe("lobby")
            yield "after the subscription"

    server = comet_cherrypy(Root(), thread_pool=4)
    try:
        with RawStream(server.url + "/gen") as raw:
            assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n"
            wait_until(lambda: engine_plugin().pool.parked_streams == 1 and hub.subscriptions == 1, what="parked")
            hub.publish("lobby", "during")
            assert raw.chunk().endswith(b"data: during\n\n")
            hub.end_subscriptions()
            assert raw.chunk() == b"data: after the subscription\n\n"
            assert raw.chunk() == b""  # then the handler returned: the response ends
    finally:
        hub.close()


def test_a_long_poll_generator_answers_with_everything_one_step_yields(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=5)
        def poll(self, last_event_id=None):
            yield "a"
            yield "b"
            yield "c"
            yield from hub.subscribe("lobby", last_id=last_event_id)

    server = comet_cherrypy(Root(), thread_pool=4)
    status, _, body = http_get(server.url + "/poll", timeout=10)
    assert status == 200 and [e["data"] for e in json.loads(body)["events"]] == ["a", "b", "c"], body


def test_a_generator_delegating_at_any_depth_is_fed_without_steps(comet_cherrypy, hub):
    """yield from a generator that does yield from sub: the writer reads the
    subscription itself (like a returned one); publishing runs no step."""
    def relay(room):
        yield from hub.subscribe(room)

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=5)
        def nested(self):
            yield "hello"
            yield from relay("lobby")

    server = comet_cherrypy(Root(), thread_pool=4)
    raws = [RawStream(server.url + "/nested") for _ in range(5)]
    try:
        for raw in raws:
            assert raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 5\n\n" and raw.chunk() == b"data: hello\n\n"
        wait_until(lambda: hub.subscriptions == 5, what="five streams on the hub")
        writer = engine_plugin().pool.writer()
        wait_until(lambda: all(s.direct for s in writer._streams), what="the writer reading the subscriptions itself")
        submitted = []
        original = writer.steps.submit
        writer.steps.submit = lambda job: (submitted.append(job), original(job))[1]
        try:
            for n in range(20):
                hub.publish("lobby", f"e{n}")
            for raw in raws:
                data = b""
                while b"data: e19\n\n" not in data:
                    data += raw.chunk()
        finally:
            writer.steps.submit = original
        assert submitted == [], f"{len(submitted)} steps for 20 events on 5 delegating streams"
    finally:
        for raw in raws:
            raw.close()


def test_when_close_all_returns_every_parked_client_has_been_answered(comet_cherrypy, hub):
    """The pool's close_all() (engine stop) returns once the writer has
    ended every stream: each client already has its terminating chunk and
    the close."""
    import select

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=30)
        def sse(self):
            return hub.subscribe("lobby")

    server = comet_cherrypy(Root(), thread_pool=4, global_config={"server.socket_queue_size": 512})
    raws = [RawStream(server.url + "/sse") for _ in range(200)]
    try:
        for raw in raws:
            assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 30\n\n"
        wait_until(lambda: engine_plugin().pool.parked_streams == 200, what="200 parked")
        engine_plugin().pool.close_all()
        readable, _, _ = select.select([raw.sock for raw in raws], [], [], 0)  # no waiting: it is done or not
        assert len(readable) == 200, f"{200 - len(readable)} clients not yet answered when close_all() returned"
        for raw in raws:
            assert raw.chunk() == b""  # the terminating chunk: a clean end, not a cut
    finally:
        for raw in raws:
            raw.close()


def test_a_thread_mode_long_poll_of_plain_items_answers_them(comet_cherrypy, hub):
    """Plain items (not hub events) in a thread-mode long-poll: answered,
    with the hub's cursor after them, not a crash on their missing id."""
    class Root:
        @cherrypy.expose
        @comet(transport="longpoll", mode="thread", poll_timeout=2)
        def poll(self, last_event_id=None):
            yield "plain"
            yield {"n": 1}
            yield from hub.subscribe("lobby", last_id=last_event_id)

    server = comet_cherrypy(Root(), thread_pool=4)
    status, _, body = http_get(server.url + "/poll", timeout=10)
    doc = json.loads(body)
    assert status == 200 and [e["data"] for e in doc["events"]] == ["plain", {"n": 1}], body


def test_an_expired_event_is_let_go_at_the_next_publish():
    """With ``max_age`` a callable there is no fast sweeper (it runs every
    10 s): a busy channel must still not hold events past their age, so each
    publish drops the expired ones it finds (memory stays bounded by max_age,
    not by the sweeper's period)."""
    import gc
    import tracemalloc

    hub = Hub(max_age=lambda channel: 0.2)
    try:
        hub.publish("room", "warm")
        tracemalloc.start()
        try:
            hub.publish("room", "x" * 1_000_000)
            time.sleep(0.3)   # past max_age: the point of the test is the event's age
            hub.publish("room", "small")
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < 500_000, f"{held} bytes still held after the 1 MB event expired"
    finally:
        hub.close()


def test_a_channel_left_as_its_first_event_lands_keeps_the_event():
    """A channel nobody published to is forgotten when its last subscriber
    leaves, unless an event lands meanwhile: leaving and publishing race
    here many times; an event lost to that race never comes back."""
    import sys

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race is a few bytecodes wide
    hub = Hub()
    lost, rounds, deadline = [], 0, time.monotonic() + 8.0
    try:
        while rounds < 20_000 and time.monotonic() < deadline:
            name = f"c{rounds}"
            sub = hub.subscribe(name)
            both = threading.Barrier(2, timeout=5)

            def publish(name=name, both=both):
                both.wait()
                hub.publish(name, "first")

            publisher = threading.Thread(target=publish)
            publisher.start()
            both.wait()
            sub.close()
            publisher.join(5)
            if not hub.history(name):
                lost.append(name)
            rounds += 1
    finally:
        sys.setswitchinterval(switch)
        hub.close()
    assert rounds > 1_000 and not lost, f"{len(lost)} of {rounds} first events lost"


def test_initial_items_come_before_the_gap_and_its_snapshot():
    hub = Hub(buffer_size=2)
    try:
        hub.snapshot("room", lambda channel: {"players": 2})
        ids = [hub.publish("room", n) for n in range(4)]
        sub = hub.subscribe("room", last_id=ids[0], initial=["hello"])
        got = sub.take()
        assert got[0] == "hello"
        assert [(e.name, e.data) for e in got[1:3]] == [("comet.gap", got[1].data), ("comet.snapshot", {"players": 2})]
        assert got[2].id == ids[-1]
        sub.close()
    finally:
        hub.close()


def test_a_thread_iterating_a_subscription_sees_each_event_without_waiting_its_idle_tick():
    """Ping-pong between a publisher and a thread iterating a subscription:
    each publish lands just as the thread is about to wait. The wait re-checks
    under the channel's lock, so no event waits for the next idle tick."""
    import sys

    from comet import Event

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    hub = Hub(idle=10)
    sub = hub.subscribe("pp")
    got = threading.Event()

    def consume():
        for item in sub:
            if isinstance(item, Event):
                got.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    worst, rounds, deadline = 0.0, 0, time.monotonic() + 6.0
    try:
        while rounds < 2_000 and time.monotonic() < deadline:
            got.clear()
            sent = time.monotonic()
            hub.publish("pp", rounds)
            assert got.wait(15), "an event never reached the iterating thread"
            worst = max(worst, time.monotonic() - sent)
            rounds += 1
    finally:
        sys.setswitchinterval(switch)
        sub.close()
        hub.close()
        consumer.join(5)
    assert rounds > 100 and worst < 5.0, f"an event waited {worst:.1f} s (idle is 10 s) in {rounds} rounds"


def test_a_generator_whose_first_step_is_quick_answers_without_waiting_prime_wait(comet_cherrypy):
    """The request thread waits up to PRIME_WAIT (0.1 s) for a generator's
    first step, and no longer than that step takes: the quickest of ten
    streams answers well under it (the minimum shrugs off a loaded machine).
    Ten URLs, one request each: a URL whose first steps are quick learns to
    run them on the request thread, without the wait."""
    from comet.pipeline import PRIME_WAIT

    def quick():
        @cherrypy.expose
        @comet(transport="chunked", heartbeat=30)
        def handler(self):
            yield "first\n"
        return handler

    Root = type("Root", (), {f"q{n}": quick() for n in range(10)})
    server = comet_cherrypy(Root())
    times = []
    for n in range(10):
        started = time.monotonic()
        status, _, body = http_get(f"{server.url}/q{n}")
        times.append(time.monotonic() - started)
        assert status == 200 and body.endswith(b"first\n")
    assert min(times) < PRIME_WAIT * 0.8, f"the quickest first stream took {min(times):.3f} s"


def test_a_first_step_that_fails_after_prime_wait_ends_the_stream_and_says_why(comet_cherrypy, caplog):
    """A generator whose first step outlasts PRIME_WAIT (the headers went
    first) and then raises: the stream ends with nothing of the exception in
    it, and the failure is logged as a handler's, not as an item."""
    class Root:
        @cherrypy.expose
        @comet(transport="chunked", heartbeat=30)
        def late_failure(self):
            time.sleep(0.3)  # a slow query before the first item: longer than PRIME_WAIT
            raise RuntimeError("the database is down")
            yield "never"

    server = comet_cherrypy(Root())
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(f"GET /late_failure HTTP/1.1\r\nHost: {parts.hostname}\r\n\r\n".encode())
        data = read_until(sock, None, timeout=10)  # the server ends it (cut short: the stream failed)
    assert data.startswith(b"HTTP/1.1 200") and b"database" not in data, data
    wait_until(lambda: "failed before its first item" in caplog.text, timeout=5, what="the failure logged")
