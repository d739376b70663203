"""The ``postgres`` driver's in-use marks (``marks.py``): the table ``in_use`` (digest, holder -> expires,
by the database's clock), one row per digest a holder serves from the blob store or fills.

A mark and a collector's look before a delete (:meth:`PostgresMarks.unmarked`) exclude each other through
a transaction-level advisory lock per digest (:data:`LOCK_SPACE`, ``hashtext(digest)``): shared by the
marks, which never wait for each other, exclusive for the collector, held across its delete, so a mark
taken meanwhile comes after it (and its holder then finds no object).  A collector that dies mid-delete
lets go of the lock with its connection.  Rows expired for an hour are removed when the collector reads
the marks.  The expired rows of ``leases`` go here too (:meth:`PostgresMarks.prune_leases`, the
collector's), this being the driver's module of rows that expire.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

__all__ = ["LOCK_SPACE", "NOW", "PostgresMarks"]

#: The database's clock (seconds since the epoch), or the *clock* a test gave (``%(now)s``).
NOW = "coalesce(%(now)s::float8, extract(epoch from statement_timestamp())::float8)"
#: The first key of the advisory locks of marks ("mark"); the second is the digest's ``hashtext``.
LOCK_SPACE = 0x6D61726B
#: Seconds an expired mark's row stays before a collector's read removes it.
KEEP_EXPIRED = 3600.0


class PostgresMarks:
    """:class:`~mirror.metadata.marks.InUseMarks` over ``in_use`` (a mixin of the driver, listed before
    ``Metadata``; it reads through the driver's own plumbing, declared here for the type checker only)."""

    if TYPE_CHECKING:
        def _cursor(self, *, transaction: bool = False) -> Any: ...

        def _all(self, query: str, params: Any = None) -> list[tuple[Any, ...]]: ...

        def _now(self) -> float | None: ...

    def mark_in_use(self, holder: str, digests: Collection[str], ttl: float) -> None:
        wanted = sorted(set(digests))
        if not wanted:
            return
        cur: psycopg.Cursor[tuple[Any, ...]]
        with self._cursor(transaction=True) as cur:
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s, hashtext(d)) FROM unnest(%s::text[]) AS d",
                        (LOCK_SPACE, wanted))
            cur.execute(f"INSERT INTO in_use SELECT d, %(holder)s, {NOW} + %(ttl)s FROM unnest(%(digests)s::text[])"
                        " AS d ON CONFLICT (digest, holder) DO UPDATE SET expires = excluded.expires",
                        {"holder": holder, "digests": wanted, "ttl": ttl, "now": self._now()})

    def unmark_in_use(self, holder: str, digests: Collection[str]) -> None:
        if digests:
            self._all("DELETE FROM in_use WHERE holder = %s AND digest = ANY(%s) RETURNING 1", (holder, list(digests)))

    def prune_leases(self, keep: float) -> int:
        # Released leases expire at -Infinity; a grant racing this delete inserts its row anew.
        return len(self._all(f"DELETE FROM leases WHERE expires < {NOW} - %(keep)s RETURNING 1",
                             {"keep": keep, "now": self._now()}))

    def in_use(self) -> set[str]:
        rows = self._all(f"WITH gone AS (DELETE FROM in_use WHERE expires < {NOW} - %(keep)s)"
                         f" SELECT DISTINCT digest FROM in_use WHERE expires > {NOW}",
                         {"keep": KEEP_EXPIRED, "now": self._now()})
        return {digest for (digest,) in rows}

    @contextmanager
    def unmarked(self, digest: str) -> Iterator[bool]:
        cur: psycopg.Cursor[tuple[Any, ...]]
        with self._cursor(transaction=True) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_SPACE, digest))
            row = cur.execute(f"SELECT 1 FROM in_use WHERE digest = %(digest)s AND expires > {NOW} LIMIT 1",
                              {"digest": digest, "now": self._now()}).fetchone()
            yield row is None
