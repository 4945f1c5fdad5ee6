"""One set of stream options, validated in one place.

``@comet(...)`` keywords, ``tools.comet.<name>`` config keys and the WSGI
adapter's keywords are the same names with the same defaults: all of them
build an :class:`Options`, and a bad value fails at construction, naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

from .framing import DEFAULT_MAX_EVENT_BYTES, FRAMINGS, TRANSPORTS, Framing, check_boundary

__all__ = ["Options"]

# An origin as browsers send it: scheme://host[:port], no path.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class Options:
    """How one endpoint streams.

    transport
        ``"sse"``, ``"multipart"``, ``"chunked"`` or ``"longpoll"``.
    heartbeat
        Seconds of silence after which keep-alive bytes are written (default
        15). Disconnected clients are noticed within this interval too.
    retry
        SSE only: milliseconds the browser waits before reconnecting, sent
        once at stream start (``None``: the browser's default).
    poll_timeout
        Long-poll only: seconds a request waits for its first event before
        answering with an empty batch (default 25, below common proxy
        timeouts of 30-60 s).
    max_duration
        Seconds after which a stream is ended cleanly so the client
        reconnects and resumes (``None``: never). Useful to recycle
        connections behind load balancers.
    boundary
        Multipart only: a fixed boundary; by default a random one per response.
    content_type
        Chunked only: the response type (default NDJSON).
    max_event_bytes
        Largest single item a stream will write; larger ones end the stream
        with an error logged rather than flood the socket.
    mode
        ``"auto"`` (default): a handler that returns a hub
        :class:`~comet.hub.Subscription` is *parked* on the writer thread once
        its headers are out, freeing the server thread; anything else, TLS
        connections and long-polls keep their thread. ``"thread"``: never park.
    cors_origins
        Origins (``"https://www.example.com"``) whose pages may follow the
        stream cross-origin, or ``"*"`` for any (default: none, same-origin
        only). An allowed ``Origin`` gets ``Access-Control-Allow-Origin``;
        a preflight ``OPTIONS`` is answered ``204`` with the methods and
        the headers it asked for.
    cors_credentials
        Let those pages send cookies and HTTP auth (``withCredentials`` in
        comet.js and EventSource); needs explicit ``cors_origins``, since
        browsers refuse ``*`` with credentials.

    >>> Options(transport="sse", heartbeat=5).heartbeat
    5
    >>> Options(transport="ws")
    Traceback (most recent call last):
    ...
    ValueError: transport must be one of ('sse', 'multipart', 'chunked', 'longpoll'), got 'ws'
    """

    transport: str = "sse"
    heartbeat: float = 15.0
    retry: int | None = None
    poll_timeout: float = 25.0
    max_duration: float | None = None
    boundary: str | None = None
    content_type: str | None = None
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    mode: str = "auto"
    cors_origins: tuple[str, ...] = ()
    cors_credentials: bool = False

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        _positive("heartbeat", self.heartbeat)
        _positive("poll_timeout", self.poll_timeout)
        _positive("max_duration", self.max_duration, allow_none=True)
        if self.retry is not None and (isinstance(self.retry, bool) or not isinstance(self.retry, int) or self.retry < 0):
            raise ValueError(f"retry must be a non-negative int of milliseconds, got {self.retry!r}")
        if self.boundary is not None:
            check_boundary(self.boundary)
        if self.content_type is not None and (not isinstance(self.content_type, str) or "\n" in self.content_type or "\r" in self.content_type):
            raise ValueError(f"content_type must be a header-safe str, got {self.content_type!r}")
        if self.mode not in ("auto", "thread"):
            raise ValueError(f"mode must be one of ('auto', 'thread'), got {self.mode!r}")
        if isinstance(self.max_event_bytes, bool) or not isinstance(self.max_event_bytes, int) or self.max_event_bytes <= 0:
            raise ValueError(f"max_event_bytes must be a positive int, got {self.max_event_bytes!r}")
        # A str is one origin (or "*"); config files give lists: stored as a
        # tuple, so options stay hashable and immutable.
        origins: Any = self.cors_origins
        origins = (origins,) if isinstance(origins, str) else tuple(origins) if isinstance(origins, Iterable) else origins
        if not isinstance(origins, tuple) or not all(isinstance(o, str) and (o == "*" or _ORIGIN.fullmatch(o)) for o in origins):
            raise ValueError(f"cors_origins must be '*' or origins like 'https://www.example.com' (no path), got {self.cors_origins!r}")
        object.__setattr__(self, "cors_origins", origins)
        if not isinstance(self.cors_credentials, bool):
            raise ValueError(f"cors_credentials must be True or False, got {self.cors_credentials!r}")
        if self.cors_credentials and (not origins or "*" in origins):
            raise ValueError("cors_credentials needs cors_origins naming the origins: browsers refuse '*' with credentials")

    def cors_headers(self, origin: str | None, method: str = "GET", request_headers: str | None = None) -> list[tuple[str, str]]:
        """The CORS response headers for a request from *origin* (its
        ``Origin`` header): none unless the origin is allowed. For a
        preflight (``OPTIONS``), the allowed methods and the
        *request_headers* it asked for (``Access-Control-Request-Headers``).

        >>> opts = Options(cors_origins=["https://www.example.com"], cors_credentials=True)
        >>> opts.cors_headers("https://www.example.com")  # doctest: +NORMALIZE_WHITESPACE
        [('Access-Control-Allow-Origin', 'https://www.example.com'), ('Vary', 'Origin'),
         ('Access-Control-Allow-Credentials', 'true'), ('Access-Control-Expose-Headers', 'Retry-After, Comet-Heartbeat')]
        >>> opts.cors_headers("https://evil.example")
        [('Vary', 'Origin')]
        """
        if not self.cors_origins:
            return []
        if "*" in self.cors_origins:
            headers = [("Access-Control-Allow-Origin", "*")]  # credentials are refused with "*" at construction
        elif origin in self.cors_origins:
            headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        else:
            return [("Vary", "Origin")]  # caches must not reuse an allowed origin's answer for this one
        if self.cors_credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        if method.upper() != "OPTIONS":
            # A 503's Retry-After, readable by comet.js's backoff; the
            # heartbeat its watchdog keeps to (comet.framing).
            headers.append(("Access-Control-Expose-Headers", "Retry-After, Comet-Heartbeat"))
            return headers
        headers += [("Access-Control-Allow-Methods", "GET, HEAD"), ("Access-Control-Max-Age", "600")]
        asked = [h.strip() for h in (request_headers or "").split(",") if _TOKEN.fullmatch(h.strip())]
        if asked:
            # Whatever a stream request carries (Last-Event-ID, Cache-Control):
            # a stream reads none but Last-Event-ID and Accept.
            headers.append(("Access-Control-Allow-Headers", ", ".join(asked)))
        return headers

    @property
    def framing(self) -> Framing:
        """How this endpoint's transport frames a stream."""
        return FRAMINGS[self.transport]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Options":
        """Build from config-style keys, rejecting unknown ones by name.

        >>> Options.from_mapping({"transport": "chunked", "heartbeat": 2}).transport
        'chunked'
        >>> Options.from_mapping({"hearbeat": 2})
        Traceback (most recent call last):
        ...
        TypeError: unknown comet option(s): hearbeat; known: transport, heartbeat, retry, poll_timeout, max_duration, boundary, content_type, max_event_bytes, mode, cors_origins, cors_credentials
        """
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"unknown comet option(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**values)
