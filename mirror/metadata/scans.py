"""Each driver's side of :class:`~mirror.metadata.records.RecordListing`: every kind of record a page
at a time, and many keys looked up at once.

A page is one query over a range of the driver's own keys, starting after the last key of the page
before (an index range scan: no query stays open between pages, no page costs more than its
records).  The diskcache driver's keys are strings (``diskcache.py``'s layout) and sort as such; the
postgres driver's are the tables' primary keys (``pgschema.py``), ``COLLATE "C"``.

The drivers take these classes as mixins, listed before ``Metadata`` (whose protocol stubs would
otherwise hide them); each reads through its driver's own plumbing, declared here for the type
checker only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .driver import ManifestRecord, TagRecord, UpstreamReferrers
from .records import PAGE, PinRecord, RecordKey, RecordKind

__all__ = ["DiskcacheRecords", "PostgresRecords"]

Row = tuple[Any, ...]
#: Sorts after every character a key holds: the end of a range of keys sharing a prefix.
_LAST = "\U0010ffff"


def _split(rest: str, separator: str = "@") -> RecordKey:
    """``<repo>@<digest>`` (or ``<repo>:<tag>``) -> (repo, digest)."""
    repo, _, name = rest.rpartition(separator)
    return repo, name


def _upstream(rest: str) -> RecordKey:
    """``<repo>@<subject>[?<artifact type>]`` -> (repo, subject, artifact type or '')."""
    reference, _, artifact_type = rest.partition("?")
    return (*_split(reference), artifact_type)


def _descriptors(kept: Iterable[Any]) -> tuple[dict[str, Any], ...]:
    return tuple(dict(descriptor) for descriptor in kept)


@dataclass(frozen=True)
class _Filed:
    """How the diskcache driver files one kind: keys ``<prefix><rest>``; *key* reads a record's key
    from the rest, *rest* writes it; *value* makes the record's value of what is kept (None: not a
    record)."""

    prefix: str
    key: Callable[[str], RecordKey]
    rest: Callable[[RecordKey], str]
    value: Callable[[RecordKey, Any], Any]


_ONE = (lambda rest: (rest,)), (lambda key: key[0])
_AT = _split, "@".join
_FILED = {
    RecordKind.TAGS: _Filed("tag/", lambda rest: _split(rest, ":"), ":".join, lambda key, kept: TagRecord(*kept[:3])),
    RecordKind.MANIFESTS: _Filed("manifest/", *_ONE, lambda key, kept: ManifestRecord(*kept[:2])),
    RecordKind.LINKS: _Filed("link/", *_AT, lambda key, kept: True),
    RecordKind.REPOSITORIES: _Filed("repo/", *_ONE, lambda key, kept: True),
    RecordKind.LOCALS: _Filed("local/", *_ONE, lambda key, kept: float(kept)),
    RecordKind.PINS: _Filed("pin/", *_AT, lambda key, kept: float(kept)),
    RecordKind.REFERRERS: _Filed("referrers/", *_AT, lambda key, kept: _descriptors(kept) or None),
    RecordKind.UPSTREAM_REFERRERS: _Filed(
        "upstream-referrers/", _upstream, lambda key: f"{key[0]}@{key[1]}" + (f"?{key[2]}" if key[2] else ""),
        lambda key, kept: UpstreamReferrers(key[0], key[1], key[2] or None, float(kept[0]), _descriptors(kept[1]))),
    RecordKind.REFERRERS_APIS: _Filed("referrers-api/", *_ONE, lambda key, kept: bool(kept)),
    RecordKind.FOREIGN_URLS: _Filed("foreign/", *_ONE, lambda key, kept: tuple(kept)),
    RecordKind.ACCESS: _Filed("access/", *_AT, lambda key, kept: float(kept)),
}


class DiskcacheRecords:
    """The listings over ``metadata/diskcache.py``'s keys, a range of one prefix per kind."""

    if TYPE_CHECKING:
        import diskcache

        _cache: diskcache.Cache

    def records(self, kind: RecordKind, *, page: int = PAGE) -> Iterator[tuple[RecordKey, Any]]:
        filed = _FILED[kind]
        after, end = filed.prefix, filed.prefix + _LAST
        while True:
            names: list[str] = [name for (name,) in self._cache._sql(  # str keys are kept raw, indexed
                "SELECT key FROM Cache WHERE raw = 1 AND key > ? AND key < ? ORDER BY key LIMIT ?",
                (after, end, page)).fetchall()]
            for name in names:
                key = filed.key(name[len(filed.prefix):])
                value = self._value(kind, key, self._cache.get(name))  # None: withdrawn meanwhile
                if value is not None:
                    yield key, value
            if len(names) < page:
                return
            after = names[-1]

    def find_records(self, kind: RecordKind, keys: Iterable[RecordKey]) -> dict[RecordKey, Any]:
        filed = _FILED[kind]
        found = {}
        for key in keys:
            value = self._value(kind, key, self._cache.get(filed.prefix + filed.rest(key)))
            if value is not None:
                found[key] = value
        return found

    def copy_of(self) -> str | None:
        kept = self._cache.get("copy-of")
        return None if kept is None else str(kept)

    def mark_copy_of(self, index_id: str) -> None:
        self._cache.set("copy-of", index_id)

    def _value(self, kind: RecordKind, key: RecordKey, kept: Any) -> Any:
        """The record of *key* of what its key keeps (None: no record); a pin's *tagged* is a key of its own."""
        filed = _FILED[kind]
        value = None if kept is None else filed.value(key, kept)
        if value is not None and kind is RecordKind.PINS:
            return PinRecord(value, f"pin-tagged/{filed.rest(key)}" in self._cache)
        return value


