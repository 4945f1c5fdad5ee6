"""Fast routes: a hub channel served from accept to park, with no worker thread.

A parked stream (:mod:`comet.parked`) holds no thread once its headers are
out, but getting there still costs a whole request: cheroot parses it on a
worker thread and CherryPy runs its pipeline, about 1.5 ms of CPU per connect
on a small machine. When every client reconnects at once (a deploy, a network
blip, a proxy restart) 10,000 of them take over 10 s to get back.

A *fast route* is a stream that needs nothing from the framework: a path, a
hub, a channel and stream options. For those, comet looks at each new
connection the moment cheroot accepts it: it peeks at the request head
without consuming it, and if the head is complete and names a fast route, it
answers from the accepting thread (subscribe, headers, park) and cheroot
never sees the request (a head still arriving waits without a thread, see
:class:`comet.internals.AcceptHook`). Everything else goes to cheroot
unchanged; there a WSGI middleware in front of the application serves fast
routes that reach it (TLS, ``%``-escaped paths, pipelined requests) with
:func:`comet.wsgi.comet_app`: still parked, still without CherryPy's
pipeline. Both ways open the stream with :func:`comet.pipeline.open_stream`:
the same bytes and the same errors.

What a fast route does not have, by design: CherryPy tools, sessions,
access logging. Who may follow a stream is decided by the route's optional
``authorize(request)`` callback, shown a :class:`StreamRequest` (path
parameters, query, headers, cookies, peer address); it runs on the thread
that accepts every connection, so it must decide from the request alone
(a signed token, a lookup in memory), never wait on a database or the
network. Streams that need more (sessions, presence, per-user views) stay
``@comet`` handlers.

>>> from comet import Hub
>>> routes = FastRoutes()
>>> hub = Hub()
>>> route = routes.add("/rooms/{room}/events", hub, channel="room:{room}", heartbeat=10)
>>> routes.match("/rooms/lobby-1/events")[1]
{'room': 'lobby-1'}
>>> route.channel_for({"room": "lobby-1"})
'room:lobby-1'
>>> routes.match("/rooms/a/b/events") is None
True

With CherryPy, :meth:`comet.cherrypy_tool.CometPlugin.route` does this on
the engine's pool and server; with a plain cheroot ``wsgi.Server``, call
``routes.install(server)`` before ``server.start()``.
"""
from __future__ import annotations

import email.utils
import functools
import logging
import re
import socket
import time
from typing import Any, Callable, NamedTuple, Sequence
from urllib.parse import parse_qs

from .cursors import MAX_CHANNELS, check_channel
from .errors import Forbidden
from .hub import Hub
from .internals import fast_routes_of, install_accept_hook, install_gateway, keep_fast_routes, parse_get_head, peer_of
from .options import Options
from .pipeline import OWNED, Parking, Refusal, open_stream, refusal_for
from .pool import StreamPool
from .wsgi import StartResponse, comet_app, refuse, resume_id

__all__ = ["FastRoutes", "FastRoute", "StreamRequest"]

log = logging.getLogger("comet")

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: What a ``{name}`` path segment may hold: safe in a URL and a channel name.
_SEGMENT = r"[A-Za-z0-9_.~:@!$&'()*+,;=-]{1,128}"
_QUERY_KEY = "last_event_id"


class _Head(NamedTuple):
    """A complete fast-route GET, parsed at accept time."""

    length: int
    http10: bool
    route: "FastRoute"
    params: dict[str, str]
    query: str
    last_event_id: str | None
    request: "StreamRequest | None"
    origin: str | None = None


class StreamRequest:
    """What a fast route's ``authorize`` callback sees of a request.

    ``headers`` has lower-case names (repeated headers joined as HTTP
    allows); ``remote_addr`` is the peer's IP address (behind a proxy, the
    proxy's: read ``X-Forwarded-For`` from ``headers`` if you trust it).

    >>> request = StreamRequest("/rooms/a/events", {"room": "a"}, "token=abc&x=1",
    ...                         {"cookie": "sid=42; theme=dark"}, "127.0.0.1")
    >>> request.params["room"], request.query["token"], request.cookies["sid"]
    ('a', 'abc', '42')
    """

    def __init__(self, path: str, params: dict[str, str], query_string: str, headers: dict[str, str],
                 remote_addr: str) -> None:
        """See the class docstring."""
        self.path = path
        self.params = params
        self.query_string = query_string
        self.headers = headers
        self.remote_addr = remote_addr

    @functools.cached_property
    def query(self) -> dict[str, str]:
        """The query's fields, the last value of each."""
        return {name: values[-1] for name, values in parse_qs(self.query_string, keep_blank_values=True).items()}

    @functools.cached_property
    def cookies(self) -> dict[str, str]:
        """The ``Cookie`` header's pairs (the first of a repeated name, as browsers send the most specific first)."""
        found: dict[str, str] = {}
        for pair in self.headers.get("cookie", "").split(";"):
            name, sep, value = pair.partition("=")
            name, value = name.strip(), value.strip()
            if sep and name and name not in found:
                found[name] = value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
        return found

    @classmethod
    def from_environ(cls, environ: dict[str, Any], params: dict[str, str]) -> "StreamRequest":
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
        return cls(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), params,
                   environ.get("QUERY_STRING", ""), headers, environ.get("REMOTE_ADDR", ""))

    def __repr__(self) -> str:
        return f"StreamRequest({self.path!r}, params={self.params!r}, from {self.remote_addr})"


