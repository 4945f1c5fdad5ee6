"""comet.js in a real browser: its parsers (with input split at every byte)
and live streams on every transport, forced to reconnect and resume."""
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import engine_plugin, static_config

from comet.testing import wait_until

SIDE = "side.1_%:x"  # "." "_" "%" in a name: percent-encoded in the cursor (contract D)
MULTI = ["unit", SIDE]  # the channels of the two_* streams

UNIT_JS = r"""
window.results = {};
const enc = new TextEncoder();
function check(name, fn) { try { fn(); results[name] = "ok"; } catch (e) { results[name] = String(e && e.stack || e); } }
function eq(a, b) { const x = JSON.stringify(a), y = JSON.stringify(b); if (x !== y) throw new Error(x + " != " + y); }
function concat(...arrays) {
  const out = new Uint8Array(arrays.reduce((n, a) => n + a.length, 0)); let i = 0;
  for (const a of arrays) { out.set(a, i); i += a.length; } return out;
}
function feedSplit(make, wire, cut) {
  const p = make(); return p.feed(wire.slice(0, cut)).concat(p.feed(wire.slice(cut)));
}
check("multipart parts split at every byte", () => {
  const json = enc.encode('{"id":"1-1","event":"e","data":{"k":"\u00e9"}}');
  const jpeg = new Uint8Array([0xff, 0xd8, 13, 10, 45, 45, 67, 13, 10, 45, 0xff, 0xd9]);  // almost CRLF--B
  // comet's wire (comet/framing.py): a heartbeat line, each part's headers
  // sent ahead with the part before, an empty part where the type changes
  const json_ = "Content-Type: application/json\r\n\r\n", jpeg_ = "Content-Type: image/jpeg\r\n\r\n";
  const wire = concat(enc.encode("--B\r\nComet-Heartbeat: 1\r\n" + json_), json,
                      enc.encode("\r\n--B\r\n" + json_ + "\r\n--B\r\n" + jpeg_), jpeg, enc.encode("\r\n--B\r\n" + jpeg_));
  for (let cut = 0; cut <= wire.length; cut++) {
    const parts = feedSplit(() => new Comet.MultipartParser("B"), wire, cut);
    eq(parts.length, 2);
    eq(parts[0].contentType, "application/json");
    eq(JSON.parse(new TextDecoder().decode(parts[0].body)), {id: "1-1", event: "e", data: {k: "\u00e9"}});
    eq(parts[1].contentType, "image/jpeg");
    eq(Array.from(parts[1].body), Array.from(jpeg));
  }
});
check("ndjson lines split at every byte, multibyte too", () => {
  const wire = enc.encode('\n{"id":"1-2","event":null,"data":"\u2603"}\n\nplain text\n[1,2]\n');
  for (let cut = 0; cut <= wire.length; cut++) {
    const items = feedSplit(() => new Comet.NDJSONParser(), wire, cut);
    eq(items, [{id: "1-2", event: null, data: "\u2603"}, "plain text", [1, 2]]);
  }
});
check("items become events", () => {
  eq(Comet.toEvent({id: "1-3", event: "join", data: 5}), {id: "1-3", event: "join", data: 5, channel: null});
  eq(Comet.toEvent({id: "1-3", event: null, data: 5}), {id: "1-3", event: "message", data: 5, channel: null});
  eq(Comet.toEvent("raw"), {id: null, event: "message", data: "raw", channel: null});
  eq(Comet.toEvent({id: "a.1-3_b.1-0", event: null, channel: "room", data: 5}),
     {id: "a.1-3_b.1-0", event: "message", data: 5, channel: "room"});
});
check("events of several channels: SSE envelopes and cursors", () => {
  const sse = (id, data) => Comet.sseEvent({lastEventId: id, type: "message", data: data});
  eq(sse("a.1-3_b.1-0", '{"channel":"room","data":{"n":1}}'), {id: "a.1-3_b.1-0", event: "message", data: {n: 1}, channel: "room"});
  // one channel: the data is the data, even when it looks like an envelope
  eq(sse("1-3", '{"channel":"room","data":1}'), {id: "1-3", event: "message", data: {channel: "room", data: 1}, channel: null});
  eq(Comet.compareIds("a.1-3_b.1-0", "a.1-2_b.1-0"), 1);
  eq(Comet.compareIds("a.1-2_b.1-0", "a.1-2_b.1-0"), 0);
  eq(Comet.compareIds("a.1-2_b.1-0", "a.1-3_b.2-0"), -1);
  eq(Comet.compareIds("a.1-3_b.1-0", "a.1-2_b.1-1"), null);  // not ordered
  eq(Comet.compareIds("a.1-3_b.1-0", "a.1-3_c.1-0"), null);  // other channels
  eq(Comet.compareIds("1-3", "1-2"), 1);
});
check("cursors name their channels, percent-encoded; old CRC tags still parse", () => {
  const pieces = (id) => { const m = Comet.cursorPieces(id); return m && Array.from(m, ([k, v]) => [k, v.map(String)]); };
  eq(pieces("shouts.1700000000000-3_dm:ann:bob.1700000000000-5"),
     [["shouts", ["1700000000000", "3"]], ["dm:ann:bob", ["1700000000000", "5"]]]);
  eq(pieces("room%2E1.1-2_a%5Fb%25.1-0_%C3%A9t%C3%A9.1-1"), [["room.1", ["1", "2"]], ["a_b%", ["1", "0"]], ["\u00e9t\u00e9", ["1", "1"]]]);
  eq(pieces("1kx9z3.5-1_0.5-2"), [["1kx9z3", ["5", "1"]], ["0", ["5", "2"]]]);  // older servers: CRC-32 tags
  eq(pieces("1-3"), null);
  eq(pieces("a.b.1-3"), null);           // a raw "." in a name: not a cursor
  eq(pieces("a%ZZ.1-3"), null);          // bad percent-encoding
  eq(pieces("a.1-3_a.1-4"), null);       // one channel twice
  const hash = "~abcdefghijklmnopqrstuvwxyz";  // a long name's hash, and a channel named so (%7E): two channels
  eq(pieces(hash + ".1-2_%7E" + hash.slice(1) + ".1-3"), [["\0" + hash, ["1", "2"]], [hash, ["1", "3"]]]);
  eq(Comet.compareIds("a.1-3_" + hash + ".1-2", "a.1-3_" + hash + ".1-1"), 1);
  eq(pieces(hash + "2.1-2"), null);      // a hash is 26 letters
  const sse = (id, data) => Comet.sseEvent({lastEventId: id, type: "message", data: data});
  eq(sse("shouts.1-3_dm:ann:bob.1-0", '{"channel":"dm:ann:bob","data":1}'),
     {id: "shouts.1-3_dm:ann:bob.1-0", event: "message", data: 1, channel: "dm:ann:bob"});
  eq(Comet.compareIds("shouts.1-3_dm:ann:bob.1-0", "shouts.1-2_dm:ann:bob.1-0"), 1);
  eq(Comet.compareIds("dm:ann:bob.1-0_shouts.1-2", "shouts.1-2_dm:ann:bob.1-1"), -1);  // by name, in any order
  eq(Comet.compareIds("room%2E1.1-3", "room%2E2.1-3"), null);
});
window.live = {};
// Report to the server when every transport has its 12 events (or after 30 s):
// a browser driven without a driver (Firefox headless) has no other way out.
const reportTimer = setInterval(() => {
  const done = Object.entries(live).every(([k, l]) => l.events.length >= (k.startsWith("two_") ? 24 : 12));
  if (done || performance.now() > 30000) {
    clearInterval(reportTimer);
    const live_ = Object.fromEntries(Object.entries(live).map(([k, v]) => [k, {events: v.events, statuses: v.statuses}]));
    fetch("/results", {method: "POST", body: JSON.stringify({results: results, live: live_})});
  }
}, 100);
// ?set=multi: the streams of two channels instead (eight streams at once
// would meet the browser's six connections per origin).
const multi = new URLSearchParams(location.search).get("set") === "multi";
for (const t of ["sse", "multipart", "chunked", "longpoll"]) {
  for (const [name, cursor] of [multi ? ["two_" + t, document.body.dataset.multi] : [t, document.body.dataset.cursor]]) {
    live[name] = {events: [], statuses: []};
    live[name].sub = Comet.subscribe("/stream/" + name, {
      transport: t, events: ["tick"], lastEventId: cursor, minDelay: 100, maxDelay: 400,
      onEvent: (ev) => live[name].events.push({id: ev.id, event: ev.event, data: ev.data, channel: ev.channel}),
      onStatus: (s) => live[name].statuses.push(s),
    });
  }
}
"""


