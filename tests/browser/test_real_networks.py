"""comet.js on real networks (issue 26), in real headless Chromium and
Firefox, through comet.testing.FaultProxy: connections silently dropped
(blackholed), the network gone for 20 s, a proxy that buffers whole
responses, stream URLs whose signed token expires.

Both browsers follow the same pages at the same time, each tab with one
subscription per transport, so a 20 s outage is paid once for the lot.
The server's heartbeat (and long-poll timeout) is 1 s.
"""
from __future__ import annotations

import json
import time

import cherrypy
import pytest

from comet import Hub, StreamTokens, comet
from comet.cherrypy_tool import static_config
from comet.testing import FaultProxy, wait_until

from .bidi import Firefox, firefox_path

HB = 1  # the server's heartbeat and poll_timeout, seconds
TRANSPORTS = ["sse", "chunked", "longpoll"]

# ?t=sse,chunked: one subscription per transport; ?o={...}: more options
# (JSON). Everything a subscription sees is recorded with the browser's time.
PAGE_JS = r"""
const q = new URLSearchParams(location.search);
const extra = JSON.parse(q.get("o") || "{}");
window.subs = {};
window.report = () => Object.fromEntries(Object.entries(subs).map(([t, s]) => [t, {
  events: s.events, statuses: s.statuses, fallbacks: s.fallbacks, denied: s.denied,
  status: s.sub.status, transport: s.sub.transport, heartbeat: s.sub.heartbeat}]));
window.allOpen = () => Object.values(subs).every((s) => s.sub.status === "open" || s.denied);
window.allHave = (n) => Object.values(subs).every((s) => s.events.length >= n);
// "sse@lazy": an SSE subscription named "lazy" ("chunked@bad": "chunked_bad")
// whose URL is the function urls.lazy() makes (/signed_url signs a fresh one).
const fresh = async () => (await fetch("/signed_url", {cache: "no-store"})).text();
const urls = {
  fresh: () => fresh,                                       // a fresh URL on every connect
  lazy: () => { let cached = null; const f = async () => {  // the 2nd connect reuses the 1st URL
    f.calls = (f.calls || 0) + 1; if (f.calls !== 2) cached = await fresh(); return cached; }; return f; },
  bad: () => () => "/events/signed?token=bad",             // refused from the start
  plain: () => () => "/events/sse",                         // a function, but always the same stream
  revoked: () => { let calls = 0; return async () => ++calls === 1 ? fresh() : "/events/signed?token=bad"; },
};
for (const entry of (q.get("t") || "sse").split(",")) {
  const [t, mode] = entry.split("@"), name = !mode ? t : t === "sse" ? mode : t + "_" + mode;
  const s = subs[name] = {events: [], statuses: [], fallbacks: [], denied: null};
  s.url = mode ? urls[mode]() : "/events/" + t;
  s.sub = Comet.subscribe(s.url, Object.assign({
    transport: t, lastEventId: document.body.dataset.cursor,
    onEvent: (ev) => s.events.push([ev.id, ev.data]),
    onStatus: (st) => s.statuses.push([st, Date.now()]),
    onFallback: (info) => s.fallbacks.push([info.from, info.to, Date.now()]),
    onDenied: (info) => { s.denied = info; },
  }, extra));
}
"""


class PageRoot:
    """The page (comet.js and PAGE_JS, the cursor of channel "net" in its
    body) with its streams under /events."""

    def __init__(self, hub, events):
        self.hub, self.events = hub, events

    @cherrypy.expose
    def index(self, **params):
        return (f'<!doctype html><body data-cursor="{self.hub.last_id("net")}">'
                '<script src="/comet/comet.js"></script><script src="/page.js"></script></body>')

    @cherrypy.expose
    def page_js(self):
        cherrypy.response.headers["Content-Type"] = "text/javascript"
        return PAGE_JS


