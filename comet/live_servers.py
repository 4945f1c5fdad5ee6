"""Live servers for tests, in this process: a CherryPy app or a WSGI app
under cheroot on a free 127.0.0.1 port, started and stopped by the test
(``with`` block). :mod:`comet.testing` exports both; the servers that run
in processes of their own (redis-server, nginx, an app) are in
:mod:`comet.processes`.

Example::

    from comet.testing import CherryPyServer, http_get

    with CherryPyServer(Root()) as server:
        status, headers, body = http_get(server.url + "/")
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

__all__ = ["CherryPyServer", "WSGIServer"]


class CherryPyServer:
    """Run a CherryPy app on a free 127.0.0.1 port for a test.

    CherryPy has one engine per process, so one of these runs at a time.

    Example::

        with CherryPyServer(Root(), thread_pool=20) as server:
            status, headers, body = http_get(server.url + "/")
    """

    def __init__(self, root: Any, config: dict[str, Any] | None = None, *, thread_pool: int = 30,
                 global_config: dict[str, Any] | None = None) -> None:
        self.root = root
        self.config = config or {}
        self.thread_pool = thread_pool
        self.global_config = global_config or {}
        self.url = ""

    def start(self) -> "CherryPyServer":
        import cherrypy
        from .cherrypy_tool import engine_plugin

        cherrypy.config.reset()
        cherrypy.config.update({
            "server.socket_host": "127.0.0.1", "server.socket_port": 0, "server.thread_pool": self.thread_pool,
            "engine.autoreload.on": False, "log.screen": False, "checker.on": False,
            "server.shutdown_timeout": 2,
            # server.* settings live on the Server object and survive
            # config.reset(): clear TLS so one test's HTTPS is not the next one's.
            "server.ssl_certificate": None, "server.ssl_private_key": None, "server.ssl_certificate_chain": None,
            "server.socket_queue_size": 5,  # CherryPy's default, which comet raises (comet.wsgi.BACKLOG)
            **self.global_config,
        })
        plugin = engine_plugin()
        if "comet.max_streams" not in self.global_config:
            plugin.default_cap()
        if "comet.max_parked" not in self.global_config:
            plugin.pool.max_parked = 20_000
        cherrypy.tree.apps.clear()
        cherrypy.tree.mount(self.root, "", self.config)
        cherrypy.server.httpserver = None  # rebuilt from the config above
        cherrypy.engine.start()
        host, port = cherrypy.server.bound_addr
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> float:
        """Stop the engine; returns how long that took, in seconds. The
        apps and fast routes (``engine_plugin().route``) are forgotten."""
        import cherrypy
        from .cherrypy_tool import engine_plugin

        started = time.monotonic()
        cherrypy.engine.stop()
        elapsed = time.monotonic() - started
        cherrypy.tree.apps.clear()
        engine_plugin().clear_routes()
        return elapsed

    def __enter__(self) -> "CherryPyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class WSGIServer:
    """Run a WSGI app under cheroot on a free 127.0.0.1 port for a test.

    ``routes`` (a :class:`comet.fastpath.FastRoutes`) are served in front of
    *app* (which may then be ``None``: 404 for anything else). ``pools`` are the :class:`~comet.stream.StreamPool` objects to end at
    stop (a ``comet_app``'s own pool is found at ``app.pool``).
    """

    def __init__(self, app: Callable[..., Any] | None, *, pools: list[Any] | None = None, numthreads: int = 30,
                 routes: Any = None) -> None:
        from cheroot import wsgi

        self.app = app
        self.pools = list(pools or ([getattr(app, "pool")] if hasattr(app, "pool") else []))
        from .wsgi import install_gateway

        self.server = wsgi.Server(("127.0.0.1", 0), app, numthreads=numthreads, shutdown_timeout=2)
        install_gateway(self.server)
        if routes is not None:  # a comet.fastpath.FastRoutes, in front of app
            routes.install(self.server)
            if routes.pool not in self.pools:
                self.pools.append(routes.pool)
        self.url = ""
        self._thread: threading.Thread | None = None

    def start(self) -> "WSGIServer":
        self.server.prepare()
        host, port = self.server.bind_addr[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self.server.serve, name="comet-wsgi-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        started = time.monotonic()
        for pool in self.pools:
            pool.close_all()
        from .internals import accept_hook_of

        hook = accept_hook_of(self.server)
        if hook is not None:
            hook.stop()
        self.server.stop()
        if self._thread is not None:
            self._thread.join(10)
        return time.monotonic() - started

    def __enter__(self) -> "WSGIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
