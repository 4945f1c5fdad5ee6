"""A CherryPy request built without its pipeline, for :mod:`comet.direct`
(see :mod:`comet.internals`): whether a URL may be served so, and the
request, response and response head CherryPy would have made."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from .accept import GetHead
from .connection import Peer

# -- a CherryPy request built without the pipeline (comet.direct) ----------------

# The default WSGI pipeline of a CherryPy app (``app.wsgiapp.pipeline``).
_DEFAULT_WSGI_PIPELINE = ["ExceptionTrapper", "InternalRedirector"]
# Config namespaces every request applies: tools show up as hooks (checked
# one by one); request.* and response.* are applied to a direct request too;
# error pages are never shown for a stream.
_KNOWN_NAMESPACES = frozenset({"tools", "hooks", "request", "response", "error_page"})


@functools.lru_cache(maxsize=1)
def _harmless_hooks() -> frozenset[Any]:
    """Hooks a direct request may skip: the encoder only relabels (comet
    keeps it and gzip off its bodies), ``trailing_slash`` let this very URL
    through already, the log tools act on error pages only. These are
    CherryPy's defaults (``tools.encode``, ``trailing_slash``,
    ``log_tracebacks`` and ``log_headers`` are on unless turned off)."""
    from cherrypy.lib import cptools, encoding

    return frozenset({encoding.ResponseEncoder, encoding.gzip, cptools.trailing_slash,
                      cptools.log_traceback, cptools.log_request_headers})


def why_not_direct(request: Any, server: Any) -> str | None:
    """Why the URL of *request* (CherryPy's, inside its pipeline, in the
    handler) may not be served directly by cheroot *server*'s accept-time
    hook, or ``None`` if it may.

    An allowlist: whatever CherryPy would do for the URL that a direct
    request skips (a tool, a hook, WSGI middleware, a custom dispatcher,
    request or response class, config namespace) makes it not direct.
    """
    import cherrypy
    from cherrypy import _cpdispatch, _cprequest

    if request.method != "GET" or request.scheme != "http":
        return "not a plain GET"
    if type(request) is not _cprequest.Request or type(cherrypy.serving.response) is not _cprequest.Response:
        return "a custom request or response class"
    cheroot_request = (getattr(request, "wsgi_environ", None) or {}).get("comet.request")
    if cheroot_request is None or getattr(cheroot_request, "server", None) is not server:
        return "another server"
    wsgi_app = getattr(server, "wsgi_app", None)
    if getattr(wsgi_app, "comet_inner", wsgi_app) is not cherrypy.tree:
        return "WSGI middleware in front of cherrypy.tree"
    if [name for name, _ in getattr(request.app.wsgiapp, "pipeline", None) or ()] != _DEFAULT_WSGI_PIPELINE:
        return "WSGI middleware in the app's pipeline"
    parts = request.request_line.split(" ")
    if len(parts) != 3 or parts[1].partition("?")[0] != request.script_name + request.path_info:
        return "the URL as sent is not the path served (escapes)"
    if type(request.app.find_config(request.path_info, "request.dispatch", request.dispatch)) is not _cpdispatch.Dispatcher:
        return "a custom dispatcher"
    from cherrypy.lib import httputil

    if request.params != httputil.parse_query_string(request.query_string, encoding=request.query_string_encoding):
        return "params that do not come from the query string (a _cp_dispatch)"
    harmless = _harmless_hooks()
    for point, hooks in request.hooks.items():
        for hook in hooks:
            if hook.callback not in harmless:
                return f"a hook at {point}: {getattr(hook.callback, '__qualname__', hook.callback)!r}"
    for key in request.config:
        namespace = key.split(".", 1)[0]
        if namespace in request.namespaces and namespace not in _KNOWN_NAMESPACES:
            return f"config namespace {namespace!r}"
    return None


def begin_direct_request(app: Any, peer: Peer) -> tuple[Any, Any]:
    """A request and response of *app* made current (``cherrypy.serving``),
    as ``Application.get_serving`` makes them, less its ``acquire_thread``:
    a direct request runs on a comet step thread, not a server thread that
    per-thread plugins should set up (the later steps of every generator
    handler run there too). ``request.local`` and ``.remote`` are what
    CherryPy's WSGI gateway would make of *peer*."""
    import cherrypy
    from cherrypy.lib import httputil

    request = app.request_class(httputil.Host("", peer.server_port, peer.server_name),
                                httputil.Host(peer.remote_addr, peer.remote_port, ""), "http", "HTTP/1.1")
    request.app = app
    for name, toolbox in app.toolboxes.items():
        request.namespaces[name] = toolbox
    response = app.response_class()
    cherrypy.serving.load(request, response)
    cherrypy.engine.publish("before_request")
    return request, response


def end_direct_request(request: Any) -> None:
    """As ``Application.release_serving``: ``after_request``, the
    request's ``on_end_request`` hooks, ``cherrypy.serving`` cleared."""
    import cherrypy

    cherrypy.engine.publish("after_request")
    try:
        request.close()
    except Exception:
        cherrypy.log(traceback=True, severity=40)
    cherrypy.serving.clear()


