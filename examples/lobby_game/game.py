"""The lobby game's rules, with no web framework in sight.

Players wait in a lobby. When it is full, or the host presses Start, everyone
sees the same countdown, then "GO!" after a short random pause; the first
click after GO wins. Every change publishes the lobby's whole state as one
``state`` event on the lobby's hub channel: small, and a client that missed
something is whole again with the next event.

Presence: each open stream of a player counts as a connection. When the last
one closes, the seat is kept for ``grace`` seconds so a reload or a network
blip does not cost it; after that the player leaves and everyone sees it.
"""
from __future__ import annotations

import random
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from comet import Hub

NAME = re.compile(r"[^\W_][\w \-]{0,19}")
LOBBY = re.compile(r"[a-z0-9][a-z0-9\-]{0,31}")


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


def check_lobby(name: str) -> str:
    if not isinstance(name, str) or not LOBBY.fullmatch(name):
        raise GameError("lobby names are 1-32 lowercase letters, digits or '-'", 400)
    return name


@dataclass
class Player:
    name: str
    token: str
    connections: int = 0
    left_timer: threading.Timer | None = field(default=None, repr=False)


class Lobby:
    """One lobby. Thread-safe: handlers, timers and stream cleanups call in."""

    def __init__(self, name: str, hub: Hub, size: int = 4, grace: float = 3.0, countdown: int = 3,
                 go_delay: tuple[float, float] = (0.5, 1.5)) -> None:
        self.name = name
        self.hub = hub
        self.size = size
        self.grace = grace
        self.countdown = countdown
        self.go_delay = go_delay
        self.channel = f"lobby:{name}"
        self._lock = threading.RLock()
        self._players: dict[str, Player] = {}
        self._timers: list[threading.Timer] = []
        self.phase = "waiting"
        self.count: int | None = None
        self.round = 0
        self._go_at: float | None = None
        self.winner: str | None = None
        self.reaction_ms: int | None = None
        self.false_starts: set[str] = set()
        self.closed = False

    # -- joining and leaving -------------------------------------------------

    def join(self, name: str, token: str | None = None) -> Player:
        """Take a seat, or get yours back with the token you were given."""
        name = check_name(name)
        with self._lock:
            player = self._players.get(name)
            if player is not None:
                if token and secrets.compare_digest(token, player.token):
                    return player  # a reconnect: same seat
                raise GameError(f"the name {name!r} is taken in this lobby")
            if self.phase != "waiting":
                raise GameError("a round is being played; join when it is over")
            if len(self._players) >= self.size:
                raise GameError(f"this lobby is full ({self.size} players)")
            player = Player(name, token or secrets.token_urlsafe(16))
            self._players[name] = player
            # A seat nobody ever connects to (the page never loaded) is given
            # up too; a stream that opens cancels this.
            player.left_timer = self._later(max(self.grace, 10.0), self._gone, player)
            self._publish()
            if len(self._players) == self.size:
                self._start_countdown()
            return player

    def player(self, token: str | None) -> Player | None:
        if not token:
            return None
        with self._lock:
            for player in self._players.values():
                if secrets.compare_digest(token, player.token):
                    return player
        return None

    def leave(self, token: str) -> None:
        with self._lock:
            player = self.player(token)
            if player is None:
                raise GameError("you are not in this lobby", 403)
            self._remove(player)

    def _remove(self, player: Player) -> None:
        if self._players.get(player.name) is not player:
            return
        if player.left_timer:
            player.left_timer.cancel()
        del self._players[player.name]
        if not self._players and self.phase != "waiting":
            self._reset()
        self._publish()

    def connected(self, player: Player) -> None:
        with self._lock:
            player.connections += 1
            if player.left_timer:
                player.left_timer.cancel()
                player.left_timer = None
            if player.connections == 1:
                self._publish()

    def disconnected(self, player: Player) -> None:
        with self._lock:
            player.connections -= 1
            if player.connections > 0 or self.closed:
                return
            self._publish()
            player.left_timer = self._later(self.grace, self._gone, player)

    def _gone(self, player: Player) -> None:
        with self._lock:
            if player.connections == 0:
                self._remove(player)

    # -- the round ---------------------------------------------------------------

    def start(self, token: str) -> None:
        with self._lock:
            player = self.player(token)
            if player is None:
                raise GameError("join the lobby first", 403)
            if player.name != self.host:
                raise GameError("only the host can start the game", 403)
            if self.phase == "finished":
                self._reset()
            elif self.phase != "waiting":
                raise GameError("the game has already started")
            self._start_countdown()

    def _start_countdown(self) -> None:
        self.round += 1
        self.phase, self.count = "countdown", self.countdown
        self.winner, self.reaction_ms, self.false_starts = None, None, set()
        self._publish()
        self._later(1.0, self._tick, self.round)

    def _tick(self, round_no: int) -> None:
        with self._lock:
            if self.round != round_no or self.phase != "countdown":
                return
            if self.count > 1:
                self.count -= 1
                self._publish()
                self._later(1.0, self._tick, round_no)
            else:
                self.count = 0
                self._publish()  # "get ready": the pause before GO is random
                self._later(random.uniform(*self.go_delay), self._go, round_no)

    def _go(self, round_no: int) -> None:
        with self._lock:
            if self.round != round_no or self.phase != "countdown":
                return
            self.phase, self._go_at = "go", time.monotonic()
            self._publish()

    def click(self, token: str) -> str:
        """A player clicked; returns what to tell them."""
        now = time.monotonic()
        with self._lock:
            player = self.player(token)
            if player is None:
                raise GameError("join the lobby first", 403)
            if self.phase == "countdown":
                if player.name not in self.false_starts:
                    self.false_starts.add(player.name)
                    self._publish()
                return "too early! you are out of this round"
            if self.phase == "go":
                if player.name in self.false_starts:
                    return "you jumped the gun this round"
                self.phase, self.winner = "finished", player.name
                self.reaction_ms = round((now - self._go_at) * 1000)
                self._publish()
                return "you win!"
            if self.phase == "finished":
                return "you win!" if self.winner == player.name else f"too late: {self.winner} won"
            return "the round has not started"

    def _reset(self) -> None:
        self.phase, self.count, self.winner, self.reaction_ms = "waiting", None, None, None
        self.false_starts = set()

    # -- state ---------------------------------------------------------------------

    @property
    def host(self) -> str | None:
        return next(iter(self._players), None)

    def state(self) -> dict:
        with self._lock:
            return {
                "lobby": self.name, "phase": self.phase, "count": self.count, "round": self.round,
                "size": self.size, "host": self.host, "winner": self.winner, "reaction_ms": self.reaction_ms,
                "false_starts": sorted(self.false_starts),
                "players": [{"name": p.name, "online": p.connections > 0} for p in self._players.values()],
            }

    def _publish(self) -> None:
        self.hub.publish(self.channel, self.state(), event="state")

    def _later(self, delay: float, func, *args) -> threading.Timer:
        timer = threading.Timer(delay, func, args)
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()]
            self._timers.append(timer)
        if not self.closed:
            timer.start()
        return timer

    def close(self) -> None:
        """Cancel every pending timer (engine stop)."""
        with self._lock:
            self.closed = True
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()


class Lobbies:
    """All lobbies of one server, created on first use."""

    def __init__(self, hub: Hub, size: int = 4, grace: float = 3.0, **lobby_options) -> None:
        self.hub = hub
        self.size = size
        self.grace = grace
        self.options = lobby_options
        self._lock = threading.Lock()
        self._lobbies: dict[str, Lobby] = {}

    def get(self, name: str, create: bool = True) -> Lobby:
        name = check_lobby(name)
        with self._lock:
            lobby = self._lobbies.get(name)
            if lobby is None:
                if not create:
                    raise GameError(f"no lobby named {name!r}", 404)
                if len(self._lobbies) >= 1000:
                    raise GameError("too many lobbies", 503)
                lobby = self._lobbies[name] = Lobby(name, self.hub, self.size, self.grace, **self.options)
            return lobby

    def all(self) -> list[Lobby]:
        with self._lock:
            return list(self._lobbies.values())

    def close(self) -> None:
        for lobby in self.all():
            lobby.close()
