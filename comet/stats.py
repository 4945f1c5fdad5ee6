"""Live stats: what comet is doing in this process, as JSON and as a page.

:func:`snapshot` reads the counters of a stream pool and of hubs::

    {"streams": {"open": 3, "parked": 2, "threaded": 1,
                 "by_transport": {"sse": 3}, "by_channel": {"lobby:a": 2, "?": 1}},
     "events": {"published": 41, "delivered": 97, "gaps": 0},
     "bytes_written": 18204, "disconnects": 4, "refused": 0, ...}

Counts are exact (see :class:`comet.counters.Counters`), since the process
started. ``by_channel`` names the hub channel a stream follows (``"?"`` for
a generator that is not inside ``yield from hub.subscribe(...)`` right now).

Mount it in one line:

* CherryPy: ``comet.stats.mount(root)`` serves ``/comet/stats`` (a live
  page that streams its own numbers through comet and draws them),
  ``/comet/stats/json`` and ``/comet/stats/stream`` (SSE, one snapshot a
  second). ``cherrypy.tree.mount(StatsApp(), "/comet/stats")`` does the same
  as an app of its own.
* Plain WSGI: ``stats_wsgi(pool, hubs)`` is a WSGI app answering the JSON.
* Prometheus: ``/comet/stats/metrics`` (CherryPy) and
  ``metrics_wsgi(pool, hubs)`` answer the same numbers in the Prometheus
  text format (:func:`prometheus_text`).

The text format is written here, not with ``prometheus_client``: the
numbers already exist as one consistent snapshot (the JSON's), and turning
that dict into the format takes a few dozen lines and no dependency, where
the client library would add a package, a registry and a custom collector
to expose the very same dict. The suite checks the output with
``prometheus_client``'s own parser.

The numbers (channel names included) are for operators: give ``mount`` or
``stats_wsgi`` a ``password`` (HTTP Basic, user ``comet``), or keep the URL
off the public side of the proxy (``deploy/nginx-comet.conf`` allows only
the proxy's own host). Wrong passwords are throttled per client
(:func:`client_key`: an IPv4 address, or an IPv6 client's whole ``/64``,
which one host can rotate through at will): after ``GUESSES_FREE`` of them
in a row, that client is answered ``429`` with a ``Retry-After`` that
doubles with each further wrong guess (up to ``LONGEST_WAIT``), right
password or not, so guessing costs hours instead of seconds. Behind a
proxy every client shares the proxy's address: a guesser then delays the
operators too (never for more than ``LONGEST_WAIT``), a fair price for a
page of numbers.

At most ``MAX_ADDRESSES`` clients are remembered, and a client still
serving a wait is never forgotten to make room (that would also wipe a
guesser's own record). When every record is serving one, clients not in
the table share a single record, throttled the same way: a guesser with
more addresses than that gets no more guesses, only the crowd's.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import threading
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .framing import Event
from .hub import Hub
from .stream import StreamPool

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["snapshot", "prometheus_text", "StatsApp", "mount", "stats_wsgi", "metrics_wsgi", "client_key"]

#: The Content-Type of the Prometheus text exposition format.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Wrong passwords an address may send in a row before it must wait.
GUESSES_FREE = 5
#: The first wait, in seconds; each further wrong guess doubles it...
FIRST_WAIT = 1.0
#: ... up to this.
LONGEST_WAIT = 300.0
#: An address's wrong guesses are forgotten this long after its last one.
FORGET_AFTER = 900.0
#: Clients remembered at most: to make room, only records whose wait is
#: over are dropped (the oldest first); see the module docstring.
MAX_ADDRESSES = 10_000
#: The record shared by clients that find the table full of waits.
_CROWD = "*"

_STARTED = time.time()
_PAGE = Path(__file__).resolve().parent / "static" / "stats.html"


def snapshot(pool: StreamPool, hubs: Iterable[Hub] = ()) -> dict[str, Any]:
    """The numbers, as one JSON-ready dict.

    >>> from comet import Hub
    >>> hub = Hub(); _ = hub.publish("c", "x")
    >>> stats = snapshot(StreamPool(), [hub])
    >>> stats["events"]["published"], stats["streams"]["open"]
    (1, 0)
    """
    counts = pool.counters.snapshot()
    hubs = list(hubs)
    hub_counts = [h.counters.snapshot() for h in hubs]
    return {
        "time": round(time.time(), 3),
        "uptime_s": round(time.time() - _STARTED, 1),
        "streams": pool.census(),
        "events": {
            "published": sum(c.get("published", 0) for c in hub_counts),
            "delivered": counts.get("items", 0),
            "gaps": sum(c.get("gaps", 0) for c in hub_counts),
        },
        "bytes_written": counts.get("bytes", 0),
        "disconnects": counts.get("disconnects", 0),
        "refused": counts.get("refused", 0),
        "forbidden": counts.get("forbidden", 0),
        "opened": counts.get("opened", 0),
        "closed": counts.get("closed", 0),
        "parked_total": counts.get("parked", 0),
        "heartbeats": counts.get("heartbeats", 0),
        "slow_consumers": counts.get("slow_consumers", 0),
        # Streams opened by a fast route (comet.fastpath): at accept time, or
        # through its middleware on a worker thread.
        "routed": {"at_accept": counts.get("routed_fast", 0), "through_wsgi": counts.get("routed_wsgi", 0),
                   "handlers_at_accept": counts.get("routed_direct", 0)},
        "hubs": [{"type": type(h).__name__, "channels": len(h.channels()), "subscriptions": h.subscriptions,
                  **c} for h, c in zip(hubs, hub_counts)],
    }


# (name, type, help, path into the snapshot); counters are totals since start.
_SCALARS = [
    ("comet_streams_open", "gauge", "Streams open now.", ("streams", "open")),
    ("comet_streams_parked", "gauge", "Open streams parked on the writer thread (no server thread).", ("streams", "parked")),
    ("comet_streams_threaded", "gauge", "Open streams that keep a thread (thread mode, or still opening).", ("streams", "threaded")),
    ("comet_events_published_total", "counter", "Events published through the hubs of this process.", ("events", "published")),
    ("comet_events_delivered_total", "counter", "Events and parts written to clients.", ("events", "delivered")),
    ("comet_events_gaps_total", "counter", "Gap events handed to clients that fell behind.", ("events", "gaps")),
    ("comet_bytes_written_total", "counter", "Bytes written to stream clients.", ("bytes_written",)),
    ("comet_heartbeats_total", "counter", "Heartbeats written.", ("heartbeats",)),
    ("comet_disconnects_total", "counter", "Clients that went away.", ("disconnects",)),
    ("comet_refused_total", "counter", "Streams refused by admission control (503).", ("refused",)),
    ("comet_forbidden_total", "counter", "Fast-route streams refused by authorize (403).", ("forbidden",)),
    ("comet_streams_opened_total", "counter", "Streams opened.", ("opened",)),
    ("comet_streams_closed_total", "counter", "Streams closed.", ("closed",)),
    ("comet_parks_total", "counter", "Times a stream was parked on the writer thread.", ("parked_total",)),
    ("comet_slow_consumers_total", "counter", "Clients disconnected for not reading.", ("slow_consumers",)),
]


def _label(value: Any) -> str:
    # The text format's escapes for label values: backslash, quote, newline.
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(snap: dict[str, Any], channels: bool = True) -> str:
    """The numbers of a :func:`snapshot` in the Prometheus text format
    (version 0.0.4): gauges for what is open now, ``_total`` counters
    since the process started, labelled series per transport, per channel
    (``channels=False`` leaves those out: one series per channel with open
    streams can be many), per fast-route path and per hub.

    >>> text = prometheus_text(snapshot(StreamPool(), [Hub()]))
    >>> print(text.splitlines()[2])
    comet_streams_open 0
    """
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, Any]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value}" for labels, value in samples)

    for name, kind, help_, path in _SCALARS:
        value: Any = snap
        for key in path:
            value = value[key]
        family(name, kind, help_, [("", value)])
    family("comet_streams_by_transport", "gauge", "Streams open now, per transport.",
           [(f'{{transport="{_label(t)}"}}', n) for t, n in sorted(snap["streams"]["by_transport"].items())])
    if channels:
        family("comet_streams_by_channel", "gauge", 'Streams open now, per hub channel ("?": not following one).',
               [(f'{{channel="{_label(c)}"}}', n) for c, n in sorted(snap["streams"]["by_channel"].items())])
    family("comet_streams_routed_total", "counter", "Streams opened by a fast route (at accept time, or through its "
           "WSGI middleware), or by a @comet handler served at accept time.",
           [('{how="at_accept"}', snap["routed"]["at_accept"]), ('{how="through_wsgi"}', snap["routed"]["through_wsgi"]),
            ('{how="handler_at_accept"}', snap["routed"]["handlers_at_accept"])])
    hubs = snap["hubs"]
    family("comet_hub_channels", "gauge", "Channels per hub.",
           [(f'{{hub="{i}",type="{_label(h["type"])}"}}', h["channels"]) for i, h in enumerate(hubs)])
    family("comet_hub_subscriptions", "gauge", "Open subscriptions per hub.",
           [(f'{{hub="{i}",type="{_label(h["type"])}"}}', h["subscriptions"]) for i, h in enumerate(hubs)])
    counted = sorted({k for h in hubs for k, v in h.items() if k not in ("type", "channels", "subscriptions") and isinstance(v, int)})
    for key in counted:
        family(f"comet_hub_{key}_total", "counter", f"Per hub: {key.replace('_', ' ')}, since start.",
               [(f'{{hub="{i}",type="{_label(h["type"])}"}}', h[key]) for i, h in enumerate(hubs) if key in h])
    family("comet_uptime_seconds", "gauge", "Seconds since comet was imported in this process.", [("", snap["uptime_s"])])
    return "\n".join(out) + "\n"


def _cherrypy_snapshot(shown: Iterable[Hub] = ()) -> dict[str, Any]:
    from .cherrypy_tool import engine_plugin

    plugin = engine_plugin()
    hubs = list(shown)
    hubs += [hub for hub in plugin.hubs if hub not in hubs]
    return snapshot(plugin.pool, hubs)


def _page() -> str:
    return _PAGE.read_text(encoding="utf-8")


class StatsApp:
    """CherryPy handlers for the stats of this process's comet plugin: its
    stream pool, the hubs its streams follow, and *hubs* (shown from the
    start, before any stream follows them).

    ``index``: the live page; ``json``: one snapshot; ``metrics``: the same
    in the Prometheus text format; ``stream``: SSE, a snapshot every
    ``interval`` seconds.

    >>> import cherrypy
    >>> class Root: pass
    >>> root = Root(); app = mount(root)   # /comet/stats
    >>> isinstance(root.comet.stats, StatsApp)
    True
    """

    def __init__(self, interval: float = 1.0, password: str | None = None, user: str = "comet",
                 hubs: Iterable[Hub] = ()) -> None:
        self._shown = list(hubs)
        if not isinstance(interval, (int, float)) or interval <= 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        import cherrypy

        if password is not None:
            guard = _Guard(user, password)

            def ask_password() -> None:
                # Before every handler here: the page, the JSON, the metrics
                # and the stream (a browser sends the credentials with the
                # page's EventSource too). Priority 50, after json_out's
                # wrapping (30), so that a refusal skips the wrapped handler.
                request, response = cherrypy.serving.request, cherrypy.serving.response
                refusal = guard.refusal(request.headers.get("Authorization", ""), request.remote.ip or "")
                if refusal is not None:
                    response.status, headers, response.body = refusal
                    for name, value in headers:
                        response.headers[name] = value
                    request.handler = None  # a plain-text answer, not an error page

            self._cp_config = {"hooks.before_handler": ask_password}
        self._stopped = threading.Event()

        from . import comet

        # Before comet's own stop (10): a stats stream waiting for its next
        # tick wakes and ends instead of holding up shutdown for a tick.
        cherrypy.engine.subscribe("stop", self._stopped.set, priority=5)
        cherrypy.engine.subscribe("start", self._stopped.clear)

        @cherrypy.expose
        def index() -> str:
            cherrypy.response.headers["Content-Type"] = "text/html; charset=utf-8"
            cherrypy.response.headers["Cache-Control"] = "no-cache"
            return _page()

        @cherrypy.expose
        @cherrypy.tools.json_out()
        def json_() -> dict[str, Any]:
            cherrypy.response.headers["Cache-Control"] = "no-cache"
            return _cherrypy_snapshot(self._shown)

        @cherrypy.expose
        def metrics() -> bytes:
            cherrypy.response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
            cherrypy.response.headers["Cache-Control"] = "no-cache"
            return prometheus_text(_cherrypy_snapshot(self._shown)).encode("utf-8")

        @cherrypy.expose
        @comet(transport="sse", heartbeat=15)
        def stream() -> Iterator[Event]:
            # A generator in thread mode: an admin page or two, not thousands.
            # The wait wakes at engine stop, so shutdown never waits on it.
            while True:
                yield Event(_cherrypy_snapshot(self._shown), name="stats")
                if self._stopped.wait(self.interval):
                    return

        self.index = index
        self.json = json_
        self.metrics = metrics
        self.stream = stream


_Answer = tuple[str, list[tuple[str, str]], bytes]


def client_key(address: str) -> str:
    """Who a wrong password is counted against, from the client's address:
    an IPv4 address itself, an IPv6 address's ``/64`` (one host is given a
    whole /64 and may send from any address in it), an IPv4-mapped IPv6
    address as its IPv4 address. Anything else (a Unix socket's empty
    address) is its own key.

    >>> client_key("2001:db8:1:2:aaaa::1"), client_key("2001:db8:1:2:bbbb::9")
    ('2001:db8:1:2::/64', '2001:db8:1:2::/64')
    >>> client_key("::ffff:10.0.0.7"), client_key("10.0.0.7")
    ('10.0.0.7', '10.0.0.7')
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # (a scope, "fe80::1%eth0", names no other host)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Guard:
    """HTTP Basic with *user* and *password*, wrong guesses throttled per
    client (see the module docstring)."""

    def __init__(self, user: str, password: str) -> None:
        self._check = _checker(user, password)
        self._lock = threading.Lock()
        #: client key -> (wrong guesses in a row, last one at, refused until),
        #: the least recently guessing first
        self._wrong: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        #: While the table is full: no record's wait ends before this.
        self._full_until = 0.0

    def refusal(self, header: str, address: str) -> _Answer | None:
        """None to let the request through, else its answer."""
        scheme, _, encoded = header.partition(" ")
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        key = client_key(address)
        # One lock around the whole decision: guesses sent in parallel are
        # counted one by one, none slips past a lock another one earned.
        with self._lock:
            now = time.monotonic()
            if key not in self._wrong and not self._room(now):
                key = _CROWD
            count, last, until = self._wrong.pop(key, (0, now, 0.0))
            if now - last > FORGET_AFTER:
                count, until = 0, 0.0
            if count:
                self._wrong[key] = (count, last, until)  # (at the end: the newest)
            if until > now:
                wait = str(math.ceil(until - now))
                return ("429 Too Many Requests", [("Retry-After", wait), *_PLAIN],
                        f"too many wrong passwords: try again in {wait} s\n".encode())
            if scheme.lower() != "basic":  # (a browser's first request: not a guess)
                return "401 Unauthorized", [_ASK, *_PLAIN], b"credentials needed\n"
            if not sep:
                return "400 Bad Request", list(_PLAIN), b"malformed Basic credentials\n"
            if self._check(user, password):
                if key != _CROWD:  # (one right password does not vouch for the crowd)
                    self._wrong.pop(key, None)
                return None
            count += 1
            doublings = min(count - GUESSES_FREE, 30)  # (a float's range: LONGEST_WAIT binds long before)
            until = now + min(FIRST_WAIT * 2 ** doublings, LONGEST_WAIT) if count >= GUESSES_FREE else 0.0
            self._wrong[key] = (count, now, until)
        return "401 Unauthorized", [_ASK, *_PLAIN], b"wrong user or password\n"

    def _room(self, now: float) -> bool:
        """Is there room for one more record? Makes it by dropping records
        whose wait is over, never one still serving a wait. (Called with the
        lock held; a full sweep at most once per wait that ends.)"""
        if len(self._wrong) < MAX_ADDRESSES:
            return True
        if now < self._full_until:
            return False
        over = [key for key, (_, _, until) in self._wrong.items() if until <= now and key != _CROWD]
        for key in over:
            del self._wrong[key]
        if len(self._wrong) < MAX_ADDRESSES:
            return True
        self._full_until = min((until for key, (_, _, until) in self._wrong.items() if key != _CROWD), default=now)
        return False


