"""The lobby game's web side: pages, JSON actions, and one SSE stream per page.

    python -m examples.lobby_game [--host 127.0.0.1] [--port 8080] [--size 4] [--redis URL]
                                  [--openings 10] [--behind-proxy] [--debug]

With ``--redis redis://host:port/db`` the lobbies and their event channels
live in Redis, so any number of processes (behind nginx, say) serve the same
game: see docs/deployment.md.

Each page subscribes to ``/events/<lobby>?player=<token>``; the stream is the
player's presence (comet's: ``hub.subscribe(..., member=<name>)``; open =
online; closed for ``grace`` seconds = gone).
Actions are POSTs carrying the player's token, which the page keeps in
``sessionStorage``: one player per tab, so three tabs are three players.
The index page follows ``/updates``, one ``lobby`` event per change.

Only a join opens a lobby; ``GET /lobby/<name>`` of an empty one answers 404
with a page that offers to join, and of a malformed name (``Friday-Night``)
a 404 page that says what a lobby name may be and links to ``friday-night``.
Actions carry no cookie, so a forged cross-site form could act as nobody;
still, browsers' cross-site POSTs are refused (``Sec-Fetch-Site``, else
``Origin`` against ``Host``, as Go's ``http.CrossOriginProtection`` does),
so no other site opens lobbies through its visitors.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import ipaddress
import math
import os
from pathlib import Path
from urllib.parse import urlsplit

import cherrypy
import jinja2

import comet
import comet.stats
from comet import Event, Hub
from comet.cherrypy_tool import static_config
from comet.wsgi import BACKLOG

from comet.backends import hub_from_url

from ..ratelimit import RateLimiter
from .game import INDEX, GameError, Lobbies, RedisStore, check_lobby, lobby_like

HERE = Path(__file__).parent
templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)


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
        stray = sorted(set(fields) - set(inspect.signature(func).parameters))
        return f"unexpected field {stray[0]!r}" if stray else "missing or unexpected form fields"
    return None


def cross_site() -> bool:
    """A browser sent this request from another site (a forged form)."""
    headers = cherrypy.request.headers
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = headers.get("Origin")
    # Browsers too old for Sec-Fetch-Site send Origin on a POST; other
    # clients (curl, tests) send neither and are not a browser's victim.
    return origin is not None and urlsplit(origin).netloc != headers.get("Host")


def json_action(func):
    """POST-only JSON endpoint; a GameError becomes its status and reason,
    as does a cross-site request or a bad form field."""

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["POST"])
    @cherrypy.tools.json_out()
    @functools.wraps(func)
    def action(*args, **kwargs):
        if cross_site():
            cherrypy.response.status = 403
            return {"error": "cross-site request refused: use the lobby's own page"}
        problem = form_error(func, args, kwargs)
        if problem:
            cherrypy.response.status = 400
            return {"error": problem}
        try:
            return func(*args, **kwargs)
        except GameError as exc:
            cherrypy.response.status = exc.status
            return {"error": str(exc)}
        except comet.CometError as exc:  # e.g. BackendUnavailable: Redis is down
            if exc.http_status is None:
                raise
            cherrypy.response.status = exc.http_status
            return {"error": str(exc)}
        except cherrypy.HTTPError as exc:
            cherrypy.response.status = exc.status
            return {"error": exc._message}

    return action


class Openings(RateLimiter):
    """At most ``limit`` new lobbies per ``window`` seconds per client
    address (in this process): a join flood from one address cannot fill
    the store with seats nobody takes."""

    def __init__(self, limit: int = 10, window: float = 60.0) -> None:
        super().__init__(limit, window)


class LobbyApp:
    def __init__(self, hub: Hub, lobbies: Lobbies, openings: Openings | None = None,
                 behind_proxy: bool = False, heartbeat: float = 5.0) -> None:
        self.hub = hub
        self.heartbeat = heartbeat  # the pages' comet.js expects it before the stream says it
        self.lobbies = lobbies
        self.openings = openings or Openings()
        self.behind_proxy = behind_proxy
        # A page that missed states (its cursor left the buffer, or the lobby
        # was forgotten and opened anew) gets the whole state after the gap.
        hub.snapshot(lambda channel: channel.startswith("lobby:"), self._snapshot)

    def _snapshot(self, channel: str):
        """The lobby's state now. A state published while this reads comes
        again after it: whole versioned states, so harmless."""
        try:
            return self.lobbies.get(channel.removeprefix("lobby:")).state()
        except GameError:
            return None  # nobody is here: the gap alone; the page's reconnect hears the 404

    def client_ip(self) -> str:
        """The TCP peer, or behind a proxy on this host the address the
        proxy appended last to X-Forwarded-For (earlier entries are
        whatever the client sent)."""
        ip = cherrypy.request.remote.ip
        if self.behind_proxy and ipaddress.ip_address(ip).is_loopback:
            forwarded = cherrypy.request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
            try:
                return str(ipaddress.ip_address(forwarded))
            except ValueError:
                pass
        return ip

    def _lobby(self, name: str, create: bool = False):
        try:
            return self.lobbies.get(name, create=create)
        except GameError as exc:
            raise cherrypy.HTTPError(exc.status, str(exc)) from None

    @cherrypy.expose
    def index(self, lobby: str | None = None):
        if lobby is not None:  # the "go to lobby" form: a look, which opens nothing
            if not isinstance(lobby, str):
                raise cherrypy.HTTPError(400, "one lobby name, please")
            try:
                name = check_lobby(lobby.strip().lower())
            except GameError as exc:
                raise cherrypy.HTTPError(exc.status, str(exc)) from None
            raise cherrypy.HTTPRedirect(f"/lobby/{name}", 303)
        # The cursor before the list: a change in between arrives again
        # (whole summaries, so harmless), none is missed.
        cursor = self.hub.last_id(INDEX)
        return templates.get_template("index.html").render(lobbies=self.lobbies.summaries(), cursor=cursor,
                                                           size=self.lobbies.size, heartbeat=self.heartbeat)

    @cherrypy.expose
    def lobby(self, name: str):
        try:
            check_lobby(name)
        except GameError:
            # No lobby can live at a malformed name (404), but a person typed
            # it, maybe "Friday-Night": say what a name may be, and offer the
            # one they most likely meant.
            cherrypy.response.status = 404
            return templates.get_template("badname.html").render(name=name[:80], suggestion=lobby_like(name))
        # An empty lobby's page follows /updates from here to see it open.
        cursor = self.hub.last_id(INDEX)
        try:
            state = self.lobbies.get(name).state()
        except GameError as exc:
            if exc.status != 404:
                raise cherrypy.HTTPError(exc.status, str(exc)) from None
            # Nobody here: say so (404), and offer the join that opens it.
            cherrypy.response.status = 404
            state = self.lobbies.empty(name)
        return templates.get_template("lobby.html").render(state=state, cursor=cursor, heartbeat=self.heartbeat)

    # Each stream twice: SSE, and long-poll for a page behind a proxy that
    # holds streamed responses back (comet.js falls back to it: pollUrl).
    # Their heartbeat comes from the config (make_app's ``heartbeat``).

    @cherrypy.expose
    @cherrypy.tools.comet(transport="sse")
    def updates(self, last_event_id: str | None = None):
        """The index page's stream: one ``lobby`` event per change anywhere."""
        return self.hub.subscribe(INDEX, last_id=last_event_id)

    @cherrypy.expose
    @cherrypy.tools.comet(transport="longpoll")
    def updates_poll(self, last_event_id: str | None = None):
        return self.hub.subscribe(INDEX, last_id=last_event_id)

    @cherrypy.expose
    @cherrypy.tools.comet(transport="sse")
    def events(self, name: str, player: str | None = None, last_event_id: str | None = None):
        """A lobby page's stream: its ``state`` events, and the player's presence."""
        return self._follow(name, player, last_event_id)

    @cherrypy.expose
    @cherrypy.tools.comet(transport="longpoll")
    def poll(self, name: str, player: str | None = None, last_event_id: str | None = None):
        return self._follow(name, player, last_event_id)

    def _follow(self, name: str, player: str | None, last_event_id: str | None):
        lobby = self._lobby(name)
        try:
            me = lobby.player(player)
        except GameError as exc:
            raise cherrypy.HTTPError(exc.status, str(exc)) from None
        # Take the cursor before the snapshot: anything published in between
        # arrives again (whole states, so harmless), nothing is missed.
        cursor = last_event_id or self.hub.last_id(lobby.channel)
        snapshot = [] if last_event_id else [Event(lobby.state(viewer=me and me.name), name="state")]
        # This page's stream is the player's presence: their first one makes
        # the hub publish comet.join (and the lobby shows them online), their
        # last one closed for the grace period comet.leave (and the seat goes;
        # a long-poll's next request comes well within it).
        sub = self.hub.subscribe(lobby.channel, last_id=cursor, initial=snapshot, member=me and me.name)
        # comet parks the stream on its writer thread once the headers are out
        # (as it would with `yield from sub`), so an open lobby page costs a
        # socket, not a server thread.
        return sub

    @json_action
    def join(self, name: str, player: str = "", token: str | None = None):
        lobby = self._lobby(name, create=True)
        if self.lobbies.store.get(lobby.name) is None:  # this join opens it
            wait = self.openings.allow(self.client_ip())
            if wait:
                cherrypy.response.headers["Retry-After"] = str(math.ceil(wait))
                raise GameError(f"you opened {self.openings.limit} lobbies lately: join an open one, "
                                f"or open another in {math.ceil(wait)} s", 429)
        joined = lobby.join(player, token)
        return {"name": joined.name, "token": joined.token}

    @json_action
    def start(self, name: str, token: str = ""):
        self._lobby(name).start(token)
        return {"ok": True}

    @json_action
    def click(self, name: str, token: str = ""):
        return {"message": self._lobby(name).click(token)}

    @json_action
    def leave(self, name: str, token: str = ""):
        self._lobby(name).leave(token)
        return {"ok": True}


