"""publish_app: events POSTed over HTTP with an API key, into both hubs,
through a live CherryPy server; every bad request a 4xx with a reason."""
from __future__ import annotations

import http.client
import json
import subprocess
from urllib.parse import urlsplit

import cherrypy
import pytest

from comet import Hub, publish_app
from comet.backends.redis import RedisHub
from comet.testing import RedisServer

KEY = "test-key-0123456789-abcdef"
ORDERS_KEY = "orders-only-key-0123456789"


class Root:
    @cherrypy.expose
    def index(self):
        return "page"


@pytest.fixture(params=["memory", "redis"])
def any_hub(request, comet_redis):
    if request.param == "memory":
        hub = Hub(idle=0.2, max_event_bytes=1000)
    else:
        hub = RedisHub(comet_redis.url, prefix=f"pub-{request.node.name[-20:]}:", idle=0.2, max_event_bytes=1000)
    yield hub
    hub.close()


@pytest.fixture
def mounted(comet_cherrypy):
    """Start a server, then graft publish_app(hub, ...) at /publish."""
    grafted = []

    def mount(hub, **kw):
        server = comet_cherrypy(Root())
        cherrypy.tree.graft(publish_app(hub, keys={KEY: None, ORDERS_KEY: ["orders:*"]}, **kw), "/publish")
        grafted.append("/publish")
        return server

    yield mount
    for path in grafted:
        cherrypy.tree.apps.pop(path, None)


