"""The shoutbox: live chat with history, moderation, and nothing lost.

    python -m examples.shoutbox [--host 127.0.0.1] [--port 8081] [--mod-secret S] [--redis URL] [--debug]

The page renders the last 50 shouts on the server and hands the id of the
newest event to the stream, which resumes exactly after it: no gap and no
duplicate between the page and the stream.

One channel, two views: guests and moderators subscribe to the same channel;
a per-subscriber ``view`` hides moderator notices from guests. A moderator's
delete publishes a ``delete`` event and every page removes the shout live.

No server-side sessions: a long-lived stream would hold CherryPy's session
lock and block the same browser's posts. CSRF uses a double-submit cookie
(the form field must match the cookie); moderators carry an HMAC-signed cookie.

Nothing lives only in one process, so ``--redis URL`` is all it takes to run
several behind a load balancer: shouts and deletions are events on the
(Redis) hub, deleted shouts are found from its history, the moderator
cookie's key derives from the moderator secret, and the rate limit counts in
Redis (:class:`RedisRateLimiter`).
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from pathlib import Path

import cherrypy
import jinja2

import comet.stats
from comet import BackendUnavailable, Hub, comet as stream
from comet.backends import hub_from_url
from comet.cherrypy_tool import static_config

HERE = Path(__file__).parent
templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
CHANNEL = "shouts"
NICK = re.compile(r"[^\W_][\w \-]{0,19}")


class RateLimiter:
    """At most ``limit`` actions per ``window`` seconds per client key."""

    def __init__(self, limit: int = 5, window: float = 10.0) -> None:
        self.limit, self.window = limit, window
        self._hits: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> float:
        """0 if allowed now (and counted), else seconds until it would be."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, collections.deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return hits[0] + self.window - now
            hits.append(now)
            if len(self._hits) > 10_000:  # forget idle clients
                self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - self.window}
            return 0.0


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


