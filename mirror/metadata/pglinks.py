"""Links of the ``postgres`` driver answered from memory once seen, while the generation stands still.

A blob GET asks :meth:`~mirror.metadata.driver.RepositoryIndex.is_linked` before anything else, on
the event loop: with PostgreSQL that was a round trip to the database on every request, the loop
waiting (and every other request with it) for as long as the network takes.  A link is only ever
taken away by a withdrawal, and every withdrawal moves the generation (``driver.py``): so
:class:`RememberedLinks` keeps the links it found, and forgets them all when the generation moved,
exactly as the memo of manifest answers does (``api/memo.py``).  What another instance withdraws is
therefore seen when its NOTIFY arrives, as for the memo (a few milliseconds); this instance's own
withdrawals at once; while the listener is not connected the generation reads differently every
time, and every call asks the database.  Links not found are not remembered: they appear without
moving the generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pgschema import NotifiedGeneration

__all__ = ["LINKS_KEPT", "RememberedLinks"]

#: Links remembered at most per instance (then forgotten all at once): ~200 bytes each.
LINKS_KEPT = 1 << 16


class RememberedLinks:
    """``is_linked`` for ``postgres.PostgresMetadata`` (a mixin listed before it), from memory when it can."""

    if TYPE_CHECKING:
        _generation: NotifiedGeneration

        def _one(self, query: str, params: Any = None) -> tuple[Any, ...] | None: ...

    _seen: set[tuple[str, str]] | None = None
    _seen_at = b""  # the generation the links in _seen were found under

    def is_linked(self, repo: str, digest: str) -> bool:
        stamp = self._generation.read()  # before the query: a withdrawal racing with it is not missed
        seen = self._seen
        if seen is None or stamp != self._seen_at:
            seen = self._seen = set()
            self._seen_at = stamp
        if (repo, digest) in seen:
            return True
        linked = self._one("SELECT 1 FROM links WHERE repo = %s AND digest = %s", (repo, digest)) is not None
        if linked and self._generation.read() == stamp:
            if len(seen) >= LINKS_KEPT:
                seen.clear()
            seen.add((repo, digest))
        return linked
