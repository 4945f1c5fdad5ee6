"""The server notices clients that vanished without a FIN (comet.liveness).

The packets really vanish: the test makes two network namespaces joined by
a veth pair, runs tests/apps/vanish_app.py (heartbeat 1 s) in one, opens
streams from the other (parked generator, the same served at accept, thread
mode, fast route; a presence member), then sets the client's end of the
link down: no FIN, no RST, nothing acknowledged. Within the documented bound
(:func:`comet.liveness.notice_within` plus the presence grace) the server's
stream counts drop to zero, every handler's ``finally`` has run and the
member is gone from ``hub.members()``.

Addresses exist only inside the namespaces made here (10.231.x.y/30); the
namespaces, and the link with them, are removed when the test ends, also
when it fails.

On loopback: a stream stuck behind unsent bytes does not stall the writer,
and a TLS stream (thread mode) is not taken for a vanished one.
"""
from __future__ import annotations

import ctypes
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet.liveness import MARGIN, notice_within
from comet.testing import StreamClient, wait_until

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "apps" / "vanish_app.py"
HEARTBEAT = 1.0  # the app's
GRACE = 1.0  # the app's presence_grace
IDLE = 1.0  # its hub's idle tick: a thread-mode stream looks at its socket at each
SERVER, CLIENT = "10.231.{n}.1", "10.231.{n}.2"
CLONE_NEWNET = 0x40000000
READY = "vanish_app ready"  # tests/apps/vanish_app.py's

