"""The example apps as players use them, at a phone's width (390 px) and a
laptop's (1280 px): a lobby of four through two rounds with a late joiner,
and a chat between two time zones with a moderator. Each test also writes
the screenshots shown in the README (docs/screenshots/), so they stay
current with the pages.
"""
from __future__ import annotations

import re
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from comet.testing import FaultProxy

from .conftest import ROOT
from .test_examples_browser import post_shout

SCREENSHOTS = ROOT / "docs" / "screenshots"
VIEWPORTS = {390: {"width": 390, "height": 844}, 1280: {"width": 1280, "height": 800}}


@pytest.fixture(params=sorted(VIEWPORTS), ids=lambda w: f"{w}px")
def width(request):
    return request.param


@pytest.fixture
def people(browser, width):
    """Factory: a fresh browser profile at this test's width; any uncaught
    exception in its pages fails the test."""
    contexts, errors = [], []

    def new(**options):
        ctx = browser.new_context(viewport=VIEWPORTS[width], **options)
        ctx.set_default_timeout(15_000)
        ctx.on("weberror", lambda web_error: errors.append(str(web_error.error)))
        contexts.append(ctx)
        return ctx

    yield new
    for ctx in contexts:
        ctx.close()
    assert not errors, f"uncaught errors in the pages: {errors}"


def assert_fits(page):
    """Nothing sticks out sideways: the page cannot scroll horizontally."""
    scroll, inner = page.evaluate("[document.scrollingElement.scrollWidth, innerWidth]")
    assert scroll <= inner, f"{page.url}: {scroll} px wide in a {inner} px window"


def in_view(page, selector):
    return page.evaluate("""(sel) => {
        const el = document.querySelector(sel), r = el.getBoundingClientRect();
        return r.left >= 0 && r.right <= innerWidth && r.top >= 0 && r.bottom <= innerHeight;
    }""", selector)


def phase(page):
    return page.get_attribute("#board", "data-phase")


# -- the lobby ------------------------------------------------------------------


def join(page, name):
    page.fill("#name", name)
    page.click("#join button")
    page.wait_for_selector("#players li.me")
    page.wait_for_selector('#status[data-status="open"]')


