"""Real headless Chromium (Debian's package) driven by Playwright, and the
example apps as real server processes on free 127.0.0.1 ports."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from comet.testing import http_get, wait_until

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExampleServer:
    """``python -m examples.<name>`` as a child process."""

    def __init__(self, module: str, *args: str, port: int | None = None) -> None:
        self.module, self.args = module, args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ExampleServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", str(self.port), "--threads", "60", *self.args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            assert self.proc.poll() is None, f"{self.module} exited with {self.proc.returncode}"
            try:
                return http_get(self.url + "/", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(up, timeout=20, interval=0.1, what=f"{self.module} listening")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def example_server():
    started: list[ExampleServer] = []

    def start(module: str, *args: str, port: int | None = None) -> ExampleServer:
        server = ExampleServer(module, *args, port=port).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
