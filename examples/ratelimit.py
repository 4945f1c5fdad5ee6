"""The in-process rate limit both examples use: a sliding window of hits per
client key (the shoutbox's posts, the lobby's openings)."""
from __future__ import annotations

import collections
import threading
import time


class RateLimiter:
    """At most ``limit`` actions per ``window`` seconds per client key."""

    def __init__(self, limit: int = 5, window: float = 10.0) -> None:
        self.limit, self.window = limit, window
        self._hits: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> float:
        """0 if allowed now (and counted), else seconds until it would be."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, collections.deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return hits[0] + self.window - now
            hits.append(now)
            if len(self._hits) > 10_000:  # forget idle clients
                self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - self.window}
            return 0.0
