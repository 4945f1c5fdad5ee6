"""``@comet`` handlers served where cheroot accepts the connection.

Through CherryPy's whole request pipeline, a stream connect costs about 1 ms
of CPU on a small machine: cheroot's connection objects, header parser and
worker hand-off, the WSGI layers, dispatch, config merging, tools and hooks.
When every client reconnects at once (a deploy, a proxy restart), 10,000 of
them take 10 s to get back, most of it spent on steps that did nothing for
a stream.

So the pipeline learns. When a ``GET`` reaches a ``@comet`` handler through
it and the stream parks, comet looks at what the pipeline did for that URL:
if nothing beyond CherryPy's defaults and comet's own (the default
dispatcher, request and response classes and WSGI pipeline; no tool but
``encode``, ``gzip``, ``trailing_slash``, ``log_headers`` and
``log_tracebacks``; no hooks; no custom config namespace), the URL is
*direct* for the next second. A ``GET`` of a direct URL is recognised by
the accept-time hook (:class:`comet.internals.AcceptHook`) from its peeked
head, and a step thread (:mod:`comet.steps`) serves it: it builds the
request CherryPy would have (``cherrypy.request`` and ``cherrypy.response``
with their headers, cookies, params, config, ``request.*`` and
``response.*`` settings), calls the handler, writes the head and parks the
stream. The handler cannot tell: it runs with the same request it would
have had, and its first step runs on a step thread as it would have.
Every second, one request of each URL goes through the pipeline again, so a
config change or a newly enabled tool takes effect within a second.

Anything else (another method, a URL not yet seen, TLS, an escaped path, a
body, a handler that refused or did not park, a tool such as sessions or
auth) goes through CherryPy as before. Errors are answered as the pipeline
answers a ``@comet`` handler's: a 4xx in plain text, a redirect as a
redirect, and a 500 without a traceback (logged to ``cherrypy.log``).
Access log lines are written as CherryPy writes them.

>>> DirectHandlers(StreamPool()).take(None, b"GET /events HTTP/1.1\\r\\n\\r\\n", None)  # nothing learned yet
False
"""
from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from typing import Any, Callable, NamedTuple

import cherrypy

from .internals import (GetHead, Peer, begin_direct_request, direct_settings, end_direct_request, http_error_reason,
                        mark_direct, parse_get_head, peer_of, prepare_direct_request, response_head, slim_spent_request,
                        why_not_direct, write_access_log)
from .pipeline import Parking, Refusal
from .pool import StreamPool

__all__ = ["DirectHandlers"]

log = logging.getLogger("comet")

#: Seconds a URL stays direct after a request through the pipeline showed
#: it may be: a config change takes effect within this time.
TTL = 1.0
#: URLs kept direct at once, at most (a URL per room or per user is common).
MAX_URLS = 10_000

class _Direct(NamedTuple):
    """A URL learned to be direct."""

    app: Any
    script_name: str
    path_info: str
    is_index: bool | None
    config: dict[str, Any]
    settings: list[tuple[Callable[[str, Any], None], str, Any]]
    #: The ``@comet`` wrapper, with the instance and the URL's positional
    #: (virtual path) arguments bound: call it with the query's params.
    call: Callable[..., Any]
    until: float


