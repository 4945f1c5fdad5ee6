"""Every private cheroot and CherryPy detail comet relies on, in one place.

Nothing else in comet reaches into a server. Each entry says what is used
and why; ``setup.py`` pins cheroot and CherryPy to the range the suite has
passed on, and the suite runs on the lowest and newest of it.

cheroot (``cheroot.server``, ``cheroot.connections``):

===================================  ===========================================
``HTTPServer.gateway``               subclassed (:func:`install_gateway`) to put
                                     the cheroot request in the environ
                                     (``comet.request``): a stream needs it to
                                     take its connection over.
``HTTPServer.process_conn``          replaced per server instance by
                                     :class:`AcceptHook`: comet looks at each
                                     connection before a worker thread does.
``HTTPServer.ssl_adapter``,          TLS servers are left alone (an ``ssl``
``.timeout``                         socket cannot be peeked); how long a
                                     request head may take to arrive.
``HTTPConnection.socket``,           the plain socket (``type(...) is
``.rfile.has_data()``,               socket.socket``), whether cheroot buffered
``.remote_addr``, ``.remote_port``,  bytes already (a pipelined request), the
``.server``, ``.close()``,           peer, the server, closing; dropping
``.rfile``, ``.wfile``               cheroot's file objects when a fast route
                                     takes a socket.
``HTTPServer.server_name``,          a direct request's ``request.local``, as
``.bind_addr``                       CherryPy's WSGI gateway makes it.
``HTTPConnection.linger``            set when a stream takes the connection:
                                     cheroot then leaves the socket open
                                     (the flag cheroot has for exactly this).
``HTTPRequest.conn``,                to take a connection: send the head now
``.ensure_headers_sent()``,          (also for a long-poll, whose body comes
``.chunked_write``,                  later), learn whether it is chunked, stop
``.close_connection``                cheroot's terminating chunk and keep-alive.
``comma_separated_headers``          how cheroot folds repeated headers; a
                                     direct request folds them the same way.
===================================  ===========================================

CherryPy (``cherrypy._cprequest``, ``cherrypy.lib``):

===================================  ===========================================
``request._sessionsaved``            the guard of ``cherrypy.lib.sessions.save``:
                                     a stream saves and unlocks the session at
                                     its start (:func:`release_session`).
``ResponseEncoder.add_charset``,     the encode tool must not relabel stream
``handler.oldhandler``               bytes (:func:`keep_charset`).
``Request`` attributes that          a *direct* request (:mod:`comet.direct`)
``Request.run`` and ``_do_respond``  is built as those two build one
set up (``header_list``,             (:func:`prepare_direct_request`), minus
``hooks``, ``toolmaps``,             the steps that did nothing for its URL
``process_headers()``, ...);         when a request went through the whole
``Response.finalize()``,             pipeline (:func:`why_not_direct`: the
``.output_status``,                  hooks and their callbacks, the dispatcher
``.header_list``; ``app.toolboxes``, and WSGI pipeline, config namespaces);
``app.wsgiapp.pipeline``,            the response head is the one cheroot
``request.hooks`` and ``Hook``       would write from ``finalize()``.
``.callback``
``request.hooks``, ``.toolmaps``,   a direct request that a generator stream
``.namespaces``, ``.body``,          keeps for its later steps lets go of
``.header_list``, ``.rfile``;        these once it is over
``response.header_list``,            (:func:`slim_spent_request`): less memory
``.cookie``                          and garbage-collector work per stream.
===================================  ===========================================

A failure in the accept-time hook hands the connection back to cheroot
untouched (nothing was read from it), so an ordinary page never fails
because of comet.
"""
from __future__ import annotations

import errno
import functools
import heapq
import logging
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, ContextManager, NamedTuple

__all__ = ["install_gateway", "install_accept_hook", "AcceptHook", "CherootConnection", "connection_for", "GetHead", "parse_get_head",
           "why_not_direct", "begin_direct_request", "end_direct_request", "prepare_direct_request",
           "direct_settings", "write_access_log", "slim_spent_request",
           "release_session", "keep_charset", "request_context", "MAX_HEAD", "Peer", "peer_of"]

