"""CherryPy integration: the ``@comet`` decorator, ``tools.comet`` and the
engine plugin. This is the only module that imports CherryPy.

Three spellings of the same thing, with the same option names and defaults
(:class:`comet.Options`)::

    @cherrypy.expose
    @comet(transport="sse", heartbeat=15)
    def events(self, last_event_id=None): ...

    @cherrypy.expose
    @cherrypy.tools.comet(transport="sse")
    def events(self, last_event_id=None): ...

    config = {"/events": {"tools.comet.on": True, "tools.comet.transport": "sse"}}

A handler that accepts ``last_event_id`` receives the client's resume cursor:
the ``Last-Event-ID`` header when present (EventSource sends it on
reconnect), else the ``last_event_id`` query parameter.

Process-wide settings live in the ``comet`` config namespace::

    cherrypy.config.update({"comet.max_streams": 500, "comet.max_parked": 20000, "comet.retry_after": 5})

Under cheroot every stream is parked once its headers are out: it holds no
worker thread, whatever the handler's shape (``comet.writer``).
``max_parked`` caps those. ``max_streams`` caps streams that keep a thread
(TLS, ``mode="thread"``); it defaults to the server's ``thread_pool`` less a
reserve of ``max(2, thread_pool // 10)`` threads, so ordinary pages always
have some left.

Once the engine starts, the ``comet`` logger's records (warnings and errors,
unless its level says otherwise) go to ``cherrypy.log``.

The engine plugin ends every stream when the engine stops, before the HTTP
server joins its worker threads (priority 10 < the server's 25), so shutdown
does not wait for idle streams; the hubs those streams follow are woken too,
with no registration.
"""
from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import cherrypy
from cherrypy.process.plugins import SimplePlugin

from .errors import InvalidEventId
from .hub import Hub
from .direct import DirectHandlers
from .internals import (accept_hook_of, cheroot_server_of, comet_plugin_of, connection_for, dispatched_callable, drop_gzip,
                        http_error_reason, install_accept_hook, install_gateway, is_direct, keep_charset, keep_comet_plugin,
                        page_arguments, page_callable, release_session, request_context, set_page_params)
from .options import Options
from .pipeline import OWNED, Parking, Refusal, open_stream
from .pool import StreamPool
from .tokens import redact_tokens
from .wsgi import resume_id

__all__ = ["comet", "CometTool", "CometPlugin", "engine_plugin", "static_config", "STATIC_DIR"]

#: Where ``comet.js`` lives inside the installed package.
STATIC_DIR = str(Path(__file__).resolve().parent / "static")


