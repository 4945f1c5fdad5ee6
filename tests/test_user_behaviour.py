"""What users notice, each checked against the behaviour broken on purpose
(issue 19): delivery at once, no lost wake-up, long-poll cursors, heartbeat
intervals, max_duration, resume on fast routes, authorize.

Timing is measured against each behaviour's own setting, with margins that
still catch a 2x error, and repeated (median) where one sample could be
noise. Everything waits with a deadline.
"""
from __future__ import annotations

import json
import queue
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import cherrypy
import pytest

from comet import Event, Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet.testing import StreamClient, http_get, wait_until
from comet.wsgi import comet_app

from conftest import RawStream, read_until, no_cursor


class Page:
    @cherrypy.expose
    def index(self):
        return "plain page"


@pytest.fixture
def served():
    """Hubs to serve: ended with the engine (as an app's would be), closed
    and forgotten after the test."""
    made: list[Hub] = []

    def make(**options) -> Hub:
        hub = engine_plugin().add_hub(Hub(**options))
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.close()


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


# -- a subscription iterated in its own thread (what thread mode does) ----------


def _in_a_wait(thread: threading.Thread) -> bool:
    """Is *thread* blocked in a threading wait (Condition/Event)?"""
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_filename == threading.__file__


class Consumer:
    """Iterates a subscription in a thread of its own and records each item
    with the time it came out."""

    def __init__(self, sub, caught_up: threading.Event | None = None) -> None:
        self.sub = sub
        self.items: queue.Queue = queue.Queue()
        # set by the consumer thread at its first idle tick, before it asks for more
        self.caught_up = caught_up or threading.Event()
        self.thread = threading.Thread(target=self._run, name="consumer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for item in self.sub:
            if not item:
                self.caught_up.set()
            self.items.put((time.monotonic(), item))

    def next_event(self, timeout: float = 5.0) -> tuple[float, Event]:
        """(time, event) of the next event, idle ticks skipped; TimeoutError after *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, item = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no event within {timeout}s") from None
            if item:
                return at, item

    def settle(self) -> None:
        """Wait until the consumer is parked in its wait (seen in its stack),
        or has had 0.3 s to get there: what follows happens while it waits."""
        started = time.monotonic()
        wait_until(lambda: _in_a_wait(self.thread) or time.monotonic() - started > 0.3, timeout=5,
                   interval=0.005, what="the consumer waiting")

    def stop(self, hub: Hub) -> None:
        hub.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_a_publish_wakes_a_subscriber_waiting_in_its_thread_at_once():
    """Breakage 1: publish() not waking waiters leaves each event to the next idle tick."""
    hub = Hub(idle=2.0)
    consumer = Consumer(hub.subscribe("room"))
    try:
        assert consumer.caught_up.wait(5)
        delays = []
        for n in range(5):
            consumer.settle()
            sent = time.monotonic()
            hub.publish("room", n)
            at, event = consumer.next_event()
            assert event.data == n
            delays.append(at - sent)
        assert statistics.median(delays) < hub.idle / 4, f"delivered after {delays} s with idle={hub.idle}"
    finally:
        consumer.stop(hub)


def test_an_event_published_between_take_and_wait_is_not_left_for_the_next_tick():
    """Breakage 2, the lost wake-up: the subscription found nothing, and an
    event is published before it starts waiting. Forced: its take() publishes
    right after finding nothing, once the subscription had caught up."""
    hub = Hub(idle=3.0)
    sub = hub.subscribe("room")
    caught_up = threading.Event()
    injected: list[tuple[float, str]] = []
    real_take = sub.take

    def take():
        items = real_take()
        if not items and caught_up.is_set() and not injected:
            injected.append((time.monotonic(), hub.publish("room", "in the window")))
        return items

    sub.take = take
    consumer = Consumer(sub, caught_up)
    try:
        at, event = consumer.next_event(timeout=hub.idle + 5)
        assert injected, "the race was not forced: iterating no longer goes through take()"
        assert event.id == injected[0][1]
        assert at - injected[0][0] < hub.idle / 3, f"waited {at - injected[0][0]:.2f}s with idle={hub.idle}"
    finally:
        consumer.stop(hub)


# -- over HTTP ------------------------------------------------------------------


def stream_root(hub: Hub, **options):
    """The same SSE stream of channel "room" served three ways."""

    class Root(Page):
        @cherrypy.expose
        @comet(transport="sse", mode="thread", **options)
        def thread(self, last_event_id=None):
            yield from hub.subscribe("room", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", **options)
        def generator(self, last_event_id=None):
            yield from hub.subscribe("room", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", **options)
        def subscription(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)

    return Root()


@pytest.mark.parametrize("style", ["thread", "generator", "subscription"])
def test_every_publish_reaches_an_open_stream_at_once(comet_cherrypy, served, style):
    """Breakage 1 over HTTP: with idle=2 s, a publish must not wait for a tick."""
    hub = served(idle=2.0)
    server = comet_cherrypy(stream_root(hub))
    with StreamClient(f"{server.url}/{style}") as client:
        delays = []
        for n in range(5):
            # Not at the very moment the last event arrived (the server may
            # still be on its way back to waiting): after a pause, as
            # between real events. Short next to idle, so a publish that
            # does not wake the stream still waits most of a tick.
            time.sleep(0.15)
            sent = time.monotonic()
            event_id = hub.publish("room", n)
            assert client.wait_for(n + 1)[-1].id == event_id
            delays.append(time.monotonic() - sent)
        assert statistics.median(delays) < hub.idle / 4, f"delivered after {delays} s with idle={hub.idle}"


@pytest.mark.parametrize("mode", ["thread", "auto"])
def test_an_event_published_as_a_stream_goes_idle_is_sent_at_once(comet_cherrypy, served, mode):
    """Breakage 2 over HTTP: the handler's subscription publishes in the
    window between finding nothing and waiting (forced as above)."""
    hub = served(idle=3.0)
    injected: list[tuple[float, str]] = []

    class Root(Page):
        @cherrypy.expose
        @comet(transport="sse", mode=mode)
        def events(self):
            sub = hub.subscribe("room")
            caught_up = False
            real_take = sub.take

            def take():
                items = real_take()
                if not items and caught_up and not injected:
                    injected.append((time.monotonic(), hub.publish("room", "in the window")))
                return items

            sub.take = take
            for item in sub:
                caught_up = caught_up or not item
                yield item

    server = comet_cherrypy(Root())
    with StreamClient(server.url + "/events") as client:
        [event] = client.wait_for(1, timeout=hub.idle + 5)
        arrived = time.monotonic()
        assert injected, "the race was not forced: iterating no longer goes through take()"
        assert event.id == injected[0][1]
        assert arrived - injected[0][0] < hub.idle / 3, f"took {arrived - injected[0][0]:.2f}s with idle={hub.idle}"


# -- long-poll ----------------------------------------------------------------------


def poll(url: str, cursor: str | None) -> dict:
    """One long-poll request as a client makes it: with the cursor it holds, if any."""
    status, _, body = http_get(url + ("?" + urlencode({"last_event_id": cursor}) if cursor else ""), deadline=10)
    assert status == 200, body
    return json.loads(body)


def _check_empty_poll_then_resume(url: str, hub: Hub) -> None:
    hub.publish("room", "history")  # "from now" is not the channel's start
    first = poll(url, None)  # a client's first poll: no cursor, and nothing happens
    assert first["events"] == []
    missed = hub.publish("room", "between polls")  # while the client is between requests
    second = poll(url, first["cursor"])  # resumes from what the answer said
    assert [(e["id"], e["data"]) for e in second["events"]] == [(missed, "between polls")], \
        f"lost: the empty answer's cursor was {first['cursor']!r}"
    assert first["cursor"] == hub.before(missed)


def test_a_long_poll_without_a_cursor_misses_nothing_published_between_polls(comet_cherrypy, served):
    """Breakage 3: an empty answer must carry the hub's cursor, not the request's (none)."""
    hub = served(idle=0.1)

    class Root(Page):
        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=0.3)
        def generator(self, last_event_id=None):
            yield from hub.subscribe("room", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=0.3, mode="thread")
        def thread(self, last_event_id=None):
            yield from hub.subscribe("room", last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=0.3)
        def subscription(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)

    server = comet_cherrypy(Root())
    for style in ("generator", "thread", "subscription"):
        _check_empty_poll_then_resume(f"{server.url}/{style}", hub)


def test_a_wsgi_long_poll_without_a_cursor_misses_nothing(comet_wsgi):
    hub = Hub(idle=0.1)
    try:
        app = comet_app(lambda environ: hub.subscribe("room", last_id=environ["comet.last_event_id"]),
                        transport="longpoll", poll_timeout=0.3)
        _check_empty_poll_then_resume(comet_wsgi(app).url, hub)
    finally:
        hub.close()


# -- heartbeats ---------------------------------------------------------------------

# (SSE's: the announcement of the 0.5 s heartbeat follows its preamble)
PREAMBLE = {"sse": b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n", "multipart": b"--%s\r\n", "chunked": b"\n"}  # multipart: its boundary
BEAT = {"sse": b"event: comet.heartbeat\ndata: 0.5\n\n", "multipart": b"Comet-Heartbeat: 1\r\n", "chunked": b"\n"}


def beat_times(url: str, transport: str, count: int) -> list[float]:
    """When the stream opened, then when each of its first *count* heartbeats came."""
    with RawStream(url, timeout=3) as raw:
        boundary = raw.headers["content-type"].partition("boundary=")[2]
        assert no_cursor(raw.chunk()) == PREAMBLE[transport].replace(b"%s", boundary.encode())
        times = [time.monotonic()]
        while len(times) <= count:
            assert raw.chunk() == BEAT[transport]
            times.append(time.monotonic())
    return times


@pytest.mark.parametrize("mode", [
    "thread", "auto", "parked",  # parked heartbeats run off the writer's timer heap, exact
])
def test_heartbeats_come_every_heartbeat_seconds(comet_cherrypy, served, mode):
    """Breakage 4: a heartbeat timer that is never reset beats at every idle
    tick (here every 0.1 s) instead of every ``heartbeat`` (0.5 s)."""
    hub = served(idle=0.1)

    def endpoint(transport):
        if mode == "parked":
            @comet(transport=transport, heartbeat=0.5)
            def handler(self):
                return hub.subscribe("room")
        else:
            @comet(transport=transport, heartbeat=0.5, mode=mode)
            def handler(self):
                yield from hub.subscribe("room")
        return cherrypy.expose(handler)

    class Root(Page):
        sse = endpoint("sse")
        multipart = endpoint("multipart")
        chunked = endpoint("chunked")

    server = comet_cherrypy(Root())
    with ThreadPoolExecutor(3) as pool:
        runs = {t: pool.submit(beat_times, f"{server.url}/{t}", t, 3) for t in PREAMBLE}
        gaps = {}
        for transport, run in runs.items():
            times = run.result(timeout=15)
            gaps[transport] = [b - a for a, b in zip(times, times[1:])]
    for transport, apart in gaps.items():
        assert 0.35 <= statistics.median(apart) <= 0.9, f"{transport}: heartbeats {apart} s apart, heartbeat=0.5"


# -- max_duration ---------------------------------------------------------------------


def test_max_duration_ends_every_kind_of_stream(comet_cherrypy, served):
    """Breakage 5: a parked stream (returned subscription, fast route) and a
    thread-served one end cleanly after max_duration, so the client
    reconnects."""
    hub = served(idle=0.2)
    engine_plugin().route("/fast", hub, "room", max_duration=1.5)
    server = comet_cherrypy(stream_root(hub, max_duration=1.5))
    started = time.monotonic()
    clients = {path: StreamClient(server.url + path).open() for path in ("/subscription", "/thread", "/generator", "/fast")}
    try:
        ended: dict[str, float] = {}
        while len(ended) < len(clients):
            for path, client in clients.items():
                if client.ended and path not in ended:
                    ended[path] = time.monotonic() - started
            assert time.monotonic() - started < 6, f"still open after 6 s (max_duration=1.5): {set(clients) - set(ended)}"
            time.sleep(0.02)
        for path, client in clients.items():
            client.wait_closed(0.1)  # ended cleanly: the terminating chunk, no error
            assert 1.45 <= ended[path] <= 4.5, f"{path} ended after {ended[path]:.2f}s (max_duration=1.5)"
    finally:
        for client in clients.values():
            client.close()


# -- fast routes ------------------------------------------------------------------------


def test_on_fast_routes_the_last_event_id_header_wins_over_the_query(comet_cherrypy, served):
    """Breakage 6: EventSource reconnects to the page's URL (with its original
    ``?last_event_id=``) and sends the newest id in ``Last-Event-ID``: the
    header must win, or the client is sent again what it already has."""
    hub = served(idle=0.2)
    engine_plugin().route("/events", hub, "room", heartbeat=0.5)
    server = comet_cherrypy(Page(), thread_pool=2)
    ids = [hub.publish("room", n) for n in range(5)]
    expected = [ids[4]]
    for path in ("/events", "/%65vents"):  # at accept time, through the middleware
        with StreamClient(f"{server.url}{path}?last_event_id={ids[0]}", last_event_id=ids[3]) as client:
            assert client.wait_for(1)[0].id == ids[4]
            expected.append(hub.publish("room", "marker"))  # and nothing else came first
            assert [e.id for e in client.wait_for(len(expected))] == expected


def refusal(port: int, path: str) -> tuple[bytes, bytes]:
    """Head and body of the answer to GET *path*; the body only when it is not a 200 stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = read_until(sock, b"\r\n\r\n", timeout=5)
        head, _, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 200"):
            return head, b""
        return head, body + read_until(sock, None, timeout=5)


