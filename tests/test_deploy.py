"""The deployment of docs/deployment.md, for real: one redis-server, three
processes of each example app, nginx in front with deploy/nginx-comet.conf.

Processes are addressed directly (by port) where a test needs to say "on
process 1" and "on process 3", and through nginx where the point is that the
client does not care which process serves it.
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from comet.testing import AppProcess, NginxServer, RedisServer, StreamClient, http_get, wait_until

from storm import Crowd, Storm, h2storm, storm
from test_backlog import backlog_of, somaxconn

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "deploy" / "nginx-comet.conf"
MAIN = ROOT / "deploy" / "nginx.conf"
STORM = 1000  # browsers opening their stream at once (#29: all within 5 s)


class Cluster:
    def __init__(self, redis_server: RedisServer, module: str, extra: tuple[str, ...] = ()) -> None:
        # As deploy/comet@.service starts them (its defaults: threads, backlog) ...
        self.apps = [AppProcess(["-m", module, "--redis", redis_server.url, *extra], cwd=ROOT) for _ in range(3)]
        for app in self.apps:
            app.start()
        # ... behind nginx with deploy/nginx.conf and the site deploy/nginx-comet.conf.
        self.nginx = NginxServer(SITE, [app.port for app in self.apps], main=MAIN).start()

    def by_port(self, port: int) -> AppProcess:
        return next(app for app in self.apps if app.port == port)

    def close(self) -> None:
        self.nginx.close()
        for app in self.apps:
            code = app.stop()
            assert code in (0, None), f"app on {app.port} exited with {code}:\n{app.log()[-3000:]}"
            app.close()


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def shoutbox(redis_server):
    # As deployed behind nginx: the rate limit counts the client's address.
    cluster = Cluster(redis_server, "examples.shoutbox", ("--mod-secret", "letmein", "--behind-proxy"))
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def lobby(redis_server):
    cluster = Cluster(redis_server, "examples.lobby_game",
                      ("--size", "2", "--grace", "0.5", "--countdown", "1", "--lease", "1.5"))
    yield cluster
    cluster.close()


def post(base: str, path: str, fields: dict, cookies: dict | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookies:
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    status, head, body = http_get(base + path, headers, method="POST", body=urllib.parse.urlencode(fields).encode())
    return status, head, json.loads(body) if body.startswith(b"{") else {"raw": body.decode(errors="replace")}


def shout(base: str, text: str, token: str | None = None, source: str | None = None) -> tuple[int, dict]:
    """POST /shout with a double-submit CSRF token, from *source* (a random
    loopback address, so its own rate-limit bucket, unless given)."""
    import http.client

    token = token or secrets.token_urlsafe(24)
    source = source or f"127.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", "/shout", urllib.parse.urlencode({"nick": "tester", "text": text, "csrf": token}),
                     {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"csrf={token}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def shout_ok(base: str, text: str, timeout: float = 20.0) -> str:
    """Shout until it is accepted (503 while Redis restarts); its id."""
    result = {}

    def attempt():
        status, doc = shout(base, text)
        if status == 200:
            result["id"] = doc["id"]
            return True
        assert status == 503, (status, doc)
        return False

    wait_until(attempt, timeout, 0.1, what=f"shout {text!r} accepted")
    return result["id"]


def shouts(client: StreamClient) -> list:
    return [e for e in client.events if e.name == "shout"]


def test_a_shout_on_process_3_reaches_a_client_on_process_1(shoutbox):
    one, _, three = shoutbox.apps
    with StreamClient(one.url + "/events") as client:
        status, doc = shout(three.url, "from three")
        assert status == 200
        event = client.wait_for(lambda evs: any(e.name == "shout" and e.id == doc["id"] for e in evs), timeout=10)[-1]
        assert json.loads(event.data)["text"] == "from three"
    # and a page rendered by process 2 lists it
    status, _, body = http_get(shoutbox.apps[1].url + "/")
    assert status == 200 and b"from three" in body


def test_reconnect_through_nginx_to_another_process_resumes_without_loss(shoutbox):
    nginx = shoutbox.nginx
    first = StreamClient(nginx.url + "/events").open()
    served_by = int(first.headers["x-upstream"].rsplit(":", 1)[1])
    sent = [shout_ok(nginx.url, f"before {i}") for i in range(3)]
    first.wait_for(lambda evs: [e.id for e in shouts(first)][-3:] == sent, timeout=10)
    last_seen = first.events[-1].id

    victim = shoutbox.by_port(served_by)
    assert victim.stop() == 0  # the process serving the stream goes away (SIGTERM) ...
    first.wait_closed(10)
    first.close()
    sent += [shout_ok(nginx.url, f"while away {i}") for i in range(3)]  # ... events keep coming ...
    try:
        with StreamClient(nginx.url + "/events", last_event_id=last_seen) as again:  # ... and the client comes back
            assert int(again.headers["x-upstream"].rsplit(":", 1)[1]) != served_by
            sent += [shout_ok(nginx.url, "after")]
            again.wait_for(lambda evs: sent[-1] in [e.id for e in evs], timeout=10)
            received = [e.id for e in shouts(first)] + [e.id for e in shouts(again)]
            assert received[-len(sent):] == sent  # in order, nothing lost
            assert len(set(received)) == len(received)  # nothing twice
    finally:
        victim.start()


def test_redis_restart_mid_stream_loses_nothing(shoutbox, redis_server):
    with StreamClient(shoutbox.nginx.url + "/events") as client:
        sent = [shout_ok(shoutbox.nginx.url, f"pre {i}") for i in range(3)]
        client.wait_for(lambda evs: sent[-1] in [e.id for e in evs], timeout=10)
        redis_server.stop()
        status, doc = shout(shoutbox.nginx.url, "into the void")
        assert status == 503 and "unreachable" in doc["error"]  # a clear error, not a hang
        time.sleep(0.5)  # the stream outlives the outage (heartbeats are local) ...
        assert not client.ended
        redis_server.start()
        sent += [shout_ok(shoutbox.nginx.url, f"post {i}") for i in range(3)]
        client.wait_for(lambda evs: sent[-1] in [e.id for e in evs], timeout=20)
        received = [e.id for e in shouts(client)]
        assert received[-6:] == sent and len(set(received)) == len(received)
        assert not client.ended and client.requests == 1  # ... the very same stream


def test_https_with_http2_carries_a_live_stream(shoutbox):
    """curl --http2 against the TLS listener of deploy/nginx-comet.conf:
    HTTP/2 to the client, events live through it."""
    curl = subprocess.Popen(
        ["curl", "--http2", "--silent", "--show-error", "--no-buffer", "--include", "--max-time", "20",
         "--cacert", shoutbox.nginx.certificate, shoutbox.nginx.https_url + "/events"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = bytearray()

    def read() -> None:
        for chunk in iter(lambda: curl.stdout.read1(4096), b""):
            out.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: b"\r\n\r\n" in out, timeout=10, what="the response head")
        head = bytes(out).split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/2 200"), head
        assert "content-type: text/event-stream" in head.lower(), head
        text = f"over h2 {secrets.token_hex(4)}"
        shout_ok(shoutbox.nginx.url, text)
        wait_until(lambda: text.encode() in out, timeout=10, what=f"{text!r} through HTTP/2")
    finally:
        curl.kill()
        curl.wait(10)
        reader.join(5)
        curl.stdout.close()
        curl.stderr.close()


def test_redirects_and_stats_through_nginx_keep_its_address(shoutbox):
    status, headers, _ = http_get(shoutbox.nginx.url + "/comet/stats")
    assert status == 301 and headers["location"] == shoutbox.nginx.url + "/comet/stats/"
    status, _, body = http_get(shoutbox.nginx.url + "/comet/stats/json")
    assert status == 200 and json.loads(body)["hubs"][0]["type"] == "RedisHub"


def head_from(source: str, url: str) -> bytes:
    """The response head nginx sends a client at *source* (another loopback
    address stands in for a remote client)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                break
            head += data
    return head.split(b"\r\n\r\n", 1)[0]


