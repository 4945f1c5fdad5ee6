"""@comet handlers served at accept time once the pipeline showed they may
be (comet.direct): the same bytes, the same request seen by the handler,
errors answered the same way, and nothing direct that CherryPy would have
done more for."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet import direct as direct_module
from comet.testing import wait_until

from conftest import read_until


def counters():
    return engine_plugin().pool.counters


class Raw:
    """A raw GET on its own socket; ``head`` is the response head as sent."""

    def __init__(self, url: str, path: str, headers: str = "", version: str = "HTTP/1.1") -> None:
        host, port = url.rsplit("/", 1)[-1].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(f"GET {path} {version}\r\nHost: {host}:{port}\r\n{headers}\r\n".encode("latin-1"))
        data = read_until(self.sock, b"\r\n\r\n")
        self.head, _, self.rest = data.partition(b"\r\n\r\n")
        self.status = int(self.head.split(b" ", 2)[1])

    def more(self, marker: bytes, timeout: float = 10.0) -> bytes:
        """Everything after the head, once *marker* is in it."""
        deadline = time.monotonic() + timeout
        while marker not in self.rest:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed before {marker!r}; got {self.rest[-300:]!r}")
            self.rest += data
        return self.rest

    def headers(self) -> list[bytes]:
        """Header lines, ``Date`` left out (it changes)."""
        return [line for line in self.head.split(b"\r\n")[1:] if not line.startswith(b"Date:")]

    def close(self) -> None:
        self.sock.close()


def direct_after(server, path: str, headers: str = "") -> tuple[Raw, Raw]:
    """The first GET of *path* (through the pipeline) and the second (direct)."""
    before = counters()["routed_direct"]
    first = Raw(server.url, path, headers)
    second = Raw(server.url, path, headers)
    assert counters()["routed_direct"] == before + 1, "the second request was not served at accept time"
    return first, second


class Seen:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.finished = threading.Semaphore(0)


def make_root(hub: Hub, seen: Seen):
    class Root:
        @cherrypy.expose
        def index(self):
            return "page"

        @cherrypy.expose
        @comet(transport="sse", heartbeat=5)
        def events(self, last_event_id=None, room="main", **rest):
            request = cherrypy.request
            seen.requests.append({
                "room": room, "rest": rest, "last_event_id": last_event_id,
                "agent": request.headers.get("User-Agent"), "accept": request.headers.get("Accept"),
                "cookie": request.cookie["sid"].value if "sid" in request.cookie else None,
                "remote": request.remote.ip, "remote_port": request.remote.port > 0, "remote_name": request.remote.name,
                "local": (request.local.ip, request.local.port, request.local.name),  # as CherryPy's gateway has them
                "base": request.base, "line": request.request_line,
                "thread": threading.current_thread().name,
            })
            try:
                yield {"hello": room}
                yield from hub.subscribe("room:" + room, last_id=last_event_id)
            finally:
                seen.finished.release()

        @cherrypy.expose
        @comet(transport="sse")
        def later(self, room="main"):
            yield "hi"
            for event in hub.subscribe("later:" + room):  # each on a step thread, the request long over
                if not event:
                    yield event  # an Idle tick, passed on: the stream waits parked
                    continue
                request = cherrypy.request
                yield {"event": event.data, "agent": request.headers.get("User-Agent"),
                       "cookie": request.cookie["sid"].value, "params": request.params, "ip": request.remote.ip,
                       "line": request.request_line, "config": request.config.get("comet.test_marker"),
                       "type": cherrypy.response.headers.get("Content-Type")}

        @cherrypy.expose
        @comet(transport="sse")
        def guarded(self, who=""):
            if who == "redirect":
                raise cherrypy.HTTPRedirect("/elsewhere", 303)
            if who != "ann":
                raise cherrypy.HTTPError(403, "not yours")
            yield "welcome"
            yield from hub.subscribe("guarded")

        @cherrypy.expose
        @comet(transport="sse")
        def broken(self, boom=""):
            if boom:
                raise RuntimeError("secret detail")
            yield "fine"
            yield from hub.subscribe("broken")

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=5)
        def poll(self, last_event_id=None):
            return hub.subscribe("polled", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", mode="thread")
        def threaded(self):
            yield from hub.subscribe("threaded")

        @cherrypy.expose
        @comet(transport="sse")
        def default(self, room, **params):
            yield {"path": room}
            yield from hub.subscribe("v:" + room)

    return Root()


@pytest.fixture
def seen():
    return Seen()


@pytest.fixture
def server(comet_cherrypy, hub, seen):
    return comet_cherrypy(make_root(hub, seen))


def test_the_second_connect_is_served_at_accept_time_with_the_same_bytes_and_request(server, hub, seen):
    headers = "User-Agent: probe/1\r\nAccept: text/event-stream\r\nAccept: */*\r\nCookie: sid=42\r\n"
    first, second = direct_after(server, "/events?room=lobby&x=1", headers)
    try:
        for raw in (first, second):
            assert raw.status == 200, raw.head + raw.rest
            # the greeting, then (once the generator waits on the hub) the
            # heartbeat that gives the client its cursor
            raw.more(b'"hello":"lobby"')
            raw.more(b"\nid: " + hub.last_id("room:lobby").encode() + b"\ndata: 5\n\n\r\n")
        assert first.headers() == second.headers()  # same headers, same order
        assert first.rest == second.rest
        pipeline, direct = seen.requests
        direct.pop("thread"), pipeline.pop("thread")  # (both first steps run on step threads)
        assert direct == pipeline  # the handler saw the same request
        assert pipeline["accept"] == "text/event-stream, */*" and pipeline["cookie"] == "42"
        assert pipeline["rest"] == {"x": "1"} and pipeline["base"].startswith("http://127.0.0.1:")
        assert pipeline["local"][1] == int(server.url.rsplit(":", 1)[1]) and pipeline["remote"] == "127.0.0.1" and pipeline["remote_port"]
        wait_until(lambda: hub.subscriptions == 2, 10, what="both streams subscribed")
        hub.publish("room:lobby", "live")
        for raw in (first, second):
            raw.more(b"data: live")
    finally:
        first.close()
        second.close()
    for _ in range(2):  # the handler's finally runs on disconnect, direct or not
        assert seen.finished.acquire(timeout=10)
    wait_until(lambda: hub.subscriptions == 0, 10, what="subscriptions released")
    wait_until(lambda: engine_plugin().pool.parked_streams == 0, 10, what="parked streams released")


def test_later_steps_of_a_direct_stream_still_see_its_request(comet_cherrypy, hub, seen):
    """Once a direct request is over, the stream keeps only what a later step
    can use of it (comet.internals.slim_spent_request): headers, cookies,
    params, peer, request line, config and response headers read there are
    those the pipeline's stream reads."""
    server = comet_cherrypy(make_root(hub, seen), {"/": {"comet.test_marker": "on"}})
    headers = "User-Agent: probe/2\r\nCookie: sid=7\r\n"
    first, second = direct_after(server, "/later?room=r1", headers)
    try:
        wait_until(lambda: hub.subscriptions == 2, 10, what="both streams subscribed")
        hub.publish("later:r1", "tick")
        seen_by = [json.loads(raw.more(b'"tick"').split(b"data: ")[-1].split(b"\n")[0]) for raw in (first, second)]
        assert seen_by[0] == seen_by[1] == {"event": "tick", "agent": "probe/2", "cookie": "7", "params": {"room": "r1"},
                                             "ip": "127.0.0.1", "line": "GET /later?room=r1 HTTP/1.1", "config": "on",
                                             "type": "text/event-stream; charset=utf-8"}
    finally:
        first.close()
        second.close()
    wait_until(lambda: engine_plugin().pool.open_streams == 0, 10, what="streams released")
    wait_until(lambda: hub.subscriptions == 0, 10, what="subscriptions released")


