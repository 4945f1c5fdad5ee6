"""The ``CometError`` family.

Each error also derives from the builtin a caller would naturally catch
(``ValueError``, ``TypeError``), so ``except ValueError`` keeps working.
Errors that describe bad HTTP input carry ``http_status``: the adapters turn
them into a 4xx response with the message as the reason, *before* the stream
starts, never from inside a running stream.
"""
from __future__ import annotations


class CometError(Exception):
    """Base class of every error comet raises on purpose."""

    #: HTTP status an adapter answers with when this error is raised while a
    #: request is being admitted or primed; ``None`` means "a server bug" (500).
    http_status: int | None = None


class InvalidEventId(CometError, ValueError):
    """A resume cursor (``Last-Event-ID`` or ``last_event_id``) is malformed
    or names an event this hub has not published yet."""

    http_status = 400


class InvalidEvent(CometError, ValueError):
    """An event name, id, channel or payload cannot be carried safely (CR/LF in
    a name, oversize payload, ...)."""

    http_status = 400


class UnserializableData(CometError, TypeError):
    """Published or yielded data is not JSON-serialisable (and is not ``str``
    or ``bytes``)."""


class Forbidden(CometError, PermissionError):
    """The request may not follow this stream: a fast route's ``authorize``
    callback refused it. Adapters answer ``403 Forbidden`` with the message.

    >>> def authorize(request):
    ...     if request.query.get("token") != "s3cret":
    ...         raise Forbidden("a valid token is needed for this room")
    ...     return True
    """

    http_status = 403


class StreamsExhausted(CometError):
    """Admission control refused a stream: the cap on open streams is reached.

    Adapters answer ``503 Service Unavailable`` with ``Retry-After``.
    """

    http_status = 503

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HubClosed(CometError, RuntimeError):
    """The hub was closed with :meth:`comet.Hub.close`; nothing can be
    published to it or subscribed from it any more."""

    http_status = 503


class BackendUnavailable(CometError, ConnectionError):
    """The shared backend (Redis) cannot be reached: a publish, or the first
    subscription to a channel in this process, failed. Nothing was stored
    twice: comet does not retry a publish (see :mod:`comet.backends.redis`).

    Adapters answer ``503 Service Unavailable`` with ``Retry-After``.
    """

    http_status = 503
    retry_after = 2
