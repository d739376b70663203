"""A headless Chromium driven over the Chrome DevTools Protocol, for the web UI's tests.

Chromium (Debian package ``chromium``) runs in a process group of its own with a fresh profile;
one page (a CDP target) is driven over its websocket with the synchronous ``websockets``
client: navigate, evaluate JavaScript, type keys as a user would, send a header with every
request (a user's ``Authorization``), and record the JavaScript dialogs (``alert()``) the page
opened, dismissing them so it never hangs, and dismissing login prompts as a user without a
password does.  Protocol reference: the Chrome DevTools Protocol's
``Page``, ``Runtime``, ``Input`` and ``Network`` domains.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from .procs import Proc, require_tool

START_TIMEOUT = 30.0


class Browser:
    """One headless Chromium and one page of it."""

    def __init__(self, dir: Path) -> None:
        binary = require_tool("chromium", "chromium")
        self.dir = dir
        self.profile = dir / "profile"
        self._proc = Proc([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-extensions", "--disable-background-networking", "--disable-sync",
                           "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                           "--window-size=1280,900", f"--user-data-dir={self.profile}", "about:blank"],
                          dir / "chromium.log", name="chromium")
        self._ws: ClientConnection | None = None
        self._closing = contextlib.ExitStack()
        self._ids = itertools.count(1)
        #: Every CDP event received, in order: ``(method, params)``.
        self.events: list[tuple[str, dict[str, Any]]] = []

    def start(self) -> Browser:
        self._proc.start()
        try:
            self._connect()
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self) -> None:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if not self._proc.running or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start:\n{self._proc.log_tail()}")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        target = httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank", trust_env=False, timeout=10).json()
        self._ws = self._closing.enter_context(
            connect(target["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=10))
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setFocusEmulationEnabled", {"enabled": True})  # as a focused window is
        # Login prompts (HTTP auth challenges) are dismissed, as a user without a password would: the
        # page then shows the 401 answer's body.
        self.send("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]})

    def stop(self) -> None:
        try:
            self._closing.close()
        finally:
            self._ws = None
            self._proc.stop()

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the protocol --

    def send(self, method: str, params: Mapping[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Call a CDP method and return its result; events that arrive meanwhile are recorded."""
        assert self._ws is not None, "start() the browser first"
        call = next(self._ids)
        self._ws.send(json.dumps({"id": call, "method": method, "params": dict(params or {})}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})  # type: ignore[no-any-return]
            if "method" in message:
                self._event(message["method"], message.get("params", {}))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        self.events.append((method, params))
        # Answered without waiting (the page is blocked until then); the answers are not read.
        if method == "Page.javascriptDialogOpening":
            self._answer("Page.handleJavaScriptDialog", {"accept": False})
        elif method == "Fetch.requestPaused":
            self._answer("Fetch.continueRequest", {"requestId": params["requestId"]})
        elif method == "Fetch.authRequired":
            self._answer("Fetch.continueWithAuth", {"requestId": params["requestId"],
                                                    "authChallengeResponse": {"response": "CancelAuth"}})

    def _answer(self, method: str, params: dict[str, Any]) -> None:
        assert self._ws is not None
        self._ws.send(json.dumps({"id": next(self._ids), "method": method, "params": params}))

    def pump(self, seconds: float) -> None:
        """Receive events for *seconds* (a dialog a page opens late is recorded)."""
        assert self._ws is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = json.loads(self._ws.recv(timeout=left))
            except TimeoutError:
                return
            if "method" in message:
                self._event(message["method"], message.get("params", {}))

    @property
    def dialogs(self) -> list[str]:
        """The messages of the dialogs (``alert()``, ``confirm()``...) pages opened."""
        return [p.get("message", "") for m, p in self.events if m == "Page.javascriptDialogOpening"]

    # -- what a user does --

    def headers(self, headers: Mapping[str, str]) -> None:
        """Send *headers* with every request from now on (``{}`` to stop)."""
        self.send("Network.setExtraHTTPHeaders", {"headers": dict(headers)})

    def open(self, url: str, timeout: float = 30.0) -> int:
        """Load *url* and wait for its load event; return the HTTP status of the document."""
        start = len(self.events)
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"{url}: {result['errorText']}")
        return self._loaded(start, result.get("frameId"), url, timeout)

    def _loaded(self, start: int, frame: str | None, what: str, timeout: float) -> int:
        """Wait for a load event after event *start*; the HTTP status of the document *frame* got."""
        deadline = time.monotonic() + timeout
        while not any(m == "Page.loadEventFired" for m, _ in self.events[start:]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not load")
            self.pump(0.05)
        statuses = [p["response"]["status"] for m, p in self.events[start:]
                    if m == "Network.responseReceived" and p.get("type") == "Document"
                    and (frame is None or p.get("frameId") == frame)]
        return int(statuses[-1]) if statuses else 0

    def follow(self, selector: str, timeout: float = 30.0) -> int:
        """Click the link or button *selector* and wait for the page it loads; its HTTP status."""
        start = len(self.events)
        self.click(selector)
        return self._loaded(start, None, selector, timeout)

    def screenshot(self, path: Path) -> Path:
        """Save what the page shows now as a PNG at *path* (``Page.captureScreenshot``)."""
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self, selector: str = "body") -> str:
        """What the user reads in the element: its rendered text."""
        return str(self.js(f"document.querySelector({json.dumps(selector)})?.innerText ?? ''"))

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Wait until *expression* is truthy in the page; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout}s: {expression}")
            self.pump(0.05)

    def click(self, selector: str) -> None:
        """Click the middle of the element with the mouse (a user gesture, as the Clipboard API wants)."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
                      "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def press(self, key: str) -> None:
        """Press and release one key: ``Tab``, ``Enter``, or a character (typed where the focus is)."""
        codes = {"Tab": 9, "Enter": 13}
        down: dict[str, Any] = {"type": "keyDown", "key": key, "windowsVirtualKeyCode": codes.get(key, 0)}
        if key == "Enter":
            down["text"] = "\r"
        elif key not in codes:
            down["text"] = key
        self.send("Input.dispatchKeyEvent", down)
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "windowsVirtualKeyCode": codes.get(key, 0)})

    def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        """Emulate a screen of *width* x *height* CSS pixels (a phone with *mobile*)."""
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": mobile})

    def type(self, selector: str, text: str) -> None:
        """Focus the element and type *text* key by key, as a user would."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        for char in text:
            self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": char, "key": char})
            self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": char})
