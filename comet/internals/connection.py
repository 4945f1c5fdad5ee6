"""The cheroot connection of one request: the gateway that puts cheroot's
request in the environ, taking a connection over, noticing a peer that
closed, and who is at either end (see :mod:`comet.internals`)."""
from __future__ import annotations

import logging
import select
import socket
import ssl
from typing import Any, NamedTuple

from .accept import install_accept_hook

log = logging.getLogger("comet")

#: The listen backlog comet gives a cheroot server left at cheroot's and
#: CherryPy's default of 5 (``request_queue_size``,
#: ``server.socket_queue_size``): a storm of connects (a deploy, a network
#: blip, nginx opening upstream connections in a burst) waits in the
#: kernel's queue instead of overflowing it, which leaves clients waiting on
#: SYN retries or, behind a proxy, on a connection the proxy thinks is open.
#: Linux caps it at ``net.core.somaxconn`` (4096 since 5.4).
BACKLOG = 4096
#: A backlog set explicitly below this gets a warning at start.
SMALL_BACKLOG = 128
_CHEROOT_DEFAULT_BACKLOG = 5
_warned_backlog: set[str] = set()

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
    """Let comet park streams on a cheroot server, keep incomplete request
    heads off its worker threads (:class:`AcceptHook`) and give it a listen
    backlog sized for a storm of connects (:func:`size_backlog`).
    Idempotent; the CherryPy plugin does it for ``cherrypy.server``.

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
    size_backlog(server)


def somaxconn() -> int | None:
    """The kernel's cap on every listen backlog (Linux), or ``None``."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def size_backlog(server: Any) -> int:
    """Give cheroot *server* a listen backlog sized for streams: :data:`BACKLOG`
    when it has the default of 5; a smaller explicit one is kept, with a
    warning naming the setting to raise. If the server listens already, its
    socket listens again with the new size (Linux applies it at once). The
    backlog the kernel will apply.

    >>> from cheroot import wsgi
    >>> server = wsgi.Server(("127.0.0.1", 0), lambda e, s: [])
    >>> size_backlog(server) > 5, server.request_queue_size
    (True, 4096)
    """
    size = int(getattr(server, "request_queue_size", _CHEROOT_DEFAULT_BACKLOG))
    if size == _CHEROOT_DEFAULT_BACKLOG:
        size = server.request_queue_size = BACKLOG
        listening = getattr(server, "socket", None)
        if listening is not None:
            try:
                listening.listen(size)
            except OSError:  # closed meanwhile: the next bind uses the new size
                pass
    elif size < SMALL_BACKLOG:
        _warn_backlog("small", f"comet: listen backlog {size}: a burst of connects overflows it and clients wait on SYN "
                               f"retries; raise server.socket_queue_size (CherryPy) or request_queue_size (cheroot) "
                               f"to {BACKLOG}")
    cap = somaxconn()
    if cap is not None and cap < min(size, 1024):
        _warn_backlog("somaxconn", f"comet: the kernel caps every listen backlog at net.core.somaxconn = {cap}: "
                                   f"raise it (sysctl -w net.core.somaxconn={BACKLOG})")
    return min(size, cap) if cap is not None else size


def _warn_backlog(key: str, message: str) -> None:
    # Once per process: a test suite or a reloading app builds many servers.
    if key not in _warned_backlog:
        _warned_backlog.add(key)
        log.warning(message)


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
