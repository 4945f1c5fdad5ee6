"""comet under test: `python -m benchmarks.peers.comet_app PORT thread|parked|generator|fast [STREAMS [REDIS_URL]]`.

multi3: a handler that returns a subscription to three channels
(b, c, d); the others take ``?ch=`` (default b).

thread: a @comet handler that keeps its thread (mode="thread"); parked: a
handler that returns its subscription; generator: the natural handler, a
generator that greets and then ``yield from``\ s the subscription, on
CherryPy's default thread pool (10); fast: /events is a fast route
(comet.fastpath), answered where cheroot accepts the connection.

With REDIS_URL the hub is a RedisHub (benchmarks/scaleout.py runs several
of these behind nginx).

Environment (benchmarks/idle_streams.py): BENCH_HEARTBEAT, the streams'
heartbeat in seconds (comet's default, 15, when unset); BENCH_NO_WATCH_PEER=1,
no comet.liveness socket options (TCP_USER_TIMEOUT, keepalive) on the
streams, to measure what they cost; BENCH_REUSE_PORT=1, listen with
SO_REUSEPORT (cheroot's ``reuse_port``) so that several of these processes
share one port, the kernel spreading connections over them
(benchmarks/many_streams.py). Never a knob of comet itself. Once serving it
prints "comet_app: serving" (a shared port answers before the process
starting on it has bound it)."""
import os
import sys

import cherrypy

from comet import Hub, comet, liveness, pipeline
from comet.cherrypy_tool import engine_plugin

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "15"))
if os.environ.get("BENCH_NO_WATCH_PEER") == "1":
    # Every stream's socket gets its options from pipeline's watch_peer (parked,
    # fast route, direct, thread mode): a no-op there leaves them all off.
    liveness.watch_peer = pipeline.watch_peer = lambda sock, heartbeat: None

port, mode = int(sys.argv[1]), sys.argv[2]
streams = int(sys.argv[3]) if len(sys.argv) > 3 else 100
if len(sys.argv) > 4:
    from comet.backends.redis import RedisHub

    hub = RedisHub(sys.argv[4], maxlen=20_000, prefix="bench:")
else:
    hub = Hub(buffer_size=20_000)
if mode == "fast":
    engine_plugin().route("/events", hub, channel="b", heartbeat=HEARTBEAT)


class Root:
    @cherrypy.expose
    def index(self):
        return "ok"

    if mode == "generator":
        @cherrypy.expose
        @comet(transport="sse", heartbeat=HEARTBEAT)
        def events(self, last_event_id=None):
            yield "hello"
            yield from hub.subscribe("b", last_id=last_event_id)
    elif mode == "multi3":
        @cherrypy.expose
        @comet(transport="sse", heartbeat=HEARTBEAT)
        def events(self, last_event_id=None):
            return hub.subscribe(["b", "c", "d"], last_id=last_event_id)
    else:
        @cherrypy.expose
        @comet(transport="sse", mode="auto" if mode == "parked" else "thread", heartbeat=HEARTBEAT)
        def events(self, last_event_id=None, ch="b"):
            return hub.subscribe(ch, last_id=last_event_id)

    @cherrypy.expose
    def publish(self, seq, ts):
        hub.publish("b", f"{seq} {ts}")
        return "ok"

    @cherrypy.expose
    def burst(self, n, batch="1"):
        n, batch = int(n), int(batch)
        if batch > 1:  # publish_many: one Redis round trip per batch
            for start in range(0, n, batch):
                hub.publish_many("b", [f"b{i}" for i in range(start, min(n, start + batch))])
        else:
            for i in range(n):
                hub.publish("b", f"b{i}")
        return "ok"


# Thread mode needs a thread per stream (plus a few for pages); parked needs a
# few; the generator handler runs on CherryPy's default pool.
threads = streams + 20 if mode == "thread" else 10 if mode == "generator" else 8
cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": port, "server.thread_pool": threads,
                        "server.socket_queue_size": 4096, "engine.autoreload.on": False, "log.screen": False,
                        "comet.max_streams": threads, "server.shutdown_timeout": 1})
if os.environ.get("BENCH_REUSE_PORT") == "1":
    from cherrypy.process import servers

    # CherryPy refuses a port something listens on: here it is shared on purpose.
    servers.portend.free = lambda *args, **kwargs: None
    cherrypy.server.httpserver, cherrypy.server.bind_addr = cherrypy.server.httpserver_from_self()
    cherrypy.server.httpserver.reuse_port = True
cherrypy.engine.subscribe("start", lambda: print("comet_app: serving", flush=True), priority=90)
cherrypy.quickstart(Root(), "/", {"/": {"log.access_file": ""}})