@pytest.fixture
def net_server(comet_cherrypy):
    hub = Hub(idle=0.2)
    tokens = StreamTokens("a test secret of at least thirty-two bytes", ttl=2)
    refused = []

    def stream(transport, **more):
        @comet(transport=transport, heartbeat=HB, poll_timeout=HB, **more)
        def handler(self, last_event_id=None):
            return hub.subscribe("net", last_id=last_event_id)
        return cherrypy.expose(handler)

    class Events:
        sse, chunked, longpoll, multipart = (stream(t) for t in ["sse", "chunked", "longpoll", "multipart"])
        poll = stream("longpoll")  # where a buffered stream falls back (pollUrl)

        @cherrypy.expose
        @comet(transport="sse", heartbeat=HB, max_duration=3)
        def signed(self, token=None, last_event_id=None):
            try:
                server.tokens.verify(token or "", channel="net")
            except Exception:
                refused.append(time.monotonic())
                raise
            return hub.subscribe("net", last_id=last_event_id)

    class Root(PageRoot):
        @cherrypy.expose
        def signed_url(self):
            cherrypy.response.headers["Cache-Control"] = "no-store"
            return "/events/signed?token=" + server.tokens.sign("ann", ["net"])

    server = comet_cherrypy(Root(hub, Events()), static_config("/comet"), thread_pool=40)
    server.hub, server.tokens, server.refused = hub, tokens, refused
    yield server
    hub.close()


@pytest.fixture(scope="module")
def firefox():
    if not firefox_path():
        pytest.fail("Firefox is not installed: ./run test installs Debian's firefox-esr")
    with Firefox() as ff:
        yield ff


class Tab:
    """One page in Chromium (playwright) or Firefox (BiDi: *context*, a tab
    of its own, or its first one), the same calls."""

    def __init__(self, name, page, context=None):
        self.name, self.page, self.context = name, page, context

    def evaluate(self, expression):
        if self.name == "firefox":
            return self.page.evaluate(expression, context=self.context)
        return self.page.evaluate(expression)

    def wait_for(self, expression, timeout):
        try:
            if self.name == "firefox":
                return self.page.wait_for(expression, timeout=timeout, context=self.context)
            return self.page.wait_for_function(expression, timeout=timeout * 1000)
        except Exception:
            raise AssertionError(f"{self.name}: still not {expression}: {json.dumps(self.report())}") from None

    def set_offline(self, offline):
        if self.name == "firefox":
            assert self.page.set_offline(offline), "this Firefox cannot emulate offline (BiDi emulation.setNetworkConditions)"
        else:
            self.page.context.set_offline(offline)

    def report(self):
        return self.evaluate("window.report()")


def open_tabs(context, firefox, url):
    """The page at *url* in both browsers, every subscription open."""
    chromium = context.new_page()
    chromium.goto(url)
    firefox.goto(url)
    tabs = [Tab("chromium", chromium), Tab("firefox", firefox)]
    for tab in tabs:
        tab.wait_for("window.allOpen && window.allOpen()", timeout=15)
    return tabs


def page_url(base, transports, **options):
    from urllib.parse import urlencode
    return base + "/?" + urlencode({"t": ",".join(transports), "o": json.dumps(options)})


def wait_shown(tabs, n, deadline, what):
    """Every subscription of every tab shows n events before *deadline* (time.time())."""
    for tab in tabs:
        left = deadline - time.time()
        try:
            tab.wait_for(f"window.allHave({n})", timeout=max(0.1, left))
        except Exception:
            raise AssertionError(f"{tab.name}: {what}: {json.dumps(tab.report())}") from None


def check_events(tabs, sent):
    """Each subscription shows exactly *sent* (ids), once each, in order."""
    reports = {tab.name: tab.report() for tab in tabs}
    for name, report in reports.items():
        for transport, sub in report.items():
            assert [e[0] for e in sub["events"]] == sent, (name, transport, sub)
    return reports


def statuses_since(sub, since_ms):
    return [s for s, at in sub["statuses"] if at >= since_ms]