class FastRoute:
    """One fast route: a path template, a hub, a channel template, options,
    and who may follow it."""

    def __init__(self, path: str, hub: Hub, channel: str | Sequence[str], options: Options, pool: StreamPool,
                 authorize: Callable[[StreamRequest], bool] | None = None,
                 member: Callable[[StreamRequest], str | None] | None = None) -> None:
        if not isinstance(path, str) or not path.startswith("/") or "?" in path or "%" in path:
            raise ValueError(f"path must be an absolute path without query or %-escapes, got {path!r}")
        if not isinstance(hub, Hub):
            raise TypeError(f"hub must be a comet Hub, got {type(hub).__name__}")
        if not options.framing.streaming or options.mode != "auto":
            raise ValueError("a fast route streams parked: transport sse, chunked or multipart, mode 'auto'")
        if authorize is not None and not callable(authorize):
            raise TypeError(f"authorize must be a callable taking a StreamRequest, got {authorize!r}")
        if member is not None and not callable(member):
            raise TypeError(f"member must be a callable taking a StreamRequest, got {member!r}")
        self.authorize = authorize
        self.member = member
        self._pool = pool
        self.path = path
        self.hub = hub
        self.channel: str | tuple[str, ...] = channel if isinstance(channel, str) else tuple(channel)
        self.options = options
        self.params = _PARAM.findall(path)
        pattern, last = "", 0
        for m in _PARAM.finditer(path):
            pattern += re.escape(path[last:m.start()]) + f"(?P<{m.group(1)}>{_SEGMENT})"
            last = m.end()
        self._regex = re.compile(pattern + re.escape(path[last:]))
        try:
            example = self.channel_for({name: "x" for name in self.params})
            for name in [example] if isinstance(example, str) else example:
                check_channel(name)
            if not isinstance(example, str) and not 0 < len(example) <= MAX_CHANNELS:
                raise ValueError("too many channels")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ValueError(f"channel {channel!r} must be a str, or a list of 1 to {MAX_CHANNELS} str, using only "
                             f"the path's parameters {self.params}") from exc
        # The same route served through cheroot (head not complete at accept,
        # TLS, a pipelined request): comet_app, parked, on the same pool.
        self.app = comet_app(self._subscribe, pool=pool, **{f: getattr(options, f) for f in options.__dataclass_fields__})

    def match(self, path: str) -> dict[str, str] | None:
        m = self._regex.fullmatch(path)
        return None if m is None else m.groupdict()

    def channel_for(self, params: dict[str, str]) -> str | list[str]:
        """The hub channel (or channels) for the values of the path's
        ``{name}`` segments."""
        if isinstance(self.channel, str):
            return self.channel.format(**params) if self.params else self.channel
        return [pattern.format(**params) if self.params else pattern for pattern in self.channel]

    def check(self, request: StreamRequest) -> None:
        """Raise :class:`~comet.Forbidden` unless ``authorize`` allows *request*
        (a falsy answer or a ``PermissionError`` refuses; anything else it
        raises is a server error, and refuses too)."""
        if self.authorize is None:
            return
        try:
            allowed = self.authorize(request)
        except PermissionError as exc:
            self._pool.counters.add("forbidden")
            if isinstance(exc, Forbidden):
                raise
            raise Forbidden(str(exc) or "not allowed to follow this stream") from exc
        if not allowed:
            self._pool.counters.add("forbidden")
            raise Forbidden("not allowed to follow this stream")

    def member_of(self, request: StreamRequest) -> str | None:
        """Whose stream *request* opens (presence), by the ``member`` callback."""
        return None if self.member is None else self.member(request)

    def _subscribe(self, environ: dict[str, Any]) -> Any:
        return self.hub.subscribe(self.channel_for(environ["comet.route"]), last_id=environ["comet.last_event_id"],
                                  member=environ.get("comet.member"))

    def __repr__(self) -> str:
        return f"FastRoute({self.path!r} -> {self.channel!r} on {self.hub!r})"


