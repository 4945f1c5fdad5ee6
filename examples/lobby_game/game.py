"""The lobby game's rules, with no web framework in sight.

Players wait in a lobby. When it is full, or the host presses Start, everyone
sees the same countdown, then "GO!" after a short random pause; the first
click after GO wins. Between rounds the lobby takes new players until the
host starts the next one; wins count across rounds.

A lobby exists only while someone sits in it: the first join opens it, the
last player to leave removes it. Looking (a page, a stream) creates nothing,
so anonymous requests cannot fill the store with empty lobbies.

Every change publishes the lobby's whole state as one ``state`` event on the
lobby's hub channel: small, and a client that missed something is whole
again with the next event. The index page gets a ``lobby`` summary of each
change on one more channel.

Presence is comet's (:mod:`comet.presence`): a player's page stream is
subscribed with ``member=<their name>``, so ``hub.members(channel)`` says who
is online, across processes. When a player's last stream closes, the hub
keeps them for its ``presence_grace`` seconds so a reload or a network blip
does not cost the seat; then it publishes ``comet.leave`` and tells the one
process that published it (``hub.on_presence``), which gives the seat up.

State lives in a *store*: :class:`MemoryStore` in this process (the
default), or :class:`RedisStore` so that several processes behind a load
balancer share every lobby: a player whose page streams from process A is
online for a player on process B, and a click on C can win. Every change is
one atomic read-modify-write of the lobby's state (a lock, or Redis
``WATCH``/``MULTI``) and carries a ``version``; pages ignore a state older
than the one they show, since two processes may publish in either order.
Timers (countdown, a seat nobody connects to) run in the process whose
action started them and re-check the stored state when they fire. If a
process dies, the hub's presence lease runs out and its players leave after
the usual grace (see :class:`~comet.backends.redis.RedisHub`'s
``presence_lease``). Times are wall-clock (``time.time()``), so machines
serving one lobby need synchronised clocks.
"""
from __future__ import annotations

import copy
import hmac
import json
import logging
import random
import re
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

from comet import Hub
from comet.presence import JOIN, LEAVE

log = logging.getLogger("lobby")
NAME = re.compile(r"[^\W_][\w \-]{0,19}")
LOBBY = re.compile(r"[a-z0-9][a-z0-9\-]{0,31}")
INDEX = "lobbies"  # the hub channel of the index page: one "lobby" event per change
TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,64}")  # secrets.token_urlsafe's alphabet