def status_from(source: str, url: str) -> int:
    return int(head_from(source, url).split(b" ", 2)[1])


def test_other_clients_see_no_internal_address(shoutbox):
    """X-Upstream (which process served) is for the proxy's own host only."""
    assert b"x-upstream: 127.0.0.1:" in head_from("127.0.0.1", shoutbox.nginx.url + "/").lower()
    remote = head_from("127.0.0.2", shoutbox.nginx.url + "/").lower()
    assert remote.startswith(b"http/1.1 200") and b"x-upstream" not in remote and b"127.0.0.1" not in remote, remote


def test_the_plain_http_listener_is_local_and_the_main_config_sized_for_streams():
    """deploy/nginx-comet.conf's plain-HTTP listener is for this host only
    (its comment says local); deploy/nginx.conf lifts Debian's 768
    connections per worker and bounds a reload."""
    site = SITE.read_text()
    plain = [line.split() for line in site.splitlines() if line.strip().startswith("listen") and "ssl" not in line]
    assert plain and all(words[1].startswith(("127.0.0.1:", "[::1]:")) for words in plain), plain
    main = MAIN.read_text()
    assert int(re.search(r"(?m)^\s*worker_connections\s+(\d+);", main)[1]) >= 10_000
    assert re.search(r"(?m)^worker_shutdown_timeout\s+\d+s;", main)


