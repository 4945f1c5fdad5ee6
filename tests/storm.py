"""A connection storm: many clients opening a stream at the same moment.

``storm(url, n)`` opens *n* connections at once from one asyncio loop
(plain or TLS), sends each a GET and waits, each against one deadline, for
its response head and the first bytes of its body: the moment a page's
stream is live. It returns a :class:`Storm` saying who got there, how
fast, and who did not (with why), so a test can assert on every client.
The connections stay open until :meth:`Storm.close`, so the server holds
*n* streams at once, as after a real storm.

``h2storm(url, n)`` is the same storm as browsers make it over HTTPS: each
client its own TLS connection negotiating HTTP/2 (ALPN ``h2``), one stream
on it; its :class:`H2Storm` keeps reading every stream after it opened, so
a test can wait for an event to reach all of them.
"""
from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from comet.testing import wait_until


@dataclass
class Storm:
    n: int
    opened: list[float] = field(default_factory=list)    # seconds from the storm's start to first body bytes
    failed: list[str] = field(default_factory=list)      # why, per client that did not get there
    statuses: dict[int, int] = field(default_factory=dict)
    first_bytes: list[bytes] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)  # readers that outlive the opening
    _thread: threading.Thread | None = None

    @property
    def all_open(self) -> bool:
        return len(self.opened) == self.n and not self.failed

    def summary(self) -> str:
        times = sorted(self.opened)

        def p(q: float) -> str:
            return f"{times[min(len(times) - 1, int(q * len(times)))]:.2f}s" if times else "-"

        why = sorted(set(self.failed))[:5]
        return (f"{len(times)}/{self.n} streaming (p50 {p(0.5)}, p99 {p(0.99)}, last {p(1.0)}); statuses {self.statuses}; "
                f"{len(self.failed)} failed: {why}")

    def close(self) -> None:
        """Close every connection and stop the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            async def shut() -> None:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                await _abort(self._writers)
                loop.stop()
            asyncio.run_coroutine_threadsafe(shut(), loop)
        if self._thread is not None:
            self._thread.join(10)


async def _abort(writers: list[asyncio.StreamWriter]) -> None:
    """Close every connection now (no TLS close_notify: the peer sees a
    reset or EOF), and let the loop run their close callbacks, so no socket
    is left for the garbage collector."""
    for writer in writers:
        writer.transport.abort()
    writers.clear()
    await asyncio.sleep(0.1)


def storm(url: str, n: int, *, deadline: float = 5.0, headers: dict[str, str] | None = None,
          cafile: str | None = None, source: str | None = None) -> Storm:
    """Open *n* streams on *url* at once; wait at most *deadline* seconds for
    each to send its head and first body bytes. The connections stay open (a
    thread keeps their loop running) until the result's ``close()``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(["http/1.1"])
    path = parts.path + ("?" + parts.query if parts.query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    result = Storm(n)

    async def one(start: float) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                           local_addr=(source, 0) if source else None)
            result._writers.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status != 200:
                result.failed.append(f"status {status}")
                return
            first = await reader.read(4096)
            if not first:
                result.failed.append("closed before any body")
                return
            result.first_bytes.append(first)
            result.opened.append(time.monotonic() - start)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.failed.append(type(exc).__name__ + ": " + str(exc)[:80])

    return _launch(result, one, deadline)


_S = TypeVar("_S", bound=Storm)