@pytest.fixture
def unit_server(comet_cherrypy):
    hub = Hub(idle=0.2)
    engine_plugin().add_hub(hub)

    def streamer(transport, channel):
        # max_duration ends every stream after a second: the client must
        # reconnect and resume, on every transport, without loss or repeats.
        @comet(transport=transport, heartbeat=0.5, max_duration=1, poll_timeout=1)
        def handler(self, last_event_id=None):
            yield from hub.subscribe(channel, last_id=last_event_id)
        return handler

    class Stream:
        pass

    for t in ["sse", "multipart", "chunked", "longpoll"]:
        setattr(Stream, t, cherrypy.expose(streamer(t, "unit")))
        setattr(Stream, "two_" + t, cherrypy.expose(streamer(t, MULTI)))

    reported = threading.Event()
    report = {}

    class Root:
        stream = Stream()

        @cherrypy.expose
        def index(self, hold=False, set="single"):
            # hold=1: an image the server releases only after the report, so a
            # browser's load event (and Firefox's --screenshot exit) waits for it.
            extra = '<img src="/hold" alt="">' if hold else ""
            multi = hub.subscribe(MULTI)  # the cursor on both channels, as a page renders it
            multi.close()
            return (f'<!doctype html><body data-cursor="{hub.last_id("unit")}" data-multi="{multi.last_id}">'
                    f'<script src="/comet/comet.js"></script><script src="/unit.js"></script>{extra}</body>')

        @cherrypy.expose
        def results(self):
            report.update(json.loads(cherrypy.request.body.read()))
            reported.set()
            return "ok"

        @cherrypy.expose
        def hold(self):
            reported.wait(40)
            cherrypy.response.headers["Content-Type"] = "image/gif"
            return b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"

        @cherrypy.expose
        def unit_js(self):
            cherrypy.response.headers["Content-Type"] = "text/javascript"
            return UNIT_JS

    server = comet_cherrypy(Root(), static_config("/comet"))
    server.report, server.reported = report, reported
    yield server, hub


