"""Shared test helpers.

``RawStream`` speaks HTTP/1.1 over a bare socket and decodes chunked framing
itself, so wire-format tests do not depend on comet.testing's parsers.
The ``comet_cherrypy`` / ``comet_wsgi`` / ``comet_redis`` fixtures come from
comet's pytest plugin (``comet_pytest``, registered when comet is
installed), the same ones users get.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import cherrypy
import pytest

from comet import Event, Hub, Part, comet


class RawStream:
    """GET over a raw socket; read the status, headers, then chunks.

    Every read (the head, one chunk, the body) must complete within
    ``timeout`` seconds in all, however the server trickles or keeps
    streaming: ``TimeoutError`` otherwise, never a hang.
    """

    def __init__(self, url: str, headers: dict | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.timeout = timeout
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        path = parts.path + ("?" + parts.query if parts.query else "")
        lines = [f"GET {path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.buf = b""
        head = self._until(b"\r\n\r\n", self._deadline())
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.lower(): v for k, v in (h.split(": ", 1) for h in header_lines)}

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete read within {self.timeout}s; got {self.buf[-200:]!r}")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buf:
            self._fill(deadline)
        head, _, self.buf = self.buf.partition(marker)
        return head

    def chunk(self) -> bytes:
        """The next HTTP/1.1 chunk's payload (b"" for the last chunk)."""
        deadline = self._deadline()
        size = int(self._until(b"\r\n", deadline).split(b";")[0], 16)
        while len(self.buf) < size + 2:
            self._fill(deadline)
        data, tail, self.buf = self.buf[:size], self.buf[size:size + 2], self.buf[size + 2:]
        assert tail == b"\r\n", f"chunk not followed by CRLF: {tail!r}"
        return data

    def body(self) -> bytes:
        """The whole body of a Content-Length or chunked response."""
        if self.headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                part = self.chunk()
                if not part:
                    return b"".join(parts)
                parts.append(part)
        deadline = self._deadline()
        n = int(self.headers["content-length"])
        while len(self.buf) < n:
            self._fill(deadline)
        return self.buf[:n]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def no_cursor(data: bytes) -> bytes:
    """*data* with the cursor an SSE heartbeat may carry (``id: ...``, when
    its client has not been given it) left out: for tests of other bytes.
    tests/test_first_cursor.py checks the cursor itself."""
    return re.sub(rb"(event: comet\.heartbeat\n)id: [^\n]*\n", rb"\1", data)


def chunk_past_cursor(raw: RawStream) -> bytes:
    """The next chunk of *raw*, past a heartbeat that only tells the
    stream's cursor (a generator's, once it first waits on a hub)."""
    chunk = raw.chunk()
    if chunk.startswith(b"event: comet.heartbeat\nid: "):
        chunk = raw.chunk()
    return chunk


def read_until(sock: socket.socket, marker: bytes | None, timeout: float = 10.0) -> bytes:
    """Read *sock* until *marker* has arrived (``None``: until the server
    closes); everything read. ``TimeoutError`` after *timeout* seconds in
    all, ``EOFError`` if the server closes first: a broken server that keeps
    streaming, stalls or hangs up fails the test in seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker is None or marker not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{marker!r} not read within {timeout}s; got {data[-300:]!r}")
        sock.settimeout(left)
        more = sock.recv(65536)
        if not more:
            if marker is None:
                return data
            raise EOFError(f"connection closed before {marker!r}; got {data[-300:]!r}")
        data += more
    return data


def read_more(read, data: bytes, marker: bytes, timeout: float = 10.0) -> bytes:
    """*data* plus what ``read(4096)`` returns until *marker* is in it, with
    an overall deadline (a server that keeps streaming something else, or
    hangs up, fails the test in seconds). For TLS sockets and responses,
    which ``read_until`` cannot drive."""
    deadline = time.monotonic() + timeout
    while marker not in data:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{marker!r} not read within {timeout}s; got {data[-300:]!r}")
        more = read(4096)
        if not more:
            raise EOFError(f"connection closed before {marker!r}; got {data[-300:]!r}")
        data += more
    return data


class Tracker:
    """Counts handler generators that started and whose finally ran."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.lock = threading.Lock()

    def track(self, items):
        with self.lock:
            self.started += 1
        try:
            yield from items
        finally:
            with self.lock:
                self.finished += 1

    @property
    def open(self) -> int:
        return self.started - self.finished