class GameError(ValueError):
    """A rule said no; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME.fullmatch(name):
        raise GameError("name must be 1-20 letters, digits, spaces, '-' or '_', starting with a letter or digit", 400)
    return name


def check_token(token: str | None) -> str | None:
    """A token as the server hands them out, or none: never one a client
    made up in other characters (it would be stored as a seat's key)."""
    if token and not (isinstance(token, str) and TOKEN.fullmatch(token)):
        raise GameError("malformed player token: join the lobby again", 400)
    return token


LOBBY_RULE = "lobby names are 1-32 lowercase letters, digits or '-'"


def check_lobby(name: str) -> str:
    if not isinstance(name, str) or not LOBBY.fullmatch(name):
        raise GameError(LOBBY_RULE, 400)
    return name


def lobby_like(name: str) -> str | None:
    """The well-formed lobby name a person most likely meant, or None:
    ``lobby_like("Friday Night") == "friday-night"``, ``lobby_like("Café") == "cafe"``,
    ``lobby_like("!!") is None``."""
    letters = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    guess = re.sub(r"[^a-z0-9]+", "-", letters.lower()).strip("-")
    return guess if LOBBY.fullmatch(guess) else None


@dataclass(frozen=True)
class Player:
    name: str
    token: str


#: change(state) -> (new state to save or None for "no change", result, announce?)
Change = Callable[[dict | None], tuple[dict | None, Any, bool]]


class MemoryStore:
    """Lobby states in this process. Announcing happens under the same lock
    as the change, so this process publishes states in commit order."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._states: dict[str, dict] = {}

    def get(self, name: str) -> dict | None:
        with self._lock:
            return copy.deepcopy(self._states.get(name))

    def update(self, name: str, change: Change, announce: Callable[[dict], None]) -> Any:
        with self._lock:
            new, result, loud = change(copy.deepcopy(self._states.get(name)))
            if new is not None:
                new["version"] += 1
                if new["players"]:
                    self._states[name] = new
                else:  # the last player left: the lobby is gone
                    self._states.pop(name, None)
                if loud:
                    announce(new)
            return result

    def names(self) -> list[str]:
        with self._lock:
            return list(self._states)

    def states(self) -> dict[str, dict]:
        with self._lock:
            return copy.deepcopy(self._states)


def _redis_errors(method):
    """Redis down is a 503 with a reason, like comet's own BackendUnavailable."""

    def call(self, *args, **kwargs):
        import redis

        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise GameError(f"the game store is unreachable ({exc})", 503) from exc

    return call


class RedisStore:
    """Lobby states in Redis, shared by every process: one JSON value per
    lobby, changed with optimistic ``WATCH``/``MULTI``/``EXEC`` (retried on a
    concurrent change, so ``change`` must be a pure function of the state)."""

    def __init__(self, client: Any, prefix: str = "lobby:") -> None:
        self.redis = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "lobby:") -> "RedisStore":
        from comet.backends import redis_client  # redis+sentinel:// URLs too

        return cls(redis_client(url, socket_timeout=5, socket_connect_timeout=2), prefix)

    @_redis_errors
    def get(self, name: str) -> dict | None:
        raw = self.redis.get(self.prefix + "state:" + name)
        return json.loads(raw) if raw else None

    @_redis_errors
    def update(self, name: str, change: Change, announce: Callable[[dict], None]) -> Any:
        import redis

        key = self.prefix + "state:" + name
        for _ in range(50):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    new, result, loud = change(json.loads(raw) if raw else None)
                    if new is None:
                        pipe.unwatch()
                        return result
                    new["version"] += 1
                    pipe.multi()
                    if new["players"]:
                        pipe.set(key, json.dumps(new))
                        pipe.sadd(self.prefix + "names", name)
                    else:  # the last player left: the lobby is gone
                        pipe.delete(key)
                        pipe.srem(self.prefix + "names", name)
                    pipe.execute()
                except redis.WatchError:
                    continue
            if loud:
                announce(new)
            return result
        raise GameError("the lobby is too busy right now, try again", 503)

    @_redis_errors
    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.redis.smembers(self.prefix + "names"))

    @_redis_errors
    def states(self) -> dict[str, dict]:
        names = self.names()
        raws = self.redis.mget([self.prefix + "state:" + n for n in names]) if names else []
        return {n: json.loads(raw) for n, raw in zip(names, raws) if raw}