def streams_open(cluster: Cluster) -> int:
    """Streams the app processes hold now (each one's /comet/stats/json)."""
    return sum(json.loads(http_get(app.url + "/comet/stats/json")[2])["streams"]["open"] for app in cluster.apps)


def held_by_nginx(port: int) -> int:
    """Client connections nginx holds on its *port* now: established, or
    closed by the client and not yet by nginx (/proc/net/tcp, this host)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(int(row[1].rsplit(":", 1)[1], 16) == port and row[3] in ("01", "08") for row in rows)


def released(cluster: Cluster, streams: int, connections: int) -> None:
    """Once a storm is closed, nginx holds no more client connections than
    *connections* and the apps no more streams than *streams* (before it)."""
    port = cluster.nginx.tls_port
    assert port is not None
    wait_until(lambda: held_by_nginx(port) <= connections, 10, 0.1, what="nginx releasing the storm's connections")
    wait_until(lambda: streams_open(cluster) <= streams, 20, 0.1, what="the apps releasing the storm's streams")


S = TypeVar("S", bound=Storm)


@contextlib.contextmanager
def storming(cluster: Cluster, launch: Callable[..., S]) -> Iterator[tuple[S, int, int]]:
    """*STORM* clients opened at once by *launch* (:func:`storm`,
    :func:`h2storm`) on nginx's TLS listener; yields them with the streams
    the apps and the connections nginx held before. Closed at the end, and
    then nginx and the apps must hold none of them (:func:`released`)."""
    nginx = cluster.nginx
    assert nginx.tls_port is not None
    streams, connections = streams_open(cluster), held_by_nginx(nginx.tls_port)
    result = launch(nginx.https_url + "/events", STORM, deadline=5.0, cafile=nginx.certificate)
    try:
        yield result, streams, connections
    finally:
        result.close()
    released(cluster, streams, connections)


def test_a_storm_of_streams_through_nginx_all_stream_within_5_s(shoutbox):
    """1,000 browsers open their stream at the same moment (a deploy, a
    network blip), over TLS to nginx as deployed: every one streams within
    5 s. Before #29: with CherryPy's backlog of 5, 27 of 100 had no
    response after 30 s. Closed, nginx and the apps hold none of them."""
    with storming(shoutbox, storm) as (result, _, _):
        assert result.all_open, result.summary()


def test_a_storm_of_http2_streams_through_nginx_all_stream_within_5_s_and_hear_a_shout(shoutbox):
    """The same storm as browsers make it over HTTPS: 1,000 clients, each its
    own TLS connection negotiating HTTP/2 (ALPN h2; one that got HTTP/1.1
    fails), one stream on each. Every one streams within 5 s, a shout then
    reaches all 1,000, and once they close, nginx and the apps hold none."""
    nginx = shoutbox.nginx
    with storming(shoutbox, h2storm) as (result, streams, connections):
        assert result.all_open, result.summary()
        assert held_by_nginx(nginx.tls_port) >= connections + STORM  # one connection each, not shared
        wait_until(lambda: streams_open(shoutbox) >= streams + STORM, 10, 0.1, what="every stream held by an app")
        text = f"h2 storm {secrets.token_hex(4)}"
        posted = time.monotonic()
        shout_ok(nginx.url, text)
        slowest = max(result.wait_all_received(text, 10)) - posted
        assert not result.lost, result.summary()
        print(f"{result.summary()}; the shout reached all {STORM} in {slowest:.2f}s")


def test_nginx_reload_with_open_streams_finishes_and_every_client_resumes(shoutbox):
    """``nginx -s reload`` with 1,000 streams open: the old workers hand over
    within deploy/nginx.conf's worker_shutdown_timeout (10 s) instead of
    keeping the streams forever, and every client (reconnecting as
    EventSource does, with Last-Event-ID) has every shout, in order, once."""
    nginx = shoutbox.nginx
    crowd = Crowd(nginx.https_url + "/events", STORM, cafile=nginx.certificate).start()
    try:
        crowd.wait(lambda: all(seen.connects for seen in crowd.seen), 30, "every client streaming")
        sent = [shout_ok(nginx.url, f"reload {i} before") for i in range(2)]
        old = {pid for pid, _ in nginx.workers()}
        assert old
        reloaded = time.monotonic()
        nginx.reload()
        sent += [shout_ok(nginx.url, f"reload {i} during") for i in range(2)]
        wait_until(lambda: not old & {pid for pid, _ in nginx.workers()}, 30, 0.1, what="the old workers gone")
        took = time.monotonic() - reloaded
        sent += [shout_ok(nginx.url, f"reload {i} after") for i in range(2)]

        def ids(events):
            return [event_id for event_id, name, _ in events if name == "shout" and event_id in sent]

        crowd.wait(lambda: all(ids(events)[-1:] == sent[-1:] for events in crowd.snapshot()), 30,
                   "the last shout at every client")
        snapshot = crowd.snapshot()
        assert all(ids(events) == sent for events in snapshot), [ids(e) for e in snapshot if ids(e) != sent][:3]
        reconnected = sum(seen.connects > 1 for seen in crowd.seen)
        assert reconnected == STORM, f"{reconnected} of {STORM} clients were handed over"
        assert took < 25, f"old workers took {took:.1f}s (worker_shutdown_timeout 10 s)"
    finally:
        crowd.close()


def test_the_stats_page_is_for_the_proxys_host_only(shoutbox):
    for path in ("/comet/stats", "/comet/stats/", "/comet/stats/json", "/comet/stats/stream"):
        assert status_from("127.0.0.2", shoutbox.nginx.url + path) == 403, path
    assert status_from("127.0.0.2", shoutbox.nginx.url + "/") == 200  # the app itself is public
    assert status_from("127.0.0.1", shoutbox.nginx.url + "/comet/stats/json") == 200


def test_rate_limit_and_moderator_cookie_hold_across_processes(shoutbox):
    token = secrets.token_urlsafe(24)
    codes = [shout(app.url, f"spam {i}", token, "127.0.0.3")[0] for i, app in enumerate(shoutbox.apps * 2)]
    assert codes == [200] * 5 + [429]  # 5 per window, counted in Redis, whichever process

    one, two, _ = shoutbox.apps
    status, head, _ = http_get(one.url + "/login", {"Cookie": f"csrf={token}", "Content-Type": "application/x-www-form-urlencoded"},
                               method="POST", body=urllib.parse.urlencode({"secret": "letmein", "csrf": token}).encode())
    assert status == 303
    mod = head["set-cookie"].split("mod=", 1)[1].split(";", 1)[0]
    status, doc = shout(two.url, "delete me")
    status, _, result = post(two.url, "/delete", {"id": doc["id"], "csrf": token}, {"csrf": token, "mod": mod})
    assert status == 200 and result == {"ok": True}
    status, _, body = http_get(shoutbox.apps[2].url + "/")
    assert b"delete me" not in body


def test_lobby_presence_and_a_round_across_processes(lobby):
    one, two, three = lobby.apps
    name = "x" + secrets.token_hex(4)
    status, _, ann = post(one.url, "/join", {"name": name, "player": "ann"})
    assert status == 200, ann
    with StreamClient(f"{one.url}/events/{name}?player={ann['token']}") as on_one:
        status, _, bob = post(two.url, "/join", {"name": name, "player": "bob"})
        assert status == 200, bob
        with StreamClient(f"{two.url}/events/{name}?player={bob['token']}") as on_two:
            def latest(client):
                states = [json.loads(e.data) for e in client.events if e.name == "state"]
                return max(states, key=lambda s: s["version"]) if states else None

            # both online, seen from both processes; the lobby is full (size 2), so it starts
            for client in (on_one, on_two):
                client.wait_for(lambda evs: (s := latest(client)) and s["players"] == [
                    {"name": "ann", "online": True}, {"name": "bob", "online": True}], timeout=10)
            on_two.wait_for(lambda evs: latest(on_two)["phase"] == "go", timeout=15)
            status, _, said = post(three.url, "/click", {"name": name, "token": bob["token"]})
            assert status == 200 and said == {"message": "you win!"}
            on_one.wait_for(lambda evs: latest(on_one)["winner"] == "bob", timeout=10)
        # bob's page (on process 2) closes: ann (on process 1) sees him go
        on_one.wait_for(lambda evs: [p["name"] for p in latest(on_one)["players"]] == ["ann"], timeout=10)


def test_a_crashed_process_s_players_go_offline_then_leave(lobby):
    """Connections are counted per process under a lease: when a process
    dies without cleaning up (SIGKILL), the others notice and its players
    leave, instead of haunting the lobby forever."""
    one, two, _ = lobby.apps
    name = "c" + secrets.token_hex(4)
    status, _, ann = post(one.url, "/join", {"name": name, "player": "ann"})
    assert status == 200
    on_one = StreamClient(f"{one.url}/events/{name}?player={ann['token']}").open()
    status, _, bob = post(two.url, "/join", {"name": name, "player": "bob"})
    with StreamClient(f"{two.url}/events/{name}?player={bob['token']}") as on_two:
        def players():
            states = [json.loads(e.data) for e in on_two.events if e.name == "state"]
            return max(states, key=lambda s: s["version"])["players"] if states else None

        on_two.wait_for(lambda evs: players() == [{"name": "ann", "online": True}, {"name": "bob", "online": True}],
                        timeout=10)
        one.kill()  # process 1 crashes: no on_close, no cleanup
        on_one.close()
        try:
            # lease 1.5 s + a sweep (0.5 s) + grace 0.5 s, with room for a busy machine
            on_two.wait_for(lambda evs: players() == [{"name": "bob", "online": True}], timeout=15)
        finally:
            one.start()


def test_the_systemd_units_command_line_serves(redis_server):
    """deploy/comet@.service's ExecStart, with this checkout for /srv/comet
    and a free port for %i, starts a working app on the shared Redis."""
    unit = (ROOT / "deploy" / "comet@.service").read_text()
    command = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = command.replace("redis://127.0.0.1:6379/0", redis_server.url).split()
    assert argv[0] == "/srv/comet/.venv/bin/python" and "%i" in argv
    app = AppProcess([a.replace("%i", "{port}") for a in argv[1:]], cwd=ROOT)
    with app:
        status, _, body = http_get(app.url + "/")
        assert status == 200 and b"Lobby" in body
        assert backlog_of(app.port) == min(4096, somaxconn())  # --backlog: sized for a storm
        assert app.stop() == 0  # KillSignal=SIGTERM: a clean exit


def test_a_private_message_sent_through_one_process_reaches_a_page_on_another(shoutbox):
    """ann on process 1, bob's page on process 3 (and through nginx): the
    sessions, the thread and the counts are in Redis, the message on the
    Redis hub; a sign-out on process 2 ends bob's stream on process 3."""
    from test_examples_pm import User

    one, two, three = shoutbox.apps
    tag = secrets.token_hex(3)
    ann, bob = User(one.url, f"ann{tag}"), User(three.url, f"bob{tag}")
    thread = f"{ann.name}:{bob.name}"
    with bob.stream(thread, last_event_id=bob.cursor()) as on_three, \
            StreamClient(shoutbox.nginx.url + bob.stream_url(thread), headers=bob.cookie_header()) as via_nginx:
        status, doc, _ = ann.send(bob.name, "from process one")
        assert status == 200, doc
        for client in (on_three, via_nginx):
            got = client.wait_for(lambda evs: any(e.name == "pm" for e in evs), timeout=10)
            [event] = [e for e in got if e.name == "pm"]
            assert event.channel == f"dm:{thread}" and json.loads(event.data)["text"] == "from process one"
        on_three.wait_for(lambda evs: any(e.name == "thread" for e in evs), timeout=10)  # new to bob
        ann.base = two.url
        assert ann.send(bob.name, "from process two")[0] == 200
        on_three.wait_for(lambda evs: len([e for e in evs if e.name == "pm"]) == 2, timeout=10)
        # another user's follow of the thread is refused on every process
        eve = User(two.url, f"eve{tag}")
        assert http_get(f"{three.url}/pm/url?dm={thread}", headers=eve.cookie_header())[0] == 403
        # counts and the thread's history, on a third process
        bob.base = two.url
        page = bob.page()
        assert 'data-received="2"' in page and re.search(rf'data-peer="{ann.name}">.*?>2</span>', page, re.S)
        assert [m["text"] for m in json.loads(bob.request(f"/pm/thread?peer={ann.name}")[2])["messages"]] == [
            "from process one", "from process two"]
        # bob signs out on process 2: his streams on process 3 and behind nginx end
        copied = bob.cookie_header()
        assert bob.request("/pm/signout", {"csrf": bob.csrf()})[0] == 200
        on_three.wait_closed(5)
        via_nginx.wait_closed(5)
    assert http_get(f"{three.url}/pm/url", headers=copied)[0] == 403  # the session is revoked everywhere
