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
    ``multipart/x-mixed-replace``, shaped by what browsers' ``<img>`` does
    (verified in headless Chromium, ``tests/browser/test_multipart_img.py``).
    Browsers ignore ``Content-Length`` in parts: Chromium shows a part only
    once the *next* part's header block is parsed, Firefox at the next
    delimiter. So each part is written as its body followed at once by the
    delimiter and the next part's header block, guessed to be this part's
    own (``Content-Type`` and extra headers; no ``Content-Length``, which
    cannot be known ahead)::

        --B CRLF                                   (the preamble)
        Content-Type: image/jpeg CRLF CRLF frame1  (the first part)
        CRLF --B CRLF Content-Type: image/jpeg CRLF CRLF
        frame2                                     (a part whose headers went ahead)
        CRLF --B CRLF Content-Type: image/jpeg CRLF CRLF

    A part whose headers differ from those sent ahead first closes the
    pending part empty. Readers find the end of a body at the next
    delimiter (so a body may not contain ``--B``) and skip empty parts.

    Heartbeats must never put a byte where a browser takes it for image
    data: Chromium has no preamble (it prepends a boundary to anything
    before the first one), and an empty part blanks an ``<img>`` for good.
    So a heartbeat is, before the first part, a ``Comet-Heartbeat: 1``
    header line of the first part's header block, still open after the
    preamble (Chromium and Firefox took 20,000 of them, 83 hours at the
    default 15 s, then showed the frames); after an ``image/*`` part, that
    image again (the browser redraws the same picture); after any other
    part, an empty part. The state this needs lives in the response's
    :class:`Boundary`.
``chunked``
    Raw bytes, one HTTP/1.1 chunk per item. Text is UTF-8; dicts, lists and
    events become one JSON line each (NDJSON). The heartbeat is a lone
    ``\\n``, which NDJSON readers skip as an empty line.
``longpoll``
    One JSON document per request: ``{"events": [...], "cursor": ID,
    "heartbeat": S}``; the client sends ``cursor`` back as ``last_event_id``
    on its next request.

Heartbeats are announced
------------------------
A client can only tell a dead connection from a quiet one if it knows how
long the server may stay silent. Every stream response says it in a
``Comet-Heartbeat: <seconds>`` header (the ``heartbeat`` option; a
long-poll's ``poll_timeout``, as its empty answer is its heartbeat), and
the long-poll answer in its ``"heartbeat"`` member. ``EventSource`` shows
neither headers nor comments, so on SSE the heartbeat itself is a named
event, ``event: comet.heartbeat`` with the interval as its data, sent once
right after the preamble and as every heartbeat: ``onmessage`` never sees a
named event, so plain ``EventSource`` pages are unaffected, and comet.js
listens for it. Its bytes depend on the interval only, and are cached per
interval.

A stream opened "from now" has no event id until its first event: a client
whose connection died before then would resume "from now" too, and miss
what was published while it was away (on a quiet channel, the common case).
So an SSE heartbeat also carries the stream's cursor, when the server knows
one the client has not been given (no event yet, or events a view left
out): ``event: comet.heartbeat``, ``id: <cursor>``, ``data: <seconds>``.
Per the spec, an ``id`` field sets ``EventSource``'s ``lastEventId`` even
for a named event no one listens to, so a native reconnect resumes there
too. The announcement after the preamble carries it when the cursor is
known then. A heartbeat with no cursor to tell is the cached bytes above.

Streams of several channels
---------------------------
Events of a subscription to several channels (:class:`TaggedEvent`) say
their channel on every transport: the JSON forms gain a ``"channel"``
member, and on SSE, where a bare ``EventSource`` sees only the id, the
event name and the data, the data is ``{"channel": ..., "data": ...}``. A
binary :class:`Part` gains a ``Comet-Channel`` header (the name as %-escaped
UTF-8, as in a URL: a header carries Latin-1 only). Their ids are the
subscription's cursor on every channel (see ``comet.hub``).
"""
from __future__ import annotations

import base64
import json
import re
import secrets
from decimal import Decimal
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal
from urllib.parse import quote

from .errors import InvalidEvent, UnserializableData

__all__ = [
    "TRANSPORTS", "Transport", "Framing", "FRAMINGS", "Event", "Part", "Boundary", "encode_item", "heartbeat",
    "new_boundary", "content_type", "encode_longpoll", "to_json", "TaggedEvent", "HEARTBEAT_EVENT", "heartbeat_seconds",
]

Transport = Literal["sse", "multipart", "chunked", "longpoll"]
TRANSPORTS: tuple[str, ...] = ("sse", "multipart", "chunked", "longpoll")

#: Largest payload accepted in one event or part, in bytes of its wire text.
#: Big enough for a JPEG frame; small enough that one bad publish cannot make
#: every subscriber's socket buffer balloon.
DEFAULT_MAX_EVENT_BYTES = 1 << 20

_FORBIDDEN = re.compile(r"[\r\n\x00]")
_GAP = "comet.gap"  # comet.hub.GAP (the hub imports framing, not the reverse)
_SSE_LINES = re.compile(r"\r\n|\r|\n")
_BOUNDARY_OK = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")  # RFC 2046 bchars


#: The name of the SSE event that announces the heartbeat interval and is
#: the heartbeat (see the module docstring).
HEARTBEAT_EVENT = "comet.heartbeat"


def heartbeat_seconds(seconds: float) -> str:
    """An interval as the ``Comet-Heartbeat`` header, the SSE heartbeat and
    the long-poll answer write it: decimal, in its shortest form.

    >>> heartbeat_seconds(15.0), heartbeat_seconds(0.5), heartbeat_seconds(1), heartbeat_seconds(1e-05)
    ('15', '0.5', '1', '0.00001')
    """
    text = repr(float(seconds))
    if "e" in text:  # repr's exponent form is not what a header reader expects
        text = format(Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# One encoder for every event: json.dumps builds a new one per call when
# given options (a third of an event's serialisation).
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def to_json(value: Any) -> str:
    """Compact JSON text for *value*, or :class:`UnserializableData`."""
    try:
        return _encode_json(value)
    except (TypeError, ValueError) as exc:
        raise UnserializableData(f"data is not JSON-serialisable: {exc}") from None


def _check_field(what: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidEvent(f"{what} must be a str, got {type(value).__name__}")
    if _FORBIDDEN.search(value):
        raise InvalidEvent(f"{what} must not contain CR, LF or NUL: {value!r}")


def _check_latin1(what: str, value: str) -> None:
    # A part's header block goes on the wire as Latin-1 (HTTP header text):
    # refused here, it can never end the streams it is sent to.
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidEvent(f"{what} must be Latin-1 text (it goes in a header): {value!r}") from None


#: Left as they are in a ``Comet-Channel`` header: RFC 3986 unreserved and
#: sub-delims, ":" and "@" (a URL path segment's characters, less "%").
_CHANNEL_SAFE = "-._~!$&'()*+,;=:@"


@dataclass(frozen=True, eq=True, slots=True)
class Event:
    """One event: what ``Hub.publish()`` stores and every transport can encode.

    ``data`` is text, or anything JSON-serialisable (encoded once, lazily, and
    the encoding is shared by every stream that sends this event). ``bytes``
    are accepted when they are UTF-8 text; use :class:`Part` for binary: a
    Part travels as itself on multipart and as JSON
    ``{"content_type": ..., "base64": ...}`` on the other transports.

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
    # Where a hub stored it in this process's order of publishing (every
    # channel's): how a subscription to several channels merges them.
    _order: int = field(default=0, compare=False, repr=False, hash=False)
    # What it is the latest value of on a latest-value channel (``publish(key=)``;
    # None: its name is). Not on the wire.
    _key: str | None = field(default=None, compare=False, repr=False, hash=False)

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

    def stored_as(self, event_id: str) -> "Event":
        """This event as a hub stores it, with *event_id*: its key kept, and
        the encodings made so far (the publisher's serialisation is reused
        by every stream).

        >>> Event("hi", channel="room").stored_as("1-1")
        Event(data='hi', id='1-1', name=None, channel='room', retry=None)
        """
        stored = Event(self.data, id=event_id, name=self.name, channel=self.channel, retry=self.retry, _key=self._key)
        stored._wire.update(self._wire)  # its text, if made: a Part's base64 only when asked for
        return stored

    @property
    def latest_key(self) -> str | None:
        """What this event is the newest value of on a latest-value channel
        (``Hub.publish(..., key=)``; by default its name).

        >>> Event(1, name="score").latest_key
        'score'
        """
        return self.name if self._key is None else self._key

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
            if isinstance(self.data, Part):
                cached = '{"content_type":%s,"base64":"%s"}' % (
                    to_json(self.data.content_type), base64.b64encode(self.data.body).decode("ascii"))
            else:
                cached = self.data if isinstance(self.data, str) else to_json(self.data)
            self._wire["text"] = cached
        return cached

    def size(self) -> int:
        """Bytes of the data's wire text (what size limits are checked
        against); for a :class:`Part`, of its body, without encoding it."""
        if isinstance(self.data, Part):
            return len(self.data.body)
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


@dataclass(frozen=True, eq=True, slots=True)
class TaggedEvent(Event):
    """An event of a subscription to several channels: the same fields, and
    its wire forms carry ``channel`` (see the module docstring).

    >>> TaggedEvent("hi", id="3x.1-1", channel="room").encode("sse")
    b'id: 3x.1-1\\ndata: {"channel":"room","data":"hi"}\\n\\n'
    >>> TaggedEvent({"n": 1}, id="3x.1-1", channel="room").encode("chunked")
    b'{"id":"3x.1-1","event":null,"channel":"room","data":{"n":1}}\\n'
    """

    @classmethod
    def of(cls, event: Event, cursor: str, channel: str) -> "TaggedEvent":
        """*event* of *channel* as a stream of several channels sends it, at
        *cursor*: what the hub makes for each subscriber. Not validated
        again (the event was, and the hub makes the cursor), and what does
        not depend on the cursor is encoded once, on *event*, and shared by
        every subscriber.

        >>> stored = Event("hi", id="1-1", channel="room")
        >>> TaggedEvent.of(stored, "3x.1-1", "room").encode("sse")
        b'id: 3x.1-1\\ndata: {"channel":"room","data":"hi"}\\n\\n'
        """
        tagged = object.__new__(cls)
        wire: dict[str, str | bytes] = {}
        if event.channel == channel and not isinstance(event.data, Part):
            shared = event._wire
            tail = shared.get("tagged-tail")
            if not isinstance(tail, str):
                tail = shared["tagged-tail"] = ',"event":%s,"channel":%s,"data":%s}' % (
                    to_json(event.name), to_json(channel), _data_json(event))
            wire["tagged-tail"] = tail
        for name, value in (("data", event.data), ("id", cursor), ("name", event.name), ("channel", channel),
                            ("retry", event.retry), ("_wire", wire), ("_order", event._order), ("_key", event._key)):
            object.__setattr__(tagged, name, value)
        return tagged

    def _tail(self) -> str:
        """``,"event":...,"channel":...,"data":...}``: its JSON after the id."""
        tail = self._wire.get("tagged-tail")
        if not isinstance(tail, str):
            tail = self._wire["tagged-tail"] = ',"event":%s,"channel":%s,"data":%s}' % (
                to_json(self.name), to_json(self.channel), _data_json(self))
        return tail


def _data_json(event: Event) -> str:
    # For non-str data, text() already is the JSON; reuse it so a dict
    # payload is serialised once per event, whatever the transports.
    return to_json(event.data) if isinstance(event.data, str) else event.text()


def _sse(event: Event, _boundary: str) -> bytes:
    if isinstance(event, TaggedEvent):
        return _sse_tagged(event)
    out = []
    if event.id is not None:
        out.append(f"id: {event.id}\n")
    if event.name is not None:
        out.append(f"event: {event.name}\n")
    if event.retry is not None:
        out.append(f"retry: {event.retry}\n")
    text = event.text()
    # A leading space in a value is eaten by the parser once, so "data: " plus
    # the line keeps a line that itself starts with a space intact.
    for line in _SSE_LINES.split(text):
        out.append(f"data: {line}\n")
    out.append("\n")
    return "".join(out).encode("utf-8")


def _sse_tagged(event: TaggedEvent) -> bytes:
    # The data is {"channel":...,"data":...}: JSON has no raw newlines, so one
    # data line; it is the JSON form's tail without the event name.
    tail = event._tail()
    data = '{"channel":' + tail[tail.index(',"channel":') + 11:]
    head = f"id: {event.id}\n"
    if event.name is not None:
        head += f"event: {event.name}\n"
    if event.retry is not None:
        head += f"retry: {event.retry}\n"
    return f"{head}data: {data}\n\n".encode("utf-8")


def _json_line(event: Event, _boundary: str) -> bytes:
    return _event_json(event).encode("utf-8") + b"\n"


def _event_json(event: Event) -> str:
    cached = event._wire.get("json")
    if not isinstance(cached, str):  # not cached yet
        if isinstance(event, TaggedEvent):
            cached = '{"id":%s%s' % (to_json(event.id), event._tail())
        else:
            cached = '{"id":%s,"event":%s,"data":%s}' % (to_json(event.id), to_json(event.name), _data_json(event))
        event._wire["json"] = cached
    return cached


def _multipart(event: Event, boundary: str) -> bytes:
    if isinstance(event.data, Part):  # a hub carrying binary: the part itself, for <img>
        part = event.data
        if isinstance(event, TaggedEvent) and event.channel is not None:
            # (%-escaped: any channel name, Latin-1 or not, fits in a header)
            part = Part(part.body, part.content_type, part.headers + (("Comet-Channel", quote(event.channel, safe=_CHANNEL_SAFE)),))
        return part.encode(boundary)
    if event.name == _GAP and isinstance(boundary, Boundary) and _is_image(boundary.last):
        # An image stream that fell behind needs no repair (the next frame is
        # the whole picture), and a JSON part there would end an <img>: the
        # last frame again, as a heartbeat would.
        return FRAMINGS["multipart"].beat(boundary)
    return Part(_event_json(event).encode("utf-8"), "application/json").encode(boundary)


def _longpoll(event: Event, _boundary: str) -> bytes:
    return _event_json(event).encode("utf-8")


_ENCODERS = {"sse": _sse, "chunked": _json_line, "multipart": _multipart, "longpoll": _longpoll}


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a ``multipart/x-mixed-replace`` stream, with its own type.

    Yield it from a handler, or publish it to a hub
    (``hub.publish("cam", Part(jpeg, "image/jpeg"))``): multipart streams
    write it as itself, the other transports as base64 JSON (see
    :class:`Event`). On a stream, its bytes depend on what was written
    before (see the module docstring); the first part after the preamble:

    >>> Part(b"\\xff\\xd8...", "image/jpeg").encode("B")
    b'Content-Type: image/jpeg\\r\\n\\r\\n\\xff\\xd8...\\r\\n--B\\r\\nContent-Type: image/jpeg\\r\\n\\r\\n'
    """

    body: bytes
    content_type: str = "application/octet-stream"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.body, (bytes, bytearray)):
            raise TypeError(f"Part body must be bytes, got {type(self.body).__name__}")
        if not self.body:
            raise InvalidEvent("a part must not be empty: readers skip empty parts and browsers blank the image")
        _check_field("part content type", self.content_type)
        _check_latin1("part content type", self.content_type)
        for name, value in self.headers:
            _check_field("part header name", name)
            _check_field("part header value", value)
            _check_latin1("part header", f"{name}: {value}")

    def head(self) -> bytes:
        """The part's header block: type, extra headers, the blank line."""
        lines = [f"Content-Type: {self.content_type}", *(f"{k}: {v}" for k, v in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def encode(self, boundary: str) -> bytes:
        """This part's bytes next on the stream of *boundary* (a
        :class:`Boundary`, whose state it advances; a plain ``str`` stands
        for a stream that has sent only its preamble).

        Refuses a body that contains the delimiter: it would end early.
        """
        state = boundary if isinstance(boundary, Boundary) else Boundary(boundary)
        body = bytes(self.body)
        if b"--" + state.encode("ascii") in body:
            raise InvalidEvent("part body contains the multipart boundary")
        head = self.head()
        if state.ahead is None:  # the first part: the preamble left its header block open
            start = head
        elif state.ahead == head:  # the usual case, a camera: its headers went out ahead
            start = b""
        else:  # different headers: close the pending part (empty) first
            start = state.delimiter + head
        state.ahead, state.last = head, self
        return start + body + state.delimiter + head

    def encode_chunk(self) -> bytes:
        """The body alone, for the chunked transport."""
        return bytes(self.body)


def _is_image(part: Part | None) -> bool:
    return part is not None and part.content_type.startswith("image/")


class Boundary(str):
    """The multipart boundary of one response, and what that response has
    written so far, which the next part and heartbeat depend on (see the
    module docstring). :meth:`Framing.boundary` makes one per response; the
    writer passes it back with every item, always on one thread at a time.

    >>> b = Boundary("B")
    >>> FRAMINGS["multipart"].preamble(boundary=b), FRAMINGS["multipart"].beat(b)
    (b'--B\\r\\n', b'Comet-Heartbeat: 1\\r\\n')
    >>> Part(b"{}", "application/json").encode(b)[-8:], FRAMINGS["multipart"].beat(b)
    (b'json\\r\\n\\r\\n', b'\\r\\n--B\\r\\nContent-Type: application/json\\r\\n\\r\\n')
    """

    #: The header block already written for the next part (None: no part
    #: yet, and the first part's header block is still open).
    ahead: bytes | None = None
    #: The last part written: an image is repeated as the heartbeat.
    last: Part | None = None

    @property
    def delimiter(self) -> bytes:
        """``CRLF --boundary CRLF``: ends a body and starts the next part."""
        return b"\r\n--" + self.encode("ascii") + b"\r\n"


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

    >>> FRAMINGS["sse"].beat(interval=15), FRAMINGS["longpoll"].streaming
    (b'event: comet.heartbeat\\ndata: 15\\n\\n', False)
    """

    name = ""
    #: Many items over one response (False: long-poll, one answer per request).
    streaming = True
    #: An :class:`Event` is the same bytes on every stream of this transport,
    #: so it is encoded (and chunk-framed) once and shared.
    shared_bytes = True
    #: Keep-alive bytes for an idle stream (see the module docstring; on
    #: SSE, at the default interval: they say the interval, see :meth:`beat`).
    heartbeat = b""
    #: Its heartbeat can carry the stream's cursor (SSE: see the module
    #: docstring), so a stream should say it to :meth:`beat`.
    beats_cursor = False

    def boundary(self, fixed: str | None = None) -> str:
        """The multipart boundary of one response ("" for other transports)."""
        return ""

    def beat(self, boundary: str = "", interval: float | None = None, cursor: str | None = None) -> bytes:
        """Keep-alive bytes for an idle stream now: :attr:`heartbeat`, except
        on multipart, where they depend on what was written (:class:`Boundary`),
        and on SSE, where they say the *interval* (seconds; required there)
        and, if given, the stream's *cursor* (see :attr:`beats_cursor`)."""
        return self.heartbeat

    def content_type(self, boundary: str = "", chunked_type: str | None = None) -> str:
        """The response ``Content-Type`` header value."""
        return "application/json; charset=utf-8"

    def preamble(self, retry: int | None = None, boundary: str = "", heartbeat: float | None = None,
                 cursor: str | None = None) -> bytes:
        """First body bytes of a stream. WSGI servers (cheroot included) send
        the response headers only with the first non-empty body chunk, so
        without these a client would not see the stream open until the first
        event or heartbeat. On SSE, with *heartbeat* (seconds), the
        announcement of the interval follows at once (with *cursor*, if
        given: see :meth:`beat`)."""
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
    heartbeat = b"event: comet.heartbeat\ndata: 15\n\n"
    beats_cursor = True

    def __init__(self) -> None:
        self._beats: dict[float, bytes] = {}  # by interval: a server has a few

    def beat(self, boundary: str = "", interval: float | None = None, cursor: str | None = None) -> bytes:
        if interval is None:
            raise ValueError("an SSE heartbeat says its interval: pass interval=seconds")
        if cursor is not None and not _FORBIDDEN.search(cursor):  # (a line break would forge fields)
            # Rare (once per stream that has a cursor to tell): not cached.
            return b"event: %s\nid: %s\ndata: %s\n\n" % (
                HEARTBEAT_EVENT.encode(), cursor.encode("utf-8"), heartbeat_seconds(interval).encode())
        cached = self._beats.get(interval)
        if cached is None:
            cached = b"event: %s\ndata: %s\n\n" % (HEARTBEAT_EVENT.encode(), heartbeat_seconds(interval).encode())
            if len(self._beats) < 256:  # (intervals come from options: this never fills in practice)
                self._beats[interval] = cached
        return cached

    def content_type(self, boundary: str = "", chunked_type: str | None = None) -> str:
        return "text/event-stream; charset=utf-8"

    def preamble(self, retry: int | None = None, boundary: str = "", heartbeat: float | None = None,
                 cursor: str | None = None) -> bytes:
        # A comment (and ``retry:`` if set): EventSource ignores it. Then the
        # announcement, a heartbeat event (see the module docstring).
        start = b":ok\n\n" if retry is None else b":ok\nretry: %d\n\n" % retry
        return start if heartbeat is None else start + self.beat(boundary, heartbeat, cursor)

    def encode(self, item: Any, boundary: str = "", max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes:
        if not isinstance(item, (Event, Part)):
            item = Event(item)  # text, bytes (UTF-8) or JSON all become data: lines
        return super().encode(item, boundary, max_bytes)


class _MultipartFraming(Framing):
    name = "multipart"
    shared_bytes = False  # each response has its own boundary, and its own state
    heartbeat = b"Comet-Heartbeat: 1\r\n"  # before the first part; see beat()

    def boundary(self, fixed: str | None = None) -> str:
        return Boundary(fixed or new_boundary())

    def preamble(self, retry: int | None = None, boundary: str = "", heartbeat: float | None = None,
                 cursor: str | None = None) -> bytes:
        # The first delimiter at once: Chromium has no preamble, anything
        # else before it would become (part of) a first part.
        return b"--" + boundary.encode("ascii") + b"\r\n"

    def beat(self, boundary: str = "", interval: float | None = None, cursor: str | None = None) -> bytes:
        state = boundary if isinstance(boundary, Boundary) else Boundary(boundary)
        if state.ahead is None:  # a header line of the first part, still open
            return self.heartbeat
        last = state.last
        if last is not None and _is_image(last):  # (narrows for mypy)
            # Any byte now is image data to a browser, and an empty part
            # blanks the picture: the same frame again is all it can take.
            return bytes(last.body) + state.delimiter + state.ahead
        return state.delimiter + state.ahead  # an empty part: readers skip it

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


def heartbeat(transport: str, interval: float = 15.0, cursor: str | None = None) -> bytes:
    """Keep-alive bytes for an idle stream that beats every *interval*
    seconds (see the module docstring; on multipart, before the first part);
    on SSE, with the stream's *cursor* if given.

    >>> heartbeat("sse", 0.5), heartbeat("chunked", 0.5)
    (b'event: comet.heartbeat\\ndata: 0.5\\n\\n', b'\\n')
    >>> heartbeat("sse", 0.5, cursor="1700000000000-0")
    b'event: comet.heartbeat\\nid: 1700000000000-0\\ndata: 0.5\\n\\n'
    """
    return FRAMINGS[transport].beat("", interval, cursor)


def preamble(transport: str, retry: int | None = None, boundary: str = "", heartbeat: float | None = None,
             cursor: str | None = None) -> bytes:
    """First body bytes of a stream (see :meth:`Framing.preamble`): on SSE,
    with *heartbeat*, its announcement included (and *cursor*, if given).

    >>> preamble("sse", heartbeat=15)
    b':ok\\n\\nevent: comet.heartbeat\\ndata: 15\\n\\n'
    """
    return FRAMINGS[transport].preamble(retry, boundary, heartbeat, cursor)


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


def encode_longpoll(entries: Iterable[str], cursor: str | None, heartbeat: float | None = None) -> bytes:
    """The long-poll response body from already-encoded batch entries;
    with *heartbeat* (the ``poll_timeout``), its announcement.

    >>> encode_longpoll(['{"id":"1-1","event":null,"data":"x"}'], "1-1", 25)
    b'{"events":[{"id":"1-1","event":null,"data":"x"}],"cursor":"1-1","heartbeat":25}'
    """
    beat = "" if heartbeat is None else ',"heartbeat":' + heartbeat_seconds(heartbeat)
    return ('{"events":[%s],"cursor":%s%s}' % (",".join(entries), to_json(cursor), beat)).encode("utf-8")
