"""CherryPy's request: the session, the per-request state a generator's
later steps see, the encode and gzip tools kept off stream bodies (see
:mod:`comet.internals`)."""
from __future__ import annotations

from typing import Any, Callable, ContextManager

# -- the engine and its HTTP server ---------------------------------------------


def cheroot_server_of(server: Any, build: bool = False) -> Any:
    """The cheroot ``HTTPServer`` behind CherryPy's *server* adapter
    (``cherrypy.server``), or ``None`` (not built yet, or another server).
    With *build*, it is built now from the adapter's config, as the
    adapter's own start would (``Server.start`` builds it only when it has
    none): comet gives it its gateway before it serves."""
    if build and getattr(server, "httpserver", None) is None and getattr(server, "_socket_host", None) is not None:
        server.httpserver, server.bind_addr = server.httpserver_from_self()
    httpserver = getattr(server, "httpserver", None)
    if httpserver is not None and hasattr(httpserver, "gateway") and hasattr(httpserver, "process_conn"):
        return httpserver
    return None


def comet_plugin_of(engine: Any) -> Any:
    """The comet plugin kept on CherryPy *engine* (a bus), or ``None``."""
    return getattr(engine, "_comet_plugin", None)


def keep_comet_plugin(engine: Any, plugin: Any) -> None:
    """Keep *plugin* on *engine*: one per bus, found again by
    :func:`comet_plugin_of`."""
    engine._comet_plugin = plugin


# -- the request -----------------------------------------------------------------


def http_error_reason(exc: Any) -> str:
    """The reason a ``cherrypy.HTTPError`` was raised with (``HTTPError(403,
    "not your seat")``), without CherryPy's HTML page around it: the
    exception keeps it in ``_message`` only. ``""`` when none was given."""
    return str(getattr(exc, "_message", None) or "")


def mark_direct(request: Any) -> None:
    """Say that *request* is served directly (:mod:`comet.direct`): the
    ``@comet`` handler it calls hands its stream back instead of to
    CherryPy, since the socket is comet's."""
    request.comet_direct = True


def is_direct(request: Any) -> bool:
    """Whether :func:`mark_direct` marked *request*."""
    return bool(getattr(request, "comet_direct", False))


def page_callable(handler: Any) -> Any:
    """What CherryPy's page *handler* (``_cpdispatch.PageHandler``) will
    call: the exposed function or method; *handler* itself otherwise."""
    return getattr(handler, "callable", handler)


