"""Latest-value channels (``Hub.latest``): a subscriber is given the newest
event of each key changed since its previous read, so one that falls
behind catches up with the state instead of a gap, and a slow client is
left unread (its memory bounded) instead of being disconnected."""
from __future__ import annotations

import json
import socket
import threading
import time

import cherrypy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comet import GAP, Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet.errors import InvalidEvent
from comet.testing import SSEParser, http_get, wait_until
from comet.writer import STEP_HIGH_WATER

from test_forget import rss_mb
from test_redis import hubs, prefix  # noqa: F401  (fixtures, for the Redis test)


def values(items) -> list:
    return [(e.name, e.data) for e in items if e]


def test_a_read_gives_the_newest_event_of_each_key_changed_since_the_last_one():
    hub = Hub(buffer_size=4)
    hub.latest("seats")
    sub = hub.subscribe("seats")
    hub.publish("seats", "ann", event="seat1")
    hub.publish("seats", "bob", event="seat2")
    hub.publish("seats", None, event="seat1")  # default key: the event's name
    assert values(sub.take()) == [("seat2", "bob"), ("seat1", None)]  # in order of their newest event
    for n in range(50):  # far past the buffer of 4: no gap, the state
        hub.publish("seats", n, event=f"seat{n % 3}")
    hub.publish("seats", "x", event="other", key="seat0")  # an explicit key
    assert values(sub.take()) == [("seat2", 47), ("seat1", 49), ("other", "x")]
    assert sub.last_id == hub.last_id("seats") and sub.take() == []
    assert hub.counters["gaps"] == 0
    sub.close()


def test_other_channels_keep_every_event():
    hub = Hub(buffer_size=4)
    hub.latest(lambda ch: ch.startswith("score:"))
    state, log = hub.subscribe("score:1"), hub.subscribe("log")
    for n in range(3):
        hub.publish("score:1", n, event="total")
        hub.publish("log", n, event="total")
    assert values(state.take()) == [("total", 2)]
    assert values(log.take()) == [("total", 0), ("total", 1), ("total", 2)]
    for n in range(10):
        hub.publish("log", n)
    assert [e.name for e in log.take()][0] == GAP
    state.close(), log.close()


def test_a_cursor_out_of_the_buffer_resumes_without_a_gap_one_from_before_the_channel_with_one():
    hub = Hub(buffer_size=2)
    hub.latest("c")
    ids = [hub.publish("c", n, key=f"k{n % 4}") for n in range(20)]
    resumed = hub.subscribe("c", last_id=ids[13])  # long evicted: k2, k3 changed only before
    assert [e.data for e in resumed.take()] == [16, 17, 18, 19]
    resumed = hub.subscribe("c", last_id=ids[17])  # evicted too (the buffer holds 18 and 19)
    assert [e.data for e in resumed.take()] == [18, 19]
    assert hub.counters["gaps"] == 0
    old = hub.subscribe("c", last_id="1-1")  # another epoch: what it missed is unknown
    gap, *rest = old.take()
    assert gap.name == GAP and gap.data == {"last_id": "1-1", "resume_id": f"{hub.epoch}-0"}
    assert [e.data for e in rest] == [16, 17, 18, 19] and old.last_id == ids[-1]
    resumed.close(), old.close()


def test_declared_on_a_channel_in_use_it_starts_from_what_is_held():
    hub = Hub(buffer_size=3)
    ids = [hub.publish("c", n, key=f"k{n % 2}") for n in range(6)]
    behind = hub.subscribe("c", last_id=ids[3])
    older = hub.subscribe("c", last_id=ids[0])
    hub.latest("c")
    hub.publish("c", 6, key="k0")
    hub.publish("c", 7, key="k0")
    assert [e.data for e in behind.take()] == [5, 7]
    gap, *rest = older.take()  # before what is held: k0 and k1 may have changed unseen
    assert gap.name == GAP and [e.data for e in rest] == [5, 7]
    behind.close(), older.close()


