"""A headless Chromium driven by Playwright, for the web UI's tests.

Playwright for Python (the test extra's ``playwright``) launches Debian's ``chromium``
(``executable_path``): the browser builds Playwright would download are never used, so nothing
is fetched but the PyPI package.  One browser is started per test module (:func:`chromium`);
each test gets a fresh context (no cookies, cache or permissions carried over) and one page of
it (:func:`open_page`), which records what a user could not see but a test should: the
JavaScript dialogs (``alert()``) pages opened, dismissed so that nothing hangs, every response
and failed request, and the console's errors.  An HTTP login prompt is dismissed, as by a user
without a password: Playwright cannot cancel a first challenge (headless, it fails the navigation),
so it answers with an empty user and password, and cancels the second; the page then shows the
``401`` answer's body.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, sync_playwright

from .procs import require_tool

#: Milliseconds Playwright waits for a page, an element or a condition before it fails the test.
TIMEOUT_MS = 30_000
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        "--disable-background-networking", "--disable-sync"]


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's headless Chromium under Playwright; a test fails (never skips) without it."""
    binary = require_tool("chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Seen:
    """What a page did that the user does not read: dialogs opened (their messages), responses
    (``(url, status)``), requests that failed (``(url, reason)``), and console errors."""

    dialogs: list[str] = field(default_factory=list)
    responses: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_page(browser: Browser, screenshot: Path | None = None, **context: Any) -> Iterator[tuple[Page, Seen]]:
    """A page of a fresh context (*context*: Playwright's ``new_context`` options, e.g. a phone's
    ``viewport`` and ``is_mobile``), and what it is seen doing.  What the page shows at the end
    is saved at *screenshot*."""
    options: dict[str, Any] = {"viewport": {"width": 1280, "height": 900},
                               "http_credentials": {"username": "", "password": ""}, **context}
    made = browser.new_context(**options)
    try:
        page = made.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        seen = Seen()

        def dialog(opened: Any) -> None:
            seen.dialogs.append(opened.message)
            opened.dismiss()

        page.on("dialog", dialog)
        page.on("response", lambda r: seen.responses.append((r.url, r.status)))
        page.on("requestfailed", lambda r: seen.failed.append((r.url, r.failure or "")))
        page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
        yield page, seen
        if screenshot is not None:
            page.screenshot(path=screenshot, full_page=True)
    finally:
        made.close()


def status(page: Page, url: str) -> int:
    """Load *url*, wait for its load event, and return the HTTP status of the document."""
    response = page.goto(url)
    assert response is not None, url
    return response.status


def follow(page: Page, selector: str) -> int:
    """Click the link or button *selector* and wait for the page it loads; its HTTP status."""
    with page.expect_navigation() as loaded:
        page.click(selector)
    response = loaded.value
    assert response is not None, selector
    return response.status


def text(page: Page, selector: str = "body") -> str:
    """What the user reads in the first element matching *selector* (``""`` if there is none)."""
    return str(page.evaluate(f"document.querySelector({json.dumps(selector)})?.innerText ?? ''"))