def make_root(hub: Hub, tracker: Tracker, heartbeat: float = 15.0, **extra):
    """An app with one hub endpoint per transport plus plain pages."""

    class Root:
        @cherrypy.expose
        def index(self):
            return "plain page"

        @cherrypy.expose
        def say(self, text="", event=None, channel="lobby"):
            return hub.publish(channel, text, event=event or None)

        @cherrypy.expose
        @comet(transport="sse", heartbeat=heartbeat, **extra)
        def sse(self, last_event_id=None, channel="lobby"):
            yield from tracker.track(hub.subscribe(channel, last_id=last_event_id))

        @cherrypy.expose
        @comet(transport="multipart", heartbeat=heartbeat)
        def multipart(self, last_event_id=None):
            yield from tracker.track(hub.subscribe("lobby", last_id=last_event_id))

        @cherrypy.expose
        @comet(transport="chunked", heartbeat=heartbeat)
        def chunked(self, last_event_id=None):
            yield from tracker.track(hub.subscribe("lobby", last_id=last_event_id))

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=2)
        def longpoll(self, last_event_id=None):
            yield from tracker.track(hub.subscribe("lobby", last_id=last_event_id))

    return Root()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(predicate, timeout: float = 5.0, what: str = "state to settle"):
    """wait_until for tests; re-exported so tests read the same everywhere."""
    from comet.testing import wait_until

    return wait_until(predicate, timeout=timeout, what=what)


@pytest.fixture(autouse=True)
def _no_stream_outlives_its_server():
    """Once a test has stopped CherryPy's engine, every stream it opened
    has given its place back. A leaked admission otherwise stays in the
    engine plugin's pool (it lives as long as the process) and fails every
    later test that counts streams, far from the test that leaked it."""
    yield
    from cherrypy.process.wspbus import states

    plugin = getattr(cherrypy.engine, "_comet_plugin", None)
    if plugin is None or cherrypy.engine.state not in (states.STOPPED, states.EXITING):
        return
    pool = plugin.pool
    deadline = time.monotonic() + 5
    while pool.open_streams and time.monotonic() < deadline:
        time.sleep(0.02)
    if pool.open_streams:
        leaked = dict(pool._open)
        with pool._cond:  # so the next test starts clean and only this one fails
            pool._open.clear(), pool._parked.clear(), pool._setup.clear()
        pytest.fail(f"{len(leaked)} stream(s) still hold their place after the server stopped: {leaked}")


@pytest.fixture
def hub():
    h = Hub(idle=0.2)
    yield h
    h.close()


@pytest.fixture
def tracker():
    return Tracker()


@pytest.fixture
def app(comet_cherrypy, hub, tracker):
    """A live CherryPy server with make_root's endpoints; heartbeat 0.5 s."""
    return comet_cherrypy(make_root(hub, tracker, heartbeat=0.5))


class FreshVenv:
    """A new venv where ``pip install --no-deps --no-index <pip_args>`` ran
    (a wheel's or an sdist's path, or a name and ``--find-links``), offline: its dependencies come from the running (CI) venv through a
    ``.pth`` file, so the test downloads nothing and takes seconds, while
    ``comet`` and the ``comet_pytest`` plugin are the installed copies."""

    def __init__(self, where, *pip_args) -> None:
        import subprocess
        import sys
        import sysconfig

        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60)
        self.python = str(where / "bin" / "python")
        purelib = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        with open(os.path.join(purelib, "ci-venv.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        self.site_packages = purelib
        # --ignore-installed: through the .pth, pip also sees the CI venv's
        # own (editable) cherrypy-comet, and would call it already installed.
        subprocess.run([sys.executable, "-m", "pip", "--python", self.python, "install", "-q", "--no-deps", "--no-index",
                        "--no-build-isolation", "--ignore-installed", *map(str, pip_args)],
                       check=True, capture_output=True, timeout=120)

    def run(self, *args, cwd=None, env=None, timeout=120):
        """``python -P args...`` (-P: the working directory is not on
        sys.path, so a checkout there does not shadow the installed comet)."""
        import subprocess

        return subprocess.run([self.python, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def dists(tmp_path_factory):
    """``{"wheel": path, "sdist": path}`` built with ``python -m build`` from
    a clean export of the checkout (the files git tracks, as they are in the
    working tree: uncommitted edits count, untracked files do not)."""
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")) and not os.path.isfile(os.path.join(root, ".git")):
        pytest.skip("not a git checkout (an sdist, say): nothing to export")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True, timeout=60).stdout
    export = tmp_path_factory.mktemp("export")
    for name in tracked.decode().split("\0"):
        if name and os.path.exists(os.path.join(root, name)):
            os.makedirs(export / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(root, name), export / name)
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build uses this venv's setuptools and wheel (the
    # test extra) instead of downloading them, offline and in seconds.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(out), str(export)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="session")
def wheel_venv(dists, tmp_path_factory):
    """A :class:`FreshVenv` where the README's install line ran, the wheel
    standing in for the package index."""
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"), encoding="utf-8") as f:
        [name] = re.findall(r"^pip install (\S+)", f.read(), re.M)
    return FreshVenv(tmp_path_factory.mktemp("venv") / "wheel", "--find-links", dists["wheel"].parent, name)


__all__ = ["RawStream", "read_until", "Tracker", "make_root", "open_fds", "settle", "Event", "Part", "time"]
