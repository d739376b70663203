"""Each driver's side of :class:`~mirror.metadata.driver.InventoryIndex`: every record of the kinds
the index otherwise looks up only by key (pushed repositories, pins with their times, referrers,
upstream referrers lists, the Referrers API answers, foreign-layer urls).

The drivers take these as mixins (listed before ``Metadata``, whose protocol stubs would
otherwise hide them); each reads through its driver's own plumbing, declared here for the type
checker only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .driver import UpstreamReferrers

__all__ = ["DiskcacheInventory", "PostgresInventory"]


class DiskcacheInventory:
    """The listings over ``metadata/diskcache.py``'s keys (range scans of one prefix each)."""

    if TYPE_CHECKING:
        def _items(self, prefix: str) -> dict[str, Any]: ...

    def local_names(self) -> dict[str, float]:
        return {name: float(created) for name, created in self._items("local/").items()}

    def pin_times(self) -> dict[tuple[str, str], float]:
        return {_split(key): float(when) for key, when in self._items("pin/").items()}

    def all_referrers(self) -> list[tuple[str, str, list[dict[str, object]]]]:
        return [(*_split(key), [dict(d) for d in known]) for key, known in self._items("referrers/").items() if known]

    def all_upstream_referrers(self) -> list[UpstreamReferrers]:
        out = []
        for key, (fetched_at, descriptors) in self._items("upstream-referrers/").items():
            reference, filtered, artifact_type = key.partition("?")
            repo, subject = _split(reference)
            out.append(UpstreamReferrers(repo, subject, artifact_type if filtered else None, float(fetched_at),
                                         tuple(dict(d) for d in descriptors)))
        return out

    def referrers_apis(self) -> dict[str, bool]:
        return {registry: bool(present) for registry, present in self._items("referrers-api/").items()}

    def all_foreign_urls(self) -> dict[str, tuple[str, ...]]:
        return {digest: tuple(urls) for digest, urls in self._items("foreign/").items()}


class PostgresInventory:
    """The listings over ``metadata/pgschema.py``'s tables."""

    if TYPE_CHECKING:
        def _all(self, query: str, params: Any = None) -> list[tuple[Any, ...]]: ...

    def local_names(self) -> dict[str, float]:
        return {name: float(created) for name, created in self._all("SELECT name, created_at FROM locals")}

    def pin_times(self) -> dict[tuple[str, str], float]:
        rows = self._all("SELECT repo, digest, pinned_at FROM pins")
        return {(repo, digest): float(when) for repo, digest, when in rows}

    def all_referrers(self) -> list[tuple[str, str, list[dict[str, object]]]]:
        out: dict[tuple[str, str], list[dict[str, object]]] = {}
        for repo, subject, descriptor in self._all("SELECT repo, subject, descriptor FROM referrers ORDER BY added"):
            out.setdefault((repo, subject), []).append(dict(descriptor))
        return [(repo, subject, descriptors) for (repo, subject), descriptors in out.items()]

    def all_upstream_referrers(self) -> list[UpstreamReferrers]:
        rows = self._all("SELECT repo, subject, filter, fetched_at, descriptors FROM upstream_referrers")
        return [UpstreamReferrers(repo, subject, kept[1:] if kept else None, float(fetched_at),
                                  tuple(dict(d) for d in descriptors))
                for repo, subject, kept, fetched_at, descriptors in rows]

    def referrers_apis(self) -> dict[str, bool]:
        rows = self._all("SELECT registry, present FROM referrers_api")
        return {registry: bool(present) for registry, present in rows}

    def all_foreign_urls(self) -> dict[str, tuple[str, ...]]:
        return {digest: tuple(urls) for digest, urls in self._all("SELECT digest, urls FROM foreign_urls")}


def _split(key: str) -> tuple[str, str]:
    """``<repo>@<digest>`` -> (repo, digest)."""
    repo, _, digest = key.rpartition("@")
    return repo, digest