def _fresh(name: str, size: int) -> dict:
    # Versions start from the clock (in µs) so that a lobby removed and opened
    # again goes on counting up: a page still showing the old one takes the
    # new one's states (it ignores versions lower than what it shows).
    return {"lobby": name, "phase": "waiting", "count": None, "round": 0, "size": size, "winner": None,
            "reaction_ms": None, "false_starts": [], "go_at": None, "players": [], "version": time.time_ns() // 1000}


def same_token(given: str, expected: str) -> bool:
    """Constant-time equality of two strings of any characters.

    ``hmac.compare_digest`` refuses non-ASCII str (``TypeError``): compare
    the UTF-8 bytes, so a forged "é" is simply wrong, not a 500."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def _find(state: dict, name: str | None = None, token: str | None = None) -> dict | None:
    for p in state["players"]:
        if name is not None and p["name"] == name:
            return p
        if token and same_token(token, p["token"]):
            return p
    return None


def summary(state: dict) -> dict:
    """A lobby as the index lists it; no players means it is gone."""
    return {"lobby": state["lobby"], "players": len(state["players"]), "size": state["size"],
            "phase": state["phase"], "version": state["version"]}


def public(state: dict, online: dict[str, int] | None = None) -> dict:
    """What every page sees: no tokens, no server clock. *online* is the
    lobby channel's members (a player in their grace period still counts)."""
    online = online or {}
    players = state["players"]
    return {
        "lobby": state["lobby"], "phase": state["phase"], "count": state["count"], "round": state["round"],
        "size": state["size"], "host": players[0]["name"] if players else None, "winner": state["winner"],
        "reaction_ms": state["reaction_ms"], "false_starts": sorted(state["false_starts"]),
        "players": [{"name": p["name"], "online": p["name"] in online} for p in players],
        "wins": {p["name"]: p.get("wins", 0) for p in players},  # rounds won since joining
        "version": state["version"],
    }


class Lobby:
    """One lobby: a handle on its stored state. Thread-safe, and
    process-safe with a :class:`RedisStore`."""

    def __init__(self, name: str, hub: Hub, store: MemoryStore | RedisStore | None = None, size: int = 4,
                 grace: float = 3.0, countdown: int = 3, go_delay: tuple[float, float] = (0.5, 1.5)) -> None:
        self.name = name
        self.hub = hub
        self.store = store if store is not None else MemoryStore()
        self.size = size
        self.grace = grace
        self.countdown = countdown
        self.go_delay = go_delay
        self.channel = f"lobby:{name}"
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self.closed = False

    def _update(self, change: Change, create: bool = False) -> Any:
        """Apply *change* to the stored state; only a join may *create* it."""
        def guarded(state: dict | None):
            if state is None:
                if not create:
                    raise GameError(f"nobody is in lobby {self.name!r}: join to open it", 404)
                state = _fresh(self.name, self.size)
            return change(state)

        return self.store.update(self.name, guarded, self._announce)

    def _quietly(self, change: Change, default: Any = None) -> Any:
        """For timers and presence: a lobby that is gone has nothing to do."""
        try:
            return self._update(change)
        except GameError as exc:
            if exc.status != 404:
                raise
            return default

    def _announce(self, state: dict) -> None:
        self.hub.publish(self.channel, public(state, self.online()), event="state")
        self.hub.publish(INDEX, summary(state), event="lobby")
        if not state["players"]:
            # The lobby is over: its channel goes too (open pages get this
            # last state, then their stream ends and they show the lobby as
            # not open). A lobby opened later under this name starts afresh.
            self.hub.forget(self.channel)

    # -- joining and leaving -------------------------------------------------

    def join(self, name: str, token: str | None = None) -> Player:
        """Take a seat, or get yours back with the token you were given."""
        name, token = check_name(name), check_token(token)
        new_token = token or secrets.token_urlsafe(16)

        def change(s):
            mine = _find(s, name=name)
            if mine is not None:
                if token and same_token(token, mine["token"]):
                    return None, (Player(name, mine["token"]), None), False  # a reconnect: same seat
                raise GameError(f"the name {name!r} is taken in this lobby")
            if s["phase"] not in ("waiting", "finished"):
                raise GameError("a round is being played: you can join as soon as it ends")
            if len(s["players"]) >= self.size:
                raise GameError(f"this lobby is full ({self.size} players)")
            s["players"].append({"name": name, "token": new_token, "wins": 0})
            # A full lobby starts the first round by itself; between rounds
            # the host says when (the newcomer may want a moment).
            full = len(s["players"]) == self.size and s["phase"] == "waiting"
            started = self._start_countdown(s) if full else None
            return s, (Player(name, new_token), started), True

        player, started = self._update(change, create=True)
        # A seat nobody ever connects to (the page never loaded) is given up
        # too; a stream that opens keeps it.
        self._later(max(self.grace, 10.0), self._gone, player)
        if started is not None:
            self._later(1.0, self._tick, started)
        return player

    def player(self, token: str | None) -> Player | None:
        if not check_token(token):
            return None
        state = self.store.get(self.name)
        mine = _find(state, token=token) if state else None
        return Player(mine["name"], mine["token"]) if mine else None

    def leave(self, token: str) -> None:
        def change(s):
            mine = _find(s, token=token)
            if mine is None:
                raise GameError("you are not in this lobby", 403)
            self._remove(s, mine)
            return s, None, True

        self._update(change)

    def _remove(self, s: dict, mine: dict) -> None:
        s["players"].remove(mine)
        if not s["players"] and s["phase"] != "waiting":
            self._reset(s)

    def online(self) -> dict[str, int]:
        """Who has this lobby's page open: the channel's members (comet's presence)."""
        try:
            return self.hub.members(self.channel)
        except Exception as exc:  # e.g. BackendUnavailable: say who is seated, if not who is online
            log.warning("lobby: presence of %r unknown: %s", self.name, exc)
            return {}

    def came(self, name: str) -> None:
        """*name*'s first page opened (``comet.join``): show them online."""
        def change(s):
            return (s, None, True) if _find(s, name=name) is not None else (None, None, False)

        self._quietly(change)

    def _gone(self, player: Player | str) -> None:
        """Give the seat up if its player has no page open (after the hub's
        grace period, or a seat nobody ever connected to)."""
        name = player if isinstance(player, str) else player.name

        def change(s):
            mine = _find(s, name=name)
            if mine is None or name in self.online():
                return None, None, False
            self._remove(s, mine)
            return s, None, True

        self._quietly(change)

    # -- the round ---------------------------------------------------------------

    def start(self, token: str) -> None:
        def change(s):
            mine = _find(s, token=token)
            if mine is None:
                raise GameError("join the lobby first", 403)
            if mine is not s["players"][0]:
                raise GameError("only the host can start the game", 403)
            if s["phase"] == "finished":
                self._reset(s)
            elif s["phase"] != "waiting":
                raise GameError("the game has already started")
            return s, self._start_countdown(s), True

        round_no = self._update(change)
        self._later(1.0, self._tick, round_no)

    def _start_countdown(self, s: dict) -> int:
        s["round"] += 1
        s["phase"], s["count"] = "countdown", self.countdown
        s["winner"], s["reaction_ms"], s["false_starts"], s["go_at"] = None, None, [], None
        return s["round"]

    def _tick(self, round_no: int) -> None:
        def change(s):
            if s["round"] != round_no or s["phase"] != "countdown":
                return None, None, False
            if s["count"] > 1:
                s["count"] -= 1
                return s, "tick", True
            s["count"] = 0  # "get ready": the pause before GO is random
            return s, "go", True

        next_step = self._quietly(change)
        if next_step == "tick":
            self._later(1.0, self._tick, round_no)
        elif next_step == "go":
            self._later(random.uniform(*self.go_delay), self._go, round_no)

    def _go(self, round_no: int) -> None:
        def change(s):
            if s["round"] != round_no or s["phase"] != "countdown":
                return None, None, False
            s["phase"], s["go_at"] = "go", time.time()
            return s, None, True

        self._quietly(change)

    def click(self, token: str) -> str:
        """A player clicked; returns what to tell them."""
        now = time.time()

        def change(s):
            mine = _find(s, token=token)
            if mine is None:
                raise GameError("join the lobby first", 403)
            name = mine["name"]
            if s["phase"] == "countdown":
                if name in s["false_starts"]:
                    return None, "too early! you are out of this round", False
                s["false_starts"].append(name)
                return s, "too early! you are out of this round", True
            if s["phase"] == "go":
                if name in s["false_starts"]:
                    return None, "you jumped the gun this round", False
                s["phase"], s["winner"] = "finished", name
                mine["wins"] = mine.get("wins", 0) + 1
                s["reaction_ms"] = max(0, round((now - s["go_at"]) * 1000))
                return s, "you win!", True
            if s["phase"] == "finished":
                return None, "you win!" if s["winner"] == name else f"too late: {s['winner']} won", False
            return None, "the round has not started", False

        return self._update(change)

    @staticmethod
    def _reset(s: dict) -> None:
        s["phase"], s["count"], s["winner"], s["reaction_ms"], s["go_at"] = "waiting", None, None, None, None
        s["false_starts"] = []

    # -- state ---------------------------------------------------------------------

    @property
    def host(self) -> str | None:
        return self.state()["host"]

    def state(self, viewer: str | None = None) -> dict:
        """The public state, as pages see it (an empty lobby if it is gone);
        *viewer*, whose page is opening, counts as online."""
        online = self.online()
        if viewer is not None:
            online[viewer] = online.get(viewer, 0) + 1
        return public(self.store.get(self.name) or _fresh(self.name, self.size), online)

    def _later(self, delay: float, func, *args) -> threading.Timer:
        timer = threading.Timer(delay, func, args)
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()]
            self._timers.append(timer)
            if not self.closed:
                timer.start()
        return timer

    def busy(self) -> bool:
        """A timer is pending."""
        with self._lock:
            return any(t.is_alive() for t in self._timers)

    def open(self) -> None:
        """Accept timers again (engine start after a stop)."""
        with self._lock:
            self.closed = False

    def close(self) -> None:
        """Cancel every pending timer (engine stop)."""
        with self._lock:
            self.closed = True
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()


