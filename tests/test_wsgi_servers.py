"""Other WSGI servers, for real: waitress and gunicorn (gthread, with
comet.gunicorn_conf) serve the docs' WSGI example (docs/examples/
wsgi_app.py) in a process of their own; pages keep answering while streams
hold every thread comet lets them, the next stream gets a 503, and SIGTERM
ends the server within 2 s. gunicorn's sync worker is refused with a 503
that says what to run; a multi-process server with an in-memory hub gets a
warning in its log."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from comet.testing import AppProcess, StreamClient, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
# comet from this checkout, the example by its module name.
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLES)])}


def serve(*args: str, ready: str) -> AppProcess:
    return AppProcess(list(args), env=ENV, cwd=EXAMPLES, ready=ready).start(timeout=30)


@pytest.fixture
def started():
    servers: list[AppProcess] = []
    yield servers
    for server in servers:
        server.close()


def waitress(started, threads: int = 4) -> AppProcess:
    server = serve("-m", "waitress", "--listen=127.0.0.1:{port}", f"--threads={threads}", "wsgi_app:app",
                   ready="Serving on")
    started.append(server)
    return server


def gunicorn(started, *extra: str) -> AppProcess:
    server = serve("-m", "gunicorn", "-b", "127.0.0.1:{port}", *extra, "wsgi_app:app", ready="Booting worker")
    started.append(server)
    return server


def sigterm_seconds(server: AppProcess) -> float:
    assert server.process is not None
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    server.process = None
    return time.monotonic() - began


def fill_check_and_stop(server: AppProcess, cap: int) -> float:
    """*cap* streams open and live, pages still answer, one more is a 503;
    then SIGTERM with the streams open: how long the server took to exit."""
    clients = [StreamClient(server.url + "/events").open() for _ in range(cap)]
    try:
        for _ in range(3):  # more pages than the threads comet left
            status, _, body = http_get(server.url + "/", deadline=5)
            assert status == 200 and b"a page" in body
        status, headers, body = http_get(server.url + "/events", deadline=5)
        assert status == 503 and "retry-after" in headers, body
        event_id = http_get(server.url + "/say?text=hi", deadline=5)[2].decode()
        for client in clients:
            [event] = client.wait_for(1)
            assert (event.id, event.data) == (event_id, "hi")
        return sigterm_seconds(server)
    finally:
        for client in clients:
            client.close()


def test_waitress_keeps_pages_answering_and_stops_at_once(started):
    server = waitress(started, threads=4)
    took = fill_check_and_stop(server, cap=2)  # 4 threads, 2 kept for pages
    assert took < 2, server.log()[-2000:]


def test_gunicorn_gthread_keeps_pages_answering_and_stops_at_once(started):
    server = gunicorn(started, "-c", "python:comet.gunicorn_conf", "--threads", "6")
    took = fill_check_and_stop(server, cap=4)  # 6 threads, 2 kept for pages
    assert took < 2, server.log()[-2000:]


def test_gunicorn_sync_worker_is_refused_with_what_to_do(started):
    server = gunicorn(started)  # the default: sync, one request at a time
    status, headers, body = http_get(server.url + "/events", deadline=5)
    assert status == 503
    assert b"gunicorn -k gthread" in body and b"comet.gunicorn_conf" in body
    assert http_get(server.url + "/", deadline=5)[0] == 200  # the worker is free


def test_gunicorn_gthread_without_comets_config_says_what_is_missing(started):
    # (--graceful-timeout 1: without comet's hook, SIGTERM at the end waits that long.)
    server = gunicorn(started, "-k", "gthread", "--threads", "4", "--graceful-timeout", "1")
    with StreamClient(server.url + "/events"):
        wait_until(lambda: "without comet.gunicorn_conf" in server.log(), what="the warning in gunicorn's log")


def test_gunicorn_workers_with_an_in_memory_hub_warn(started):
    server = gunicorn(started, "-c", "python:comet.gunicorn_conf", "-w", "2")
    with StreamClient(server.url + "/events"):
        wait_until(lambda: "RedisHub" in server.log(), what="the warning in gunicorn's log")
    assert "each process sees only the events published in it" in server.log()


@pytest.mark.parametrize("target, page", [("flask_app:app", b"a Flask page"), ("django_app:application", b"a Django page")])
def test_flask_and_django_recipes(started, target, page):
    server = serve("-m", "waitress", "--listen=127.0.0.1:{port}", "--threads=4", target, ready="Serving on")
    started.append(server)
    with StreamClient(server.url + "/events") as client:
        status, _, body = http_get(server.url + "/", deadline=5)
        assert status == 200 and page in body
        event_id = http_get(server.url + "/say?text=hi", deadline=5)[2].decode()
        [event] = client.wait_for(1)
        assert (event.id, event.data) == (event_id, "hi")
