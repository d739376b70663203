"""Answers of the ``postgres`` driver kept in memory once read, while the generation stands still.

Three reads come before anything else on the request path, on the event loop: which kind a name is
(``is_local``, every request), whether a repository holds a digest (``is_linked``, every blob and
manifest GET) and a manifest's record (``get_manifest``, every manifest GET by digest).  With
PostgreSQL each was a round trip to the database.  Each answer kept here can only be taken back by a
change that moves the generation (``driver.py``): a link or a manifest record goes with a withdrawal
or is recorded again otherwise, a name becomes local by ``mark_local`` (and stops being so by
``release_local``), and all of them move it.  So :class:`Remembered` keeps those answers (a name's
both ways, links and manifests when found) and forgets them all when the generation moved, exactly
as the memo of manifest answers does (``api/memo.py``).  What another instance changes is therefore seen when its
NOTIFY arrives, as for the memo (a few milliseconds); this instance's own changes at once; while the
listener is not connected the generation reads differently every time, and every call asks the
database.  Links and manifests not found are not kept: they appear without moving the generation.

The answers kept are what :meth:`~mirror.metadata.driver.Metadata.known_link` and its siblings give
callers on the event loop, which ask the database from a worker thread only when memory does not
know (``registry/reads.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .driver import ManifestRecord

if TYPE_CHECKING:
    from .pgschema import NotifiedGeneration

__all__ = ["KEPT", "Remembered"]

#: Answers kept at most per instance (then forgotten all at once): ~200 bytes each.
KEPT = 1 << 16

_LINK, _LOCAL, _MANIFEST = "link", "local", "manifest"


class Remembered:
    """``is_linked``, ``is_local`` and ``get_manifest`` for ``postgres.PostgresMetadata`` (a mixin
    listed before it), from memory when they can; thread-safe (the memory is replaced whole, with
    the generation it stands for, in one assignment)."""

    if TYPE_CHECKING:
        _generation: NotifiedGeneration

        def _one(self, query: str, params: Any = None) -> tuple[Any, ...] | None: ...

    _kept: tuple[bytes, dict[tuple[str, str, str], Any]] = (b"", {})  # (generation, answers)

    # -- what memory knows (no I/O) --

    def known_link(self, repo: str, digest: str) -> bool:
        return self._recall((_LINK, repo, digest)) is True

    def known_local(self, name: str) -> bool | None:
        found = self._recall((_LOCAL, name, ""))
        return found if isinstance(found, bool) else None

    def known_manifest(self, digest: str) -> ManifestRecord | None:
        found = self._recall((_MANIFEST, digest, ""))
        return found if isinstance(found, ManifestRecord) else None

    # -- the reads --

    def is_linked(self, repo: str, digest: str) -> bool:
        if self.known_link(repo, digest):
            return True
        stamp = self._generation.read()  # before the query: a withdrawal racing with it is not missed
        linked = self._one("SELECT 1 FROM links WHERE repo = %s AND digest = %s", (repo, digest)) is not None
        if linked:
            self._keep(stamp, (_LINK, repo, digest), True)
        return linked

    def is_local(self, name: str) -> bool:
        known = self.known_local(name)
        if known is not None:
            return known
        stamp = self._generation.read()
        local = self._one("SELECT 1 FROM locals WHERE name = %s", (name,)) is not None
        self._keep(stamp, (_LOCAL, name, ""), local)
        return local

    def get_manifest(self, digest: str) -> ManifestRecord | None:
        known = self.known_manifest(digest)
        if known is not None:
            return known
        stamp = self._generation.read()
        row = self._one("SELECT media_type, size FROM manifests WHERE digest = %s", (digest,))
        if row is None:
            return None
        record = ManifestRecord(*row)
        self._keep(stamp, (_MANIFEST, digest, ""), record)
        return record

    def sync_generation(self) -> None:
        """Learn the generation from the database now, not when its NOTIFY arrives (milliseconds
        later, more on a busy host): a replica of a cluster calls this before a read that a change
        on another replica may have moved (a tag), so that a client sees at once what it pushed or
        deleted through another replica.  Blocking: one round trip."""
        row = self._one("SELECT value FROM counters WHERE name = 'generation'")
        if row is not None:
            self._generation.saw(int(row[0]))

    # -- memory --

    def _recall(self, key: tuple[str, str, str]) -> Any:
        stamp, answers = self._kept
        return answers.get(key) if stamp == self._generation.read() else None

    def _keep(self, stamp: bytes, key: tuple[str, str, str], answer: Any) -> None:
        """Keep *answer*, read under generation *stamp*, unless the generation moved meanwhile."""
        if self._generation.read() != stamp:
            return
        kept_at, answers = self._kept
        if kept_at != stamp or len(answers) >= KEPT:
            answers = {}
            self._kept = (stamp, answers)
        answers[key] = answer
