"""A closed stream is freed at once: the server's memory stays flat under
connect/disconnect churn.

A stream that ended used to stay in the writer's timer heap until its next
heartbeat came due (up to 15 s, about 1.5 KB each), so a crowd of clients
that connect and leave grew the server by tens of MB before it settled.

The server runs in its own process (this file is also its app: ``python
tests/test_rss_cycles.py --port N``), so the client's memory is not
counted: parked SSE streams on a hub channel, the default 15 s heartbeat,
a few of them held open for the whole run. Client threads here open and
drop raw-socket streams, each read up to its ``:ok`` (it is parked, its
heartbeat scheduled) before it closes. The server's VmRSS is read after a
warm-up and right after the last cycle, before any heartbeat would have
come due.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from comet.testing import AppProcess, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
READY = "rss_cycles app ready"
WARM_UP = 2_000
CYCLES = 20_000
CLIENT_THREADS = 4
HELD = 20  # streams open for the whole run
BOUND_MB = 15.0


def main() -> None:
    """The app: ``/events`` (a parked SSE stream on the hub's one channel)
    and comet's stats."""
    import argparse

    import cherrypy

    from comet import Hub, comet
    from comet.stats import mount

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    hub = Hub(idle=0.2)

    class Root:
        @cherrypy.expose
        @comet(transport="sse")  # the default heartbeat: 15 s
        def events(self):
            return hub.subscribe("quiet")

    root = Root()
    mount(root)
    cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": port, "engine.autoreload.on": False,
                            "log.screen": False, "checker.on": False, "comet.max_parked": 1000})
    cherrypy.tree.mount(root, "")
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    print(READY, flush=True)
    cherrypy.engine.block()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def open_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = b""
    while b":ok" not in got:  # parked, its heartbeat scheduled
        data = sock.recv(4096)
        if not data:
            raise AssertionError(f"the stream closed before its first bytes: {got!r}")
        got += data
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return sock


def churn(port: int, cycles: int) -> None:
    """*cycles* streams opened and dropped, from CLIENT_THREADS threads."""
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(n):
                open_stream(port).close()
        except BaseException as exc:  # (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(cycles // CLIENT_THREADS,)) for _ in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a client thread is stuck"
    if errors:
        raise errors[0]


def stats(url: str) -> dict:
    status, _, body = http_get(url + "/comet/stats/json", timeout=10)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.slow
def test_connect_disconnect_churn_leaves_the_server_rss_flat():
    # (PYTHONPATH: the app runs this tree's comet, whatever the venv has installed)
    app = AppProcess([__file__, "--port", "{port}"], cwd=ROOT, ready=READY, env={"PYTHONPATH": str(ROOT)})
    held: list[socket.socket] = []
    try:
        app.start()
        assert app.process is not None
        pid = app.process.pid
        held = [open_stream(app.port) for _ in range(HELD)]
        churn(app.port, WARM_UP)
        before, opened = rss_mb(pid), stats(app.url)["opened"]
        started = time.monotonic()
        churn(app.port, CYCLES)
        took = time.monotonic() - started
        after = rss_mb(pid)
        # (Every cycle was a stream, parked and closed: the rest are the held ones.)
        assert stats(app.url)["opened"] - opened == CYCLES
        wait_until(lambda: stats(app.url)["streams"]["open"] == HELD, timeout=10, what="the churned streams closed")
        print(f"{CYCLES} cycles in {took:.1f} s: server RSS {before:.1f} -> {after:.1f} MB ({after - before:+.1f} MB)")
        assert after - before <= BOUND_MB, f"RSS grew by {after - before:.1f} MB over {CYCLES} cycles"
    finally:
        for sock in held:
            sock.close()
        app.close()


if __name__ == "__main__":
    main()
