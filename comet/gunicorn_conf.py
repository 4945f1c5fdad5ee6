"""A gunicorn configuration for comet apps: ``gunicorn -c
python:comet.gunicorn_conf app:app`` (or ``from comet.gunicorn_conf import
*`` in your own ``gunicorn.conf.py``).

gunicorn's default worker (``sync``) serves one request at a time per
process, so one open stream would hold it until ``WORKER TIMEOUT``; this
configuration uses the ``gthread`` worker, where each stream holds one of
``threads`` threads. Its :func:`post_worker_init` tells comet that number
(a :func:`comet.wsgi.comet_app` then caps its streams below it, so pages
keep being served) and makes ``SIGTERM`` end every stream at once: gunicorn
alone would wait up to ``graceful_timeout`` (30 s) for them.

With more than one worker process, publish through
:class:`~comet.backends.redis.RedisHub`: an in-memory hub's events stay in
the process that published them.

Example ``gunicorn.conf.py``::

    from comet.gunicorn_conf import *   # gthread, and the hook below
    threads = 32
"""
from __future__ import annotations

import signal
import threading
from typing import Any

from . import wsgi

__all__ = ["worker_class", "threads", "post_worker_init"]

worker_class = "gthread"
threads = 8


def post_worker_init(worker: Any) -> None:
    """gunicorn's hook, in each worker process once the app is loaded: tell
    comet the worker's thread count, and end every comet stream when the
    worker is told to stop (``SIGTERM``), after gunicorn's own handler."""
    wsgi.tell_threads(int(worker.cfg.threads))
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        # Not in the signal handler itself: close_all takes locks that the
        # interrupted code might hold.
        threading.Thread(target=wsgi.close_all, name="comet-sigterm", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