log = logging.getLogger("comet")

#: A request head larger than this is left to cheroot as it is.
MAX_HEAD = 8192
#: Connections whose head is still arriving, at most, per server.
MAX_WAITING = 50_000

#: ``(socket, head, connection) -> bool``: serve a complete request head
#: here (a fast route) and say so; False leaves it to cheroot untouched.
#: The connection is cheroot's; read its peer with :func:`peer_of`.
HeadTaker = Callable[[socket.socket, bytes, Any], bool]


class Peer(NamedTuple):
    """Who is at either end of a connection, as CherryPy's WSGI gateway
    tells a request (``request.local``, ``request.remote``): the server's
    name and port, the client's address and port (-1 when unknown)."""
    server_name: str
    server_port: int
    remote_addr: str
    remote_port: int


def peer_of(conn: Any) -> Peer:
    """The :class:`Peer` of cheroot connection *conn*, from what cheroot
    knows already (no ``getsockname``/``getpeername``: a syscall each)."""
    server = getattr(conn, "server", None)
    bind = getattr(server, "bind_addr", None)
    port = int(bind[1]) if isinstance(bind, tuple) and len(bind) > 1 and bind[1] else -1
    return Peer(str(getattr(server, "server_name", "") or ""), port,
                str(getattr(conn, "remote_addr", "") or ""), int(getattr(conn, "remote_port", None) or -1))


# -- the gateway and the connection of one request ------------------------------


def install_gateway(server: Any) -> None:
    """Let comet park streams on a cheroot server, and keep incomplete
    request heads off its worker threads (:class:`AcceptHook`). Idempotent;
    the CherryPy plugin does it for ``cherrypy.server``.

    >>> from cheroot import wsgi
    >>> server = wsgi.Server(("127.0.0.1", 0), lambda e, s: [])
    >>> install_gateway(server)
    >>> server.gateway.__name__
    'CometGateway'
    """
    base = server.gateway
    if not getattr(base, "comet", False):
        class CometGateway(base):  # type: ignore[misc, valid-type]
            comet = True

            def get_environ(self) -> dict[str, Any]:
                environ: dict[str, Any] = super().get_environ()
                environ["comet.request"] = self.req
                return environ

        server.gateway = CometGateway
    install_accept_hook(server)


class CherootConnection:
    """The connection of one cheroot request, as :func:`comet.pipeline.open_stream` needs it."""

    def __init__(self, request: Any) -> None:
        self._req = request
        self._conn = request.conn
        sock = getattr(self._conn, "socket", None)
        self._sock: socket.socket | None = sock if type(sock) is socket.socket else None
        #: TLS (ssl.SSLSocket, pyOpenSSL) keeps its thread: writes may need reads.
        self.parkable = self._sock is not None
        #: The TCP socket, TLS included, for socket options (comet.liveness).
        self.tcp_socket: socket.socket | None = sock if isinstance(sock, socket.socket) else None

    def closed(self) -> bool:
        # Under TLS, the TCP socket beneath (a TLS stream is not "closed" for
        # want of a plain socket: it would end at its first idle tick).
        return self.tcp_socket is not None and _peer_closed(self.tcp_socket)

    def take(self) -> tuple[socket.socket, bool]:
        assert self._sock is not None
        req = self._req
        req.ensure_headers_sent()
        chunked = bool(req.chunked_write)
        req.chunked_write = False  # the writer frames chunks itself, and writes the last one
        req.close_connection = True  # no keep-alive: the writer closes when the stream ends
        self._conn.linger = True  # cheroot leaves the socket open when it lets the connection go
        return self._sock, chunked


class _SocketOnly:
    """A connection comet can only watch (another WSGI server)."""

    parkable = False

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock
        self.tcp_socket = sock

    def closed(self) -> bool:
        return self._sock is not None and _peer_closed(self._sock)

    def take(self) -> tuple[socket.socket, bool]:  # pragma: no cover - never parkable
        raise RuntimeError("this connection cannot be taken over")


