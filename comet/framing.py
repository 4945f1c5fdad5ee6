"""Wire formats: what a stream item becomes on the wire, per transport.

Everything here is pure: values in, exact bytes out, no I/O and no HTTP
server. One :class:`Event` type travels from ``Hub.publish()`` to the wire;
:class:`Part` carries a binary payload with its own content type (an MJPEG
frame, say) on the multipart transport.

Transports
----------
``sse``
    ``text/event-stream`` per the WHATWG HTML spec, section 9.2 "Server-sent
    events". Data containing newlines becomes several ``data:`` lines; the
    spec's line terminators are CRLF, LF and CR, so all three split. Names and
    ids can never contain CR, LF or NUL (:class:`InvalidEvent`), because a
    newline there would let one event forge fields of the next.
``multipart``
    ``multipart/x-mixed-replace``. Each part is
    ``--BOUNDARY CRLF headers CRLF CRLF body CRLF`` and carries its own
    ``Content-Type`` and ``Content-Length``. The boundary delimiter is written
    *before* each part rather than after, so a part is complete as soon as its
    ``Content-Length`` bytes have arrived; readers that honour
    ``Content-Length`` (browsers' MJPEG decoders, ``comet.js``,
    ``comet.testing``) need not wait for the next part. A heartbeat is a bare
    CRLF between parts: RFC 2046 section 5.1.1 lets a body end in padding
    before the next delimiter, and a length-aware reader skips it, whereas an
    empty part would blank an ``<img>`` showing the last frame.
``chunked``
    Raw bytes, one HTTP/1.1 chunk per item. Text is UTF-8; dicts, lists and
    events become one JSON line each (NDJSON). The heartbeat is a lone
    ``\\n``, which NDJSON readers skip as an empty line.
``longpoll``
    One JSON document per request: ``{"events": [...], "cursor": ID}``; the
    client sends ``cursor`` back as ``last_event_id`` on its next request.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from .errors import InvalidEvent, UnserializableData

__all__ = [
    "TRANSPORTS", "Transport", "Framing", "FRAMINGS", "Event", "Part", "encode_item", "heartbeat",
    "new_boundary", "content_type", "encode_longpoll", "to_json",
]

Transport = Literal["sse", "multipart", "chunked", "longpoll"]
TRANSPORTS: tuple[str, ...] = ("sse", "multipart", "chunked", "longpoll")

#: Largest payload accepted in one event or part, in bytes of its wire text.
#: Big enough for a JPEG frame; small enough that one bad publish cannot make
#: every subscriber's socket buffer balloon.
DEFAULT_MAX_EVENT_BYTES = 1 << 20

_FORBIDDEN = re.compile(r"[\r\n\x00]")
_SSE_LINES = re.compile(r"\r\n|\r|\n")
_BOUNDARY_OK = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")  # RFC 2046 bchars


def to_json(value: Any) -> str:
    """Compact JSON text for *value*, or :class:`UnserializableData`."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnserializableData(f"data is not JSON-serialisable: {exc}") from None


