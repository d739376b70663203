"""A pushed name given back (:meth:`~mirror.metadata.driver.RepositoryIndex.release_local`), in both drivers.

A push makes its name local when it starts (``registry/local.py``), so that an upload's blobs and the
manifest that follows land in a repository that never falls through to the upstream.  When its last
upload is cancelled or expires before any content landed, the name holds nothing: it is given back,
so that abandoned pushes leave no empty repository in the catalog and claim no name for good.  The
check and the release are one transaction (diskcache) or one statement after a lock of the name's
catalog row (PostgreSQL, ``_register``): a link, a tag, a referrer or an upload record, of another push of
the name, committed before it keeps the name; one committed after it lands in a name no longer local,
which the pusher marks again (``LocalRegistry``).  A cached repository stays in the catalog when the
collector empties it (as in distribution): its entry is what refuses a push to the name of a cache while
the upstream cannot be asked (``LocalRegistry._make_local``); ``mirror migrate --delete`` releases it.
These mixins are listed before ``Metadata`` in their drivers; they read through the driver's own
plumbing, declared here for the type checker only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from .driver import local_repo

if TYPE_CHECKING:
    import diskcache

    from .diskcache import MappedGeneration

__all__ = ["DiskcacheReleases", "PostgresReleases"]


class DiskcacheReleases:
    """``local/<name>`` marks, ``link/<repo>@``, ``tag/<repo>:``, ``referrers/<repo>@``, ``upload/<uuid>``,
    and the catalog (``repo/<repo>``, ``catalog``)."""

    if TYPE_CHECKING:
        _cache: diskcache.Cache
        _generation: MappedGeneration

        def _keys(self, prefix: str) -> list[str]: ...

    def release_local(self, name: str) -> bool:
        repo = local_repo(name)
        with self._cache.transact():
            if f"local/{name}" not in self._cache or any(
                    self._keys(prefix) for prefix in (f"link/{repo}@", f"tag/{repo}:", f"referrers/{repo}@")):
                return False
            if any((self._cache.get(key) or (None,))[0] == name for key in self._keys("upload/")):
                return False
            self._cache.delete(f"local/{name}")
            self._cache.delete(f"repo/{repo}")
            self._cache.set("catalog", tuple(r for r in self._cache.get("catalog", ()) if r != repo))
        self._generation.bump()  # its requests go to the upstream again
        return True

    def release_repository(self, repo: str) -> bool:
        if repo.startswith("local/"):
            return self.release_local(repo.removeprefix("local/"))
        with self._cache.transact():
            if f"repo/{repo}" not in self._cache or any(
                    self._keys(prefix) for prefix in (f"link/{repo}@", f"tag/{repo}:", f"referrers/{repo}@")):
                return False
            self._cache.delete(f"repo/{repo}")
            self._cache.set("catalog", tuple(r for r in self._cache.get("catalog", ()) if r != repo))
        self._generation.bump()
        return True


class PostgresReleases:
    """The tables ``locals``, ``links``, ``tags``, ``referrers``, ``uploads`` and ``repositories``;
    and the blob store this start recorded, given back when the start is refused (:meth:`forget_store`)."""

    if TYPE_CHECKING:
        recorded_store: Mapping[str, str] | None

        def _withdrawing(self) -> AbstractContextManager[tuple[Any, Callable[[], None]]]: ...
        def _cursor(self, *, transaction: bool = False) -> AbstractContextManager[Any]: ...

    def forget_store(self) -> bool:
        """Remove the record of the blob store this instance's start made (``pgschema.migrate``) while
        the index holds nothing: a first start refused (a bucket holding another index's objects) must
        not bind a new database to the store it wrongly named.  Whether it went."""
        from .pgschema import forget_store  # psycopg: imported only by the driver that uses it

        if self.recorded_store is None:
            return False
        with self._cursor(transaction=True) as cur:
            return forget_store(cur, self.recorded_store)

    def _register(self, cur: Any, repo: str) -> None:
        """Put *repo* in the catalog, in the transaction that gives it content (a link, a tag), and hold
        its row there (``FOR KEY SHARE``) until that commits: a release waits for it, then sees the
        content; one that deleted the row first makes this insert it again (PostgreSQL's row locks,
        "Explicit Locking", 13.3.2: ``FOR KEY SHARE`` blocks a ``DELETE``)."""
        while not cur.execute("SELECT 1 FROM repositories WHERE repo = %s FOR KEY SHARE", (repo,)).fetchone():
            if cur.execute("INSERT INTO repositories VALUES (%s) ON CONFLICT DO NOTHING RETURNING 1",
                           (repo,)).fetchone():
                return  # (its own row, uncommitted: no other transaction sees it to delete it)

    @staticmethod
    def _hold_row(cur: Any, repo: str) -> None:
        """Lock *repo*'s catalog row before a release checks that it holds nothing: a transaction giving
        it content holds the row (:meth:`_register`) until it commits, and the check that follows, a
        new statement, sees its snapshot from after that (READ COMMITTED; a ``DELETE`` waiting for the
        row itself would check its subqueries against its first snapshot)."""
        cur.execute("SELECT 1 FROM repositories WHERE repo = %s FOR UPDATE", (repo,))

    def release_local(self, name: str) -> bool:
        repo = local_repo(name)
        with self._withdrawing() as (cur, bump):
            self._hold_row(cur, repo)
            released = cur.execute(
                "DELETE FROM locals WHERE name = %(name)s"
                " AND NOT EXISTS (SELECT 1 FROM links WHERE repo = %(repo)s)"
                " AND NOT EXISTS (SELECT 1 FROM tags WHERE repo = %(repo)s)"
                " AND NOT EXISTS (SELECT 1 FROM referrers WHERE repo = %(repo)s)"
                " AND NOT EXISTS (SELECT 1 FROM uploads WHERE name = %(name)s) RETURNING 1",
                {"name": name, "repo": repo}).fetchone() is not None
            if released:
                cur.execute("DELETE FROM repositories WHERE repo = %s", (repo,))
                bump()  # its requests go to the upstream again
        return released

    def release_repository(self, repo: str) -> bool:
        if repo.startswith("local/"):
            return self.release_local(repo.removeprefix("local/"))
        with self._withdrawing() as (cur, bump):
            self._hold_row(cur, repo)
            released = cur.execute(
                "DELETE FROM repositories WHERE repo = %(repo)s"
                " AND NOT EXISTS (SELECT 1 FROM links WHERE repo = %(repo)s)"
                " AND NOT EXISTS (SELECT 1 FROM tags WHERE repo = %(repo)s)"
                " AND NOT EXISTS (SELECT 1 FROM referrers WHERE repo = %(repo)s) RETURNING 1",
                {"repo": repo}).fetchone() is not None
            if released:
                bump()
        return released