def test_blackholed_connections_are_noticed_and_resumed(context, firefox, net_server):
    """The proxy silently stops forwarding the connections it carries (new
    ones pass): every transport (multipart too, read by comet.js), in both browsers, notices within 2.5
    heartbeats (status reconnecting), resumes, and shows the 3 events
    published meanwhile within 10 s, once each, in order."""
    hub = net_server.hub
    with FaultProxy(net_server.url) as proxy:
        tabs = open_tabs(context, firefox, page_url(proxy.url, TRANSPORTS + ["multipart"], pollUrl="/events/poll"))
        for tab in tabs:  # the interval each transport announced (contract A)
            tab.wait_for(f"Object.values(window.subs).every((s) => s.sub.heartbeat === {HB})", timeout=5)
        proxy.blackhole()
        dropped = time.time()
        sent = [hub.publish("net", {"n": n}) for n in range(3)]
        wait_shown(tabs, 3, dropped + 10, "the events published after the drop")
        print(f"\nblackholed: every transport in both browsers shows the events {time.time() - dropped:.2f} s after the drop")
        reports = check_events(tabs, sent)
        for tab in tabs:
            tab.wait_for("window.allOpen()", timeout=5)
        for name, report in reports.items():
            for transport, sub in report.items():
                after = [(s, at) for s, at in sub["statuses"] if at >= dropped * 1000]
                assert after and after[0][0] == "reconnecting", (name, transport, after)
                noticed = after[0][1] / 1000 - dropped
                print(f"\n{name} {transport}: dead stream noticed after {noticed:.2f} s")
                assert noticed <= 2.5 * HB, (name, transport, noticed)
                assert "open" in [s for s, _ in after], (name, transport, after)
                assert not sub["fallbacks"], (name, transport, sub)  # dead sockets, not a buffering proxy


def test_twenty_seconds_offline_then_current_within_two_seconds(context, firefox, net_server):
    """The network goes away for 20 s (connections dead, the browser
    offline: status "offline"), events are published meanwhile, then it comes
    back: every transport in both browsers is current within 2 s."""
    hub = net_server.hub
    with FaultProxy(net_server.url) as proxy:
        tabs = open_tabs(context, firefox, page_url(proxy.url, TRANSPORTS))
        gone = time.time()
        proxy.offline()
        for tab in tabs:
            tab.set_offline(True)
        sent = [hub.publish("net", {"n": n}) for n in range(2)]
        for tab in tabs:
            tab.wait_for("Object.values(window.subs).every((s) => s.sub.status === 'offline')", timeout=5)
        while time.time() < gone + 20:  # the outage itself; the pages must stay "offline" throughout
            for tab in tabs:
                assert tab.evaluate("Object.values(window.subs).every((s) => s.sub.status === 'offline' && !s.events.length)")
            time.sleep(1)
        proxy.restore()
        for tab in tabs:
            tab.set_offline(False)
        back = time.time()
        wait_shown(tabs, 2, back + 2, "2 s after the network came back")
        shown = time.time() - back
        sent.append(hub.publish("net", {"n": 2}))
        wait_shown(tabs, 3, time.time() + 2, "live again")
        reports = check_events(tabs, sent)
        print(f"\nafter 20 s offline, both browsers on {TRANSPORTS} current {shown:.2f} s after the network came back")
        for name, report in reports.items():
            for transport, sub in report.items():
                after = statuses_since(sub, gone * 1000)
                assert after[0] == "offline" and after[-1] == "open", (name, transport, after)