def test_a_resumed_stream_is_direct_too(server, hub, seen):
    first = Raw(server.url, "/events?room=r")
    first.close()
    old = hub.publish("room:r", "one")
    hub.publish("room:r", "two")
    for _ in range(5):
        before = counters()["routed_direct"]
        resumed = Raw(server.url, "/events?room=r", f"Last-Event-ID: {old}\r\n")
        if counters()["routed_direct"] == before + 1:
            break
        # Through the pipeline: on a loaded machine the URL's second went by,
        # or the first step outran PRIME_WAIT (not learned). This one learned it.
        resumed.more(b"data: two")
        resumed.close()
    else:
        pytest.fail("no resumed request was served at accept time")
    try:
        assert b"data: two" in resumed.more(b"data: two") and b"data: one" not in resumed.rest
        assert seen.requests[-1]["last_event_id"] == old
    finally:
        resumed.close()


def test_http_10_is_answered_without_chunks_and_closed(server, hub):
    Raw(server.url, "/events?room=h").close()
    before = counters()["routed_direct"]
    raw = Raw(server.url, "/events?room=h", version="HTTP/1.0")
    try:
        assert counters()["routed_direct"] == before + 1
        assert b"Transfer-Encoding" not in raw.head and b"Connection: close" in raw.head
        assert b'data: {"hello":"h"}' in raw.more(b'"hello"')
    finally:
        raw.close()


