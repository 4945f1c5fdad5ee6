"""RedisHub against a real redis-server: two hubs in one test stand for two
processes (each has its own connections and reader thread, and shares
nothing else). The multi-process deployment behind nginx is in
tests/test_deploy.py."""
from __future__ import annotations

import itertools
import queue
import signal
import socket
import subprocess
import threading
import time

import cherrypy
import pytest
import redis

from comet import GAP, BackendUnavailable, Event, InvalidEventId, comet
from comet.backends import hub_from_url
from comet.backends.redis import RedisHub
from comet.cherrypy_tool import engine_plugin
from comet.fastpath import FastRoutes
from comet.hub import Hub, Idle
from comet.testing import RedisServer, StreamClient, free_port, http_get, wait_until
from comet.wsgi import comet_app

_names = itertools.count()


@pytest.fixture
def prefix():
    """Keys of their own per test: the Redis server is shared by the session."""
    return f"t{next(_names)}:"


@pytest.fixture
def hubs(comet_redis, prefix):
    """Factory of RedisHubs on the session's Redis; all closed after the test,
    and their reader threads must be gone."""
    made: list[RedisHub] = []

    def make(url: str | None = None, **options) -> RedisHub:
        options.setdefault("prefix", prefix)
        hub = RedisHub(url or comet_redis.url, **options)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.close()
    assert not [t for t in threading.enumerate() if t.name == "comet-redis-reader"]


def drain(sub, n: int, timeout: float = 5.0) -> list:
    """The next *n* events of a subscription, Idle ticks skipped."""
    got: list = []
    wait_until(lambda: got.extend(e for e in sub.take() if e) or len(got) >= n, timeout, what=f"{n} events")
    return got


def test_publish_in_one_process_reaches_the_other(hubs):
    a, b = hubs(), hubs()
    sub = b.subscribe("room")
    first = a.publish("room", {"text": "hi"}, event="say")
    second = a.publish("room", "plain text", retry=1500)
    got = drain(sub, 2)
    assert [(e.id, e.name, e.data, e.retry) for e in got] == [
        (first, "say", {"text": "hi"}, None), (second, None, "plain text", 1500)]
    assert got[0].encode("sse") == f'id: {first}\nevent: say\ndata: {{"text":"hi"}}\n\n'.encode()
    sub.close()