def test_a_buffering_proxy_falls_back_to_longpoll_then_streams_again(context, firefox, net_server):
    """Behind a proxy that holds each response until it ends, an SSE stream
    never shows a byte: comet.js falls back to long-poll (pollUrl) from the
    same cursor, says so (onFallback, sub.transport), and shows the events
    within 15 s; the browser's next page polls at once. It tries the stream
    again now and then, polling meanwhile, and streams again once the proxy
    lets streams through."""
    hub = net_server.hub
    with FaultProxy(net_server.url) as proxy:
        proxy.buffer_responses(True)
        started = time.time()
        url = page_url(proxy.url, ["sse"], heartbeat=HB, pollUrl="/events/poll", retryStreamAfter=2000)
        chromium = context.new_page()
        chromium.goto(url)
        firefox.goto(url)
        tabs = [Tab("chromium", chromium), Tab("firefox", firefox)]
        sent = [hub.publish("net", {"n": n}) for n in range(3)]
        wait_shown(tabs, 3, started + 15, "15 s behind a buffering proxy")
        print(f"\nbehind a buffering proxy: events shown after {time.time() - started:.2f} s")
        check_events(tabs, sent)
        for tab in tabs:
            report = tab.report()["sse"]
            assert report["fallbacks"][0][:2] == ["sse", "longpoll"], report
            assert report["transport"] == "longpoll", report
        # The next page of this browser remembers: it polls from the start,
        # trying the stream beside the polls (still held back: the polls go
        # on meanwhile, and it stays on long-poll).
        chromium.goto(url)
        firefox.goto(url)
        reloaded = time.time()
        for tab in tabs:
            tab.wait_for("window.subs.sse.sub._streamProbe !== null", timeout=5)
        sent = [hub.publish("net", {"n": 3})]
        wait_shown(tabs, 1, reloaded + 2 * HB + 2, "the next page, at once")
        print(f"the next page behind the proxy: an event shown {time.time() - reloaded:.2f} s after loading")
        for tab in tabs:
            tab.wait_for("window.subs.sse.sub._streamProbe === null", timeout=5)
            report = tab.report()["sse"]
            assert report["transport"] == "longpoll" and len(report["fallbacks"]) == 1, report
        proxy.buffer_responses(False)
        for tab in tabs:
            tab.wait_for("window.subs.sse.sub.transport === 'sse' && window.subs.sse.sub.status === 'open'", timeout=10)
        sent.append(hub.publish("net", {"n": 4}))
        wait_shown(tabs, 2, time.time() + 5, "streaming again")
        for name, report in check_events(tabs, sent).items():
            assert [f[:2] for f in report["sse"]["fallbacks"]] == [["sse", "longpoll"], ["longpoll", "sse"]], (name, report)


def test_signed_urls_renew_themselves(context, firefox, net_server):
    """Comet.subscribe(fn): the function is called on every (re)connect, so
    a stream URL signed for 2 s keeps working over streams of 3 s ("fresh");
    a URL that went stale (here: the server's signing key rotated, which
    refuses every earlier token as expiry does) costs one 403 and one more
    call of the function ("lazy" hands out its old URL once), nothing lost or
    shown twice, in both browsers."""
    hub = net_server.hub
    tabs = open_tabs(context, firefox, page_url(net_server.url, ["sse@fresh", "sse@lazy"]))
    for tab in tabs:
        assert tab.evaluate("window.subs.lazy.url.calls") == 1
    net_server.tokens = StreamTokens("another secret, at least thirty-two bytes long")  # every earlier token refused
    sent = [hub.publish("net", {"n": 0})]
    wait_shown(tabs, 1, time.time() + 5, "the first event")
    # The streams end at their max_duration (3 s): "lazy" reconnects with its stale URL, is refused, renews.
    for tab in tabs:
        tab.wait_for("window.subs.lazy.url.calls >= 3 && window.subs.lazy.sub.status === 'open'", timeout=10)
    sent += [hub.publish("net", {"n": n}) for n in range(1, 3)]
    wait_shown(tabs, 3, time.time() + 5, "after the renewal")
    reports = check_events(tabs, sent)
    # One refusal per browser, from "lazy": the EventSource's request and the
    # fetch that reads its status (EventSource does not show it).
    assert len(net_server.refused) == 2 * 2, net_server.refused
    for name, report in reports.items():
        for label, sub in report.items():
            assert sub["denied"] is None and sub["status"] == "open", (name, label, sub)
        assert "reconnecting" in [s for s, _ in report["lazy"]["statuses"]], (name, report)