_ASK = ("WWW-Authenticate", 'Basic realm="comet stats", charset="UTF-8"')
_PLAIN = (("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"))


def _checker(user: str, password: str) -> Callable[[str, str], bool]:
    if not isinstance(password, str) or not password:
        raise ValueError("password must be a non-empty str (or None for no password)")
    want_user, want_password = user.encode(), password.encode()

    def check(given_user: str, given_password: str) -> bool:
        # Both compared, in constant time: the answer's timing tells nothing.
        ok_user = hmac.compare_digest(given_user.encode(), want_user)
        return hmac.compare_digest(given_password.encode(), want_password) and ok_user

    return check


def mount(root: Any, path: str = "/comet/stats", interval: float = 1.0, password: str | None = None,
          user: str = "comet", hubs: Iterable[Hub] = ()) -> StatsApp:
    """Attach a :class:`StatsApp` to a CherryPy *root* object at *path*
    (intermediate objects are created as needed) and return it. With a
    *password*, every URL under *path* asks for HTTP Basic credentials
    (*user*, *password*). *hubs* are shown from the start (others appear
    once a stream follows them)."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        raise ValueError("path must name where to mount, e.g. '/comet/stats'")
    node = root
    for name in parts[:-1]:
        child = getattr(node, name, None)
        if child is None:
            child = type("StatsBranch", (), {})()
            setattr(node, name, child)
        node = child
    app = StatsApp(interval, password=password, user=user, hubs=hubs)
    setattr(node, parts[-1], app)
    return app


def stats_wsgi(pool: StreamPool, hubs: Iterable[Hub] = (), password: str | None = None, user: str = "comet") -> WSGIApplication:
    """A WSGI app answering :func:`snapshot` as JSON, for plain WSGI servers
    (HTTP Basic with *user* and *password* when a password is given).

    >>> app = stats_wsgi(StreamPool())
    >>> body = app({"REQUEST_METHOD": "GET"}, lambda status, headers: None)
    >>> json.loads(b"".join(body))["streams"]["open"]
    0
    """
    hubs = list(hubs)
    return _numbers_app(lambda: json.dumps(snapshot(pool, hubs)).encode(), "application/json", password, user)


def metrics_wsgi(pool: StreamPool, hubs: Iterable[Hub] = (), password: str | None = None, user: str = "comet",
                 channels: bool = True) -> WSGIApplication:
    """A WSGI app answering :func:`prometheus_text` (the same numbers as
    :func:`stats_wsgi`), protected the same way; mount it at ``/metrics``.

    >>> app = metrics_wsgi(StreamPool())
    >>> body = app({"REQUEST_METHOD": "GET"}, lambda status, headers: None)
    >>> b"comet_streams_open 0" in b"".join(body)
    True
    """
    hubs = list(hubs)
    return _numbers_app(lambda: prometheus_text(snapshot(pool, hubs), channels).encode("utf-8"), PROMETHEUS_CONTENT_TYPE,
                        password, user)


def _numbers_app(render: Callable[[], bytes], content_type: str, password: str | None, user: str) -> WSGIApplication:
    guard = _Guard(user, password) if password is not None else None

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        refusal = guard and guard.refusal(environ.get("HTTP_AUTHORIZATION", ""), environ.get("REMOTE_ADDR", ""))
        if refusal:
            status, headers, body = refusal
            start_response(status, [*headers, ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"GET only\n"]
        body = render()
        start_response("200 OK", [("Content-Type", content_type), ("Cache-Control", "no-cache"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app

