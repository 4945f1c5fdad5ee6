"""Plain WSGI: the same streams with no CherryPy.

>>> from comet import Hub
>>> from comet.wsgi import comet_app
>>> hub = Hub()
>>> @comet_app(transport="sse", heartbeat=15)
... def events(environ):
...     yield from hub.subscribe("lobby", last_id=environ["comet.last_event_id"])

``events`` is now a WSGI application (``events(environ, start_response)``);
serve it with any WSGI server. Under cheroot the stream also notices a client
that went away at once, by probing its socket; under other servers a gone
client is noticed when a heartbeat write fails. Call ``pool.close_all()``
(the pool is ``events.pool``) before stopping the server so streams end at
once instead of at their next tick.

Other servers than cheroot serve streams in thread mode: each open stream
holds one of the server's threads. So that pages keep being served, a
``comet_app`` whose pool has no ``max_streams`` caps its streams at the
server's threads less a reserve (as under CherryPy), for the servers whose
thread count it can tell: waitress, and gunicorn's gthread worker run with
:mod:`comet.gunicorn_conf`. Beyond the cap, ``503`` with ``Retry-After``.
gunicorn's default sync worker, which serves one request at a time per
process, is refused with a ``503`` saying what to run
instead; a multi-process server with an in-memory :class:`~comet.Hub` gets
a warning in the log, once: each process would see only its own events
(use :class:`~comet.backends.redis.RedisHub`).
"""
from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from .errors import InvalidEventId
from .hub import MAX_CURSOR, Hub
from .internals import BACKLOG, connection_for, install_gateway
from .options import Options
from .pipeline import Refusal, open_stream
from .pool import StreamPool
from .tokens import redact_tokens

__all__ = ["comet_app", "resume_id", "install_gateway", "BACKLOG", "server_threads", "tell_threads", "close_all"]

log = logging.getLogger("comet")

# The pools of this process's comet_apps, so a server's shutdown signal can
# end every stream at once (comet.gunicorn_conf, close_all()). Weak: an app
# that goes away takes its pool along.
_POOLS: "weakref.WeakSet[StreamPool]" = weakref.WeakSet()
# Threads per process, when the server told us (comet.gunicorn_conf).
_told_threads: list[int] = []
_warned: set[str] = set()

SINGLE_THREADED = ("this server handles one request at a time per process (gunicorn's default sync worker): a stream would hold it for as long as it is open. Serve streams from a threaded "
                   "server: gunicorn -k gthread --threads 8 -c python:comet.gunicorn_conf, waitress, or cheroot")
MULTIPROCESS = ("comet: a stream follows an in-memory Hub in a multi-process server: each process sees only the "
                "events published in it, so clients miss the others'. Use comet.backends.redis.RedisHub, or one process")

_MAX_ID = MAX_CURSOR  # any cursor a subscription makes (under 5 KB, so it fits an 8 KB request head)
_QUERY_KEY = "last_event_id"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def resume_id(header: str | None, query: str | None) -> str | None:
    """The cursor a client resumes from: the ``Last-Event-ID`` header wins over
    the ``last_event_id`` query parameter (EventSource repeats the page's URL
    on reconnect, with its original query, but sends the newest id in the
    header). Raises :class:`InvalidEventId` for oversize or unsafe values.

    >>> resume_id("1-5", "1-2")
    '1-5'
    >>> resume_id(None, "")
    """
    value = header if header else query
    if not value:
        return None
    if len(value) > _MAX_ID or any(c in value for c in "\r\n\x00"):
        raise InvalidEventId(f"Last-Event-ID must be at most {_MAX_ID} characters without CR, LF or NUL")
    return value


def query_resume_id(environ: dict[str, Any]) -> str | None:
    """The resume cursor of a WSGI request (header, then query)."""
    query = parse_qs(environ.get("QUERY_STRING", "")).get(_QUERY_KEY, [None])[-1]
    return resume_id(environ.get("HTTP_LAST_EVENT_ID"), query)


def server_threads(environ: dict[str, Any]) -> int | None:
    """How many threads serve requests in this process, for the servers
    comet can tell: waitress (its worker threads are named ``waitress-N``)
    and gunicorn's gthread worker under :mod:`comet.gunicorn_conf`;
    ``None`` otherwise.

    >>> server_threads({"SERVER_SOFTWARE": "wsgiref"}) is None
    True
    """
    software = str(environ.get("SERVER_SOFTWARE", ""))
    if software.startswith("gunicorn") and _told_threads:
        return _told_threads[-1]
    if software.startswith("waitress"):
        return sum(1 for t in threading.enumerate() if t.name.startswith("waitress-")) or None
    return None


