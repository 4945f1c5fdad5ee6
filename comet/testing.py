"""Tools for testing apps that stream: a threaded client, transport parsers,
live servers on a free 127.0.0.1 port, and pytest fixtures.

Example::

    from comet.testing import StreamClient, http_get

    def test_say(comet_cherrypy):
        server = comet_cherrypy(Root())
        with StreamClient(server.url + "/events", transport="sse") as client:
            http_get(server.url + "/say?text=hi")
            [event] = client.wait_for(1)
            assert event.data == "hi"

The fixtures (``comet_cherrypy``, ``comet_wsgi``, ``comet_redis``) are a
pytest plugin registered when comet is installed: the module ``comet_pytest``,
kept outside this package so that suites that do not use them never import
CherryPy. The client reads in a background thread; ``wait_for``
blocks with a deadline and re-raises anything the reader hit (a 500, a
malformed stream), so a broken server fails the test instead of hanging it.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from typing import Any, Callable, Literal
from urllib.parse import urlencode, urlsplit

from .faults import FaultProxy
from .framing import HEARTBEAT_EVENT, Event, Part, TaggedEvent, to_json
from .hub import is_multi_cursor
from .live_servers import CherryPyServer, WSGIServer
from .processes import AppProcess, NginxServer, RedisSentinels, RedisServer, free_port

__all__ = [
    "StreamClient", "FaultProxy", "SSEParser", "MultipartParser", "NDJSONParser", "StreamClosed", "StreamIdle",
    "HTTPStatusError",
    "CherryPyServer", "WSGIServer", "RedisServer", "RedisSentinels", "NginxServer", "AppProcess", "free_port", "wait_until", "http_get",
]


class HTTPStatusError(AssertionError):
    """The server answered a stream request with a status other than 200."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:500]!r}")
        self.status = status
        self.body = body


class StreamClosed(Exception):
    """The server ended the stream before the awaited events arrived."""


