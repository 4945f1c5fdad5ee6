"""The shoutbox's private messages over HTTP: sign-in, threads only their two
users can follow, the 10,000-character limit, history, counters, one stream
for the room and the threads, and sign-out ending it."""
from __future__ import annotations

import base64
import json
import re
import time

import pytest

from comet import Hub
from comet.testing import HTTPStatusError, StreamClient, http_get, wait_until
from examples.shoutbox.app import RateLimiter, make_app
from examples.shoutbox.pm import HISTORY, MAX_TEXT, Accounts, RedisAccounts

from test_examples import Browser


@pytest.fixture
def pm_server(comet_cherrypy):
    hub = Hub(buffer_size=1000, idle=0.2)
    root, config = make_app(hub, mod_secret="s3cret", rate=RateLimiter(limit=1000, window=60), accounts=Accounts())
    server = comet_cherrypy(root, config)
    yield server, hub


class User(Browser):
    """A browser signed in as *name* (the first sign-in claims the name)."""

    def __init__(self, base: str, name: str, password: str = "pw") -> None:
        super().__init__(base)
        self.name = name.lower()
        status, _, body = self.request("/pm/signin", {"name": name, "password": password, "csrf": self.csrf()})
        assert status == 200 and f'data-me="{self.name}"' in body.decode(), body[:300]

    def csrf(self) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.request("/")[2].decode())[1]

    def page(self) -> str:
        return self.request("/")[2].decode()

    def cursor(self) -> str:
        return re.search(r'data-cursor="([^"]+)"', self.request("/")[2].decode().split('id="pm"')[1])[1]

    def send(self, to: str, text: str):
        return self.json("/pm/send", {"to": to, "text": text, "csrf": self.csrf()})

    def stream_url(self, dm: str = "", kind: str = "url") -> str:
        """A freshly signed stream URL (``kind="poll"``: its long-poll twin), as the page's URL function gets it."""
        status, _, body = self.request("/pm/url" + (f"?dm={dm}" if dm else ""))
        assert status == 200, body[:300]
        return json.loads(body)[kind]

    def stream(self, dm: str = "", last_event_id: str | None = None) -> StreamClient:
        return StreamClient(self.base + self.stream_url(dm), last_event_id=last_event_id, headers=self.cookie_header())


def pms(client: StreamClient) -> list:
    return [(e.channel, json.loads(e.data)["text"]) for e in client.events if e.name == "pm"]


def test_sign_in_claims_a_name_and_a_wrong_password_is_refused(pm_server):
    server, _ = pm_server
    User(server.url, "Ann", "right")  # spelled any way, the name is "ann"
    other = Browser(server.url)
    csrf = re.search(r'name="csrf" value="([^"]+)"', other.request("/")[2].decode())[1]
    status, _, body = other.request("/pm/signin", {"name": "ann", "password": "wrong", "csrf": csrf})
    assert status == 403 and b"is taken and that is not its password" in body
    status, _, body = other.request("/pm/signin", {"name": "a:b", "password": "x", "csrf": csrf})
    assert status == 400 and b"a name is 1-20 letters" in body
    assert other.request("/pm/signin", {"name": "cat", "password": "x", "csrf": "forged" * 4})[0] == 403
    assert 'id="pm"' not in other.request("/")[2].decode()
    assert 'data-me="ann"' in User(server.url, "ann", "right").page()


