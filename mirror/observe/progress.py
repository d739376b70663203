"""Where long work reports its progress: a terminal display (``archive/offline.py``), plain lines, or nothing.

Preload, export, fsck and migrate report through this one protocol, so the same display serves them all.

May import: the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    """Where a long command reports its work: phases with a total, bytes done, images done."""

    def phase(self, label: str, total: int | None) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def image_done(self, name: str) -> None: ...


class NoProgress:
    """Progress reported to no one."""

    def phase(self, label: str, total: int | None) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def image_done(self, name: str) -> None:
        pass


class LineProgress:
    """Progress as plain lines (for logs and pipes, where a live display would be noise): one when a
    phase starts, then one every *every* seconds with the bytes done, written by *say*."""

    def __init__(self, label: str, say: Callable[[str], None], every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self._say = say
        self._every = every
        self._clock = clock
        self._phase = ""
        self._total: int | None = None
        self._done = 0
        self._next = 0.0

    def phase(self, label: str, total: int | None) -> None:
        self._phase, self._total, self._done = label, total, 0
        self._next = self._clock() + self._every
        self._say(f"{self.label}: {label}" + (f" ({total} bytes)" if total is not None else ""))

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        if self._clock() >= self._next:
            self._next = self._clock() + self._every
            of = f" of {self._total}" if self._total is not None else ""
            self._say(f"{self.label}: {self._phase}: {self._done}{of} bytes")

    def image_done(self, name: str) -> None:
        pass
