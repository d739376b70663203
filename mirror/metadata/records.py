"""Every record of an index, kind by kind, read a page at a time (:class:`RecordListing`, part of
``driver.Metadata``): what ``mirror migrate`` copies and compares (``transfer.py``) in bounded memory
whatever the size of the index.  Each driver's side is in ``scans.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, Protocol

__all__ = ["PAGE", "PinRecord", "RecordKey", "RecordKind", "RecordListing"]

#: Records a listing reads per query, and keys a lookup asks for per query.
PAGE = 1000

#: A record's key: a tuple of strings, by kind (:class:`RecordKind`).
RecordKey = tuple[str, ...]


class PinRecord(NamedTuple):
    """A pin: when it was made (``float``, ``pin``'s *now*), and whether it goes with its image's last
    tag (``pin``'s *tagged*: a preload under a tag)."""

    pinned_at: float
    tagged: bool


class RecordKind(enum.Enum):
    """The kinds of record, named as a summary names them, with the shape of their keys and values:

    ========================== =============================== ====================================================
    kind                       key                             value
    ========================== =============================== ====================================================
    tags                       ``(repo, tag)``                 ``driver.TagRecord``
    manifests                  ``(digest,)``                   ``driver.ManifestRecord``
    links                      ``(repo, digest)``              ``True``
    repositories               ``(repo,)``                     ``True`` (the catalog)
    pushed repositories        ``(name,)``                     created at (``float``, ``mark_local``'s *now*)
    pins                       ``(repo, digest)``              :class:`PinRecord`
    referrers                  ``(repo, subject)``             tuple of descriptors (dicts), in the order added;
                                                               subjects that have none are not listed
    upstream referrers lists   ``(repo, subject, type)``       ``driver.UpstreamReferrers``; *type* is the
                                                               artifact type the upstream filtered by, ``""``
                                                               for the whole list
    Referrers API answers      ``(registry,)``                 ``bool``
    foreign-layer urls         ``(digest,)``                   tuple of urls
    access times               ``(repo, digest)``              last used (``float``)
    ========================== =============================== ====================================================
    """

    TAGS = "tags"
    MANIFESTS = "manifests"
    LINKS = "links"
    REPOSITORIES = "repositories"
    LOCALS = "pushed repositories"
    PINS = "pins"
    REFERRERS = "referrers"
    UPSTREAM_REFERRERS = "upstream referrers lists"
    REFERRERS_APIS = "Referrers API answers"
    FOREIGN_URLS = "foreign-layer urls"
    ACCESS = "access times"


class RecordListing(Protocol):
    """Every record of the index by kind, a page at a time, and records looked up by key."""

    def records(self, kind: RecordKind, *, page: int = PAGE) -> Iterator[tuple[RecordKey, Any]]:
        """Every ``(key, value)`` of *kind*, read lazily, *page* (1 or more) records per query, in the
        order of the driver's keys.  No query outlives its page: records written or withdrawn while
        the iteration runs may be listed or not, and none is listed twice."""
        ...

    def find_records(self, kind: RecordKind, keys: Iterable[RecordKey]) -> dict[RecordKey, Any]:
        """``{key: value}`` of the records of *kind* the index holds under *keys* (those it does not hold
        are left out), asked :data:`PAGE` keys per query."""
        ...

    def copy_of(self) -> str | None:
        """The id (``Metadata.index_id``) of the index ``mirror migrate`` copied into this one, or None."""
        ...

    def mark_copy_of(self, index_id: str) -> None:
        """Record that this index is being made a copy of the index whose id is *index_id*."""
        ...