def test_thread_mode_iteration_catches_up_with_the_state():
    hub = Hub(buffer_size=2, idle=0.05)
    hub.latest("c")
    sub = hub.subscribe("c")
    assert not next(sub)
    for n in range(10):
        hub.publish("c", n, key=f"k{n % 3}")
    got = [next(sub) for _ in range(4)]
    assert [e.data for e in got[:3]] == [7, 8, 9] and not got[3]
    sub.close()


def test_several_channels_on_one_subscription():
    hub = Hub(buffer_size=2)
    hub.latest("state")
    sub = hub.subscribe(["state", "chat"])
    assert not sub.bounded()  # chat keeps every event: this one may not be left unread
    for n in range(6):
        hub.publish("state", n, key=f"k{n % 2}")
        hub.publish("chat", n)
    got = sub.take()
    # in publish order; the chat's evicted events are a gap, the state's are not missed
    assert [(e.channel, e.data) for e in got if e.name != GAP] == [("state", 4), ("chat", 4), ("state", 5), ("chat", 5)]
    assert [e.channel for e in got if e.name == GAP] == ["chat"]
    resumed = hub.subscribe(["state", "chat"], last_id=got[0].id)  # the cursor before all that: the same again
    assert [(e.channel, e.data) for e in resumed.take()] == [(e.channel, e.data) for e in got[1:]]
    resumed.close()
    sub.close()
    only = hub.subscribe(["state"], last_id=None)
    assert only.bounded()
    only.close()


def test_a_bad_key_is_refused_before_anything_is_stored():
    hub = Hub()
    with pytest.raises(InvalidEvent, match="key must be a str"):
        hub.publish("c", 1, key=7)
    with pytest.raises(InvalidEvent, match="key must be a str"):
        hub.publish("c", 1, key="k" * 201)
    with pytest.raises(TypeError, match="channels must be"):
        hub.latest(7)
    assert hub.channels() == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.integers(0, 4), st.just("take"), st.tuples(st.just("resume"), st.integers(0, 200))),
                max_size=80), st.integers(1, 5))
def test_every_read_is_the_newest_of_each_key_changed_since_the_previous(ops, size):
    """Model: whatever the buffer size and however reads and resumes fall
    between publishes, a read gives, for each key changed since the cursor,
    its newest event, in publish order; a memory hub never reports a gap."""
    hub = Hub(buffer_size=size)
    hub.latest("c")
    sub = hub.subscribe("c")
    published: list[tuple[str, int, str]] = []  # (key, n, id)
    seen = 0  # how many published events the subscription's cursor covers

    def expected(after: int) -> list[int]:
        newest: dict[str, int] = {}
        for i in range(after, len(published)):
            newest[published[i][0]] = i
        return sorted(newest.values())

    for op in ops:
        if op == "take":
            assert [e.data for e in sub.take()] == expected(seen)
            seen = len(published)
        elif isinstance(op, tuple):
            if published:
                at = op[1] % len(published)
                resumed = hub.subscribe("c", last_id=published[at][2])
                assert [e.data for e in resumed.take()] == expected(at + 1)
                resumed.close()
        else:
            n = len(published)
            published.append((f"k{op}", n, hub.publish("c", n, key=f"k{op}")))
    assert [e.data for e in sub.take()] == expected(seen)
    assert hub.counters["gaps"] == 0
    sub.close()


# -- live: a client that reads nothing, on a latest-value channel ------------------------------



KEYS = 16
PAD = 25_000  # bytes of each event's data: 50 MB is about 2,000 events
MB = 2**20


