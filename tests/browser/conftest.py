"""Real headless Chromium (Debian's package) driven by Playwright, and the
example apps as real server processes on free 127.0.0.1 ports."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from comet.testing import AppProcess

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("COMET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is not installed: ./run test installs Debian's chromium package")
    return path


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser):
    """A fresh browser profile; any uncaught exception in its pages fails the test."""
    ctx = browser.new_context()
    ctx.set_default_timeout(15_000)
    errors: list[str] = []
    ctx.on("weberror", lambda web_error: errors.append(str(web_error.error)))
    yield ctx
    ctx.close()
    assert not errors, f"uncaught errors in the pages: {errors}"


@pytest.fixture
def example_server():

    """Factory: ``example_server("examples.shoutbox", *args)`` runs the app in
    its own process on a free port (or *port*) until the test ends."""
    started: list[AppProcess] = []

    def start(module: str, *args: str, port: int | None = None) -> AppProcess:
        server = AppProcess(["-m", module, "--threads", "60", *args], port=port, cwd=ROOT).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
