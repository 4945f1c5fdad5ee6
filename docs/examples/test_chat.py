"""A complete example of testing a streaming app with comet.testing.

It is shown in docs/testing.md and run by the project's own test suite, so it
stays true. Copy it next to your app and run ``pytest``: the fixtures
``comet_cherrypy`` and ``comet_wsgi`` come with comet (a pytest plugin).
"""
import json

import cherrypy
import pytest

from comet import GAP, Hub, comet
from comet.testing import StreamClient, http_get


class Chat:
    """The app under test: post messages, stream them."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["POST"])
    def post(self, text=""):
        if not text.strip():
            raise cherrypy.HTTPError(400, "empty message")
        return self.hub.publish("chat", {"text": text}, event="message")

    @cherrypy.expose
    @comet(transport="sse")
    def events(self, last_event_id=None):
        yield from self.hub.subscribe("chat", last_id=last_event_id)


@pytest.fixture
def chat(comet_cherrypy):
    return comet_cherrypy(Chat(Hub(buffer_size=10, idle=0.2)))   # a live server on a free 127.0.0.1 port


def post(server, text):
    return http_get(server.url + "/post", method="POST", body=f"text={text}".encode(),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})


def test_every_client_gets_every_message_in_order(chat):
    with StreamClient(chat.url + "/events") as ann, StreamClient(chat.url + "/events") as bob:
        for word in ("one", "two", "three"):
            assert post(chat, word)[0] == 200
        for client in (ann, bob):
            events = client.wait_for(3, timeout=5)   # waits with a deadline, never a bare sleep
            assert [json.loads(e.data)["text"] for e in events] == ["one", "two", "three"]
            assert all(e.name == "message" for e in events)


def test_a_reconnecting_client_resumes_where_it_left(chat):
    with StreamClient(chat.url + "/events") as client:
        post(chat, "seen")
        [seen] = client.wait_for(1)
    post(chat, "missed while away")
    with StreamClient(chat.url + "/events", last_event_id=seen.id) as again:
        [missed] = again.wait_for(1)
        assert json.loads(missed.data)["text"] == "missed while away"


def test_a_client_too_far_behind_is_told(chat):
    first = post(chat, "old")[2].decode()
    for i in range(12):                 # the buffer holds 10
        post(chat, f"new {i}")
    with StreamClient(chat.url + "/events", last_event_id=first) as late:
        assert late.wait_for(1)[0].name == GAP


def test_bad_input_is_a_clear_4xx(chat):
    status, _, body = post(chat, "%20")
    assert status == 400 and b"empty message" in body
    status, _, body = http_get(chat.url + "/events?last_event_id=nonsense")
    assert status == 400 and b"malformed event id" in body
