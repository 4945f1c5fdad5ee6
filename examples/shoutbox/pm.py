"""Private messages in the shoutbox: threads between two signed-in users.

Signing in is by name and password, and deliberately simple for an example:
the first sign-in under a name claims it with the password given then; no
e-mail, no reset. The session is a random id in an HttpOnly cookie, kept by
the same store as the moderators' sessions (in memory, or in Redis with
``--redis``), so signing out revokes it on every process.

A thread is a channel, ``dm:<a>:<b>`` with the two names sorted. The page
follows the room, its threads, the signed-in user's own channel and who is
online on ONE stream (``/pm/events?dm=ann:bob,ann:cat&token=...``). The
stream URL is signed (:class:`comet.StreamTokens`) for that user and those
channels, and short-lived: the page's comet.js fetches a fresh one from
``/pm/url`` on every (re)connect (a URL function), so an expired token
costs nothing, and the stream itself needs no session. A stream may name
only threads its user is part of; any other is a ``403`` with the reason. ``user:<name>`` carries the notice that someone
opened a thread with that user; the page then follows the new thread too,
resubscribing from its cursor (``Last-Event-ID`` resumes every channel it
already followed; the new one starts now, and the page reads its last 100
messages from ``/pm/thread``, merging by message id: nothing lost, nothing
twice).

Counters (sent, received) and unread counts per thread live beside the
sessions (:class:`Accounts`, :class:`RedisAccounts`), so a reload shows them
and every process agrees. A message is published first and counted after:
a page rendered in between may count one message too few, never one twice.

Signing out ends the user's open streams at once (:meth:`PrivateMessages.end_streams`).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from typing import Any
from urllib.parse import urlencode

import cherrypy

from comet import Forbidden, StreamTokens
from comet.hub import MAX_CHANNELS, multi_cursor

from .app import CHANNEL, ModeratorSessions, RedisModeratorSessions, Shoutbox, form_page, guest_view, json_action, templates

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,19}")
#: The longest private message, in characters.
MAX_TEXT = 10_000
#: Messages of a thread a page gets when it opens the thread.
HISTORY = 100
#: The channel whose join and leave events say who is online.
ONLINE = "presence"
#: Threads one page follows: the stream's other channels are the room, the
#: user's own channel and the online list.
MAX_THREADS = MAX_CHANNELS - 3
_ITERATIONS = 50_000  # PBKDF2 rounds: an example, not a bank


def thread_channel(a: str, b: str) -> str:
    """``thread_channel("bob", "ann") == "dm:ann:bob"``: one channel per pair."""
    return "dm:" + ":".join(sorted((a, b)))


def inbox(name: str) -> str:
    """The user's own channel: notices of threads others open with them."""
    return "user:" + name


