"""Live stats: counters under a scripted load, the JSON and SSE endpoints,
exactness under threads. (The page itself renders in
tests/browser/test_examples_browser.py.)"""
from __future__ import annotations

import json
import threading

import cherrypy
import pytest


from comet import GAP, Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet.counters import Counters
from comet.stats import mount, snapshot, stats_wsgi
from comet.stream import StreamPool
from comet.testing import StreamClient, http_get, wait_until
from comet.wsgi import comet_app


@pytest.fixture
def stats_server(comet_cherrypy):
    hub = engine_plugin().add_hub(Hub(buffer_size=5, idle=0.2))

    class Root:
        @cherrypy.expose
        def say(self, channel="room", n="1"):
            for i in range(int(n)):
                hub.publish(channel, f"m{i}")
            return "ok"

        @cherrypy.expose
        @comet(transport="sse")
        def parked(self, channel="room", last_event_id=None):
            return hub.subscribe(channel, last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="sse", mode="thread")
        def threaded(self, channel="room", last_event_id=None):
            yield from hub.subscribe(channel, last_id=last_event_id)

        @cherrypy.expose
        @comet(transport="multipart")
        def parts(self, channel="room"):
            return hub.subscribe(channel)

    root = Root()
    mount(root, hubs=[hub])
    server = comet_cherrypy(root, global_config={"comet.max_streams": 2})
    yield server, hub