T = TypeVar("T")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _why_no_netns() -> str | None:
    """None if this process may make network namespaces, else why not."""
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    probe = f"cvprobe{uuid.uuid4().hex[:8]}"
    try:
        done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` cannot run here: {exc}"
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def in_netns(name: str, call: Callable[[], T]) -> T:
    """Run *call* on a thread that has entered network namespace *name*:
    sockets it makes live there (and keep living there, used from any thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[Any] = []

    def run() -> None:
        try:
            fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {name}")
            finally:
                os.close(fd)
            result.append((True, call()))
        except BaseException as exc:  # handed to the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=run, name=f"in-{name}")
    thread.start()
    thread.join(30)
    assert result, f"a call in namespace {name} did not return"
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class Net:
    """Two namespaces joined by a veth pair: ``server`` and ``client``."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.server_ns, self.client_ns = f"cvs{tag}", f"cvc{tag}"
        self.server_dev, self.client_dev = f"cvs{tag}", f"cvc{tag}"  # 11 chars: under IFNAMSIZ
        n = int(tag[:2], 16)  # a /30 of its own: two runs at once do not meet
        self.server_addr, self.client_addr = SERVER.format(n=n), CLIENT.format(n=n)
        self.made: list[str] = []

    def make(self) -> "Net":
        for ns in (self.server_ns, self.client_ns):
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("link", "add", self.server_dev, "netns", self.server_ns, "type", "veth",
            "peer", "name", self.client_dev, "netns", self.client_ns)
        for ns, dev, addr in ((self.server_ns, self.server_dev, self.server_addr),
                              (self.client_ns, self.client_dev, self.client_addr)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # the server's namespace reaches its own address
        return self

    def cut(self) -> None:
        """The client's end goes down: what the server sends vanishes, and
        the client sends nothing (no FIN, no RST)."""
        _ip("-n", self.client_ns, "link", "set", self.client_dev, "down")

    def remove(self) -> None:
        # Deleting a namespace deletes the veth end in it, and so its peer.
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.made.clear()

    def leftovers(self) -> list[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return [ns for ns in (self.server_ns, self.client_ns) if ns in listed]


class App:
    """tests/apps/vanish_app.py in the server's namespace."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.port = 8080
        self.log = tempfile.NamedTemporaryFile(prefix="vanish-app-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "App":
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.net.server_ns, sys.executable, str(APP), "--host", self.net.server_addr,
             "--port", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"vanish_app exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            return READY in self.text()

        wait_until(ready, timeout=20, interval=0.05, what="vanish_app started")
        return self

    def text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def get(self, path: str) -> Any:
        """GET *path* from inside the server's namespace: JSON."""
        return json.loads(self.fetch(path))

    def fetch(self, path: str) -> bytes:
        """GET *path* from inside the server's namespace: the body of a 200."""
        def fetch() -> bytes:
            with socket.create_connection((self.net.server_addr, self.port), timeout=5) as sock:
                sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            return data

        data = in_netns(self.net.server_ns, fetch)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], data[:500]
        return body

    def keepalive_probes(self) -> int:
        """Keepalive probes sent in the server's namespace so far."""
        netstat = subprocess.run(["ip", "netns", "exec", self.net.server_ns, "cat", "/proc/net/netstat"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
        names, values = (line.split() for line in netstat if line.startswith("TcpExt:"))
        return int(dict(zip(names, values))["TCPKeepAlive"])

    def send_queue(self, client_port: int) -> int:
        """Bytes the server's kernel holds for the client at *client_port*
        (sent but unacknowledged, or not sent: ``ss``'s Send-Q)."""
        listed = subprocess.run(["ip", "netns", "exec", self.net.server_ns, "ss", "-Htn", "state", "established"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        for line in listed.splitlines():  # Recv-Q Send-Q Local:Port Peer:Port
            fields = line.split()
            if len(fields) >= 4 and fields[3].endswith(f":{client_port}"):
                return int(fields[1])
        raise AssertionError(f"no connection from port {client_port}:\n{listed}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture
def net() -> Iterator[Net]:
    why = _why_no_netns()
    if why is not None:
        pytest.skip(why)
    made = Net()
    try:
        yield made.make()
    finally:
        made.remove()
        assert not made.leftovers(), "a network namespace of this test is still there"


@pytest.fixture
def app(net: Net) -> Iterator[App]:
    started = App(net)
    try:
        yield started.start()
    finally:
        started.stop()


def open_stream(net: Net, port: int, path: str, expect: bytes) -> socket.socket:
    """A client's stream from the client's namespace, read up to *expect*."""
    sock = in_netns(net.client_ns, lambda: socket.create_connection((net.server_addr, port), timeout=5))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + 5
    while expect not in data:
        assert time.monotonic() < deadline, f"{path}: {data!r}"
        chunk = sock.recv(65536)
        assert chunk, f"{path} closed: {data!r}"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    return sock


def test_streams_and_presence_of_a_vanished_client_end_within_the_bound(net: Net, app: App) -> None:
    clients = []
    try:
        clients.append(open_stream(net, app.port, "/parked?name=ann", b"hello"))
        clients.append(open_stream(net, app.port, "/parked?name=bob", b"hello"))  # learned: served at accept
        clients.append(open_stream(net, app.port, "/threaded", b"hello"))
        clients.append(open_stream(net, app.port, "/fast/a", b":ok"))
        opened = time.monotonic()
        expected = {"room": 2, "threads": 1, "fast": 1}  # (a generator's, once it waits on its subscription)
        stats = wait_until(lambda: (s := app.get("/comet/stats/json"))["streams"]["by_channel"] == expected and s,
                           timeout=5, what="four streams open, on their channels")
        assert stats["streams"]["threaded"] == 1 and stats["streams"]["parked"] == 3, stats["streams"]
        assert stats["routed"]["at_accept"] == 1 and stats["routed"]["handlers_at_accept"] == 1, stats["routed"]
        assert app.get("/members") == {"ann": 1, "bob": 1}
        for sock in clients:  # live: a heartbeat arrives on each before the cut
            sock.settimeout(HEARTBEAT * 3)
            assert sock.recv(65536)
        # Streams that heartbeat never cost a keepalive probe, however long
        # they stay open: each heartbeat's acknowledgement comes before the
        # keepalive's idle time (heartbeat + MARGIN) is up.
        wait_until(lambda: time.monotonic() > opened + HEARTBEAT + MARGIN + 1.5, timeout=15,
                   what="streams open past the keepalive's idle time")
        assert app.keepalive_probes() == 0
        # A long-poll waiting for news has nothing in flight: keepalive is
        # what notices its client gone.
        cursor = app.fetch("/last_id?channel=polls").decode()
        clients.append(open_stream(net, app.port, f"/poll?last_event_id={cursor}", b"\r\n\r\n"))
        wait_until(lambda: app.get("/comet/stats/json")["streams"]["open"] == 5, timeout=5, what="the long-poll open")

        # A client that reads nothing while events pour in: its window shuts,
        # the server's send buffer fills, the writer waits for writability.
        # (Just before the cut: a window shut for the whole user timeout ends
        # the connection as well, client gone or not.)
        full = open_stream(net, app.port, "/full", b"hello")
        clients.append(full)
        app.fetch(f"/publish?channel=full&size={8 * 1024}&count=64")
        queued = wait_until(lambda: (q := app.send_queue(full.getsockname()[1])) >= 16 * 1024 and q, timeout=5,
                            what="the server's send buffer filling")

        net.cut()
        cut = time.monotonic()  # CLOCK_MONOTONIC: the app's finals are on the same clock
        bound = notice_within(HEARTBEAT)
        seen: dict[str, float] = {}

        def gone() -> bool:
            now = time.monotonic() - cut
            streams = app.get("/comet/stats/json")["streams"]
            if "fast" not in streams["by_channel"]:
                seen.setdefault("fast route", now)
            if app.get("/members") == {}:
                seen.setdefault("members", now)
            return len(seen) == 2 and streams["open"] == 0

        try:
            wait_until(gone, timeout=bound + GRACE + 10, interval=0.05, what="the vanished client's streams ended")
        except TimeoutError:
            raise AssertionError(f"ended after the cut: {seen}; streams {app.get('/comet/stats/json')['streams']}; "
                                 f"finals {app.get('/finals')}; the app's threads:\n{app.fetch('/stacks').decode()}")
        finals = app.get("/finals")
        assert sorted(finals) == ["full", "parked ann", "parked bob", "poll", "threaded"], finals  # each handler's finally ...
        assert all(len(times) == 1 for times in finals.values()), finals  # ... once
        seen.update({{"parked ann": "parked generator", "parked bob": "parked, served at accept",
                      "threaded": "thread mode", "full": "parked, send buffer full",
                      "poll": "long-poll (keepalive)"}[what]: times[0] - cut for what, times in finals.items()})
        print(f"\nended after the cut (s): {json.dumps({k: round(v, 2) for k, v in seen.items()})}; "
              f"bound {bound} s (members +{GRACE} s, thread mode +{2 * IDLE} s); {queued} bytes were queued in the "
              f"full stream's send buffer")
        extra = {"members": GRACE, "thread mode": 2 * IDLE}  # as docs/deployment.md says
        for what, after in seen.items():
            assert after <= bound + extra.get(what, 0), (what, seen)
        # Noticed as a disconnect, not as the end of anything the client said.
        assert app.get("/comet/stats/json")["disconnects"] >= 3
        assert app.keepalive_probes() > 0  # the long-poll's
    finally:
        for sock in clients:
            sock.close()


def test_a_stream_stuck_behind_unsent_bytes_does_not_stall_the_writer(comet_cherrypy) -> None:
    """A client that reads nothing (asleep, or vanished and not yet
    noticed) leaves bytes queued on its parked stream; once its heartbeat is
    overdue the writer looks again a heartbeat later. It used to look again
    at once, forever: one such client stopped every stream of the writer."""
    hub = Hub()
    heartbeat = 0.2

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=heartbeat)
        def events(self, channel: str) -> Any:
            yield from hub.subscribe(channel)

    server = comet_cherrypy(Root())
    port = int(server.url.rsplit(":", 1)[1])
    with socket.socket() as stuck, StreamClient(server.url + "/events?channel=news") as live:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, shut soon
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(b"GET /events?channel=big HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b":ok" not in data:
            data += stuck.recv(4096)
        writer = engine_plugin().pool.writer()
        assert writer is not None

        def queued() -> list[Any]:
            hub.publish("big", "x" * 65536)  # until the kernel takes no more
            return [s for s in list(writer._streams) if s.out]

        queued = wait_until(queued, timeout=10, interval=0.01, what="bytes left queued")
        since = queued[0].last_write
        wait_until(lambda: time.monotonic() > since + 3 * heartbeat, what="three heartbeats overdue")
        hub.publish("news", "still served")
        assert [e.data for e in live.wait_for(1, timeout=3)] == ["still served"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_a_tls_stream_lives_while_idle_and_ends_when_its_client_leaves(comet_cherrypy, certificate) -> None:
    """Thread mode under cheroot's TLS looks at the TCP socket beneath for a
    client that left. It used to find no plain socket and call the client
    gone at the first idle tick: every TLS stream ended within a second."""
    hub = Hub(idle=0.1)
    ended: list[float] = []

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=60)  # no heartbeat writes: only the probe can tell
        def events(self) -> Any:
            try:
                yield from hub.subscribe("news")
            finally:
                ended.append(time.monotonic())

    cert, key = certificate
    server = comet_cherrypy(Root(), global_config={
        "server.ssl_module": "builtin", "server.ssl_certificate": cert, "server.ssl_private_key": key})
    port = int(server.url.rsplit(":", 1)[1])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b":ok" not in data:
            data += tls.recv(4096)
        wait_until(lambda: hub.subscriptions == 1, what="subscribed")
        since = time.monotonic()
        wait_until(lambda: time.monotonic() > since + 1.5, timeout=5, what="idle ticks and probes")  # 15 ticks
        assert not ended and hub.subscriptions == 1
        hub.publish("news", "over tls")
        while b"over tls" not in data:
            chunk = tls.recv(4096)
            assert chunk, data
            data += chunk
        left = time.monotonic()
    wait_until(lambda: ended, what="the handler's finally after the TLS client left")
    assert ended[0] - left < 1.0, ended[0] - left
