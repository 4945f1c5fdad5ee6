"""Publishing over HTTP: another backend (a Django or PHP site, a cron job,
``curl``) posts events into a hub with an API key.

``publish_app(hub, keys=...)`` is a WSGI app; mount it in CherryPy with
``cherrypy.tree.graft(app, "/publish")`` or serve it under any WSGI server.

``POST /<channel>`` with ``Authorization: Bearer <key>`` and a JSON body:

- ``{"data": ..., "event": "name", "retry": 3000}`` (``event`` and ``retry``
  optional): one event;
- a JSON list of those: one batch, published all or nothing, in order.

Answers ``201 {"ids": [...]}``. Every refusal is plain text with the reason:
``401`` without a known key, ``403`` for a channel the key may not publish
to, ``405`` for another method, ``415`` for a body that is not
``application/json``, ``413`` for a body over ``max_body`` bytes or an event
over the hub's ``max_event_bytes``, ``400`` for anything else malformed,
``503`` (with ``Retry-After``) when the hub's backend is down. Never a 500
for bad input.

Example::

    import cherrypy
    from comet import Hub, publish_app

    hub = Hub()
    cherrypy.tree.graft(publish_app(hub, keys={"s3cret-key-for-the-shop-0001": ["orders:*"]}), "/publish")

    # curl -X POST http://127.0.0.1:8080/publish/orders:42 \\
    #      -H 'Authorization: Bearer s3cret-key-for-the-shop-0001' \\
    #      -H 'Content-Type: application/json' -d '{"data": {"status": "shipped"}, "event": "status"}'
"""
from __future__ import annotations

import fnmatch
import hmac
import json
import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import BackendUnavailable, InvalidEvent, UnserializableData
from .framing import Event
from .hub import Hub

__all__ = ["publish_app"]

log = logging.getLogger("comet")

#: Shortest key accepted: a key is a password that scripts send on every
#: request, so it must be long and random (``secrets.token_urlsafe(32)``).
MIN_KEY_LENGTH = 16

#: Most events one request may carry.
MAX_BATCH = 1000