def _check_field(what: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidEvent(f"{what} must be a str, got {type(value).__name__}")
    if _FORBIDDEN.search(value):
        raise InvalidEvent(f"{what} must not contain CR, LF or NUL: {value!r}")


@dataclass(frozen=True, eq=True, slots=True)
class Event:
    """One event: what ``Hub.publish()`` stores and every transport can encode.

    ``data`` is text, or anything JSON-serialisable (encoded once, lazily, and
    the encoding is shared by every stream that sends this event). ``bytes``
    are accepted when they are UTF-8 text; use :class:`Part` for binary.

    >>> Event("hello", id="1-1", name="greeting").encode("sse")
    b'id: 1-1\\nevent: greeting\\ndata: hello\\n\\n'
    >>> Event({"n": 1}).encode("chunked")
    b'{"id":null,"event":null,"data":{"n":1}}\\n'
    """

    data: Any = None
    id: str | None = None
    name: str | None = None
    channel: str | None = None
    retry: int | None = None
    # Encodings shared by every stream: "text" and "json" hold str, each
    # transport (and comet.writer's "<transport>+chunk") its bytes.
    _wire: dict[str, str | bytes] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        _check_field("event id", self.id)
        _check_field("event name", self.name)
        _check_field("channel", self.channel)
        if self.retry is not None and (not isinstance(self.retry, int) or self.retry < 0):
            raise InvalidEvent(f"retry must be a non-negative int of milliseconds, got {self.retry!r}")
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            try:
                object.__setattr__(self, "data", bytes(self.data).decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidEvent("event data bytes must be UTF-8 text; yield a Part for binary") from None

    def replace(self, **changes: Any) -> "Event":
        """A copy with some fields changed (used by per-subscriber views).

        >>> Event("a", id="1-1").replace(data="b")
        Event(data='b', id='1-1', name=None, channel=None, retry=None)
        """
        values = {k: getattr(self, k) for k in ("data", "id", "name", "channel", "retry")}
        values.update(changes)
        return Event(**values)

    def text(self) -> str:
        """The data as text: strings as they are, anything else as JSON."""
        cached = self._wire.get("text")
        if not isinstance(cached, str):  # not cached yet
            cached = self.data if isinstance(self.data, str) else to_json(self.data)
            self._wire["text"] = cached
        return cached

    def size(self) -> int:
        """Bytes of the data's wire text (what size limits are checked against)."""
        return len(self.text().encode("utf-8"))

    def encode(self, transport: str, boundary: str = "") -> bytes:
        """Exact bytes of this event on *transport*; cached per transport."""
        if not FRAMINGS[transport].shared_bytes:
            # Boundaries are random per response: caching per boundary would
            # keep one copy per stream. The JSON body inside is cached.
            return _multipart(self, boundary)
        wire = self._wire.get(transport)
        if not isinstance(wire, bytes):  # not cached yet
            wire = self._wire[transport] = _ENCODERS[transport](self, boundary)
        return wire


def _sse(event: Event, _boundary: str) -> bytes:
    out = []
    if event.id is not None:
        out.append(f"id: {event.id}\n")
    if event.name is not None:
        out.append(f"event: {event.name}\n")
    if event.retry is not None:
        out.append(f"retry: {event.retry}\n")
    # A leading space in a value is eaten by the parser once, so "data: " plus
    # the line keeps a line that itself starts with a space intact.
    for line in _SSE_LINES.split(event.text()):
        out.append(f"data: {line}\n")
    out.append("\n")
    return "".join(out).encode("utf-8")


def _json_line(event: Event, _boundary: str) -> bytes:
    return _event_json(event).encode("utf-8") + b"\n"


def _event_json(event: Event) -> str:
    cached = event._wire.get("json")
    if not isinstance(cached, str):  # not cached yet
        # For non-str data, text() already is the JSON; reuse it so a dict
        # payload is serialised once per event, whatever the transports.
        data_json = to_json(event.data) if isinstance(event.data, str) else event.text()
        cached = '{"id":%s,"event":%s,"data":%s}' % (to_json(event.id), to_json(event.name), data_json)
        event._wire["json"] = cached
    return cached


def _multipart(event: Event, boundary: str) -> bytes:
    return Part(_event_json(event).encode("utf-8"), "application/json").encode(boundary)


def _longpoll(event: Event, _boundary: str) -> bytes:
    return _event_json(event).encode("utf-8")


_ENCODERS = {"sse": _sse, "chunked": _json_line, "multipart": _multipart, "longpoll": _longpoll}


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a ``multipart/x-mixed-replace`` stream, with its own type.

    >>> Part(b"\\xff\\xd8...", "image/jpeg").encode("B")
    b'--B\\r\\nContent-Type: image/jpeg\\r\\nContent-Length: 5\\r\\n\\r\\n\\xff\\xd8...\\r\\n'
    """

    body: bytes
    content_type: str = "application/octet-stream"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.body, (bytes, bytearray)):
            raise TypeError(f"Part body must be bytes, got {type(self.body).__name__}")
        _check_field("part content type", self.content_type)
        for name, value in self.headers:
            _check_field("part header name", name)
            _check_field("part header value", value)

    def encode(self, boundary: str) -> bytes:
        """``--boundary``, headers (type, length, extra) and the body.

        Refuses a body that contains the delimiter: a reader that ignores
        ``Content-Length`` would otherwise split the part in two.
        """
        body = bytes(self.body)
        if boundary and b"--" + boundary.encode("ascii") in body:
            raise InvalidEvent("part body contains the multipart boundary")
        head = [f"--{boundary}", f"Content-Type: {self.content_type}", f"Content-Length: {len(body)}"]
        head.extend(f"{k}: {v}" for k, v in self.headers)
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body + b"\r\n"

    def encode_chunk(self) -> bytes:
        """The body alone, for the chunked transport."""
        return bytes(self.body)


def new_boundary() -> str:
    """A fresh random boundary: 128 bits, so it occurring in a part is
    vanishingly unlikely (and :meth:`Part.encode` still checks)."""
    return "comet-" + secrets.token_hex(16)


def check_boundary(boundary: str) -> str:
    """Validate a caller-chosen boundary against RFC 2046's grammar."""
    if not isinstance(boundary, str) or not _BOUNDARY_OK.fullmatch(boundary):
        raise ValueError(f"boundary must be 1-70 RFC 2046 characters, got {boundary!r}")
    return boundary


class Framing:
    """How one transport frames a stream: one small object per transport
    (:data:`FRAMINGS`), so that what differs between transports lives here,
    not in switches elsewhere.

    >>> FRAMINGS["sse"].heartbeat, FRAMINGS["longpoll"].streaming
    (b':\\n\\n', False)
    """

    name = ""
    #: Many items over one response (False: long-poll, one answer per request).
    streaming = True
    #: An :class:`Event` is the same bytes on every stream of this transport,
    #: so it is encoded (and chunk-framed) once and shared.
    shared_bytes = True
    #: Keep-alive bytes for an idle stream (see the module docstring).
    heartbeat = b""

    def boundary(self, fixed: str | None = None) -> str:
        """The multipart boundary of one response ("" for other transports)."""
        return ""

    def content_type(self, boundary: str = "", chunked_type: str | None = None) -> str:
        """The response ``Content-Type`` header value."""
        return "application/json; charset=utf-8"

    def preamble(self, retry: int | None = None) -> bytes:
        """First body bytes of a stream. WSGI servers (cheroot included) send
        the response headers only with the first non-empty body chunk, so
        without these a client would not see the stream open until the first
        event or heartbeat."""
        return self.heartbeat

    def encode(self, item: Any, boundary: str = "", max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes:
        """Bytes for one item a handler yielded (see :func:`encode_item`)."""
        if isinstance(item, Event):
            if item.size() > max_bytes:
                raise InvalidEvent(f"event of {item.size()} bytes exceeds the {max_bytes}-byte limit")
            return item.encode(self.name, boundary)
        if isinstance(item, Part):
            if len(item.body) > max_bytes:
                raise InvalidEvent(f"part of {len(item.body)} bytes exceeds the {max_bytes}-byte limit")
            return self._part(item, boundary)
        if isinstance(item, (bytes, bytearray)):
            body, ctype = bytes(item), "application/octet-stream"
        elif isinstance(item, str):
            body, ctype = item.encode("utf-8"), "text/plain; charset=utf-8"
        else:
            body, ctype = self._json(item), "application/json"
        if len(body) > max_bytes:
            raise InvalidEvent(f"item of {len(body)} bytes exceeds the {max_bytes}-byte limit")
        return self._body(body, ctype, boundary)

    def _part(self, part: Part, boundary: str) -> bytes:
        raise TypeError(f"a Part cannot be sent on the {self.name} transport")

    def _json(self, value: Any) -> bytes:
        return to_json(value).encode("utf-8")

    def _body(self, body: bytes, content_type: str, boundary: str) -> bytes:
        return body

    def __repr__(self) -> str:
        return f"<Framing {self.name}>"


class _SSEFraming(Framing):
    name = "sse"
    heartbeat = b":\n\n"

    def content_type(self, boundary: str = "", chunked_type: str | None = None) -> str:
        return "text/event-stream; charset=utf-8"

    def preamble(self, retry: int | None = None) -> bytes:
        # A comment (and ``retry:`` if set): EventSource ignores it.
        return b":ok\n\n" if retry is None else b":ok\nretry: %d\n\n" % retry

    def encode(self, item: Any, boundary: str = "", max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes:
        if not isinstance(item, (Event, Part)):
            item = Event(item)  # text, bytes (UTF-8) or JSON all become data: lines
        return super().encode(item, boundary, max_bytes)


class _MultipartFraming(Framing):
    name = "multipart"
    shared_bytes = False  # each response has its own random boundary
    heartbeat = b"\r\n"  # RFC 2046's padding between parts; also the preamble

    def boundary(self, fixed: str | None = None) -> str:
        return fixed or new_boundary()

    def content_type(self, boundary: str = "", chunked_type: str | None = None) -> str:
        return f"multipart/x-mixed-replace; boundary={boundary}"

    def _part(self, part: Part, boundary: str) -> bytes:
        return part.encode(boundary)

    def _body(self, body: bytes, content_type: str, boundary: str) -> bytes:
        return Part(body, content_type).encode(boundary)


class _ChunkedFraming(Framing):
    name = "chunked"
    heartbeat = b"\n"  # NDJSON readers skip an empty line; also the preamble

    def content_type(self, boundary: str = "", chunked_type: str | None = None) -> str:
        return chunked_type or "application/x-ndjson; charset=utf-8"

    def _part(self, part: Part, boundary: str) -> bytes:
        return part.encode_chunk()

    def _json(self, value: Any) -> bytes:
        return to_json(value).encode("utf-8") + b"\n"  # one JSON line each (NDJSON)


class _LongPollFraming(Framing):
    name = "longpoll"
    streaming = False


#: The framing of each transport, by name.
FRAMINGS: dict[str, Framing] = {f.name: f for f in (_SSEFraming(), _MultipartFraming(), _ChunkedFraming(), _LongPollFraming())}


def content_type(transport: str, boundary: str = "", chunked_type: str | None = None) -> str:
    """The response ``Content-Type`` header value for a transport."""
    return FRAMINGS[transport].content_type(boundary, chunked_type)


def encode_item(item: Any, transport: str, boundary: str = "", max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes:
    """Bytes for one item a handler yielded, on a streaming transport.

    Items may be an :class:`Event`, a :class:`Part`, ``str``, ``bytes``, or a
    JSON-serialisable value (dicts and lists become JSON).

    >>> encode_item("hi\\nthere", "sse")
    b'data: hi\\ndata: there\\n\\n'
    >>> encode_item({"a": 1}, "chunked")
    b'{"a":1}\\n'
    >>> encode_item(b"raw", "chunked")
    b'raw'
    """
    return FRAMINGS[transport].encode(item, boundary, max_bytes)


def heartbeat(transport: str) -> bytes:
    """Keep-alive bytes for an idle stream (see the module docstring)."""
    return FRAMINGS[transport].heartbeat


def preamble(transport: str, retry: int | None = None) -> bytes:
    """First body bytes of a stream (see :meth:`Framing.preamble`)."""
    return FRAMINGS[transport].preamble(retry)


def longpoll_item(item: Any) -> str:
    """JSON text of one long-poll batch entry."""
    if isinstance(item, Event):
        return _longpoll(item, "").decode("utf-8")
    if isinstance(item, Part):
        raise TypeError("a Part cannot be sent on the longpoll transport")
    if isinstance(item, (bytes, bytearray)):
        try:
            item = bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent("longpoll items must be text or JSON, not binary bytes") from None
    return '{"id":null,"event":null,"data":%s}' % to_json(item)


def encode_longpoll(entries: Iterable[str], cursor: str | None) -> bytes:
    """The long-poll response body from already-encoded batch entries.

    >>> encode_longpoll(['{"id":"1-1","event":null,"data":"x"}'], "1-1")
    b'{"events":[{"id":"1-1","event":null,"data":"x"}],"cursor":"1-1"}'
    """
    return ('{"events":[%s],"cursor":%s}' % (",".join(entries), to_json(cursor))).encode("utf-8")
