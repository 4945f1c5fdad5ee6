"""A TCP proxy that misbehaves on request: the fault kit for tests.

Real networks fail in ways a loopback test never sees: a NAT forgets a
connection and drops its packets (no FIN, no RST), a laptop sleeps, a
proxy buffers whole responses, a link is slow or cut in the middle of a
message. :class:`FaultProxy` sits between a test's client and a live
server on 127.0.0.1 and does each of these on command, so an app's
reconnect logic is tested against the fault itself, not a mock of it.

Example::

    from comet.testing import FaultProxy, StreamClient

    with FaultProxy(server.url) as proxy:
        with StreamClient(proxy.url + "/events", idle_timeout="auto") as client:
            proxy.blackhole()           # the connection goes silent
            hub.publish("lobby", "hi")  # the watchdog reconnects; nothing lost
            client.wait_for(1, timeout=10)

Design: one selector thread forwards bytes for every connection, so the
proxy owns exactly one thread and two sockets (the listener and a wake-up
pair) plus two per connection, all released by :meth:`FaultProxy.stop`.
Commands from the test thread run on that thread and return once they
have taken effect: after ``blackhole()`` returns, no further byte is
forwarded. The proxy accepts connections and runs the commands; each
connection relays its own bytes (``_Conn``), through the faults in force
(``_Schedule``, which the commands set). Buffering parses HTTP/1.1 responses (``Content-Length``,
chunked, or until close) to know where each ends; responses to ``HEAD``
are not told apart, so use other methods through a buffering proxy.
"""
from __future__ import annotations

import collections
import errno
import queue
import selectors
import socket
import struct
import threading
import time
from typing import Callable
from urllib.parse import urlsplit

__all__ = ["FaultProxy"]

_READ = 65536
_HIGH_WATER = 256 * 1024  # pending bytes per direction before reading pauses


class _ResponseEnds:
    """Where HTTP/1.1 responses end in a byte stream, fed incrementally.

    >>> ends = _ResponseEnds()
    >>> ends.feed(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nhiHTTP/1.1 204 No")
    [40]
    >>> ends.feed(b" Content\\r\\n\\r\\n")
    [12]
    """

    def __init__(self) -> None:
        self._state = "head"  # "head", "length", "chunk-size", "chunk-data", "trailer", "close"
        self._buf = b""  # bytes of an unfinished line or head
        self._left = 0

    def feed(self, data: bytes) -> list[int]:
        """Offsets in *data* just after each response that ends in it."""
        out: list[int] = []
        i = 0
        while i < len(data):
            if self._state == "close":
                break  # the response ends when the connection does
            if self._state in ("length", "chunk-data"):
                take = min(self._left, len(data) - i)
                i += take
                self._left -= take
                if self._left == 0:
                    if self._state == "length":
                        self._state = "head"
                        out.append(i)
                    else:
                        self._state = "chunk-size"  # (the data's CRLF is read as an empty size line)
                continue
            marker = b"\r\n\r\n" if self._state == "head" else b"\r\n"
            joined = self._buf + data[i:]
            at = joined.find(marker)
            if at < 0:
                self._buf = joined
                break
            # (self._buf holds no whole marker, so this consumes part of data)
            line, i = joined[:at], i + at + len(marker) - len(self._buf)
            self._buf = b""
            if self._state == "head":
                if self._head(line.decode("latin-1")):
                    out.append(i)
            elif self._state == "chunk-size":
                if not line.strip():
                    continue  # the CRLF after a chunk's data
                size = int(line.split(b";")[0].strip() or b"0", 16)
                self._state, self._left = ("chunk-data", size) if size else ("trailer", 0)
            elif not line:  # "trailer": an empty line ends the response
                self._state = "head"
                out.append(i)
        return out

    def _head(self, head: str) -> bool:
        """Read a response head; True if that response has no body."""
        lines = head.split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self._state = "close"  # not HTTP: buffered until the connection ends
            return False
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if 100 <= status < 200 and status != 101 or status in (204, 304):
            return True
        if status == 101:
            self._state = "close"
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        elif "content-length" in fields:
            self._left = int(fields["content-length"])
            self._state = "length"
            return self._left == 0 and self._reset()
        else:
            self._state = "close"
        return False

    def _reset(self) -> bool:
        self._state = "head"
        return True


