"""A live image in a plain ``<img src>``: JPEGs published through a hub to a
parked multipart stream show up in headless Chromium at once, read back from
screenshot pixels. Before comet/framing.py wrote each part's successor
headers with it, every frame showed one publish late and the last never;
a heartbeat before the first frame killed the image for good."""
from __future__ import annotations

import io
import time

import cherrypy
import pytest
from PIL import Image  # the JPEGs; in the test extras

from comet import Hub, Part, comet
from comet.cherrypy_tool import engine_plugin
from comet.testing import wait_until

COLOURS = [(220, 30, 30), (30, 180, 60), (40, 60, 220)]
SIZE = 64


def jpeg(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), rgb).save(out, "JPEG", quality=90)
    return out.getvalue()


def near(pixel, rgb, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, rgb))


@pytest.fixture
def camera(comet_cherrypy):
    hub = Hub(idle=0.2)

    class Root:
        @cherrypy.expose
        def index(self):
            return ('<!doctype html><body style="margin:0;background:#fff">'
                    '<script>window.imgErrors = 0</script>'
                    f'<img id="cam" src="/cam" width="{SIZE}" height="{SIZE}" alt="camera"'
                    ' onerror="imgErrors++" style="display:block"></body>')

        @cherrypy.expose
        @comet(transport="multipart", heartbeat=1)
        def cam(self):
            return hub.subscribe("cam")  # parked: no thread per viewer

    server = comet_cherrypy(Root())
    yield server, hub
    hub.close()


