"""Ten tabs of the shoutbox through deploy/nginx-comet.conf, in one
browser profile: over HTTPS + HTTP/2 every tab streams and pages still
load; over plain HTTP/1.1 the browser's six connections per origin are a
wall (the seventh tab does not even load), which is what the TLS + h2
server block is for."""
from __future__ import annotations

import json
import secrets
import urllib.parse
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from comet.testing import AppProcess, NginxServer, http_get, wait_until

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "deploy" / "nginx-comet.conf"
TABS = 10


@pytest.fixture(scope="module")
def front():
    app = AppProcess(["-m", "examples.shoutbox", "--threads", "20"], cwd=ROOT).start()
    nginx = NginxServer(SITE, [app.port]).start()
    yield app, nginx
    nginx.close()
    app.close()


@pytest.fixture
def profile(browser):
    """One browser profile (one connection pool) that trusts the test's
    self-signed certificate. Without BroadcastChannel, so comet.js's shared
    streams fall back to one stream per tab: the wall shows, as for any
    site whose tabs each stream."""
    ctx = browser.new_context(ignore_https_errors=True)
    ctx.add_init_script("delete window.BroadcastChannel;")
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


def open_streams(app: AppProcess) -> int:
    status, _, body = http_get(app.url + "/comet/stats/json")
    assert status == 200
    return int(json.loads(body)["streams"]["open"])


def shout(base: str, text: str) -> None:
    token = secrets.token_urlsafe(24)
    status, _, body = http_get(base + "/shout", {"Content-Type": "application/x-www-form-urlencoded",
                                                 "Cookie": f"csrf={token}"},
                               method="POST", body=urllib.parse.urlencode({"nick": "h2", "text": text, "csrf": token}).encode())
    assert status == 200, (status, body)


def test_ten_tabs_over_http2_all_stream_and_pages_still_load(front, profile):
    app, nginx = front
    before = open_streams(app)
    pages = []
    for _ in range(TABS):
        page = profile.new_page()
        response = page.goto(nginx.https_url + "/", wait_until="domcontentloaded")
        assert response is not None and response.ok
        pages.append(page)
    protocol = pages[0].evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
    assert protocol == "h2", protocol
    wait_until(lambda: open_streams(app) == before + TABS, timeout=15, what=f"{TABS} streams open")
    text = f"to every tab {secrets.token_hex(3)}"
    shout(app.url, text)
    for page in pages:
        page.get_by_text(text).first.wait_for(timeout=10_000)
    extra = profile.new_page()
    response = extra.goto(nginx.https_url + "/", wait_until="domcontentloaded", timeout=5_000)
    assert response is not None and response.ok  # an 11th page loads beside ten streams
    for page in [*pages, extra]:
        page.close()
    wait_until(lambda: open_streams(app) == before, timeout=15, what="every tab's stream closed")


def test_over_http1_the_seventh_tab_hits_the_wall(front, profile):
    app, nginx = front
    before = open_streams(app)
    pages = []
    for _ in range(6):
        page = profile.new_page()
        page.goto(nginx.url + "/", wait_until="domcontentloaded")
        pages.append(page)
    wait_until(lambda: open_streams(app) == before + 6, timeout=15, what="6 streams open")
    seventh = profile.new_page()
    with pytest.raises(PlaywrightTimeout):
        seventh.goto(nginx.url + "/", wait_until="domcontentloaded", timeout=3_000)
    assert open_streams(app) == before + 6
    for page in pages:  # the streams first: their connections free, the seventh tab's load ends
        page.close()
    seventh.close()
    wait_until(lambda: open_streams(app) == before, timeout=15, what="every tab's stream closed")
