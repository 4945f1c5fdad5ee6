"""StreamTokens: signed, expiring stream URLs, checked by a fast route's
authorize and by a decorated handler, through a live server."""
from __future__ import annotations

import time
from urllib.parse import quote

import cherrypy
import pytest

from comet import Forbidden, StreamTokens, comet
from comet.cherrypy_tool import engine_plugin
from comet.testing import StreamClient, http_get, wait_until

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture
def tokens():
    return StreamTokens(SECRET, ttl=60)


def root(hub, tokens):
    class Root:
        @cherrypy.expose
        def index(self):
            return "page"

        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def dm(self, thread, token=None, last_event_id=None):
            tokens.verify(token or "", channel=f"dm:{thread}")  # Forbidden -> 403 with the reason
            return hub.subscribe(f"dm:{thread}", last_id=last_event_id)

    return Root()


def test_a_token_opens_its_channels_only(comet_cherrypy, hub, tokens):
    engine_plugin().route("/fast/{thread}", hub, "dm:{thread}", heartbeat=0.5, authorize=tokens.authorize("dm:{thread}"))
    server = comet_cherrypy(root(hub, tokens), thread_pool=4)
    good = tokens.sign("ann", ["dm:ann:bob"])
    for url in (f"{server.url}/dm?thread=ann:bob&token={good}", f"{server.url}/fast/ann:bob?token={good}"):
        with StreamClient(url) as client:
            wait_until(lambda: hub.subscriptions == 1, what="subscribed")
            hub.publish("dm:ann:bob", "psst")
            assert client.wait_for(1)[-1].data == "psst"
        wait_until(lambda: hub.subscriptions == 0, what="released")

    expired = tokens.sign("ann", ["dm:ann:bob"], ttl=-1)
    payload, _, signature = good.partition(".")
    forged = StreamTokens("another-secret-0123456789ab").sign("ann", ["dm:*"])
    cases = {
        "": b"a stream token is required",
        tokens.sign("cat", ["dm:cat:dan"]): b"does not cover channel 'dm:ann:bob'",
        expired: b"has expired",
        forged: b"invalid stream token",
        payload + "x." + signature: b"invalid stream token",
        good[:-2]: b"invalid stream token",
        "\u00e9t\u00e9.abc": b"invalid stream token",
        "not-a-token": b"invalid stream token",
    }
    for token, reason in cases.items():
        quoted = quote(token)
        for path in (f"/dm?thread=ann:bob&token={quoted}", f"/fast/ann:bob?token={quoted}"):
            status, headers, body = http_get(server.url + path)
            assert status == 403 and reason in body, (path, status, body)
            assert b"Traceback" not in body
    assert hub.subscriptions == 0


def test_patterns_members_and_settings(tokens):
    token = tokens.sign("ann", ["dm:ann:bob"], patterns=["room:*"])
    assert tokens.verify(token) == "ann"
    assert tokens.verify(token, channel="room:lobby") == "ann"
    with pytest.raises(Forbidden, match="does not cover"):
        tokens.verify(token, channel="dm:ann:cat")
    assert StreamTokens(SECRET).verify(token) == "ann"  # any process with the secret checks it
    with pytest.raises(Forbidden, match="invalid"):
        StreamTokens(SECRET + "x").verify(token)
    short = StreamTokens(SECRET, ttl=1).sign("ann", ["room:a"], ttl=0.01)
    wait_until(lambda: time.time() > int(time.time()) and _expired(tokens, short), timeout=3, what="expiry")
    for bad in ("", "short", b"x" * 15):
        with pytest.raises(ValueError):
            StreamTokens(bad)
    with pytest.raises(ValueError):
        tokens.sign("", ["room:a"])
    with pytest.raises(ValueError):
        tokens.sign("ann", [])
    with pytest.raises(ValueError):
        tokens.sign("ann", patterns=[""])
    with pytest.raises(ValueError, match="not one str"):
        tokens.sign("ann", "room:a")