def test_a_lobby_of_four_plays_two_rounds_with_a_late_joiner(example_server, people, width):
    server = example_server("examples.lobby_game", "--size", "4", "--countdown", "3")
    # One browser each, as players have: one profile's tabs would share
    # Chromium's six connections per host, and five streams nearly fill them.
    index = people().new_page()
    index.goto(server.url + "/")
    index.wait_for_selector('#status[data-status="open"]')
    assert index.is_visible("#none")  # "None yet"

    ann, bob = people().new_page(), people().new_page()
    for page in (ann, bob):
        response = page.goto(server.url + "/lobby/arena")
        assert response.status == 404  # looking opens nothing ...
        assert page.inner_text("#phase").startswith("Nobody is here yet")
    join(ann, "ann")  # ... the first join does
    assert ann.inner_text("#you") == "You are ann, the host"
    # the index saw the lobby open, live, and so did bob's page, already open on it
    index.wait_for_selector('#lobbies li[data-lobby="arena"]:has-text("1/4 players, waiting")')
    bob.wait_for_selector('#players li:has(.name:text-is("ann")) .tag.host')
    bob.wait_for_selector('#status[data-status="open"]')

    cat = people().new_page()
    cat.goto(server.url + "/lobby/arena")
    for page, name in [(bob, "bob"), (cat, "cat")]:
        join(page, name)
    for page in (ann, bob, cat):
        page.wait_for_function("document.querySelectorAll('#players li').length === 3")
        assert page.locator("#players li.host .name").all_inner_texts() == ["ann"]
    assert bob.inner_text("#you") == "You are bob"
    assert bob.inner_text("#hint") == "Waiting for the host, ann, to start."
    assert bob.is_hidden("#start") and ann.inner_text("#start") == "Start the game"
    for page in (index, ann, bob, cat):
        assert_fits(page)

    # round 1: three players
    ann.click("#start")
    for page in (ann, bob, cat):
        page.wait_for_selector('#board[data-phase="countdown"]')
        # a countdown you can read across the room, and a button that does not invite a click
        assert page.evaluate("parseFloat(getComputedStyle(document.getElementById('phase')).fontSize)") >= 64
        assert page.evaluate("getComputedStyle(document.getElementById('play')).cursor") == "default"
        assert page.inner_text("#play") == "wait for GO\u2026"
    for page in (ann, bob, cat):
        page.wait_for_selector('#board[data-phase="go"]', timeout=10_000)
        assert page.inner_text("#play") == "CLICK!" and in_view(page, "#play")
    bob.click("#play")
    bob.wait_for_function("document.getElementById('message').textContent === 'you win!'")
    for page in (ann, bob, cat):
        page.wait_for_selector('#board[data-phase="finished"]')
        assert re.fullmatch(r"bob won in \d+ ms", page.inner_text("#phase"))
        assert page.inner_text('#players li:has(.name:text-is("bob")) .wins') == "1 win"
    assert ann.inner_text("#start") == "Play again"
    assert bob.inner_text("#hint") == "Waiting for the host, ann, to start the next round."

    # a late joiner gets in between rounds (once locked out for good)
    dan = people().new_page()
    assert dan.goto(server.url + "/lobby/arena").status == 200
    # (data-phase comes in the server's HTML; the hint once lobby.js has drawn the state)
    dan.wait_for_function("document.getElementById('hint').textContent === 'Join now to play the next round.'")
    assert dan.is_visible("#join") and dan.get_attribute("#board", "data-phase") == "finished"
    dan.fill("#name", "bob")  # a refusal reads as a reason, in the page
    dan.click("#join button")
    dan.wait_for_function("document.getElementById('message').textContent === \"the name 'bob' is taken in this lobby\"")
    join(dan, "dan")
    for page in (ann, bob, cat, dan):
        page.wait_for_function("document.querySelectorAll('#players li').length === 4")
        assert phase(page) == "finished"  # a full lobby waits for the host between rounds
    index.wait_for_selector('#lobbies li[data-lobby="arena"]:has-text("4/4 players, between rounds")')

    # round 2: four players; the last round's verdicts are cleared
    ann.click("#start")
    for page in (ann, bob, cat, dan):
        page.wait_for_selector('#board[data-phase="countdown"]')
    assert bob.inner_text("#message") == ""  # no "you win!" through the next countdown
    # 3 s of countdown and a pause before GO: a click now is a false start, as the rules say
    cat.click("#play")
    cat.wait_for_function("document.getElementById('message').textContent === 'too early! you are out of this round'")
    for page in (ann, bob, cat, dan):
        page.wait_for_selector('#players li.out:has(.name:text-is("cat")) .tag.out')
    for page in (ann, bob, cat, dan):
        page.wait_for_selector('#board[data-phase="go"]', timeout=10_000)
        assert_fits(page)
    dan.screenshot(path=str(SCREENSHOTS / f"lobby-{width}.png"))
    dan.click("#play")
    dan.wait_for_function("document.getElementById('message').textContent === 'you win!'")
    for page in (ann, bob, cat, dan):
        page.wait_for_selector('#board[data-phase="finished"]')
        assert re.fullmatch(r"dan won in \d+ ms", page.inner_text("#phase"))
        assert page.locator("#players li .wins").all_inner_texts() == ["0 wins", "1 win", "0 wins", "1 win"]
        assert_fits(page)

    # everyone leaves: the lobby is gone, from the index too, live
    for page in (ann, bob, cat, dan):
        page.click("#leave")
        page.wait_for_function("document.getElementById('message').textContent === 'You left the lobby.'")
    index.wait_for_selector('#lobbies li[data-lobby="arena"]', state="detached")
    assert index.is_visible("#none")


# -- the shoutbox ----------------------------------------------------------------


def shout(page, text):
    page.fill("#text", text)
    with page.expect_response("**/shout"):
        page.click("#shout button")
    page.wait_for_function("document.getElementById('text').value === ''")


def assert_local_times(page, zone):
    """Every shout's time is shown in the viewer's own time zone."""
    times = page.evaluate("[...document.querySelectorAll('#shouts time')].map((t) => [t.dateTime, t.textContent])")
    assert times
    for iso, shown in times:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
        assert shown == when.strftime("%H:%M"), (iso, shown, zone)