def connection_for(environ: dict[str, Any]) -> CherootConnection | _SocketOnly:
    """The connection of the request in *environ*: cheroot's with comet's
    gateway can be taken over; elsewhere comet can at best notice a client
    that went away (when it finds the socket)."""
    request = environ.get("comet.request")
    if request is not None and getattr(request, "conn", None) is not None:
        return CherootConnection(request)
    sock = environ.get("comet.socket") or _find_socket(environ.get("wsgi.input"))
    return _SocketOnly(sock if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket) else None)


def _find_socket(obj: Any) -> socket.socket | None:
    # cheroot without comet's gateway: wsgi.input -> KnownLengthRFile .rfile
    # -> StreamReader .raw -> SocketIO ._sock. Walked defensively.
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


def _peer_closed(sock: socket.socket) -> bool:
    """Has the peer closed? A streaming client sends nothing after its
    request, so a readable socket whose peek returns no bytes means it has."""
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
        # The TCP bytes, also under TLS (ssl.SSLSocket.recv refuses flags).
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# -- at accept -------------------------------------------------------------------


def install_accept_hook(server: Any, routes: HeadTaker | None = None, first: bool = False) -> "AcceptHook":
    """Put an :class:`AcceptHook` in front of cheroot *server* (idempotent);
    *routes*, if given, may take complete request heads (fast routes:
    ``first``, before any taker already there)."""
    hook: AcceptHook | None = getattr(server, "_comet_accept", None)
    if hook is None:
        hook = AcceptHook(server)
        server._comet_accept = hook
        server.process_conn = hook.process_conn
    if routes is not None and routes not in hook.takers:
        hook.takers.insert(0 if first else len(hook.takers), routes)
    hook.start()
    return hook


class AcceptHook:
    """Looks at each connection cheroot accepts (or finds readable again
    after a keep-alive request) before a worker thread does.

    * A complete request head goes to cheroot as usual, unless ``routes``
      takes it (a fast route is answered right here).
    * A head that has not fully arrived waits in :class:`_HeadWaiter`, one
      thread around an edge-triggered epoll: no worker thread is held by a
      slow or stalled client (slowloris), and no core spins on bytes that sit
      peeked but unread. When the head is complete it goes on as above; if
      it takes longer than the server's ``timeout``, the client gets ``408``.
    * Anything unusual (TLS, bytes cheroot buffered already, no epoll, an
      error in comet) goes to cheroot untouched.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.original: Callable[[Any], None] = server.process_conn
        #: Asked in order whether they serve a complete head (fast routes,
        #: then handlers served directly: :mod:`comet.direct`).
        self.takers: list[HeadTaker] = []
        self._waiter: _HeadWaiter | None = None
        self._lock = threading.Lock()

    def process_conn(self, conn: Any) -> None:
        # Runs on cheroot's connection-manager thread: must never raise or block.
        try:
            if self._look(conn):
                return
        except Exception:
            log.exception("comet: accept-time hook failed; the connection goes to cheroot untouched")
        self._hand_back(conn)

    def _hand_back(self, conn: Any) -> None:
        """Give *conn* to cheroot as it was: :func:`_peek` left its socket
        non-blocking (so it stays when comet takes it, two syscalls fewer a
        stream); cheroot reads with its ``server.timeout``, which it sets on
        every socket it accepts."""
        try:
            sock = getattr(conn, "socket", None)
            if type(sock) is socket.socket and sock.gettimeout() == 0.0:
                sock.settimeout(self.server.timeout)
        except Exception:  # closed meanwhile, or an odd server: cheroot copes as it does
            pass
        self.original(conn)

    def _look(self, conn: Any) -> bool:
        """True if comet took *conn* (served it, or holds it until its head
        is complete); False, with nothing read, to leave it to cheroot."""
        sock = getattr(conn, "socket", None)
        if type(sock) is not socket.socket or getattr(self.server, "ssl_adapter", None) is not None:
            return False
        if conn.rfile.has_data():
            return False
        head = _peek(sock)
        if head == b"":
            return False  # the client closed: cheroot cleans up
        if head is None or not _complete(head):
            if head is not None and len(head) >= MAX_HEAD:
                return False  # too large to be a stream request: cheroot answers it
            return self._wait(conn)
        return self._complete(conn, sock, head)

    def _complete(self, conn: Any, sock: socket.socket, head: bytes) -> bool:
        for taker in self.takers:
            if taker(sock, head, conn):
                break
        else:
            return False
        for f in (conn.rfile, conn.wfile):  # drop cheroot's file objects' claims on the socket
            try:
                f.close()
            except Exception:
                pass
        return True

    def start(self) -> None:
        """Start the head waiter (again, after :meth:`stop`): its thread
        lives as long as the server serves."""
        with self._lock:
            if self._waiter is None or self._waiter.stopped:
                try:
                    self._waiter = _HeadWaiter(self)
                except (OSError, AttributeError):  # no epoll here: heads are read by workers, as cheroot does
                    self._waiter = None

    def _wait(self, conn: Any) -> bool:
        waiter = self._waiter
        return waiter is not None and waiter.add(conn)

    def ready(self, conn: Any) -> None:
        """The waiter saw *conn*'s head complete (or its client close)."""
        try:
            sock = conn.socket
            head = _peek(sock)
            if head and _complete(head) and self._complete(conn, sock, head):
                return
        except Exception:
            log.exception("comet: accept-time hook failed; the connection goes to cheroot untouched")
        self._hand_back(conn)

    def stop(self) -> None:
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.stop()


