"""The CherryPy adapter against a live cheroot server on 127.0.0.1."""
import json
import re
import threading
import time

import cherrypy
import pytest

from comet import Hub, InvalidEventId, Part, comet
from comet.cherrypy_tool import engine_plugin
from comet.hub import MAX_CURSOR
from comet.testing import CherryPyServer, HTTPStatusError, StreamClient, http_get

from conftest import RawStream, Tracker, make_root, open_fds, settle, no_cursor

TRANSPORTS = ["sse", "multipart", "chunked", "longpoll"]


def data_of(item):
    """The published text of an item, whatever transport parsed it."""
    if isinstance(item, Part):
        return json.loads(item.body)["data"]
    if isinstance(item, dict):
        return item["data"]
    return item.data


# -- wire bytes, read from a raw socket ---------------------------------------


def test_sse_bytes_on_the_wire(app, hub):
    with RawStream(app.url + "/sse") as raw:
        assert raw.status == 200
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["cache-control"] == "no-cache"
        assert raw.headers["x-accel-buffering"] == "no"
        assert raw.headers["transfer-encoding"] == "chunked"
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
        event_id = hub.publish("lobby", "two\nlines", event="join")
        assert raw.chunk() == f"id: {event_id}\nevent: join\ndata: two\ndata: lines\n\n".encode()
        event_id = hub.publish("lobby", {"score": 3, "who": "\u00e9ve"})
        assert raw.chunk() == f'id: {event_id}\ndata: {{"score":3,"who":"\u00e9ve"}}\n\n'.encode()


def test_multipart_bytes_on_the_wire(app, hub):
    with RawStream(app.url + "/multipart") as raw, RawStream(app.url + "/multipart") as other:
        boundary = re.fullmatch(r"multipart/x-mixed-replace; boundary=(\S+)", raw.headers["content-type"])[1]
        assert boundary != other.headers["content-type"].split("boundary=")[1], "boundary must be random per response"
        assert raw.chunk() == f"--{boundary}\r\n".encode()  # preamble: headers go out at once
        event_id = hub.publish("lobby", "hi")
        body = f'{{"id":"{event_id}","event":null,"data":"hi"}}'.encode()
        # each part comes with the delimiter and the next part's headers
        head = b"Content-Type: application/json\r\n\r\n"
        delimiter = f"\r\n--{boundary}\r\n".encode()
        assert raw.chunk() == head + body + delimiter + head
        event_id = hub.publish("lobby", "ho")
        body = f'{{"id":"{event_id}","event":null,"data":"ho"}}'.encode()
        assert raw.chunk() == body + delimiter + head


def test_chunked_one_chunk_per_item(app, hub):
    with RawStream(app.url + "/chunked") as raw:
        assert raw.headers["content-type"].startswith("application/x-ndjson")
        assert raw.chunk() == b"\n"
        ids = [hub.publish("lobby", n) for n in range(3)]
        for n, event_id in enumerate(ids):
            assert raw.chunk() == f'{{"id":"{event_id}","event":null,"data":{n}}}\n'.encode()


def test_longpoll_bytes_on_the_wire(app, hub):
    first = hub.publish("lobby", "a")
    second = hub.publish("lobby", "b", event="e")
    with RawStream(app.url + "/longpoll?last_event_id=" + hub.before(first)) as raw:
        assert raw.status == 200 and raw.headers["content-type"].startswith("application/json")
        assert raw.body() == (f'{{"events":[{{"id":"{first}","event":null,"data":"a"}},'
                              f'{{"id":"{second}","event":"e","data":"b"}}],"cursor":"{second}","heartbeat":2}}').encode()


def test_longpoll_waits_for_an_event_then_times_out_empty(app, hub):
    cursor = hub.last_id("lobby")
    threading.Timer(0.3, hub.publish, ("lobby", "later")).start()
    status, _, body = http_get(app.url + "/longpoll?last_event_id=" + cursor)
    doc = json.loads(body)
    assert status == 200 and [e["data"] for e in doc["events"]] == ["later"]
    started = time.monotonic()
    status, _, body = http_get(app.url + "/longpoll?last_event_id=" + doc["cursor"])
    assert status == 200 and json.loads(body) == {"events": [], "cursor": doc["cursor"], "heartbeat": 2}
    assert 1.5 < time.monotonic() - started < 10  # poll_timeout=2


# -- delivery ----------------------------------------------------------------


