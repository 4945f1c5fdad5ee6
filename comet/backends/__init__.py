"""Hub backends beyond the in-memory default.

:mod:`comet.backends.redis` holds :class:`~comet.backends.redis.RedisHub`;
it is imported only when asked for, so the embedded default needs no Redis.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..hub import Hub

if TYPE_CHECKING:
    import redis

__all__ = ["hub_from_url", "redis_client"]


def hub_from_url(url: str | None = None, **options: Any) -> Hub:
    """``RedisHub(url, **options)`` for a ``redis://``/``rediss://``/``unix://``
    URL (or ``redis+sentinel://``, ``redis+cluster://h1:p1,h2:p2,h3:p3``), else the in-memory ``Hub(**options)``: what the examples' ``--redis``
    option does.

    >>> hub_from_url(None)
    <Hub epoch=... channels=0 subscriptions=0>
    """
    if not url:
        return Hub(**options)
    if not url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")):
        raise ValueError(f"expected a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL, got {url!r}")
    from .redis import RedisHub

    return RedisHub(url, **options)


def redis_client(url: str, **options: Any) -> "redis.Redis":
    """A redis-py client for any Redis URL :func:`hub_from_url` takes,
    ``redis+sentinel://h1:p1,h2:p2,h3:p3/<service>[/db]`` included (the
    master Sentinel names, followed through failovers) and
    ``redis+cluster://h1:p1,h2:p2`` (a :class:`redis.cluster.RedisCluster`,
    which has the same commands, routed by key): for an app's own
    keys beside the hub (a rate limit, a game's state). *options* go to
    redis-py (``socket_timeout=5``, ...).

    Example::

        store = redis_client("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/comet", socket_timeout=5)
        store.incr("visits")
    """
    from .redis_link import client_for

    return client_for(url, options)