def tell_threads(threads: int) -> None:
    """Tell comet how many threads serve requests in this process, for a
    server it cannot tell by itself (gunicorn's gthread worker:
    :mod:`comet.gunicorn_conf` calls this); :func:`server_threads` then
    answers it under that server. In a gunicorn ``post_worker_init`` hook::

        tell_threads(worker.cfg.threads)
    """
    _told_threads.append(int(threads))


def close_all() -> None:
    """End the streams of every :func:`comet_app` in this process (a server
    is shutting down): parked ones at once, threaded ones within a second."""
    for pool in list(_POOLS):
        pool.close_all()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _foreign_server(environ: dict[str, Any], pool: StreamPool) -> Refusal | None:
    """Checks for a stream served in thread mode by a server other than
    cheroot: a refusal under gunicorn's sync worker; else the default cap."""
    if environ.get("wsgi.multithread") is False:
        # gunicorn's sync worker means it: one request per process, and a
        # stream would hold it until WORKER TIMEOUT. wsgiref says False even
        # when run with ThreadingMixIn, so elsewhere this is only a warning.
        if str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn"):
            _warn_once("single", "comet: refusing streams: " + SINGLE_THREADED)
            return Refusal(503, SINGLE_THREADED)
        _warn_once("single?", "comet: the server says it serves one request at a time (wsgi.multithread is false): "
                              "each open stream may hold it")
    software = str(environ.get("SERVER_SOFTWARE", ""))
    if software.startswith("gunicorn") and not _told_threads:
        _warn_once("gunicorn", "comet: gunicorn without comet.gunicorn_conf: streams have no cap below its threads, "
                               "and SIGTERM waits graceful_timeout for them. Run gunicorn -c python:comet.gunicorn_conf "
                               "(or import it in your gunicorn.conf.py)")
    if pool.max_streams is None:
        threads = server_threads(environ)
        if threads is not None:
            # As under CherryPy: a reserve of max(2, threads // 10) for pages.
            pool.max_streams = max(1, threads - max(2, threads // 10))
    return None


def refuse(start_response: StartResponse, refusal: Refusal) -> list[bytes]:
    """Write a :class:`~comet.pipeline.Refusal` as a WSGI response."""
    body = refusal.body()
    start_response(refusal.status_line, [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body))), ("Cache-Control", "no-cache"),
                                         *refusal.headers])
    return [body]


def comet_app(handler: Callable[[dict[str, Any]], Any] | None = None, *, pool: StreamPool | None = None,
              **options: Any) -> Any:
    """Turn ``handler(environ) -> iterable`` into a streaming WSGI app.

    Keywords are the :class:`~comet.Options` names (``transport``,
    ``heartbeat``, ...). The resolved resume cursor is in
    ``environ["comet.last_event_id"]``. Streams share ``pool`` (admission cap
    and shutdown); by default each app gets its own, at ``app.pool``.
    """
    opts = Options.from_mapping(options)
    shared = pool if pool is not None else StreamPool()
    _POOLS.add(shared)

    def decorate(func: Callable[[dict[str, Any]], Any]) -> WSGIApp:
        @functools.wraps(func)
        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            method = environ.get("REQUEST_METHOD", "GET")
            for key in ("RAW_URI", "REQUEST_URI"):  # what servers' access logs write (gunicorn: RAW_URI)
                if key in environ:
                    environ[key] = redact_tokens(environ[key])
            cors = opts.cors_headers(environ.get("HTTP_ORIGIN"), method, environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"))
            connection = connection_for(environ)
            try:
                if not connection.parkable and method == "GET":
                    refused = _foreign_server(environ, shared)
                    if refused is not None:
                        raise refused
                environ["comet.last_event_id"] = last_id = query_resume_id(environ)
                opened = open_stream(lambda: func(environ), opts, shared, method=method,
                                     resume_id=last_id, connection=connection)
            except InvalidEventId as exc:
                return refuse(start_response, Refusal(400, str(exc), cors))
            except Refusal as refusal:
                refusal.headers.extend(cors)
                return refuse(start_response, refusal)
            # (wsgiref, "WSGIServer/...", says multiprocess in one process.)
            if (environ.get("wsgi.multiprocess") and not str(environ.get("SERVER_SOFTWARE", "")).startswith("WSGIServer/")
                    and any(type(hub) is Hub for hub in shared.followed_hubs())):
                _warn_once("multiprocess", MULTIPROCESS)
            start_response(opened.status_line, opened.headers + cors)
            return opened.body

        app.pool = shared  # type: ignore[attr-defined]
        app.options = opts  # type: ignore[attr-defined]
        return app

    return decorate(handler) if handler is not None else decorate
