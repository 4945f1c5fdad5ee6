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
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from .errors import InvalidEventId
from .internals import connection_for, install_gateway
from .options import Options
from .pipeline import Refusal, open_stream
from .pool import StreamPool

__all__ = ["comet_app", "resume_id", "install_gateway"]

_MAX_ID = 256
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

    def decorate(func: Callable[[dict[str, Any]], Any]) -> WSGIApp:
        @functools.wraps(func)
        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            method = environ.get("REQUEST_METHOD", "GET")
            cors = opts.cors_headers(environ.get("HTTP_ORIGIN"), method, environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"))
            try:
                environ["comet.last_event_id"] = last_id = query_resume_id(environ)
                opened = open_stream(lambda: func(environ), opts, shared, method=method,
                                     resume_id=last_id, connection=connection_for(environ))
            except InvalidEventId as exc:
                return refuse(start_response, Refusal(400, str(exc), cors))
            except Refusal as refusal:
                refusal.headers.extend(cors)
                return refuse(start_response, refusal)
            start_response(opened.status_line, opened.headers + cors)
            return opened.body

        app.pool = shared  # type: ignore[attr-defined]
        app.options = opts  # type: ignore[attr-defined]
        return app

    return decorate(handler) if handler is not None else decorate
