"""Wire formats: input -> exact bytes, per transport (no I/O)."""
import json

import pytest

from comet import Event, InvalidEvent, Part, UnserializableData
from comet.framing import FRAMINGS, encode_item, encode_longpoll, heartbeat, heartbeat_seconds, longpoll_item, new_boundary, preamble
from comet.testing import MultipartParser, NDJSONParser, SSEParser

SSE_TABLE = [
    (Event("hi"), b"data: hi\n\n"),
    (Event("hi", id="1-1"), b"id: 1-1\ndata: hi\n\n"),
    (Event("hi", name="join"), b"event: join\ndata: hi\n\n"),
    (Event("hi", retry=3000), b"retry: 3000\ndata: hi\n\n"),
    (Event("a\nb"), b"data: a\ndata: b\n\n"),
    (Event("a\r\nb\rc"), b"data: a\ndata: b\ndata: c\n\n"),
    (Event("x\n"), b"data: x\ndata: \n\n"),
    (Event(""), b"data: \n\n"),
    (Event(" lead"), b"data:  lead\n\n"),
    (Event({"n": 1, "s": "é"}), 'data: {"n":1,"s":"é"}\n\n'.encode()),
    (Event([1, 2]), b"data: [1,2]\n\n"),
    (Event(b"bytes"), b"data: bytes\n\n"),
    (Event("\u2603", id="9-9", name="snow"), "id: 9-9\nevent: snow\ndata: \u2603\n\n".encode()),
    # a binary part (published to a hub) on a text transport: base64 in JSON
    (Event(Part(b"\x00\xff\r\n", "image/png"), id="1-1"), b'id: 1-1\ndata: {"content_type":"image/png","base64":"AP8NCg=="}\n\n'),
]


@pytest.mark.parametrize("event,wire", SSE_TABLE)
def test_sse_bytes(event, wire):
    assert event.encode("sse") == wire
    # and a spec-following parser reads back exactly the data
    [parsed] = SSEParser().feed(wire)
    assert parsed.data == event.text().replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.parametrize("field", ["id", "name", "channel"])
@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b", "x\r\nevent: forged"])
def test_crlf_cannot_be_smuggled(field, bad):
    with pytest.raises(InvalidEvent, match="CR, LF or NUL"):
        Event("data", **{field: bad})


def test_event_errors():
    with pytest.raises(UnserializableData, match="not JSON-serialisable"):
        Event(object()).encode("sse")
    with pytest.raises(TypeError):  # UnserializableData is a TypeError
        Event({1, 2}).text()
    with pytest.raises(InvalidEvent, match="UTF-8"):
        Event(b"\xff\xfe")
    with pytest.raises(InvalidEvent, match="retry"):
        Event("x", retry=-1)
    with pytest.raises(InvalidEvent, match="limit"):
        encode_item("x" * 11, "chunked", max_bytes=10)
    with pytest.raises(UnserializableData):
        Event(float("nan")).text()


def test_event_value_semantics():
    a, b = Event("x", id="1-1"), Event("x", id="1-1")
    assert a == b and a != Event("y", id="1-1")
    a.encode("sse")  # the cache does not take part in equality
    assert a == b
    assert "data='x'" in repr(a)
    assert a.replace(name="n").name == "n" and a.name is None


CHUNKED_TABLE = [
    ("text", b"text"),
    (b"\x00raw", b"\x00raw"),
    ({"a": [1, None]}, b'{"a":[1,null]}\n'),
    (Event("hi", id="1-2", name="n"), b'{"id":"1-2","event":"n","data":"hi"}\n'),
    (Event({"k": "v"}, id="1-3"), b'{"id":"1-3","event":null,"data":{"k":"v"}}\n'),
    (Part(b"bin", "image/png"), b"bin"),
    (Event(Part(b"\x00", "a/b"), id="1-4"), b'{"id":"1-4","event":null,"data":{"content_type":"a/b","base64":"AA=="}}\n'),
]


@pytest.mark.parametrize("item,wire", CHUNKED_TABLE)
def test_chunked_bytes(item, wire):
    assert encode_item(item, "chunked") == wire