#: Deepest nesting of an event's ``data`` (arrays and objects). Parsing and
#: encoding JSON recurse once per level, in this process (a RecursionError
#: past about 1,000 levels) and in every client that parses the event; no
#: real payload comes near 64 levels, so anything deeper is refused with a
#: 400 long before it could cost a stack.
MAX_DEPTH = 64

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Refusal(Exception):
    def __init__(self, status: str, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON *value* nests arrays and objects more than *limit* levels
    deep (without recursing: the value may be as deep as the parser allows)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [child for item in level if isinstance(item, (list, dict))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return any(isinstance(item, (list, dict)) for item in level)


def publish_app(hub: Hub, keys: Mapping[str, Sequence[str] | None] | Iterable[str], *,
                max_body: int = 1 << 20) -> WSGIApp:
    """A WSGI app that publishes ``POST /<channel>`` bodies into *hub*.

    *keys*: the API keys, as an iterable (each may publish anywhere) or a
    mapping of key to channel patterns (``fnmatch`` style: ``"orders:*"``;
    ``None`` for any channel). There is no default key: keys shorter than
    16 characters are refused, so a placeholder cannot go to production,
    and so are keys with characters other than printable ASCII (an
    ``Authorization`` header could never bring them as they are here).
    *max_body*: the largest request body read, in bytes.

    >>> app = publish_app(Hub(), keys={"k" * 32: ["room:*"]})
    >>> publish_app(Hub(), keys=["short"])
    Traceback (most recent call last):
    ...
    ValueError: every key must be a str of at least 16 characters
    """
    allowed: dict[bytes, list[str] | None] = {}
    pairs = keys.items() if isinstance(keys, Mapping) else ((key, None) for key in keys)
    for key, patterns in pairs:
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"every key must be a str of at least {MIN_KEY_LENGTH} characters")
        if not (key.isascii() and key.isprintable()) or key != key.strip():
            # A header carries it: anything else never arrives as configured.
            raise ValueError("every key must be printable ASCII without leading or trailing spaces "
                             "(secrets.token_urlsafe(32)), got a key with other characters")
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise ValueError(f"the channel patterns of a key must be a list of str, got {patterns!r}")
        allowed[key.encode()] = None if patterns is None else list(patterns)
    if not allowed:
        raise ValueError("publish_app needs at least one key")
    if not isinstance(max_body, int) or max_body < 1:
        raise ValueError(f"max_body must be a positive int, got {max_body!r}")

    def authorized(environ: dict[str, Any]) -> list[str] | None:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _Refusal("401 Unauthorized", "an API key is required: Authorization: Bearer <key>",
                           [("WWW-Authenticate", 'Bearer realm="comet publish"')])
        token = given.strip().encode("utf-8", "surrogateescape")
        found: list[str] | None = None
        known = False
        for key, patterns in allowed.items():  # every key compared, in constant time each
            if hmac.compare_digest(key, token):
                known, found = True, patterns
        if not known:
            raise _Refusal("401 Unauthorized", "unknown API key",
                           [("WWW-Authenticate", 'Bearer realm="comet publish", error="invalid_token"')])
        return found

    def read_body(environ: dict[str, Any]) -> Any:
        kind = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise _Refusal("415 Unsupported Media Type", "the body must be application/json")
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            if not length.isdigit():
                raise _Refusal("400 Bad Request", "malformed Content-Length")
            if int(length) > max_body:
                raise _Refusal("413 Content Too Large", f"the body is over {max_body} bytes")
            raw = environ["wsgi.input"].read(int(length))
        else:  # chunked or unsized: read no more than the limit allows
            raw = environ["wsgi.input"].read(max_body + 1)
            if len(raw) > max_body:
                raise _Refusal("413 Content Too Large", f"the body is over {max_body} bytes")
        try:
            return json.loads(raw.decode("utf-8"))
        except RecursionError:  # (the parser's own bound, far above MAX_DEPTH)
            raise _Refusal("400 Bad Request", f"the body is nested more than {MAX_DEPTH} levels deep") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Refusal("400 Bad Request", f"the body is not JSON: {exc}") from None

    def events_of(body: Any) -> list[Event]:
        items = body if isinstance(body, list) else [body]
        if not items:
            raise _Refusal("400 Bad Request", "an empty list publishes nothing")
        if len(items) > MAX_BATCH:
            raise _Refusal("413 Content Too Large", f"at most {MAX_BATCH} events per request")
        out = []
        for n, item in enumerate(items):
            where = f"event {n}: " if isinstance(body, list) else ""
            if not isinstance(item, dict) or "data" not in item:
                raise _Refusal("400 Bad Request", where + 'each event is an object with "data" (and optionally "event", "retry")')
            extra = sorted(set(item) - {"data", "event", "retry"})
            if extra:
                raise _Refusal("400 Bad Request", where + f"unknown field(s) {', '.join(extra)}")
            if _deeper_than(item["data"], MAX_DEPTH):
                raise _Refusal("400 Bad Request", where + f'"data" is nested more than {MAX_DEPTH} levels deep')
            name, retry = item.get("event"), item.get("retry")
            if name is not None and not isinstance(name, str):
                raise _Refusal("400 Bad Request", where + '"event" must be a string')
            if retry is not None and (not isinstance(retry, int) or isinstance(retry, bool)):
                raise _Refusal("400 Bad Request", where + '"retry" must be an integer of milliseconds')
            try:
                out.append(Event(item["data"], name=name, retry=retry))
            except (InvalidEvent, UnserializableData, ValueError, TypeError) as exc:
                raise _Refusal("400 Bad Request", where + str(exc)) from None
        return out

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            if environ.get("REQUEST_METHOD") != "POST":
                raise _Refusal("405 Method Not Allowed", "POST an event to /<channel>", [("Allow", "POST")])
            patterns = authorized(environ)
            raw_path = environ.get("PATH_INFO", "")
            try:  # PEP 3333 hands the path over as latin-1; the URL's bytes were UTF-8
                path = raw_path.encode("latin-1").decode("utf-8")
            except UnicodeError:
                raise _Refusal("400 Bad Request", "the channel name is not UTF-8") from None
            # The server has %-decoded the path already: decoding it again would
            # publish "pct%2541" to "pctA" (and let "%252F" smuggle a "/" in).
            channel = path.lstrip("/")
            if not channel or "/" in channel:
                raise _Refusal("400 Bad Request", "POST to /<channel>, one channel name without '/'")
            if patterns is not None and not any(fnmatch.fnmatchcase(channel, p) for p in patterns):
                raise _Refusal("403 Forbidden", f"this key may not publish to {channel!r}")
            events = events_of(read_body(environ))
            try:
                ids = hub.publish_many(channel, events)
            except (InvalidEvent, UnserializableData) as exc:
                too_big = "max_event_bytes" in str(exc)
                raise _Refusal("413 Content Too Large" if too_big else "400 Bad Request", str(exc)) from None
            except ValueError as exc:  # a channel name the hub refuses
                raise _Refusal("400 Bad Request", str(exc)) from None
            except BackendUnavailable as exc:
                log.warning("comet: publish over HTTP to %r failed: %s", channel, exc)
                raise _Refusal("503 Service Unavailable", "the event store is unavailable; try again",
                               [("Retry-After", "5")]) from None
        except _Refusal as refusal:
            body = (refusal.reason + "\n").encode("utf-8")
            start_response(refusal.status, [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                                             *refusal.headers])
            return [body]
        body = json.dumps({"ids": ids}).encode()
        start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                       ("Cache-Control", "no-store")])
        return [body]

    return app
