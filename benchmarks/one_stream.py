"""Events per second through one SSE stream (thread mode), end to end.

    .venv/bin/python benchmarks/one_stream.py [--events N]

A publisher thread publishes N small events into a Hub as fast as it can;
one client reads the stream over a raw loopback socket and counts complete
events. Prints one JSON line. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import cherrypy

from comet import Hub, comet
from comet.testing import CherryPyServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    hub = Hub(buffer_size=max(1000, args.events))

    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self, last_event_id=None):
            yield from hub.subscribe("bench", last_id=last_event_id)

    with CherryPyServer(Root(), thread_pool=4) as server:
        host, port = server.url.split("//")[1].split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b":ok\n\n" not in buf:
            buf += sock.recv(65536)
        payload = "x" * 32
        start = time.perf_counter()
        publisher = threading.Thread(target=lambda: [hub.publish("bench", payload) for _ in range(args.events)])
        publisher.start()
        seen, deadline = 0, time.monotonic() + 120
        while seen < args.events and time.monotonic() < deadline:
            data = sock.recv(1 << 20)
            if not data:
                break
            seen += data.count(b"\n\n")
        elapsed = time.perf_counter() - start
        publisher.join()
        sock.close()
    print(json.dumps({"bench": "one_stream_sse", "mode": "thread", "events": args.events, "received": seen,
                      "seconds": round(elapsed, 3), "events_per_s": round(seen / elapsed)}))


if __name__ == "__main__":
    main()