def direct_settings(request: Any) -> list[tuple[Callable[[str, Any], None], str, Any]]:
    """The config of *request*'s URL that a direct request applies again:
    ``request.*``, ``response.*`` and ``error_page.*`` entries, with the
    namespace handler that applies each (in CherryPy's order). Tools are
    left out: :func:`why_not_direct` allowed only tools whose hooks do
    nothing for a stream."""
    settings = []
    for key, value in request.config.items():
        namespace, _, name = key.partition(".")
        if namespace in ("request", "response", "error_page") and namespace in request.namespaces:
            settings.append((request.namespaces[namespace], name, value))
    return settings


def write_access_log() -> None:
    """``cherrypy.log.access()`` for the current request, unless no handler
    would receive the line (formatting it costs more than the rest of a
    direct request's bookkeeping)."""
    import cherrypy

    request = cherrypy.serving.request
    manager = getattr(request.app, "log", None) or cherrypy.log
    logger = manager.access_log
    if logger.isEnabledFor(logging.INFO) and _has_real_handler(logger):
        cherrypy.log.access()


def _has_real_handler(logger: logging.Logger) -> bool:
    """Whether a line logged on *logger* reaches a handler that writes it
    (CherryPy gives every log a NullHandler, so ``hasHandlers`` is always
    true)."""
    from cherrypy._cplogging import NullHandler

    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, (NullHandler, logging.NullHandler)) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def prepare_direct_request(request: Any, response: Any, head: GetHead, script_name: str, path_info: str,
                           is_index: bool | None, config: dict[str, Any],
                           settings: list[tuple[Callable[[str, Any], None], str, Any]]) -> None:
    """What ``Request.run`` and ``_do_respond`` set up before the handler,
    from a peeked *head* and what the learning request found for its URL
    (``config``, ``is_index``, :func:`direct_settings`): headers (folded as
    cheroot folds them), cookies, ``Host`` and ``base``, the body object,
    ``request.*`` and ``response.*`` config, params. May raise
    ``HTTPError`` as CherryPy would (a bad cookie, a bad query encoding)."""
    import cherrypy
    from cherrypy import _cprequest
    from cherrypy._cpreqbody import RequestBody
    from cherrypy.lib import httputil

    # (request.error_response: the class default, HTTPError(500).set_response,
    # which Request.run sets again per request; it keeps no state of its own.)
    request.method = "GET"
    request.query_string = head.query
    request.params = {}
    request.protocol = (1, 0) if head.http10 else (1, 1)
    response.headers.protocol = request.protocol
    sent = "HTTP/1.0" if head.http10 else "HTTP/1.1"
    request.request_line = f"GET {head.path}?{head.query} {sent}" if head.query else f"GET {head.path} {sent}"
    request.header_list = _as_cheroot_folds(head.headers)
    request.headers = httputil.HeaderMap()
    request.rfile = None
    request.cookie = _cprequest.SimpleCookie()
    request.script_name = script_name
    request.path_info = path_info
    request.stage = "respond"
    request.hooks = request.__class__.hooks.copy()
    request.toolmaps = {}
    request.process_headers()
    request.is_index = is_index
    request.config = dict(config)
    request.handler = None
    request.body = RequestBody(None, request.headers, request_params=request.params)
    for apply, name, value in settings:
        apply(name, value)
    request.process_query_string()


#: A finished direct request's machinery, which no later step uses: the hooks
#: have run, the tools were looked at, the body was never read, the head (and
#: its cookies) is written. ``None`` rather than deleted: CherryPy's class
#: defaults are shared mutable objects a handler must not reach by accident.
_SPENT_REQUEST = {"hooks": None, "toolmaps": None, "namespaces": None, "body": None, "header_list": (), "rfile": None}
_SPENT_RESPONSE = {"header_list": None, "cookie": None, "_body": ()}


def slim_spent_request(request: Any, response: Any) -> None:
    """Let go of what a direct request that is over no longer needs, when a
    generator stream keeps it for its later steps (``cherrypy.request`` there
    is still this request: its headers, cookies, params, config, remote).
    About 25 objects fewer per stream, each of which the garbage collector
    would otherwise go over again and again while the stream is open."""
    vars(request).update(_SPENT_REQUEST)
    vars(response).update(_SPENT_RESPONSE)


def _as_cheroot_folds(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Repeated headers as cheroot hands them on (``comma_separated_headers``):
    list-valued ones joined with ``", "``, for the others the last one sent."""
    import cheroot.server

    comma_separated_headers = getattr(cheroot.server, "comma_separated_headers", ())
    folded: dict[str, tuple[str, str]] = {}
    for name, value in headers:
        key = name.title()
        if key in folded and key.encode("latin-1") in comma_separated_headers:
            value = folded[key][1] + ", " + value
        folded[key] = (key, value)
    return list(folded.values())


def response_head(response: Any, http10: bool, streaming: bool) -> bytes:
    """The status line and headers cheroot would write for *response*
    after ``response.finalize()`` (its ``output_status`` and
    ``header_list``): a stream's body is chunked on HTTP/1.1 (it ends with
    the last chunk), anything else closes the connection."""
    lines = [b"HTTP/1.1 ", response.output_status, b"\r\n"]
    closes = False
    for name, value in response.header_list:
        lines += [name, b": ", value, b"\r\n"]
        closes = closes or (name.lower() == b"connection" and value.lower() == b"close")
    if streaming and not http10:
        lines.append(b"Transfer-Encoding: chunked\r\n")  # as cheroot: the stream ends with the last chunk
    elif not closes:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