def same_secret(given: str, expected: str) -> bool:
    """Constant-time equality of two strings of any characters.

    ``hmac.compare_digest`` refuses non-ASCII str (``TypeError``): compare
    the UTF-8 bytes, so a forged "é" is simply wrong, not a 500."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def guest_view(event):
    """What a guest sees of the channel: everything but moderator notices."""
    return None if event.name == "mod" else event


def _unavailable_is_503(action):
    """Redis down: a 503 with the reason in JSON, not a 500 page."""

    @functools.wraps(action)
    def guarded(*args, **kwargs):
        try:
            return action(*args, **kwargs)
        except BackendUnavailable as exc:
            return Shoutbox._fail(503, str(exc), exc.retry_after)
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):  # the rate limiter's Redis
                return Shoutbox._fail(503, f"the shoutbox store is unreachable ({exc})", 2)
            raise

    return guarded


class Shoutbox:
    def __init__(self, hub: Hub, mod_secret: str, rate: RateLimiter | None = None) -> None:
        self.hub = hub
        self.mod_secret = mod_secret
        # From the secret, not random: every process must accept the cookie.
        self._key = hashlib.sha256(b"comet-shoutbox-moderator:" + mod_secret.encode()).digest()
        self.rate = rate or RateLimiter()

    # -- identity ---------------------------------------------------------

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

    def _check_csrf(self, token: str | None) -> None:
        if not self._csrf_ok(token):
            raise cherrypy.HTTPError(403, self.CSRF_REASON)

    def _mod_token(self) -> str:
        return hmac.new(self._key, b"moderator", hashlib.sha256).hexdigest()

    def is_moderator(self) -> bool:
        cookie = cherrypy.request.cookie.get("mod")
        return cookie is not None and same_secret(cookie.value, self._mod_token())

    # -- pages ------------------------------------------------------------

    @cherrypy.expose
    def index(self):
        events = self.hub.history(CHANNEL)
        # Resume after the newest event of any kind that this render saw.
        cursor = events[-1].id if events else self.hub.last_id(CHANNEL)
        deleted = {e.data.get("target") for e in events if e.name == "delete" and isinstance(e.data, dict)}
        shouts = [e for e in events if e.name == "shout" and e.id not in deleted][-50:]
        return templates.get_template("index.html").render(
            shouts=shouts, cursor=cursor, csrf=self._csrf(), moderator=self.is_moderator())

    @cherrypy.expose
    @stream(transport="sse")
    def events(self, last_event_id=None):
        view = None if self.is_moderator() else guest_view
        # Parked on comet's writer thread once the headers are out (as it would be
        # with `yield from`): no server thread per open page.
        return self.hub.subscribe(CHANNEL, last_id=last_event_id, view=view)

    @staticmethod
    def _fail(status: int, reason: str, retry_after: float | None = None) -> dict:
        cherrypy.response.status = status
        if retry_after is not None:
            cherrypy.response.headers["Retry-After"] = str(max(1, round(retry_after)))
        return {"error": reason}

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["POST"])
    @cherrypy.tools.json_out()
    @_unavailable_is_503
    def shout(self, nick: str = "", text: str = "", csrf: str = ""):
        if not self._csrf_ok(csrf):
            return self._fail(403, self.CSRF_REASON)
        nick, text = nick.strip(), text.strip()
        if not NICK.fullmatch(nick):
            return self._fail(400, "nickname must be 1-20 letters, digits, spaces, '-' or '_'")
        if not 1 <= len(text) <= 500:
            return self._fail(400, "a shout is 1 to 500 characters")
        client = f"{cherrypy.request.remote.ip}:{csrf}"
        wait = self.rate.allow(client)
        if wait:
            self.hub.publish(CHANNEL, {"notice": f"{nick} hit the rate limit"}, event="mod")
            return self._fail(429, f"slow down: try again in {max(1, round(wait))} s", wait)
        event_id = self.hub.publish(CHANNEL, {"nick": nick, "text": text, "at": int(time.time())}, event="shout")
        return {"id": event_id}

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["POST"])
    @cherrypy.tools.json_out()
    @_unavailable_is_503
    def delete(self, id: str = "", csrf: str = ""):
        if not self._csrf_ok(csrf):
            return self._fail(403, self.CSRF_REASON)
        if not self.is_moderator():
            return self._fail(403, "only moderators can delete")
        if not any(e.id == id and e.name == "shout" for e in self.hub.history(CHANNEL)):
            return self._fail(404, "no such shout")
        self.hub.publish(CHANNEL, {"target": id}, event="delete")
        self.hub.publish(CHANNEL, {"notice": f"deleted {id}"}, event="mod")
        return {"ok": True}

    @cherrypy.expose
    def login(self, secret: str | None = None, csrf: str = ""):
        if cherrypy.request.method == "POST":
            self._check_csrf(csrf)
            if secret is not None and same_secret(secret, self.mod_secret):
                out = cherrypy.response.cookie
                out["mod"] = self._mod_token()
                out["mod"]["path"] = "/"
                out["mod"]["httponly"] = True
                out["mod"]["samesite"] = "Strict"
                raise cherrypy.HTTPRedirect("/", 303)
            cherrypy.response.status = 403
            return templates.get_template("login.html").render(csrf=self._csrf(), error="wrong secret")
        return templates.get_template("login.html").render(csrf=self._csrf(), error=None)

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["POST"])
    def logout(self, csrf: str = ""):
        self._check_csrf(csrf)
        cherrypy.response.cookie["mod"] = ""
        cherrypy.response.cookie["mod"]["path"] = "/"
        cherrypy.response.cookie["mod"]["max-age"] = 0
        raise cherrypy.HTTPRedirect("/", 303)


def make_app(hub: Hub | None = None, *, mod_secret: str = "letmein", rate: RateLimiter | None = None,
             stats_password: str | None = None, debug: bool = False):
    """The app and its config, for ``cherrypy.tree.mount`` or a test fixture.

    Error pages show no Python traceback (server paths) and no handler
    signature unless ``debug`` (``--debug``): production-safe by default."""
    hub = hub or Hub(buffer_size=1000)
    config = {
        "/": {"request.show_tracebacks": debug, "request.show_mismatched_params": debug},
        "/static": {"tools.staticdir.on": True, "tools.staticdir.dir": str(HERE / "static")},
        **static_config("/comet"),
    }
    root = Shoutbox(hub, mod_secret, rate)
    # The live operations page, /comet/stats: behind a password when given
    # (deploy/nginx-comet.conf also keeps it to the proxy's own host).
    comet.stats.mount(root, password=stats_password, hubs=[hub])
    return root, config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="comet shoutbox")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--mod-secret", default="letmein", help="moderator password (default: letmein)")
    parser.add_argument("--threads", type=int, default=120, help="server threads (parked streams hold none)")
    parser.add_argument("--redis", metavar="URL", help="share shouts and rate limits through Redis, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--stats-password", default=os.environ.get("COMET_STATS_PASSWORD") or None,
                        help="HTTP Basic password (user 'comet') for /comet/stats (default: $COMET_STATS_PASSWORD)")
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks on error pages (development only: they reveal server paths)")
    args = parser.parse_args(argv)
    hub = hub_from_url(args.redis, maxlen=1000) if args.redis else Hub(buffer_size=1000)
    rate = None
    if args.redis:
        import redis

        rate = RedisRateLimiter(redis.Redis.from_url(args.redis, socket_timeout=5, socket_connect_timeout=2))
    app, config = make_app(hub, mod_secret=args.mod_secret, rate=rate, stats_password=args.stats_password, debug=args.debug)
    cherrypy.config.update({"server.socket_host": args.host, "server.socket_port": args.port,
                            "server.thread_pool": args.threads, "engine.autoreload.on": False})
    print(f"shoutbox on http://{args.host}:{args.port}/  (moderator login at /login)")
    try:
        cherrypy.quickstart(app, "/", config)
    finally:
        hub.close()


if __name__ == "__main__":
    main()