def test_only_the_two_users_can_follow_a_thread(pm_server):
    server, hub = pm_server
    ann, eve = User(server.url, "ann"), User(server.url, "eve")
    User(server.url, "bob")
    for who, dm, status, reason in [
        (eve, "ann:bob", 403, "you are not part of the thread 'ann:bob'"),
        (eve, "eve:ann,ann:bob", 403, "not part of the thread 'ann:bob'"),
        (Browser(server.url), "ann:bob", 403, "sign in"),
        (ann, "ann:ann", 400, "two different names"),
        (ann, "ann:bob:cat", 400, "two different names"),
        (ann, "ann:B%C3%96B", 400, "two different names"),
        (ann, ",".join(f"ann:u{n}" for n in range(62)), 400, "at most 61 threads"),
    ]:
        # no signed URL for it ...
        got, headers, body = http_get(f"{server.url}/pm/url?dm={dm}", headers=who.cookie_header())
        assert got == status and reason in json.loads(body)["error"], (dm, got, body[:200])
    got, _, body = http_get(f"{server.url}/pm/url?dm=ann:bob&dm=ann:bob", headers=ann.cookie_header())
    assert got == 400 and b"more than once" in body
    # ... and the stream checks its token, whoever holds the URL and whatever cookie comes with it
    eves, anns = eve.stream_url("eve:ann"), ann.stream_url("ann:bob")
    token = anns.split("token=")[1]
    for url, status, reason in [
        ("/pm/events?dm=ann:bob", 403, "a stream token is required"),
        (eves.replace("dm=eve%3Aann", "dm=ann%3Abob"), 403, "you are not part of the thread 'ann:bob'"),
        (eves.replace("dm=eve%3Aann", "dm=eve%3Aann%2Cann%3Abob"), 403, "not part of the thread 'ann:bob'"),
        (eves.replace("dm=eve%3Aann", "dm=eve%3Abob"), 403, "this token does not cover channel 'dm:bob:eve'"),
        (anns.replace("dm=ann%3Abob", "dm=ann%3Abob%2Cann%3Acat"), 403, "does not cover channel 'dm:ann:cat'"),
        (anns[:-3] + ("AAA" if not anns.endswith("AAA") else "BBB"), 403, "invalid stream token"),
        (f"/pm/events?dm=ann:bob&token={token}&token={token}", 400, "'token' was sent more than once"),
    ]:
        got, headers, body = http_get(server.url + url, headers=eve.cookie_header())
        assert got == status and reason in body.decode(), (url, got, body[:200])
        assert headers["content-type"].startswith("text/plain")
    assert hub.subscriptions == 0
    # and the thread's history is the user's own: eve asking for "bob" gets eve:bob
    ann.send("bob", "for bob only")
    assert eve.request("/pm/thread?peer=bob")[2] and json.loads(eve.request("/pm/thread?peer=bob")[2])["messages"] == []


def test_the_length_limit_and_bad_messages_are_refused_with_a_reason(pm_server):
    server, hub = pm_server
    ann = User(server.url, "ann")
    User(server.url, "bob")
    status, doc, _ = ann.send("bob", "x" * MAX_TEXT)
    assert status == 200
    for to, text, code, reason in [
        ("bob", "y" * (MAX_TEXT + 1), 400, "at most 10,000 characters; this one has 10,001"),
        ("bob", "\U0001F600" * (MAX_TEXT + 1), 400, "this one has 10,001"),
        ("bob", "  \n ", 400, "empty"),
        ("nobody", "hi", 404, "nobody has signed in as 'nobody'"),
        ("ann", "hi", 400, "someone else"),
        ("a b", "hi", 400, "a name is"),
    ]:
        status, doc, _ = ann.send(to, text)
        assert status == code and reason in doc["error"], (to, status, doc)
    status, doc, _ = Browser(server.url).json("/pm/send", {"to": "bob", "text": "hi", "csrf": ann.csrf()})
    assert status == 403  # no CSRF cookie in that browser, nor a session
    status, doc, _ = ann.json("/pm/send", {"to": "bob", "text": "hi", "csrf": ann.csrf(), "extra": "1"})
    assert status == 400 and "unexpected field 'extra'" in doc["error"]
    assert [len(e.data["text"]) for e in hub.history("dm:ann:bob")] == [MAX_TEXT]