def stats(server) -> dict:
    status, headers, body = http_get(server.url + "/comet/stats/json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    return json.loads(body)


def test_counters_follow_a_scripted_load(stats_server):
    server, hub = stats_server
    before = stats(server)
    clients = [StreamClient(server.url + "/parked?channel=room").open() for _ in range(3)]
    clients.append(StreamClient(server.url + "/threaded?channel=side").open())
    clients.append(StreamClient(server.url + "/parts?channel=room", transport="multipart").open())
    now = wait_until(lambda: (s := stats(server))["streams"]["open"] == 5 and s, what="5 streams open")
    streams = now["streams"]
    assert streams["by_transport"] == {"sse": 4, "multipart": 1}
    assert streams["by_channel"] == {"room": 4, "side": 1}  # the generator's channel seen through yield from
    assert streams["parked"] == 4 and streams["threaded"] == 1

    http_get(server.url + "/say?channel=room&n=3")
    http_get(server.url + "/say?channel=side&n=2")
    for client in clients[:3]:
        client.wait_for(3)
    clients[3].wait_for(2)
    clients[4].wait_for(3)
    after = wait_until(lambda: (s := stats(server))["events"]["delivered"] - before["events"]["delivered"] >= 14 and s,
                       what="deliveries counted")
    assert after["events"]["published"] - before["events"]["published"] == 5
    assert after["events"]["delivered"] - before["events"]["delivered"] == 3 * 3 + 2 + 3
    assert after["bytes_written"] > before["bytes_written"]

    # clients go away: disconnects counted, streams closed
    for client in clients[:2]:
        client.close()
    gone = wait_until(lambda: (s := stats(server))["streams"]["open"] == 3 and s, what="two streams closed")
    assert gone["disconnects"] - before["disconnects"] >= 2
    assert gone["closed"] - before["closed"] >= 2

    # admission: the thread cap is 2 and one threaded stream is open
    refused_client = StreamClient(server.url + "/threaded?channel=x").open()
    with pytest.raises(Exception, match="503"):
        StreamClient(server.url + "/threaded?channel=y").open()
    assert stats(server)["refused"] - before["refused"] == 1
    refused_client.close()
    wait_until(lambda: stats(server)["streams"]["threaded"] == 1, what="the extra threaded stream closed")

    # a cursor that fell out of the buffer (5 events) is a gap
    http_get(server.url + "/say?channel=gappy&n=10")
    first = hub.history("gappy")[0].id
    with StreamClient(server.url + "/parked?channel=gappy", last_event_id="0-0") as late:
        assert late.wait_for(1)[0].name == GAP
    assert first and stats(server)["events"]["gaps"] - before["events"]["gaps"] == 1
    for client in clients[2:]:
        client.close()
    wait_until(lambda: stats(server)["streams"]["open"] == 0, what="all closed")


def test_the_stats_stream_is_an_sse_stream_of_snapshots(stats_server):
    server, _ = stats_server
    with StreamClient(server.url + "/comet/stats/stream") as client:
        first, second = client.wait_for(2, timeout=10)[:2]
        assert first.name == second.name == "stats"
        a, b = json.loads(first.data), json.loads(second.data)
        assert b["time"] > a["time"] and a["streams"]["by_channel"] == {"?": 1}  # itself, a generator
    assert http_get(server.url + "/comet/stats")[0] == 301  # CherryPy: to /comet/stats/
    status, headers, body = http_get(server.url + "/comet/stats/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"EventSource" in body


def test_counters_are_exact_under_threads():
    counters = Counters(("n",))
    hub = Hub()

    def work(i):
        for _ in range(5000):
            counters.add("n")
            hub.publish(f"ch{i}", "x")  # different channels: different locks

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert counters["n"] == 40_000 and hub.published == 40_000


def test_stats_as_plain_wsgi(comet_wsgi):
    hub = Hub()
    pool = StreamPool()
    events = comet_app(lambda environ: hub.subscribe("w"), pool=pool, transport="sse")
    stats_app = stats_wsgi(pool, [hub])

    def app(environ, start_response):
        return (stats_app if environ["PATH_INFO"] == "/stats" else events)(environ, start_response)

    server = comet_wsgi(app, pools=[pool])
    with StreamClient(server.url + "/events") as client:
        hub.publish("w", "hello")
        client.wait_for(1)
        status, _, body = http_get(server.url + "/stats")
        doc = json.loads(body)
        assert status == 200 and doc["streams"]["open"] == 1 and doc["streams"]["by_channel"] == {"w": 1}
        assert doc["events"] == {"published": 1, "delivered": 1, "gaps": 0}
    assert http_get(server.url + "/stats", method="POST", body=b"")[0] == 405
    assert snapshot(pool, [hub])["hubs"][0]["type"] == "Hub"


def basic(user: str, password: str) -> dict:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_password_guards_the_page_the_json_and_the_stream(comet_cherrypy):
    class Root:
        @cherrypy.expose
        def index(self):
            return "public page"

    root = Root()
    mount(root, password="s3cret pass")
    server = comet_cherrypy(root)
    good = basic("comet", "s3cret pass")
    for n, path in enumerate(("/comet/stats/", "/comet/stats/json", "/comet/stats/metrics", "/comet/stats/stream")):
        wrong = basic("comet", "wrong") if n % 2 else basic("admin", "s3cret pass")
        for headers, reason in (({}, b"credentials needed\n"), (wrong, b"wrong user or password\n")):
            status, answer, body = http_get(server.url + path, headers=headers)
            assert status == 401 and answer["www-authenticate"].startswith('Basic realm="comet stats"'), (path, headers)
            assert answer["content-type"] == "text/plain; charset=utf-8" and body == reason, (path, body)
        status, answer, body = http_get(server.url + path, headers={"Authorization": "Basic !!"})
        assert (status, body) == (400, b"malformed Basic credentials\n")
        if path != "/comet/stats/stream":  # (read below: it streams)
            assert http_get(server.url + path, headers=good)[0] == 200  # (and the wrong guesses are forgotten)
    assert http_get(server.url + "/")[2] == b"public page"  # the rest of the app is untouched
    with StreamClient(server.url + "/comet/stats/stream", headers=good) as client:
        assert client.wait_for(1, timeout=10)[0].name == "stats"
    with pytest.raises(ValueError, match="non-empty"):
        mount(Root(), password="")


def get_from(address: str, url: str, headers: dict) -> tuple[int, dict, bytes]:
    """GET *url* from the local *address* (127.0.0.x: another client)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10, source_address=(address, 0))
    try:
        conn.request("GET", parts.path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_password_guesses_are_throttled_per_client_address(comet_cherrypy):
    from comet import stats

    class Root:
        pass

    root = Root()
    mount(root, password="s3cret pass")
    server = comet_cherrypy(root)
    url = server.url + "/comet/stats/json"
    good, wrong = basic("comet", "s3cret pass"), basic("comet", "guess")
    for _ in range(stats.GUESSES_FREE):
        assert get_from("127.0.0.1", url, wrong)[0] == 401
    # Locked out, right password or not; plain text, and how long to wait.
    status, headers, body = get_from("127.0.0.1", url, good)
    assert (status, headers["retry-after"]) == (429, "1"), body
    assert headers["content-type"] == "text/plain; charset=utf-8" and body.startswith(b"too many wrong passwords")
    # Another address is not held up.
    assert get_from("127.0.0.2", url, good)[0] == 200
    # The next wrong guess after the wait doubles it.
    wait_until(lambda: get_from("127.0.0.1", url, {})[0] == 401, timeout=5, what="the first wait over")
    assert get_from("127.0.0.1", url, wrong)[0] == 401
    status, headers, _ = get_from("127.0.0.1", url, good)
    assert (status, headers["retry-after"]) == (429, "2")
    # The right password, once let in, starts the count afresh.
    wait_until(lambda: get_from("127.0.0.1", url, {})[0] == 401, timeout=5, what="the second wait over")
    assert get_from("127.0.0.1", url, good)[0] == 200
    for _ in range(stats.GUESSES_FREE - 1):
        assert get_from("127.0.0.1", url, wrong)[0] == 401
    assert get_from("127.0.0.1", url, good)[0] == 200


def test_parallel_guesses_are_counted_one_by_one(comet_cherrypy, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from comet import stats

    monkeypatch.setattr(stats, "FIRST_WAIT", 60.0)  # (longer than the burst takes on a loaded machine)
    class Root:
        pass

    root = Root()
    mount(root, password="s3cret pass")
    server = comet_cherrypy(root)
    url = server.url + "/comet/stats/json"
    with ThreadPoolExecutor(8) as workers:
        statuses = list(workers.map(lambda n: get_from("127.0.0.1", url, basic("comet", f"guess{n}"))[0], range(40)))
    assert statuses.count(401) == stats.GUESSES_FREE and statuses.count(429) == 40 - stats.GUESSES_FREE


def test_stats_wsgi_password():
    app = stats_wsgi(StreamPool(), password="pw")
    statuses = []

    def ask(headers):
        environ = {"REQUEST_METHOD": "GET", **{"HTTP_" + k.upper(): v for k, v in headers.items()}}
        body = b"".join(app(environ, lambda status, hdrs: statuses.append((status, dict(hdrs)))))
        return statuses[-1], body

    (status, headers), _ = ask({})
    assert status.startswith("401") and "Basic" in headers["WWW-Authenticate"]
    assert ask(basic("comet", "nope"))[0][0].startswith("401")
    (status, _), body = ask(basic("comet", "pw"))
    assert status.startswith("200") and json.loads(body)["streams"]["open"] == 0


def test_stats_wsgi_throttles_guesses_per_remote_addr():
    from comet import stats

    app = stats_wsgi(StreamPool(), password="pw")

    def ask(address, headers):
        got = []
        environ = {"REQUEST_METHOD": "GET", "REMOTE_ADDR": address,
                   **{"HTTP_" + k.upper(): v for k, v in headers.items()}}
        body = b"".join(app(environ, lambda status, hdrs: got.append((status, dict(hdrs)))))
        return got[0][0][:3], got[0][1], body

    for _ in range(stats.GUESSES_FREE):
        status, headers, body = ask("10.0.0.1", basic("comet", "nope"))
        assert (status, body) == ("401", b"wrong user or password\n") and "Basic" in headers["WWW-Authenticate"]
    status, headers, body = ask("10.0.0.1", basic("comet", "pw"))
    assert (status, headers["Retry-After"]) == ("429", "1") and headers["Content-Type"].startswith("text/plain")
    assert ask("10.0.0.2", basic("comet", "pw"))[0] == "200"


def test_a_client_is_keyed_by_its_ipv4_address_or_its_ipv6_64():
    from comet.stats import client_key

    assert client_key("203.0.113.9") == "203.0.113.9" != client_key("203.0.113.10")
    # One IPv6 host is given a /64 and may send from any address in it.
    assert client_key("2001:db8:0:7::1") == client_key("2001:db8:0:7:ffff:ffff:ffff:ffff") == "2001:db8:0:7::/64"
    assert client_key("2001:db8:0:8::1") == "2001:db8:0:8::/64"  # the next /64: someone else
    assert client_key("2001:DB8:0:7:0::1") == "2001:db8:0:7::/64"  # one spelling per network
    assert client_key("::ffff:198.51.100.4") == "198.51.100.4" != client_key("::ffff:198.51.100.5")
    assert client_key("fe80::1%eth0") == "fe80::/64" and client_key("::1") == "::/64"
    assert client_key("") == "" and client_key("unix-socket") == "unix-socket"


def wsgi_asker(app):
    def ask(address, headers):
        got = []
        environ = {"REQUEST_METHOD": "GET", "REMOTE_ADDR": address,
                   **{"HTTP_" + k.upper(): v for k, v in headers.items()}}
        body = b"".join(app(environ, lambda status, hdrs: got.append((status, dict(hdrs)))))
        return int(got[0][0][:3]), got[0][1], body

    return ask


def test_an_ipv6_client_rotating_through_its_64_is_one_client():
    from comet import stats

    ask = wsgi_asker(stats_wsgi(StreamPool(), password="pw"))
    wrong, good = basic("comet", "nope"), basic("comet", "pw")
    for n in range(stats.GUESSES_FREE):  # a new address for each guess
        assert ask(f"2001:db8:0:7::{n + 1:x}", wrong)[0] == 401
    status, headers, _ = ask("2001:db8:0:7:abcd::99", good)
    assert (status, headers["Retry-After"]) == (429, "1")
    assert ask("2001:db8:0:8::1", good)[0] == 200  # the next /64 is not held up
    for _ in range(stats.GUESSES_FREE):  # an IPv4 client seen through a dual-stack socket is itself
        assert ask("::ffff:192.0.2.1", wrong)[0] == 401
    assert ask("192.0.2.1", good)[0] == 429 and ask("192.0.2.2", good)[0] == 200


def guard_asker(guard):
    def ask(address, auth):
        answer = guard.refusal(auth["Authorization"], address)
        return 200 if answer is None else int(answer[0][:3])

    return ask


def test_a_waiting_client_is_never_forgotten_to_make_room(monkeypatch):
    from comet import stats

    monkeypatch.setattr(stats, "MAX_ADDRESSES", 4)
    monkeypatch.setattr(stats, "FIRST_WAIT", 60.0)  # (no wait ends during the test)
    guard = stats._Guard("comet", "pw")
    ask = guard_asker(guard)
    wrong, good = basic("comet", "nope"), basic("comet", "pw")
    for _ in range(stats.GUESSES_FREE):
        ask("10.0.0.1", wrong)
    assert ask("10.0.0.1", good) == 429  # the oldest record, serving a wait
    # Many more clients, one wrong guess each (an attacker's other
    # addresses): records without a wait make room for the next ones...
    for n in range(2, 40):
        assert ask(f"10.0.1.{n}", wrong) == 401
        assert len(guard._wrong) <= stats.MAX_ADDRESSES
    assert ask("10.0.0.1", good) == 429  # ... the waiting one stays
    assert ask("10.0.1.39", good) == 200

    # Every record serving a wait: newcomers share one record, throttled
    # like any client; those already known keep theirs.
    for n in (2, 3, 4):
        for _ in range(stats.GUESSES_FREE):
            ask(f"10.0.0.{n}", wrong)
        assert ask(f"10.0.0.{n}", good) == 429
    for n in range(stats.GUESSES_FREE - 1):
        assert ask(f"10.0.2.{n}", wrong) == 401
    assert ask("10.0.2.99", good) == 200  # (one newcomer's right password does not vouch for the crowd)
    assert ask("10.0.2.100", wrong) == 401
    status, headers, body = guard.refusal(good["Authorization"], "10.0.3.1")
    assert status.startswith("429") and ("Retry-After", "60") in headers and body.startswith(b"too many wrong passwords")
    assert ask("10.0.0.1", good) == 429
    assert len(guard._wrong) == stats.MAX_ADDRESSES + 1  # (the four, and the crowd's record)


def test_records_whose_wait_is_over_make_room(monkeypatch):
    from comet import stats

    monkeypatch.setattr(stats, "MAX_ADDRESSES", 2)
    monkeypatch.setattr(stats, "FIRST_WAIT", 0.2)
    guard = stats._Guard("comet", "pw")
    ask = guard_asker(guard)
    wrong, good = basic("comet", "nope"), basic("comet", "pw")
    for address in ("10.0.0.1", "10.0.0.2"):
        for _ in range(stats.GUESSES_FREE):
            ask(address, wrong)
    for n in range(stats.GUESSES_FREE):
        assert ask(f"10.0.0.{n + 3}", wrong) == 401
    assert "10.0.0.3" not in guard._wrong  # counted with the crowd: the table is full of waits
    assert ask("10.0.1.1", good) == 429
    # (asking without credentials is no guess: the records stay as they are)
    wait_until(lambda: ask("10.0.0.2", {"Authorization": ""}) == 401, timeout=5, what="the waits over")
    assert ask("10.0.1.2", wrong) == 401
    assert "10.0.1.2" in guard._wrong and "10.0.0.1" not in guard._wrong
    assert guard._wrong["*"][0] == stats.GUESSES_FREE  # the crowd's count is kept: its next wait doubles


def test_the_crowds_later_wait_does_not_keep_the_table_full(monkeypatch):
    """A full table frees the records whose wait is over as soon as the
    first of them ends, even while the crowd (the newcomers of a full table)
    serves a wait that ends later: a newcomer then gets a record of its own,
    not the crowd's 429."""
    import time

    from comet import stats

    monkeypatch.setattr(stats, "MAX_ADDRESSES", 2)
    monkeypatch.setattr(stats, "FIRST_WAIT", 1.0)
    guard = stats._Guard("comet", "pw")
    ask = guard_asker(guard)
    wrong = basic("comet", "nope")
    started = time.monotonic()
    for address in ("10.0.0.1", "10.0.0.2"):
        for _ in range(stats.GUESSES_FREE):
            ask(address, wrong)
    # Most of their wait later, newcomers earn the crowd a wait of its own,
    # and one more finds the table full (429, unless this machine was slow).
    wait_until(lambda: time.monotonic() > started + 0.7, timeout=5, what="most of the first waits")
    for n in range(stats.GUESSES_FREE + 1):
        ask(f"10.0.0.{n + 3}", wrong)
    wait_until(lambda: ask("10.0.0.2", {"Authorization": ""}) == 401, timeout=5, what="the first waits over")
    assert guard.refusal(wrong["Authorization"], "10.0.1.2")[0].startswith("401")
    assert "10.0.1.2" in guard._wrong


def test_ipv6_clients_are_throttled_over_the_network(comet_cherrypy):
    import socket

    from comet import stats

    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")

    class Root:
        pass

    root = Root()
    mount(root, password="s3cret pass")
    server = comet_cherrypy(root, global_config={"server.socket_host": "::1"})
    port = server.url.rsplit(":", 1)[1]
    url = f"http://[::1]:{port}/comet/stats/json"
    good, wrong = basic("comet", "s3cret pass"), basic("comet", "guess")
    assert get_from("::1", url, good)[0] == 200
    for _ in range(stats.GUESSES_FREE):
        assert get_from("::1", url, wrong)[0] == 401
    status, headers, body = get_from("::1", url, good)
    assert (status, headers["retry-after"]) == (429, "1"), body