def test_one_order_everywhere_under_concurrent_publishers(hubs):
    a, b, c = hubs(), hubs(), hubs()
    subs = [a.subscribe("race"), b.subscribe("race"), c.subscribe("race")]

    def publish(hub, who):
        for i in range(100):
            hub.publish("race", f"{who}{i}")

    threads = [threading.Thread(target=publish, args=(h, w)) for h, w in ((a, "a"), (b, "b"), (c, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    seen = [[(e.id, e.data) for e in drain(s, 300, timeout=15)] for s in subs]
    assert len(seen[0]) == 300 and seen[0] == seen[1] == seen[2]
    for who in "abc":  # each publisher's own order kept
        mine = [d for _, d in seen[0] if d[0] == who]
        assert mine == [f"{who}{i}" for i in range(100)]
    for s in subs:
        s.close()


def test_resume_on_another_process_without_loss_or_duplicate(hubs):
    a, b = hubs(), hubs()
    ids = [a.publish("feed", i) for i in range(10)]
    on_a = a.subscribe("feed", last_id=a.before(ids[0]))
    first_half = drain(on_a, 5)[:5]
    on_a.close()  # the client disconnects after event 4 ...
    on_b = b.subscribe("feed", last_id=first_half[-1].id)  # ... and reconnects elsewhere
    rest = drain(on_b, 5)
    assert [e.data for e in first_half + rest] == list(range(10))
    assert [e.id for e in first_half + rest] == ids
    on_b.close()


def test_a_cursor_ahead_of_the_local_mirror_is_caught_up_not_refused(hubs):
    # The client saw an event on process A that B's reader has not read yet.
    a, b = hubs(), hubs()
    b.subscribe("fast").close()  # the channel is live on B
    for i in range(30):
        event_id = a.publish("fast", i)
        sub = b.subscribe("fast", last_id=event_id)  # no InvalidEventId: B asks Redis
        assert sub.last_id == event_id
        sub.close()
    with pytest.raises(InvalidEventId, match="future"):
        b.subscribe("fast", last_id="99999999999999-0")


def test_history_is_bounded_and_an_evicted_cursor_gets_a_gap(hubs, comet_redis, prefix):
    a, b = hubs(maxlen=5, approximate=False), hubs(maxlen=5, approximate=False)
    ids = [a.publish("short", i) for i in range(12)]
    assert redis.Redis.from_url(comet_redis.url).xlen(prefix + "short") == 5
    sub = b.subscribe("short", last_id=ids[2])
    gap, *rest = drain(sub, 6)
    assert gap.name == GAP and gap.data == {"last_id": ids[2], "resume_id": ids[6]} and gap.id == ids[6]
    assert [e.data for e in rest] == [7, 8, 9, 10, 11]
    sub.close()
    ok = b.subscribe("short", last_id=ids[6])  # the newest trimmed id: nothing missing
    assert [e.data for e in drain(ok, 5)] == [7, 8, 9, 10, 11]
    ok.close()
    assert [e.data for e in b.history("short")] == [7, 8, 9, 10, 11]


def test_approximate_trimming_still_bounds_history(hubs, comet_redis, prefix):
    a = hubs(maxlen=100)
    for i in range(1000):
        a.publish("big", i)
    assert 100 <= redis.Redis.from_url(comet_redis.url).xlen(prefix + "big") < 300
    sub = a.subscribe("big", last_id="0-1")
    assert sub.take()[0].name == GAP
    sub.close()


def test_one_reader_thread_per_hub_whatever_the_subscriptions(hubs):
    before = set(threading.enumerate())  # (threads of earlier tests may end meanwhile: count new ones)
    a = hubs()
    subs = [a.subscribe(f"ch{i % 10}") for i in range(200)]
    assert len(set(threading.enumerate()) - before) == 1
    b = hubs()
    b.publish("ch3", "x")
    for s in subs:
        if s.channel == "ch3":
            assert [e.data for e in drain(s, 1)] == ["x"]
    assert not [e for s in subs for e in s.take() if e]
    assert len(set(threading.enumerate()) - before) == 2
    for s in subs:
        s.close()
    assert a.subscriptions == 0


def test_redis_restart_mid_stream_loses_nothing_redis_kept(prefix):
    with RedisServer() as server:
        a = RedisHub(server.url, prefix=prefix, backoff=(0.05, 0.5))
        b = RedisHub(server.url, prefix=prefix, backoff=(0.05, 0.5))
        try:
            sub = b.subscribe("live")
            ids = [a.publish("live", i) for i in range(5)]
            assert [e.id for e in drain(sub, 5)] == ids
            server.stop()
            with pytest.raises(BackendUnavailable, match="unreachable"):
                a.publish("live", "lost")  # a clear error, not a hang and not a retry
            wait_until(lambda: not b.connected, 10, what="reader notices")
            ticks = [item for item in sub.take()]
            assert not any(ticks)
            server.start()
            ids += [a.publish("live", i) for i in range(5, 10)]
            got = drain(sub, 5, timeout=15)
            assert [e.id for e in got] == ids[5:] and [e.data for e in got] == list(range(5, 10))
            assert b.connects >= 2
            # and the history survived the restart (append-only file)
            assert [e.data for e in RedisHub.history(a, "live")] == list(range(10))
        finally:
            a.close()
            b.close()


def test_events_trimmed_while_the_reader_was_away_become_a_gap(prefix):
    with RedisServer() as server:
        a = RedisHub(server.url, prefix=prefix, maxlen=5, approximate=False)
        b = RedisHub(server.url, prefix=prefix, maxlen=5, approximate=False, backoff=(1.0, 1.0))
        try:
            sub = b.subscribe("hole")
            seen = a.publish("hole", "seen")
            assert drain(sub, 1)[0].id == seen
            # Cut B's reader off; while it waits to reconnect, more than
            # maxlen events come and go.
            a.redis.execute_command("CLIENT", "KILL", "ID", b.store.reader.client_id)
            wait_until(lambda: not b.connected, 5, what="reader cut off")
            ids = [a.publish("hole", i) for i in range(12)]
            gap, *rest = drain(sub, 6, timeout=10)
            assert gap.name == GAP and gap.data == {"last_id": seen, "resume_id": ids[-6]}
            assert [e.id for e in rest] == ids[-5:]
        finally:
            a.close()
            b.close()


def test_password_db_tls_and_timeouts_pass_through_to_redis_py(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with RedisServer(password="s3cret") as plain:
        hub = RedisHub(f"redis://:s3cret@127.0.0.1:{plain.port}/3", client_name="comet-test", socket_timeout=2.5)
        try:
            hub.publish("c", "in db 3")
            admin = redis.Redis(port=plain.port, password="s3cret", db=3)
            assert admin.xlen("comet:c") == 1
            names = [c["name"] for c in admin.client_list()]
            assert "comet-test" in names
            assert hub.redis.connection_pool.connection_kwargs["socket_timeout"] == 2.5
        finally:
            hub.close()
        wrong = RedisHub(f"redis://:nope@127.0.0.1:{plain.port}/0")
        try:
            with pytest.raises(BackendUnavailable, match="unreachable"):
                wrong.publish("c", "x")
        finally:
            wrong.close()
    with RedisServer(tls=(str(cert), str(key))) as tls:
        assert tls.url.startswith("rediss://")
        a = RedisHub(tls.url, ssl_ca_certs=str(cert))
        b = RedisHub(tls.url, ssl_ca_certs=str(cert))
        try:
            sub = b.subscribe("secure")
            event_id = a.publish("secure", "over TLS")
            assert [e.id for e in drain(sub, 1)] == [event_id]
            sub.close()
        finally:
            a.close()
            b.close()


def test_bad_settings_fail_at_construction():
    for kwargs, message in (({"maxlen": 0}, "maxlen"), ({"block": 0}, "block"), ({"prefix": "a\nb"}, "prefix"),
                            ({"backoff": (2, 1)}, "backoff")):
        with pytest.raises(ValueError, match=message):
            RedisHub("redis://127.0.0.1:1/0", **kwargs)
    with pytest.raises(ValueError, match="redis://"):
        hub_from_url("http://example.org")
    assert type(hub_from_url(None)) is Hub


@pytest.mark.parametrize("name", ["block", "replica_timeout"])
def test_second_settings_take_up_to_60_s_inclusive(name):
    """The documented range is (0, 60] seconds: 60 itself is a setting a
    user may well write, and must not be refused."""
    RedisHub("redis://127.0.0.1:1/0", **{name: 60}).close()
    RedisHub("redis://127.0.0.1:1/0", **{name: 0.001}).close()
    for bad in (0, 60.001, -1, "5"):
        with pytest.raises(ValueError, match=name):
            RedisHub("redis://127.0.0.1:1/0", **{name: bad})


def test_streams_over_http_from_a_redis_hub(comet_cherrypy, hubs):
    web, other = hubs(), hubs()

    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self, last_event_id=None):
            return web.subscribe("web", last_id=last_event_id)  # parked

        @cherrypy.expose
        @comet(transport="sse", mode="thread")
        def threaded(self, last_event_id=None):
            yield from web.subscribe("web", last_id=last_event_id)

    server = comet_cherrypy(Root())
    with StreamClient(server.url + "/events") as parked, StreamClient(server.url + "/threaded") as threaded:
        ids = [other.publish("web", {"n": i}) for i in range(3)]
        for client in (parked, threaded):
            assert [(e.id, e.data) for e in client.wait_for(3)] == [(i, f'{{"n":{n}}}') for n, i in enumerate(ids)]
    with StreamClient(server.url + "/events", last_event_id=ids[0]) as resumed:
        assert [e.id for e in resumed.wait_for(2)] == ids[1:]


def test_a_stream_whose_channel_cannot_be_loaded_gets_503(comet_cherrypy, prefix):
    down = RedisHub(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix, socket_connect_timeout=0.5)

    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self):
            return down.subscribe("nowhere")

    try:
        server = comet_cherrypy(Root())
        status, headers, body = http_get(server.url + "/events")
        assert status == 503 and "unreachable" in body.decode() and headers["retry-after"] == "2"
    finally:
        down.close()


def test_idle_ticks_carry_the_redis_cursor(hubs):
    a = hubs()
    event_id = a.publish("tick", "x")
    sub = a.subscribe("tick", last_id=event_id, idle=0.05)
    assert next(iter(sub)) == Idle(event_id)
    sub.close()


def test_publish_many_is_one_round_trip_in_order_for_every_process(hubs):
    a, b = hubs(), hubs()
    sub = b.subscribe("bulk")
    ids = a.publish_many("bulk", [{"n": i} for i in range(200)], event="tick")
    got = drain(sub, 200)
    assert [e.id for e in got] == ids and [e.data["n"] for e in got] == list(range(200))
    assert all(e.name == "tick" for e in got) and a.published == 200
    with pytest.raises(ValueError):  # validated before anything is sent
        a.publish_many("bulk", ["fine", "x" * (a.max_event_bytes + 1)])
    assert b.history("bulk")[-1].id == ids[-1]
    sub.close()


def test_connections_and_threads_are_released_on_close(comet_redis, prefix):
    admin = redis.Redis.from_url(comet_redis.url)
    baseline = len(admin.client_list())
    threads = set(threading.enumerate())
    made = [RedisHub(comet_redis.url, prefix=prefix) for _ in range(3)]
    subs = [hub.subscribe(f"c{i}") for i, hub in enumerate(made) for _ in range(5)]
    made[0].publish("c1", "x")
    wait_until(lambda: all(h.connected for h in made), what="readers connected")
    assert len(admin.client_list()) >= baseline + 3  # a reader connection each, at least
    for sub in subs:
        sub.close()
    for hub in made:
        hub.close()
    wait_until(lambda: len(admin.client_list()) == baseline, what="every Redis connection closed")
    # No thread of these hubs is left (threads of earlier tests may end meanwhile).
    assert not set(threading.enumerate()) - threads, set(threading.enumerate()) - threads
    admin.close()


def test_made_up_channels_are_unfollowed_with_their_last_subscriber(hubs, caplog):
    """A channel nobody published to leaves the reader's XREAD with its last
    local subscriber; one with events stays; an event that arrives as its
    channel is being forgotten is read from Redis by the next subscriber."""
    a, b = hubs(), hubs()
    a.publish("real", "kept")
    subs = [b.subscribe(f"made-up-{n}") for n in range(200)] + [b.subscribe("real")]
    assert len(b.store._cursors) == 201
    for sub in subs:
        sub.close()
    assert b.channels() == ["real"] and list(b.store._live.values()) == ["real"]
    assert len(b.store._cursors) == 1  # the XREAD's arguments: the made-up channels are gone from them too
    # forget while other processes publish: nothing is lost, the reader never trips
    for n in range(60):
        sub = b.subscribe(f"busy-{n}")
        event_id = a.publish(f"busy-{n}", n)
        if n % 2:
            drain(sub, 1)
        sub.close()
        again = b.subscribe(f"busy-{n}", last_id=b.before(event_id))
        assert [e.data for e in drain(again, 1)] == [n]
        again.close()
    a.publish("real", "still followed")
    wait_until(lambda: len(b.history("real")) == 2, what="the reader still delivers")
    assert b.connects == 1 and "reader failed" not in caplog.text


# -- publishing threads share round trips (group commit) ----------------------------


def test_concurrent_publishers_share_round_trips_and_lose_nothing(hubs):
    a, b = hubs(), hubs()
    subs = {c: b.subscribe(c) for c in ("x", "y")}
    threads, per = 8, 150
    ids: dict[int, list[tuple[str, str]]] = {}
    start = threading.Barrier(threads)

    def work(t):
        start.wait()
        ids[t] = [(c, a.publish(c, {"t": t, "i": i})) for i in range(per) for c in ["x" if (t + i) % 2 else "y"]]

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert sorted(ids) == list(range(threads))
    all_ids = [(c, i) for got in ids.values() for c, i in got]
    assert len(set(all_ids)) == threads * per
    for got in ids.values():  # a thread's publishes keep its order, per channel
        for channel in ("x", "y"):
            mine = [i for c, i in got if c == channel]
            assert [parse(i) for i in mine] == sorted(parse(i) for i in mine)
    assert a.counters["published"] == threads * per
    assert a.counters["round_trips"] < threads * per  # some went together
    received = {c: drain(sub, sum(1 for _, i in all_ids if _ == c), timeout=20) for c, sub in subs.items()}
    for channel, events in received.items():
        assert sorted(e.id for e in events) == sorted(i for c, i in all_ids if c == channel)
        for t in range(threads):
            order = [e.data["i"] for e in events if e.data["t"] == t]
            assert order == sorted(order)
    for sub in subs.values():
        sub.close()


def parse(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def test_a_batch_reports_each_publish_on_its_own(hubs, comet_redis, prefix):
    """One failing publish (a key of the wrong type) fails alone; after a
    SCRIPT FLUSH (a restarted Redis) a batch loads the script and stores each
    event once."""
    hub = hubs()
    admin = redis.Redis.from_url(comet_redis.url)
    admin.set(prefix + "wrong", "not a stream")
    args = hub.store._fields(Event("x"))
    results = hub.store.publisher.send_batch([(prefix + "ok", args), (prefix + "wrong", args), (prefix + "ok", args)])
    assert isinstance(results[1], redis.ResponseError) and "WRONGTYPE" in str(results[1])
    assert all(isinstance(r, bytes) for r in (results[0], results[2])) and results[0] < results[2]
    # One script call for the batch (PUBLISH_BATCH): each entry still names
    # the one before it in its stream, across the failed publish and others
    # in between; a stream's first entry names its floor.
    first = hub.publish("ok2", "first")
    results = hub.store.publisher.send_batch([(prefix + "ok", args), (prefix + "ok2", args), (prefix + "ok", args),
                                              (prefix + "new", args), (prefix + "ok2", args)])
    assert all(isinstance(r, bytes) for r in results)
    for key in ("ok", "ok2", "new"):
        entries = admin.xrange(prefix + key)
        assert [f[b"p"] for _, f in entries] == [b"0-0"] + [i for i, _ in entries[:-1]]
    assert [i for i, _ in admin.xrange(prefix + "ok2")] == [first.encode(), results[1], results[4]]
    admin.script_flush()
    results = hub.store.publisher.send_batch([(prefix + "after", args), (prefix + "after", args)])
    assert all(isinstance(r, bytes) for r in results) and admin.xlen(prefix + "after") == 2
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        hub.publish("wrong", "x")
    assert hub.publish("ok", "still fine")
    admin.close()


def test_publishers_get_backend_unavailable_together_never_a_hang(hubs):
    hub = hubs(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    errors: list = []
    start = threading.Barrier(8)

    def work():
        start.wait()
        for _ in range(5):
            try:
                hub.publish("x", "lost")
            except BackendUnavailable as exc:
                errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert not any(w.is_alive() for w in workers) and len(errors) == 40
    assert hub.counters["published"] == 0


def test_group_commit_hands_on_and_keeps_each_callers_result():
    """The mechanism alone: callers arriving while a send runs go out
    together in the next one, each with its own result or error."""
    from comet.backends.redis import _GroupCommit

    sends: list[list] = []
    first_in = threading.Event()
    release = threading.Event()

    def send(items):
        sends.append(list(items))
        if len(sends) == 1:
            first_in.set()
            assert release.wait(10)
        return [ValueError(f"bad {i}") if i % 5 == 4 else i * 10 for i in items]

    commit = _GroupCommit(send, max_batch=3)
    results: dict = {}

    def call(i):
        try:
            results[i] = commit.submit(i)
        except ValueError as exc:
            results[i] = str(exc)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert first_in.wait(10)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 8)]
    for t in others:
        t.start()
    wait_until(lambda: len(commit._queue) == 7, what="seven callers queued behind the first send")
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert results == {i: (f"bad {i}" if i % 5 == 4 else i * 10) for i in range(8)}
    assert sends[0] == [0] and sorted(x for s in sends[1:] for x in s) == list(range(1, 8))
    assert [len(s) for s in sends[1:]] == [3, 3, 1]  # at most max_batch each, queued ones first come first
    assert not commit._busy and not commit._queue


# -- what users notice (issue 19) ----------------------------------------------------


def test_redis_down_is_a_503_with_retry_after_on_wsgi_and_fast_routes(comet_wsgi, comet_cherrypy, prefix):
    """comet.js backs off for a 503's ``Retry-After``: every way a stream is
    refused because Redis is down says how long (plain WSGI, fast routes at
    accept time or through their middleware, CherryPy's fast routes)."""
    down = RedisHub(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix, socket_connect_timeout=0.5)

    def generator(environ):
        yield from down.subscribe("nowhere", last_id=environ["comet.last_event_id"])

    apps = {
        "/returned": comet_app(lambda environ: down.subscribe("nowhere"), transport="sse"),
        "/generator": comet_app(generator, transport="chunked"),
        "/poll": comet_app(generator, transport="longpoll", poll_timeout=1),
    }

    def app(environ, start_response):
        return apps[environ["PATH_INFO"]](environ, start_response)

    routes = FastRoutes()
    routes.add("/fast", down, "nowhere")

    class Root:
        @cherrypy.expose
        def index(self):
            return "page"

    try:
        wsgi = comet_wsgi(app, routes=routes)
        engine_plugin().route("/fast", down, "nowhere")
        cp = comet_cherrypy(Root(), thread_pool=2)
        for url in [wsgi.url + path for path in (*apps, "/fast")] + [cp.url + "/fast", cp.url + "/f%61st"]:
            status, headers, body = http_get(url, deadline=5)
            assert status == 503 and b"unreachable" in body, (url, status, body)
            assert headers.get("retry-after") == "2", (url, headers)
    finally:
        down.close()


def _split_commands(buf: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Complete RESP commands at the start of *buf* as (NAME, raw bytes), and the rest."""
    commands, pos = [], 0
    while True:
        start, end = pos, buf.find(b"\r\n", pos)
        if end < 0:
            break
        assert buf[pos:pos + 1] == b"*", f"not a RESP array: {buf[pos:pos + 40]!r}"
        count, pos, name = int(buf[pos + 1:end]), end + 2, b""
        for i in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(buf[pos + 1:end])
            if len(buf) < end + 2 + size + 2:
                break
            if i == 0:
                name = buf[end + 2:end + 2 + size].upper()
            pos = end + 2 + size + 2
        else:
            commands.append((name, buf[start:pos]))
            continue
        pos = start
        break
    return commands, buf[pos:]


class SplittingProxy:
    """A TCP proxy in front of Redis that can split a client's commands.

    redis-py sends a pipeline in one write and Redis runs it in one go, so a
    reader never gets to look in the middle by chance. Armed, this proxy
    forwards a connection's commands up to and including its first
    ``EVALSHA`` (a publish), waits until Redis has answered that much, sets
    ``split``, and then, as told by :meth:`go` or :meth:`cut`, forwards the
    rest or drops the connection there.
    """

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.armed = False
        self.split = threading.Event()
        self._decision: queue.Queue = queue.Queue()
        self._closing = False
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def go(self) -> None:
        self._decision.put("go")

    def cut(self) -> None:
        self._decision.put("cut")

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=5)
            pair = {"client": client, "server": server, "replied": 0}
            for sock in (client, server):
                sock.settimeout(0.2)
                self._socks.append(sock)
            for pump in (self._up, self._down):
                thread = threading.Thread(target=pump, args=(pair,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _recv(self, sock: socket.socket) -> bytes:
        while not self._closing:
            try:
                return sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return b""
        return b""

    def _up(self, pair: dict) -> None:
        client, server, buf = pair["client"], pair["server"], b""
        try:
            while data := self._recv(client):
                commands, buf = _split_commands(buf + data)
                out = b""
                for name, raw in commands:
                    out += raw
                    if self.armed and name == b"EVALSHA":
                        self.armed = False
                        before = pair["replied"]
                        server.sendall(out)
                        out = b""
                        wait_until(lambda: pair["replied"] > before, what="Redis answering the first half")
                        self.split.set()
                        if self._decision.get(timeout=10) == "cut":
                            return
                server.sendall(out)
        except OSError:
            pass
        finally:
            self._close(pair)

    def _down(self, pair: dict) -> None:
        try:
            while data := self._recv(pair["server"]):
                pair["replied"] += len(data)
                pair["client"].sendall(data)
        except OSError:
            pass
        finally:
            self._close(pair)

    @staticmethod
    def _close(pair: dict) -> None:
        for sock in (pair["client"], pair["server"]):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._closing = True
        self.listener.close()
        for sock in self._socks:
            try:
                sock.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def splitting(comet_redis, prefix):
    """(proxy, a RedisHub behind it, a direct admin connection)."""
    proxy = SplittingProxy(comet_redis.port)
    hub = RedisHub(proxy.url, prefix=prefix)
    admin = redis.Redis.from_url(comet_redis.url)
    yield proxy, hub, admin
    hub.close()
    proxy.close()
    admin.close()


def test_a_reader_never_sees_part_of_a_publish_many(splitting, prefix):
    """``publish_many`` is all or nothing for everyone reading (MULTI/EXEC):
    a reader looking while the batch is half-way to Redis sees none of it."""
    proxy, hub, admin = splitting
    proxy.armed = True
    ids: list = []
    publisher = threading.Thread(target=lambda: ids.extend(hub.publish_many("batch", ["a", "b", "c"])))
    publisher.start()
    try:
        assert proxy.split.wait(10), "publish_many sent no EVALSHA"
        seen = admin.xrange(prefix + "batch")
    finally:
        proxy.go()
        publisher.join(10)
    assert len(seen) in (0, 3), f"a reader saw {len(seen)} of a batch of 3"
    assert [i.decode() for i, _ in admin.xrange(prefix + "batch")] == ids and len(ids) == 3


def test_a_publish_many_cut_off_half_way_stores_nothing(splitting, prefix):
    """The connection is lost after part of the batch reached Redis: the
    caller gets BackendUnavailable and nothing was stored, so sending the
    batch again stores each event once."""
    proxy, hub, admin = splitting
    proxy.armed = True
    proxy.cut()
    with pytest.raises(BackendUnavailable):
        hub.publish_many("batch", ["a", "b", "c"])
    assert proxy.split.is_set()
    assert admin.xlen(prefix + "batch") == 0
    ids = hub.publish_many("batch", ["a", "b", "c"])  # the caller tries again
    assert [(i.decode(), f[b"d"]) for i, f in admin.xrange(prefix + "batch")] == list(zip(ids, [b"a", b"b", b"c"]))


def test_reading_the_newest_id_from_redis_wakes_local_subscribers(hubs):
    """last_id() catches the mirror up from Redis when its reader is cut
    off: what it appends must reach the local subscribers at once, not at
    their next idle tick or the reader's return."""
    a = hubs()
    b = hubs(backoff=(5.0, 5.0), idle=10)  # the reader comes back 2.5-5 s after losing Redis
    sub = b.subscribe("room")
    got: list = []
    reader = threading.Thread(target=lambda: got.append(next(e for e in sub if e)), daemon=True)
    reader.start()
    wait_until(lambda: b.connected and b.store.reader.client_id is not None, what="b's reader connected")
    b.redis.client_kill_filter(_id=b.store.reader.client_id)
    wait_until(lambda: not b.connected, what="b's reader cut off")
    event_id = a.publish("room", "while b's reader is away")
    assert b.last_id("room") == event_id  # read from Redis, appended to b's mirror
    reader.join(1.5)
    assert got and got[0].id == event_id, "the subscriber was not woken by the catch-up"
    sub.close()


def _busy_redis(url: str, seconds: float) -> threading.Thread:
    """Keep Redis busy for *seconds* (a script that spins: every command
    queues behind it), from a thread; started once it runs."""
    spin = ("local t = redis.call('TIME'); local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) "
            "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop return 0")
    busy = redis.Redis.from_url(url)
    thread = threading.Thread(target=lambda: (busy.eval(spin, 0, int(seconds * 1_000_000)), busy.close()), daemon=True)
    thread.start()
    return thread


def test_a_storm_of_first_subscriptions_to_one_channel_reads_redis_once(hubs, comet_redis):
    """A reconnect storm into one room: 50 streams open the channel's first
    subscriptions in this process at once, while Redis is busy (so every one
    arrives before the history is loaded). One thread reads the history; the
    others wait for it, and all get the same events."""
    a, b = hubs(), hubs()
    ids = [a.publish("room", n) for n in range(20)]
    admin = redis.Redis.from_url(comet_redis.url)

    def reads() -> int:  # the load script reads the newest events with one XREVRANGE
        return admin.info("commandstats").get("cmdstat_xrevrange", {}).get("calls", 0)

    assert b.connected or wait_until(lambda: b.connected, what="b's reader connected")
    before = reads()
    start = threading.Barrier(51)
    got: queue.Queue = queue.Queue()

    def open_stream() -> None:
        start.wait(5)
        try:
            sub = b.subscribe("room", last_id=ids[4])
        except Exception as exc:  # (reported below)
            got.put(exc)
            return
        got.put([e.data for e in drain(sub, 15)])
        sub.close()

    threads = [threading.Thread(target=open_stream, daemon=True) for _ in range(50)]
    for thread in threads:
        thread.start()
    busy = _busy_redis(comet_redis.url, 0.2)
    start.wait(5)
    for thread in threads:
        thread.join(10)
    busy.join(5)
    results = [got.get_nowait() for _ in range(50)]
    assert all(r == list(range(5, 20)) for r in results), [r for r in results if r != list(range(5, 20))][:3]
    assert reads() - before == 1, "the history was read more than once"
    assert b.counters["loads"] == 1
    admin.close()


def test_a_load_that_fails_refuses_every_stream_waiting_for_it_with_its_503(hubs, comet_redis, prefix):
    """Redis stops answering while 20 streams open a channel's first
    subscriptions at once: one read, and every stream gets the same clear
    BackendUnavailable (a 503) within the load timeout, none hangs."""
    from comet.backends.redis import LOAD_TIMEOUT

    server = RedisServer().start()
    hub = RedisHub(server.url, prefix=prefix)
    try:
        hub.publish("room", "x")
        wait_until(lambda: hub.connected, what="the reader connected")
        start = threading.Barrier(21)
        got: queue.Queue = queue.Queue()

        def open_stream() -> None:
            start.wait(5)
            began = time.monotonic()
            try:
                hub.subscribe("room").close()
                got.put(("opened", time.monotonic() - began))
            except BackendUnavailable as exc:
                got.put((str(exc), time.monotonic() - began))

        threads = [threading.Thread(target=open_stream, daemon=True) for _ in range(20)]
        for thread in threads:
            thread.start()
        server.process.send_signal(signal.SIGSTOP)
        try:
            start.wait(5)
            for thread in threads:
                thread.join(10)
        finally:
            server.process.send_signal(signal.SIGCONT)
        results = [got.get_nowait() for _ in range(20)]
        assert len({message for message, _ in results}) == 1, results
        assert "cannot read channel 'room'" in results[0][0]
        assert max(took for _, took in results) < LOAD_TIMEOUT + 0.5, results
        assert hub.counters["loads"] == 1
    finally:
        hub.close()
        server.stop()


def test_a_reader_that_cannot_reach_redis_backs_off():
    """While Redis drops every connection (restarting, overloaded), the
    reader retries with its exponential backoff (``backoff=(first, max)``,
    with jitter): a handful of attempts in 2 s, not a tight loop that burns
    a core and floods the server the moment it is back. The listener here
    is a TCP port that accepts and closes, as a Redis going down does."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.05)
        hub = RedisHub(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", backoff=(0.1, 0.4))
        attempts = 0
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                conn.close()
                attempts += 1
        finally:
            hub.close()
    # 0.1 s doubling to 0.4 s, times 0.5-1.0: about 5-12 attempts in 2 s
    assert 2 <= attempts <= 30, attempts
