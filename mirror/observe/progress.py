"""Where long work reports its progress: a terminal display (``archive/offline.py``), or nothing.

Preload, export and fsck report through this one protocol, so the same display serves all three.

May import: the standard library.
"""

from __future__ import annotations

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
