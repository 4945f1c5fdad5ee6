"""Stream tokens: signed, expiring permission for one member to follow some
channels, carried in the stream URL (``?token=...``).

The page that renders a stream URL signs it; the stream checks it, with no
database lookup and no session, on any process that shares the secret::

    tokens = StreamTokens(os.environ["COMET_TOKEN_SECRET"])
    url = f"/dm/ann:bob/events?token={tokens.sign('ann', ['dm:ann:bob'], ttl=600)}"

    # a fast route:
    routes.add("/dm/{thread}/events", hub, "dm:{thread}", authorize=tokens.authorize("dm:{thread}"))
    # or a decorated handler:
    member = tokens.verify(token, channel=f"dm:{thread}")   # raises comet.Forbidden

A token is ``<payload>.<signature>``: the payload is base64url JSON
(``{"m": member, "c": [patterns], "x": expiry}``), the signature HMAC-SHA256
over it with the secret. It is not encrypted: the member and channels are
readable by whoever holds the URL, so put nothing secret in them.

Channel names are literal, patterns explicit: ``sign(member, channels,
patterns=[...])``. Names often carry what users chose (``dm:ann:<name>``),
and a name read as a pattern would cover other channels (a user called
``*``) or not its own (``room:[x]``). Both go into ``"c"`` as ``fnmatch``
patterns, a name escaped (``room:[[]x]``): tokens signed before names were
literal still mean what they meant, and every process reads every token
alike during an upgrade.
"""
from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import re
import time
from typing import Any, Callable, Iterable

from .errors import Forbidden

__all__ = ["StreamTokens", "redact_tokens"]

#: Shortest secret accepted, in bytes: a signing key, not a password.
MIN_SECRET_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


#: A query parameter whose name ends in "token" (``token``, ``access_token``,
#: ``streamToken``), and its value.
_TOKEN_PARAM = re.compile(r"([?&][^=&\s]*token=)[^&\s#]*", re.IGNORECASE)


def redact_tokens(target: str) -> str:
    """*target* (a URL, or a request line) with the value of every query
    parameter named ``token`` or ``..._token`` replaced by ``redacted``: what
    an access log may keep, since a log reader holding a token could open
    the stream.

    >>> redact_tokens("GET /dm?thread=a:b&token=eyJt.c2ln HTTP/1.1")
    'GET /dm?thread=a:b&token=redacted HTTP/1.1'
    """
    return _TOKEN_PARAM.sub(r"\1redacted", target)


def _literal(name: str) -> str:
    """The ``fnmatch`` pattern matching exactly *name*: each special
    character in a set of its own (``"[*]"`` matches only ``"*"``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class StreamTokens:
    """Sign and check stream tokens with *secret* (at least 16 bytes; there
    is no default). *ttl* is how long a token is valid, in seconds, unless
    :meth:`sign` says otherwise.

    >>> tokens = StreamTokens("a-secret-of-at-least-16-bytes")
    >>> token = tokens.sign("ann", ["dm:ann:bob"], patterns=["room:*"], ttl=60)
    >>> tokens.verify(token, channel="room:main")
    'ann'
    >>> tokens.verify(token, channel="dm:cat:dan")
    Traceback (most recent call last):
    ...
    comet.errors.Forbidden: this token does not cover channel 'dm:cat:dan'
    """

    def __init__(self, secret: str | bytes, *, ttl: float = 3600.0) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if not isinstance(key, bytes) or len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes (secrets.token_urlsafe(32))")
        if not isinstance(ttl, (int, float)) or ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        self._key = key
        self.ttl = float(ttl)

    def _signature(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def sign(self, member: str, channels: Iterable[str] = (), *, patterns: Iterable[str] = (),
             ttl: float | None = None) -> str:
        """A token letting *member* follow *channels* (exact names: ``*``,
        ``?`` and ``[`` are plain characters there) and every channel
        matching one of *patterns* (``fnmatch`` style: ``"room:*"``) for
        *ttl* seconds.

        >>> tokens = StreamTokens("a-secret-of-at-least-16-bytes")
        >>> token = tokens.sign("ann", ["room:[x]"])
        >>> tokens.verify(token, channel="room:[x]")
        'ann'
        >>> tokens.verify(token, channel="room:x")
        Traceback (most recent call last):
        ...
        comet.errors.Forbidden: this token does not cover channel 'room:x'
        """
        if isinstance(channels, str) or isinstance(patterns, str):
            raise ValueError("channels and patterns are lists of str, not one str")
        names, wanted = list(channels), list(patterns)
        if not isinstance(member, str) or not member:
            raise ValueError(f"member must be a non-empty str, got {member!r}")
        if not names + wanted or not all(isinstance(c, str) and c for c in names + wanted):
            raise ValueError(f"channels and patterns must be non-empty strs, at least one, got {names!r}, {wanted!r}")
        expiry = int(time.time() + (self.ttl if ttl is None else ttl))
        covered = [_literal(name) for name in names] + wanted
        payload = _b64(json.dumps({"m": member, "c": covered, "x": expiry}, separators=(",", ":")).encode())
        return f"{payload}.{self._signature(payload)}"

    def verify(self, token: str, channel: str | None = None) -> str:
        """The member *token* was signed for, if it is genuine, unexpired and
        (when *channel* is given) covers *channel*; else
        :class:`~comet.Forbidden` saying which."""
        if not isinstance(token, str) or not token:
            raise Forbidden("a stream token is required")
        payload, dot, signature = token.partition(".")
        try:
            genuine = dot and hmac.compare_digest(self._signature(payload), signature)
        except (UnicodeError, TypeError, ValueError):  # non-ASCII: not ours
            genuine = False
        if not genuine:
            raise Forbidden("invalid stream token")
        try:
            claims: Any = json.loads(_unb64(payload))
            member, channels, expiry = claims["m"], claims["c"], claims["x"]
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise Forbidden("invalid stream token") from None
        if time.time() > expiry:
            raise Forbidden("the stream token has expired: fetch a fresh stream URL")
        if channel is not None and not any(fnmatch.fnmatchcase(channel, c) for c in channels):
            raise Forbidden(f"this token does not cover channel {channel!r}")
        return str(member)

    def authorize(self, channel: str, param: str = "token") -> Callable[[Any], bool]:
        """A fast route's ``authorize`` callback: the token in the query's
        *param* must cover *channel* (a template, filled from the route's
        ``{params}`` like the route's own channel)."""
        def check(request: Any) -> bool:
            self.verify(request.query.get(param, ""), channel=channel.format(**request.params))
            return True

        return check
