"""Many ``<img>`` viewers of one live image: N multipart streams on one hub
channel in one server process, all parked.

    .venv/bin/python -m benchmarks.multipart_viewers [--viewers 200] [--frames 20] [--size 20000]

Starts the server (CherryPy, ``@comet(transport="multipart")`` returning
``hub.subscribe("cam")``) in its own process, opens the viewers from this one
(raw sockets, as an ``<img>`` asks), and reports:

* that every viewer is parked (the writer thread's streams), and the server's
  threads;
* server RSS per viewer: VmRSS with the viewers connected minus before, over
  N; then again once a frame has gone to all of them (each stream keeps a
  reference to the last frame, for its heartbeat, not a copy);
* with ``--compare-sse``, the RSS per viewer of SSE streams on the same
  channel (no frames), for comparison;
* per frame (``--size`` bytes, published through the hub): the time from
  ``publish()`` to the last viewer having the whole frame (p50, max). Timing
  numbers are only meaningful on a quiet machine.

Talks to 127.0.0.1 only; the server process is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- the server (runs in its own process) -------------------------------------------


def serve(port: int) -> None:
    import cherrypy

    from comet import Hub, Part, comet
    from comet.cherrypy_tool import engine_plugin

    hub = Hub(buffer_size=10)

    class Root:
        @cherrypy.expose
        @comet(transport="multipart")
        def cam(self):
            return hub.subscribe("cam")

        @cherrypy.expose
        @comet(transport="sse")
        def events(self):  # the same channel as SSE, for --compare-sse
            return hub.subscribe("cam")

        @cherrypy.expose
        def publish(self, n, size):
            # a JPEG-shaped frame ending in a marker the viewers look for
            marker = b"<frame %08d>" % int(n)
            body = b"\xff\xd8" + b"\x5a" * (int(size) - len(marker) - 4) + marker + b"\xff\xd9"
            started = time.monotonic()
            hub.publish("cam", Part(body, "image/jpeg"))
            return json.dumps({"published": started})

        @cherrypy.expose
        def stats(self):
            pool = engine_plugin().pool
            return json.dumps({"parked": pool.parked_streams, "open": pool.open_streams,
                               "threads": threading.active_count(), "now": time.monotonic()})

    cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": port,
                            "server.thread_pool": 10, "log.screen": False, "engine.autoreload.on": False,
                            "checker.on": False})
    cherrypy.tree.mount(Root(), "/")
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    cherrypy.engine.block()


# -- the viewers (this process) ------------------------------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def get(port: int, path: str) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(viewers: int, frames: int, size: int, path: str = "/cam") -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.multipart_viewers", "--serve", str(port)], cwd=ROOT)
    socks: list[socket.socket] = []
    try:
        wait_for(lambda: _up(port), 30, "server up")
        before = rss_kb(server.pid)
        for _ in range(viewers):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\nAccept: image/*\r\n\r\n" % path.encode())
            socks.append(sock)
        selector = selectors.DefaultSelector()
        tails = {}
        for sock in socks:
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            tails[sock] = b""
        wait_for(lambda: get(port, "/stats")["parked"] >= viewers, 60, f"{viewers} parked")
        time.sleep(1)  # let the allocator settle before reading RSS
        stats = get(port, "/stats")
        connected = rss_kb(server.pid)
        delays = []
        after_frame = connected
        for n in range(frames):
            marker = b"<frame %08d>" % n
            published = get(port, f"/publish?n={n}&size={size}")["published"]
            pending = set(socks)
            last = published
            deadline = time.monotonic() + 30
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"frame {n}: {len(pending)} viewers never got it")
                for key, _ in selector.select(1):
                    sock = key.fileobj
                    data = sock.recv(1 << 20)
                    if not data:
                        raise ConnectionError("a viewer was disconnected")
                    seen, tails[sock] = tails[sock] + data, (tails[sock] + data)[-256:]  # a marker may span reads
                    if sock in pending and marker in seen:
                        pending.discard(sock)
                        last = time.monotonic()
            # the server's monotonic clock is this machine's: CLOCK_MONOTONIC is system-wide
            delays.append(last - published)
            if n == 0:
                time.sleep(1)
                after_frame = rss_kb(server.pid)
        return {
            "viewers": viewers, "parked": stats["parked"], "server_threads": stats["threads"],
            "rss_before_kb": before, "rss_connected_kb": connected, "rss_after_frame_kb": after_frame,
            "kb_per_viewer": round((connected - before) / viewers, 2),
            "kb_per_viewer_after_a_frame": round((after_frame - before) / viewers, 2),
            "frame_bytes": size, "frames": frames,
            "last_viewer_ms_p50": round(statistics.median(delays) * 1000, 1) if delays else None,
            "last_viewer_ms_max": round(max(delays) * 1000, 1) if delays else None,
        }
    finally:
        for sock in socks:
            sock.close()
        server.terminate()
        server.wait(30)


def _up(port: int) -> bool:
    try:
        get(port, "/stats")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--size", type=int, default=20000, help="bytes per frame")
    parser.add_argument("--compare-sse", action="store_true", help="also: RSS per SSE viewer of the same channel")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    runs = [("multipart", run(args.viewers, args.frames, args.size))]
    if args.compare_sse:
        runs.append(("sse", run(args.viewers, 0, args.size, "/events")))
    for name, result in runs:
        print(name)
        for key, value in result.items():
            print(f"{key:>30}  {value}")
        print(json.dumps({"transport": name, **result}))


if __name__ == "__main__":
    main()
