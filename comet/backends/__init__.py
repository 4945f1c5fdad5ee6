"""Hub backends beyond the in-memory default.

:mod:`comet.backends.redis` holds :class:`~comet.backends.redis.RedisHub`;
it is imported only when asked for, so the embedded default needs no Redis.
"""
from __future__ import annotations

from typing import Any

from ..hub import Hub

__all__ = ["hub_from_url"]


def hub_from_url(url: str | None = None, **options: Any) -> Hub:
    """``RedisHub(url, **options)`` for a ``redis://``/``rediss://``/``unix://``
    URL, else the in-memory ``Hub(**options)``: what the examples' ``--redis``
    option does.

    >>> hub_from_url(None)
    <Hub epoch=... channels=0 subscriptions=0>
    """
    if not url:
        return Hub(**options)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    from .redis import RedisHub

    return RedisHub(url, **options)
