"""One set of stream options, validated in one place.

``@comet(...)`` keywords, ``tools.comet.<name>`` config keys and the WSGI
adapter's keywords are the same names with the same defaults: all of them
build an :class:`Options`, and a bad value fails at construction, naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .framing import DEFAULT_MAX_EVENT_BYTES, FRAMINGS, TRANSPORTS, Framing, check_boundary

__all__ = ["Options"]


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
        TypeError: unknown comet option(s): hearbeat; known: transport, heartbeat, retry, poll_timeout, max_duration, boundary, content_type, max_event_bytes, mode
        """
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"unknown comet option(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**values)
