"""A connection storm: many clients opening a stream at the same moment.

``storm(url, n)`` opens *n* connections at once from one asyncio loop
(plain or TLS), sends each a GET and waits, each against one deadline, for
its response head and the first bytes of its body: the moment a page's
stream is live. It returns a :class:`Storm` saying who got there, how
fast, and who did not (with why), so a test can assert on every client.
The connections stay open until :meth:`Storm.close`, so the server holds
*n* streams at once, as after a real storm.
"""
from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Storm:
    n: int
    opened: list[float] = field(default_factory=list)    # seconds from the storm's start to first body bytes
    failed: list[str] = field(default_factory=list)      # why, per client that did not get there
    statuses: dict[int, int] = field(default_factory=dict)
    first_bytes: list[bytes] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _thread: threading.Thread | None = None

    @property
    def all_open(self) -> bool:
        return len(self.opened) == self.n and not self.failed

    def summary(self) -> str:
        times = sorted(self.opened)
        p = (lambda q: f"{times[min(len(times) - 1, int(q * len(times)))]:.2f}s") if times else (lambda q: "-")
        why = sorted(set(self.failed))[:5]
        return (f"{len(times)}/{self.n} streaming (p50 {p(0.5)}, p99 {p(0.99)}, last {p(1.0)}); statuses {self.statuses}; "
                f"{len(self.failed)} failed: {why}")

    def close(self) -> None:
        """Close every connection and stop the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            async def shut() -> None:
                for writer in self._writers:
                    writer.close()
                loop.stop()
            asyncio.run_coroutine_threadsafe(shut(), loop)
        if self._thread is not None:
            self._thread.join(10)


def storm(url: str, n: int, *, deadline: float = 5.0, headers: dict[str, str] | None = None,
          cafile: str | None = None, source: str | None = None) -> Storm:
    """Open *n* streams on *url* at once; wait at most *deadline* seconds for
    each to send its head and first body bytes. The connections stay open (a
    thread keeps their loop running) until the result's ``close()``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(["http/1.1"])
    path = parts.path + ("?" + parts.query if parts.query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    result = Storm(n)
    ready = threading.Event()

    async def one(start: float) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                           local_addr=(source, 0) if source else None)
            result._writers.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status != 200:
                result.failed.append(f"status {status}")
                return
            first = await reader.read(4096)
            if not first:
                result.failed.append("closed before any body")
                return
            result.first_bytes.append(first)
            result.opened.append(time.monotonic() - start)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.failed.append(type(exc).__name__ + ": " + str(exc)[:80])

    async def main() -> None:
        start = time.monotonic()
        tasks = [asyncio.ensure_future(one(start)) for _ in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        result.failed.extend(["no stream within the deadline"] * len(pending))
        ready.set()

    def run() -> None:
        loop = result._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
            loop.run_forever()  # keep the streams open until close()
        finally:
            for writer in result._writers:
                writer.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            ready.set()

    result._thread = threading.Thread(target=run, name="storm", daemon=True)
    result._thread.start()
    if not ready.wait(deadline + 30):
        raise TimeoutError("the storm's loop did not finish")
    return result
