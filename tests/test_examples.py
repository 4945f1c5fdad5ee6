"""The example apps over HTTP, with comet.testing against live servers."""
import http.cookiejar
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import cherrypy
import pytest

from comet import Hub
from comet.cherrypy_tool import engine_plugin
from comet.testing import StreamClient, http_get, wait_until
from examples.lobby_game.app import make_app as make_lobby
from examples.shoutbox.app import RateLimiter, make_app as make_shoutbox


class Browser:
    """Cookies and form posts, like a browser tab; never raises on 4xx."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, path: str, fields: dict | None = None):
        data = urllib.parse.urlencode(fields).encode() if fields is not None else None
        try:
            with self.opener.open(self.base + path, data=data, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, path: str, fields: dict):
        status, headers, body = self.request(path, fields)
        return status, json.loads(body), headers

    def cookie_header(self) -> dict:
        return {"Cookie": "; ".join(f"{c.name}={c.value}" for c in self.jar)}


@pytest.fixture
def lobby_server(comet_cherrypy):
    hub = Hub(idle=0.2)
    root, config = make_lobby(hub, size=3, grace=0.5, countdown=1, go_delay=(0.05, 0.1))
    server = comet_cherrypy(root, config)
    yield server, hub, root
    cherrypy.engine.unsubscribe("stop", root.lobbies.close)
    cherrypy.engine.unsubscribe("start", root.lobbies.start)


def states(client):
    return [e for e in client.events if e.name == "state"]


def last_state(client):
    return json.loads(states(client)[-1].data)


def test_players_join_see_each_other_and_play_a_round(lobby_server):
    server, hub, root = lobby_server
    b = Browser(server.url)
    seats = {}
    clients = {}
    try:
        for name in ["ann", "bob"]:
            status, doc, _ = b.json("/join", {"name": "room1", "player": name})
            assert status == 200 and doc["name"] == name
            seats[name] = doc["token"]
            clients[name] = StreamClient(f"{server.url}/events/room1?player={doc['token']}").open()
        wait_until(lambda: all(len(last_state(c)["players"]) == 2 for c in clients.values() if states(c)),
                   what="both see two players")
        # the third player fills the lobby: the game starts for everyone
        status, doc, _ = b.json("/join", {"name": "room1", "player": "cat"})
        seats["cat"] = doc["token"]
        clients["cat"] = StreamClient(f"{server.url}/events/room1?player={doc['token']}").open()
        for c in clients.values():
            c.wait_for(lambda evs: any(e.name == "state" and json.loads(e.data)["phase"] == "go" for e in evs), timeout=10)
        # each client received the same "go" state event, by id
        go_ids = {next(e.id for e in states(c) if json.loads(e.data)["phase"] == "go") for c in clients.values()}
        assert len(go_ids) == 1
        assert b.json("/click", {"name": "room1", "token": seats["bob"]})[1] == {"message": "you win!"}
        assert b.json("/click", {"name": "room1", "token": seats["bob"]})[1] == {"message": "you win!"}  # double click
        assert b.json("/click", {"name": "room1", "token": seats["ann"]})[1] == {"message": "too late: bob won"}
        for c in clients.values():
            c.wait_for(lambda evs: any(e.name == "state" and json.loads(e.data)["winner"] == "bob" for e in evs))
        # only the host may start the next round; late joiners wait
        assert b.json("/start", {"name": "room1", "token": seats["bob"]})[0] == 403
        assert b.json("/join", {"name": "room1", "player": "dan"})[0] == 409
        assert b.json("/start", {"name": "room1", "token": seats["ann"]})[0] == 200
        for c in clients.values():
            c.wait_for(lambda evs: any(e.name == "state" and json.loads(e.data)["round"] == 2 for e in evs))
        # an early click is a false start: that player cannot win this round
        assert "too early" in b.json("/click", {"name": "room1", "token": seats["cat"]})[1]["message"]
        clients["ann"].wait_for(lambda evs: json.loads(states(clients["ann"])[-1].data)["false_starts"] == ["cat"])
    finally:
        for c in clients.values():
            c.close()


def test_presence_leave_on_disconnect_and_seat_kept_on_reconnect(lobby_server):
    server, hub, root = lobby_server
    b = Browser(server.url)
    tokens = {n: b.json("/join", {"name": "room2", "player": n})[1]["token"] for n in ["ann", "bob"]}
    ann = StreamClient(f"{server.url}/events/room2?player={tokens['ann']}").open()
    bob = StreamClient(f"{server.url}/events/room2?player={tokens['bob']}").open()
    try:
        ann.wait_for(lambda _: states(ann) and all(p["online"] for p in last_state(ann)["players"]))
        # ann reloads: a new stream within the grace period keeps her seat (first: host)
        ann.close()
        ann = StreamClient(f"{server.url}/events/room2?player={tokens['ann']}").open()
        status, doc, _ = b.json("/join", {"name": "room2", "player": "ann", "token": tokens["ann"]})
        assert status == 200 and doc["token"] == tokens["ann"]
        time.sleep(0.8)  # longer than the grace period: she must still be seated
        assert [p["name"] for p in root.lobbies.get("room2").state()["players"]] == ["ann", "bob"]
        # bob closes his tab: everyone sees him leave within heartbeat + grace
        bob.close()
        gone = time.monotonic()
        ann.wait_for(lambda _: [p["name"] for p in last_state(ann)["players"]] == ["ann"], timeout=10)
        assert time.monotonic() - gone < 5
        # the explicit Leave button
        assert b.json("/leave", {"name": "room2", "token": tokens["ann"]})[0] == 200
        ann.wait_for(lambda _: last_state(ann)["players"] == [])
    finally:
        ann.close()
        bob.close()


@pytest.mark.parametrize("fields,status,reason", [
    ({"name": "room3", "player": "<script>"}, 400, "name must be"),
    ({"name": "room3", "player": ""}, 400, "name must be"),
    ({"name": "room3", "player": "x" * 21}, 400, "name must be"),
    ({"name": "Bad Lobby", "player": "ann"}, 400, "lobby names"),
])
def test_lobby_bad_input(lobby_server, fields, status, reason):
    server, _, _ = lobby_server
    got, doc, _ = Browser(server.url).json("/join", fields)
    assert got == status and reason in doc.get("error", json.dumps(doc))


def test_lobby_rules_refuse_clearly(lobby_server):
    server, _, root = lobby_server
    b = Browser(server.url)
    token = b.json("/join", {"name": "room4", "player": "ann"})[1]["token"]
    assert b.json("/join", {"name": "room4", "player": "ann"}) [0:2] == (409, {"error": "the name 'ann' is taken in this lobby"})
    assert b.json("/click", {"name": "room4", "token": "forged"})[0] == 403
    assert b.json("/start", {"name": "room4", "token": ""})[0] == 403
    assert b.request("/join?name=room4&player=x")[0] == 405  # actions are POST only
    assert http_get(server.url + "/events/BAD")[0] == 400
    assert b.json("/click", {"name": "room4", "token": token})[1]["message"] == "the round has not started"
    status, _, body = b.request("/lobby/room4")
    assert status == 200 and b'<li><span class="name">ann</span></li>' in body


# -- shoutbox -----------------------------------------------------------------


@pytest.fixture
def shout_server(comet_cherrypy):
    hub = Hub(buffer_size=1000, idle=0.2)
    root, config = make_shoutbox(hub, mod_secret="s3cret", rate=RateLimiter(limit=5, window=60))
    server = comet_cherrypy(root, config)
    yield server, hub, root


def page_state(b: Browser):
    status, _, body = b.request("/")
    html = body.decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)[1]
    cursor = re.search(r'data-cursor="([^"]+)"', html)[1]
    shouts = re.findall(r'<span class="what">(.*?)</span>', html)
    return csrf, cursor, shouts, html


def test_shout_reaches_every_subscriber(shout_server):
    server, hub, _ = shout_server
    b = Browser(server.url)
    csrf, cursor, _, _ = page_state(b)
    clients = [StreamClient(server.url + "/events", last_event_id=cursor).open() for _ in range(3)]
    try:
        status, doc, _ = b.json("/shout", {"nick": "eve", "text": "hello all", "csrf": csrf})
        assert status == 200
        for c in clients:
            [event] = c.wait_for(1)
            assert event.name == "shout" and event.id == doc["id"]
            assert json.loads(event.data)["text"] == "hello all"
    finally:
        for c in clients:
            c.close()


def test_history_then_stream_has_no_gap_and_no_duplicate(shout_server):
    server, hub, _ = shout_server
    for n in range(60):
        hub.publish("shouts", {"nick": "bot", "text": f"m{n}", "at": 0}, event="shout")
    b = Browser(server.url)
    _, cursor, shouts, _ = page_state(b)
    assert shouts == [f"m{n}" for n in range(10, 60)]  # the last 50, oldest first (a chat reads downwards)
    for n in range(60, 63):  # published after the render, before the stream opens
        hub.publish("shouts", {"nick": "bot", "text": f"m{n}", "at": 0}, event="shout")
    with StreamClient(server.url + "/events", last_event_id=cursor) as c:
        hub.publish("shouts", {"nick": "bot", "text": "m63", "at": 0}, event="shout")
        c.wait_for(4)
        time.sleep(0.3)  # nothing else may follow
        assert [json.loads(e.data)["text"] for e in c.events] == ["m60", "m61", "m62", "m63"]


@pytest.mark.parametrize("shouts,more", [(3, False), (51, False), (52, True)])
def test_a_cursor_from_before_a_restart_gets_the_shouts_and_what_is_gone(shout_server, shouts, more):
    """The page of a restarted server: a gap whose ``resume_id`` says what
    the server no longer holds (the page keeps its older shouts under a
    note), then the last 50 shouts, and whether the server has older ones
    (a shown shout older than the 50 is then not deleted)."""
    server, hub, _ = shout_server
    for n in range(shouts):
        hub.publish("shouts", {"nick": "bot", "text": f"m{n}", "at": 0}, event="shout")
    hub.publish("shouts", {"target": hub.history("shouts")[-1].id}, event="delete")  # the newest goes
    with StreamClient(server.url + "/events", last_event_id="1-7") as c:  # an epoch long gone
        gap, snapshot = c.wait_for(2)
    assert gap.name == "comet.gap" and json.loads(gap.data) == {"last_id": "1-7", "resume_id": f"{hub.epoch}-0", "snapshot": True}
    doc = json.loads(snapshot.data)
    assert snapshot.name == "comet.snapshot" and snapshot.id == hub.last_id("shouts")
    assert [s["text"] for s in doc["shouts"]] == [f"m{n}" for n in range(max(0, shouts - 51), shouts - 1)]
    assert doc["more"] is more


def test_shout_bad_input_is_refused_and_nothing_is_saved(shout_server):
    server, hub, _ = shout_server
    b = Browser(server.url)
    csrf, _, _, _ = page_state(b)
    cases = [
        ({"nick": "eve", "text": "hi"}, 403, "CSRF"),
        ({"nick": "eve", "text": "hi", "csrf": "wrong" * 5}, 403, "CSRF"),
        ({"nick": "eve", "text": "   ", "csrf": csrf}, 400, "1 to 500"),
        ({"nick": "eve", "text": "x" * 501, "csrf": csrf}, 400, "1 to 500"),
        ({"nick": "<b>", "text": "hi", "csrf": csrf}, 400, "nickname"),
    ]
    for fields, status, reason in cases:
        got, doc, _ = b.json("/shout", fields)
        assert got == status and reason in doc["error"], (fields, got, doc)
    assert hub.history("shouts") == []
    assert b.request("/shout")[0] == 405
    # the rate limit: 5 per window, then 429 with Retry-After; nothing half-saved
    for n in range(5):
        assert b.json("/shout", {"nick": "eve", "text": f"ok{n}", "csrf": csrf})[0] == 200
    status, doc, headers = b.json("/shout", {"nick": "eve", "text": "too many", "csrf": csrf})
    assert status == 429 and "slow down" in doc["error"] and int(headers["Retry-After"]) >= 1
    texts = [e.data["text"] for e in hub.history("shouts") if e.name == "shout"]
    assert texts == [f"ok{n}" for n in range(5)]


def test_xss_payloads_render_as_text(shout_server):
    server, hub, _ = shout_server
    b = Browser(server.url)
    csrf, _, _, _ = page_state(b)
    for payload in ['<script>alert(1)</script>', '<img src=x onerror="alert(1)">']:
        assert b.json("/shout", {"nick": "mallory", "text": payload, "csrf": csrf})[0] == 200
    html = page_state(b)[3]
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


def test_moderator_view_and_live_delete(shout_server):
    server, hub, _ = shout_server
    guest, mod = Browser(server.url), Browser(server.url)
    csrf, cursor, _, _ = page_state(guest)
    mod_csrf = page_state(mod)[0]
    assert mod.request("/login", {"secret": "nope", "csrf": mod_csrf})[0] == 403
    assert mod.request("/login", {"secret": "s3cret", "csrf": mod_csrf})[0] == 200  # 303 followed to /
    assert "Moderator view" in page_state(mod)[3]
    guest_stream = StreamClient(server.url + "/events", last_event_id=cursor).open()
    mod_stream = StreamClient(server.url + "/events", last_event_id=cursor, headers=mod.cookie_header()).open()
    try:
        shout_id = guest.json("/shout", {"nick": "eve", "text": "delete me", "csrf": csrf})[1]["id"]
        assert guest.json("/delete", {"id": shout_id, "csrf": csrf})[0] == 403
        assert mod.json("/delete", {"id": "1-1", "csrf": mod_csrf})[0] == 404
        assert mod.json("/delete", {"id": shout_id, "csrf": mod_csrf})[0] == 200
        mod_events = mod_stream.wait_for(lambda evs: any(e.name == "mod" for e in evs))
        guest_events = guest_stream.wait_for(lambda evs: any(e.name == "delete" for e in evs))
        assert [e.name for e in mod_events if e.name != "mod"] == ["shout", "delete"]
        time.sleep(0.3)
        assert [e.name for e in guest_stream.events] == ["shout", "delete"]  # no moderator notices
        assert json.loads(guest_events[-1].data) == {"target": shout_id}
        assert "delete me" not in "".join(page_state(guest)[2])  # gone from history too
    finally:
        guest_stream.close()
        mod_stream.close()


def test_examples_put_their_stats_behind_a_password_when_given(comet_cherrypy):
    import base64

    hub = Hub(idle=0.2)
    root, config = make_shoutbox(hub, stats_password="ops only")
    server = comet_cherrypy(root, config)
    assert http_get(server.url + "/comet/stats/json")[0] == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"comet:ops only").decode()}
    assert http_get(server.url + "/comet/stats/json", headers=good)[0] == 200
    assert http_get(server.url + "/")[0] == 200


def test_a_late_joiner_gets_in_between_rounds_and_wins_are_counted(lobby_server):
    """"Play again" went straight to the next countdown and joins were
    refused outside "waiting": a newcomer was locked out for good."""
    server, hub, root = lobby_server
    b = Browser(server.url)
    seats = {n: b.json("/join", {"name": "late", "player": n})[1]["token"] for n in ["ann", "bob"]}
    watch = StreamClient(f"{server.url}/events/late").open()
    try:
        def phase_is(phase, round_no):
            return lambda _: states(watch) and last_state(watch)["phase"] == phase and last_state(watch)["round"] == round_no

        assert b.json("/start", {"name": "late", "token": seats["ann"]})[0] == 200
        watch.wait_for(phase_is("go", 1), timeout=10)
        assert b.json("/click", {"name": "late", "token": seats["bob"]})[1] == {"message": "you win!"}
        watch.wait_for(phase_is("finished", 1))
        # between rounds: the newcomer joins and fills the lobby (size 3), which
        # does not start a round by itself: the host does
        status, doc, _ = b.json("/join", {"name": "late", "player": "cat"})
        assert status == 200, doc
        watch.wait_for(lambda _: len(last_state(watch)["players"]) == 3)
        assert last_state(watch)["phase"] == "finished"
        assert last_state(watch)["wins"] == {"ann": 0, "bob": 1, "cat": 0}
        assert b.json("/start", {"name": "late", "token": seats["ann"]})[0] == 200
        watch.wait_for(phase_is("countdown", 2))
        # a round in play is closed to newcomers, with a reason
        status, doc, _ = b.json("/join", {"name": "late", "player": "dan"})
        assert status == 409 and "as soon as it ends" in doc["error"]
    finally:
        watch.close()