class CometPlugin(SimplePlugin):
    """Holds the process's :class:`~comet.pool.StreamPool` and ends its
    streams when the engine stops."""

    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        self.pool = StreamPool()
        self._cap_configured = False
        self._routes: Any = None
        #: URLs of ``@comet`` handlers served at accept time (:mod:`comet.direct`).
        self.direct = DirectHandlers(self.pool)

    @property
    def hubs(self) -> list[Hub]:
        """The hubs this process's streams follow (found automatically)."""
        return self.pool.followed_hubs()

    def add_hub(self, hub: Hub) -> Hub:
        """Not needed any more: the hubs streams follow are found
        automatically. Kept so older code keeps working; returns *hub*.

        >>> hub = engine_plugin().add_hub(Hub())
        """
        self.pool.follow(hub)
        return hub

    def route(self, path: str, hub: Hub, channel: str | Sequence[str], **options: Any) -> Any:
        """Serve *hub*'s *channel* at *path* as a fast route (see
        :mod:`comet.fastpath`): answered and parked right where cheroot
        accepts the connection, without a worker thread or CherryPy's request
        pipeline, so thousands of clients (re)connect in seconds. It answers
        before any CherryPy app mounted at the same path. Keywords are the
        :class:`~comet.Options` names, and ``authorize``: a callable deciding
        from a :class:`~comet.fastpath.StreamRequest` who may follow the
        stream (see :meth:`comet.fastpath.FastRoutes.add`).

        >>> from cherrypy.process.wspbus import Bus
        >>> plugin = CometPlugin(Bus())  # in an app: engine_plugin()
        >>> route = plugin.route("/scores/{match}", Hub(), channel="match:{match}", heartbeat=10)
        >>> route.path, route.options.heartbeat
        ('/scores/{match}', 10)
        """
        if self._routes is None:
            from .fastpath import FastRoutes

            self._routes = FastRoutes(self.pool)
        self.pool.follow(hub)
        route = self._routes.add(path, hub, channel, **options)
        server = cheroot_server_of(cherrypy.server)
        if server is not None and self.bus.state == self.bus.states.STARTED:
            self._routes.install(server)
        return route

    def clear_routes(self) -> None:
        """Forget every fast route (they take effect on the next engine start).
        ``comet.testing.CherryPyServer.stop`` calls this so one test's routes
        are not the next one's."""
        self._routes = None

    def configure(self, max_streams: int | None = None, retry_after: int | None = None, max_parked: int | None = None) -> None:
        """Set the admission caps and ``Retry-After`` (what ``comet.*`` config does)."""
        StreamPool(max_streams=max_streams, retry_after=5 if retry_after is None else retry_after,
                   max_parked=20_000 if max_parked is None else max_parked)  # validates
        if max_parked is not None:
            self.pool.max_parked = max_parked
        if max_streams is not None:
            self.pool.max_streams = max_streams
            self._cap_configured = True
        if retry_after is not None:
            self.pool.retry_after = retry_after

    def default_cap(self) -> None:
        """Forget a configured ``max_streams``: the next stream derives it
        from the server's thread pool again (``comet.testing`` between
        servers)."""
        self.pool.max_streams = None
        self._cap_configured = False

    def ensure_cap(self) -> None:
        # The thread pool size is only final once config is loaded, so the
        # default cap is derived at the first stream, not at import.
        if not self._cap_configured and self.pool.max_streams is None:
            threads = int(getattr(cherrypy.server, "thread_pool", 10) or 10)
            self.pool.max_streams = max(1, threads - max(2, threads // 10))

    def start(self) -> None:
        self.pool.reopen()
        _bridge_logs()
        check_tool_config()
        # Build the HTTP server now (its own start would) and give it the
        # gateway that lets streams be parked. Other Server objects serve
        # streams in thread mode.
        httpserver = cheroot_server_of(cherrypy.server, build=True)
        if httpserver is not None:
            install_gateway(httpserver)
            if self._routes is not None:
                self._routes.install(httpserver)
            self.direct.clear()
            self.direct.server = httpserver
            install_accept_hook(httpserver, self.direct.take)

    start.priority = 60  # type: ignore[attr-defined]  # before the HTTP server starts (75): bad config fails startup

    def stop(self) -> None:
        self.direct.clear()
        self.pool.close_all()
        hook = accept_hook_of(cheroot_server_of(cherrypy.server))
        if hook is not None:
            hook.stop()

    stop.priority = 10  # type: ignore[attr-defined]  # before the HTTP server's stop (25) joins its threads: invariant I13


class _ToCherryPyLog(logging.Handler):
    """Hands the ``comet`` logger's records to ``cherrypy.log``, so they go
    wherever the app's ``log.screen`` / ``log.error_file`` send CherryPy's,
    in its format (``[time] COMET message``), traceback included."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            cherrypy.log.error_log.log(record.levelno, " ".join((cherrypy.log.time(), "COMET", record.getMessage())),
                                       exc_info=record.exc_info)
        except Exception:
            self.handleError(record)


_LOG_BRIDGE = _ToCherryPyLog()


def _bridge_logs() -> None:
    # At engine start: under CherryPy, comet's records go to cherrypy.log.
    # The "comet" logger then stops propagating, since cherrypy.error
    # propagates to the root logger itself: a root handler sees each record
    # once. Handlers on "comet" itself, and its level, are left alone.
    logger = logging.getLogger("comet")
    if _LOG_BRIDGE not in logger.handlers:
        logger.addHandler(_LOG_BRIDGE)
        logger.propagate = False


def engine_plugin(engine: Any = None) -> CometPlugin:
    """The :class:`CometPlugin` of *engine* (default ``cherrypy.engine``),
    created and subscribed on first use."""
    engine = engine if engine is not None else cherrypy.engine
    plugin: CometPlugin | None = comet_plugin_of(engine)
    if plugin is None:
        plugin = CometPlugin(engine)
        plugin.subscribe()
        keep_comet_plugin(engine, plugin)
    return plugin


def check_tool_config() -> None:
    """Validate every ``tools.comet.*`` section of the mounted apps, so a typo
    or bad value stops the engine from starting, naming the key and path,
    instead of answering 500 later."""
    for script_name, app in cherrypy.tree.apps.items():
        for path, section in getattr(app, "config", {}).items():
            if not isinstance(section, dict):
                continue
            values = {k[len("tools.comet."):]: v for k, v in section.items()
                      if k.startswith("tools.comet.") and k not in ("tools.comet.on", "tools.comet.priority")}
            if values:
                try:
                    Options.from_mapping(values)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"config {script_name or '/'} [{path}]: tools.comet: {exc}") from None


def static_config(url: str = "/comet") -> dict[str, dict[str, Any]]:
    """App config that serves ``comet.js`` at ``<url>/comet.js``: one line.

    >>> config = {**static_config("/comet")}
    >>> config["/comet"]["tools.staticdir.on"]
    True
    """
    return {url: {"tools.staticdir.on": True, "tools.staticdir.dir": STATIC_DIR}}


def _config_namespace(key: str, value: Any) -> None:
    if key not in ("max_streams", "retry_after", "max_parked"):
        raise ValueError(f"unknown config key comet.{key}; known: comet.max_streams, comet.max_parked, comet.retry_after")
    engine_plugin().configure(**{key: value})


cherrypy.config.namespaces["comet"] = _config_namespace


def _serve(call: Callable[[], Any], options: Options, resume: str | None, learn: Callable[..., Any] | None = None) -> Any:
    """Run one streaming request through :func:`comet.pipeline.open_stream`
    and give CherryPy what it opened. *resume*: the client's cursor
    (:func:`_resolve_resume`). *learn*: the handler, to serve its URL
    directly next time if it may (:mod:`comet.direct`). In a direct request
    the body goes back to :mod:`comet.direct`, which owns the socket."""
    keep_charset()
    drop_gzip()
    request, response = cherrypy.serving.request, cherrypy.serving.response
    # What the access log writes (after this returns): a log reader must not
    # be able to open the stream with a token from its URL.
    request.request_line = redact_tokens(request.request_line)
    plugin = engine_plugin()
    plugin.ensure_cap()
    direct = is_direct(request)
    try:
        opened = open_stream(call, options, plugin.pool, method=request.method,
                             resume_id=resume,
                             connection=OWNED if direct else connection_for(request.wsgi_environ),
                             context=request_context(), first_step_here=direct, started=release_session)
    except Refusal as refusal:
        return _refuse(refusal, options)
    except cherrypy.HTTPError as exc:
        if exc.code >= 500:
            raise
        # The handler's own refusal (403 "not your seat"): plain text like
        # comet's, so EventSource, comet.js's onDenied and curl show the
        # reason rather than CherryPy's HTML page.
        return _refuse(Refusal(exc.code, http_error_reason(exc)), options)
    release_session()
    for name, value in opened.headers + _cors(options):
        response.headers[name] = value
    if direct:
        return opened.body
    if learn is not None and isinstance(opened.body, Parking) and not opened.body.late:
        # (A first step still running may yet attach hooks or use a tool.)
        plugin.direct.learn(learn)
    if isinstance(opened.body, list):  # HEAD, or a long-poll answered in thread mode
        return b"".join(opened.body)
    response.stream = True
    # Runs when cheroot closes the response: at the end, on a failed write
    # (client gone) and on errors. Closing the body ends the stream (its
    # handler's finally runs) unless the writer owns it by then.
    body: Any = opened.body  # a Parking or a thread-mode Stream: both close()
    request.hooks.attach("on_end_request", body.close)
    return body


def _cors(options: Options) -> list[tuple[str, str]]:
    request = cherrypy.serving.request
    return options.cors_headers(request.headers.get("Origin"), request.method,
                                request.headers.get("Access-Control-Request-Headers"))


def _refuse(refusal: Refusal, options: Options | None = None) -> bytes:
    """A short plain-text error: stream clients (EventSource, comet.js, curl)
    show the reason, and no traceback page leaks for bad input. With
    *options*, their CORS headers: a cross-origin page can read the reason
    (and a preflight, a 204, is answered)."""
    keep_charset()
    drop_gzip()
    response = cherrypy.serving.response
    response.status = refusal.status
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    response.headers["Cache-Control"] = "no-cache"
    for name, value in refusal.headers + (_cors(options) if options is not None else []):
        response.headers[name] = value
    return refusal.body()


class _ParamCheck:
    """Refuses parameters a handler does not take (a cache-buster ``?_=1``,
    a form field) with a 400 naming them, instead of a TypeError's 500.

    Built once per handler: for a signature of plain parameters, what any
    call binds to it for sure is worked out here, so the common call costs
    two set comparisons instead of ``Signature.bind`` (which costs as much as
    the rest of a direct connect)."""

    __slots__ = ("signature", "simple")

    def __init__(self, func: Callable[..., Any]) -> None:
        try:
            self.signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            self.signature = None
        #: Called with its first parameter (``self``) alone positionally:
        #: ``(1, names, required)``, *names* those that may be passed as
        #: keywords and *required* those that must be; ``None`` for ``*args``,
        #: ``**kwargs`` or positional-only parameters (those go through bind).
        self.simple: tuple[int, frozenset[str], frozenset[str]] | None = None
        params = list(self.signature.parameters.values()) if self.signature is not None else []
        if params and all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params) \
                and params[0].kind is params[0].POSITIONAL_OR_KEYWORD:
            rest = params[1:]
            self.simple = (1, frozenset(p.name for p in rest), frozenset(p.name for p in rest if p.default is p.empty))

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        signature, simple = self.signature, self.simple
        if signature is None:
            return
        if simple is not None and len(args) == simple[0] and kwargs.keys() <= simple[1] and simple[2] <= kwargs.keys():
            return
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            params = signature.parameters
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                unexpected: list[str] = []
            else:
                unexpected = sorted(name for name in kwargs if name not in params)
            takes = ", ".join(name for name, p in params.items() if name != "self" and p.kind in
                              (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or "no parameters"
            if unexpected:
                raise Refusal(400, f"unexpected parameter(s) {', '.join(unexpected)}; this stream takes: {takes}") from None
            raise Refusal(400, f"missing or malformed parameters; this stream takes: {takes}") from None


def _takes_last_event_id(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "last_event_id" or p.kind is p.VAR_KEYWORD for p in params)


def _resolve_resume(kwargs: dict[str, Any], wants: bool) -> str | None:
    """The client's cursor (header, then query), put in *kwargs* as
    ``last_event_id`` for a handler that *wants* it, taken out otherwise."""
    request = cherrypy.serving.request
    value = resume_id(request.headers.get("Last-Event-ID"), kwargs.get("last_event_id"))
    if wants:
        kwargs["last_event_id"] = value
    else:
        kwargs.pop("last_event_id", None)
    return value


def _dispatched_to(handler: Callable[..., Any]) -> bool:
    """Is *handler* (a ``@comet`` wrapper) what CherryPy's dispatcher picked
    for this request, bound or not, rather than something it calls?"""
    return dispatched_callable(cherrypy.serving.request) is handler


def comet(transport: str = "sse", **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a generator page handler a stream. Put it under ``@cherrypy.expose``.

    Keywords are the :class:`comet.Options` names; invalid values fail here,
    at decoration time.

    >>> from comet import comet, Hub
    >>> hub = Hub()
    >>> class Root:
    ...     @cherrypy.expose
    ...     @comet(transport="sse")
    ...     def events(self, last_event_id=None):
    ...         yield from hub.subscribe("lobby", last_id=last_event_id)
    """
    opts = Options.from_mapping({"transport": transport, **options})

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        wants = _takes_last_event_id(func)
        check_params = _ParamCheck(func)

        @functools.wraps(func)
        def handler(*args: Any, **kwargs: Any) -> Any:
            try:
                resume = _resolve_resume(kwargs, wants)
            except InvalidEventId as exc:
                return _refuse(Refusal(400, str(exc)), opts)

            def call() -> Any:
                check_params(args, kwargs)
                return func(*args, **kwargs)

            # Only the handler CherryPy dispatched to may be learned as direct:
            # a direct request calls it and would skip a page handler that
            # calls it (and the access check that page handler may make).
            learn = functools.partial(handler, *args) if _dispatched_to(handler) else None
            return _serve(call, opts, resume, learn)

        setattr(handler, "comet_options", opts)  # what the decorator made, for introspection
        return handler

    return decorate


class CometTool(cherrypy.Tool):
    """``tools.comet``: the decorator as a CherryPy Tool, configured with
    ``tools.comet.<option>`` keys. It wraps the page handler at
    ``before_handler`` with priority 50, inside the encode tool's wrapper (70),
    so the encoder sees a streaming response rather than consuming it."""

    def __init__(self) -> None:
        super().__init__("before_handler", self._wrap, name="comet", priority=50)
        self._cache: dict[tuple[tuple[str, Any], ...], Options] = {}

    def _options(self, config: dict[str, Any]) -> Options:
        # Lists (tools.comet.cors_origins) as tuples: the key must hash.
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))
        opts = self._cache.get(key)
        if opts is None:
            opts = self._cache[key] = Options.from_mapping(config)
        return opts

    def _wrap(self, **config: Any) -> None:
        request = cherrypy.serving.request
        inner = request.handler
        if inner is None:
            return
        opts = self._options(config)
        target = page_callable(inner)
        wants = _takes_last_event_id(target)

        check_params = _ParamCheck(target)

        def handler(*args: Any, **kwargs: Any) -> Any:
            page = page_arguments(inner)
            params = dict(page[1] if page is not None else kwargs)
            try:
                resume = _resolve_resume(params, wants)
            except InvalidEventId as exc:
                return _refuse(Refusal(400, str(exc)), opts)
            if page is not None:
                set_page_params(inner, params)
                page_args = page[0]

                def call() -> Any:
                    check_params(page_args, params)
                    return inner()
            else:
                def call() -> Any:
                    check_params(args, params)
                    return inner(*args, **params)
            return _serve(call, opts, resume)

        request.handler = handler


cherrypy.tools.comet = CometTool()
# Subscribe the engine plugin now, so its start hook (config checks) and stop
# hook (ending streams) run however the app is started.
engine_plugin()