def _peek(sock: socket.socket) -> bytes | None:
    """The bytes waiting on *sock*, left there; ``None`` when none yet.
    *sock* is left non-blocking: :meth:`AcceptHook._hand_back` gives
    cheroot its timeout back; comet keeps it so when it takes the socket."""
    # Non-blocking: on a socket with a timeout (cheroot sets
    # server.socket_timeout on each one) Python polls *before* recv for up to
    # that timeout, MSG_DONTWAIT or not, and a client that connects and
    # sends nothing would hold the accepting thread, and every accept, that long.
    # Each settimeout() is a syscall that lets go of the GIL: in a connect
    # storm every one is a hand-over between the accepting, connect and
    # writer threads, so the mode is changed once, not back and forth.
    if sock.gettimeout() != 0.0:
        sock.settimeout(0.0)
    try:
        return sock.recv(MAX_HEAD, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except (ConnectionResetError, ConnectionAbortedError):
        return b""  # the client is gone already (a reset): as closed, nothing to log


def _complete(head: bytes) -> bool:
    return b"\r\n\r\n" in head or b"\n\n" in head


class GetHead(NamedTuple):
    """A complete, plain ``GET`` request head peeked at accept time."""

    #: Bytes of the head, the blank line included: what to consume.
    length: int
    http10: bool
    #: The path as sent (no ``%``-escapes: those are left to cheroot).
    path: str
    query: str
    #: ``(name, value)`` as sent, values stripped.
    headers: list[tuple[str, str]]


#: Headers whose presence means a body or a protocol switch: not a stream request.
_NOT_A_STREAM = (b"content-length", b"transfer-encoding", b"expect", b"upgrade")


def parse_get_head(head: bytes) -> GetHead | None:
    """The parts of a complete ``GET`` head with no body, or ``None``.
    Anything irregular (another method, a folded or malformed header, an
    escaped path, a body) is ``None``: cheroot reads it and answers
    malformed requests itself, so an accept-time route never has to.

    >>> parse_get_head(b"GET /events?x=1 HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n")
    GetHead(length=37, http10=False, path='/events', query='x=1', headers=[('Host', 'h')])
    >>> parse_get_head(b"POST /events HTTP/1.1\\r\\nContent-Length: 0\\r\\n\\r\\n") is None
    True
    """
    if not head.startswith(b"GET /"):
        return None
    line_end = head.find(b"\r\n")
    end = head.find(b"\r\n\r\n")
    if line_end < 0 or end < 0:
        return None
    parts = head[:line_end].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    path, _, query = parts[1].partition(b"?")
    if b"%" in path or b"#" in parts[1]:
        return None  # escaped paths: cheroot decodes them
    headers = []
    if end > line_end:
        for line in head[line_end + 2:end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or b" " in name or b"\t" in name:
                return None
            if name.lower() in _NOT_A_STREAM:
                return None
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return GetHead(end + 4, parts[2] == b"HTTP/1.0", path.decode("latin-1"), query.decode("latin-1"), headers)


class _HeadWaiter:
    """Connections whose request head is still arriving, on one thread.

    Edge-triggered: a socket is reported once per arrival of new bytes, not
    again and again for bytes that were peeked and left in place.
    """

    def __init__(self, hook: AcceptHook) -> None:
        self.hook = hook
        self.timeout = float(getattr(hook.server, "timeout", 10) or 10)
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._lock = threading.Lock()
        self._conns: dict[int, tuple[Any, float]] = {}
        self._expiry: list[tuple[float, int, int]] = []
        self._serial = 0
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name="comet-heads", daemon=True)
        self._thread.start()

    def add(self, conn: Any) -> bool:
        fd = conn.socket.fileno()
        deadline = time.monotonic() + self.timeout
        with self._lock:
            if self.stopped or len(self._conns) >= MAX_WAITING or fd in self._conns:
                return False
            self._conns[fd] = (conn, deadline)
            self._serial += 1
            heapq.heappush(self._expiry, (deadline, self._serial, fd))
            try:
                self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
            except OSError:
                del self._conns[fd]
                return False
        return True

    def _pop(self, fd: int) -> Any:
        with self._lock:
            entry = self._conns.pop(fd, None)
            if entry is None:
                return None
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass
            return entry[0]

    def _run(self) -> None:
        try:
            while not self.stopped:
                with self._lock:
                    wait = self._expiry[0][0] - time.monotonic() if self._expiry else 1.0
                try:
                    events = self._epoll.poll(min(max(wait, 0.0), 1.0))
                except InterruptedError:
                    continue
                for fd, mask in events:
                    conn = self._conns.get(fd)
                    if conn is None:
                        continue  # the wake-up of stop(), or gone meanwhile
                    if mask & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                        # The client closed (or half-closed) before its head was complete: it never will be.
                        gone = self._pop(fd)
                        if gone is not None:
                            _close(gone)
                        continue
                    try:
                        head = _peek(conn[0].socket)
                    except OSError:
                        head = b""
                    if head is None or (head and not _complete(head) and len(head) < MAX_HEAD):
                        continue  # still arriving: wait for the next bytes
                    taken = self._pop(fd)
                    if taken is not None:
                        self.hook.ready(taken)
                self._expire(time.monotonic())
        except Exception:
            log.exception("comet: the request-head waiter failed")
        finally:
            self._close_all()

    def _expire(self, now: float) -> None:
        while True:
            with self._lock:
                if not self._expiry or self._expiry[0][0] > now:
                    return
                deadline, _, fd = heapq.heappop(self._expiry)
                entry = self._conns.get(fd)
                if entry is None or entry[1] != deadline:
                    continue
            conn = self._pop(fd)
            if conn is not None:
                _timeout(conn)

    def stop(self) -> None:
        self.stopped = True
        try:
            self._wake_w.send(b"\0")  # out of epoll.poll at once
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(2)

    def _close_all(self) -> None:
        with self._lock:
            self.stopped = True
            conns = [conn for conn, _ in self._conns.values()]
            self._conns.clear()
            self._epoll.close()
            self._wake_r.close()
            self._wake_w.close()
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass


def _close(conn: Any) -> None:
    try:
        conn.close()
    except OSError:
        pass


def _timeout(conn: Any) -> None:
    """A head that did not arrive in time: say so and close."""
    body = b"the request head took too long to arrive\n"
    try:
        conn.socket.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body), socket.MSG_DONTWAIT)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EAGAIN):
            log.debug("comet: 408 not sent: %s", exc)
    try:
        conn.close()
    except OSError:
        pass


# -- CherryPy ------------------------------------------------------------------


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
