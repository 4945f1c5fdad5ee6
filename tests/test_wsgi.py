"""Plain WSGI (no CherryPy) under cheroot's WSGI server, and process-level
shutdown of a quickstart app."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from comet.stream import StreamPool
from comet.testing import StreamClient, http_get, wait_until
from comet.wsgi import comet_app

from conftest import RawStream, no_cursor


@pytest.fixture
def wsgi_app(hub, tracker):
    pool = StreamPool(max_streams=3, max_parked=3, retry_after=2)  # generators are parked under cheroot

    @comet_app(transport="sse", heartbeat=0.5, pool=pool)
    def events(environ):
        yield from tracker.track(hub.subscribe("lobby", last_id=environ["comet.last_event_id"]))

    @comet_app(transport="longpoll", poll_timeout=1, pool=pool)
    def poll(environ):
        yield from hub.subscribe("lobby", last_id=environ["comet.last_event_id"])

    def router(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/events":
            return events(environ, start_response)
        if path == "/poll":
            return poll(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return [b"page"]

    router.pool = pool
    return router


def test_wsgi_sse_bytes_and_delivery(comet_wsgi, wsgi_app, hub):
    server = comet_wsgi(wsgi_app)
    with RawStream(server.url + "/events") as raw:
        assert raw.status == 200 and raw.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert raw.headers["x-accel-buffering"] == "no" and raw.headers["cache-control"] == "no-cache"
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"  # the preamble, the heartbeat's announcement
        event_id = hub.publish("lobby", "hello", event="greet")
        assert raw.chunk() == f"id: {event_id}\nevent: greet\ndata: hello\n\n".encode()
        assert raw.chunk() == b"event: comet.heartbeat\ndata: 0.5\n\n"  # heartbeat


def test_wsgi_resume_and_longpoll(comet_wsgi, wsgi_app, hub):
    server = comet_wsgi(wsgi_app)
    ids = [hub.publish("lobby", n) for n in range(3)]
    with StreamClient(server.url + "/events", last_event_id=ids[0]) as client:
        assert [e.data for e in client.wait_for(2)] == ["1", "2"]
    with StreamClient(server.url + "/poll", transport="longpoll", last_event_id=ids[1]) as poller:
        assert [e.data for e in poller.wait_for(1)] == [2]
        hub.publish("lobby", "later")
        assert [e.data for e in poller.wait_for(2)][-1] == "later"


def test_wsgi_bad_input_and_admission(comet_wsgi, wsgi_app, hub):
    server = comet_wsgi(wsgi_app)
    status, headers, body = http_get(server.url + "/events", headers={"Last-Event-ID": "nope"})
    assert status == 400 and b"malformed event id" in body and headers["content-type"].startswith("text/plain")
    status, _, body = http_get(server.url + "/poll?last_event_id=%0D%0A")
    assert status == 400 and b"CR, LF or NUL" in body
    clients = [StreamClient(server.url + "/events").open() for _ in range(3)]
    try:
        status, headers, body = http_get(server.url + "/events")
        assert status == 503 and headers["retry-after"] == "2" and b"too many open streams" in body
        assert http_get(server.url + "/")[2] == b"page"
    finally:
        for c in clients:
            c.close()


def test_wsgi_disconnect_and_shutdown_release_everything(comet_wsgi, wsgi_app, hub, tracker):
    server = comet_wsgi(wsgi_app)
    c = StreamClient(server.url + "/events").open()
    wait_until(lambda: hub.subscriptions == 1, what="subscribed")
    c.close()
    wait_until(lambda: tracker.open == 0 and hub.subscriptions == 0, what="released after disconnect")
    clients = [StreamClient(server.url + "/events").open() for _ in range(3)]
    wait_until(lambda: hub.subscriptions == 3, what="3 open")
    elapsed = server.stop()
    assert elapsed < 2.0, f"stop took {elapsed:.2f}s"
    for client in clients:
        client.wait_closed(5)
        client.close()
    assert tracker.open == 0 and hub.subscriptions == 0 and wsgi_app.pool.open_streams == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_quickstart_app_exits_fast_on_signal_with_100_streams(sig):
    """`cherrypy.quickstart` (the demo) with 100 idle SSE streams exits on
    SIGTERM / SIGINT in under 2 s: engine.exit() ends every stream first."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # An ignored SIGINT is inherited across exec (pytest started in the
    # background by a script, "nohup ... &" say), and Python then installs
    # no KeyboardInterrupt handler: the child puts it back itself, then
    # runs the demo as "-m comet.demo" would.
    main = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('comet.demo', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", main, "--port", str(port), "--threads", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    clients = []
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return http_get(url + "/", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(up, timeout=20, interval=0.1, what="demo server up")
        for _ in range(100):
            clients.append(StreamClient(url + "/events").open())
        started = time.monotonic()
        proc.send_signal(sig)
        proc.wait(10)
        elapsed = time.monotonic() - started
        print(f"exit on signal {sig} with 100 streams: {elapsed:.3f}s")
        assert elapsed < 2.0, f"exit took {elapsed:.2f}s"
        assert proc.returncode == 0, proc.stdout.read().decode()[-2000:]
        for client in clients:
            client.wait_closed(5)
    finally:
        for client in clients:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