class _Pipe:
    """One direction of a connection: what was read, waiting to be written."""

    def __init__(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        self.src, self.dst = src, dst
        self.responses = upstream  # server -> client: the direction that carries responses
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.pending_bytes = 0
        self.held = bytearray()  # a buffered response, not complete yet
        self.ends = _ResponseEnds()
        self.eof = False  # src has ended
        self.shut = False  # dst was told (SHUT_WR)
        self.next_free = 0.0  # throttling: when the link is free again
        self.cut_left: int | None = None


class _Schedule:
    """The faults in force: set by the test's commands, read by every
    connection's relay (both on the proxy's thread)."""

    def __init__(self) -> None:
        self.delay = 0.0  # seconds added to each chunk
        self.rate: float | None = None  # bytes per second, per connection and direction
        self.offline = False  # new connections are blackholed
        self.buffering = False  # responses held until whole


class _Conn:
    """One client connection and its upstream: the bytes relayed both ways,
    through the faults in *schedule*. Lives on the proxy's thread; tells
    *on_close* when it has closed."""

    def __init__(self, client: socket.socket, server: socket.socket, selector: selectors.BaseSelector,
                 schedule: _Schedule, on_close: Callable[[_Conn], None]) -> None:
        self.client, self.server = client, server
        self.up = _Pipe(client, server, upstream=False)
        self.down = _Pipe(server, client, upstream=True)
        self.blackholed = schedule.offline
        self.connected = False  # the non-blocking connect to upstream has finished
        self.closed = False
        self._selector = selector
        self._schedule = schedule
        self._on_close = on_close

    def connect(self, upstream: tuple[str, int]) -> None:
        """Start the non-blocking connect to *upstream*."""
        if self.blackholed:
            return  # no network: upstream never hears of it
        err = self.server.connect_ex(upstream)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.close(rst=True)  # upstream refused: so does the proxy
            return
        self.interest()

    def next_due(self) -> float | None:
        """When the first chunk queued either way is due, if any is."""
        due = [pipe.pending[0][0] for pipe in (self.up, self.down) if pipe.pending]
        return min(due) if due else None

    def interest(self) -> None:
        """(Re)register what each socket waits for."""
        for sock, into, outof in ((self.client, self.up, self.down), (self.server, self.down, self.up)):
            events = 0
            if self.blackholed:
                pass  # nothing read, nothing written: its bytes wait in the kernel
            elif not self.connected and sock is self.server:
                events = selectors.EVENT_WRITE  # the connect finishing
            else:
                if not into.eof and into.pending_bytes < _HIGH_WATER and self.connected:
                    events |= selectors.EVENT_READ
                if outof.pending and outof.pending[0][0] <= time.monotonic():
                    events |= selectors.EVENT_WRITE
            try:
                key = self._selector.get_key(sock)
            except KeyError:
                key = None
            if key is None and events:
                self._selector.register(sock, events, None)
            elif key is not None and not events:
                self._selector.unregister(sock)
            elif key is not None and key.events != events:
                self._selector.modify(sock, events, None)

    def service(self) -> None:
        """Move what can move now, both ways."""
        if self.closed or self.blackholed:
            return
        if not self.connected:
            err = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(rst=True)
                return
            try:
                self.server.getpeername()
            except OSError:
                self.interest()  # still connecting
                return
            self.connected = True
        try:
            for pipe in (self.up, self.down):
                self._read(pipe)
                self._write(pipe)
        except OSError:
            self.close(rst=True)  # one side reset or failed: so does the other
            return
        if self.closed:
            return
        if self.up.shut and self.down.shut:
            self.close()
            return
        self.interest()

    def _read(self, pipe: _Pipe) -> None:
        if pipe.eof or pipe.pending_bytes >= _HIGH_WATER:
            return
        try:
            data = pipe.src.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            pipe.eof = True
            if pipe.held:  # a close-delimited response is complete now
                self._queue(pipe, bytes(pipe.held))
                pipe.held.clear()
            return
        if pipe.responses:
            ends = pipe.ends.feed(data)
            if self._schedule.buffering:
                if ends:
                    pipe.held += data[:ends[-1]]
                    self._queue(pipe, bytes(pipe.held))
                    pipe.held.clear()
                    data = data[ends[-1]:]
                if data:
                    pipe.held += data
                return
        self._queue(pipe, data)

    def _queue(self, pipe: _Pipe, data: bytes) -> None:
        now = time.monotonic()
        due = now + self._schedule.delay
        rate = self._schedule.rate
        if rate is None:
            pipe.pending.append((due, data))
            pipe.pending_bytes += len(data)
            return
        # Throttled: small slices, each when the link is free again.
        step = max(1, int(rate / 20))
        for at in range(0, len(data), step):
            piece = data[at:at + step]
            start = max(due, pipe.next_free)
            pipe.next_free = start + len(piece) / rate
            pipe.pending.append((start, piece))
            pipe.pending_bytes += len(piece)

    def _write(self, pipe: _Pipe) -> None:
        now = time.monotonic()
        while pipe.pending and pipe.pending[0][0] <= now:
            due, data = pipe.pending[0]
            if pipe.cut_left is not None:
                data = data[:pipe.cut_left]
            try:
                sent = pipe.dst.send(data) if data else 0
            except (BlockingIOError, InterruptedError):
                return
            if pipe.cut_left is not None:
                pipe.cut_left -= sent
                if pipe.cut_left == 0:
                    self.close()
                    return
            if sent < len(pipe.pending[0][1]):
                pipe.pending[0] = (due, pipe.pending[0][1][sent:])
                pipe.pending_bytes -= sent
                return
            pipe.pending.popleft()
            pipe.pending_bytes -= sent
        if pipe.eof and not pipe.pending and not pipe.held and not pipe.shut:
            pipe.shut = True
            try:
                pipe.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    # -- faults on this connection --

    def cut(self, after_bytes: int) -> None:
        """End the response after *after_bytes* more bytes reach the client."""
        if self.blackholed:
            return
        # Counted from what the client gets next: bytes queued here
        # (delayed or held) count as not sent yet.
        self.down.cut_left = after_bytes
        if after_bytes == 0:
            self.close()

    def release_held(self) -> None:
        """Forward what buffering held back (buffering has stopped)."""
        if self.down.held:
            self._queue(self.down, bytes(self.down.held))
            self.down.held.clear()

    def blackhole(self) -> None:
        """Forward nothing more, either way; keep the sockets open."""
        self.blackholed = True
        for pipe in (self.up, self.down):
            pipe.pending.clear()
            pipe.pending_bytes = 0
            pipe.held.clear()
        self.interest()

    def close(self, rst: bool = False) -> None:
        """Close both sockets (with an RST if *rst*)."""
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        for sock in (self.client, self.server):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            if rst:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of *upstream* that injects faults.

    *upstream* is ``"http://127.0.0.1:PORT"`` (any URL: its host and port)
    or a ``(host, port)`` pair. The proxy listens on a free port (or
    *port*) at once; :attr:`url` is its address, with upstream's scheme (a
    TCP proxy: TLS passes through it untouched). Faults:

    - :meth:`blackhole`: open connections stay open and silent both ways
      (a NAT that dropped its mapping); new ones pass.
    - :meth:`offline`: the network is gone: open and new connections are
      blackholed until :meth:`restore` (after which new ones pass; the
      blackholed ones stay dead).
    - :meth:`delay`, :meth:`throttle`: latency per chunk, bandwidth per
      connection and direction.
    - :meth:`cut`: each open response ends after N more bytes (a FIN in
      the middle of an event).
    - :meth:`reset`: an RST on every open connection.
    - :meth:`buffer_responses`: hold each response until upstream has
      sent all of it (a buffering proxy or anti-virus): a stream never
      arrives, a finite answer arrives whole.

    Example::

        with FaultProxy(server.url) as proxy:
            client = StreamClient(proxy.url + "/events").open()
            proxy.reset()  # the client's next read raises ConnectionResetError
    """

    def __init__(self, upstream: str | tuple[str, int], *, port: int = 0) -> None:
        scheme = "http"
        if isinstance(upstream, str):
            parts = urlsplit(upstream if "//" in upstream else "//" + upstream)
            if parts.hostname is None or parts.port is None:
                raise ValueError(f"upstream must name a host and a port, got {upstream!r}")
            self.upstream: tuple[str, int] = (parts.hostname, parts.port)
            scheme = parts.scheme or scheme
        else:
            self.upstream = (upstream[0], int(upstream[1]))
        self._schedule = _Schedule()
        self._conns: list[_Conn] = []
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        self._stopping = False
        self._selector = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(("127.0.0.1", port))
            self._listener.listen(128)
            self._listener.setblocking(False)
            self._wake_r.setblocking(False)
            self._selector.register(self._listener, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        except BaseException:
            self._release()
            raise
        self.port: int = self._listener.getsockname()[1]
        #: ``http://127.0.0.1:<port>``: where clients connect instead of upstream.
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._loop, name=f"comet-faultproxy :{self.port}", daemon=True)
        self._thread.start()

    # -- the faults (each returns once in effect) --

    def blackhole(self) -> None:
        """Forward nothing more on the open connections, either way, and
        keep their sockets open; new connections pass.

        What the client sees is a dropped connection. The server's side
        still has its bytes acknowledged by the proxy's kernel until that
        socket's buffers fill: to test how a server notices a client whose
        packets stop, drop them for real (tests/test_vanished_clients.py
        does, with a network namespace)."""
        def go() -> None:
            for conn in self._conns:
                conn.blackhole()
        self._run(go)

    def offline(self) -> None:
        """The network is gone: open connections are blackholed, and so is
        every new one until :meth:`restore`."""
        def go() -> None:
            self._schedule.offline = True
            for conn in self._conns:
                conn.blackhole()
        self._run(go)

    def restore(self) -> None:
        """New connections pass again. Connections blackholed before stay
        silent, as a NAT that forgot them would keep them."""
        def go() -> None:
            self._schedule.offline = False
        self._run(go)

    def delay(self, seconds: float) -> None:
        """Add *seconds* of latency to every chunk forwarded from now on, in
        both directions (0: none)."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {seconds!r}")

        def go() -> None:
            self._schedule.delay = float(seconds)
        self._run(go)

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit each connection to *bytes_per_second* in each direction
        (``None``: unlimited)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError(f"throttle must be > 0 bytes per second or None, got {bytes_per_second!r}")

        def go() -> None:
            self._schedule.rate = None if bytes_per_second is None else float(bytes_per_second)
        self._run(go)

    def cut(self, after_bytes: int = 0) -> None:
        """End each open response after *after_bytes* more bytes reach its
        client: the client sees the connection close mid-message (and the
        server sees it close too). Connections opened later are not cut."""
        if after_bytes < 0:
            raise ValueError(f"after_bytes must be >= 0, got {after_bytes!r}")

        def go() -> None:
            for conn in list(self._conns):
                conn.cut(after_bytes)
        self._run(go)

    def reset(self) -> None:
        """Abort every open connection with an RST, to its client and to
        upstream: reads on either side raise ``ConnectionResetError``."""
        def go() -> None:
            for conn in list(self._conns):
                conn.close(rst=True)
        self._run(go)

    def buffer_responses(self, on: bool = True) -> None:
        """Hold each response until upstream has sent the whole of it
        (``False``: forward as it comes again, releasing what was held)."""
        def go() -> None:
            self._schedule.buffering = bool(on)
            if not on:
                for conn in self._conns:
                    conn.release_held()
        self._run(go)

    @property
    def connections(self) -> int:
        """Client connections open now (blackholed ones included)."""
        return len(self._conns)

    # -- life cycle --

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the listener; join the proxy's thread
        (``TimeoutError`` if it does not end within *timeout*)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"fault proxy thread did not stop in {timeout}s")
        # Commands that raced stop() get their answer (the loop is gone).
        while not self._commands.empty():
            self._commands.get_nowait()[1].set()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.url} -> {self.upstream[0]}:{self.upstream[1]}, {self.connections} open>"

    # -- the loop --

    def _run(self, command: Callable[[], None], timeout: float = 5.0) -> None:
        if self._stopping:
            raise RuntimeError("fault proxy is stopped")
        done = threading.Event()
        self._commands.put((command, done))
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError(f"fault proxy did not run a command in {timeout}s")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or stopped

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._selector.select(self._next_due())
                self._drain_wake()
                while not self._commands.empty():
                    command, done = self._commands.get_nowait()
                    try:
                        command()
                    finally:
                        done.set()
                self._accept()
                for conn in list(self._conns):
                    conn.service()
        finally:
            for conn in list(self._conns):
                conn.close()
            self._release()

    def _release(self) -> None:
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._selector.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _next_due(self) -> float | None:
        due = [at for conn in self._conns if (at := conn.next_due()) is not None]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            client.setblocking(False)
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setblocking(False)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, server, self._selector, self._schedule, on_close=self._forget)
            self._conns.append(conn)
            conn.connect(self.upstream)

    def _forget(self, conn: _Conn) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