def page_arguments(handler: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The positional (virtual path) and keyword (query and body) arguments
    CherryPy's page *handler* will call with; ``None`` for a handler that
    is not a ``PageHandler`` (it gets them from its caller)."""
    if not hasattr(handler, "kwargs"):
        return None
    return tuple(getattr(handler, "args", ())), handler.kwargs


def set_page_params(handler: Any, params: dict[str, Any]) -> None:
    """Make *params* the keyword arguments page *handler* calls with: the
    default dispatcher's ``LateParamPageHandler`` returns a copy of them
    (merged with ``request.params``), so changes are assigned back."""
    handler.kwargs = params


def dispatched_callable(request: Any) -> Any:
    """What CherryPy's dispatcher picked as *request*'s page handler (a
    function; a bound method's function), under the wrappers tools put
    around it (the encode tool's ``ResponseEncoder.oldhandler``)."""
    page = getattr(request, "handler", None)
    for _ in range(8):  # a chain of wrapping tools, bounded
        inner = getattr(page, "oldhandler", None)
        if inner is None:
            break
        page = inner
    target = getattr(page, "callable", None)
    return getattr(target, "__func__", target)


def release_session() -> None:
    """Save the session now and unlock it, instead of when the stream ends.

    With ``tools.sessions`` (implicit locking), a session read by a handler
    stays locked until CherryPy saves it, and for a streamed response that
    is the end of the stream: every other request of that user (a chat's
    "post" button) would hang for as long as the stream is open, a long
    poll included. So the session is saved with what the handler set before
    its first item, and the sessions tool's own save is skipped: changes a
    generator makes to it later are not saved.
    """
    import cherrypy

    session = getattr(cherrypy.serving, "session", None)
    request = cherrypy.serving.request
    if session is None or hasattr(request, "_sessionsaved"):
        return
    request._sessionsaved = True  # the guard of cherrypy.lib.sessions.save
    session.save()


def request_context() -> Callable[[], ContextManager[None]]:
    """What a generator's later steps (on comet's step threads) enter, so
    that ``cherrypy.request``, ``cherrypy.response`` and ``cherrypy.session``
    are still this request's, as they were on its own thread.

    ``cherrypy.serving`` is a thread-local; its values are copied into the
    step thread for the step and put back as they were after it.
    """
    import cherrypy

    state = vars(cherrypy.serving)
    if state.keys() == {"request", "response"}:  # (no session or other per-request state)
        return _KeptRequest(state["request"], state["response"], None)
    return _KeptRequest(None, None, dict(state))


class _KeptRequest:
    # A class rather than a closure over a @contextmanager, and the request
    # and response in slots rather than a dict of them: it is kept by every
    # generator stream for its life (fewer objects for the garbage collector
    # to go over), and entered at every step.
    __slots__ = ("request", "response", "more")

    def __init__(self, request: Any, response: Any, more: dict[str, Any] | None) -> None:
        self.request = request
        self.response = response
        self.more = more

    def __call__(self) -> "_Entered":
        return _Entered(self)


class _Entered:
    __slots__ = ("kept", "before")

    def __init__(self, kept: _KeptRequest) -> None:
        self.kept = kept
        self.before: dict[str, Any] = {}

    def __enter__(self) -> None:
        import cherrypy

        state = vars(cherrypy.serving)
        self.before = dict(state)  # empty on a step thread; a direct request's own on its thread
        kept = self.kept
        if kept.more is not None:
            state.update(kept.more)
        else:
            state["request"], state["response"] = kept.request, kept.response

    def __exit__(self, *exc: object) -> None:
        import cherrypy

        state = vars(cherrypy.serving)
        state.clear()
        state.update(self.before)


def keep_charset() -> None:
    """Keep CherryPy's encode tool (``tools.encode.on``) off our bodies.

    Streams and their errors are bytes already encoded as UTF-8 (SSE is
    UTF-8 by definition). The encoder would relabel them with whatever
    charset ``Accept-Charset`` prefers (``text/event-stream;charset=utf-16``
    over UTF-8 bytes) or answer ``406`` when UTF-8 is refused; it only
    touches the label, so turning its ``add_charset`` off for this request
    is enough.
    """
    import cherrypy
    from cherrypy.lib.encoding import ResponseEncoder

    handler = cherrypy.serving.request.handler
    for _ in range(16):  # a chain of wrapping tools, bounded
        if handler is None:
            return
        if isinstance(handler, ResponseEncoder):
            handler.add_charset = False
        handler = getattr(handler, "oldhandler", None)


def drop_gzip() -> None:
    """Keep CherryPy's gzip tool (``tools.gzip.on``) off this response.

    It would label a stream ``Content-Encoding: gzip`` and wrap its body in
    a compressor that flushes only at the end: a parked stream, written by
    the writer thread past that wrapper, would go out raw under the label,
    and in thread mode events would sit in zlib's buffer. Like the encode
    tool (:func:`keep_charset`), it is dropped for every answer comet gives
    (long-polls and refusals are a few hundred bytes). The tool's hook is
    already attached when the handler runs: ``tools.*`` are set up before
    it, so it is taken out of ``request.hooks``.
    """
    import cherrypy
    from cherrypy.lib.encoding import gzip

    hooks = cherrypy.serving.request.hooks
    finalize = hooks.get("before_finalize", [])
    if any(hook.callback is gzip for hook in finalize):
        hooks["before_finalize"] = [hook for hook in finalize if hook.callback is not gzip]