def _launch(result: _S, one: Callable[[float], Awaitable[None]], deadline: float) -> _S:
    """Run ``one(start)`` for each of ``result.n`` clients at once on a loop
    of their own (a thread keeps it running until ``result.close()``);
    return when every client got there or *deadline* seconds passed."""
    ready = threading.Event()

    async def main() -> None:
        start = time.monotonic()
        tasks = [asyncio.ensure_future(one(start)) for _ in range(result.n)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        result.failed.extend(["no stream within the deadline"] * len(pending))
        ready.set()

    def run() -> None:
        loop = result._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
            loop.run_forever()  # keep the streams open until close()
        finally:
            loop.run_until_complete(_abort(result._writers))
            loop.close()
            ready.set()

    result._thread = threading.Thread(target=run, name="storm", daemon=True)
    result._thread.start()
    if not ready.wait(deadline + 30):
        raise TimeoutError("the storm's loop did not finish")
    return result


@dataclass
class H2Storm(Storm):
    """A :class:`Storm` over HTTP/2 whose streams are read on after they
    opened: ``received[i]`` is every DATA frame's bytes the *i*-th client to
    open got, with the ``time.monotonic()`` it arrived; ``lost`` says why,
    for each stream that ended or broke after it opened."""
    received: list[list[tuple[float, bytes]]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return super().summary() + (f"; {len(self.lost)} lost after opening: {sorted(set(self.lost))[:5]}" if self.lost else "")

    def wait_all_received(self, text: str, timeout: float) -> list[float]:
        """Wait until every client that opened has received *text* in its
        stream's body; the ``time.monotonic()`` each one got it. Example::

            before = time.monotonic()
            publish("hello")
            slowest = max(result.wait_all_received("hello", 10)) - before
        """
        needle = text.encode()
        at: dict[int, float] = {}

        def everyone() -> bool:
            for i, chunks in enumerate(list(self.received)):
                if i not in at and (when := _arrival(list(chunks), needle)) is not None:
                    at[i] = when
            return len(at) == len(self.received)

        try:
            wait_until(everyone, timeout, 0.05, what=f"{text!r} to reach every stream")
        except TimeoutError:
            raise TimeoutError(f"{text!r} reached {len(at)} of {len(self.received)} streams within {timeout}s; "
                               + self.summary()) from None
        return [at[i] for i in range(len(self.received))]


def _arrival(chunks: list[tuple[float, bytes]], needle: bytes) -> float | None:
    """When the body made of *chunks* first contained *needle*."""
    body = b""
    for when, data in chunks:
        body += data
        if needle in body:
            return when
    return None


def h2storm(url: str, n: int, *, deadline: float = 5.0, headers: dict[str, str] | None = None,
            cafile: str | None = None, source: str | None = None) -> H2Storm:
    """:func:`storm` over HTTP/2: *n* TLS connections to the ``https`` *url*
    at once, each offering ALPN ``h2`` and ``http/1.1`` as a browser does; a
    client counts as streaming once the server chose ``h2`` and sent, on its
    one stream (a GET with ``Accept: text/event-stream``, as EventSource
    sends), HEADERS with ``:status`` 200 and ``content-type:
    text/event-stream``, then the first bytes of the body. Every stream is
    read on (flow control acknowledged) until the result's ``close()``."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise ValueError(f"{url}: HTTP/2 as browsers speak it is over TLS (https)")
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2", "http/1.1"])
    request = [(":method", "GET"), (":scheme", "https"), (":authority", parts.netloc),
               (":path", parts.path + ("?" + parts.query if parts.query else "")), ("accept", "text/event-stream")]
    request += [(k.lower(), v) for k, v in (headers or {}).items()]
    result = H2Storm(n)
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")

    async def one(start: float) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                           local_addr=(source, 0) if source else None)
            result._writers.append(writer)
            protocol = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if protocol != "h2":
                result.failed.append(f"ALPN chose {protocol}, not h2")
                return
            conn = h2.connection.H2Connection(config)
            conn.initiate_connection()  # the preface and our SETTINGS
            conn.send_headers(conn.get_next_available_stream_id(), request, end_stream=True)
            writer.write(conn.data_to_send())
            chunks: list[tuple[float, bytes]] = []
            head = False
            while not (head and chunks):
                data = await reader.read(65536)
                if not data:
                    result.failed.append("closed before any body" if head else "closed before the response")
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        fields = {str(k): str(v) for k, v in event.headers or ()}
                        status = int(fields[":status"])
                        result.statuses[status] = result.statuses.get(status, 0) + 1
                        if status != 200:
                            result.failed.append(f"status {status}")
                            return
                        if not fields.get("content-type", "").startswith("text/event-stream"):
                            result.failed.append(f"content-type {fields.get('content-type')!r}")
                            return
                        head = True
                    elif isinstance(event, h2.events.DataReceived):
                        _take(conn, event, chunks)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        result.failed.append(type(event).__name__ + (" before any body" if head else " before the response"))
                        return
                writer.write(conn.data_to_send())  # SETTINGS acks, window updates
            result.first_bytes.append(chunks[0][1])
            result.opened.append(chunks[0][0] - start)
            result.received.append(chunks)
            result._tasks.append(asyncio.ensure_future(follow(reader, writer, conn, chunks)))
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, h2.exceptions.H2Error) as exc:
            result.failed.append(type(exc).__name__ + ": " + str(exc)[:80])

    async def follow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: h2.connection.H2Connection, chunks: list[tuple[float, bytes]]) -> None:
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        _take(conn, event, chunks)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        result.lost.append(type(event).__name__)
                        return
                writer.write(conn.data_to_send())
            result.lost.append("connection closed")
        except (OSError, h2.exceptions.H2Error) as exc:
            result.lost.append(type(exc).__name__ + ": " + str(exc)[:80])

    return _launch(result, one, deadline)


def _take(conn: h2.connection.H2Connection, event: h2.events.DataReceived, chunks: list[tuple[float, bytes]]) -> None:
    """Keep a DATA frame's bytes, and give its flow-control credit back at
    once (a stream nobody acknowledges stalls after 64 KB)."""
    if event.data:
        chunks.append((time.monotonic(), event.data))
    if event.flow_controlled_length and event.stream_id is not None:
        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)


@dataclass
class Seen:
    """What one crowd client saw: every event (id, name, data) in order,
    and how many times it (re)connected."""
    events: list[tuple[str, str, str]] = field(default_factory=list)
    connects: int = 0
    last_id: str | None = None
    error: str | None = None


class Crowd:
    """*n* SSE clients on *url* that reconnect as EventSource does: after a
    lost connection (a proxy's worker shutting down, a process restarting)
    each comes back within a second with ``Last-Event-ID``. Run in one
    asyncio loop on a thread of their own; ``seen[i]`` is what client *i*
    got. Bodies are decoded from HTTP/1.1 chunked framing, events parsed
    as the SSE spec says (``id``, ``event``, ``data``; comments skipped).

    Example::

        crowd = Crowd(url, 1000).start()
        crowd.wait(lambda: all(s.connects for s in crowd.seen), 10)
        ...
        crowd.close()
    """

    def __init__(self, url: str, n: int, *, cafile: str | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.context = ssl.create_default_context(cafile=cafile)
            self.context.set_alpn_protocols(["http/1.1"])
        self.path = parts.path + ("?" + parts.query if parts.query else "")
        self.netloc = parts.netloc
        self.seen = [Seen() for _ in range(n)]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="crowd", daemon=True)
        self._stopping = False
        self._tasks: list[asyncio.Future[None]] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._lock = threading.Lock()

    def start(self) -> "Crowd":
        self._thread.start()

        async def launch() -> None:
            self._tasks = [asyncio.ensure_future(self._client(seen)) for seen in self.seen]

        asyncio.run_coroutine_threadsafe(launch(), self._loop).result(10)
        return self

    def wait(self, condition: Callable[[], bool], timeout: float, what: str = "the crowd") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout}s")
            time.sleep(0.05)

    def snapshot(self) -> list[list[tuple[str, str, str]]]:
        with self._lock:
            return [list(seen.events) for seen in self.seen]

    async def _client(self, seen: Seen) -> None:
        import random

        while not self._stopping:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.context)
                self._writers.add(writer)
                lines = [f"GET {self.path} HTTP/1.1", f"Host: {self.netloc}", "Accept: text/event-stream"]
                if seen.last_id is not None:
                    lines.append(f"Last-Event-ID: {seen.last_id}")
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                if status != 200:
                    raise ValueError(f"status {status}")
                seen.connects += 1
                await self._read_events(reader, seen, b"transfer-encoding: chunked" in head.lower())
            except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.LimitOverrunError) as exc:
                seen.error = type(exc).__name__ + ": " + str(exc)[:80]
            finally:
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()  # closed now, not by the garbage collector
            if not self._stopping:
                await asyncio.sleep(random.uniform(0.1, 1.0))  # EventSource's reconnect delay, spread

    async def _read_events(self, reader: asyncio.StreamReader, seen: Seen, chunked: bool) -> None:
        buffer = b""
        fields: dict[str, str] = {}
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                data = await reader.readexactly(size + 2)
                buffer += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8").rstrip("\r")
                if not line:
                    if "data" in fields:
                        event = (fields.get("id", ""), fields.get("event", "message"), fields["data"])
                        with self._lock:
                            seen.events.append(event)
                    if "id" in fields:
                        seen.last_id = fields["id"]
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    fields[name] = fields[name] + "\n" + value if name == "data" and "data" in fields else value

    def close(self) -> None:
        """Stop every client and the loop; close their connections."""
        self._stopping = True

        async def stop() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await _abort(list(self._writers))

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        self._loop.close()
