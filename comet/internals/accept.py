"""At accept: comet looks at each connection cheroot accepts before a
worker thread does (:class:`AcceptHook`), waits for incomplete request heads
on one thread of its own (slowloris) and parses complete ``GET`` heads for
the routes served right there (see :mod:`comet.internals`)."""
from __future__ import annotations

import errno
import heapq
import logging
import select
import socket
import threading
import time
from typing import Any, Callable, NamedTuple

log = logging.getLogger("comet")

#: A request head larger than this is left to cheroot as it is.
MAX_HEAD = 8192
#: Connections whose head is still arriving, at most, per server.
MAX_WAITING = 50_000

#: ``(socket, head, connection) -> bool``: serve a complete request head
#: here (a fast route) and say so; False leaves it to cheroot untouched.
#: The connection is cheroot's; read its peer with :func:`peer_of`.
HeadTaker = Callable[[socket.socket, bytes, Any], bool]


# -- at accept -------------------------------------------------------------------


def install_accept_hook(server: Any, routes: HeadTaker | None = None, first: bool = False) -> "AcceptHook":
    """Put an :class:`AcceptHook` in front of cheroot *server* (idempotent);
    *routes*, if given, may take complete request heads (fast routes:
    ``first``, before any taker already there)."""
    hook = accept_hook_of(server)
    if hook is None:
        hook = AcceptHook(server)
        server._comet_accept = hook
        server.process_conn = hook.process_conn
    if routes is not None and routes not in hook.takers:
        hook.takers.insert(0 if first else len(hook.takers), routes)
    hook.start()
    return hook


def accept_hook_of(server: Any) -> "AcceptHook | None":
    """The :class:`AcceptHook` of cheroot *server*, if comet installed one
    (to stop its head waiter with the server); ``None`` for ``None``."""
    hook: AcceptHook | None = getattr(server, "_comet_accept", None)
    return hook


def fast_routes_of(server: Any) -> Any:
    """The fast routes (:class:`comet.fastpath.FastRoutes`) installed on
    cheroot *server*, or ``None``: one set per server."""
    return getattr(server, "_comet_routes", None)


def keep_fast_routes(server: Any, routes: Any) -> None:
    """Remember *routes* as cheroot *server*'s fast routes."""
    server._comet_routes = routes


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
        # Runs on cheroot's connection-manager thread: must never raise or block (invariant I12).
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
