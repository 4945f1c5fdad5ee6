"""The app of tests/test_vanished_clients.py: one stream of each way in,
with a 1 s heartbeat, for clients that vanish without a FIN.

* ``/parked?name=``: a generator, parked on the writer (the second request
  within a second is served at accept, :mod:`comet.direct`), a presence
  member of "room";
* ``/threaded``: a generator in thread mode (a worker thread writes), on
  "threads";
* ``/fast/{x}``: a fast route (:mod:`comet.fastpath`) on "fast";
* ``/full``: a parked generator on "full", whose client reads nothing:
  ``/publish?channel=full&size=&count=`` fills its socket's buffers;
* ``/poll?last_event_id=``: a parked long-poll on "polls" (30 s
  ``poll_timeout``: nothing in flight while it waits, only keepalive can
  notice its client gone); ``/last_id?channel=``: a cursor;
* ``/members``: ``hub.members("room")`` as JSON; ``/finals``: when each
  handler's ``finally`` ran (``time.monotonic()``, the same clock in every
  process of a machine), by path and name;
* ``/comet/stats/json``: comet's stats.

Run: ``python tests/apps/vanish_app.py --host 10.231.0.1 --port 8080``. It
prints :data:`READY` once the HTTP server listens; SIGTERM exits through
CherryPy's signal handler.
"""
from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
import traceback
from typing import Any

import cherrypy

from comet.stats import mount as mount_stats
from comet import Hub, comet
from comet.cherrypy_tool import engine_plugin

#: Printed (flushed) once the engine has started and the port listens.
READY = "vanish_app ready"
HEARTBEAT = 1.0


class Root:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._lock = threading.Lock()
        self._finals: dict[str, list[float]] = collections.defaultdict(list)

    def _ended(self, what: str) -> None:
        with self._lock:
            self._finals[what].append(time.monotonic())

    @cherrypy.expose
    @comet(transport="sse", heartbeat=HEARTBEAT)
    def parked(self, name: str = "ann") -> Any:
        try:
            yield "hello"
            yield from self.hub.subscribe("room", member=name)
        finally:
            self._ended(f"parked {name}")

    @cherrypy.expose
    @comet(transport="chunked", heartbeat=HEARTBEAT, mode="thread")
    def threaded(self) -> Any:
        try:
            yield "hello"
            yield from self.hub.subscribe("threads")  # the hub's idle tick: 1 s
        finally:
            self._ended("threaded")

    @cherrypy.expose
    @comet(transport="sse", heartbeat=HEARTBEAT)
    def full(self) -> Any:
        try:
            yield "hello"
            yield from self.hub.subscribe("full")
        finally:
            self._ended("full")

    @cherrypy.expose
    @comet(transport="longpoll", heartbeat=HEARTBEAT, poll_timeout=30)
    def poll(self, last_event_id: str | None = None) -> Any:
        try:
            yield from self.hub.subscribe("polls", last_id=last_event_id)
        finally:
            self._ended("poll")

    @cherrypy.expose
    def last_id(self, channel: str) -> str:
        return self.hub.last_id(channel)

    @cherrypy.expose
    def publish(self, channel: str, size: str = "100", count: str = "1") -> str:
        for _ in range(int(count)):
            last = self.hub.publish(channel, "x" * int(size))
        return last

    @cherrypy.expose
    def stacks(self) -> str:
        """Where every thread is (a stuck test prints it)."""
        frames = sys._current_frames()
        return "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                         for t in threading.enumerate() if t.ident in frames)

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def members(self) -> dict[str, int]:
        return self.hub.members("room")

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def finals(self) -> dict[str, list[float]]:
        with self._lock:
            return dict(self._finals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tests/test_vanished_clients.py's app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    cherrypy.config.update({
        "server.socket_host": args.host,
        "server.socket_port": args.port,
        "engine.autoreload.on": False,
        "log.screen": False,
        "checker.on": False,
    })
    hub = engine_plugin().add_hub(Hub(presence_grace=1.0))
    engine_plugin().route("/fast/{x}", hub, channel="fast", heartbeat=HEARTBEAT)
    root = Root(hub)
    mount_stats(root)
    # After the HTTP server's start (priority 75): the port listens.
    cherrypy.engine.subscribe("start", lambda: print(READY, flush=True), priority=90)
    cherrypy.quickstart(root, "/", {"/": {}})


if __name__ == "__main__":
    main()
