"""Every JavaScript snippet in the docs and the README runs in Chromium
against a live comet stream and logs the event it receives."""
from __future__ import annotations

import cherrypy
import pytest

from comet import Hub, comet
from comet.cherrypy_tool import static_config
from comet.testing import wait_until
from tests.test_docs import PAGES, blocks

SNIPPETS = [(page.name, i, body) for page in PAGES for i, body in enumerate(blocks(page, "js"))]


@pytest.fixture
def docs_server(comet_cherrypy):
    hub = Hub()

    class Root:
        @cherrypy.expose
        def index(self):
            return '<!doctype html><title>docs</title><script src="/comet/comet.js"></script>'

        @cherrypy.expose
        @comet(transport="sse")
        def events(self, last_event_id=None):
            return hub.subscribe("docs", last_id=last_event_id)

    return comet_cherrypy(Root(), static_config("/comet")), hub


@pytest.mark.parametrize("name,index,snippet", SNIPPETS, ids=[f"{n}-{i}" for n, i, _ in SNIPPETS])
def test_js_snippet_runs_and_receives(context, docs_server, name, index, snippet):
    server, hub = docs_server
    page = context.new_page()
    page.goto(server.url + "/")
    page.evaluate(f"() => {{ {snippet} }}")  # uncaught errors fail the test (the context fixture)
    # Playwright delivers page events only while it is called: poll through it.
    wait_until(lambda: page.wait_for_timeout(20) or hub.subscriptions, timeout=10, what="the snippet's stream open")
    with page.expect_console_message(lambda message: "docs-check" in message.text, timeout=10_000):
        hub.publish("docs", "docs-check")
