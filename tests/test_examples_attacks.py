"""Hostile raw HTTP against the example apps: a clear 4xx, never a traceback.

Non-ASCII tokens, CSRF values and secrets once reached
``hmac.compare_digest`` as str and answered 500 with a traceback; and the
examples showed CherryPy's tracebacks (server paths) to the public.
"""
import json
import urllib.parse

import cherrypy
import pytest

from comet import Hub
from comet.testing import http_get
from examples.lobby_game import app as lobby_app
from examples.shoutbox import app as shout_app

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
NON_ASCII = ["é", "ünïcödé-tökén-😀", "\u00e9" * 32]


def post(url, fields, headers=None):
    body = urllib.parse.urlencode(fields).encode()
    return http_get(url, headers={**FORM, **(headers or {})}, method="POST", body=body)


def assert_clean_refusal(status, body, allowed=(400, 403)):
    text = body.decode("utf-8", "replace")
    assert status in allowed, (status, text[:500])
    assert "Traceback" not in text and ".py" not in text and "/work/" not in text, text[:500]


@pytest.fixture
def lobby(comet_cherrypy):
    hub = Hub(idle=0.2)
    root, config = lobby_app.make_app(hub, size=3, grace=0.5, countdown=1, go_delay=(0.05, 0.1))
    server = comet_cherrypy(root, config)
    yield server, root
    cherrypy.engine.unsubscribe("stop", root.lobbies.close)
    cherrypy.engine.unsubscribe("start", root.lobbies.start)


@pytest.fixture
def shoutbox(comet_cherrypy):
    hub = Hub(buffer_size=1000, idle=0.2)
    root, config = shout_app.make_app(hub, mod_secret="s3cret")
    server = comet_cherrypy(root, config)
    yield server, hub


def csrf_of(server):
    status, headers, body = http_get(server.url + "/")
    assert status == 200
    token = headers["set-cookie"].split("csrf=", 1)[1].split(";", 1)[0]
    return token, {"Cookie": f"csrf={token}"}


# -- 1. non-ASCII secrets: a 4xx, and nothing changes ------------------------------


@pytest.mark.parametrize("bad", NON_ASCII)
def test_shoutbox_non_ascii_csrf_and_secret_are_refused(shoutbox, bad):
    server, hub = shoutbox
    token, cookie = csrf_of(server)
    status, _, body = post(server.url + "/shout", {"nick": "eve", "text": "hi", "csrf": bad}, cookie)
    assert_clean_refusal(status, body)
    assert "CSRF" in json.loads(body)["error"]
    status, _, body = post(server.url + "/delete", {"id": "1-1", "csrf": bad}, cookie)
    assert_clean_refusal(status, body)
    status, headers, body = post(server.url + "/login", {"secret": "s3cret", "csrf": bad}, cookie)
    assert_clean_refusal(status, body)
    status, headers, body = post(server.url + "/login", {"secret": bad, "csrf": token}, cookie)
    assert_clean_refusal(status, body)
    assert "mod=" not in headers.get("set-cookie", "")  # not logged in
    assert hub.history("shouts") == []  # nothing stored


def test_shoutbox_non_ascii_cookies_are_refused(shoutbox):
    server, hub = shoutbox
    # http.client sends header text as latin-1: raw non-ASCII bytes on the wire
    weird = {"Cookie": "csrf=" + "é" * 24 + "; mod=é"}
    status, headers, body = http_get(server.url + "/", headers=weird)
    assert status == 200 and b"Moderator view" not in body
    assert "csrf=" in headers.get("set-cookie", "")  # a fresh, ASCII token replaces it
    status, _, body = post(server.url + "/shout", {"nick": "eve", "text": "hi", "csrf": "é" * 24}, weird)
    assert_clean_refusal(status, body)
    assert hub.history("shouts") == []


@pytest.mark.parametrize("bad", NON_ASCII)
def test_lobby_non_ascii_tokens_are_refused(lobby, bad):
    server, root = lobby
    status, _, body = post(server.url + "/join", {"name": "room9", "player": "ann"})
    assert status == 200
    before = root.lobbies.get("room9").state()
    quoted = urllib.parse.quote(bad)
    status, _, body = http_get(f"{server.url}/events/room9?player={quoted}", deadline=5)
    assert_clean_refusal(status, body)
    # a reconnect with a forged token for a taken name, and a new seat with one
    status, _, body = post(server.url + "/join", {"name": "room9", "player": "ann", "token": bad})
    assert_clean_refusal(status, body, allowed=(400, 403, 409))
    status, _, body = post(server.url + "/join", {"name": "room9", "player": "bob", "token": bad})
    assert_clean_refusal(status, body)
    for action in ["/click", "/start", "/leave"]:
        status, _, body = post(server.url + action, {"name": "room9", "token": bad})
        assert_clean_refusal(status, body)
    assert root.lobbies.get("room9").state() == before  # no join, no change


# -- 2. no tracebacks for the public -----------------------------------------------


def assert_short_404(status, body):
    text = body.decode("utf-8", "replace")
    assert status == 404, (status, text[:500])
    assert "Traceback" not in text and "/work/" not in text and ".py" not in text, text[:1000]


def serve_as_main(module, argv, comet_cherrypy, monkeypatch, paths):
    """Run the example's main(argv) up to quickstart, serve what it would
    serve under the test server, and GET each path: [(status, body)]."""
    got = []

    def quickstart(root, script_name, config):
        server = comet_cherrypy(root, config)
        got.extend(http_get(server.url + path)[0::2] for path in paths)

    monkeypatch.setattr(module.cherrypy, "quickstart", quickstart)
    subscribed = set(cherrypy.engine.listeners["start"]) | set(cherrypy.engine.listeners["stop"])
    try:
        module.main(argv)
    finally:
        for channel in ["start", "stop"]:
            for listener in set(cherrypy.engine.listeners[channel]) - subscribed:
                cherrypy.engine.unsubscribe(channel, listener)
    return got


def test_lobby_errors_show_no_traceback(comet_cherrypy, monkeypatch):
    paths = ["/nope", "/lobby/Friday-Night", "/lobby/a%20b", "/lobby"]
    for status, body in serve_as_main(lobby_app, [], comet_cherrypy, monkeypatch, paths):
        assert_short_404(status, body)


def test_shoutbox_errors_show_no_traceback(comet_cherrypy, monkeypatch):
    paths = ["/nope", "/static/nope.js", "/nope/deeper"]
    for status, body in serve_as_main(shout_app, [], comet_cherrypy, monkeypatch, paths):
        assert_short_404(status, body)


@pytest.mark.parametrize("module", [lobby_app, shout_app])
def test_debug_flag_turns_tracebacks_on(module, comet_cherrypy, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "--debug" in capsys.readouterr().out
    [(status, body)] = serve_as_main(module, ["--debug"], comet_cherrypy, monkeypatch, ["/nope"])
    assert status == 404 and b"Traceback" in body
