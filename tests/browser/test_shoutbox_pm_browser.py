"""The shoutbox's private messages in Chromium: two users and an intruder,
each page on ONE stream for the room, its threads and who is online."""
import json
import time

import pytest

from comet.testing import FaultProxy, http_get, wait_until



@pytest.fixture
def profiles(browser):
    """Factory: a fresh browser profile (its own cookies) per user."""
    made, errors = [], []

    def new():
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(15_000)
        ctx.on("weberror", lambda web_error: errors.append(str(web_error.error)))
        made.append(ctx)
        return ctx

    yield new
    for ctx in made:
        ctx.close()
    assert not errors, f"uncaught errors in the pages: {errors}"


def sign_in(ctx, base: str, name: str):
    page = ctx.new_page()
    page.goto(base + "/pm/signin")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", name + "-pw")
    page.click("form button")
    page.wait_for_selector(f'#pm[data-me="{name}"]')
    page.wait_for_selector('#status[data-status="open"]')
    return page


def open_streams(base: str) -> int:
    return json.loads(http_get(base + "/comet/stats/json")[2])["streams"]["open"]


def test_two_users_and_an_intruder_each_on_one_stream(profiles, example_server):
    server = example_server("examples.shoutbox")
    ann, bob, eve = (sign_in(profiles(), server.url, name) for name in ("ann", "bob", "eve"))
    wait_until(lambda: open_streams(server.url) == 3, 5.0, what="one stream per page")
    # who is online, on the same stream (the library's presence: comet.join events)
    for page in (ann, bob, eve):
        page.wait_for_function("['ann', 'bob', 'eve'].every((n) => document.querySelector(`#online li[data-name='${n}']`))")

    # ann opens a thread with bob and sends with Ctrl+Enter
    ann.fill("#pm-peer", "bob")
    ann.click("#pm-open button")
    ann.wait_for_selector("#pm-thread:not([hidden])")
    ann.fill("#pm-text", "hello bob, privately")
    ann.press("#pm-text", "Control+Enter")
    ann.wait_for_selector("#pm-messages li.mine:has-text('hello bob, privately')")
    ann.wait_for_function("document.getElementById('pm-text').value === ''")  # once the POST has answered

    # bob's page learns of the new thread on its stream, with an unread badge
    bob.wait_for_selector('#threads li[data-peer="ann"] .badge:not([hidden]):has-text("1")')
    assert bob.inner_text("#pm-received") == "1" and bob.inner_text("#pm-total") == "1"
    bob.click('#threads li[data-peer="ann"] button')
    bob.wait_for_selector("#pm-messages li.theirs:has-text('hello bob, privately')")
    bob.wait_for_selector('#threads li[data-peer="ann"] .badge[hidden]', state="attached")
    bob.fill("#pm-text", "hi ann")
    bob.press("#pm-text", "Control+Enter")
    ann.wait_for_selector("#pm-messages li.theirs:has-text('hi ann')")
    for page, sent, received in ((ann, "1", "1"), (bob, "1", "1")):
        page.wait_for_function("document.getElementById('pm-total').textContent === '2'")
        assert (page.inner_text("#pm-sent"), page.inner_text("#pm-received")) == (sent, received)

    # the room on the same stream
    ann.fill("#nick", "ann")
    ann.fill("#text", "hello room")
    ann.click("#shout button")
    for page in (bob, eve):
        page.wait_for_selector("#shouts li:has-text('hello room')")
    ann.wait_for_selector("#shouts li.mine:has-text('hello room')")  # known by its own id

    # still one stream per page, the room and a thread on each of ann's and bob's
    wait_until(lambda: open_streams(server.url) == 3, 5.0, what="one stream per page after the resubscribe")
    by_channel = json.loads(http_get(server.url + "/comet/stats/json")[2])["streams"]["by_channel"]
    assert sum(by_channel.values()) == 3 and all(name.startswith("shouts") for name in by_channel), by_channel

    # the intruder gets no signed URL for the thread, and her own does not open it: 403s with the reason
    refused = eve.evaluate("""async () => {
        const asked = await fetch('/pm/url?dm=ann:bob');
        const own = (await (await fetch('/pm/url?dm=eve:ann')).json()).url;
        const forged = await fetch(own.replace('dm=eve%3Aann', 'dm=ann%3Abob'));
        const bare = await fetch('/pm/events?dm=ann:bob');
        return [asked.status, (await asked.json()).error, forged.status, await forged.text(), bare.status, await bare.text()];
    }""")
    assert refused == [403, "you are not part of the thread 'ann:bob'", 403, "you are not part of the thread 'ann:bob'\n",
                       403, "a stream token is required\n"]
    assert eve.locator("#pm-messages li").count() == 0 and eve.locator("#threads li").count() == 0

    # too long: a clear message in the page, nothing sent
    ann.fill("#pm-text", "x" * 10_001)
    ann.wait_for_selector("#pm-count.over")
    assert "at most 10,000 characters; this one has 10,001" in ann.inner_text("#pm-error")
    ann.press("#pm-text", "Control+Enter")
    assert ann.input_value("#pm-text") == "x" * 10_001  # kept, not sent
    assert bob.locator("#pm-messages li").count() == 2

    # signing out (from elsewhere: the page does nothing itself) ends ann's stream within a second
    csrf = ann.input_value("input[name=csrf]")
    started = time.monotonic()
    assert ann.request.post(server.url + "/pm/signout", form={"csrf": csrf}).ok
    wait_until(lambda: open_streams(server.url) == 2, 1.0, 0.02, what="ann's stream ended")
    ended = time.monotonic() - started
    ann.wait_for_function("document.getElementById('pm-error').textContent.includes('signed out')")
    assert ann.get_attribute("#status", "data-status") == "closed"
    # ... and, once the grace period is over, the others see her leave
    for page in (bob, eve):
        page.wait_for_function("!document.querySelector(`#online li[data-name='ann']`)", timeout=10_000)
    print(f"sign-out to stream end: {ended * 1000:.0f} ms")