def test_refusals_redirects_and_failures_are_answered_as_the_pipeline_answers(server, caplog):
    ok = Raw(server.url, "/guarded?who=ann")  # learn the URL
    ok.close()
    before = counters()["routed_direct"]
    denied = Raw(server.url, "/guarded?who=bob")
    assert counters()["routed_direct"] == before + 1
    assert denied.status == 403 and b"text/plain" in denied.head
    assert denied.more(b"\n").startswith(b"not yours")
    moved = Raw(server.url, "/guarded?who=redirect")
    assert moved.status == 303 and b"/elsewhere" in moved.head
    assert counters()["routed_direct"] == before + 2
    unknown = Raw(server.url, "/guarded?who=ann&zz=1")
    assert unknown.status == 400 and b"zz" in unknown.more(b"\n")
    assert counters()["routed_direct"] == before + 3
    Raw(server.url, "/broken").close()
    with caplog.at_level(logging.ERROR):
        failed = Raw(server.url, "/broken?boom=1")
        body = failed.more(b"\n")
    assert failed.status == 500 and b"secret detail" not in body and b"Traceback" not in body
    assert any("secret detail" in (r.exc_text or "") or "secret detail" in str(r.exc_info) for r in caplog.records)
    assert counters()["routed_direct"] == before + 4
    for raw in (denied, moved, unknown, failed):
        raw.close()


def test_parked_long_polls_are_direct(server, hub):
    first = Raw(server.url, "/poll")
    cursor_body = first.more(b"}")
    first.close()
    assert b'"cursor"' in cursor_body or first.status == 200
    before = counters()["routed_direct"]
    last = hub.last_id("polled")
    waiting = Raw(server.url, f"/poll?last_event_id={last}")
    wait_until(lambda: hub.subscriptions == 1, 10, what="the poll waiting")
    hub.publish("polled", "p1")
    assert b"p1" in waiting.more(b"p1")
    assert counters()["routed_direct"] == before + 1
    waiting.close()


@pytest.mark.parametrize("path", ["/threaded", "/events?room=a"])
def test_not_direct_what_did_not_park_or_was_not_seen(server, path):
    before = counters()["routed_direct"]
    if path == "/threaded":  # thread mode keeps its thread: never direct
        for _ in range(2):
            Raw(server.url, path).close()
    else:  # a URL is learned as a whole: another query of a learned path is fine...
        Raw(server.url, "/events?room=b").close()
        Raw(server.url, path).close()
        before += 1
        Raw(server.url, "/events/").close()  # ...another path is not
    assert counters()["routed_direct"] == before


def test_virtual_paths_are_direct_per_url(server):
    first, second = direct_after(server, "/room-9?x=1")
    assert b'"path":"room-9"' in second.more(b"room-9")
    first.close()
    second.close()
    before = counters()["routed_direct"]
    other = Raw(server.url, "/room-10")  # not learned yet: through the pipeline
    assert b'"path":"room-10"' in other.more(b"room-10")
    assert counters()["routed_direct"] == before
    other.close()