def test_a_403_on_the_first_connect_or_twice_in_a_row_is_a_refusal(context, net_server):
    """A URL function does not turn a real refusal into a retry loop."""
    page = context.new_page()
    page.goto(page_url(net_server.url, ["sse@bad", "sse@revoked", "chunked@bad"]))
    tab = Tab("chromium", page)
    tab.wait_for("Object.values(window.subs).every((s) => s.denied)", timeout=10)
    report = tab.report()
    for label, sub in report.items():
        assert sub["denied"]["status"] == 403 and sub["status"] == "closed", (label, sub)
        assert "invalid stream token" in sub["denied"]["reason"], sub
    # "revoked": opened once, then two 403s in a row (the second after a fresh URL)
    assert [s for s, _ in report["revoked"]["statuses"]][:2] == ["connecting", "open"], report
    # SSE: each refusal is seen twice (EventSource's request, the fetch that reads its status)
    assert len(net_server.refused) == 2 + 2 * 2 + 1, net_server.refused


def test_shared_tabs_follow_a_leader_whose_stream_went_silent(context, firefox, net_server):
    """shared: true, two tabs per browser on one SSE stream: the leading tab's
    stream is blackholed; it notices, reconnects, and both tabs show what was
    published meanwhile once each; the other tab keeps following (the leader
    still answers it) and sees the statuses."""
    hub = net_server.hub
    with FaultProxy(net_server.url) as proxy:
        url = page_url(proxy.url, ["sse"], shared=True)
        tabs = []
        for _ in range(2):
            page = context.new_page()
            page.goto(url)
            tabs.append(Tab("chromium", page))
        ff_tab = firefox.new_tab()
        try:
            firefox.goto(url)
            firefox.goto(url, context=ff_tab)
            tabs += [Tab("firefox", firefox), Tab("firefox", firefox, ff_tab)]
            for tab in tabs:
                tab.wait_for("window.allOpen()", timeout=15)
            wait_until(lambda: hub.subscriptions == 2, timeout=5, what="one stream per browser")
            leaders = [tab.evaluate("window.subs.sse.sub.leader") for tab in tabs]
            assert sorted(leaders) == [False, False, True, True], leaders
            proxy.blackhole()
            dropped = time.time()
            sent = [hub.publish("net", {"n": n}) for n in range(3)]
            wait_shown(tabs, 3, dropped + 10, "the events published after the drop")
            print(f"\nshared tabs: the events shown {time.time() - dropped:.2f} s after the leader's stream was blackholed")
            check_events(tabs, sent)
            for tab, led in zip(tabs, leaders):
                tab.wait_for("window.allOpen()", timeout=5)
                assert tab.evaluate("window.subs.sse.sub.leader") == led  # the same tabs lead
                after = statuses_since(tab.report()["sse"], dropped * 1000)
                assert after[:1] == ["reconnecting"] and after[-1] == "open", (tab.name, led, after)
        finally:
            firefox.close_tab(ff_tab)