def pumping(page, predicate, what: str, timeout: float = 10.0) -> None:
    """wait_until that lets Playwright deliver the page's events meanwhile
    (the sync API delivers them only inside its own calls)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        page.wait_for_timeout(50)


def test_an_expiring_stream_url_is_renewed_without_the_app(profiles, example_server):
    """The private-message stream URL is signed for 2 s only. Ann's page is
    cut off for longer (no network); when it is back, comet.js asks the
    page's URL function for a fresh URL: no 403, and what bob sent meanwhile
    shows once. The URL it used before would have been refused."""
    server = example_server("examples.shoutbox", "--heartbeat", "1", "--stream-url-ttl", "2")
    with FaultProxy(server.url) as proxy:
        ann_ctx = profiles()
        signed, streams, refused = [], [], []
        ann_ctx.on("request", lambda r: signed.append(time.monotonic()) if "/pm/url" in r.url else
                   streams.append(r.url) if "/pm/events" in r.url else None)
        ann_ctx.on("response", lambda r: refused.append(r.url) if "/pm/" in r.url and r.status >= 400 else None)
        ann = sign_in(ann_ctx, proxy.url, "ann")
        bob = sign_in(profiles(), server.url, "bob")
        ann.fill("#pm-peer", "bob")
        ann.click("#pm-open button")
        ann.wait_for_selector("#pm-thread:not([hidden])")
        pumping(ann, lambda: streams and "dm=ann%3Abob" in streams[-1], "ann's page follows the thread")
        ann.wait_for_selector('#status[data-status="open"]')
        # an event after the stream's heartbeat announcement: comet.js now watches this stream
        bob.fill("#nick", "bob")
        bob.fill("#text", "hello room")
        bob.click("#shout button")
        ann.wait_for_selector("#shouts li:has-text('hello room')")
        before = len(signed)

        proxy.offline()
        ann_ctx.set_offline(True)
        ann.wait_for_selector('#status[data-status="offline"]')
        bob.fill("#pm-peer", "ann")
        bob.click("#pm-open button")
        bob.fill("#pm-text", "sent while you were away")
        bob.press("#pm-text", "Control+Enter")
        bob.wait_for_selector("#pm-messages li.mine:has-text('sent while you were away')")
        expired = signed[-1] + 3.0  # signed for 2 s, rounded up to the second
        pumping(ann, lambda: time.monotonic() > expired, "the page's stream URL expired")
        old_url = streams[-1]
        proxy.restore()
        ann_ctx.set_offline(False)
        ann.wait_for_selector("#pm-messages li.theirs:has-text('sent while you were away')", timeout=10_000)
        ann.wait_for_selector('#status[data-status="open"]')
        assert ann.locator("#pm-messages li").all_inner_texts()[-1].endswith("sent while you were away")
        assert ann.locator("#pm-messages li:has-text('sent while you were away')").count() == 1
        assert len(signed) > before and refused == []
        status, _, body = http_get(old_url.replace(proxy.url, server.url))
        assert status == 403 and b"expired" in body  # what a fixed URL would have got


# -- at a phone's width and a laptop's -------------------------------------------------

from .test_examples_players import SCREENSHOTS, assert_fits, people, width  # noqa: E402,F401  (fixtures)


def test_private_messages_fit_a_phone_and_a_laptop(example_server, people, width):
    server = example_server("examples.shoutbox", "--rate", "100/10")
    ann, bob = (sign_in(people(), server.url, name) for name in ("ann", "bob"))
    ann.fill("#nick", "ann")
    ann.fill("#text", "anyone up for a game tonight?")
    ann.click("#shout button")
    ann.click("#pm-peer")
    ann.fill("#pm-peer", "bob")
    ann.press("#pm-peer", "Enter")
    for text in ("are you coming at eight?", "bring the cards " * 12):
        ann.fill("#pm-text", text)
        ann.press("#pm-text", "Control+Enter")
        bob.wait_for_selector(f"#threads li[data-peer='ann'] .badge:not([hidden])")
    bob.wait_for_selector("#threads li[data-peer='ann'] .badge:has-text('2')")
    ann.wait_for_selector("#pm-messages li:has-text('bring the cards')")
    for page in (ann, bob):
        assert_fits(page)
        page.locator("#pm").scroll_into_view_if_needed()
    assert ann.locator("#pm-text").is_visible() and ann.locator("#pm-form button").is_visible()
    ann.screenshot(path=str(SCREENSHOTS / f"shoutbox-pm-{width}.png"), full_page=True)
    bob.click("#threads li[data-peer='ann'] button")
    bob.wait_for_selector("#pm-messages li:has-text('are you coming at eight?')")
    assert_fits(bob)