def error_page(status, message, traceback, version):
    """Every error page: the status and the reason, nothing else."""
    return templates.get_template("error.html").render(status=status, message=message)


def make_app(hub: Hub | None = None, *, size: int = 4, grace: float = 3.0, store=None,
             openings: Openings | None = None, behind_proxy: bool = False, heartbeat: float = 5.0,
             stats_password: str | None = None, debug: bool = False, **lobby_options):
    """The app and its config, for ``cherrypy.tree.mount`` or a test fixture.

    ``heartbeat`` is the longest silence of a stream, in seconds: a page
    whose stream is silent for about twice that takes it for dead and
    reconnects (and says "reconnecting", not "live"); a long-poll answers
    empty after as long. Short for a game: a player sees a dead connection
    within seconds.

    Error pages show no Python traceback (server paths) and no handler
    signature unless ``debug`` (``--debug``): production-safe by default.

    ``store`` holds the lobbies' state: a ``MemoryStore`` (default) or a
    ``RedisStore`` shared by every process of the game. ``grace`` becomes
    the hub's ``presence_grace``: how long a seat waits for its player's
    page to come back."""
    hub = hub or Hub()
    hub.presence_grace = grace
    lobbies = Lobbies(hub, size=size, grace=grace, store=store, **lobby_options)
    cherrypy.engine.subscribe("start", lobbies.start)
    cherrypy.engine.subscribe("stop", lobbies.close)
    config = {
        "/": {"request.show_tracebacks": debug, "request.show_mismatched_params": debug,
              "tools.comet.heartbeat": heartbeat, "tools.comet.poll_timeout": heartbeat,
              # In the app's look, with the reason and without CherryPy's version;
              # CherryPy's own page (with the traceback) under --debug.
              **({} if debug else {"error_page.default": error_page})},
        "/static": {"tools.staticdir.on": True, "tools.staticdir.dir": str(HERE / "static")},
        **static_config("/comet"),
    }
    root = LobbyApp(hub, lobbies, openings, behind_proxy, heartbeat)
    # The live operations page, /comet/stats: behind a password when given
    # (deploy/nginx-comet.conf also keeps it to the proxy's own host).
    comet.stats.mount(root, password=stats_password, hubs=[hub])
    return root, config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="comet lobby game")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--size", type=int, default=4, help="players per lobby (the game starts when full)")
    parser.add_argument("--grace", type=float, default=3.0, help="seconds a disconnected player keeps the seat")
    parser.add_argument("--countdown", type=int, default=3, help="countdown seconds before GO")
    parser.add_argument("--lease", type=float, default=6.0,
                        help="seconds after which a dead process's players go offline (with --redis)")
    parser.add_argument("--openings", type=int, default=10, metavar="N",
                        help="new lobbies one client address may open per minute (default: 10)")
    parser.add_argument("--behind-proxy", action="store_true",
                        help="count clients by the X-Forwarded-For address a proxy on this host appends")
    parser.add_argument("--threads", type=int, default=120, help="server threads (parked streams hold none)")
    parser.add_argument("--backlog", type=int, default=BACKLOG, metavar="N",
                        help=f"listen backlog: connects a storm may queue before they are accepted (default: {BACKLOG}; "
                             "the kernel caps it at net.core.somaxconn)")
    parser.add_argument("--heartbeat", type=float, default=5.0, metavar="SECONDS",
                        help="longest silence of a stream; a page notices a dead one in about twice that (default: 5)")
    parser.add_argument("--redis", metavar="URL", help="share lobbies and events through Redis, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--stats-password", default=os.environ.get("COMET_STATS_PASSWORD") or None,
                        help="HTTP Basic password (user 'comet') for /comet/stats (default: $COMET_STATS_PASSWORD)")
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks on error pages (development only: they reveal server paths)")
    args = parser.parse_args(argv)
    # A dead process's players count until its presence lease runs out (Redis).
    hub = hub_from_url(args.redis, presence_grace=args.grace, **({"presence_lease": args.lease} if args.redis else {}))
    store = RedisStore.from_url(args.redis) if args.redis else None
    app, config = make_app(hub, size=args.size, store=store, grace=args.grace, countdown=args.countdown,
                           openings=Openings(args.openings), behind_proxy=args.behind_proxy, heartbeat=args.heartbeat,
                           stats_password=args.stats_password, debug=args.debug)
    cherrypy.config.update({"server.socket_host": args.host, "server.socket_port": args.port,
                            "server.thread_pool": args.threads,
                            "server.socket_queue_size": args.backlog, "engine.autoreload.on": False})
    print(f"lobby game on http://{args.host}:{args.port}/")
    try:
        cherrypy.quickstart(app, "/", config)
    finally:
        hub.close()


if __name__ == "__main__":
    main()