@pytest.mark.parametrize("streams", ["single", "multi"])
def test_comet_js_parsers_and_live_resume_on_every_transport(context, unit_server, streams):
    """streams=multi: each stream follows two channels (hub.subscribe([...]));
    events say their channel, one cursor resumes both after every cut."""
    server, hub = unit_server
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/?set=" + streams)
    page.wait_for_function("window.results && Object.keys(window.results).length === 5")
    results = page.evaluate("window.results")
    assert results == {name: "ok" for name in results}, results
    wait_until(lambda: hub.subscriptions >= 4, timeout=10, what="four transports connected")
    sent = publish_ticks(hub, lambda: page.wait_for_timeout(250))
    try:
        page.wait_for_function("() => Object.entries(window.live).every(([k, l]) => l.events.length >= (k.startsWith('two_') ? 24 : 12))",
                               timeout=20_000)
    except Exception:
        raise AssertionError(page.evaluate("JSON.stringify(Object.fromEntries(Object.entries(window.live).map(([k, v]) => [k, [v.events.map(e => e.data), v.statuses]])))")) from None
    page.wait_for_timeout(500)  # nothing more may arrive
    live = page.evaluate("Object.fromEntries(Object.entries(window.live).map(([k, v]) => [k, {events: v.events, statuses: v.statuses}]))")
    check_live(live, sent)
    assert not errors
    page.close()


def publish_ticks(hub, pause):
    sent = []
    for n in range(12):  # over ~3 s: each stream is cut and resumed about three times
        sent.append(hub.publish("unit", {"n": n}, event="tick" if n % 2 else None))
        hub.publish(SIDE, {"side": n})
        pause()
    return sent


def check_live(live, sent):
    for name in [k for k in live if k.startswith("two_")]:  # the streams of two channels
        got = live.pop(name)
        assert [(e["channel"], e["data"]) for e in got["events"]] == [
            pair for n in range(12) for pair in [("unit", {"n": n}), (SIDE, {"side": n})]], name
        assert [e["event"] for e in got["events"] if e["channel"] == "unit"] == [
            "message" if n % 2 == 0 else "tick" for n in range(12)], name
        assert got["statuses"][-1] == "open", (name, got["statuses"])
    for transport, got in live.items():
        assert [e["data"] for e in got["events"]] == [{"n": n} for n in range(12)], transport
        assert [e["id"] for e in got["events"]] == sent, transport
        assert [e["event"] for e in got["events"]] == ["message" if n % 2 == 0 else "tick" for n in range(12)], transport
        if transport != "longpoll":  # each poll is a new request; the streams were cut and resumed
            assert "reconnecting" in got["statuses"], (transport, got["statuses"])
        assert got["statuses"][-1] == "open", (transport, got["statuses"])


def test_comet_js_in_firefox(unit_server):
    """The same page in Firefox (Debian's firefox-esr, headless). No WebDriver
    for Firefox can be installed here, so the page reports its results to the
    server itself and --screenshot mode exits once the page has loaded."""
    firefox = shutil.which("firefox-esr") or shutil.which("firefox")
    assert firefox, "Firefox is not installed: ./run test installs Debian's firefox-esr"
    server, hub = unit_server
    profile = tempfile.mkdtemp(prefix="comet-ff-")
    shot = os.path.join(profile, "page.png")
    proc = subprocess.Popen([firefox, "--headless", "--no-remote", "--profile", profile, "--screenshot", shot,
                             server.url + "/?hold=1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: hub.subscriptions >= 4, timeout=30, what="Firefox connected on four transports")
        sent = publish_ticks(hub, lambda: time.sleep(0.25))
        assert server.reported.wait(40), "Firefox never reported"
        results = server.report["results"]
        assert results and results == {name: "ok" for name in results}, results
        check_live(server.report["live"], sent)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