def test_a_url_stays_direct_for_a_second_then_the_pipeline_looks_again(server, monkeypatch):
    monkeypatch.setattr(direct_module, "TTL", 0.3)
    Raw(server.url, "/events?room=t").close()
    before = counters()["routed_direct"]
    Raw(server.url, "/events?room=t").close()
    assert counters()["routed_direct"] == before + 1

    def through_the_pipeline():
        count = counters()["routed_direct"]
        Raw(server.url, "/events?room=t").close()
        return counters()["routed_direct"] == count  # expired: CherryPy served it, and looked again

    wait_until(through_the_pipeline, 5, interval=0.05, what="the URL to expire")
    count = counters()["routed_direct"]
    Raw(server.url, "/events?room=t").close()
    assert counters()["routed_direct"] == count + 1  # learned again


def session_root(hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self):
            cherrypy.session["seen"] = True
            yield from hub.subscribe("s")
    return Root()


def hook_root(hub, calls):
    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self):
            yield from hub.subscribe("h")
    return Root()


@pytest.mark.parametrize("case", ["sessions", "hook", "auth", "proxy", "custom-namespace",
                                  "handler-attaches-a-hook"])
def test_urls_where_cherrypy_does_more_are_never_direct(comet_cherrypy, hub, case):
    """Each of these would be skipped by a direct request: the pipeline keeps them."""
    calls = []
    root = hook_root(hub, calls)
    config: dict = {}
    if case == "sessions":
        root = session_root(hub)
        config = {"/": {"tools.sessions.on": True}}
    elif case == "hook":
        config = {"/": {"hooks.before_handler": lambda: calls.append("hook")}}
    elif case == "auth":
        config = {"/": {"tools.auth_basic.on": True, "tools.auth_basic.realm": "r",
                        "tools.auth_basic.checkpassword": lambda realm, user, password: True}}
    elif case == "proxy":
        config = {"/": {"tools.proxy.on": True}}
    elif case == "custom-namespace":
        cherrypy._cprequest.Request.namespaces["mine"] = lambda k, v: calls.append((k, v))
        config = {"/": {"mine.flag": 1}}
    elif case == "handler-attaches-a-hook":
        class Root:
            @cherrypy.expose
            @comet(transport="sse")
            def events(self):
                cherrypy.request.hooks.attach("on_end_request", lambda: calls.append("end"))
                yield from hub.subscribe("h")
        root = Root()
    try:
        server = comet_cherrypy(root, config)
        before = counters()["routed_direct"]
        auth = "Authorization: Basic YTpi\r\n" if case == "auth" else ""
        for _ in range(3):
            raw = Raw(server.url, "/events", auth)
            assert raw.status == 200, raw.head + raw.rest
            raw.close()
        assert counters()["routed_direct"] == before
        if case in ("hook", "handler-attaches-a-hook"):
            wait_until(lambda: len(calls) == 3, 5, what="the hook run for every request")
    finally:
        cherrypy._cprequest.Request.namespaces.pop("mine", None)


def test_response_headers_from_config_are_sent_direct_too(comet_cherrypy, hub):
    calls = []
    server = comet_cherrypy(hook_root(hub, calls), {"/": {"response.headers.X-Frame-Options": "DENY"}})
    first, second = direct_after(server, "/events")
    assert b"X-Frame-Options: DENY" in first.head and first.headers() == second.headers()
    first.close()
    second.close()


def test_access_log_lines_are_written_for_direct_requests(server):
    lines = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Capture()
    cherrypy.log.access_log.addHandler(handler)
    level = cherrypy.log.access_log.level
    cherrypy.log.access_log.setLevel(logging.INFO)
    try:
        first, second = direct_after(server, "/events?room=log", "User-Agent: logger/2\r\n")
        first.close()
        second.close()
        wait_until(lambda: len([line for line in lines if "/events?room=log" in line]) == 2, 5, what="two access lines")
        for line in lines:
            assert '"GET /events?room=log HTTP/1.1" 200' in line and "logger/2" in line
    finally:
        cherrypy.log.access_log.removeHandler(handler)
        cherrypy.log.access_log.setLevel(level)


def test_a_body_or_an_escaped_path_goes_through_the_pipeline(server):
    Raw(server.url, "/events?room=e").close()
    before = counters()["routed_direct"]
    Raw(server.url, "/even%74s?room=e").close()  # the same URL, escaped: cheroot decodes it
    assert counters()["routed_direct"] == before