class DirectHandlers:
    """The URLs of ``@comet`` handlers served at accept time; see the module.
    One per engine plugin (``engine_plugin().direct``)."""

    def __init__(self, pool: StreamPool) -> None:
        self.pool = pool
        self._urls: dict[str, _Direct] = {}
        self._lock = threading.Lock()
        #: The cheroot server whose accept hook serves them.
        self.server: Any = None

    def clear(self) -> None:
        """Forget every URL (engine start and stop)."""
        with self._lock:
            self._urls = {}

    def __len__(self) -> int:
        return len(self._urls)

    # -- learning, inside a request that went through the pipeline -------------

    def learn(self, call: Callable[..., Any]) -> bool:
        """The current request reached a ``@comet`` handler (*call*, with its
        positional arguments bound) and parked: make its URL direct if the
        pipeline did nothing for it that a direct request would miss."""
        request = cherrypy.serving.request
        if self.server is None or why_not_direct(request, self.server) is not None:
            return False
        path = request.script_name + request.path_info
        entry = _Direct(request.app, request.script_name, request.path_info, request.is_index, dict(request.config),
                        direct_settings(request), call, time.monotonic() + TTL)
        with self._lock:
            if len(self._urls) >= MAX_URLS:
                now = time.monotonic()
                self._urls = {url: d for url, d in self._urls.items() if d.until > now}
                if len(self._urls) >= MAX_URLS:
                    return False
            self._urls[path] = entry
        return True

    # -- at accept --------------------------------------------------------------

    def take(self, sock: socket.socket, head: bytes, conn: Any) -> bool:
        """Serve a complete request *head* peeked from *sock* if it is a
        ``GET`` of a direct URL (True, on a step thread); else False, with
        nothing read."""
        if not self._urls:
            return False
        got = parse_get_head(head)
        if got is None:
            return False
        entry = self._urls.get(got.path)
        if entry is None or entry.until < time.monotonic():
            return False
        if cherrypy.tree.apps.get(entry.script_name) is not entry.app:
            return False  # unmounted or replaced since
        writer = self.pool.writer()
        if writer is None:
            return False  # stopping: cheroot answers as it does
        self.pool.counters.add("routed_direct")
        # Served on the connect pool, not on cheroot's accepting thread (invariant I12).
        writer.connects.submit(functools.partial(self._serve, entry, sock, got, peer_of(conn)))
        return True

    def _serve(self, entry: _Direct, sock: socket.socket, got: GetHead, peer: Peer) -> None:
        """On a step thread: the request CherryPy would have made, the
        handler, the response head, the stream parked."""
        try:
            if len(sock.recv(got.length, socket.MSG_DONTWAIT)) != got.length:
                raise OSError("request head vanished between peek and read")
        except OSError:
            sock.close()
            return
        request, response = begin_direct_request(entry.app, peer)
        kept = False
        try:
            kept = self._respond(entry, sock, got, request, response)
        finally:
            end_direct_request(request)
        if kept:
            slim_spent_request(request, response)

    def _respond(self, entry: _Direct, sock: socket.socket, got: GetHead, request: Any, response: Any) -> bool:
        """Serve it; True if a parked generator keeps the request for its
        later steps."""
        body: Any = None
        try:
            prepare_direct_request(request, response, got, entry.script_name, entry.path_info, entry.is_index,
                                   entry.config, entry.settings)
            mark_direct(request)  # comet.cherrypy_tool._serve: the socket is comet's
            body = entry.call(**request.params)
        except cherrypy.HTTPRedirect as redirect:
            redirect.set_response()
            body = response.body
        except cherrypy.HTTPError as exc:
            if exc.code >= 500:
                _fail(sock, exc)
                return False
            body = _plain(response, exc.code, http_error_reason(exc))
        except Exception as exc:
            _fail(sock, exc)
            return False
        try:
            if isinstance(body, Parking):
                response.stream = True
                response.body = []
                response.finalize()
                head = response_head(response, got.http10, streaming=True)
            else:
                response.body = body if body is not None else b""
                response.finalize()
                head = response_head(response, got.http10, streaming=False) + b"".join(response.body)
        except Exception as exc:  # a bad status or header the handler set: as the pipeline, a 500
            if isinstance(body, Parking):
                body.close()
            _fail(sock, exc)
            return False
        if isinstance(body, Parking):
            body.park(sock, not got.http10, head, step_here=True)
        else:
            _send_and_close(sock, head)
        try:
            write_access_log()
        except Exception:
            cherrypy.log.error(traceback=True)
        return isinstance(body, Parking) and body.context is not None


def _plain(response: Any, status: int, reason: str) -> bytes:
    refusal = Refusal(status, reason)
    response.status = refusal.status
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    response.headers["Cache-Control"] = "no-cache"
    return refusal.body()


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(5)  # a few hundred bytes: only a client that reads nothing could make this wait
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def _fail(sock: socket.socket, exc: BaseException) -> None:
    log.error("comet: a directly served stream handler failed", exc_info=exc)
    body = b"internal server error\n"
    _send_and_close(sock, b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