@dataclass(frozen=True)
class _Table:
    """Where the postgres driver keeps one kind: *table*, its primary key's *columns*, the *values*
    selected (aggregated over the rows of one key when *grouped*) and the record's value made of
    them.  *key* and *columns_of* turn the primary key's values into the record's key and back."""

    table: str
    columns: tuple[str, ...]
    values: str
    value: Callable[[RecordKey, Row], Any]
    grouped: bool = False
    key: Callable[[Row], RecordKey] = tuple
    columns_of: Callable[[RecordKey], Row] = tuple


_KEYS = ("repo", "digest")
_TABLES = {
    RecordKind.TAGS: _Table("tags", ("repo", "tag"), "digest, media_type, fetched_at",
                            lambda key, row: TagRecord(row[0], row[1], float(row[2]))),
    RecordKind.MANIFESTS: _Table("manifests", ("digest",), "media_type, size",
                                 lambda key, row: ManifestRecord(row[0], int(row[1]))),
    RecordKind.LINKS: _Table("links", _KEYS, "true", lambda key, row: True),
    RecordKind.REPOSITORIES: _Table("repositories", ("repo",), "true", lambda key, row: True),
    RecordKind.LOCALS: _Table("locals", ("name",), "created_at", lambda key, row: float(row[0])),
    RecordKind.PINS: _Table("pins", _KEYS, "pinned_at, tagged", lambda key, row: PinRecord(float(row[0]), row[1])),
    RecordKind.REFERRERS: _Table("referrers", ("repo", "subject"), "jsonb_agg(descriptor ORDER BY added)",
                                 lambda key, row: _descriptors(row[0]), grouped=True),
    RecordKind.UPSTREAM_REFERRERS: _Table(  # filter: '' for the whole list, '?<artifact type>' for a filtered one
        "upstream_referrers", ("repo", "subject", "filter"), "fetched_at, descriptors",
        lambda key, row: UpstreamReferrers(key[0], key[1], key[2] or None, float(row[0]), _descriptors(row[1])),
        key=lambda row: (row[0], row[1], row[2][1:]),
        columns_of=lambda key: (key[0], key[1], f"?{key[2]}" if key[2] else "")),
    RecordKind.REFERRERS_APIS: _Table("referrers_api", ("registry",), "present", lambda key, row: bool(row[0])),
    RecordKind.FOREIGN_URLS: _Table("foreign_urls", ("digest",), "urls", lambda key, row: tuple(row[0])),
    RecordKind.ACCESS: _Table("access", _KEYS, "used_at", lambda key, row: float(row[0])),
}


class PostgresRecords:
    """The listings over ``metadata/pgschema.py``'s tables, in the order of their primary keys."""

    if TYPE_CHECKING:
        def _all(self, query: str, params: Any = None) -> list[Row]: ...

        def swap_setting(self, name: str, value: Any) -> Any: ...

    def copy_of(self) -> str | None:
        rows = self._all("SELECT value FROM settings WHERE name = 'copy_of'")
        return str(rows[0][0]) if rows else None

    def mark_copy_of(self, index_id: str) -> None:
        self.swap_setting("copy_of", index_id)

    def migrating(self) -> str | None:
        """What ``mirror migrate`` recorded when it began copying into this index (its source, and when),
        until a run reaches its end (``metadata/unfinished.py``); None when no copy is under way."""
        rows = self._all("SELECT value FROM settings WHERE name = 'migrating'")
        return str(rows[0][0]) if rows and rows[0][0] else None

    def mark_migrating(self, begun: str | None) -> None:
        """Record *begun* (one line: the source, and when the run began) as :meth:`migrating`; None withdraws it."""
        self.swap_setting("migrating", begun)

    def records(self, kind: RecordKind, *, page: int = PAGE) -> Iterator[tuple[RecordKey, Any]]:
        table = _TABLES[kind]
        columns, width = ", ".join(table.columns), len(table.columns)
        grouped = f" GROUP BY {columns}" if table.grouped else ""
        after: Row | None = None
        while True:
            where = "" if after is None else f" WHERE ({columns}) > ({', '.join(['%s'] * width)})"
            rows = self._all(f"SELECT {columns}, {table.values} FROM {table.table}{where}{grouped}"
                             f" ORDER BY {columns} LIMIT %s", (*(after or ()), page))
            for row in rows:
                key = table.key(row[:width])
                yield key, table.value(key, row[width:])
            if len(rows) < page:
                return
            after = rows[-1][:width]

    def find_records(self, kind: RecordKind, keys: Iterable[RecordKey]) -> dict[RecordKey, Any]:
        table = _TABLES[kind]
        columns, width = ", ".join(table.columns), len(table.columns)
        query = (f"SELECT {columns}, {table.values} FROM {table.table}"
                 f" JOIN unnest({', '.join(['%s::text[]'] * width)}) AS wanted({columns}) USING ({columns})"
                 + (f" GROUP BY {columns}" if table.grouped else ""))
        found = {}
        wanted = list(dict.fromkeys(keys))  # once each: a key asked twice would be aggregated twice
        for start in range(0, len(wanted), PAGE):
            batch = [table.columns_of(key) for key in wanted[start:start + PAGE]]
            for row in self._all(query, [list(column) for column in zip(*batch, strict=True)]):
                key = table.key(row[:width])
                found[key] = table.value(key, row[width:])
        return found