BEAT = object()  # a heartbeat, in the multipart tables
JPEG = ("Content-Type: image/jpeg\r\n\r\n").encode()
TEXT = ("Content-Type: text/plain; charset=utf-8\r\n\r\n").encode()
JSON = ("Content-Type: application/json\r\n\r\n").encode()
D = b"\r\n--B\r\n"

# One stream each: items (or BEAT) in order -> the exact bytes after the
# preamble b"--B\r\n", then what MultipartParser reads back: part bodies, and
# heartbeats in its padding. Each part is followed at once by the delimiter
# and the next part's headers (guessed: its own), so browsers show it at once.
MULTIPART_TABLE = [
    ([Part(b"\xff\xd8one", "image/jpeg")], JPEG + b"\xff\xd8one" + D + JPEG, [b"\xff\xd8one"], 0),
    ([Part(b"\xff\xd8one", "image/jpeg"), Part(b"\xff\xd8two", "image/jpeg")],
     JPEG + b"\xff\xd8one" + D + JPEG + b"\xff\xd8two" + D + JPEG, [b"\xff\xd8one", b"\xff\xd8two"], 0),
    (["hello"], TEXT + b"hello" + D + TEXT, [b"hello"], 0),
    ([{"a": 1}], JSON + b'{"a":1}' + D + JSON, [b'{"a":1}'], 0),
    ([b"\x01"], b"Content-Type: application/octet-stream\r\n\r\n\x01" + D
     + b"Content-Type: application/octet-stream\r\n\r\n", [b"\x01"], 0),
    ([Event("x", id="1-1"), Event("y", id="1-2")],
     JSON + b'{"id":"1-1","event":null,"data":"x"}' + D + JSON + b'{"id":"1-2","event":null,"data":"y"}' + D + JSON,
     [b'{"id":"1-1","event":null,"data":"x"}', b'{"id":"1-2","event":null,"data":"y"}'], 0),
    ([Part(b"p", "text/plain", (("X-Frame", "7"),))],
     b"Content-Type: text/plain\r\nX-Frame: 7\r\n\r\np" + D + b"Content-Type: text/plain\r\nX-Frame: 7\r\n\r\n", [b"p"], 0),
    # a hub event carrying a part: the part itself (its id is not on the wire)
    ([Event(Part(b"\xff\xd8hub", "image/jpeg"), id="1-3")], JPEG + b"\xff\xd8hub" + D + JPEG, [b"\xff\xd8hub"], 0),
    # different headers than those sent ahead: the pending part closes empty first
    (["hello", Part(b"\xff\xd8one", "image/jpeg")],
     TEXT + b"hello" + D + TEXT + D + JPEG + b"\xff\xd8one" + D + JPEG, [b"hello", b"\xff\xd8one"], 1),
    # heartbeats: before the first part, a header line of its still open header block
    ([BEAT, BEAT, "hi"], b"Comet-Heartbeat: 1\r\n" * 2 + TEXT + b"hi" + D + TEXT, [b"hi"], 2),
    # after an image, the same image again: any other byte would be image data
    ([Part(b"\xff\xd8one", "image/jpeg"), BEAT, BEAT],
     JPEG + b"\xff\xd8one" + D + JPEG + (b"\xff\xd8one" + D + JPEG) * 2, [b"\xff\xd8one"] * 3, 0),
    # an image stream that fell behind the hub's buffer: its gap is the last frame again
    ([Part(b"\xff\xd8one", "image/jpeg"), Event({"last_id": "1-1"}, id="1-9", name="comet.gap"),
      Part(b"\xff\xd8two", "image/jpeg")],
     JPEG + b"\xff\xd8one" + D + JPEG + b"\xff\xd8one" + D + JPEG + b"\xff\xd8two" + D + JPEG,
     [b"\xff\xd8one", b"\xff\xd8one", b"\xff\xd8two"], 0),
    # after anything else, an empty part
    (["hi", BEAT, "ho"], TEXT + b"hi" + D + TEXT + D + TEXT + b"ho" + D + TEXT, [b"hi", b"ho"], 1),
]