def _hash(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8", "surrogatepass"), salt, _ITERATIONS)
    return salt.hex() + "$" + digest.hex()


def _matches(stored: str, password: str) -> bool:
    salt, _, _ = stored.partition("$")
    return hmac.compare_digest(_hash(password, bytes.fromhex(salt)), stored)


class Accounts:
    """Names, sessions and private-message counts, in this process.

    Per user: ``sent``, ``received``, and ``t:<peer>`` = unread messages in
    the thread with *peer* (the field's presence says the thread exists)."""

    def __init__(self, sessions: ModeratorSessions | None = None) -> None:
        self.sessions = sessions or ModeratorSessions()
        self._passwords: dict[str, str] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def claim(self, name: str, password: str) -> bool:
        """May *password* sign in as *name*? The first sign-in claims the name."""
        fresh = _hash(password)
        with self._lock:
            stored = self._passwords.setdefault(name, fresh)
        return stored is fresh or _matches(stored, password)

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._passwords

    def delivered(self, sender: str, recipient: str) -> bool:
        """Count a message; True if the thread is new to *recipient*."""
        with self._lock:
            mine = self._counts.setdefault(sender, {})
            theirs = self._counts.setdefault(recipient, {})
            mine["sent"] = mine.get("sent", 0) + 1
            mine.setdefault("t:" + recipient, 0)
            theirs["received"] = theirs.get("received", 0) + 1
            new = "t:" + sender not in theirs
            theirs["t:" + sender] = theirs.get("t:" + sender, 0) + 1
        return new

    def read(self, name: str, peer: str) -> None:
        """*name* has read the thread with *peer*."""
        with self._lock:
            counts = self._counts.get(name, {})
            if "t:" + peer in counts:
                counts["t:" + peer] = 0

    def _fields(self, name: str) -> dict[str, int]:
        with self._lock:
            return dict(self._counts.get(name, {}))

    def summary(self, name: str) -> tuple[dict[str, int], dict[str, int]]:
        """(``{"sent", "received"}``, ``{peer: unread}``) of *name*."""
        fields = self._fields(name)
        counters = {"sent": fields.get("sent", 0), "received": fields.get("received", 0)}
        threads = {key[2:]: n for key, n in sorted(fields.items()) if key.startswith("t:")}
        return counters, threads


class RedisAccounts(Accounts):
    """The same in Redis, for every process: a password per name (``SET NX``
    claims it), a hash of counts per user, the sessions' keys."""

    def __init__(self, client: Any, ttl: float = 8 * 3600, prefix: str = "shoutbox:") -> None:
        super().__init__(RedisModeratorSessions(client, ttl, prefix=prefix + "user:"))
        self.redis, self.prefix = client, prefix

    def claim(self, name: str, password: str) -> bool:
        key = self.prefix + "password:" + name
        if self.redis.set(key, _hash(password), nx=True):
            return True
        stored = self.redis.get(key)
        return stored is not None and _matches(stored.decode(), password)

    def exists(self, name: str) -> bool:
        return bool(self.redis.exists(self.prefix + "password:" + name))

    def delivered(self, sender: str, recipient: str) -> bool:
        mine, theirs = self.prefix + "pm:" + sender, self.prefix + "pm:" + recipient
        pipe = self.redis.pipeline()  # MULTI/EXEC: the counts move together
        pipe.hincrby(mine, "sent", 1)
        pipe.hsetnx(mine, "t:" + recipient, 0)
        pipe.hincrby(theirs, "received", 1)
        pipe.hexists(theirs, "t:" + sender)
        pipe.hincrby(theirs, "t:" + sender, 1)
        return not pipe.execute()[3]

    def read(self, name: str, peer: str) -> None:
        key = self.prefix + "pm:" + name
        if self.redis.hexists(key, "t:" + peer):
            self.redis.hset(key, "t:" + peer, 0)

    def _fields(self, name: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.prefix + "pm:" + name).items()}


def _name(value: Any) -> str | None:
    """A user name as typed ("Ann ") in its one spelling ("ann"), or None."""
    if not isinstance(value, str):
        return None
    name = value.strip().lower()
    return name if NAME.fullmatch(name) else None


NAME_RULE = "a name is 1-20 letters a-z, digits, '-' or '_'"