def test_a_thread_opens_with_its_last_100_messages_and_counts_hold(pm_server):
    server, hub = pm_server
    ann, bob = User(server.url, "ann"), User(server.url, "bob")
    for n in range(HISTORY + 20):
        sender, to = (ann, "bob") if n % 3 else (bob, "ann")
        assert sender.send(to, f"m{n}")[0] == 200
    doc = json.loads(ann.request("/pm/thread?peer=BOB")[2])
    assert [m["text"] for m in doc["messages"]] == [f"m{n}" for n in range(20, HISTORY + 20)]
    assert doc["peer"] == "bob" and doc["counters"] == {"sent": 80, "received": 40}
    page = bob.page()
    assert 'data-sent="40"' in page and 'data-received="80"' in page
    assert re.search(r'data-peer="ann">.*?<span class="badge"[^>]*>80</span>', page, re.S)
    assert bob.json("/pm/read", {"peer": "ann", "csrf": bob.csrf()})[0] == 200
    assert re.search(r'data-peer="ann">.*?<span class="badge" aria-label="unread" hidden>0</span>', bob.page(), re.S)
    assert json.loads(bob.request("/pm/thread?peer=ann")[2])["unread"] == 0


def test_one_stream_follows_the_room_the_threads_and_a_new_thread(pm_server):
    server, hub = pm_server
    ann, bob = User(server.url, "ann"), User(server.url, "bob")
    assert ann.send("bob", "hello bob")[0] == 200  # a thread both pages render
    User(server.url, "cat")
    with ann.stream("ann:bob", last_event_id=ann.cursor()) as stream:
        csrf = ann.csrf()
        status, shouted, _ = ann.json("/shout", {"nick": "ann", "text": "hi room", "csrf": csrf})
        assert status == 200
        assert bob.send("ann", "hello ann")[0] == 200
        cat = User(server.url + "", "cat")
        assert cat.send("ann", "it's cat")[0] == 200  # a new thread: a notice on ann's own channel
        stream.wait_for(lambda evs: any(e.name == "thread" for e in evs))
        # ann's stream makes her a member of each channel it follows: her own join comes first, on each
        joins = [e for e in stream.events if e.name == "comet.join"]
        assert sorted(e.channel for e in joins) == ["dm:ann:bob", "presence", "shouts", "user:ann"]
        assert {e.data for e in joins} == {"ann"} and hub.members("presence") == {"ann": 1}
        news = [e for e in stream.events if not e.name.startswith("comet.")]
        assert [(e.channel, e.name) for e in news] == [("shouts", "shout"), ("dm:ann:bob", "pm"), ("user:ann", "thread")]
        assert json.loads(news[-1].data) == {"peer": "cat"}
        assert json.loads(news[0].data)["id"] == shouted["id"]  # a shout says its own id
        cursor = stream.events[-1].id
    wait_until(lambda: hub.subscriptions == 0, 2.0, what="the server saw the client go")
    # The page follows cat's thread too, from the cursor: nothing missed meanwhile.
    assert bob.send("ann", "while you switched")[0] == 200
    with ann.stream("ann:bob,ann:cat", last_event_id=cursor) as stream:
        assert cat.send("ann", "again")[0] == 200
        stream.wait_for(lambda evs: sum(e.name == "pm" for e in evs) >= 2)
        assert pms(stream) == [("dm:ann:bob", "while you switched"), ("dm:ann:cat", "again")]
    # and cat's first message, sent before ann followed the thread, is in its history
    assert [m["text"] for m in json.loads(ann.request("/pm/thread?peer=cat")[2])["messages"]] == ["it's cat", "again"]


def test_sign_out_ends_the_stream_and_revokes_the_session(pm_server):
    server, hub = pm_server
    ann = User(server.url, "ann")
    old_cookies = ann.cookie_header()
    stream = ann.stream().open()
    try:
        wait_until(lambda: hub.subscriptions == 1, 2.0)
        started = time.monotonic()
        assert ann.request("/pm/signout", {"csrf": ann.csrf()})[0] == 200  # 303 to the page
        wait_until(lambda: stream.ended, 1.0, what="the stream ended by the server")
        assert time.monotonic() - started < 1.5
        wait_until(lambda: hub.subscriptions == 0, 1.0)
    finally:
        stream.close()
    status, _, body = http_get(server.url + "/pm/url", headers=old_cookies)  # a copy of the cookie: no stream URL
    assert status == 403 and b"sign in" in body
    assert 'id="pm"' not in ann.page()