class FastRoutes:
    """The fast routes of one server, sharing one :class:`StreamPool`
    (admission caps, counters, shutdown).

    :meth:`add` routes; :meth:`install` puts them in front of a cheroot
    server; :meth:`wsgi` alone wraps any WSGI app (no accept-time path, but
    still no framework in the way).
    """

    def __init__(self, pool: StreamPool | None = None) -> None:
        self.pool = pool if pool is not None else StreamPool()
        self._routes: list[FastRoute] = []
        self._date = (0, b"")
        # the Server header of the routes' answers, once installed on a server
        self._server = ""

    def add(self, path: str, hub: Hub, channel: str | Sequence[str], *,
            authorize: Callable[[StreamRequest], bool] | None = None,
            member: Callable[[StreamRequest], str | None] | None = None, **options: Any) -> FastRoute:
        """Serve *channel* of *hub* at *path*. ``{name}`` segments of *path*
        match one URL segment each and may be used in *channel*
        (``"/rooms/{room}/events"``, ``"room:{room}"``); a list of channels
        makes one stream of them all (``["room:{room}", "lobby"]``, see
        :class:`~comet.hub.MultiSubscription`). Keywords are the
        :class:`~comet.Options` names; resume (``Last-Event-ID`` or
        ``?last_event_id=``), heartbeats, gaps and caps work as for ``@comet``.

        *authorize*, if given, is called with a :class:`StreamRequest` before
        anything else; a falsy answer, :class:`~comet.Forbidden` or any
        ``PermissionError`` gets ``403`` with the error's message. It must be
        quick and must not block (see the module's introduction).

        *member*, if given, is called next with the same request and names
        the member whose stream it is (``None``: nobody's), for presence
        (:meth:`Hub.members <comet.Hub.members>`, :meth:`Hub.disconnect
        <comet.Hub.disconnect>`); with stream tokens,
        ``member=lambda request: tokens.verify(request.query.get("token", ""))``.
        """
        route = FastRoute(path, hub, channel, Options.from_mapping(options), self.pool, authorize, member)
        for other in self._routes:
            if other._regex.pattern == route._regex.pattern:
                raise ValueError(f"a fast route for {path!r} exists already")
        self._routes.append(route)
        return route

    @property
    def routes(self) -> list[FastRoute]:
        return list(self._routes)

    def match(self, path: str) -> tuple[FastRoute, dict[str, str]] | None:
        for route in self._routes:
            params = route.match(path)
            if params is not None:
                return route, params
        return None

    # -- inside WSGI ---------------------------------------------------------

    def wsgi(self, app: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """A WSGI app serving the fast routes and passing everything else to
        *app* (404 without one)."""
        def fast_routes(environ: dict[str, Any], start_response: StartResponse) -> Any:
            found = self.match(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
            if found is None:
                if app is None:
                    return refuse(start_response, Refusal(404, "no such stream"))
                return app(environ, start_response)
            if self._server:
                start_response = _with_server(start_response, self._server)
            route, environ["comet.route"] = found
            if environ.get("REQUEST_METHOD") == "GET":
                try:
                    request = StreamRequest.from_environ(environ, environ["comet.route"])
                    route.check(request)
                    environ["comet.member"] = route.member_of(request)
                except Exception as exc:
                    return refuse(start_response, _refusal(exc))
                self.pool.counters.add("routed_wsgi")
            return route.app(environ, start_response)

        fast_routes.comet_routes = self  # type: ignore[attr-defined]
        fast_routes.comet_inner = app  # type: ignore[attr-defined]  # what is behind it (comet.direct checks)
        return fast_routes

    # -- at accept -------------------------------------------------------------

    def install(self, server: Any) -> None:
        """Serve the routes on cheroot *server*: at accept time when the
        request head is complete, else through a WSGI middleware in front of
        ``server.wsgi_app``. Idempotent; one ``FastRoutes`` per server.
        """
        current = fast_routes_of(server)
        if current is self:
            return
        if current is not None:
            raise ValueError("this server already has other fast routes installed")
        install_gateway(server)
        self._server = _server_name(server)
        server.wsgi_app = self.wsgi(server.wsgi_app)
        install_accept_hook(server, self.take, first=True)
        keep_fast_routes(server, self)

    def take(self, sock: socket.socket, head: bytes, conn: Any) -> bool:
        """Serve a complete request *head* peeked from *sock* if it is a
        fast-route GET (True); else False, with nothing read."""
        if not self._routes:
            return False
        parsed = self._parse(head)
        if parsed is None:
            return False
        route = parsed.route
        channel = route.channel_for(parsed.params)
        cursor = parsed.last_event_id or parse_qs(parsed.query).get(_QUERY_KEY, [None])[-1]
        if not route.hub.is_local(channel, cursor or None):
            return False  # the subscribe would wait on the network: not on this thread (invariant I12)
        if parsed.request is not None:
            parsed.request.remote_addr = peer_of(conn).remote_addr
        try:
            member = None
            if parsed.request is not None:  # (parsed only for a route that asks)
                route.check(parsed.request)
                member = route.member_of(parsed.request)
            last_id = resume_id(parsed.last_event_id, parse_qs(parsed.query).get(_QUERY_KEY, [None])[-1])
            opened = open_stream(lambda: route.hub.subscribe(channel, last_id=last_id, member=member), route.options,
                                 self.pool, resume_id=last_id, connection=OWNED)
        except Exception as exc:
            refusal = _refusal(exc)
            refusal.headers.extend(route.options.cors_headers(parsed.origin))
            _consume(sock, parsed.length)
            _write_refusal(sock, refusal, self._server)
            return True
        body = opened.body
        assert isinstance(body, Parking)
        try:
            _consume(sock, parsed.length)
        except OSError:
            body.close()
            sock.close()
            return True
        self.pool.counters.add("routed_fast")
        body.park(sock, not parsed.http10, self._head(opened.headers + route.options.cors_headers(parsed.origin), parsed.http10))
        return True

    def _parse(self, head: bytes) -> _Head | None:
        """The parts of a complete fast-route GET, or ``None`` (not ours).
        Anything irregular is left to cheroot, which answers malformed
        requests itself."""
        got = parse_get_head(head)
        if got is None:
            return None
        found = self.match(got.path)
        if found is None:
            return None
        route, params = found
        last_event_id = origin = None
        headers: dict[str, str] | None = {} if route.authorize is not None or route.member is not None else None
        for name, value in got.headers:
            key = name.lower()
            if key == "last-event-id":
                last_event_id = value
            elif key == "origin":
                origin = value
            if headers is not None:
                if key in headers:  # as cheroot folds repeated headers into environ
                    value = headers[key] + ("; " if key == "cookie" else ", ") + value
                headers[key] = value
        request = None
        if headers is not None:
            request = StreamRequest(got.path, params, got.query, headers, "")
        return _Head(got.length, got.http10, route, params, got.query, last_event_id, request, origin)

    def _head(self, headers: list[tuple[str, str]], http10: bool) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True).encode())
        return b"".join([
            b"HTTP/1.1 200 OK\r\n",
            *(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")) for name, value in headers),
            # As the middleware's (cheroot's) answer: HTTP/1.1 streams end with
            # the last chunk, HTTP/1.0 ones by closing.
            b"Connection: close\r\n" if http10 else b"Transfer-Encoding: chunked\r\n",
            b"Server: %s\r\n" % self._server.encode("latin-1") if self._server else b"",
            b"Date: ", self._date[1], b"\r\n\r\n",
        ])




def _consume(sock: socket.socket, length: int) -> None:
    """Read the peeked head for good (it is there: never short)."""
    if len(sock.recv(length, socket.MSG_DONTWAIT)) != length:
        raise OSError("request head vanished between peek and read")


def _refusal(exc: BaseException) -> Refusal:
    refusal = refusal_for(exc)
    if refusal is None:
        log.error("comet: fast route failed", exc_info=exc)
        return Refusal(500, "internal server error")
    return refusal


def _server_name(server: Any) -> str:
    """What to put in ``Server``. cheroot sends its ``server_name`` there, and
    CherryPy sets that to the address it binds (``127.0.0.1``), which names
    nothing: then the server's version (``CherryPy/18.10.0 Cheroot/11.1.2``)."""
    name = str(getattr(server, "server_name", "") or "")
    bind = getattr(server, "bind_addr", None)
    host = bind[0] if isinstance(bind, tuple) else bind
    if not name or name == host:
        return str(getattr(server, "version", "") or name)
    return name


def _with_server(start_response: StartResponse, name: str) -> StartResponse:
    """*start_response* that adds ``Server: name`` (else cheroot adds its ``server_name``)."""
    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not any(key.lower() == "server" for key, _ in headers):
            headers = [*headers, ("Server", name)]
        return start_response(status, headers, exc_info)
    return start


def _write_refusal(sock: socket.socket, refusal: Refusal, server: str = "") -> None:
    """The same plain-text answers :func:`comet.wsgi.comet_app` gives."""
    extra = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in refusal.headers)
    if server:
        extra += b"Server: %s\r\n" % server.encode("latin-1")
    body = refusal.body()
    data = b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s" % (
        refusal.status_line.encode(), len(body), extra, body)
    try:
        sock.send(data, socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