class Lobbies:
    """Handles on every lobby in the store, created on first use."""

    MAX_LOBBIES = 1000

    def __init__(self, hub: Hub, size: int = 4, grace: float = 3.0, store: MemoryStore | RedisStore | None = None,
                 **lobby_options) -> None:
        self.hub = hub
        self.size = size
        self.grace = grace
        self.store = store if store is not None else MemoryStore()
        self.options = lobby_options
        self._lock = threading.Lock()
        self._lobbies: dict[str, Lobby] = {}
        self._stopped = False
        self._unwatch = hub.on_presence(self._presence)

    def get(self, name: str, create: bool = False) -> Lobby:
        """The lobby called *name*: 404 if nobody is in it, unless *create*
        (a join, which then opens it)."""
        name = check_lobby(name)
        exists = self.store.get(name) is not None
        if not exists:
            if not create:
                raise GameError(f"nobody is in lobby {name!r}: join to open it", 404)
            if len(self.store.names()) >= self.MAX_LOBBIES:
                raise GameError("too many lobbies: try again later", 503)
        with self._lock:
            lobby = self._lobbies.get(name)
            if lobby is None:
                if len(self._lobbies) >= 2 * self.MAX_LOBBIES:
                    self._forget_idle()
                lobby = self._lobbies[name] = Lobby(name, self.hub, self.store, self.size, self.grace, **self.options)
                if self._stopped:
                    lobby.close()
        return lobby

    def _forget_idle(self) -> None:
        """Drop handles on lobbies that are gone and wait for no timer
        (joins under many names must not grow this process for ever)."""
        live = set(self.store.names())
        for name, lobby in list(self._lobbies.items()):
            if name not in live and not lobby.busy():
                del self._lobbies[name]

    def empty(self, name: str) -> dict:
        """The public state of a lobby nobody is in (opens nothing)."""
        return public(_fresh(check_lobby(name), self.size))

    def summaries(self) -> list[dict]:
        """Every open lobby, as the index lists it."""
        return sorted((summary(s) for s in self.store.states().values()), key=lambda s: s["lobby"])

    # -- presence ------------------------------------------------------------

    def _presence(self, channel: str, event: str, member: str) -> None:
        """The hub published a join or leave on a lobby's channel, here."""
        if not channel.startswith("lobby:"):
            return
        try:
            lobby = self.get(channel[len("lobby:"):])
        except GameError:
            return  # gone meanwhile, or not a lobby's name
        if event == JOIN:
            lobby.came(member)
        elif event == LEAVE:
            lobby._gone(member)

    # -- engine start and stop ---------------------------------------------------

    def start(self) -> None:
        """Accept timers again (engine start after a stop)."""
        with self._lock:
            self._stopped = False
            lobbies = list(self._lobbies.values())
        for lobby in lobbies:
            lobby.open()

    def close(self) -> None:
        """Cancel every pending timer (engine stop)."""
        with self._lock:
            self._stopped = True
            lobbies = list(self._lobbies.values())
        for lobby in lobbies:
            lobby.close()