def centre(page) -> tuple[int, int, int]:
    shot = page.screenshot(clip={"x": 0, "y": 0, "width": SIZE, "height": SIZE})
    return Image.open(io.BytesIO(shot)).convert("RGB").getpixel((SIZE // 2, SIZE // 2))


def test_every_frame_is_on_screen_within_half_a_second(context, camera):
    server, hub = camera
    pool = engine_plugin().pool
    page = context.new_page()
    page.set_viewport_size({"width": 320, "height": 200})
    try:
        # the page's load event waits for the image's first part: do not wait for it
        page.goto(server.url + "/", wait_until="commit")
        wait_until(lambda: hub.subscriptions == 1 and pool.parked_streams == 1, timeout=10, what="the <img> parked")
        opened, beats = time.monotonic(), pool.counters["heartbeats"]
        # the scenario: the image opened 2.5 s before its first frame, two heartbeats in between
        wait_until(lambda: pool.counters["heartbeats"] - beats >= 2 and time.monotonic() - opened >= 2.5,
                   timeout=10, what="two heartbeats before the first frame")
        delays = []
        for n, colour in enumerate(COLOURS):
            published = time.monotonic()
            hub.publish("cam", Part(jpeg(colour), "image/jpeg"))
            seen = None
            while seen is None and time.monotonic() - published < 5:
                pixel = centre(page)
                if near(pixel, colour):
                    seen = time.monotonic()  # after the screenshot returned: an upper bound
            assert seen is not None, f"frame {n} {colour} never shown, the image shows {pixel}"
            delays.append(seen - published)
            # then 3 s between frames (heartbeats repeat the frame): it stays on screen
            while time.monotonic() - published < 3:
                pixel = centre(page)
                assert near(pixel, colour), f"frame {n} {colour} replaced by {pixel} before the next"
        assert max(delays) < 0.5, delays
        assert page.evaluate("window.imgErrors") == 0
        assert pool.counters["heartbeats"] - beats >= 6
    finally:
        page.close()
    wait_until(lambda: hub.subscriptions == 0 and pool.open_streams == 0, timeout=10, what="released when the page closed")


FIREFOX_PAGE = """<!doctype html><body style="margin:0;background:#fff">
<img id="cam" src="/cam" width="%(size)d" height="%(size)d" alt="camera" style="display:block"
 onload="fetch('/loaded?at=' + Date.now(), {method: 'POST'})" onerror="fetch('/loaded?error=1', {method: 'POST'})">
<img src="/hold" alt=""></body>"""


def test_every_frame_is_shown_at_once_in_firefox(comet_cherrypy, tmp_path):
    """The same in Firefox (Debian's firefox-esr, headless). No WebDriver for
    Firefox can be installed here and its --screenshot mode shoots once, when
    the page has loaded: so the page posts the time of each of the image's
    ``load`` events (Firefox fires one as each part completes; a canvas
    would only ever see the first frame), and the one screenshot, taken
    when the server releases the page's other image, must show the last
    frame, which the old framing never showed."""
    import shutil
    import subprocess
    import threading

    firefox = shutil.which("firefox-esr") or shutil.which("firefox")
    assert firefox, "Firefox is not installed: ./run test installs Debian's firefox-esr"
    hub = Hub(idle=0.2)
    loads: list[float] = []
    errors: list[str] = []
    release = threading.Event()

    class Root:
        @cherrypy.expose
        def index(self):
            return FIREFOX_PAGE % {"size": SIZE}

        @cherrypy.expose
        @comet(transport="multipart", heartbeat=1)
        def cam(self):
            return hub.subscribe("cam")

        @cherrypy.expose
        def loaded(self, at=None, error=None):
            if error:
                errors.append(error)
            else:
                loads.append(int(at) / 1000)
            return "ok"

        @cherrypy.expose
        def hold(self):  # the page's load event, and so Firefox's one screenshot, waits for this
            release.wait(40)
            cherrypy.response.headers["Content-Type"] = "image/gif"
            return b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"

    server = comet_cherrypy(Root())
    pool = engine_plugin().pool
    shot = tmp_path / "page.png"
    proc = subprocess.Popen([firefox, "--headless", "--no-remote", "--profile", str(tmp_path), "--screenshot",
                             str(shot), server.url + "/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: hub.subscriptions == 1, timeout=30, what="Firefox's <img> connected")
        opened, beats = time.monotonic(), pool.counters["heartbeats"]
        wait_until(lambda: pool.counters["heartbeats"] - beats >= 2 and time.monotonic() - opened >= 2.5,
                   timeout=10, what="two heartbeats before the first frame")
        published: list[float] = []
        for colour in COLOURS:
            if published:
                wait_until(lambda: time.time() - published[-1] >= 3, timeout=5, what="3 s between frames")
            published.append(time.time())  # wall clock: the page's Date.now() is the same clock
            hub.publish("cam", Part(jpeg(colour), "image/jpeg"))
            wait_until(lambda: any(t >= published[-1] for t in loads), timeout=5, what="the frame loaded")
        delays = [min(t for t in loads if t >= at) - at for at in published]
        assert max(delays) < 0.5, delays
        assert not errors
        release.set()
        assert proc.wait(30) == 0
        assert near(Image.open(shot).convert("RGB").getpixel((SIZE // 2, SIZE // 2)), COLOURS[-1])
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        hub.close()


def test_with_200_viewers_all_parked(context, camera):
    """The same with 199 more viewers of the channel (raw sockets asking as
    an <img> does; one page could open only six): all 200 parked, and each
    frame on Chromium's screen within 500 ms and in every viewer's socket.
    Their memory is measured by benchmarks/multipart_viewers.py."""
    import selectors
    import socket
    from concurrent.futures import ThreadPoolExecutor

    server, hub = camera
    pool = engine_plugin().pool
    host, port = server.url.split("//")[1].split(":")
    viewers, received = [], {}
    selector = selectors.DefaultSelector()
    page = context.new_page()
    try:
        def connect(_):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(b"GET /cam HTTP/1.1\r\nHost: x\r\nAccept: image/avif,image/webp,*/*\r\n\r\n")
            return sock

        # at once: one after another, each connect waits ~150 ms for cheroot to accept it here
        with ThreadPoolExecutor(50) as connecting:
            viewers.extend(connecting.map(connect, range(199)))
        for sock in viewers:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            received[sock] = bytearray()
        page.set_viewport_size({"width": 320, "height": 200})
        page.goto(server.url + "/", wait_until="commit")
        wait_until(lambda: hub.subscriptions == 200 and pool.parked_streams == 200, timeout=30, what="200 viewers parked")

        def read_all():
            for key, _ in selector.select(0):
                data = key.fileobj.recv(1 << 16)
                assert data, "a viewer was disconnected"
                received[key.fileobj] += data

        delays = []
        for n, colour in enumerate(COLOURS):
            frame = jpeg(colour)
            published = time.monotonic()
            hub.publish("cam", Part(frame, "image/jpeg"))
            seen = None
            while seen is None and time.monotonic() - published < 5:
                read_all()
                if near(centre(page), colour):
                    seen = time.monotonic()
            assert seen is not None, f"frame {n} never on screen"
            delays.append(seen - published)
            # a frame is small and written as one chunk: its bytes are contiguous in each socket
            wait_until(lambda: read_all() or all(frame in got for got in received.values()), timeout=10,
                       what=f"frame {n} at all 199 other viewers")
        assert max(delays) < 0.5, delays
        assert pool.parked_streams == 200 and page.evaluate("window.imgErrors") == 0
    finally:
        page.close()
        selector.close()
        for sock in viewers:
            sock.close()
    wait_until(lambda: hub.subscriptions == 0 and pool.open_streams == 0, timeout=15, what="all 200 released")
