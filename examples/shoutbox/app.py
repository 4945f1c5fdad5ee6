"""The shoutbox: live chat with history, moderation, and nothing lost.

    python -m examples.shoutbox [--host 127.0.0.1] [--port 8081] [--mod-secret S]
                                [--rate 5/10] [--behind-proxy] [--redis URL] [--debug]

The page renders the last 50 shouts on the server and hands the id of the
newest event to the stream, which resumes exactly after it: no gap and no
duplicate between the page and the stream. A page whose cursor the hub can
no longer resume from (the server restarted, or the page was away for more
than the buffer holds) gets the same last 50 shouts as a ``comet.snapshot``
(``hub.snapshot``), exact at their newest id: the page merges them into its
list, keeps the shouts the server no longer has under a note that says so
(an in-memory server forgets on restart), and keeps what the user was typing.

One channel, two views: guests and moderators subscribe to the same channel;
a per-subscriber ``view`` hides moderator notices from guests. A moderator's
delete publishes a ``delete`` event and every page removes the shout live.

No server-side sessions for guests: a long-lived stream would hold
CherryPy's session lock and block the same browser's posts. CSRF uses a
double-submit cookie (the form field must match the cookie). Moderators get
a random session id in a cookie; the server keeps the ids (in memory, or in
Redis) so that a session expires and a logout revokes it everywhere.

The rate limit counts per client IP address, something the client cannot
choose (a cookie or a form field it could rotate at will). Behind a proxy
every request comes from the proxy: ``--behind-proxy`` takes the address the
proxy appended to ``X-Forwarded-For`` instead, and only from a loopback peer.

Nothing lives only in one process, so ``--redis URL`` is all it takes to run
several behind a load balancer: shouts and deletions are events on the
(Redis) hub, deleted shouts are found from its history, moderator sessions
and the rate limit live in Redis (:class:`RedisRateLimiter`,
:class:`RedisModeratorSessions`).

Signed-in users send each other private messages, following the room and
their threads on one stream: see :mod:`examples.shoutbox.pm` (``/pm/...``).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import inspect
import ipaddress
import math
import os
import re
import secrets
import threading
import time
from pathlib import Path

import cherrypy
import jinja2

import comet.stats
from comet import BackendUnavailable, Event, Hub, StreamTokens
from comet.backends import hub_from_url

from ..ratelimit import RateLimiter
from comet.cherrypy_tool import static_config
from comet.wsgi import BACKLOG

HERE = Path(__file__).parent
templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
# UTC in the page; the script shows it in the viewer's own time zone.
templates.filters["isotime"] = lambda at: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(at or 0)))
CHANNEL = "shouts"
NICK = re.compile(r"[^\W_][\w \-]{0,19}")
SESSION_ID = re.compile(r"[A-Za-z0-9_\-]{43}")  # secrets.token_urlsafe(32)


class RedisRateLimiter:
    """:class:`RateLimiter`'s rule counted in Redis, for every process at once:
    a sorted set of hit times per client, trimmed to the window, in one
    atomic script."""

    _SCRIPT = """
    local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
    if redis.call('ZCARD', KEYS[1]) >= limit then
        local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
        return tostring(tonumber(oldest[2]) + window - now)
    end
    redis.call('ZADD', KEYS[1], now, ARGV[4])
    redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
    return '0'
    """

    def __init__(self, client, limit: int = 5, window: float = 10.0, prefix: str = "shoutbox:rate:") -> None:
        self.redis, self.limit, self.window, self.prefix = client, limit, window, prefix
        self._script = client.register_script(self._SCRIPT)

    def allow(self, key: str) -> float:
        """0 if allowed now (and counted), else seconds until it would be."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        wait = self._script(keys=[self.prefix + digest],
                            args=[time.time(), self.window, self.limit, secrets.token_hex(8)])
        return float(wait)


class ModeratorSessions:
    """Moderator session ids in this process, each valid for ``ttl`` seconds
    or until closed (logout). A session may hold who opened it (the signed-in
    users of private messages use the same kind of store)."""

    def __init__(self, ttl: float = 8 * 3600) -> None:
        self.ttl = ttl
        self._expires: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def open(self, who: str = "") -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._expires = {s: t for s, t in self._expires.items() if t[0] > now}
            self._expires[sid] = (now + self.ttl, who)
        return sid

    def who(self, sid: str) -> str | None:
        """Who opened session *sid* (``""`` if nobody said), None if it is not valid."""
        with self._lock:
            expires, who = self._expires.get(sid, (0.0, ""))
        return who if expires > time.monotonic() else None

    def valid(self, sid: str) -> bool:
        return self.who(sid) is not None

    def close(self, sid: str) -> None:
        with self._lock:
            self._expires.pop(sid, None)