def test_a_chat_between_two_time_zones_with_a_moderator(example_server, people, width):
    server = example_server("examples.shoutbox", "--rate", "100/10", "--mod-secret", "test-secret")
    for n in range(25):
        post_shout(server.url, "bot", f"earlier message {n}")
    ann = people(timezone_id="Asia/Tokyo").new_page()
    bob = people(timezone_id="America/New_York").new_page()
    for page in (ann, bob):
        page.goto(server.url + "/")
        page.wait_for_selector('#status[data-status="open"]')
        assert page.inner_text("#status") == "live"
        texts = page.locator("#shouts .what").all_inner_texts()
        assert texts[0] == "earlier message 0" and texts[-1] == "earlier message 24"  # oldest at the top
        assert in_view(page, "#shouts li:last-child")  # the newest, at the bottom, in view
        assert in_view(page, "#shout button")  # the whole form fits
        assert_fits(page)

    ann.fill("#nick", "ann")
    shout(ann, "hello from Tokyo")
    bob.fill("#nick", "bob")
    shout(bob, "hi from New York")
    for page in (ann, bob):
        page.wait_for_selector("#shouts li:last-child:has-text('hi from New York')")
        assert page.locator("#shouts .what").all_inner_texts()[-2:] == ["hello from Tokyo", "hi from New York"]
        assert in_view(page, "#shouts li:last-child")
        assert_fits(page)
    # your own shouts are marked, and only yours
    assert ann.locator("#shouts li.mine .what").all_inner_texts() == ["hello from Tokyo"]
    assert bob.locator("#shouts li.mine .what").all_inner_texts() == ["hi from New York"]
    # each browser's tag beside its name, the same on every page
    tags = [ann.inner_text(f"#shouts li:has-text('{t}') .tag") for t in ("hello from Tokyo", "hi from New York")]
    assert tags[0] != tags[1] and all(re.fullmatch(r"#[0-9a-f]{6}", t) for t in tags)
    assert bob.inner_text("#shouts li:has-text('hello from Tokyo') .tag") == tags[0]
    assert_local_times(ann, "Asia/Tokyo")
    assert_local_times(bob, "America/New_York")

    # the nickname and your marks survive a reload
    ann.reload()
    ann.wait_for_selector('#status[data-status="open"]')
    assert ann.input_value("#nick") == "ann"
    assert ann.locator("#shouts li.mine .what").all_inner_texts() == ["hello from Tokyo"]
    ann.screenshot(path=str(SCREENSHOTS / f"shoutbox-{width}.png"))

    # a moderator deletes a shout: gone everywhere, and the notice reads like a sentence
    mod = people().new_page()
    mod.goto(server.url + "/login")
    assert_fits(mod)
    mod.fill("input[name=secret]", "test-secret")
    mod.click("form button")
    mod.wait_for_selector("text=Moderator view")
    mod.wait_for_selector('#status[data-status="open"]')
    assert_fits(mod)
    mod.click("#shouts li:has-text('hi from New York') button.delete")
    mod.wait_for_selector("#notices li")
    notice = mod.inner_text("#notices li")
    assert "deleted bob's shout \u201chi from New York\u201d" in notice
    assert not re.search(r"\d+-\d+", notice)  # no raw event id
    for page in (ann, bob):
        page.wait_for_function("!document.querySelector('#shouts').textContent.includes('hi from New York')")

    # the server goes away: posting says so in words, and keeps the text
    server.stop()
    ann.wait_for_selector('#status[data-status="reconnecting"]')
    assert ann.inner_text("#status") == "reconnecting\u2026"
    ann.fill("#text", "anyone there?")
    ann.click("#shout button")
    ann.wait_for_function("document.getElementById('error').textContent !== ''")
    error = ann.inner_text("#error")
    assert "Cannot reach the shoutbox" in error and "fetch" not in error.lower()
    assert ann.input_value("#text") == "anyone there?"


def test_the_status_says_live_reconnecting_and_offline_in_words(example_server, people, width):
    """The status tells the truth in words that fit a phone: "live" while
    the stream is heard from; "reconnecting…" once it has gone silent (a
    network that drops the packets: no FIN, no RST, the socket looks open);
    "offline" when the device has no network. Each time the page catches up."""
    server = example_server("examples.shoutbox", "--heartbeat", "1")
    with FaultProxy(server.url) as proxy:
        ctx = people()
        page = ctx.new_page()
        page.goto(proxy.url + "/")
        page.wait_for_selector('#status[data-status="open"]')
        assert page.inner_text("#status") == "live"
        # An event after the stream's heartbeat announcement (which comes
        # first on the stream): comet.js now knows the stream can be watched.
        post_shout(server.url, "ann", "before the cut")
        page.wait_for_selector("#shouts li:has-text('before the cut')")

        proxy.offline()  # the packets go nowhere; the browser is not told
        silent = time.monotonic()
        page.wait_for_selector('#status[data-status="reconnecting"]', timeout=10_000)
        noticed = time.monotonic() - silent
        assert page.inner_text("#status") == "reconnecting\u2026" and noticed < 5, noticed  # about 2 heartbeats
        assert in_view(page, "#status")
        assert_fits(page)
        post_shout(server.url, "ann", "sent while the page was cut off")
        proxy.restore()
        page.wait_for_selector("#shouts li:has-text('sent while the page was cut off')", timeout=10_000)
        page.wait_for_selector('#status[data-status="open"]')
        assert page.inner_text("#status") == "live"

        ctx.set_offline(True)
        page.wait_for_selector('#status[data-status="offline"]')
        assert page.inner_text("#status") == "offline" and in_view(page, "#status")
        assert_fits(page)
        post_shout(server.url, "bob", "sent while the device was offline")
        ctx.set_offline(False)
        page.wait_for_selector("#shouts li:has-text('sent while the device was offline')", timeout=10_000)
        page.wait_for_selector('#status[data-status="open"]')
        assert page.inner_text("#status") == "live"
        assert page.locator("#shouts .what").all_inner_texts() == [
            "before the cut", "sent while the page was cut off", "sent while the device was offline"]  # each once
    print(f"{width} px: silence noticed after {noticed:.1f} s (heartbeat 1 s)")
