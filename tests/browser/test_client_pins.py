"""comet.js behaviour users rely on, pinned in real Chromium (issue 27): each
test fails when that behaviour breaks, and says it as a user would notice.

- long-poll follows the answer's cursor, also before its first event: what
  is published between two polls is not lost;
- 429 Too Many Requests is retried after its Retry-After, not the end;
- with shared: true, a follower tab that heard the leader's pong leaves the
  stream where it is (it does not steal it in every quiet spell).
"""
from __future__ import annotations

import socket
import threading
import time
from urllib.parse import quote

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import static_config
from comet.testing import wait_until

PAGE = ('<!doctype html><body><script src="/comet/comet.js"></script><script>{script}</script></body>')


@pytest.fixture
def pin_server(comet_cherrypy):
    hub = Hub(idle=0.1)
    state = {"requests": [], "hold": None, "refuse": {}, "retry_after": "1"}

    def stream(transport):
        @comet(transport=transport, heartbeat=1, poll_timeout=0.5)
        def handler(self, transport, last_event_id=None):
            return hub.subscribe("pin", last_id=last_event_id)
        return handler

    handlers = {t: stream(t) for t in ["sse", "chunked", "longpoll"]}

    class Root:
        @cherrypy.expose
        def page(self, script):
            return PAGE.format(script=script)

        @cherrypy.expose
        # A tool keeps this URL on CherryPy's pipeline (never served "direct"
        # at accept, comet.direct): every request must come through here.
        @cherrypy.tools.response_headers(headers=[("X-Pinned", "1")])
        def events(self, transport, last_event_id=None):
            state["requests"].append((transport, last_event_id, time.monotonic()))
            hold = state["hold"]
            if hold is not None and transport == "longpoll":  # between two polls: the test publishes now
                state["hold"] = None
                hold[0].set()
                hold[1].wait(5)
            if state["refuse"].get(transport):  # the first attempt of each transport is rate limited
                state["refuse"][transport] -= 1
                cherrypy.response.status = 429
                cherrypy.response.headers["Retry-After"] = state["retry_after"]
                return "too many requests: try again in a second"
            return handlers[transport](self, transport=transport, last_event_id=last_event_id)

        @cherrypy.expose
        def threadpoll(self, last_event_id=None):
            state["requests"].append(("threadpoll", last_event_id, time.monotonic()))
            return threadpoll(self, last_event_id=last_event_id)

    @comet(transport="longpoll", mode="thread", poll_timeout=3)
    def threadpoll(self, last_event_id=None):
        return hub.subscribe("pin", last_id=last_event_id)

    server = comet_cherrypy(Root(), static_config("/comet"), thread_pool=20)
    server.hub, server.state = hub, state
    yield server
    hub.close()


def follow(transports, shared=False, more=""):
    """The page's script, URL-encoded: one subscription per transport."""
    return quote("window.got = {}; window.statuses = {}; window.subs = {};" + "".join(
        f"""got.{t} = []; statuses.{t} = [];
        subs.{t} = Comet.subscribe("/events?transport={t}", {{transport: "{t}", shared: {str(shared).lower()},
          onEvent: (ev) => got.{t}.push(ev.data), onStatus: (s) => statuses.{t}.push(s)}});"""
        for t in transports) + more)


def test_longpoll_keeps_the_answers_cursor_before_its_first_event(context, pin_server):
    """A page that has seen no event yet (no lastEventId) polls, gets empty
    answers carrying the channel's cursor, and must poll from that cursor:
    an event published while no poll is waiting is then still delivered."""
    hub, state = pin_server.hub, pin_server.state
    hub.publish("pin", "before the page")  # the channel has a cursor the page never saw
    page = context.new_page()
    page.goto(pin_server.url + "/page?script=" + follow(["longpoll"]))
    wait_until(lambda: len(state["requests"]) >= 3, timeout=10, what="a few empty polls")
    entered, proceed = threading.Event(), threading.Event()
    state["hold"] = (entered, proceed)
    assert entered.wait(5), "no next poll"
    hub.publish("pin", "between two polls")  # no poll is subscribed right now
    proceed.set()
    page.wait_for_function("window.got.longpoll.length >= 1", timeout=5_000)
    assert page.evaluate("window.got.longpoll") == ["between two polls"]
    polls = [cursor for transport, cursor, _ in state["requests"]]
    assert polls[0] is None and all(polls[1:]), polls  # every poll after the first carries a cursor
    elapsed = state["requests"][-1][2] - state["requests"][0][2]
    assert len(polls) <= elapsed / 0.5 + 3, (len(polls), elapsed)  # one poll per poll_timeout, not a tight loop


