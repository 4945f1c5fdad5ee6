"""The app of tests/test_one_model.py: generator handlers that wait on a hub
beside generators that block in their own code, on CherryPy's defaults.

* ``/events``: a greeting, then ``yield from`` the hub's "lobby" channel
  (resuming after ``Last-Event-ID`` when the client sends one);
* ``/sleepy?n=``: ``time.sleep(2)``, then a tick, forever;
* ``/publish?seq=&ts=``: publishes ``"<seq> <ts>"`` to "lobby";
* ``/``: a small page; ``/last_id`` and ``/subscriptions``: the hub's state,
  for the test to start from.

``server.thread_pool`` is left at CherryPy's default (10). The listen
backlog is raised from CherryPy's 5 to 4096, so a storm of a thousand
connects queues in the kernel instead of waiting on SYN retries.

Run: ``python tests/apps/one_model_app.py --port 8080``. It prints
:data:`READY` once the HTTP server listens; SIGTERM exits through
CherryPy's signal handler (``engine.exit()``), which ends every stream.
"""
from __future__ import annotations

import argparse
import time

import cherrypy

from comet import Hub, comet

#: Printed (flushed) once the engine has started and the port listens.
READY = "one_model_app ready"


class Root:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @cherrypy.expose
    def index(self) -> str:
        return "<!doctype html><title>one model</title><p>one model</p>"

    @cherrypy.expose
    @comet(transport="sse")
    def events(self, last_event_id=None):
        yield "hello"
        yield from self.hub.subscribe("lobby", last_id=last_event_id)

    @cherrypy.expose
    @comet(transport="sse")
    def sleepy(self, n="0"):
        while True:
            time.sleep(2)
            yield f"tick {n} {time.time()}"

    @cherrypy.expose
    def publish(self, seq: str, ts: str) -> str:
        return self.hub.publish("lobby", f"{seq} {ts}")

    @cherrypy.expose
    def last_id(self) -> str:
        return self.hub.last_id("lobby")

    @cherrypy.expose
    def subscriptions(self) -> str:
        return str(self.hub.subscriptions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tests/test_one_model.py's app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    cherrypy.config.update({
        "server.socket_host": args.host,
        "server.socket_port": args.port,
        "server.socket_queue_size": 4096,
        "engine.autoreload.on": False,
        "log.screen": False,
        "checker.on": False,
    })
    # After the HTTP server's start (priority 75): the port listens.
    cherrypy.engine.subscribe("start", lambda: print(READY, flush=True), priority=90)
    cherrypy.quickstart(Root(Hub()), "/")


if __name__ == "__main__":
    main()