def test_clients_that_hang_up_at_once_do_not_disturb_the_writer(server, hub, caplog):
    """A client gone before its first items are written (reset right after
    the request) ends its own stream only: the writer carries on."""
    import struct

    keeper = Raw(server.url, "/events?room=k")
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    for _ in range(30):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.sendall(f"GET /events?room=k HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        sock.close()
    wait_until(lambda: hub.subscriptions <= 1 and engine_plugin().pool.parked_streams <= 1, 10, what="the hung-up streams released")
    wait_until(lambda: hub.subscriptions == 1, 10, what="the keeper subscribed")
    hub.publish("room:k", "still here")
    assert b"still here" in keeper.more(b"still here")
    keeper.close()
    assert not [r for r in caplog.records if "writer crashed" in r.getMessage()]


def test_first_steps_that_block_do_not_hold_up_other_connects(comet_cherrypy, hub):
    """Direct requests are opened on a few threads; handlers stuck in their
    own code before their first item (a slow query) get threads of their
    own, and everyone else still connects at once."""
    import time as clock

    release = threading.Event()

    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self, slow=""):
            if slow:
                release.wait(10)
            yield "hi"
            yield from hub.subscribe("x")

    server = comet_cherrypy(Root())
    Raw(server.url, "/events").close()
    Raw(server.url, "/events?slow=").close()  # learned, quick
    before = counters()["routed_direct"]
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    stuck = []
    for _ in range(4):  # more than the threads that open direct requests
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"GET /events?slow=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        stuck.append(sock)
    try:
        wait_until(lambda: counters()["routed_direct"] == before + 4, 5, what="the slow ones taken")
        clock.sleep(0.05)  # (past the pool's patience: they are stuck, not just busy)
        started = clock.monotonic()
        quick = Raw(server.url, "/events")
        assert b"data: hi" in quick.more(b"data: hi")
        assert clock.monotonic() - started < 1.0
        quick.close()
    finally:
        release.set()
        for sock in stuck:
            assert b"data: hi" in read_until(sock, b"data: hi")
            sock.close()


def test_a_patient_step_pool_works_a_burst_off_with_the_threads_it_has():
    from comet.steps import StepPool

    pool = StepPool(core=2, limit=64, patience=0.05, name="test-patient")
    try:
        done, most = threading.Semaphore(0), [0]

        def short():
            most[0] = max(most[0], pool.threads)
            sum(range(2000))
            done.release()

        for _ in range(500):
            pool.submit(short)
        for _ in range(500):
            assert done.acquire(timeout=10)
        assert most[0] <= 3, most  # not a thread per job (one may be starting as another lingers)

        release = threading.Event()
        for _ in range(3):
            pool.submit(lambda: release.wait(10))  # stuck in "a handler's own code"
        time.sleep(0.1)  # past the patience
        ran = threading.Event()
        started = time.monotonic()
        pool.submit(ran.set)
        assert ran.wait(2) and time.monotonic() - started < 1.0
        release.set()
    finally:
        pool.stop()


def test_a_page_handler_that_calls_a_stream_handler_runs_on_every_request(comet_cherrypy, hub):
    """An exposed method that checks something, then returns a ``@comet``
    handler's stream, must run on every connect: a direct request calls the
    ``@comet`` handler itself and would skip the check (an access rule)."""
    checks: list[str] = []

    class Root:
        @comet(transport="sse", heartbeat=5)
        def _stream(self, room):
            return hub.subscribe(room)

        @cherrypy.expose
        def events(self, room="lobby"):
            checks.append(room)
            if room == "private":
                raise cherrypy.HTTPError(403, "members only")
            return self._stream(room)

    server = comet_cherrypy(Root())
    before = counters()["routed_direct"]
    for _ in range(3):
        raw = Raw(server.url, "/events?room=lobby")
        assert raw.status == 200, raw.head + raw.rest
        raw.close()
    assert checks == ["lobby"] * 3, "the page handler's code was skipped"
    refused = Raw(server.url, "/events?room=private")
    refused.close()
    assert refused.status == 403
    assert counters()["routed_direct"] == before