def test_429_is_retried_after_its_retry_after(context, pin_server):
    """Rate limited on every transport: the page waits the second it was
    told, then follows the stream; nothing ends."""
    hub, state = pin_server.hub, pin_server.state
    transports = ["sse", "chunked", "longpoll"]
    # SSE: EventSource's request and the fetch that reads its status are one attempt.
    state["refuse"] = {"sse": 2, "chunked": 1, "longpoll": 1}
    page = context.new_page()
    page.goto(pin_server.url + "/page?script=" + follow(transports))
    try:
        page.wait_for_function("Object.values(window.subs).every((s) => s.status === 'open')", timeout=10_000)
    except Exception:
        raise AssertionError((page.evaluate("window.statuses"), state["requests"])) from None
    sent = hub.publish("pin", "after the limit")
    page.wait_for_function("Object.values(window.got).every((g) => g.length === 1)", timeout=5_000)
    assert page.evaluate("window.got") == {t: ["after the limit"] for t in transports}, sent
    for t in transports:
        times = [at for transport, _, at in state["requests"] if transport == t]
        statuses = page.evaluate(f"window.statuses.{t}")
        assert "closed" not in statuses and statuses[-1] == "open", (t, statuses)
        # SSE: EventSource's request and the fetch that reads its status are
        # one attempt; the next attempt waits the Retry-After (1 s).
        first = times[:2] if t == "sse" else times[:1]
        assert len(times) > len(first) and times[len(first)] - first[-1] >= 1.0, (t, times)


def test_a_follower_that_heard_the_pong_does_not_steal_the_stream(browser, pin_server):
    """Two tabs share one stream and stay quiet for 3 s (many ping/pong
    rounds): the same tab leads throughout, on one server connection."""
    hub, state = pin_server.hub, pin_server.state
    context = browser.new_context()
    try:
        pages = []
        for _ in range(2):
            page = context.new_page()
            page.goto(pin_server.url + "/page?script=" + follow(["sse"], shared=True, more=(
                "window.led = 0; setInterval(() => { if (subs.sse.leader) led += 1; }, 50);")))
            page.wait_for_function("window.subs.sse.status === 'open'")
            pages.append(page)
        wait_until(lambda: hub.subscriptions == 1, timeout=5, what="one stream for two tabs")
        before = len(state["requests"])
        leader = [p for p in pages if p.evaluate("window.subs.sse.leader")]
        assert len(leader) == 1
        follower = [p for p in pages if p is not leader[0]][0]
        led_before = follower.evaluate("window.led")
        time.sleep(3)  # the quiet spell under test: nothing is published
        assert follower.evaluate("window.led") == led_before, "the follower took the stream in a quiet spell"
        assert leader[0].evaluate("window.subs.sse.leader")
        assert len(state["requests"]) == before, state["requests"][before:]  # no new connection
        sent = hub.publish("pin", "still shared")
        for page in pages:
            page.wait_for_function("window.got.sse.length === 1")
        assert [p.evaluate("window.got.sse") for p in pages] == [["still shared"]] * 2, sent
    finally:
        context.close()