def test_a_falsy_authorize_answer_refuses_the_stream(comet_cherrypy, served):
    """Breakage 7: ``None``, ``0``, ``""`` (a lookup that found nothing) refuse
    like ``False``; any truthy answer admits."""
    hub = served(idle=0.2)
    plugin = engine_plugin()
    answers = {"none": None, "zero": 0, "empty": "", "false": False, "nothing": []}
    for name, value in answers.items():
        plugin.route(f"/deny/{name}", hub, "room", authorize=lambda request, value=value: value)
    plugin.route("/allow", hub, "room", authorize=lambda request: "member 42")
    server = comet_cherrypy(Page(), thread_pool=2)
    port = port_of(server)
    for name in answers:
        for path in (f"/deny/{name}", f"/deny/%{ord(name[0]):02x}{name[1:]}"):  # at accept time, the middleware
            head, body = refusal(port, path)
            assert head.startswith(b"HTTP/1.1 403"), (path, head)
            assert body == b"not allowed to follow this stream\n", (path, body)
    wait_until(lambda: hub.subscriptions == 0 and plugin.pool.open_streams == 0, what="nothing open")
    with StreamClient(server.url + "/allow") as allowed:
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        event_id = hub.publish("room", "members only")
        assert allowed.wait_for(1)[0].id == event_id
