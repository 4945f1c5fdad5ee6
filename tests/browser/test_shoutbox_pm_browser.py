"""The shoutbox's private messages in Chromium: two users and an intruder,
each page on ONE stream for the room, its threads and who is online."""
import json
import time

import pytest

from comet.testing import http_get, wait_until



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

    # the intruder, with the URL: 403 and the reason; eve's page sees nothing of it
    status, reason = eve.evaluate(
        "async () => { const r = await fetch('/pm/events?dm=ann:bob'); return [r.status, await r.text()]; }")
    assert status == 403 and "you are not part of the thread 'ann:bob'" in reason
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