def test_each_item_is_flushed_while_the_handler_still_runs(comet_cherrypy):
    gate, handler_done = threading.Event(), threading.Event()

    class Root:
        @cherrypy.expose
        @comet(transport="chunked")
        def slow(self):
            yield "first\n"
            while not gate.is_set():  # still running, not yet returned
                gate.wait(0.05)
                yield None
            yield "second\n"
            handler_done.set()

    server = comet_cherrypy(Root())
    with RawStream(server.url + "/slow") as raw:
        assert raw.chunk() == b"\n"
        assert raw.chunk() == b"first\n"
        assert not handler_done.is_set() and not gate.is_set()
        gate.set()
        assert raw.chunk() == b"second\n"
        assert raw.chunk() == b""  # the terminating chunk: the stream ended


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_publish_reaches_every_client(app, hub, transport):
    clients = [StreamClient(app.url + "/" + transport, transport=transport).open() for _ in range(3)]
    try:
        if transport == "longpoll":
            settle(lambda: hub.subscriptions >= 3, what="3 long-polls waiting")
        hub.publish("lobby", "one")
        hub.publish("lobby", "two")
        for client in clients:
            assert [data_of(i) for i in client.wait_for(2)] == ["one", "two"]
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("transport", ["sse", "multipart", "chunked"])
def test_heartbeats_on_idle_streams(app, transport):
    """The bytes of a heartbeat on each transport (their interval, against
    the setting, is tests/test_user_behaviour.py's)."""
    with RawStream(app.url + "/" + transport) as raw:
        boundary = raw.headers["content-type"].partition("boundary=")[2]
        assert no_cursor(raw.chunk()) == {"sse": b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n", "multipart": f"--{boundary}\r\n".encode(), "chunked": b"\n"}[transport]
        # multipart, before its first part: header lines of that part (tests/test_framing.py)
        beat = {"sse": b"event: comet.heartbeat\ndata: 0.5\n\n", "multipart": b"Comet-Heartbeat: 1\r\n", "chunked": b"\n"}[transport]
        started = time.monotonic()
        assert raw.chunk() == beat and raw.chunk() == beat
        assert 0.7 < time.monotonic() - started < 2.5  # heartbeat=0.5: two beats, neither early nor 2x late


def test_sse_retry_field(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", retry=1500)
        def events(self):
            yield from hub.subscribe("c")

    with RawStream(comet_cherrypy(Root()).url + "/events") as raw:
        assert no_cursor(raw.chunk()) == b":ok\nretry: 1500\n\nevent: comet.heartbeat\ndata: 15\n\n"


def test_mjpeg_style_image_parts(comet_cherrypy):
    frames = [b"\xff\xd8frame%d\xff\xd9" % i for i in range(3)]

    class Root:
        @cherrypy.expose
        @comet(transport="multipart")
        def camera(self):
            for frame in frames:
                yield Part(frame, "image/jpeg")

    with StreamClient(comet_cherrypy(Root()).url + "/camera", transport="multipart") as client:
        parts = client.wait_for(3)
        client.wait_closed()
    assert [(p.content_type, p.body) for p in parts] == [("image/jpeg", f) for f in frames]


# -- resume, gaps -------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_resume_after_reconnect_loses_and_repeats_nothing(app, hub, tracker, transport):
    url = app.url + "/" + transport
    with StreamClient(url, transport=transport) as client:
        if transport == "longpoll":
            settle(lambda: hub.subscriptions == 1, what="long-poll waiting")
        for n in range(5):
            hub.publish("lobby", f"m{n}")
        seen = client.wait_for(5)
    last = seen[-1]
    last_id = json.loads(last.body)["id"] if isinstance(last, Part) else last["id"] if isinstance(last, dict) else last.id
    for n in range(5, 8):  # published while nobody is connected
        hub.publish("lobby", f"m{n}")
    with StreamClient(url, transport=transport, last_event_id=last_id) as again:
        hub.publish("lobby", "m8")
        rest = again.wait_for(4)
    assert [data_of(i) for i in seen + rest] == [f"m{n}" for n in range(9)]


def test_last_event_id_header_wins_over_query(app, hub):
    ids = [hub.publish("lobby", n) for n in range(4)]
    with StreamClient(app.url + "/sse?last_event_id=" + ids[0], last_event_id=ids[2]) as client:
        assert [e.data for e in client.wait_for(1)] == ["3"]


def test_gap_event_over_http(comet_cherrypy):
    hub, tracker = Hub(buffer_size=3, idle=0.2), Tracker()
    server = comet_cherrypy(make_root(hub, tracker))
    ids = [hub.publish("lobby", n) for n in range(6)]
    with StreamClient(server.url + "/sse", last_event_id=ids[0]) as client:
        gap, *rest = client.wait_for(4)
    assert gap.name == "comet.gap" and gap.id == ids[2]
    assert json.loads(gap.data) == {"last_id": ids[0], "resume_id": ids[2]}
    assert [e.data for e in rest] == ["3", "4", "5"]


# -- lifecycle -----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "multipart", "chunked"])
def test_disconnect_closes_handler_within_a_heartbeat(comet_cherrypy, transport):
    heartbeat = 3.0
    hub, tracker = Hub(idle=0.2), Tracker()
    server = comet_cherrypy(make_root(hub, tracker, heartbeat=heartbeat))
    client = StreamClient(server.url + "/" + transport, transport=transport).open()
    settle(lambda: hub.subscriptions == 1, what="subscription open")
    client.close()
    gone = time.monotonic()
    settle(lambda: tracker.finished == 1 and hub.subscriptions == 0, timeout=heartbeat * 3, what="handler finally")
    assert time.monotonic() - gone < heartbeat, "an idle stream must be released within one heartbeat interval"
    assert engine_plugin().pool.counters["disconnects"] >= 1


def test_disconnect_of_a_busy_stream(app, hub, tracker):
    stop = threading.Event()

    def publisher():
        while not stop.is_set():
            hub.publish("lobby", "x" * 200)
            time.sleep(0.001)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        client = StreamClient(app.url + "/sse").open()
        client.wait_for(20)
        client.close()
        settle(lambda: tracker.open == 0 and hub.subscriptions == 0, what="busy stream released")
    finally:
        stop.set()
        thread.join(5)


def test_nothing_leaks_after_many_cycles(app, hub, tracker):
    pool = engine_plugin().pool
    # one warm-up cycle per transport so lazily created state exists before counting
    for transport in TRANSPORTS:
        StreamClient(app.url + "/" + transport, transport=transport).open().close()
    settle(lambda: hub.subscriptions == 0 and pool.open_streams == 0, what="warm-up released")
    threads, fds = threading.active_count(), open_fds()
    before = set(threading.enumerate())
    for cycle in range(60):
        transport = TRANSPORTS[cycle % 4]
        client = StreamClient(app.url + "/" + transport, transport=transport, last_event_id=hub.last_id("lobby")).open()
        if cycle % 2:
            hub.publish("lobby", cycle)
            client.wait_for(1)
        client.close()
    settle(lambda: hub.subscriptions == 0 and pool.open_streams == 0 and tracker.open == 0, what="all released")
    settle(lambda: threading.active_count() <= threads, timeout=10,  # step threads linger 1 s
           what=f"threads back to {threads}; new: {[t.name for t in set(threading.enumerate()) - before]}")
    settle(lambda: open_fds() <= fds + 2, what=f"fds back to {fds}")  # +2: cheroot keep-alive slack
    assert tracker.started == tracker.finished >= 60


def test_engine_stop_with_100_idle_streams_is_fast():
    hub, tracker = Hub(idle=30), Tracker()  # only the engine plugin can end these waits quickly
    engine_plugin().add_hub(hub)
    server = CherryPyServer(make_root(hub, tracker), thread_pool=120).start()
    clients = []
    try:
        for _ in range(100):
            clients.append(StreamClient(server.url + "/sse").open())
        settle(lambda: hub.subscriptions == 100, what="100 streams open")
    finally:
        elapsed = server.stop()
    assert elapsed < 2.0, f"engine.stop() took {elapsed:.2f}s with 100 open streams"
    for client in clients:
        client.wait_closed(5)
        client.close()
    assert tracker.open == 0 and hub.subscriptions == 0


def test_admission_cap_answers_503_and_pages_still_load(comet_cherrypy, hub, tracker):
    # Generator handlers are parked: max_parked is the cap that holds them.
    server = comet_cherrypy(make_root(hub, tracker), thread_pool=10, global_config={"comet.max_parked": 2, "comet.retry_after": 7})
    a = StreamClient(server.url + "/sse").open()
    b = StreamClient(server.url + "/chunked", transport="chunked").open()
    try:
        status, headers, body = http_get(server.url + "/sse")
        assert status == 503 and headers["retry-after"] == "7"
        assert b"too many open streams (2 parked of 2)" in body
        started = time.monotonic()
        assert http_get(server.url + "/")[0] == 200
        assert time.monotonic() - started < 2
        with pytest.raises(HTTPStatusError) as refused:
            StreamClient(server.url + "/multipart", transport="multipart").open()
        assert refused.value.status == 503
    finally:
        a.close()
    settle(lambda: engine_plugin().pool.open_streams == 1, what="a released")
    with StreamClient(server.url + "/sse") as c:
        hub.publish("lobby", "admitted again")
        assert c.wait_for(1)[0].data == "admitted again"
    b.close()


def test_default_cap_leaves_threads_for_pages(comet_cherrypy, hub, tracker):
    comet_cherrypy(make_root(hub, tracker), thread_pool=10)
    plugin = engine_plugin()
    plugin.ensure_cap()
    assert plugin.pool.max_streams == 8


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize("path,headers,reason", [
    ("/sse", {"Last-Event-ID": "garbage"}, "malformed event id"),
    ("/sse?last_event_id=1-x", {}, "malformed event id"),
    ("/chunked?last_event_id=%0A1-1", {}, "CR, LF or NUL"),
    ("/longpoll", {"Last-Event-ID": "9" * (MAX_CURSOR + 1)}, f"at most {MAX_CURSOR}"),
    ("/multipart?last_event_id=99999999999999-1", {}, "from the future"),
    ("/sse?self=1", {}, "missing or malformed parameters"),
    ("/sse?channel=bad%0Achannel", {}, "channel"),
])
def test_bad_input_gets_400_with_reason(app, hub, tracker, path, headers, reason):
    status, got_headers, body = http_get(app.url + path, headers=headers)
    assert status == 400, body
    assert got_headers["content-type"].startswith("text/plain")
    assert reason.encode() in body
    settle(lambda: tracker.open == 0 and engine_plugin().pool.open_streams == 0, what="nothing held")


def test_future_id_of_current_epoch_is_400(app, hub):
    hub.publish("lobby", "x")
    status, _, body = http_get(app.url + f"/sse?last_event_id={hub.epoch}-5")
    assert status == 400 and b"from the future" in body


def test_api_misuse_fails_at_definition():
    with pytest.raises(ValueError, match=r"transport must be one of \('sse', 'multipart', 'chunked', 'longpoll'\), got 'ws'"):
        comet(transport="ws")
    with pytest.raises(ValueError, match="heartbeat"):
        comet(heartbeat=0)
    with pytest.raises(TypeError, match="unknown comet option"):
        comet(hearbeat=5)


def test_oversize_item_ends_the_stream_cleanly(comet_cherrypy):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", max_event_bytes=100)
        def events(self):
            yield "small"
            yield "x" * 1000
            yield "never sent"

    with RawStream(comet_cherrypy(Root()).url + "/events") as raw:
        assert raw.chunk() == b":ok\n\nevent: comet.heartbeat\ndata: 15\n\n"
        assert raw.chunk() == b"data: small\n\n"
        assert raw.chunk() == b""  # ended with a proper terminating chunk, nothing malformed


def test_handler_raising_input_error_before_first_item_is_400(comet_cherrypy):
    class Root:
        @cherrypy.expose
        @comet(transport="chunked")
        def events(self, room=""):
            if not room.isalnum():
                raise InvalidEventId("room must be alphanumeric")
            yield room

    server = comet_cherrypy(Root())
    assert http_get(server.url + "/events?room=a%20b")[:1] == (400,)
    assert http_get(server.url + "/events?room=ab")[2] == b"\nab"  # preamble, then the item


@pytest.mark.parametrize("mode", ["parked", "thread"])
def test_a_handlers_own_http_error_is_a_plain_text_refusal(comet_cherrypy, hub, mode):
    """cherrypy.HTTPError(403, "...") from a stream handler reaches the client
    as the same plain text as comet's own refusals (comet.js hands it to
    onDenied); a 5xx stays CherryPy's error page."""
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def events(self, seat=""):
            if mode == "thread":
                return self._stream(seat)
            if seat != "ok":
                raise cherrypy.HTTPError(403, "you are not in this lobby")
            return hub.subscribe("lobby")

        def _stream(self, seat):
            if seat == "boom":
                raise cherrypy.HTTPError(502, "upstream gone")
            if seat != "ok":
                raise cherrypy.HTTPError(403, "you are not in this lobby")
            yield from hub.subscribe("lobby")

    server = comet_cherrypy(Root())
    status, headers, body = http_get(server.url + "/events?seat=stolen")
    assert (status, headers["content-type"], body) == (403, "text/plain; charset=utf-8", b"you are not in this lobby\n")
    assert hub.subscriptions == 0 and engine_plugin().pool.open_streams == 0
    if mode == "thread":
        status, headers, _ = http_get(server.url + "/events?seat=boom")
        assert status == 502 and headers["content-type"].startswith("text/html")
    with StreamClient(server.url + "/events?seat=ok") as client:
        settle(lambda: hub.subscriptions == 1, what="subscribed")
        hub.publish("lobby", "in")
        assert client.wait_for(1)[0].data == "in"


# -- the Tool ----------------------------------------------------------------------


def test_tool_in_config_and_as_decorator(comet_cherrypy, hub):
    class Root:
        @cherrypy.expose
        def feed(self, last_event_id=None):
            yield from hub.subscribe("lobby", last_id=last_event_id)

        @cherrypy.expose
        @cherrypy.tools.comet(transport="sse", heartbeat=0.5)
        def decorated(self, last_event_id=None):
            yield from hub.subscribe("lobby", last_id=last_event_id)

    config = {"/feed": {"tools.comet.on": True, "tools.comet.transport": "chunked", "tools.comet.heartbeat": 0.5}}
    server = comet_cherrypy(Root(), config)
    first = hub.publish("lobby", "before")
    with StreamClient(server.url + "/feed", transport="chunked", last_event_id=hub.before(first)) as feed, \
            StreamClient(server.url + "/decorated", last_event_id=hub.before(first)) as deco:
        hub.publish("lobby", "after")
        assert [i["data"] for i in feed.wait_for(2)] == ["before", "after"]
        assert [e.data for e in deco.wait_for(2)] == ["before", "after"]
        assert feed.headers["content-type"].startswith("application/x-ndjson")
        feed.wait_for(lambda _: feed.heartbeats >= 1, timeout=10)


BAD_CONFIG_APP = """
import cherrypy, comet.cherrypy_tool
class Root:
    @cherrypy.expose
    def feed(self):
        yield "x"
cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": 0, "log.screen": True})
cherrypy.tree.mount(Root(), "", {"/feed": {"tools.comet.on": True, "tools.comet.transport": "ws"}})
cherrypy.engine.start()
print("STARTED")
cherrypy.engine.exit()
"""


def test_bad_tool_config_fails_engine_start_naming_the_key():
    # CherryPy ends the process (exit code 70) when a start listener fails,
    # so this runs in its own interpreter.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BAD_CONFIG_APP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 70, done.stdout + done.stderr
    assert "STARTED" not in done.stdout
    assert "config / [/feed]: tools.comet: transport must be one of" in done.stderr + done.stdout


@pytest.mark.parametrize("accept_charset", ["iso-8859-1", "utf-16", "utf-8;q=0, iso-8859-1;q=0"])
def test_the_encode_tool_neither_relabels_nor_refuses_streams(comet_cherrypy, hub, tracker, accept_charset):
    """With ``tools.encode.on`` (common in CherryPy apps) the encoder used to
    label UTF-8 stream bytes with the charset the client preferred
    (``text/event-stream;charset=utf-16``), or answer 406 when UTF-8 was
    refused. Pages keep the encoder; streams and their errors keep UTF-8."""
    root = make_root(hub, tracker, heartbeat=0.5)

    class Parked:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def index(self, last_event_id=None):
            return hub.subscribe("lobby", last_id=last_event_id)

    class ByTool:
        @cherrypy.expose
        def index(self, last_event_id=None):
            yield from hub.subscribe("lobby", last_id=last_event_id)

    root.parked, root.by_tool = Parked(), ByTool()
    server = comet_cherrypy(root, {"/by_tool": {"tools.comet.on": True, "tools.comet.heartbeat": 0.5}},
                            global_config={"tools.encode.on": True})
    headers = {"Accept-Charset": accept_charset}
    status, page_headers, _ = http_get(server.url + "/", headers=headers)
    if ";q=0" in accept_charset:
        assert status == 406  # the encoder is on, for pages
    else:
        assert status == 200 and page_headers["content-type"].endswith("charset=" + accept_charset)
    for path in ("/sse", "/parked/", "/by_tool/"):
        with RawStream(server.url + path, headers=headers) as raw:
            assert raw.status == 200, path
            assert raw.headers["content-type"] == "text/event-stream; charset=utf-8", path
            assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"
            settle(lambda: hub.subscriptions == 1, what="subscribed")
            event_id = hub.publish("lobby", "héllo")
            assert raw.chunk() == f"id: {event_id}\ndata: héllo\n\n".encode("utf-8")
        settle(lambda: hub.subscriptions == 0, what="released")
    status, error_headers, body = http_get(server.url + "/sse", headers={**headers, "Last-Event-ID": "nonsense"})
    assert (status, error_headers["content-type"]) == (400, "text/plain; charset=utf-8")
    assert b"malformed event id" in body


@pytest.mark.parametrize("transport", TRANSPORTS + ["parked"])
def test_a_stream_does_not_hold_its_users_session_lock(comet_cherrypy, hub, transport):
    """With tools.sessions, a stream handler that reads the session used to
    keep it locked until the stream ended: the same user's other requests
    hung. The session is saved and unlocked when the stream starts."""

    class Root:
        @cherrypy.expose
        def login(self, name):
            cherrypy.session["user"] = name
            return "ok"

        @cherrypy.expose
        def whoami(self):
            return f"{cherrypy.session.get('user')} opened {cherrypy.session.get('streams', 0)}"

        @cherrypy.expose
        @comet(transport="sse" if transport == "parked" else transport, heartbeat=0.5, poll_timeout=3)
        def events(self, last_event_id=None):
            cherrypy.session["streams"] = cherrypy.session.get("streams", 0) + 1  # saved: set before the stream
            channel = "user:" + cherrypy.session["user"]
            if transport == "parked":
                return hub.subscribe(channel, last_id=last_event_id)
            return self._stream(channel, last_event_id)

        def _stream(self, channel, last_event_id):
            yield from hub.subscribe(channel, last_id=last_event_id)

    server = comet_cherrypy(Root(), global_config={"tools.sessions.on": True, "tools.sessions.locking": "implicit"})
    status, headers, _ = http_get(server.url + "/login?name=ann")
    cookie = {"Cookie": headers["set-cookie"].split(";")[0]}
    # (a long-poll with a cursor, as a page renders it: one request, no handshake first)
    cursor = hub.last_id("user:ann") if transport == "longpoll" else None
    client = StreamClient(server.url + "/events", transport="sse" if transport == "parked" else transport, headers=cookie,
                          last_event_id=cursor)
    with client:
        settle(lambda: hub.subscriptions == 1, what="streaming")
        status, _, body = http_get(server.url + "/whoami", headers=cookie, timeout=5)  # hung until the stream ended
        assert (status, body) == (200, b"ann opened 1")
        assert http_get(server.url + "/login?name=bob", headers=cookie, timeout=5)[0] == 200
        hub.publish("user:ann", "for ann")
        assert [data_of(e) for e in client.wait_for(1)] == ["for ann"]
    settle(lambda: hub.subscriptions == 0, what="released")
    # the stream's end does not write its stale copy over what came later
    assert http_get(server.url + "/whoami", headers=cookie, timeout=5)[2].startswith(b"bob opened")


def test_under_cherrypy_comets_log_records_go_to_cherrypys_error_log(comet_cherrypy, hub, tracker):
    """Once the engine runs, a record of the ``comet`` logger is written by
    cherrypy.log (``[time] COMET message``), wherever the app sends CherryPy's
    error log, and reaches the root logger once."""
    import logging

    comet_cherrypy(make_root(hub, tracker), thread_pool=10)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    error_log = logging.getLogger("cherrypy.error")
    error_log.addHandler(keep)
    try:
        logging.getLogger("comet").warning("a record for the error log")
    finally:
        error_log.removeHandler(keep)
    assert [m for m in seen if m.endswith("COMET a record for the error log")], seen
    assert logging.getLogger("comet").propagate is False  # (cherrypy.error propagates it: once)


def test_a_comet_log_record_that_cannot_be_written_is_reported_like_any_other(comet_cherrypy, hub, tracker, capfd):
    """The bridge to cherrypy.log handles a failing record as logging does
    (``--- Logging error ---`` on stderr), never swallowing it silently."""
    import logging

    comet_cherrypy(make_root(hub, tracker), thread_pool=10)
    # Handed to the bridge itself: pytest's own capture handler on the root
    # logger raises on a bad record, which is not what is under test.
    bridge = next(h for h in logging.getLogger("comet").handlers if type(h).__name__ == "_ToCherryPyLog")
    bridge.handle(logging.LogRecord("comet", logging.WARNING, __file__, 1, "%d streams", ("not a number",), None))
    assert "--- Logging error ---" in capfd.readouterr().err