def test_channel_names_are_literal_and_patterns_explicit(comet_cherrypy, hub, tokens):
    """A name is signed as itself, whatever its characters: a user named
    "*" gets no one else's thread, "room:[x]" opens "room:[x]" only."""
    engine_plugin().route("/fast/{thread}", hub, "dm:{thread}", heartbeat=0.5, authorize=tokens.authorize("dm:{thread}"))
    server = comet_cherrypy(root(hub, tokens), thread_pool=4)
    bracket = tokens.sign("ann", ["dm:ann:[x]"])
    for url in (f"{server.url}/dm?thread={quote('ann:[x]')}&token={bracket}",):  # (fast routes take no "[")
        with StreamClient(url) as client:
            wait_until(lambda: hub.subscriptions == 1, what="subscribed")
            hub.publish("dm:ann:[x]", "psst")
            assert client.wait_for(1)[-1].data == "psst"
        wait_until(lambda: hub.subscriptions == 0, what="released")
    star = tokens.sign("*", ["dm:ann:*"])  # a user who named herself "*"
    for thread, token in (("ann:x", bracket), ("ann:bob", star)):
        for path in (f"/dm?thread={thread}&token={token}", f"/fast/{thread}?token={token}"):
            status, _, body = http_get(server.url + path)
            assert status == 403 and f"does not cover channel 'dm:{thread}'".encode() in body, (path, body)
    for name in ("a*b", "a?b", "[!a]", "]", "a[b]c[", "caf\u00e9"):
        token = tokens.sign("ann", [name])
        assert tokens.verify(token, channel=name) == "ann"
        with pytest.raises(Forbidden):
            tokens.verify(token, channel=name.replace("*", "xy").replace("?", "x").replace("[!a]", "b") + "z")
    either = tokens.sign("ann", ["dm:ann:*"], patterns=["room:?"])
    assert tokens.verify(either, channel="room:a") == tokens.verify(either, channel="dm:ann:*") == "ann"
    with pytest.raises(Forbidden):
        tokens.verify(either, channel="dm:ann:bob")


def test_tokens_signed_before_names_were_literal_still_read_as_patterns(tokens):
    import base64
    import json

    # What sign("ann", ["room:*"]) made before: the claim is a pattern.
    payload = base64.urlsafe_b64encode(json.dumps({"m": "ann", "c": ["room:*"], "x": int(time.time()) + 60},
                                                  separators=(",", ":")).encode()).rstrip(b"=").decode()
    old = payload + "." + tokens._signature(payload)
    assert tokens.verify(old, channel="room:lobby") == "ann"
    assert tokens.sign("ann", patterns=["room:*"]).partition(".")[0] == payload  # and the same bytes now


def _expired(tokens, token):
    try:
        tokens.verify(token)
    except Forbidden as exc:
        return "expired" in str(exc)
    return False


def test_the_access_log_never_holds_a_stream_token(comet_cherrypy, hub, tokens, tmp_path):
    """Whoever reads the access log could open the stream with the token in
    its URL: comet writes the request line with the token's value hidden,
    for a stream opened, refused, and served directly (comet.direct)."""
    access_file = tmp_path / "access.log"
    server = comet_cherrypy(root(hub, tokens), global_config={"log.access_file": str(access_file)})
    good = tokens.sign("ann", ["dm:ann:bob"])
    other = tokens.sign("cat", ["dm:cat:dan"])
    counters = engine_plugin().pool.counters
    direct_before = counters.snapshot().get("routed_direct", 0)
    try:
        for _ in range(3):  # (the later ones served directly, at accept time)
            with StreamClient(f"{server.url}/dm?thread=ann:bob&token={good}") as client:
                wait_until(lambda: hub.subscriptions == 1, what="subscribed")
                hub.publish("dm:ann:bob", "psst")
                client.wait_for(1)
            wait_until(lambda: hub.subscriptions == 0, what="released")
        assert counters.snapshot().get("routed_direct", 0) > direct_before  # (that way too)
        assert http_get(f"{server.url}/dm?token={other}&thread=ann:bob")[0] == 403
        lines = wait_until(lambda: (text := access_file.read_text()).count("GET /dm?") >= 4 and text.splitlines(),
                           what="four lines in the access log")
    finally:
        cherrypy.log.access_file = ""  # the log manager outlives this test's config
    streams = [line for line in lines if "GET /dm?" in line]
    assert all(good.partition(".")[2] not in line and other.partition(".")[2] not in line for line in lines), streams
    assert sum('"GET /dm?thread=ann:bob&token=redacted HTTP/1.1" 200' in line for line in streams) == 3, streams
    assert any('"GET /dm?token=redacted&thread=ann:bob HTTP/1.1" 403' in line for line in streams), streams


def test_gunicorns_access_log_never_holds_a_stream_token(tmp_path):
    """The same for comet_app under gunicorn: its access log writes the
    request line from the environ (RAW_URI), which comet redacts."""
    import os
    from pathlib import Path

    from comet.testing import AppProcess

    examples = Path(__file__).resolve().parent.parent / "docs" / "examples"
    env = {"PYTHONPATH": os.pathsep.join([str(examples.parent.parent), str(examples)])}
    access = tmp_path / "access.log"
    server = AppProcess(["-m", "gunicorn", "-c", "python:comet.gunicorn_conf", "--threads", "4", "-b", "127.0.0.1:{port}",
                         "--access-logfile", str(access), "wsgi_app:app"], env=env, cwd=examples,
                        ready="Booting worker").start(timeout=30)
    secret = "eyJtIjoiYW5uIn0.c2lnbmF0dXJlLW9mLWEtdG9rZW4"
    try:
        with StreamClient(server.url + f"/events?token={secret}&access_token={secret}") as client:
            client.wait_for(0)
            server.stop()  # (the stream's line is written when it ends: at shutdown, at once)
    finally:
        server.close()
    text = access.read_text()
    assert secret not in text and "/events?token=redacted&access_token=redacted " in text, text