def test_a_thread_mode_long_poll_is_not_cut_before_its_poll_timeout(context, pin_server):
    """Thread mode sends Comet-Heartbeat with the answer only: a page that
    resumes (its first poll waits) and assumes heartbeat: 1 must still wait
    out the 3 s poll_timeout it has not been told yet, stay open across quiet
    polls, and get a late event once."""
    hub, state = pin_server.hub, pin_server.state
    seen = hub.publish("pin", "shown before")
    page = context.new_page()
    page.goto(pin_server.url + "/page?script=" + quote(
        """window.got = []; window.statuses = [];
        window.sub = Comet.subscribe("/threadpoll", {transport: "longpoll", heartbeat: 1, lastEventId: "SEEN",
          onEvent: (ev) => got.push(ev.data), onStatus: (s) => statuses.push(s)});""".replace("SEEN", seen)))
    wait_until(lambda: len(state["requests"]) >= 1, timeout=5, what="the first poll")
    start = time.monotonic()
    wait_until(lambda: time.monotonic() - start > 7, timeout=10, what="7 quiet seconds")
    sent = hub.publish("pin", "after 7 s")
    page.wait_for_function("window.got.length >= 1", timeout=5_000)
    time.sleep(0.5)  # a second delivery would show by now
    assert page.evaluate("window.got") == ["after 7 s"], sent
    statuses = page.evaluate("window.statuses")
    assert "reconnecting" not in statuses and statuses[-1] == "open", statuses  # never cut
    polls = [at for kind, _, at in state["requests"] if kind == "threadpoll"]
    assert len(polls) <= 5, polls  # one poll per poll_timeout, no aborted ones in between


def test_a_wake_up_does_not_cut_a_retry_after_short(context, pin_server):
    """Rate limited with Retry-After: 5, the page is shown again and comes
    online (wake-ups that skip a network backoff): it still waits the 5 s
    the server asked for."""
    state = pin_server.state
    state["refuse"], state["retry_after"] = {"chunked": 1}, "5"
    page = context.new_page()
    page.goto(pin_server.url + "/page?script=" + follow(["chunked"]))
    page.wait_for_function("window.statuses.chunked.includes('reconnecting')", timeout=5_000)
    for _ in range(5):
        page.evaluate("""document.dispatchEvent(new Event("visibilitychange"));
            window.dispatchEvent(new Event("online")); document.dispatchEvent(new Event("resume"))""")
        time.sleep(0.2)
    page.wait_for_function("window.subs.chunked.status === 'open'", timeout=10_000)
    times = [at for transport, _, at in state["requests"] if transport == "chunked"]
    assert len(times) == 2 and times[1] - times[0] >= 5.0, times


@pytest.fixture
def mute_sse():
    """An SSE server blackholed right after it opens: it sends the response
    head (so EventSource fires open) and then never a byte, not even the
    comet.heartbeat announcement."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
                         b"Access-Control-Allow-Origin: *\r\nComet-Heartbeat: 1\r\n\r\n")
            held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % listener.getsockname()[1], held
    stop.set()
    thread.join(5)
    listener.close()
    for conn in held:
        conn.close()


def test_an_sse_stream_silent_since_it_opened_does_not_stay_open(context, pin_server, mute_sse):
    """Blackholed after onopen, before its first comet.heartbeat: the status
    leaves "open" within 2.5 heartbeats (the heartbeat option, 1 s)."""
    url, held = mute_sse
    page = context.new_page()
    page.goto(pin_server.url + "/page?script=" + quote(
        """window.log = [];
        window.sub = Comet.subscribe("URL/events", {transport: "sse", heartbeat: 1,
          onStatus: (s) => log.push([s, performance.now()])});""".replace("URL", url)))
    page.wait_for_function("window.log.some(([s]) => s === 'open')", timeout=5_000)
    page.wait_for_function("window.log.length && window.log[window.log.length - 1][0] !== 'open'", timeout=5_000)
    log = page.evaluate("window.log")
    opened = [at for s, at in log if s == "open"][0]
    left = [at for s, at in log if at > opened and s != "open"][0]
    assert left - opened <= 2500 + 300, log  # 2.5 heartbeats, and a watchdog tick
    assert held, "the page never reached the mute server"


def test_a_shared_stream_with_a_url_function_needs_a_key(context, pin_server):
    """Tabs share by URL; a function's source names no stream (two tabs'
    "() => signed(thread)" may follow two threads): without a key,
    SharedSubscription refuses, and subscribe() keeps each tab's own stream."""
    page = context.new_page()
    page.goto(pin_server.url + "/page?script=")
    error = page.evaluate("""() => { try { new Comet.SharedSubscription(() => "/events?transport=sse", {}); }
        catch (e) { return e.message; } return null; }""")
    assert error == "shared: true with a URL function needs a key", error
    shared = page.evaluate("""() => { const sub = Comet.subscribe(() => "/events?transport=sse", {shared: true});
        const kind = sub.constructor.name; sub.close(); return kind; }""")
    assert shared == "Subscription", shared
