"""Waiting on a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """True as soon as *predicate* holds (polled every *interval* seconds); False if it still does not
    after *timeout* seconds.  For ``assert eventually(...), diagnostics``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> None:
    """Return once *predicate* holds; :class:`AssertionError` naming *what* after *timeout* seconds."""
    if not eventually(predicate, timeout, interval):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
