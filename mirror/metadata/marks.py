"""In-use marks in the index (:class:`InUseMarks`, part of ``driver.Metadata``): digests that holders on
every host sharing the index are serving from the blob store or filling, which a collector on any host
spares.  Kept by the ``postgres`` driver (``pgmarks.py``); an index of one host keeps none (:class:`HostMarks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Protocol

__all__ = ["HostMarks", "InUseMarks"]


class InUseMarks(Protocol):
    """Digests being served from the blob store or filled, by holders on every host sharing the index.

    A holder (one process) marks a digest before it looks the object up (:meth:`mark_in_use`); a mark
    lasts *ttl* seconds by the driver's clock unless marked again, so those of a holder that died
    expire.  A collector deletes an object only inside :meth:`unmarked`: while it holds a digest free,
    no mark on it can be taken (those waiting get theirs after the delete, then find no object).
    """

    def mark_in_use(self, holder: str, digests: Collection[str], ttl: float) -> None:
        """Mark (or mark again) *digests* as used by *holder* until *ttl* seconds from now; waits while a
        collector deletes one of them (:meth:`unmarked`)."""
        ...

    def unmark_in_use(self, holder: str, digests: Collection[str]) -> None:
        """Withdraw *holder*'s marks on *digests* (those it did not mark are no error)."""
        ...

    def in_use(self) -> set[str]:
        """Every digest with an unexpired mark, by any holder: a snapshot."""
        ...

    def unmarked(self, digest: str) -> contextlib.AbstractContextManager[bool]:
        """Whether *digest* has no unexpired mark; while True, none can be taken until the block ends."""
        ...


class HostMarks:
    """:class:`InUseMarks` of an index one host holds: none are kept.  That host's processes see each
    other's readers and fills through its data directory (``storage/marks.py``, ``storage/growing.py``)."""

    def mark_in_use(self, holder: str, digests: Collection[str], ttl: float) -> None:
        return None

    def unmark_in_use(self, holder: str, digests: Collection[str]) -> None:
        return None

    def in_use(self) -> set[str]:
        return set()

    @contextlib.contextmanager
    def unmarked(self, digest: str) -> Iterator[bool]:
        yield True
