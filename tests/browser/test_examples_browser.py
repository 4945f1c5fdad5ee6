"""The example apps, for real: server processes, headless Chromium pages."""
import json
import re
import time
import urllib.parse
import urllib.request
import http.cookiejar

from comet.testing import FaultProxy, http_get, wait_until


def post_shout(base: str, nick: str, text: str) -> None:
    """Post like a fresh browser would: get the CSRF cookie and field, then POST."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    html = opener.open(base + "/", timeout=10).read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)[1]
    data = urllib.parse.urlencode({"nick": nick, "text": text, "csrf": csrf}).encode()
    assert opener.open(base + "/shout", data=data, timeout=10).status == 200


def post_json(url: str, fields: dict) -> dict:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return json.loads(response.read())


def lobby_players(base: str, lobby: str) -> list[str]:
    html = http_get(f"{base}/lobby/{lobby}")[2].decode()
    block = html.split('<ul id="players" class="players">', 1)[1].split("</ul>", 1)[0]
    return re.findall(r'<li><span class="name">(.*?)</span>', block)


def test_three_tabs_join_a_lobby_and_play_a_round(context, example_server):
    server = example_server("examples.lobby_game", "--size", "4")
    names = ["ann", "bob", "cat"]
    # One browser context, three tabs: each tab is its own player (sessionStorage).
    pages = [context.new_page() for _ in names]
    for page, name in zip(pages, names):
        page.goto(server.url + "/lobby/friday")
        page.fill("#name", name)
        page.click("#join button")
        page.wait_for_selector("#players li.me")
    for page in pages:
        page.wait_for_function("document.querySelectorAll('#players li').length === 3")
        assert page.get_attribute("#status", "data-status") == "open" and page.inner_text("#status") == "live"
        assert page.locator("#players li .name").all_inner_texts() == ["ann", "bob", "cat"]
        assert page.locator("#players li.host .name").all_inner_texts() == ["ann"]
    assert pages[1].is_hidden("#start") and pages[0].is_visible("#start")
    pages[0].click("#start")  # the host starts: same countdown for everyone
    for page in pages:
        page.wait_for_selector('#board[data-phase="countdown"]')
    for page in pages:
        page.wait_for_selector('#board[data-phase="go"]', timeout=10_000)
    pages[1].click("#play")
    for page in pages:
        page.wait_for_selector('#board[data-phase="finished"]')
        assert re.fullmatch(r"bob won in \d+ ms", page.inner_text("#phase"))
    assert pages[1].inner_text("#message") == "you win!"
    # closing the tabs: the players leave the lobby (disconnect + grace period)
    for page in pages:
        page.close()
    wait_until(lambda: lobby_players(server.url, "friday") == [], timeout=20, interval=0.2, what="lobby empty")


def test_a_lobby_page_shows_the_restarted_servers_state(context, example_server):
    """The in-memory game forgets its lobbies on restart. The page's stream
    then hears that nobody is in this lobby (404); the page must show that
    (its seat is gone), not keep showing the old state, and the player can
    join again, which opens the lobby anew."""
    server = example_server("examples.lobby_game")
    page = context.new_page()
    page.goto(server.url + "/lobby/saturday")
    page.fill("#name", "ann")
    page.click("#join button")
    page.wait_for_selector("#players li.me")
    server.stop()
    page.wait_for_selector('#status[data-status="reconnecting"]')
    restarted = example_server("examples.lobby_game", port=server.port)
    page.wait_for_function("document.querySelectorAll('#players li').length === 0", timeout=30_000)
    page.wait_for_selector('#status[data-status="closed"]')
    assert page.inner_text("#status") == "not open" and page.inner_text("#message") == "You left the lobby."
    assert page.is_visible("#join") and page.evaluate("sessionStorage.getItem('comet-lobby:saturday')") is None
    page.fill("#name", "ann")
    page.click("#join button")
    page.wait_for_selector("#players li.me")
    page.wait_for_selector('#status[data-status="open"]')
    assert lobby_players(restarted.url, "saturday") == ["ann"]
    page.close()


def test_behind_a_proxy_that_buffers_streams_a_lobby_page_plays_by_long_poll(context, example_server):
    """Some proxies (anti-virus, corporate, CDNs) hold a response until it
    ends: an SSE stream never arrives. The lobby page notices (no byte in a
    few heartbeats), follows the same lobby by long-poll from its cursor,
    and says so: "live (long-poll)". Its player stays online meanwhile."""
    # The default grace (3 s): it must outlast the gaps between the stalled
    # stream connections comet.js retries (with backoff) before it falls back.
    server = example_server("examples.lobby_game", "--heartbeat", "1", "--grace", "3")
    with FaultProxy(server.url) as proxy:
        proxy.buffer_responses(True)
        page = context.new_page()
        page.goto(proxy.url + "/lobby/buffered")
        started = time.monotonic()
        page.fill("#name", "ann")
        page.click("#join button")
        page.wait_for_selector('#status[data-status="open"][data-transport="longpoll"]', timeout=20_000)
        fell_back = time.monotonic() - started
        assert page.inner_text("#status") == "live (long-poll)"
        assert "long-poll" in page.get_attribute("#status", "title")
        page.wait_for_selector("#players li.me")
        post_json(server.url + "/join", {"name": "buffered", "player": "bob"})
        page.wait_for_function("document.querySelectorAll('#players li').length === 2")
        # a long-poll is a new request each time: the player's presence outlives the gaps between them
        online_since = time.monotonic()
        wait_until(lambda: time.monotonic() - online_since > 4, 6.0, what="longer than the grace period")
        assert page.locator("#players li.me.offline").count() == 0 and lobby_players(server.url, "buffered") == ["ann", "bob"]
    print(f"fell back to long-poll {fell_back:.1f} s after joining (heartbeat 1 s)")


def test_shouts_appear_in_every_page_and_xss_stays_text(context, example_server):
    server = example_server("examples.shoutbox")
    pages = [context.new_page() for _ in range(3)]
    for page in pages:
        page.goto(server.url + "/")
        page.wait_for_selector('#status[data-status="open"]')
    pages[0].fill("#nick", "eve")
    pages[0].fill("#text", "hello from page one")
    pages[0].click("#shout button")
    for page in pages:
        page.wait_for_selector("#shouts li:has-text('hello from page one')")
    payloads = ['<img src=x onerror="window.__xss=1">', "<script>window.__xss=2</script>"]
    for payload in payloads:
        pages[0].fill("#text", payload)
        with pages[0].expect_response("**/shout"):
            pages[0].click("#shout button")
        pages[0].wait_for_function("document.getElementById('text').value === ''")
    for page in pages:
        page.wait_for_function("document.querySelectorAll('#shouts li').length === 3")
        texts = page.locator("#shouts .what").all_inner_texts()
        assert texts[-2:] == payloads  # shown as text, newest last
        assert page.locator("#shouts img, #shouts script").count() == 0
        assert page.evaluate("window.__xss") is None
    # a reload renders the same history server-side, escaped, and resumes after it
    pages[2].reload()
    pages[2].wait_for_selector('#status[data-status="open"]')
    assert pages[2].locator("#shouts .what").all_inner_texts()[-2:] == payloads
    assert pages[2].evaluate("window.__xss") is None
    # a rule violation shows a clear error in the page and keeps the text.
    # (The tabs share one cookie jar, so one rate-limit bucket: post until refused.)
    statuses = []
    for n in range(8):
        pages[1].fill("#nick", "spammer")
        pages[1].fill("#text", f"spam {n}")
        with pages[1].expect_response("**/shout") as response:
            pages[1].click("#shout button")
        statuses.append(response.value.status)
        if statuses[-1] == 429:
            break
        pages[1].wait_for_function("document.getElementById('text').value === ''")
    assert statuses[-1] == 429, statuses
    pages[1].wait_for_function("document.getElementById('error').textContent.includes('slow down')")
    assert pages[1].input_value("#text") == f"spam {len(statuses) - 1}"  # nothing lost from the box
    for page in pages:
        page.close()


def test_pages_reconnect_after_server_restart_and_show_what_was_sent(context, example_server):
    server = example_server("examples.shoutbox")
    pages = [context.new_page() for _ in range(2)]
    for page in pages:
        page.goto(server.url + "/")
        page.wait_for_selector('#status[data-status="open"]')
    post_shout(server.url, "ann", "before the restart")
    for page in pages:
        page.wait_for_selector("#shouts li:has-text('before the restart')")
    server.stop()
    for page in pages:
        page.wait_for_selector('#status[data-status="reconnecting"]')
    restarted = example_server("examples.shoutbox", port=server.port)
    post_shout(restarted.url, "bob", "sent while you were away")
    post_shout(restarted.url, "bob", "and another one")
    for page in pages:
        # the old cursor belongs to the old server: a gap, then the new
        # server's shouts as a snapshot the page merges, then live shouts
        page.wait_for_selector("#shouts li:has-text('and another one')", timeout=30_000)
        page.wait_for_selector('#status[data-status="open"]')
        # what the page showed stays, greyed, under a note: the server has forgotten it
        assert page.locator("#shouts .what").all_inner_texts() == [
            "before the restart", "sent while you were away", "and another one"]
        assert page.locator("#shouts li.gone .what").all_inner_texts() == ["before the restart"]
        note = page.locator("#shouts li.gone + li#gone-note")
        assert note.is_visible() and note.get_attribute("role") == "note"
        assert note.inner_text() == ("The shout above is no longer on the server (it restarted, "
                                     "or dropped old shouts): only this page still shows it.")
    post_shout(restarted.url, "cat", "live again")
    for page in pages:
        page.wait_for_selector("#shouts li:has-text('live again')")
    # a reload shows what the server has: the note was the page's own memory
    pages[0].reload()
    pages[0].wait_for_selector('#status[data-status="open"]')
    assert pages[0].locator("#shouts .what").all_inner_texts() == [
        "sent while you were away", "and another one", "live again"]
    assert pages[0].locator("#gone-note").count() == 0
    for page in pages:
        page.close()


def test_after_a_gap_the_shoutbox_merges_what_the_server_still_has(context, example_server):
    """The page's side of a gap, event by event: shouts deleted while the
    page was away go; shouts the server no longer holds (older than the
    gap's resume_id) stay under the note; shouts older than the snapshot's
    50 stay quietly when the server says it has more."""
    server = example_server("examples.shoutbox", "--rate", "100/10")
    for text in ("a", "b", "c", "d"):
        post_shout(server.url, "ann", text)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector('#status[data-status="open"]')
    ids = page.eval_on_selector_all("#shouts li[data-id]", "els => els.map((li) => li.dataset.id)")
    epoch = ids[0].split("-")[0]

    def shout(event_id, text):
        return {"id": event_id, "nick": "ann", "text": text, "at": 0}

    def gap_then(floor, shouts, more=False):
        page.evaluate("""([floor, shouts, more]) => {
            Shoutbox.onGap({event: "comet.gap", data: {last_id: "x", resume_id: floor, snapshot: true}});
            Shoutbox.onSnapshot({event: "comet.snapshot", data: {shouts: shouts, more: more}});
        }""", [floor, shouts, more])
        return page.locator("#shouts li").evaluate_all(
            "els => els.map((li) => li.id === 'gone-note' ? 'NOTE' : (li.classList.contains('gone') ? '~' : '') + li.querySelector('.what').textContent)")

    # b was deleted while the page was away, e is new: nothing else changes
    assert gap_then(f"{epoch}-0", [shout(ids[0], "a"), shout(ids[2], "c"), shout(ids[3], "d"), shout(f"{epoch}-9", "e")]) == [
        "a", "c", "d", "e"]
    # the server holds more than the 50 it sends: a shown shout older than them is kept, not taken for deleted
    assert gap_then(f"{epoch}-0", [shout(ids[2], "c"), shout(ids[3], "d"), shout(f"{epoch}-9", "e")], more=True) == [
        "a", "c", "d", "e"]
    # the server dropped everything up to c (its buffer, or a restart): a and c stay, greyed, above the note
    assert gap_then(ids[2], [shout(ids[3], "d"), shout(f"{epoch}-9", "e")]) == ["~a", "~c", "NOTE", "d", "e"]
    assert page.inner_text("#gone-note").startswith("The 2 shouts above are no longer on the server")
    assert page.locator("#shouts li.gone button.delete").count() == 0
    page.close()


def test_the_live_stats_page_renders_and_moves(context, example_server):
    lobby = example_server("examples.lobby_game", "--size", "4")
    shoutbox = example_server("examples.shoutbox")
    game = context.new_page()
    game.goto(lobby.url + "/lobby/stats-room")  # one stream open on the lobby's channel, once joined
    game.fill("#name", "ops")
    game.click("#join button")
    game.wait_for_selector('#status[data-status="open"]')
    stats = context.new_page()
    stats.goto(lobby.url + "/comet/stats")  # CherryPy redirects to /comet/stats/
    stats.wait_for_function("Number(document.body.dataset.samples || 0) >= 2", timeout=15_000)
    assert stats.get_attribute("#status", "data-state") == "live"
    # the lobby page's stream and the stats page's own stream
    stats.wait_for_function("Number(document.getElementById('open').textContent) >= 2")
    channels = stats.locator("#channels td:first-child").all_inner_texts()
    assert "lobby:stats-room" in channels
    assert "sse" in stats.locator("#transports td:first-child").all_inner_texts()
    points = stats.get_attribute("#spark-open polyline", "points")
    assert points and len(points.split()) >= 2  # the sparkline is drawn
    # a shout on the shoutbox moves its published/delivered counters live
    page = context.new_page()
    page.goto(shoutbox.url + "/comet/stats/")
    page.wait_for_function("document.getElementById('published').textContent !== '–'")
    before = int(page.inner_text("#published").replace(",", ""))
    post_shout(shoutbox.url, "ops", "hello stats")
    page.wait_for_function(f"Number(document.getElementById('published').textContent.replace(/,/g, '')) > {before}")
