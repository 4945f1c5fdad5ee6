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
import select
import socket
import ssl
from http import HTTPStatus
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from .errors import InvalidEventId, StreamsExhausted
from .options import Options
from .stream import Probe, Stream, StreamPool, _close_quietly, http_error

__all__ = ["comet_app", "resume_id", "socket_probe", "install_gateway", "cheroot_handoff"]

_MAX_ID = 256
_QUERY_KEY = "last_event_id"


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


def _find_socket(obj: Any) -> socket.socket | None:
    # cheroot: wsgi.input -> KnownLengthRFile/ChunkedRFile .rfile -> StreamReader
    # .raw -> SocketIO ._sock. Walk it defensively: other servers lack it.
    for _ in range(5):
        if isinstance(obj, socket.socket):
            return obj
        for attr in ("rfile", "raw", "_sock"):
            nxt = getattr(obj, attr, None)
            if nxt is not None:
                obj = nxt
                break
        else:
            return None
    return obj if isinstance(obj, socket.socket) else None


def socket_probe(environ: dict) -> Probe | None:
    """A callable answering "has the client closed the connection?" without
    blocking, or ``None`` when the server does not expose the socket.

    A streaming client sends nothing after its request, so a readable socket
    whose peek returns no bytes means the peer closed. TLS sockets cannot be
    peeked; there the failed heartbeat write notices the disconnect instead.
    """
    sock = environ.get("comet.socket") or _find_socket(environ.get("wsgi.input"))
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return None

    def probe() -> bool:
        try:
            if sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLERR | select.POLLHUP):
                return True
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    return probe


def install_gateway(server: Any) -> None:
    """Let comet park streams on a cheroot server: its gateway adds the
    cheroot request to the environ (``comet.request``), which is what a
    stream needs to take its connection over. Idempotent.

    >>> from cheroot import wsgi
    >>> server = wsgi.Server(("127.0.0.1", 0), lambda e, s: [])
    >>> install_gateway(server)
    >>> server.gateway.__name__
    'CometGateway'
    """
    base = server.gateway
    if getattr(base, "comet", False):
        return

    class CometGateway(base):
        comet = True

        def get_environ(self):
            environ = super().get_environ()
            environ["comet.request"] = self.req
            return environ

    server.gateway = CometGateway


def cheroot_handoff(environ: dict) -> Callable[[], tuple[socket.socket, bool] | None] | None:
    """How to take this request's connection from cheroot once the headers
    are out, or ``None`` if it cannot be (no comet gateway, TLS).

    Taking over means: no terminating chunk from cheroot (``chunked_write``
    off: the writer thread frames chunks itself), no keep-alive
    (``close_connection``), and no close of the socket when cheroot lets the
    connection go (``linger``, the flag cheroot has for exactly this).
    """
    req = environ.get("comet.request")
    conn = getattr(req, "conn", None)
    sock = getattr(conn, "socket", None)
    if type(sock) is not socket.socket:  # TLS (ssl.SSLSocket, pyOpenSSL) keeps its thread
        return None

    def handoff() -> tuple[socket.socket, bool] | None:
        if conn.rfile.has_data():
            return None  # a pipelined request is buffered: let cheroot serve it
        chunked = bool(req.chunked_write)
        req.chunked_write = False
        req.close_connection = True
        conn.linger = True
        return sock, chunked

    return handoff


def _reply(start_response: Callable, status: int, reason: str, headers: list[tuple[str, str]] = ()) -> list[bytes]:
    body = (reason + "\n").encode("utf-8")
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers])
    return [body]


def comet_app(handler: Callable[[dict], Iterable[Any]] | None = None, *, pool: StreamPool | None = None, **options: Any):
    """Turn ``handler(environ) -> iterable`` into a streaming WSGI app.

    Keywords are the :class:`~comet.Options` names (``transport``,
    ``heartbeat``, ...). The resolved resume cursor is in
    ``environ["comet.last_event_id"]``. Streams share ``pool`` (admission cap
    and shutdown); by default each app gets its own, at ``app.pool``.
    """
    opts = Options.from_mapping(options)
    shared = pool if pool is not None else StreamPool()

    def decorate(func: Callable[[dict], Iterable[Any]]):
        @functools.wraps(func)
        def app(environ: dict, start_response: Callable):
            query = parse_qs(environ.get("QUERY_STRING", "")).get(_QUERY_KEY, [None])[-1]
            try:
                environ["comet.last_event_id"] = resume_id(environ.get("HTTP_LAST_EVENT_ID"), query)
                ticket = shared.admit(opts.transport)
            except StreamsExhausted as exc:
                return _reply(start_response, 503, str(exc), [("Retry-After", str(exc.retry_after))])
            except InvalidEventId as exc:
                return _reply(start_response, 400, str(exc))
            stream = items = None
            try:
                items = func(environ)
                stream = Stream(items, opts, shared, ticket, probe=socket_probe(environ),
                                resume_id=environ["comet.last_event_id"], handoff=cheroot_handoff(environ))
                stream.prime()
                if opts.transport == "longpoll":
                    body = stream.longpoll_body()
            except Exception as exc:
                if stream is not None:
                    stream.close()
                else:
                    shared.release(ticket)
                    _close_quietly(items)
                if getattr(exc, "retry_after", None) is not None:  # full, or the backend is down
                    return _reply(start_response, 503, str(exc), [("Retry-After", str(exc.retry_after))])
                error = http_error(exc)
                if error is None:
                    raise
                return _reply(start_response, *error)
            if opts.transport == "longpoll":
                stream.close()
                start_response("200 OK", [*stream.headers(), ("Content-Length", str(len(body)))])
                return [body]
            start_response("200 OK", stream.headers())
            return stream

        app.pool = shared
        app.options = opts
        return app

    return decorate(handler) if handler is not None else decorate