class RedisModeratorSessions(ModeratorSessions):
    """The same sessions in Redis, so a logout on one process ends the
    session on all of them; Redis expires the keys."""

    def __init__(self, client, ttl: float = 8 * 3600, prefix: str = "shoutbox:mod:") -> None:
        self.redis, self.ttl, self.prefix = client, ttl, prefix

    def open(self, who: str = "") -> str:
        sid = secrets.token_urlsafe(32)
        self.redis.set(self.prefix + sid, b"=" + who.encode(), px=max(1, int(self.ttl * 1000)))
        return sid

    def who(self, sid: str) -> str | None:
        value = self.redis.get(self.prefix + sid)
        # b"1": a session opened before sessions said who (an upgrade in place).
        return None if value is None else value[1:].decode() if value.startswith(b"=") else ""

    def close(self, sid: str) -> None:
        self.redis.delete(self.prefix + sid)


def same_secret(given: str, expected: str) -> bool:
    """Constant-time equality of two strings of any characters.

    ``hmac.compare_digest`` refuses non-ASCII str (``TypeError``): compare
    the UTF-8 bytes, so a forged "é" is simply wrong, not a 500."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def guest_view(event):
    """What a guest sees of the channel: everything but moderator notices."""
    return None if event.name == "mod" else event


def form_error(func, args: tuple, fields: dict) -> str | None:
    """Why these form fields cannot be *func*'s arguments, or None.

    CherryPy hands a field sent twice over as a list, and a stray field to
    a handler without it fails deep inside: say which field, as a 400."""
    for name, value in fields.items():
        if not isinstance(value, str):
            return f"the field {name!r} was sent more than once"
    try:
        inspect.signature(func).bind(*args, **fields)
    except TypeError:
        params = inspect.signature(func).parameters
        stray = sorted(set(fields) - set(params))
        return f"unexpected field {stray[0]!r}" if stray else "missing or unexpected form fields"
    return None


def json_action(action):
    """A POST-only JSON endpoint: bad form fields are a 400, Redis down a
    503, each with its reason in ``{"error": ...}`` for the page to show."""

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["POST"])
    @cherrypy.tools.json_out()
    @functools.wraps(action)
    def guarded(*args, **fields):
        problem = form_error(action, args, fields)
        if problem:
            return Shoutbox._fail(400, problem)
        try:
            return action(*args, **fields)
        except BackendUnavailable as exc:
            return Shoutbox._fail(503, str(exc), exc.retry_after)
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):  # the rate limiter's or the sessions' Redis
                return Shoutbox._fail(503, f"the shoutbox store is unreachable ({exc})", 2)
            raise

    return guarded


def form_page(handler):
    """An HTML form target: bad form fields are a 400 page with the reason."""

    @cherrypy.expose
    @functools.wraps(handler)
    def checked(*args, **fields):
        problem = form_error(handler, args, fields)
        if problem:
            raise cherrypy.HTTPError(400, problem)
        return handler(*args, **fields)

    return checked


class Shoutbox:
    def __init__(self, hub: Hub, mod_secret: str, rate: RateLimiter | None = None,
                 sessions: ModeratorSessions | None = None, behind_proxy: bool = False,
                 heartbeat: float = 15.0) -> None:
        self.hub = hub
        self.heartbeat = heartbeat  # the page's comet.js expects it before the stream says it
        self.mod_secret = mod_secret
        # From the secret, not random: every process must give a browser the same tag.
        self._tag_key = hashlib.sha256(b"comet-shoutbox-author:" + mod_secret.encode()).digest()
        self.rate = rate or RateLimiter()
        self.sessions = sessions or ModeratorSessions()
        self.behind_proxy = behind_proxy
        hub.snapshot(CHANNEL, self.snapshot)

    # -- identity ---------------------------------------------------------

    def client_ip(self) -> str:
        """The address the rate limit counts: the TCP peer, or behind a
        proxy on this host the address the proxy appended last (earlier
        entries of X-Forwarded-For are whatever the client sent)."""
        ip = cherrypy.request.remote.ip
        if self.behind_proxy and ipaddress.ip_address(ip).is_loopback:
            forwarded = cherrypy.request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
            try:
                return str(ipaddress.ip_address(forwarded))
            except ValueError:
                pass
        return ip

    def _csrf(self) -> str:
        cookie = cherrypy.request.cookie.get("csrf")
        if cookie and re.fullmatch(r"[A-Za-z0-9_-]{20,64}", cookie.value):
            return cookie.value
        token = secrets.token_urlsafe(24)
        out = cherrypy.response.cookie
        out["csrf"] = token
        out["csrf"]["path"] = "/"
        out["csrf"]["samesite"] = "Strict"
        out["csrf"]["httponly"] = True
        return token

    CSRF_REASON = "missing or wrong CSRF token: reload the page"

    def _csrf_ok(self, token: str | None) -> bool:
        cookie = cherrypy.request.cookie.get("csrf")
        return bool(token) and cookie is not None and same_secret(token, cookie.value)

    def _author_tag(self) -> str:
        """A short tag for this browser: anyone may call themselves "ann",
        but only this browser (its secret CSRF cookie) shows this tag."""
        cookie = cherrypy.request.cookie["csrf"].value
        return hmac.new(self._tag_key, cookie.encode(), hashlib.sha256).hexdigest()[:6]

    def _check_csrf(self, token: str | None) -> None:
        if not self._csrf_ok(token):
            raise cherrypy.HTTPError(403, self.CSRF_REASON)

    def _session(self) -> str | None:
        cookie = cherrypy.request.cookie.get("mod")
        # Only ids shaped like ours reach the store (no odd keys in Redis).
        return cookie.value if cookie is not None and SESSION_ID.fullmatch(cookie.value) else None

    def is_moderator(self) -> bool:
        sid = self._session()
        return sid is not None and self.sessions.valid(sid)

    # -- pages ------------------------------------------------------------

    def recent(self, count: int = 50) -> tuple[list[Event], str]:
        """The last *count* shouts not deleted, and the id of the newest
        event of any kind they reflect: the cursor to resume after."""
        events = self.hub.history(CHANNEL)
        cursor = events[-1].id if events else self.hub.last_id(CHANNEL)
        deleted = {e.data.get("target") for e in events if e.name == "delete" and isinstance(e.data, dict)}
        return [e for e in events if e.name == "shout" and e.id not in deleted][-count:], cursor

    def snapshot(self, channel: str) -> Event:
        """What a page that missed too much redraws (after a ``comet.gap``):
        the shouts a fresh render would show, exact at their cursor, and
        whether the server holds older ones (``more``): a shown shout older
        than these is then still on the server, not deleted."""
        shouts, cursor = self.recent(51)
        return Event({"shouts": [{"id": e.id, **e.data} for e in shouts[-50:]], "more": len(shouts) > 50}, id=cursor)

    @cherrypy.expose
    def index(self):
        shouts, cursor = self.recent()
        return templates.get_template("index.html").render(
            shouts=shouts, cursor=cursor, csrf=self._csrf(), moderator=self.is_moderator(), heartbeat=self.heartbeat,
            **self.pm.page(cursor))

    # The stream twice: SSE, and long-poll for a page behind a proxy that
    # holds streamed responses back (comet.js falls back to it: pollUrl).
    # Their heartbeat comes from the config (make_app's ``heartbeat``).

    @cherrypy.expose
    @cherrypy.tools.comet(transport="sse")
    def events(self, last_event_id=None):
        view = None if self.is_moderator() else guest_view
        # Parked on comet's writer thread once the headers are out (as it would be
        # with `yield from`): no server thread per open page.
        return self.hub.subscribe(CHANNEL, last_id=last_event_id, view=view)

    @cherrypy.expose
    @cherrypy.tools.comet(transport="longpoll")
    def poll(self, last_event_id=None):
        return self.events(last_event_id)  # the tool wraps the handler per request: this is the plain method

    @staticmethod
    def _fail(status: int, reason: str, retry_after: float | None = None) -> dict:
        cherrypy.response.status = status
        if retry_after is not None:
            cherrypy.response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return {"error": reason}

    @json_action
    def shout(self, nick: str = "", text: str = "", csrf: str = ""):
        if not self._csrf_ok(csrf):
            return self._fail(403, self.CSRF_REASON)
        nick, text = nick.strip(), text.strip()
        if not NICK.fullmatch(nick):
            return self._fail(400, "nickname must be 1-20 letters, digits, spaces, '-' or '_'")
        if not 1 <= len(text) <= 500:
            return self._fail(400, "a shout is 1 to 500 characters")
        wait = self.rate.allow(self.client_ip())
        if wait:
            # Rounded up: a retry at the stated second must succeed. Nothing
            # is published: a flood of refusals must not push shouts out of
            # the history.
            return self._fail(429, f"slow down: try again in {max(1, math.ceil(wait))} s", wait)
        event_id = self.hub.publish(CHANNEL, {"nick": nick, "tag": self._author_tag(), "text": text, "at": int(time.time())},
                                    event="shout")
        return {"id": event_id}

    @json_action
    def delete(self, id: str = "", csrf: str = ""):
        if not self._csrf_ok(csrf):
            return self._fail(403, self.CSRF_REASON)
        if not self.is_moderator():
            return self._fail(403, "only moderators can delete: log in again")
        target = next((e for e in self.hub.history(CHANNEL) if e.id == id and e.name == "shout"), None)
        if target is None:
            return self._fail(404, "no such shout (already deleted?)")
        self.hub.publish(CHANNEL, {"target": id}, event="delete")
        text = target.data["text"]
        quoted = text if len(text) <= 40 else text[:39] + "\u2026"
        self.hub.publish(CHANNEL, {"notice": f"deleted {target.data['nick']}'s shout \u201c{quoted}\u201d",
                                   "at": int(time.time())}, event="mod")
        return {"ok": True}

    @form_page
    def login(self, secret: str | None = None, csrf: str = ""):
        if cherrypy.request.method == "POST":
            self._check_csrf(csrf)
            if secret is not None and same_secret(secret, self.mod_secret):
                out = cherrypy.response.cookie
                out["mod"] = self.sessions.open()
                out["mod"]["path"] = "/"
                out["mod"]["httponly"] = True
                out["mod"]["samesite"] = "Strict"
                out["mod"]["max-age"] = int(self.sessions.ttl)
                raise cherrypy.HTTPRedirect("/", 303)
            cherrypy.response.status = 403
            return templates.get_template("login.html").render(csrf=self._csrf(), error="wrong secret")
        return templates.get_template("login.html").render(csrf=self._csrf(), error=None)

    @form_page
    @cherrypy.tools.allow(methods=["POST"])
    def logout(self, csrf: str = ""):
        self._check_csrf(csrf)
        sid = self._session()
        if sid is not None:
            self.sessions.close(sid)  # revoked: a copy of the cookie is worth nothing now
        cherrypy.response.cookie["mod"] = ""
        cherrypy.response.cookie["mod"]["path"] = "/"
        cherrypy.response.cookie["mod"]["max-age"] = 0
        raise cherrypy.HTTPRedirect("/", 303)


def parse_rate(text: str) -> tuple[int, float]:
    """``"5/10"``: 5 shouts per 10 seconds."""
    try:
        limit, window = text.split("/")
        limit, window = int(limit), float(window)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SHOUTS/SECONDS such as 5/10, got {text!r}") from None
    if limit < 1 or window <= 0:
        raise argparse.ArgumentTypeError(f"expected SHOUTS/SECONDS such as 5/10, got {text!r}")
    return limit, window


def error_page(status, message, traceback, version):
    """Every error page: the status and the reason, nothing else."""
    return templates.get_template("error.html").render(status=status, message=message)


def make_app(hub: Hub | None = None, *, mod_secret: str | None = None, rate: RateLimiter | None = None,
             sessions: ModeratorSessions | None = None, behind_proxy: bool = False, heartbeat: float = 15.0,
             stream_url_ttl: float = 60.0, stats_password: str | None = None, debug: bool = False, accounts=None):
    """The app and its config, for ``cherrypy.tree.mount`` or a test fixture.

    Production-safe by default: error pages show no Python traceback
    (server paths) and no handler signature unless ``debug`` (``--debug``),
    and without ``mod_secret`` a random one is made (``root.mod_secret``).
    ``accounts`` keeps the private messages' users and counts
    (:class:`examples.shoutbox.pm.Accounts`, in memory, by default).
    ``heartbeat`` is the longest silence of a stream, in seconds: a page
    notices a dead one in about twice that. A signed private-message stream
    URL opens streams for ``stream_url_ttl`` seconds (the page fetches a
    fresh one for every connect)."""
    from .pm import Accounts, PrivateMessages  # pm builds on this module: imported once it is loaded

    hub = hub or Hub(buffer_size=1000)
    config = {
        "/": {"request.show_tracebacks": debug, "request.show_mismatched_params": debug,
              "tools.comet.heartbeat": heartbeat, "tools.comet.poll_timeout": heartbeat,
              # In the app's look, with the reason and without CherryPy's version;
              # CherryPy's own page (with the traceback) under --debug.
              **({} if debug else {"error_page.default": error_page})},
        "/static": {"tools.staticdir.on": True, "tools.staticdir.dir": str(HERE / "static")},
        **static_config("/comet"),
    }
    root = Shoutbox(hub, mod_secret or secrets.token_urlsafe(12), rate, sessions, behind_proxy, heartbeat)
    # From the secret, not random: every process must accept the others' stream URLs.
    tokens = StreamTokens(hashlib.sha256(b"comet-shoutbox-streams:" + root.mod_secret.encode()).hexdigest(),
                          ttl=stream_url_ttl)
    root.pm = PrivateMessages(root, accounts or Accounts(), tokens)  # /pm/...: signed-in users' private threads
    # The live operations page, /comet/stats: behind a password when given
    # (deploy/nginx-comet.conf also keeps it to the proxy's own host).
    comet.stats.mount(root, password=stats_password, hubs=[hub])
    return root, config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="comet shoutbox")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--mod-secret", default=os.environ.get("COMET_MOD_SECRET") or None,
                        help="moderator password (default: $COMET_MOD_SECRET, else a random one, printed at start)")
    parser.add_argument("--mod-session", type=float, default=8 * 3600, metavar="SECONDS",
                        help="how long a moderator stays logged in (default: 8 hours)")
    parser.add_argument("--rate", type=parse_rate, default=(5, 10.0), metavar="SHOUTS/SECONDS",
                        help="shouts allowed per client address (default: 5/10)")
    parser.add_argument("--behind-proxy", action="store_true",
                        help="count clients by the X-Forwarded-For address a proxy on this host appends")
    parser.add_argument("--threads", type=int, default=120, help="server threads (parked streams hold none)")
    parser.add_argument("--backlog", type=int, default=BACKLOG, metavar="N",
                        help=f"listen backlog: connects a storm may queue before they are accepted (default: {BACKLOG}; "
                             "the kernel caps it at net.core.somaxconn)")
    parser.add_argument("--heartbeat", type=float, default=15.0, metavar="SECONDS",
                        help="longest silence of a stream; a page notices a dead one in about twice that (default: 15)")
    parser.add_argument("--stream-url-ttl", type=float, default=60.0, metavar="SECONDS",
                        help="how long a signed private-message stream URL opens streams (default: 60)")
    parser.add_argument("--redis", metavar="URL", help="share shouts and rate limits through Redis, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--stats-password", default=os.environ.get("COMET_STATS_PASSWORD") or None,
                        help="HTTP Basic password (user 'comet') for /comet/stats (default: $COMET_STATS_PASSWORD)")
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks on error pages (development only: they reveal server paths)")
    args = parser.parse_args(argv)
    if args.redis and not args.mod_secret:
        # A random secret per process would let a moderator in on one process only.
        parser.error("with --redis every process needs the same --mod-secret (or $COMET_MOD_SECRET)")
    hub = hub_from_url(args.redis, maxlen=1000) if args.redis else Hub(buffer_size=1000)
    limit, window = args.rate
    rate, sessions = RateLimiter(limit, window), ModeratorSessions(args.mod_session)
    accounts = None  # private messages' users: in this process
    if args.redis:
        from comet.backends import redis_client  # redis+sentinel:// URLs too

        client = redis_client(args.redis, socket_timeout=5, socket_connect_timeout=2)
        rate, sessions = RedisRateLimiter(client, limit, window), RedisModeratorSessions(client, args.mod_session)
        from .pm import RedisAccounts

        accounts = RedisAccounts(client, args.mod_session)
    app, config = make_app(hub, mod_secret=args.mod_secret, rate=rate, sessions=sessions, accounts=accounts,
                           behind_proxy=args.behind_proxy, heartbeat=args.heartbeat, stream_url_ttl=args.stream_url_ttl,
                           stats_password=args.stats_password, debug=args.debug)
    cherrypy.config.update({"server.socket_host": args.host, "server.socket_port": args.port,
                            "server.thread_pool": args.threads,
                            "server.socket_queue_size": args.backlog, "engine.autoreload.on": False})
    print(f"shoutbox on http://{args.host}:{args.port}/  (moderator login at /login)")
    if not args.mod_secret:
        print(f"moderator secret for this run: {app.mod_secret}  (choose one with --mod-secret or $COMET_MOD_SECRET)")
    try:
        cherrypy.quickstart(app, "/", config)
    finally:
        hub.close()


if __name__ == "__main__":
    main()