class PrivateMessages:
    """The private-message pages and endpoints, mounted at ``/pm``."""

    def __init__(self, box: Shoutbox, accounts: Accounts, tokens: StreamTokens) -> None:
        self.box, self.accounts, self.tokens = box, accounts, tokens
        self.hub = box.hub

    # -- who is signed in ------------------------------------------------------

    def _sid(self) -> str | None:
        cookie = cherrypy.request.cookie.get("user")
        return cookie.value if cookie is not None and re.fullmatch(r"[A-Za-z0-9_\-]{43}", cookie.value) else None

    def user(self) -> str | None:
        """The signed-in user of this request, or None."""
        sid = self._sid()
        who = self.accounts.sessions.who(sid) if sid else None
        return who or None

    # -- the one place presence and sign-out reach the hub ---------------------

    def follow(self, me: str, channels: list[str], last_id: str | None, view: Any) -> Any:
        """*me*'s one stream on *channels*: while it is open, *me* is one of
        their members (``hub.members``), and joins and leaves are published
        on them (the page shows those of the presence channel)."""
        return self.hub.subscribe(channels, last_id=last_id, view=view, member=me)

    def online(self) -> list[str]:
        """Who is online now, for the page's first render."""
        return sorted(self.hub.members(ONLINE))

    def end_streams(self, me: str) -> None:
        """End every open stream of *me*, on every process."""
        self.hub.disconnect(member=me)

    # -- the page --------------------------------------------------------------

    def page(self, room_cursor: str) -> dict[str, Any]:
        """What index.html needs for a signed-in user (nothing for a guest):
        the threads, counts, and the stream's URL and cursor, which resumes
        the room after what the page rendered and every other channel from
        now."""
        me = self.user()
        if me is None:
            return {"user": None}
        counters, threads = self.accounts.summary(me)
        peers = list(threads)[:MAX_THREADS]
        channels = [ONLINE, inbox(me)] + [thread_channel(me, p) for p in peers]
        cursor = multi_cursor({CHANNEL: room_cursor, **{c: self.hub.last_id(c) for c in channels}})
        return {"user": me, "counters": counters, "threads": {p: threads[p] for p in peers},
                "online": self.online(), "pm_cursor": cursor, "max_text": MAX_TEXT}

    # -- the stream ------------------------------------------------------------

    def _channels(self, me: str, dm: Any) -> list[str]:
        """The channels of *me*'s stream with the ``dm`` threads
        (``ann:bob,ann:cat``), or a 400/403 saying what is wrong."""
        if not isinstance(dm, str):
            raise cherrypy.HTTPError(400, "the parameter 'dm' was sent more than once")
        threads = [t for t in dm.split(",") if t]
        if len(threads) > MAX_THREADS:
            raise cherrypy.HTTPError(400, f"a stream follows at most {MAX_THREADS} threads")
        channels = [CHANNEL, ONLINE, inbox(me)]
        for thread in threads:
            names = thread.split(":")
            if len(names) != 2 or not all(NAME.fullmatch(n) for n in names) or names[0] == names[1]:
                raise cherrypy.HTTPError(400, f"a thread is two different names joined by ':', got {thread[:80]!r}")
            if me not in names:
                raise Forbidden(f"you are not part of the thread {thread!r}")
            channel = thread_channel(*names)
            if channel not in channels:
                channels.append(channel)
        return channels

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def url(self, dm: Any = "") -> dict[str, Any]:
        """A freshly signed URL of the signed-in user's stream on the ``dm``
        threads: ``{"url": "/pm/events?...&token=...", "poll": "/pm/poll?..."}``.

        The page's comet.js asks for one on every (re)connect (a URL
        function), so the token in it may be short-lived: a URL that leaks
        opens nothing for long, and the stream checks it with no session."""
        me = self.user()
        if me is None:
            return Shoutbox._fail(403, "sign in to use private messages (your session may have ended)")
        try:
            channels = self._channels(me, dm)
        except cherrypy.HTTPError as exc:
            return Shoutbox._fail(exc.status, exc._message)
        except Forbidden as exc:
            return Shoutbox._fail(403, str(exc))
        cherrypy.response.headers["Cache-Control"] = "no-store"  # fresh each time, by design
        query = urlencode({**({"dm": dm} if dm else {}), "token": self.tokens.sign(me, channels)})
        return {"url": "/pm/events?" + query, "poll": "/pm/poll?" + query}

    @cherrypy.expose
    @cherrypy.tools.comet(transport="sse")
    def events(self, dm: Any = "", token: Any = "", last_event_id: str | None = None) -> Any:
        """The room, ``dm`` threads (``ann:bob,ann:cat``), the user's own
        channel and who is online, on one stream, for whoever the token
        (from :meth:`url`) was signed for."""
        return self._follow(dm, token, last_event_id)

    @cherrypy.expose
    @cherrypy.tools.comet(transport="longpoll")
    def poll(self, dm: Any = "", token: Any = "", last_event_id: str | None = None) -> Any:
        """The same by long-poll, for a page behind a proxy that holds streamed responses back."""
        return self._follow(dm, token, last_event_id)

    def _follow(self, dm: Any, token: Any, last_event_id: str | None) -> Any:
        if not isinstance(token, str):
            raise cherrypy.HTTPError(400, "the parameter 'token' was sent more than once")
        me = self.tokens.verify(token)  # genuine and unexpired, else a 403 saying which
        channels = self._channels(me, dm)
        for channel in channels:
            self.tokens.verify(token, channel=channel)
        return self.follow(me, channels, last_event_id, self._view(self.box.is_moderator()))

    @staticmethod
    def _view(moderator: bool) -> Any:
        """What the stream shows: the room as on ``/events`` (notices for
        moderators only), each shout with its own id, which the page deletes
        and marks shouts by (the event's id is the cursor of every channel)."""
        def view(event: Any) -> Any:
            if event.name == "shout":
                return {**event.data, "id": event.id}
            return event if moderator else guest_view(event)

        return view

    # -- actions ---------------------------------------------------------------

    @json_action
    def send(self, to: str = "", text: str = "", csrf: str = "") -> dict[str, Any]:
        """Post *text* to the thread of the signed-in user and *to*."""
        if not self.box._csrf_ok(csrf):
            return Shoutbox._fail(403, Shoutbox.CSRF_REASON)
        me = self.user()
        if me is None:
            return Shoutbox._fail(403, "sign in to send private messages")
        peer = _name(to)
        if peer is None:
            return Shoutbox._fail(400, NAME_RULE)
        if peer == me:
            return Shoutbox._fail(400, "a thread is with someone else")
        if not self.accounts.exists(peer):
            return Shoutbox._fail(404, f"nobody has signed in as {peer!r} yet")
        if not text.strip():
            return Shoutbox._fail(400, "the message is empty")
        if len(text) > MAX_TEXT:
            return Shoutbox._fail(400, f"a private message is at most {MAX_TEXT:,} characters; "
                                       f"this one has {len(text):,}")
        wait = self.box.rate.allow("pm " + self.box.client_ip())
        if wait:
            return Shoutbox._fail(429, f"slow down: try again in {max(1, math.ceil(wait))} s", wait)
        message = {"mid": secrets.token_hex(8), "from": me, "to": peer, "text": text, "at": round(time.time(), 3)}
        event_id = self.hub.publish(thread_channel(me, peer), message, event="pm")
        if self.accounts.delivered(me, peer):
            # After the message: the recipient's page follows the thread from
            # now, then reads its history, which holds this message.
            self.hub.publish(inbox(peer), {"peer": me}, event="thread")
        counters, _ = self.accounts.summary(me)
        return {"id": event_id, "mid": message["mid"], "counters": counters}

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def thread(self, peer: str = "") -> dict[str, Any]:
        """The last :data:`HISTORY` messages of the signed-in user's thread with *peer*."""
        me = self.user()
        if me is None:
            return Shoutbox._fail(403, "sign in to read private messages")
        other = _name(peer)
        if other is None or other == me:
            return Shoutbox._fail(400, NAME_RULE + ", and not your own")
        events = [e for e in self.hub.history(thread_channel(me, other)) if e.name == "pm"][-HISTORY:]
        counters, threads = self.accounts.summary(me)
        return {"peer": other, "messages": [e.data for e in events], "counters": counters,
                "unread": threads.get(other, 0)}

    @json_action
    def read(self, peer: str = "", csrf: str = "") -> dict[str, Any]:
        """The signed-in user has seen the thread with *peer*: no unread left."""
        if not self.box._csrf_ok(csrf):
            return Shoutbox._fail(403, Shoutbox.CSRF_REASON)
        me, other = self.user(), _name(peer)
        if me is None:
            return Shoutbox._fail(403, "sign in to read private messages")
        if other is None:
            return Shoutbox._fail(400, NAME_RULE)
        self.accounts.read(me, other)
        return {"ok": True}

    @form_page
    def signin(self, name: str | None = None, password: str | None = None, csrf: str = "") -> str:
        """Sign in by name; the first sign-in under a name claims it."""
        page = templates.get_template("signin.html")
        if cherrypy.request.method != "POST":
            return page.render(csrf=self.box._csrf(), error=None, name="")
        self.box._check_csrf(csrf)
        me = _name(name)
        error = None
        if me is None:
            error = NAME_RULE
        elif not password or len(password) > 200:
            error = "a password is 1 to 200 characters"
        elif not self.accounts.claim(me, password):
            error = f"{me!r} is taken and that is not its password"
        if error is not None:
            cherrypy.response.status = 400 if me is None or not password or len(password) > 200 else 403
            return page.render(csrf=self.box._csrf(), error=error, name=name or "")
        out = cherrypy.response.cookie
        out["user"] = self.accounts.sessions.open(me)
        out["user"]["path"] = "/"
        out["user"]["httponly"] = True
        out["user"]["samesite"] = "Strict"
        out["user"]["max-age"] = int(self.accounts.sessions.ttl)
        raise cherrypy.HTTPRedirect("/", 303)

    @form_page
    @cherrypy.tools.allow(methods=["POST"])
    def signout(self, csrf: str = "") -> None:
        """Sign out: the session is revoked and this user's streams end."""
        self.box._check_csrf(csrf)
        sid, me = self._sid(), self.user()
        if sid is not None:
            self.accounts.sessions.close(sid)
        if me is not None:
            self.end_streams(me)
        cherrypy.response.cookie["user"] = ""
        cherrypy.response.cookie["user"]["path"] = "/"
        cherrypy.response.cookie["user"]["max-age"] = 0
        raise cherrypy.HTTPRedirect("/", 303)
