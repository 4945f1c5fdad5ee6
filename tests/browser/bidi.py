"""A small WebDriver BiDi driver for Debian's Firefox (firefox-esr), headless.

No WebDriver package can be installed here, so this speaks the protocol
itself: Firefox started with ``--remote-debugging-port``, a websocket (RFC
6455, written over a raw socket below) to ``/session``, then JSON commands:
``session.new``, ``browsingContext.navigate``, ``script.evaluate``. Enough to
load a page, run script in it and read values back, like Playwright's
``page.evaluate``::

    with Firefox() as ff:
        ff.goto("http://127.0.0.1:8080/")
        ff.wait_for("window.sub && window.sub.status === 'open'")
        ff.evaluate("window.got")          # JSON-able values come back as Python ones
"""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from typing import Any

PREFS = """
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.aboutwelcome.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("app.update.disabledForTesting", true);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("browser.safebrowsing.update.enabled", false);
user_pref("extensions.update.enabled", false);
user_pref("remote.active-protocols", 1);
user_pref("network.http.max-persistent-connections-per-server", 6);
"""


def firefox_path() -> str | None:
    return shutil.which("firefox-esr") or shutil.which("firefox")


class BiDiError(Exception):
    pass


class WebSocket:
    """A client websocket over a plain socket: text frames, masked as
    clients must, fragments joined, pings answered."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise BiDiError(f"websocket handshake: connection closed after {head!r}")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise BiDiError(f"websocket handshake refused: {head!r}")

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("no websocket message in time")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BiDiError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def recv(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        message = b""
        while True:
            b0, b1 = self._read(2, deadline)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8, deadline))[0]
            mask = self._read(4, deadline) if b1 & 0x80 else None
            payload = self._read(n, deadline)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping
                self._frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise BiDiError("websocket closed by Firefox")
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        try:
            self._frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class Firefox:
    """Headless Firefox in a fresh profile, driven over WebDriver BiDi; one tab."""

    def __init__(self, timeout: float = 30) -> None:
        path = firefox_path()
        if not path:
            raise BiDiError("Firefox is not installed: ./run test installs Debian's firefox-esr")
        self.profile = tempfile.mkdtemp(prefix="comet-bidi-")
        with open(os.path.join(self.profile, "user.js"), "w") as f:
            f.write(PREFS)
        self.log = open(os.path.join(self.profile, "stderr.log"), "w+b")
        self.proc = subprocess.Popen([path, "--headless", "--no-remote", "--profile", self.profile,
                                      "--remote-debugging-port", "0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.ws: WebSocket | None = None
        self._id = 0
        try:
            port = self._port(timeout)
            self.ws = WebSocket("127.0.0.1", port, "/session", timeout)
            self.command("session.new", {"capabilities": {}}, timeout=timeout)
            tree = self.command("browsingContext.getTree", {})
            self.context = tree["contexts"][0]["context"]
        except BaseException:
            self.close()
            raise

    def _port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.log.seek(0)
            found = re.search(rb"WebDriver BiDi listening on ws://[^:]+:(\d+)", self.log.read())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.log.seek(0)
        raise BiDiError(f"Firefox did not start its BiDi server: {self.log.read()[-2000:]!r}")

    def command(self, method: str, params: dict[str, Any], timeout: float = 30) -> Any:
        assert self.ws is not None
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(max(0.01, deadline - time.monotonic())))
            if message.get("id") != ident:
                continue  # an event (none are subscribed) or a late answer
            if message.get("type") == "error":
                raise BiDiError(f"{method}: {message.get('error')}: {message.get('message')}")
            return message["result"]

    def goto(self, url: str, context: str | None = None) -> None:
        self.command("browsingContext.navigate", {"context": context or self.context, "url": url, "wait": "complete"})

    def new_tab(self) -> str:
        """Another tab of the same profile (the same origin storage, locks,
        BroadcastChannels): its context id, for the context= arguments."""
        return str(self.command("browsingContext.create", {"type": "tab"})["context"])

    def close_tab(self, context: str) -> None:
        self.command("browsingContext.close", {"context": context})

    def evaluate(self, expression: str, timeout: float = 30, context: str | None = None) -> Any:
        """The value of a JavaScript expression (awaited if a promise), as
        JSON would carry it."""
        wrapped = f"(async () => JSON.stringify(await ({expression})))()"
        result = self.command("script.evaluate", {"expression": wrapped, "target": {"context": context or self.context},
                                                  "awaitPromise": True}, timeout=timeout)
        if result.get("type") == "exception":
            raise BiDiError(f"{expression}: {result['exceptionDetails'].get('text')}")
        value = result["result"]
        return json.loads(value["value"]) if value.get("type") == "string" else None

    def wait_for(self, expression: str, timeout: float = 15, interval: float = 0.05, context: str | None = None) -> Any:
        """Poll until *expression* is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, context=context)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(interval)

    def set_offline(self, offline: bool) -> bool:
        """The browser's own offline emulation (navigator.onLine, the
        online/offline events, requests failing at once), where this Firefox
        has it: True if it did."""
        try:
            self.command("emulation.setNetworkConditions", {
                "networkConditions": {"type": "offline"} if offline else None, "contexts": [self.context]})
        except BiDiError:
            return False
        return True

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.command("session.end", {}, timeout=5)
            except Exception:
                pass
            self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Firefox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
