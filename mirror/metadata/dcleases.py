"""The ``diskcache`` driver's leases (``metadata/driver.py``, :class:`~mirror.metadata.driver.Leases`):
``lease/<name>`` -> (holder, token, expires) of the latest grant, tokens from the counter ``lease-token``.
A mixin of :class:`~mirror.metadata.diskcache.DiskcacheMetadata`, listed before ``Metadata`` (whose
protocol stubs would otherwise hide it); it reads through the driver's own plumbing, declared here
for the type checker only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .driver import Lease

if TYPE_CHECKING:
    import diskcache

__all__ = ["DiskcacheLeases"]


class DiskcacheLeases:
    """Leases over the driver's ``diskcache.Cache``, timed by its *clock*."""

    if TYPE_CHECKING:
        _cache: diskcache.Cache
        _clock: Callable[[], float]

        def _keys(self, prefix: str) -> list[str]: ...

    def take_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        now = self._clock()
        with self._cache.transact():
            current = self._cache.get(f"lease/{name}")
            if current is not None and current[2] > now:
                return None
            token = int(self._cache.incr("lease-token", 1, default=0))
            self._cache.set(f"lease/{name}", (holder, token, now + ttl))
        return Lease(name, holder, token, now + ttl)

    def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        now = self._clock()
        with self._cache.transact():
            current = self._cache.get(f"lease/{lease.name}")
            if current is None or current[1] != lease.token or current[2] <= now:
                return None
            self._cache.set(f"lease/{lease.name}", (lease.holder, lease.token, now + ttl))
        return Lease(lease.name, lease.holder, lease.token, now + ttl)

    def release_lease(self, lease: Lease) -> bool:
        now = self._clock()
        with self._cache.transact():
            current = self._cache.get(f"lease/{lease.name}")
            if current is None or current[1] != lease.token:
                return False
            self._cache.delete(f"lease/{lease.name}")
        return bool(current[2] > now)

    def current_lease(self, name: str) -> Lease | None:
        current = self._cache.get(f"lease/{name}")
        if current is None or current[2] <= self._clock():
            return None
        return Lease(name, *current)

    def prune_leases(self, keep: float) -> int:
        pruned, cutoff = 0, self._clock() - keep
        for key in self._keys("lease/"):
            with self._cache.transact():
                current = self._cache.get(key)
                if current is not None and current[2] < cutoff:
                    self._cache.delete(key)
                    pruned += 1
        return pruned