def test_a_follower_woken_up_makes_the_leader_check_its_stream(context, net_server):
    """The leading tab's watchdog is stopped (as a background tab's timers
    are slowed) and its stream is blackholed: a follower tab coming back
    (here: its "online" event) asks the leader to check, and the leader
    starts replacing its silent stream at once."""
    hub = net_server.hub
    with FaultProxy(net_server.url) as proxy:
        url = page_url(proxy.url, ["sse"], shared=True)
        tabs = []
        for _ in range(2):
            page = context.new_page()
            page.goto(url)
            tabs.append(Tab("chromium", page))
            tabs[-1].wait_for("window.allOpen()", timeout=15)
        leader, follower = sorted(tabs, key=lambda tab: not tab.evaluate("window.subs.sse.sub.leader"))
        leader.evaluate("window.subs.sse.sub._inner._watch = () => {}")  # no watchdog in the leading tab
        proxy.blackhole()
        sent = [hub.publish("net", {"n": n}) for n in range(2)]
        time.sleep(3 * HB)  # long past the 2 heartbeats a watchdog would have waited
        connection = leader.evaluate("window.subs.sse.sub._inner._gen")
        assert leader.evaluate("window.subs.sse.events.length") == 0
        follower.evaluate("window.dispatchEvent(new Event('online'))")
        leader.wait_for(f"window.subs.sse.sub._inner._gen > {connection}", timeout=1)  # a new connection, now
        for tab in tabs:
            assert statuses_since(tab.report()["sse"], 0)[-1] == "reconnecting"
        # The browser may have put it on another blackholed (pooled) socket:
        # the watchdog, running again, deals with that as always.
        leader.evaluate("delete window.subs.sse.sub._inner._watch")
        wait_shown(tabs, 2, time.time() + 10, "after the follower woke up")
        check_events(tabs, sent)


WAKE_UPS = {  # what the page gets -> whether a silent stream is replaced at once
    "online": ("window.dispatchEvent(new Event('online'))", True),
    "shown": ("document.dispatchEvent(new Event('visibilitychange'))", True),
    "back/forward cache": ("window.dispatchEvent(new PageTransitionEvent('pageshow', {persisted: true}))", True),
    "resumed": ("document.dispatchEvent(new Event('resume'))", True),
    "first pageshow": ("window.dispatchEvent(new PageTransitionEvent('pageshow', {persisted: false}))", False),
    "hidden": ("Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});"
               "document.dispatchEvent(new Event('visibilitychange'));"
               "delete document.visibilityState", False),
}


def test_wake_ups_replace_a_silent_stream_at_once(context, net_server):
    """Each wake-up (online, shown, restored from the back/forward cache,
    resumed) replaces a stream silent for longer than a heartbeat at once,
    on every transport; other page events do not, and neither does a
    wake-up when the stream was heard from within the heartbeat."""
    page = context.new_page()
    page.goto(page_url(net_server.url, TRANSPORTS))
    tab = Tab("chromium", page)
    tab.wait_for("window.allOpen()", timeout=15)
    tab.wait_for(f"Object.values(window.subs).every((s) => s.sub.heartbeat === {HB})", timeout=5)
    # The watchdogs off: only the wake-ups act here.
    tab.evaluate("Object.values(window.subs).forEach((s) => { s.sub._watch = () => {}; })")
    connections = "Object.fromEntries(Object.entries(window.subs).map(([t, s]) => [t, s.sub._gen]))"
    for name, (script, replaces) in WAKE_UPS.items():
        for silent in (0.1, 2.5):  # seconds since the stream was last heard from; the heartbeat is 1 s
            tab.wait_for("window.allOpen()", timeout=10)
            before = tab.evaluate(connections)
            tab.evaluate(f"Object.values(window.subs).forEach((s) => {{ s.sub._heard = Date.now() - {silent * 1000}; }}); {script}")
            after = tab.evaluate(connections)
            expected = replaces and silent > HB
            assert {t: after[t] > before[t] for t in TRANSPORTS} == {t: expected for t in TRANSPORTS}, (name, silent)
    sent = [net_server.hub.publish("net", "still live")]
    wait_shown([tab], 1, time.time() + 5, "after the wake-ups")
    check_events([tab], sent)