def test_an_expired_stream_url_is_refused_and_a_fresh_one_resumes_after_the_last_id(comet_cherrypy):
    """What the page's URL function does on every reconnect: a URL older
    than ``stream_url_ttl`` opens nothing (403, fetch a fresh one); a fresh
    one resumes exactly after the last id seen, on the stream and by long-poll."""
    hub = Hub(buffer_size=1000, idle=0.2)
    root, config = make_app(hub, mod_secret="s3cret", rate=RateLimiter(limit=1000, window=60), accounts=Accounts(),
                            stream_url_ttl=1)
    server = comet_cherrypy(root, config)
    ann, bob = User(server.url, "ann"), User(server.url, "bob")
    old = bob.stream_url("ann:bob")
    with StreamClient(server.url + old, last_event_id=bob.cursor()) as stream:
        ann.send("bob", "one")
        [first] = [e for e in stream.wait_for(lambda evs: any(e.name == "pm" for e in evs)) if e.name == "pm"]
    ann.send("bob", "two")  # while bob's page is away
    payload = old.split("token=")[1].split(".")[0]
    expiry = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["x"]  # readable, not secret
    wait_until(lambda: time.time() > expiry, 3.0, 0.05, what="the URL expired")
    status, _, body = http_get(server.url + old, headers=bob.cookie_header())
    assert status == 403 and body.decode().strip() == "the stream token has expired: fetch a fresh stream URL"
    with StreamClient(server.url + bob.stream_url("ann:bob"), last_event_id=first.id) as stream:
        got = stream.wait_for(lambda evs: any(e.name == "pm" for e in evs))
        assert [json.loads(e.data)["text"] for e in got if e.name == "pm"] == ["two"]
    status, _, body = http_get(server.url + bob.stream_url("ann:bob", "poll") + "&last_event_id=" + first.id)
    assert status == 200 and [json.loads(e["data"])["text"] if isinstance(e["data"], str) else e["data"]["text"]
                              for e in json.loads(body)["events"] if e.get("event") == "pm"] == ["two"]


@pytest.fixture(params=["memory", "redis"])
def accounts(request):
    if request.param == "memory":
        return Accounts()
    import redis

    client = redis.Redis.from_url(request.getfixturevalue("comet_redis").url)
    request.addfinalizer(client.close)
    return RedisAccounts(client, ttl=60, prefix=f"pm-test-{time.monotonic_ns()}:")


def test_accounts_claim_names_count_messages_and_keep_sessions(accounts):
    assert accounts.claim("ann", "pw") and accounts.claim("ann", "pw") and not accounts.claim("ann", "PW")
    assert accounts.exists("ann") and not accounts.exists("bob")
    assert accounts.delivered("ann", "bob") is True  # new to bob
    assert accounts.delivered("ann", "bob") is False
    assert accounts.delivered("bob", "ann") is False  # ann has the thread since she opened it
    assert accounts.summary("ann") == ({"sent": 2, "received": 1}, {"bob": 1})
    assert accounts.summary("bob") == ({"sent": 1, "received": 2}, {"ann": 2})
    accounts.read("bob", "ann")
    accounts.read("bob", "cat")  # no such thread: nothing made up
    assert accounts.summary("bob") == ({"sent": 1, "received": 2}, {"ann": 0})
    assert accounts.summary("nobody") == ({"sent": 0, "received": 0}, {})
    sid = accounts.sessions.open("ann")
    assert accounts.sessions.who(sid) == "ann" and accounts.sessions.valid(sid)
    accounts.sessions.close(sid)
    assert accounts.sessions.who(sid) is None
