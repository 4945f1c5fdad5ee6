"""Wire formats: input -> exact bytes, per transport (no I/O)."""
import pytest

from comet import Event, InvalidEvent, Part, UnserializableData
from comet.framing import encode_item, encode_longpoll, heartbeat, longpoll_item, new_boundary, preamble
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
]


@pytest.mark.parametrize("item,wire", CHUNKED_TABLE)
def test_chunked_bytes(item, wire):
    assert encode_item(item, "chunked") == wire


MULTIPART_TABLE = [
    (Part(b"\xff\xd8jpeg", "image/jpeg"),
     b"--B\r\nContent-Type: image/jpeg\r\nContent-Length: 6\r\n\r\n\xff\xd8jpeg\r\n"),
    ("hello", b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello\r\n"),
    ({"a": 1}, b'--B\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}\r\n'),
    (b"\x01", b"--B\r\nContent-Type: application/octet-stream\r\nContent-Length: 1\r\n\r\n\x01\r\n"),
    (Event("x", id="1-1"),
     b'--B\r\nContent-Type: application/json\r\nContent-Length: 36\r\n\r\n{"id":"1-1","event":null,"data":"x"}\r\n'),
    (Part(b"p", "text/plain", (("X-Frame", "7"),)),
     b"--B\r\nContent-Type: text/plain\r\nContent-Length: 1\r\nX-Frame: 7\r\n\r\np\r\n"),
]


@pytest.mark.parametrize("item,wire", MULTIPART_TABLE)
def test_multipart_bytes(item, wire):
    assert encode_item(item, "multipart", "B") == wire
    [part] = MultipartParser("B").feed(wire)
    assert part.body == wire.split(b"\r\n\r\n", 1)[1][:-2]


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
    assert heartbeat("sse") == b":\n\n"
    assert heartbeat("multipart") == b"\r\n"
    assert heartbeat("chunked") == b"\n"
    assert preamble("sse") == b":ok\n\n"
    assert preamble("sse", retry=2500) == b":ok\nretry: 2500\n\n"
    assert preamble("multipart") == b"\r\n" and preamble("chunked") == b"\n"
    # heartbeats are invisible to each transport's reader
    assert SSEParser().feed(b":ok\n\n" + heartbeat("sse") * 3) == []
    assert NDJSONParser().feed(heartbeat("chunked") * 3) == []
    p = MultipartParser("B")
    wire = encode_item("a", "multipart", "B") + heartbeat("multipart") * 2 + encode_item("b", "multipart", "B")
    assert [x.body for x in p.feed(wire)] == [b"a", b"b"]


def test_parsers_handle_any_split():
    """Items split across reads at every byte boundary parse the same."""
    wire = b"id: 1\r\ndata: a\r\n\r\n:c\n\nevent: e\rdata: \xe2\x98\x83\r\r"
    whole = SSEParser().feed(wire)
    assert [(e.id, e.name, e.data) for e in whole] == [("1", None, "a"), ("1", "e", "\u2603")]
    for cut in range(1, len(wire)):
        p = SSEParser()
        assert p.feed(wire[:cut]) + p.feed(wire[cut:]) == whole, cut
    mp = encode_item("one", "multipart", "B") + b"\r\n" + encode_item(Part(b"\r\n--x", "a/b"), "multipart", "B")
    for cut in range(1, len(mp)):
        p = MultipartParser("B")
        assert [x.body for x in p.feed(mp[:cut]) + p.feed(mp[cut:])] == [b"one", b"\r\n--x"], cut
