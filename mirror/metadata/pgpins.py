"""The ``postgres`` driver's pins (``PinIndex``): the table ``pins`` (repo, digest -> pinned_at, tagged).

``tagged`` is true for a pin that goes with its image's last tag (a preload under a tag): it stays true
only while every pin of that image was of that kind, so a pin of a user's (the web UI) or of a preload
by digest is never taken back by :meth:`PostgresPins.unpin_tagged`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["PostgresPins"]


class PostgresPins:
    """:class:`~mirror.metadata.driver.PinIndex` over ``pins`` (a mixin of the driver, listed before
    ``Metadata``; it reads through the driver's own plumbing, declared here for the type checker only)."""

    if TYPE_CHECKING:
        def _one(self, query: str, params: Any = None) -> tuple[Any, ...] | None: ...

        def _all(self, query: str, params: Any = None) -> list[tuple[Any, ...]]: ...

    def pin(self, repo: str, digest: str, now: float | None = None, *, tagged: bool = False) -> None:
        self._one("INSERT INTO pins (repo, digest, pinned_at, tagged)"
                  " VALUES (%s, %s, coalesce(%s::float8, extract(epoch from now())::float8), %s)"
                  " ON CONFLICT (repo, digest) DO UPDATE SET tagged = pins.tagged AND EXCLUDED.tagged"
                  " RETURNING 1", (repo, digest, now, tagged))

    def unpin(self, repo: str, digest: str) -> bool:
        return self._one("DELETE FROM pins WHERE repo = %s AND digest = %s RETURNING 1", (repo, digest)) is not None

    def unpin_tagged(self, repo: str, digest: str) -> bool:
        return self._one("DELETE FROM pins WHERE repo = %s AND digest = %s AND tagged RETURNING 1",
                         (repo, digest)) is not None

    def is_pinned(self, repo: str, digest: str) -> bool:
        return self._one("SELECT 1 FROM pins WHERE repo = %s AND digest = %s", (repo, digest)) is not None

    def pins(self, *, tagged: bool = False) -> list[tuple[str, str]]:
        query = "SELECT repo, digest FROM pins" + (" WHERE tagged" if tagged else "")
        return [(repo, digest) for repo, digest in self._all(query)]