class StreamIdle(TimeoutError):
    """A :class:`StreamClient` with ``idle_timeout`` and ``reconnect=False``
    heard nothing for that long: the connection is taken for dead."""


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll *predicate* until it returns something truthy; ``TimeoutError``
    naming *what* after *timeout* seconds. For state with no event to wait on
    (a counter in another thread); prefer :meth:`StreamClient.wait_for`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0, method: str = "GET", body: bytes | None = None,
             *, deadline: float | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain request: ``(status, headers, body)``; never raises on 4xx/5xx.

    ``deadline`` (seconds, default ``timeout``) bounds the whole exchange,
    ``timeout`` each socket operation: a broken server that keeps streaming
    instead of answering, or stalls, raises ``TimeoutError`` within the
    deadline rather than hanging the test.
    """
    parts = urlsplit(url)
    budget = timeout if deadline is None else deadline
    ends = time.monotonic() + budget

    def left() -> float:
        remaining = ends - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{method} {url}: no complete answer within {budget}s")
        return min(timeout, remaining)

    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=left())
    try:
        conn.connect()
        sock = conn.sock  # kept: on "Connection: close" the response takes it over
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        sock.settimeout(left())
        resp = conn.getresponse()
        data = bytearray()
        while True:
            sock.settimeout(left())
            more = resp.read1(65536)
            if not more:
                break
            data += more
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, bytes(data)
    except TimeoutError as exc:
        if str(exc).startswith(f"{method} {url}:"):
            raise
        raise TimeoutError(f"{method} {url}: no complete answer within {budget}s ({exc})") from None
    finally:
        conn.close()


# -- parsers ----------------------------------------------------------------


class SSEParser:
    """Incremental ``text/event-stream`` parser following the WHATWG rules
    (CRLF, LF or CR end lines; a leading BOM is dropped; one space after the
    colon is removed; ``id`` with NUL is ignored; a blank line dispatches).
    comet's heartbeat events (``event: comet.heartbeat``) are not returned:
    they are counted in :attr:`beats`, and :attr:`heartbeat` is the
    interval they announce. :attr:`last_event_id` is set as the spec says,
    when an event is dispatched (its blank line), a heartbeat too: one may
    carry the stream's cursor before any event (see :mod:`comet.framing`).

    >>> p = SSEParser()
    >>> p.feed(b":ok\\n\\nevent: comet.heartbeat\\ndata: 0.5\\n\\nid: 1\\r\\ndata: a\\ndata: b\\n\\n")
    [Event(data='a\\nb', id='1', name=None, channel=None, retry=None)]
    >>> p.comments, p.beats, p.heartbeat
    (1, 1, 0.5)
    >>> p.feed(b"event: comet.heartbeat\\nid: 7-0\\ndata: 0.5\\n\\nid: 7-1\\ndata: cut off"), p.last_event_id
    ([], '7-0')
    """

    def __init__(self) -> None:
        self._buf = ""
        self._decoder_tail = b""
        self._data: list[str] = []
        self._name: str | None = None
        self._first = True
        self._cr_pending = False
        self.last_event_id = ""
        self._id_buffer = ""  # the spec's "last event ID buffer": last_event_id once dispatched
        self.retry: int | None = None
        self.comments = 0
        #: Heartbeat events seen (the announcement after the preamble included).
        self.beats = 0
        #: The interval the server announced (seconds), once it has.
        self.heartbeat: float | None = None

    def feed(self, data: bytes) -> list[Event]:
        raw = self._decoder_tail + data
        try:
            text = raw.decode("utf-8")
            self._decoder_tail = b""
        except UnicodeDecodeError as exc:
            if exc.start < len(raw) - 3:
                raise ValueError(f"invalid UTF-8 in event stream at byte {exc.start}") from None
            text, self._decoder_tail = raw[:exc.start].decode("utf-8"), raw[exc.start:]
        if self._first and text:
            text = text.lstrip("\ufeff")
            self._first = False
        if self._cr_pending and text.startswith("\n"):
            text = text[1:]
        self._cr_pending = False
        self._buf += text
        out: list[Event] = []
        while True:
            match = re.search(r"\r\n|\r|\n", self._buf)
            if not match:
                break
            if match.group() == "\r" and match.end() == len(self._buf):
                self._cr_pending = True  # a CRLF may be split across reads
            line, self._buf = self._buf[:match.start()], self._buf[match.end():]
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def _line(self, line: str) -> Event | None:
        if line == "":
            self.last_event_id = self._id_buffer  # (before the empty-data check: the spec's order)
            if not self._data:
                self._name = None
                return None
            if self._name == HEARTBEAT_EVENT:
                self.beats += 1
                try:
                    self.heartbeat = float(self._data[-1])
                except ValueError:
                    pass  # not a comet server's: counted, not believed
                self._data, self._name = [], None
                return None
            event = untag(Event("\n".join(self._data), id=self.last_event_id or None, name=self._name))
            self._data, self._name = [], None
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._name = value
        elif name == "id" and "\x00" not in value:
            self._id_buffer = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


def untag(event: Event) -> Event:
    """An SSE event of a stream of several channels as it was published:
    its data out of the ``{"channel": ..., "data": ...}`` envelope (as text,
    like any SSE data), its ``channel`` set. Other events are returned as
    they are.

    >>> untag(Event('{"channel":"room","data":{"n":1}}', id="a1.1-1"))
    TaggedEvent(data='{"n":1}', id='a1.1-1', name=None, channel='room', retry=None)
    """
    if event.id is None or not is_multi_cursor(event.id) or not isinstance(event.data, str):
        return event
    try:
        envelope = json.loads(event.data)
    except ValueError:
        return event
    if not isinstance(envelope, dict) or set(envelope) != {"channel", "data"}:
        return event
    data = envelope["data"]
    return TaggedEvent(data if isinstance(data, str) else to_json(data), id=event.id, name=event.name,
                       channel=envelope["channel"], retry=event.retry)


class MultipartParser:
    """Incremental ``multipart/x-mixed-replace`` parser, per RFC 2046: a
    body ends at the next delimiter (``CRLF --boundary``), whatever its
    ``Content-Length``. Heartbeats are counted in :attr:`padding`, not
    returned: ``Comet-Heartbeat`` header lines (before the first part),
    empty parts and bytes before the first delimiter. An image stream's
    other heartbeat, its last frame again, is a part like any other.

    >>> p = MultipartParser("B")
    >>> p.feed(b"--B\\r\\nComet-Heartbeat: 1\\r\\nContent-Type: text/plain\\r\\n\\r\\nhi\\r\\n--B\\r\\n"
    ...        b"Content-Type: text/plain\\r\\n\\r\\n\\r\\n--B\\r\\nContent-Type: text/plain\\r\\n\\r\\n")
    [Part(body=b'hi', content_type='text/plain', headers=())]
    >>> p.padding  # the heartbeat line and the empty part
    2
    """

    def __init__(self, boundary: str) -> None:
        self.delimiter = b"--" + boundary.encode("ascii")
        self._buf = b""
        self._state = "preamble"  # then "headers", "body"
        self._headers: list[tuple[str, str]] = []
        self._scanned = 0  # body bytes already searched for the delimiter
        self.padding = 0

    def feed(self, data: bytes) -> list[Part]:
        self._buf += data
        out: list[Part] = []
        while True:
            part = self._next()
            if part is None:
                return out
            body, headers = part
            if not body:  # an empty part: a heartbeat
                self.padding += 1
                continue
            kept = tuple((k, v) for k, v in headers if k.lower() != "content-type")
            ctype = next((v for k, v in headers if k.lower() == "content-type"), "text/plain")
            out.append(Part(body, ctype, kept))

    def _next(self) -> tuple[bytes, list[tuple[str, str]]] | None:
        while True:
            if self._state == "delimiter":  # a delimiter line split across reads
                if not self._delimiter_line():
                    return None
            elif self._state == "preamble":
                at = self._buf.find(self.delimiter)
                if at < 0:
                    return None
                if self._buf[:at].strip():
                    self.padding += 1  # a preamble: RFC 2046 says to ignore it
                self._buf = self._buf[at:]
                if not self._delimiter_line():
                    return None
            elif self._state == "headers":
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    return None
                line, self._buf = self._buf[:eol].decode("latin-1"), self._buf[eol + 2:]
                if line:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "comet-heartbeat":
                        self.padding += 1
                    else:
                        self._headers.append((name.strip(), value.strip()))
                    continue
                self._state, self._scanned = "body", 0
            else:
                end = self._buf.find(b"\r\n" + self.delimiter, self._scanned)
                if end < 0:
                    # a delimiter may be split across reads: search its start again next time
                    self._scanned = max(0, len(self._buf) - len(self.delimiter) - 1)
                    return None
                body, headers = self._buf[:end], self._headers
                self._buf, self._headers = self._buf[end + 2:], []
                self._delimiter_line()
                return body, headers

    def _delimiter_line(self) -> bool:
        """Consume ``--boundary`` and the rest of its line, if all here."""
        rest = self._buf[len(self.delimiter):]
        if rest.startswith(b"--"):
            raise StreamClosed("multipart stream ended")
        eol = rest.find(b"\r\n")
        if eol < 0:
            if rest != b"-" and rest.rstrip(b"\r").strip(b" \t"):  # a lone "-" may yet become "--"
                raise ValueError(f"multipart stream out of sync: {self._buf[:40]!r}")
            self._state = "delimiter"
            return False
        if rest[:eol].strip(b" \t"):  # only transport padding may follow a delimiter
            raise ValueError(f"multipart stream out of sync: {self._buf[:40]!r}")
        self._buf, self._state = rest[eol + 2:], "headers"
        return True


class NDJSONParser:
    """Lines of a chunked NDJSON stream: JSON values, or ``str`` for lines
    that are not JSON. Empty lines (heartbeats) are counted, not returned.

    >>> NDJSONParser().feed(b'{"a":1}\\nplain\\n\\n')
    [{'a': 1}, 'plain']
    """

    def __init__(self) -> None:
        self._buf = b""
        self.blank = 0

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out = []
        for line in lines:
            if not line.strip():
                self.blank += 1
                continue
            text = line.decode("utf-8")
            try:
                out.append(json.loads(text))
            except ValueError:
                out.append(text)
        return out


# -- the client -------------------------------------------------------------


class StreamClient:
    """Read a live stream in a background thread.

    ``transport`` picks the parser: ``sse`` gives :class:`~comet.Event`
    objects, ``multipart`` gives :class:`~comet.Part` objects, ``chunked``
    gives NDJSON values, ``longpoll`` repeats requests with the returned
    cursor and gives :class:`~comet.Event` objects. ``last_event_id`` is
    sent as the ``Last-Event-ID`` header (``sse``) or the ``last_event_id``
    query parameter (others).

    :meth:`open` returns once the response headers are in, except for a
    long-poll, whose headers only come with its answer: it returns once the
    first request is sent. Without ``last_event_id`` that request starts
    "from now" whenever the server gets it, so a test that publishes right
    after opening a long-poll passes ``last_event_id=hub.last_id(channel)``.

    ``idle_timeout`` is the watchdog comet.js has: a connection on which no
    byte arrives for that many seconds (headers included, so a connect
    into a dead network counts) is dead, however open its socket looks.
    ``"auto"`` is twice the heartbeat the server announced (see
    :attr:`heartbeat`; on a long-poll, its ``poll_timeout``), and the
    client's ``timeout`` until one is known; ``None`` (the default) is no
    watchdog. A dead connection is closed, then, with ``reconnect=True``
    (the default), opened again resuming after the last event id seen (on
    SSE, a heartbeat's cursor too: a stream opened "from now" that has seen
    no event resumes there), or the ``last_event_id`` given
    (:attr:`reconnects` counts these; events keep accumulating in
    :attr:`events`, none twice); with ``reconnect=False`` the client ends
    and :meth:`wait_for` raises :class:`StreamIdle`. A stream the server
    ends, or an error, ends the client either way.

    Example::

        with StreamClient("http://127.0.0.1:8080/events") as client:
            events = client.wait_for(lambda evs: len(evs) >= 2, timeout=5)

        # through a network that drops the connection silently
        with FaultProxy(server.url) as proxy, StreamClient(proxy.url + "/events", idle_timeout="auto") as client:
            proxy.blackhole()
            hub.publish("lobby", "still here")
            client.wait_for(1, timeout=10)  # after a reconnect: client.reconnects == 1
    """

    __test__ = False

    def __init__(self, url: str, transport: str = "sse", *, last_event_id: str | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0,
                 idle_timeout: float | Literal["auto"] | None = None, reconnect: bool = True) -> None:
        if not (idle_timeout is None or idle_timeout == "auto"
                or (isinstance(idle_timeout, (int, float)) and not isinstance(idle_timeout, bool) and idle_timeout > 0)):
            raise ValueError(f"idle_timeout must be seconds > 0, 'auto' or None, got {idle_timeout!r}")
        self.url = url
        self.transport = transport
        self.last_event_id = last_event_id
        self.extra_headers = dict(headers or {})
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.reconnect = reconnect
        #: Connections the watchdog found dead and replaced.
        self.reconnects = 0
        self.events: list[Any] = []
        self.raw = bytearray()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.ended = False
        self.requests = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._opened = threading.Event()
        self._announced: float | None = None  # by a long-poll answer
        self._known_heartbeat: float | None = None  # of any earlier connection, for "auto"
        self.parser: Any = None

    # -- life cycle --

    def open(self, wait: bool = True, timeout: float | None = None) -> "StreamClient":
        """Connect and start reading; waits (at most ``timeout`` seconds,
        default the client's ``timeout``) for the response headers and
        raises :class:`HTTPStatusError` unless the status is 200."""
        self._thread = threading.Thread(target=self._run, name=f"comet-client {self.url}", daemon=True)
        self._thread.start()
        if wait:
            limit = self.timeout if timeout is None else timeout
            if not self._opened.wait(limit):
                try:
                    self.close(1.0)  # not left reading behind the test's back
                except TimeoutError:
                    pass
                raise TimeoutError(f"no response headers from {self.url} in {limit}s")
            self._raise_error()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect and join the reader thread (with a deadline)."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while True:
            # Shut down whichever connection is current: a long-poll reader
            # may have opened a new one since the last look.
            # (The socket itself: on "Connection: close" http.client hands it
            # to the response and forgets it, conn.sock is None.)
            sock = self._sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._thread is None:
                break
            self._thread.join(0.05)
            if not self._thread.is_alive():
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stream client thread for {self.url} did not stop in {timeout}s")
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> "StreamClient":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- waiting --

    def wait_for(self, what: int | Callable[[list[Any]], Any] = 1, timeout: float = 5.0) -> list[Any]:
        """Block until *what* (a count of items, or a predicate over the item
        list) holds; return the items so far. Raises ``TimeoutError`` (with
        what arrived), :class:`StreamClosed`, or the reader's error."""
        predicate = (lambda items: len(items) >= what) if isinstance(what, int) else what
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._raise_error()
                if predicate(self.events):
                    return list(self.events)
                if self.ended:
                    raise StreamClosed(f"stream ended after {len(self.events)} items: {self.events[-5:]!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout}s with {len(self.events)} items: {self.events[-5:]!r}")
                self._cond.wait(remaining)

    def wait_closed(self, timeout: float = 5.0) -> None:
        """Block until the server ends the stream."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.ended or self._error is not None, timeout):
                raise TimeoutError(f"stream {self.url} still open after {timeout}s")
        self._raise_error()

    @property
    def heartbeats(self) -> int:
        """Heartbeats seen so far (SSE heartbeat events or comments,
        multipart padding, blank NDJSON lines)."""
        p = self.parser
        # Each transport's stream-open preamble looks like one heartbeat; so
        # does SSE's announcement of the interval.
        if isinstance(p, SSEParser):
            return max(p.beats - 1, 0) + max(p.comments - 1, 0)
        if isinstance(p, MultipartParser):
            return p.padding  # its preamble is a delimiter, not a heartbeat
        if isinstance(p, NDJSONParser):
            return max(p.blank - 1, 0)
        return 0

    @property
    def heartbeat(self) -> float | None:
        """The longest silence the server promised, in seconds (its
        ``Comet-Heartbeat`` header, SSE's ``comet.heartbeat`` event, a
        long-poll answer's ``heartbeat``); ``None`` until it has said."""
        p = self.parser
        if isinstance(p, SSEParser) and p.heartbeat is not None:
            return p.heartbeat
        if self._announced is not None:
            return self._announced
        try:
            return float(self.headers["comet-heartbeat"])
        except (KeyError, ValueError):
            return None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- reading --

    def _connect(self, query: dict[str, str] | None = None, sent: threading.Event | None = None) -> http.client.HTTPResponse:
        parts = urlsplit(self.url)
        path = parts.path or "/"
        params = parts.query
        if query:
            params = (params + "&" if params else "") + urlencode(query)
        if params:
            path += "?" + params
        headers = {"Accept": _ACCEPT[self.transport], **self.extra_headers}
        if self.transport == "sse" and self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=self._idle_limit())
        try:
            self._conn.request("GET", path, headers=headers)
            self._sock = self._conn.sock
            if sent is not None:
                sent.set()  # long-poll: its headers only come with the answer
            resp = self._conn.getresponse()
        except TimeoutError:
            if self.idle_timeout is None:
                raise
            raise _Dead() from None
        self.requests += 1
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status != 200:
            raise HTTPStatusError(resp.status, resp.read())
        if self._sock is not None:
            self._sock.settimeout(self._idle_limit())  # the heartbeat is known now ("auto")
        return resp

    def _idle_limit(self) -> float:
        """Seconds a read may wait: the watchdog's limit, else ``timeout``."""
        if self.idle_timeout is None:
            return self.timeout
        if self.idle_timeout != "auto":
            return float(self.idle_timeout)
        heard = self.heartbeat if self.headers else None
        known = heard if heard is not None else self._known_heartbeat
        if known is None:
            return self.timeout
        self._known_heartbeat = known
        return 2 * known

    def _died(self) -> None:
        """The watchdog's verdict on the current connection."""
        if self._conn is not None:
            self._conn.close()
        if not self.reconnect:
            raise StreamIdle(f"{self.url}: nothing for {self._idle_limit():g}s (idle_timeout={self.idle_timeout!r})")
        with self._cond:
            self.reconnects += 1
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            if self.transport == "longpoll":
                self._run_longpoll()
            else:
                self._run_stream()
        except BaseException as exc:  # handed to the test thread by wait_for
            if not self._closing:
                self._error = exc
        finally:
            if self._conn is not None:
                self._conn.close()  # also when open() failed: nothing is left to the GC
            with self._cond:
                self.ended = True
                self._cond.notify_all()
            self._opened.set()

    def _run_stream(self) -> None:
        while not self._closing:
            try:
                self._stream_once()
                return  # the server ended it
            except _Dead:
                self._died()  # (raises StreamIdle without reconnect)

    def _stream_once(self) -> None:
        query = {"last_event_id": self.last_event_id} if self.transport != "sse" and self.last_event_id else None
        self.headers = {}
        resp = self._connect(query)
        if self.transport == "sse":
            self.parser = SSEParser()
        elif self.transport == "multipart":
            match = re.search(r'boundary="?([^";]+)"?', self.headers.get("content-type", ""))
            if not match:
                raise ValueError(f"multipart response without boundary: {self.headers.get('content-type')!r}")
            self.parser = MultipartParser(match[1])
        else:
            self.parser = NDJSONParser()
        self._opened.set()
        while not self._closing:
            try:
                data = resp.read1(65536)
            except TimeoutError:
                if self._closing:
                    return
                if self.idle_timeout is None:
                    raise
                raise _Dead() from None
            except (OSError, http.client.HTTPException, ValueError):
                if self._closing:
                    return
                raise
            if not data:
                return
            items = self.parser.feed(data)
            if self.idle_timeout == "auto" and self._sock is not None:
                self._sock.settimeout(self._idle_limit())  # SSE announces it in the body too
            with self._cond:
                self.raw += data
                self.events.extend(items)
                self._see_ids(items)
                self._cond.notify_all()

    def _see_ids(self, items: list[Any]) -> None:
        """Keep the last event id seen: where a reconnect resumes."""
        if isinstance(self.parser, SSEParser):
            if self.parser.last_event_id:
                self.last_event_id = self.parser.last_event_id
            return
        for item in items:
            if isinstance(item, Part) and item.content_type.startswith("application/json"):
                try:
                    item = json.loads(item.body)
                except ValueError:
                    continue
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                self.last_event_id = item["id"]

    def _run_longpoll(self) -> None:
        cursor = self.last_event_id
        while not self._closing:
            try:
                resp = self._connect({"last_event_id": cursor} if cursor else None, sent=self._opened)
                body = resp.read()
            except _Dead:
                self._died()  # a poll that outlived its announced timeout: poll again
                continue
            except TimeoutError:
                if self.idle_timeout is None or self._closing:
                    raise
                self._died()
                continue
            if self._conn is not None:
                self._conn.close()
            doc = json.loads(body)
            items = [TaggedEvent(e.get("data"), id=e.get("id"), name=e.get("event"), channel=e["channel"])
                     if "channel" in e else Event(e.get("data"), id=e.get("id"), name=e.get("event"))
                     for e in doc["events"]]
            cursor = doc.get("cursor") or cursor
            if isinstance(doc.get("heartbeat"), (int, float)):
                self._announced = float(doc["heartbeat"])
            with self._cond:
                self.raw += body
                self.events.extend(items)
                self.last_event_id = cursor
                self._cond.notify_all()


class _Dead(Exception):
    """The watchdog found the connection silent for too long."""


_ACCEPT = {"sse": "text/event-stream", "multipart": "multipart/x-mixed-replace", "chunked": "application/x-ndjson",
           "longpoll": "application/json"}