def _stream(items):
    framing = FRAMINGS["multipart"]
    boundary = framing.boundary("B")
    out = [framing.preamble(boundary=boundary)]
    for item in items:
        out.append(framing.beat(boundary) if item is BEAT else framing.encode(item, boundary))
    return out


@pytest.mark.parametrize("items,wire,bodies,padding", MULTIPART_TABLE)
def test_multipart_bytes(items, wire, bodies, padding):
    chunks = _stream(items)
    assert chunks[0] == b"--B\r\n"
    assert b"".join(chunks[1:]) == wire
    whole = b"".join(chunks)
    for cut in range(len(whole) + 1):  # any split across reads
        p = MultipartParser("B")
        assert [x.body for x in p.feed(whole[:cut]) + p.feed(whole[cut:])] == bodies, cut
        assert p.padding == padding
    # each part is complete on the wire the moment it is written: feeding the
    # chunks one by one, every part comes out with the chunk that wrote it
    p = MultipartParser("B")
    assert [x.body for chunk in chunks for x in p.feed(chunk)] == bodies
    p = MultipartParser("B")
    p.feed(chunks[0])
    for item, chunk in zip(items, chunks[1:]):
        if item is not BEAT:
            assert len(p.feed(chunk)) == 1, item
        else:
            p.feed(chunk)


def test_multipart_parts_keep_their_headers():
    [part] = MultipartParser("B").feed(b"--B\r\n" + MULTIPART_TABLE[6][1])
    assert part == Part(b"p", "text/plain", (("X-Frame", "7"),))


def test_multipart_refuses_empty_parts():
    with pytest.raises(InvalidEvent, match="empty"):
        encode_item(b"", "multipart", "B")


def test_multipart_refuses_boundary_inside_part():
    with pytest.raises(InvalidEvent, match="boundary"):
        Part(b"abc--Bdef", "text/plain").encode("B")


def test_boundaries_are_random_and_valid():
    seen = {new_boundary() for _ in range(100)}
    assert len(seen) == 100
    from comet.framing import check_boundary
    for b in seen:
        check_boundary(b)
    with pytest.raises(ValueError, match="RFC 2046"):
        check_boundary("bad boundary\r\n")


def test_longpoll_bytes():
    entries = [longpoll_item(Event("a", id="1-1", name="n")), longpoll_item({"k": 1}), longpoll_item("s")]
    assert encode_longpoll(entries, "1-1") == (
        b'{"events":[{"id":"1-1","event":"n","data":"a"},'
        b'{"id":null,"event":null,"data":{"k":1}},{"id":null,"event":null,"data":"s"}],"cursor":"1-1"}')
    assert encode_longpoll([], None) == b'{"events":[],"cursor":null}'
    with pytest.raises(TypeError):
        longpoll_item(Part(b"x"))


def test_heartbeats_and_preambles():
    assert heartbeat("sse") == b"event: comet.heartbeat\ndata: 15\n\n"
    assert heartbeat("multipart") == b"Comet-Heartbeat: 1\r\n"
    assert heartbeat("chunked") == b"\n"
    assert preamble("sse") == b":ok\n\n"
    assert preamble("sse", retry=2500) == b":ok\nretry: 2500\n\n"
    assert preamble("multipart", boundary="B") == b"--B\r\n" and preamble("chunked") == b"\n"
    # heartbeats are invisible to each transport's reader
    sse = SSEParser()
    assert sse.feed(preamble("sse", heartbeat=0.5) + heartbeat("sse", 0.5) * 3) == []
    assert (sse.beats, sse.heartbeat) == (4, 0.5)
    assert NDJSONParser().feed(heartbeat("chunked") * 3) == []
    p = MultipartParser("B")
    assert [x.body for x in p.feed(b"".join(_stream([BEAT, "a", BEAT, BEAT, "b"])))] == [b"a", b"b"]
    assert p.padding == 3


