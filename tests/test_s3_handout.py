"""The marks of objects handed out by a presigned URL: held a while after the latest hand-out, then let go."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mirror.spec.reference import Digest, parse_digest
from mirror.storage.s3handout import HandedOut
from tests.support.waiting import wait_for


def digest(n: int) -> Digest:
    return parse_digest(f"sha256:{n:064x}")


class Releases:
    """What was let go, in order, and when."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def of(self, name: str) -> Callable[[], None]:
        def release() -> None:
            with self._lock:
                self.done.append((name, time.monotonic()))
        return release

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.done]


def test_a_mark_goes_hold_seconds_after_its_latest_hand_out_and_a_newer_one_replaces_it() -> None:
    releases, held = Releases(), HandedOut(hold=0.6, most=10)
    start = time.monotonic()
    held.keep(digest(1), releases.of("a1"))
    held.keep(digest(2), releases.of("b"))
    time.sleep(0.3)
    held.keep(digest(1), releases.of("a2"))  # handed out again: the earlier mark goes now, the new one later
    assert releases.names() == ["a1"] and held.held() == 2
    wait_for(lambda: releases.names() == ["a1", "b"], timeout=5, what="b's mark to go")
    assert releases.done[1][1] - start >= 0.6
    wait_for(lambda: releases.names() == ["a1", "b", "a2"], timeout=5, what="a's second mark to go")
    assert releases.done[2][1] - start >= 0.9
    assert held.held() == 0


def test_beyond_most_the_longest_held_goes_first() -> None:
    releases, held = Releases(), HandedOut(hold=30.0, most=3)
    for n in range(5):
        held.keep(digest(n), releases.of(str(n)))
    assert releases.names() == ["0", "1"] and held.held() == 3