def latest_root(hub: Hub):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=5)
        def sse(self, channel="state", last_event_id=None):
            names = channel.split(",")
            return hub.subscribe(names if len(names) > 1 else channel, last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", heartbeat=5, mode="thread")
        def threaded(self, channel="state", last_event_id=None):
            yield from hub.subscribe(channel, last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="longpoll", poll_timeout=2)
        def poll(self, channel="state", last_event_id=None):
            return hub.subscribe(channel, last_id=last_event_id)

    return Root()


OPEN_READERS: list["Reader"] = []


@pytest.fixture(autouse=True)
def _close_readers():
    """A failing test still closes its sockets (or the next test fails on
    the unraisable ResourceWarning of their collection)."""
    yield
    while OPEN_READERS:
        OPEN_READERS.pop().close()


class Reader:
    """An SSE client on a raw socket that keeps only the newest value of
    each key (nothing else piles up in this process, whose memory is
    measured). ``rcvbuf``: a tiny receive buffer, so what a client that
    does not read leaves unsent stays on the server."""

    def __init__(self, url: str, path: str, rcvbuf: int | None = None) -> None:
        host, port = url.split("//")[1].split(":")
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, int(port)))
        self.port = self.sock.getsockname()[1]
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.buf = bytearray()
        self.head: bytes | None = None
        self.parser = SSEParser()
        self.state: dict[str, int] = {}
        self.events = self.gaps = 0
        self.closed = False
        self.thread: threading.Thread | None = None
        OPEN_READERS.append(self)

    def pump(self, until, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"after {self.events} events, state {self.state}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                self.closed = True
                return
            self.buf += data
            self._parse()

    def _parse(self) -> None:
        buf = self.buf
        if self.head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(buf[:end])
            del buf[:end + 4]
        while True:  # chunked framing
            line = buf.find(b"\r\n")
            if line < 0:
                return
            size = int(buf[:line], 16)
            if len(buf) < line + 2 + size + 2:
                return
            payload = bytes(buf[line + 2:line + 2 + size])
            del buf[:line + 2 + size + 2]
            for event in self.parser.feed(payload):
                if event.name == GAP:
                    self.gaps += 1
                    continue
                value = json.loads(event.data)
                self.state[value["k"]] = value["n"]
                self.events += 1

    def run(self) -> "Reader":
        """Read in a thread of its own until closed (a client that keeps up)."""
        self.thread = threading.Thread(target=lambda: self.pump(lambda: self.closed, 120), daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.closed = True
        if self.thread is not None:
            self.thread.join(5)
        self.sock.close()


def server_stream(port: int):
    """The parked stream serving the client whose socket has *port*."""
    writer = engine_plugin().pool.writer()
    for stream in list(writer._streams) if writer is not None else []:
        try:
            if stream.sock.getpeername()[1] == port:
                return stream
        except OSError:
            pass
    return None


def publish_mb(hub: Hub, channel: str, mb: int, *, each=None) -> dict[str, int]:
    """Publish *mb* MB of events, KEYS keys in turn; the newest n of each key."""
    pad = "x" * PAD
    final: dict[str, int] = {}
    for n in range(mb * MB // PAD):
        key = f"k{n % KEYS}"
        hub.publish(channel, {"k": key, "n": n, "pad": pad}, event="seat", key=key)
        final[key] = n
        if each is not None and n % 50 == 0:
            each(n)
    return final


@pytest.fixture(params=["memory", "redis"])
def any_hub(request):
    """A Hub, or a RedisHub on the session's redis-server (its own prefix)."""
    if request.param == "memory":
        return Hub(buffer_size=64, idle=0.2)
    from comet.backends.redis import RedisHub

    return RedisHub(request.getfixturevalue("comet_redis").url, prefix=f"latest{time.monotonic_ns()}:", maxlen=1000, buffer_size=64,
                    idle=0.2)


def test_a_client_that_never_reads_stays_connected_in_bounded_memory_and_then_sees_the_state(comet_cherrypy, any_hub):
    hub = any_hub
    hub.latest("state")
    hub.latest("state2")
    try:
        server = comet_cherrypy(latest_root(hub), thread_pool=4)
        pool = engine_plugin().pool
        dropped = pool.counters.get("slow_consumers", 0)  # (the pool's counters span the whole test session)
        stuck = Reader(server.url, "/sse?channel=state", rcvbuf=4096)
        stuck_multi = Reader(server.url, "/sse?channel=state,state2", rcvbuf=4096)
        healthy = Reader(server.url, "/sse?channel=state").run()
        wait_until(lambda: pool.parked_streams == 3, what="three parked")
        streams = wait_until(lambda: [server_stream(r.port) for r in (stuck, stuck_multi)] if all(
            server_stream(r.port) for r in (stuck, stuck_multi)) else None, what="the writer has them")
        # The kernel's send buffer grows to megabytes on loopback, enough to
        # absorb the compacted state (16 events of 25 KB) if the writer only
        # runs after the publishing (a loaded machine): then nothing would
        # fall behind in comet and the test would not test it. Small server
        # send buffers make the backlog certain.
        for s in streams:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        start_rss, peak = rss_mb(), {"backlog": 0, "rss": 0.0}

        def sample(n: int) -> None:
            peak["backlog"] = max([peak["backlog"]] + [s.out_size for s in streams])
            if n % 400 == 0:
                peak["rss"] = max(peak["rss"], rss_mb() - start_rss)

        started = time.monotonic()
        final = publish_mb(hub, "state", 50, each=sample)
        hub.publish("state2", {"k": "other", "n": -1, "pad": ""}, key="other")
        publishing = time.monotonic() - started
        sample(0)
        # Both still connected, unread; the healthy one has the state
        wait_until(lambda: healthy.state == final, timeout=20, what="the healthy reader has the state")
        sample(0)
        assert pool.parked_streams == 3 and pool.counters.get("slow_consumers", 0) == dropped
        # Still connected, and they did fall behind (the kernel's send buffer,
        # which grows to megabytes, may by now hold what is left for them).
        assert not any(s.done for s in streams) and peak["backlog"] > 0
        # Memory: bounded by the pause mark plus one read of the state (KEYS events),
        # whatever was published; RSS grows by the hub's buffer and that, not 50 MB.
        bound = STEP_HIGH_WATER + (KEYS + 1) * (PAD + 200)  # (an event's bytes on the wire: its data and framing)
        assert peak["backlog"] <= bound, (peak, bound)
        assert peak["rss"] < 25, peak
        # Now they read: every key's newest value, no gap, no reconnect
        stuck.pump(lambda: stuck.state == final)
        stuck_multi.pump(lambda: stuck_multi.state == {**final, "other": -1})
        assert stuck.gaps == stuck_multi.gaps == 0 and not stuck.closed and not stuck_multi.closed
        print(f"\n{type(hub).__name__}: 50 MB in {publishing:.1f} s to a client that never reads: stream backlog at most "
              f"{peak['backlog'] / MB:.2f} MB (bound {bound / MB:.2f} MB), RSS growth at most {peak['rss']:.1f} MB; "
              f"then it read {stuck.events} events for {KEYS} keys; the healthy reader got {healthy.events} of "
              f"{50 * MB // PAD}")
        healthy.close(), stuck.close(), stuck_multi.close()
        wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="all released")
    finally:
        hub.close()


def test_on_a_normal_channel_the_same_client_is_disconnected_at_the_cap(comet_cherrypy):
    """The comparison: a channel that keeps every event drops the client
    that does not read once its backlog passes 1 MiB; a reader that keeps
    up gets every event."""
    hub = Hub(buffer_size=64, idle=0.2)
    try:
        server = comet_cherrypy(latest_root(hub), thread_pool=4)
        pool = engine_plugin().pool
        dropped = pool.counters.get("slow_consumers", 0)
        stuck = Reader(server.url, "/sse?channel=plain", rcvbuf=4096)
        healthy = Reader(server.url, "/sse?channel=plain").run()
        wait_until(lambda: pool.parked_streams == 2, what="both parked")
        stream, peak, published = wait_until(lambda: server_stream(stuck.port), what="the writer has it"), 0, 0
        pad = "x" * PAD
        while not stream.done and published < 40 * MB // PAD:
            for _ in range(20):  # paced: the healthy reader keeps up
                hub.publish("plain", {"k": "k", "n": published, "pad": pad})
                published += 1
                peak = max(peak, stream.out_size)
            wait_until(lambda: healthy.state.get("k") == published - 1, timeout=10, what="the healthy reader keeps up")
        assert stream.done and pool.counters.get("slow_consumers", 0) == dropped + 1
        assert healthy.events == published and healthy.gaps == 0
        print(f"\nnormal channel: the client that never reads was disconnected after {published * PAD / MB:.1f} MB "
              f"published, its backlog at {peak / MB:.2f} MB")
        healthy.close(), stuck.close()
        wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="all released")
    finally:
        hub.close()


def test_thread_mode_and_long_poll_take_later_and_get_the_state(comet_cherrypy):
    """A stream whose thread is blocked in send() reads the channel when the
    send returns, and a long-poll when it comes back: both get the newest
    value of each key, no gap, and stay as cheap as one read of the state."""
    hub = Hub(buffer_size=64, idle=0.2)
    hub.latest("state")
    try:
        server = comet_cherrypy(latest_root(hub), thread_pool=6)
        pool = engine_plugin().pool
        stuck = Reader(server.url, "/threaded?channel=state", rcvbuf=4096)
        wait_until(lambda: pool.open_streams == 1 and hub.subscriptions == 1, what="the thread-mode stream open")
        cursor = hub.last_id("state")
        final = publish_mb(hub, "state", 20)
        status, _, body = http_get(f"{server.url}/poll?channel=state&last_event_id={cursor}")
        answer = json.loads(body)
        assert status == 200 and [e["event"] for e in answer["events"]] == ["seat"] * KEYS
        assert {e["data"]["k"]: e["data"]["n"] for e in answer["events"]} == final
        assert answer["cursor"] == hub.last_id("state")
        stuck.pump(lambda: stuck.state == final)
        assert stuck.gaps == 0 and not stuck.closed and hub.counters["gaps"] == 0
        assert stuck.events < 20 * MB // PAD  # it did not read every event: the thread took later, compacted
        stuck.close()
        wait_until(lambda: pool.open_streams == 0 and hub.subscriptions == 0, what="all released")
    finally:
        hub.close()


# -- Redis: the key travels with the event, across processes ----------------------------------

def test_redis_processes_keep_the_same_keys_and_a_trimmed_history_is_a_gap(hubs):
    a, b = hubs(maxlen=8, approximate=False), hubs(maxlen=8, approximate=False)
    for hub in (a, b):
        hub.latest("state")
    sub = b.subscribe("state")
    seen: dict[str, int] = {}
    ids = []
    for n in range(30):
        ids.append(a.publish("state", n, key=f"k{n % 3}"))
        if n % 4 == 3 or n == 29:  # b following live keeps up (a loaded machine could let 8 go by unread: a gap)
            wait_until(lambda: seen.update({e._key: e.data for e in sub.take()}) or seen.get(f"k{n % 3}") == n,
                       what=f"event {n} on b")
    assert seen == {"k0": 27, "k1": 28, "k2": 29} and b.counters["gaps"] == 0
    resumed = b.subscribe("state", last_id=ids[24])
    assert [e.data for e in resumed.take()] == [27, 28, 29]
    # A process that starts mirroring now loads what Redis kept (8 events):
    # a cursor from before that gets a gap, then the keys known since.
    c = hubs(maxlen=8, approximate=False)
    c.latest("state")
    old = c.subscribe("state", last_id=ids[2])
    gap, *rest = old.take()
    assert gap.name == GAP and gap.data["resume_id"] == ids[21] and [e.data for e in rest] == [27, 28, 29]
    sub.close(), resumed.close(), old.close()