def test_a_page_with_no_event_yet_resumes_from_the_streams_cursor(context, firefox, net_server):
    """A page rendered without a cursor that has seen no event yet: its
    stream's cursor comes with the SSE heartbeat (its id) and the long-poll
    answer, so when the connection dies, what was published meanwhile is
    shown after the reconnect, not lost to a "from now"."""
    hub = net_server.hub
    hub.publish("net", "before the page")
    with FaultProxy(net_server.url) as proxy:
        tabs = open_tabs(context, firefox, page_url(proxy.url, ["sse", "longpoll"], lastEventId=None))
        for tab in tabs:  # heard from: the SSE announcement, a long-poll answer
            tab.wait_for(f"Object.values(window.subs).every((s) => s.sub.heartbeat === {HB})", timeout=5)
        proxy.blackhole()
        dropped = time.time()
        sent = [hub.publish("net", {"n": n}) for n in range(2)]
        wait_shown(tabs, 2, dropped + 10, "what was published while the connection was dead")
        check_events(tabs, sent)


def test_a_new_leader_resumes_from_the_cursor_the_old_one_was_told(context, net_server):
    """shared: true on pages without a cursor, no event yet: the leading tab
    passes the stream's cursor (its heartbeat's id) to the others, so when
    it closes, the tab that takes over shows what was published meanwhile."""
    hub = net_server.hub
    hub.publish("net", "before the pages")
    url = page_url(net_server.url, ["sse"], shared=True, lastEventId=None)
    tabs = []
    for _ in range(2):
        page = context.new_page()
        page.goto(url)
        tabs.append(Tab("chromium", page))
        tabs[-1].wait_for("window.allOpen()", timeout=15)
    leader, follower = sorted(tabs, key=lambda tab: not tab.evaluate("window.subs.sse.sub.leader"))
    leader.wait_for(f"window.subs.sse.sub._inner.heartbeat === {HB}", timeout=5)  # heard its announcement
    follower.wait_for("window.subs.sse.sub.lastEventId !== null", timeout=5)
    leader.page.close()
    sent = [hub.publish("net", {"n": n}) for n in range(2)]  # while no tab holds the stream
    wait_shown([follower], 2, time.time() + 5, "after the takeover")
    check_events([follower], sent)


@pytest.mark.parametrize("key", [None, "net"])
def test_a_url_function_shares_a_stream_only_with_a_key(context, net_server, key):
    """shared: true with a URL function: with key, the tabs share one
    stream; without, each tab has its own (the function's source cannot say
    which stream it is)."""
    url = page_url(net_server.url, ["sse@plain"], shared=True, **({"key": key} if key else {}))
    tabs = []
    for _ in range(2):
        page = context.new_page()
        page.goto(url)
        tabs.append(Tab("chromium", page))
        tabs[-1].wait_for("window.allOpen()", timeout=15)
    streams = 1 if key else 2
    wait_until(lambda: net_server.hub.subscriptions == streams, timeout=5, what=f"{streams} stream(s) for two tabs")
    sent = [net_server.hub.publish("net", "to both")]
    wait_shown(tabs, 1, time.time() + 5, "in both tabs")
    check_events(tabs, sent)


def test_a_leader_without_timers_watches_its_stream_on_its_followers_pings(context, net_server):
    """A leading tab in the background has its timers slowed down (here:
    stopped); the other tabs' pings (sent whenever the leader is quiet) make
    it look at its stream, so a dead one is still noticed within heartbeats."""
    hub = net_server.hub
    with FaultProxy(net_server.url) as proxy:
        url = page_url(proxy.url, ["sse"], shared=True)
        tabs = []
        for _ in range(2):
            page = context.new_page()
            page.goto(url)
            tabs.append(Tab("chromium", page))
            tabs[-1].wait_for("window.allOpen()", timeout=15)
        leader = next(tab for tab in tabs if tab.evaluate("window.subs.sse.sub.leader"))
        leader.evaluate("window.subs.sse.sub._inner._tick = () => {}")  # its timers never fire
        proxy.blackhole()
        dropped = time.time()
        sent = [hub.publish("net", {"n": n}) for n in range(2)]
        wait_shown(tabs, 2, dropped + 10, "with the leader's timers stopped")
        print(f"\na leader without timers: the events shown {time.time() - dropped:.2f} s after the drop")
        check_events(tabs, sent)