def test_parsers_handle_any_split():
    """Items split across reads at every byte boundary parse the same."""
    wire = b"id: 1\r\ndata: a\r\n\r\n:c\n\nevent: e\rdata: \xe2\x98\x83\r\r"
    whole = SSEParser().feed(wire)
    assert [(e.id, e.name, e.data) for e in whole] == [("1", None, "a"), ("1", "e", "\u2603")]
    for cut in range(1, len(wire)):
        p = SSEParser()
        assert p.feed(wire[:cut]) + p.feed(wire[cut:]) == whole, cut
    mp = b"".join(_stream(["one", BEAT, Part(b"\r\n--x\r\n-", "a/b")]))
    for cut in range(1, len(mp)):
        p = MultipartParser("B")
        assert [x.body for x in p.feed(mp[:cut]) + p.feed(mp[cut:])] == [b"one", b"\r\n--x\r\n-"], cut


@pytest.mark.parametrize("content_type", ["image/jpeg\r\nX-Forged: 1", "image/jpeg\nX-Forged: 1", "a\x00b"])
def test_a_part_content_type_cannot_smuggle_headers(content_type):
    with pytest.raises(InvalidEvent):
        Part(b"\xff\xd8", content_type=content_type)


@pytest.mark.parametrize("transport", ["sse", "chunked", "multipart"])
def test_an_event_of_exactly_max_bytes_is_written_and_one_more_is_refused(transport):
    framing = FRAMINGS[transport]
    assert framing.encode(Event("x" * 10, id="1-1"), "B", max_bytes=10)
    with pytest.raises(InvalidEvent):
        framing.encode(Event("x" * 11, id="1-2"), "B", max_bytes=10)


def test_a_raw_part_on_a_long_poll_is_refused_saying_why():
    with pytest.raises(TypeError, match="cannot be sent on the longpoll transport"):
        longpoll_item(Part(b"\xff\xd8", content_type="image/jpeg"))


@pytest.mark.parametrize("interval, text", [
    (15, "15"), (15.0, "15"), (1, "1"), (0.5, "0.5"), (2.25, "2.25"), (0.1, "0.1"), (3600, "3600"), (1e-05, "0.00001"),
])
def test_the_heartbeat_says_its_interval_in_its_shortest_decimal_form(interval, text):
    assert heartbeat_seconds(interval) == text
    assert heartbeat("sse", interval) == b"event: comet.heartbeat\ndata: %s\n\n" % text.encode()
    assert preamble("sse", heartbeat=interval) == b":ok\n\nevent: comet.heartbeat\ndata: %s\n\n" % text.encode()
    assert preamble("sse", retry=100, heartbeat=interval) == b":ok\nretry: 100\n\nevent: comet.heartbeat\ndata: %s\n\n" % text.encode()
    assert encode_longpoll([], "1-1", interval) == b'{"events":[],"cursor":"1-1","heartbeat":%s}' % text.encode()
    assert json.loads(encode_longpoll([], "1-1", interval))["heartbeat"] == float(text)


def test_sse_heartbeat_bytes_are_cached_per_interval_and_need_one():
    framing = FRAMINGS["sse"]
    assert framing.beat(interval=0.75) is framing.beat(interval=0.75)
    assert framing.beat(interval=2) != framing.beat(interval=3)
    with pytest.raises(ValueError, match="interval"):
        framing.beat()
    # the other transports' heartbeats do not depend on it
    assert FRAMINGS["chunked"].beat(interval=2) == FRAMINGS["chunked"].beat(interval=3) == b"\n"
    assert preamble("chunked", heartbeat=2) == b"\n" and preamble("multipart", boundary="B", heartbeat=2) == b"--B\r\n"


def test_an_sse_heartbeat_is_a_named_event_a_plain_reader_can_tell_apart():
    """What EventSource does with it: a named event (``onmessage`` never
    sees one); a reader that knows nothing of comet gets it as an event
    called comet.heartbeat, never as data of the next event."""
    p = SSEParser()
    wire = preamble("sse", heartbeat=1) + heartbeat("sse", 1) + Event("x", id="1-1").encode("sse") + heartbeat("sse", 1)
    assert p.feed(wire) == [Event("x", id="1-1")] and p.beats == 3 and p.last_event_id == "1-1"