def next_event(sub, timeout=10.0):
    """The subscription's next event, skipping idle ticks, within *timeout*."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = next(sub)
        if getattr(item, "id", None) is not None:
            return item
    raise TimeoutError("no event")


def post(server, path, body, key=KEY, content_type="application/json", method="POST", headers=None):
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    head = {"Content-Type": content_type} if content_type else {}
    if key is not None:
        head["Authorization"] = f"Bearer {key}"
    head.update(headers or {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data if method != "GET" else None, headers=head)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_one_event_and_a_batch_are_published_and_delivered(mounted, any_hub):
    server = mounted(any_hub)
    sub = any_hub.subscribe("room:1")
    try:
        status, headers, body = post(server, "/publish/room:1", {"data": {"text": "hi"}, "event": "say"})
        assert status == 201 and headers["Content-Type"] == "application/json", body
        [one] = json.loads(body)["ids"]
        status, _, body = post(server, "/publish/room:1", [{"data": "a"}, {"data": "b", "retry": 2000}])
        assert status == 201, body
        two = json.loads(body)["ids"]
        got = [next_event(sub) for _ in range(3)]
        assert [(e.id, e.name, e.data) for e in got] == [(one, "say", {"text": "hi"}), (two[0], None, "a"), (two[1], None, "b")]
        assert got[2].retry == 2000
    finally:
        sub.close()


@pytest.mark.parametrize("key, status, reason", [
    (None, 401, b"an API key is required"),
    ("wrong-key-0123456789-abcdef", 401, b"unknown API key"),
    ("\u00e9t\u00e9-key-0123456789", 401, b"unknown API key"),
    (ORDERS_KEY, 403, b"may not publish to 'room:1'"),
])
def test_keys_are_checked(mounted, key, status, reason):
    hub = Hub()
    server = mounted(hub)
    code, headers, body = post(server, "/publish/room:1", {"data": 1}, key=key,
                               headers={"Authorization": "Bearer " + key} if key and not key.isascii() else None)
    assert code == status and reason in body, (code, body)
    if status == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert hub.last_id("room:1").endswith("-0")  # nothing published


def test_a_key_limited_to_patterns_publishes_there(mounted):
    hub = Hub()
    server = mounted(hub)
    status, _, body = post(server, "/publish/orders:42", {"data": "shipped"}, key=ORDERS_KEY)
    assert status == 201 and hub.history("orders:42")[0].data == "shipped"


@pytest.mark.parametrize("path, body, kw, status, reason", [
    ("/publish/room:1", b"{not json", {}, 400, b"not JSON"),
    ("/publish/room:1", b"\xff\xfe", {}, 400, b"not JSON"),
    ("/publish/room:1", {"text": "no data"}, {}, 400, b'"data"'),
    ("/publish/room:1", {"data": 1, "channel": "x"}, {}, 400, b"unknown field(s) channel"),
    ("/publish/room:1", {"data": 1, "event": 5}, {}, 400, b'"event" must be a string'),
    ("/publish/room:1", {"data": 1, "event": "a\nb"}, {}, 400, b"event"),
    ("/publish/room:1", {"data": 1, "retry": "soon"}, {}, 400, b'"retry"'),
    ("/publish/room:1", [], {}, 400, b"empty list"),
    ("/publish/room:1", [{"data": 1}, {"nodata": 2}], {}, 400, b"event 1"),
    ("/publish/room:1", {"data": "x" * 2000}, {}, 413, b"max_event_bytes"),
    ("/publish/room:1", {"data": "x" * 5000}, {"max_body": 4096}, 413, b"over 4096 bytes"),
    ("/publish/room:1", {"data": 1}, {"content_type": "text/plain"}, 415, b"application/json"),
    ("/publish/room:1", {"data": 1}, {"content_type": None}, 415, b"application/json"),
    ("/publish/", {"data": 1}, {}, 400, b"/<channel>"),
    ("/publish/a/b", {"data": 1}, {}, 400, b"/<channel>"),
    ("/publish/room%0d%0a", {"data": 1}, {}, 400, b"channel"),
    ("/publish/room:1", {"data": 1}, {"method": "GET"}, 405, b"POST"),
    ("/publish/room:1", {"data": 1}, {"method": "PUT"}, 405, b"POST"),
])
def test_bad_requests_get_a_4xx_with_the_reason_and_publish_nothing(mounted, path, body, kw, status, reason):
    hub = Hub(max_event_bytes=1000)
    server = mounted(hub, **({"max_body": kw.pop("max_body")} if "max_body" in kw else {}))
    code, headers, answer = post(server, path, body, **kw)
    assert code == status and reason in answer, (code, answer)
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert b"Traceback" not in answer
    assert hub.last_id("room:1").endswith("-0")  # all or nothing: a bad batch publishes none of it


def test_a_redis_outage_is_a_503_with_retry_after(mounted):
    with RedisServer() as redis_server:
        hub = RedisHub(redis_server.url, idle=0.2)
        server = mounted(hub)
        assert post(server, "/publish/room:1", {"data": 1})[0] == 201
        redis_server.stop()
        status, headers, body = post(server, "/publish/room:1", {"data": 2})
        hub.close()
    assert status == 503 and headers["Retry-After"] == "5" and b"unavailable" in body


def test_publish_app_refuses_weak_or_missing_keys():
    for keys in ([], ["short"], {"k" * 20: "room:*"}, [123]):
        with pytest.raises(ValueError):
            publish_app(Hub(), keys=keys)


def test_another_language_writes_into_a_redis_hub_with_the_documented_script(comet_redis):
    """The contract for non-Python publishers (docs/publishing.md): EVAL the
    publish script on the channel's stream key with redis-cli; comet's
    subscribers get the event, and the predecessor field keeps gaps exact."""
    import zlib

    from comet.backends.redis import _PUBLISH

    hub = RedisHub(comet_redis.url, prefix="polyglot:", idle=0.2)
    try:
        first = hub.publish("room", "from python")
        sub = hub.subscribe("room", last_id=first)
        port = str(urlsplit(comet_redis.url).port)

        def quoted(text):
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

        bucket = zlib.crc32("room".encode()) % 4096
        line = " ".join(["EVAL", quoted(_PUBLISH), "2", "polyglot:room", '"polyglot:\\x00forgotten"', "1000", '"~"',
                         "d", quoted('{"from": "redis-cli"}'), "k", "j", "e", "cli", "0", "0", str(bucket)])
        out = subprocess.run(["redis-cli", "-p", port], input=line + "\n", capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        event = next_event(sub)
        assert (event.id, event.name, event.data) == (out, "cli", {"from": "redis-cli"})
        assert hub.history("room")[-1].id == out
        sub.close()
    finally:
        hub.close()


def test_the_docs_show_the_script_comet_runs():
    from pathlib import Path

    from comet.backends.redis import _PUBLISH

    page = (Path(__file__).resolve().parent.parent / "docs" / "publishing.md").read_text()
    shown = page.split("```lua\n", 1)[1].split("```", 1)[0]
    assert shown.strip() == _PUBLISH.strip()


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"data": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    b'{"data": ' + b'{"a":' * 101 + b"1" + b"}" * 101 + b"}",
])
def test_a_deeply_nested_body_is_a_400_with_the_reason(mounted, body):
    hub = Hub()
    server = mounted(hub)
    code, headers, answer = post(server, "/publish/room:1", body)
    assert code == 400 and b"nested" in answer, (code, answer[:300])
    assert headers["Content-Type"] == "text/plain; charset=utf-8" and b"Traceback" not in answer
    assert hub.last_id("room:1").endswith("-0")


def test_nesting_up_to_the_bound_is_published(mounted):
    hub = Hub()
    server = mounted(hub)
    data = json.loads("[" * 64 + "]" * 64)
    code, _, answer = post(server, "/publish/room:1", [{"data": data}])
    assert code == 201, answer
    assert hub.history("room:1")[0].data == data
    code, _, answer = post(server, "/publish/room:1", [{"data": [data]}])
    assert code == 400 and answer == b'event 0: "data" is nested more than 64 levels deep\n', answer


@pytest.mark.parametrize("key", ["\u00e9t\u00e9-key-0123456789", "key-with-a-newline\n0123", " padded-key-0123456789 "])
def test_a_key_no_client_can_send_is_refused_at_construction(key):
    with pytest.raises(ValueError, match="printable ASCII"):
        publish_app(Hub(), keys=[key])


def test_the_channel_in_the_path_is_percent_decoded_once(mounted):
    hub = Hub()
    server = mounted(hub)
    code, _, answer = post(server, "/publish/pct%2541", {"data": "literal"})
    assert code == 201, answer
    assert [e.data for e in hub.history("pct%41")] == ["literal"]
    assert hub.history("pctA") == []
    code, _, answer = post(server, "/publish/caf%C3%A9", {"data": "utf-8"})
    assert code == 201 and hub.history("caf\u00e9")[0].data == "utf-8", answer


def test_a_body_of_exactly_max_body_bytes_is_accepted(mounted):
    hub = Hub()
    server = mounted(hub, max_body=100)
    body = b'{"data": "' + b"x" * (100 - 12) + b'"}'
    assert len(body) == 100
    code, _, answer = post(server, "/publish/room:1", body)
    assert code == 201, answer
    code, _, answer = post(server, "/publish/room:1", body[:-1] + b' }')
    assert code == 413 and b"over 100 bytes" in answer, answer
    # An unsized (chunked) body gets the same limit.
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", "/publish/room:1", body=iter([body[:50], body[50:]]), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        assert response.status == 201, response.read()
    finally:
        conn.close()
    assert len(hub.history("room:1")) == 2


def test_retry_true_is_refused_not_written_as_retry_true(mounted):
    hub = Hub()
    server = mounted(hub)
    code, _, answer = post(server, "/publish/room:1", {"data": 1, "retry": True})
    assert code == 400 and b'"retry" must be an integer' in answer, answer
    assert hub.history("room:1") == []
