"""Snapshots after a gap in a real browser: the in-memory shoutbox restarts
under open pages, which redraw the server's current state from the
``comet.snapshot`` (comet.js ``onSnapshot``) without reloading."""
from .test_examples_browser import post_shout

TEXTS = "[...document.querySelectorAll('#shouts li .what')].map((e) => e.textContent)"


def test_a_restarted_shoutbox_redraws_its_state_and_keeps_the_unsent_text(context, example_server):
    server = example_server("examples.shoutbox")
    post_shout(server.url, "bob", "before the restart")
    # Two tabs of one browser share one stream (shared: true): the snapshot
    # must reach the tab that does not hold it, too.
    pages = [context.new_page(), context.new_page()]
    for page in pages:
        page.goto(server.url + "/")
        page.wait_for_selector('#status[data-status="open"]')
        assert page.evaluate(TEXTS) == ["before the restart"]
        page.evaluate("window.notReloaded = true")
    writer = pages[0]
    writer.fill("#nick", "ann")
    writer.fill("#text", "still typing this")

    server.stop()  # the in-memory hub forgets everything
    for page in pages:
        page.wait_for_selector('#status[data-status="reconnecting"]')
    restarted = example_server("examples.shoutbox", port=server.port)
    post_shout(restarted.url, "cat", "after the restart")
    for page in pages:
        page.wait_for_function(f"JSON.stringify({TEXTS}) === JSON.stringify(['after the restart'])", timeout=30_000)
        page.wait_for_selector('#status[data-status="open"]')
    post_shout(restarted.url, "cat", "live again")  # ordered after anything that could come twice
    for page in pages:
        page.wait_for_function(f"{TEXTS}.includes('live again')")
        assert page.evaluate(TEXTS) == ["after the restart", "live again"]  # the old state gone, nothing twice
        assert page.evaluate("window.notReloaded") is True
        assert page.is_hidden("#empty")
    assert writer.input_value("#text") == "still typing this" and writer.input_value("#nick") == "ann"
