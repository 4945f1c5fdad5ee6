"""A small, elastic pool of threads that run generator handlers' steps.

The writer thread (``comet.writer``) never runs a handler's own code: it
could block (``time.sleep``, a database call) and stall every stream. It
submits *steps* here instead: run the generator until it waits on a hub,
ends, or has produced a batch.

The pool keeps ``core`` threads. A job submitted while no thread is idle
starts another one (up to ``limit``), so a step that blocks in its own code
keeps its thread, the stream it serves simply has a thread of its own for as
long as that lasts, and nobody else waits behind it. Threads beyond ``core``
exit after ``linger`` idle seconds.

With ``patience``, jobs submitted while every thread is busy wait for one,
unless a thread has been on its job for longer than that: then every job
waiting gets a thread of its own. A burst of short jobs (a connect storm)
is worked off by the threads there are instead of a thread each, which on
two cores costs more in switching than the jobs themselves; a job stuck in
a handler's own code is waited behind for about ``patience`` at most (up to
a second if nothing is submitted meanwhile: :meth:`nudge`).

>>> import threading
>>> pool, done = StepPool(core=1), threading.Event()
>>> pool.submit(done.set)
>>> done.wait(5)
True
>>> pool.stop()
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

__all__ = ["StepPool"]

log = logging.getLogger("comet")

Job = Callable[[], None]


class StepPool:
    """Threads for generator steps; see the module's introduction."""

    def __init__(self, core: int = 2, limit: int = 512, linger: float = 1.0, name: str = "comet-step",
                 patience: float = 0.0) -> None:
        if not isinstance(core, int) or core < 1 or not isinstance(limit, int) or limit < core:
            raise ValueError(f"need 1 <= core <= limit, got core={core!r}, limit={limit!r}")
        self.core = core
        self.limit = limit
        self.linger = linger
        self.name = name
        self.patience = patience
        self._busy_since: dict[threading.Thread, float] = {}
        self._starting = 0  # spawned, not yet waiting or working
        self._cond = threading.Condition(threading.Lock())
        self._jobs: collections.deque[Job] = collections.deque()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._stopping = False
        self._serial = 0
        with self._cond:
            for _ in range(core):  # the core threads live as long as the pool: a steady thread count
                self._spawn()

    @property
    def threads(self) -> int:
        """Threads alive now (busy or idle)."""
        return len(self._threads)

    def submit(self, job: Job) -> None:
        """Run ``job()`` on a pool thread soon; never blocks. After
        :meth:`stop`, jobs run at once on the caller's thread (so cleanup
        jobs are never lost)."""
        with self._cond:
            if not self._stopping:
                self._jobs.append(job)
                if self._idle > len(self._jobs) - 1:
                    self._cond.notify()
                elif not self.patience:
                    if len(self._threads) < self.limit:
                        self._spawn()
                elif self._stuck():
                    self._spawn_for_queue()
                return
        _run(job)  # invariant I14: stopping, the caller runs it

    def nudge(self) -> None:
        """With ``patience``: start a thread if jobs wait while every thread
        has been stuck for longer than that (called now and then by the
        writer: nobody else may submit anything for a while)."""
        with self._cond:
            if self._jobs and not self._stopping and self._stuck():
                self._spawn_for_queue()

    def _stuck(self) -> bool:
        # Caller holds the lock.
        since = time.monotonic() - self.patience
        return any(started < since for started in self._busy_since.values())

    def _spawn_for_queue(self) -> None:
        # Caller holds the lock: a thread for every job nobody is about to take.
        for _ in range(len(self._jobs) - self._idle - self._starting):
            if len(self._threads) >= self.limit:
                return
            self._spawn()

    def _spawn(self) -> None:
        # Caller holds the lock.
        self._serial += 1
        self._starting += 1
        thread = threading.Thread(target=self._work, name=f"{self.name}-{self._serial}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        cond = self._cond
        first = True
        while True:
            with cond:
                if first:
                    self._starting -= 1
                    first = False
                else:
                    self._busy_since.pop(me, None)  # (the job before is done)
                idle_since = time.monotonic()
                while not self._jobs:
                    if self._stopping:
                        self._threads.discard(me)
                        cond.notify_all()
                        return
                    if len(self._threads) > self.core and time.monotonic() - idle_since >= self.linger:
                        self._threads.discard(me)
                        return
                    self._idle += 1
                    cond.wait(self.linger)
                    self._idle -= 1
                job = self._jobs.popleft()
                if self.patience:
                    self._busy_since[me] = time.monotonic()
            _run(job)

    def stop(self, timeout: float = 1.0) -> None:
        """Run what is queued, then let the threads go; waits up to *timeout*
        for threads that are idle or finishing. A step still blocked in a
        handler's own code is left to finish on its (daemon) thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._jobs and time.monotonic() < deadline:
                self._cond.wait(0.05)
            leftover = list(self._jobs)
            self._jobs.clear()
        for job in leftover:  # threads are all busy in handlers' own code: run cleanup here
            _run(job)


def _run(job: Job) -> None:
    try:
        job()
    except Exception:
        log.exception("comet: a step job failed")
