"""That the replicas of a cluster share one ``cluster.secret_file``: a replica started with another
is refused at start-up, not left in the load balancer's rotation answering ``503`` whenever another
replica fetches what its clients ask for (every request it signs is refused, and it refuses theirs).

The secret itself never leaves the process.  Its check, ``HMAC-SHA256(secret, "mirror cluster secret
check")`` (hex, 64 characters), is the holder of the lease :data:`LEASE` in the index
(:class:`~mirror.metadata.driver.Lease`, ``cluster.lease_ttl``): some replica of the secret keeps it
(:func:`keep_claim`, every third of the TTL, taking it over when it expired), and a replica starting
while it is held under another check is refused (:func:`secret_problem`), and so is a mirror without
``cluster`` settings while it is held at all.  A replica stopping gives the claim up (another one
running takes it again).  Changing the secret on purpose: stop every replica (one killed: wait one
``cluster.lease_ttl``), start them with the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time

from ..config.sections import ClusterConfig
from ..metadata.driver import Lease, Metadata, MetadataUnavailable
from .reads import in_index_thread

log = logging.getLogger("mirror.cluster")

#: The lease whose holder is the check of the cluster's secret.
LEASE = "cluster-secret"


def secret_check(secret: str) -> str:
    """What the index keeps of *secret*: an HMAC of a fixed text under it (it tells nothing of it)."""
    return hmac.new(secret.encode(), b"mirror cluster secret check", hashlib.sha256).hexdigest()


def claim(metadata: Metadata, check: str, ttl: float, held: Lease | None) -> tuple[Lease | None, bool]:
    """Renew *held*, or take the lease when it is free; return the lease now held (None if a sibling
    holds it) and whether the holder is a replica of another secret (blocking: index calls)."""
    if held is not None and (renewed := metadata.renew_lease(held, ttl)) is not None:
        return renewed, False
    current = metadata.current_lease(LEASE)
    if current is None and (taken := metadata.take_lease(LEASE, check, ttl)) is not None:
        return taken, False
    current = current or metadata.current_lease(LEASE)
    return None, current is not None and current.holder != check


def secret_problem(config: ClusterConfig, metadata: Metadata, upstreams: dict[str, str] | None = None) -> str | None:
    """Why this replica may not start with its ``cluster.secret_file``, or None (and the claim
    taken, or a sibling's found); for a mirror without ``cluster``, why it may not start beside the
    replicas of a cluster on the same database (they hold the claim).  Blocking.

    A replica's *upstreams* (registry -> URL) are recorded in the index, and a warning logged when
    the replica started before had others: replicas share each registry's tags and manifests, so one
    fetching a registry from elsewhere serves its manifests to all, whose blobs their upstream may
    not have (a rolling change of upstream warns once, harmlessly)."""
    if not config.enabled or config.secret_file is None:
        if (held := metadata.current_lease(LEASE)) is None:
            return None
        left = held.expires - getattr(metadata, "clock", time.time)()
        return ("the replicas of a cluster run on this database: a mirror beside them needs cluster.advertise (its "
                "own address) and their cluster.secret_file, else it fetches again what they fetch and its reads "
                "are not marked in use for their collectors (if none runs any more, their claim lapses in "
                f"{max(left, 0):.0f}s)")
    _, other = claim(metadata, secret_check(config.secret_file.value), config.lease_ttl, None)
    swap = getattr(metadata, "swap_setting", None)
    if not other and upstreams is not None and swap is not None \
            and (before := swap("upstreams", upstreams)) not in (None, upstreams):
        log.warning("the replica that started before this one on this database fetched %s; this one fetches %s: "
                    "replicas share each registry's tags and manifests, so give them all the same upstreams",
                    _shown(before), _shown(upstreams))
    if not other:
        return None
    return (f"cluster.secret_file {config.secret_file.path}: the replicas running on this database use another "
            "secret; every replica needs the same file (to change it on purpose, stop every replica, wait "
            f"cluster.lease_ttl ({config.lease_ttl:g}s), and start them with the new one)")


def _shown(upstreams: dict[str, str]) -> str:
    return ", ".join(f"{registry} from {url}" for registry, url in sorted(upstreams.items()))


async def keep_claim(config: ClusterConfig, metadata: Metadata) -> None:
    """Keep the claim of this replica's secret while the server runs (until cancelled); a replica of
    another secret holding it is said as an error, once until it goes."""
    assert config.secret_file is not None
    check, held, said = secret_check(config.secret_file.value), None, False
    try:
        while True:
            try:
                held, other = await in_index_thread(claim, metadata, check, config.lease_ttl, held)
            except MetadataUnavailable:  # said where requests need it; claimed again once it answers
                held, other = None, False
            if other and not said:
                log.error("a replica with another cluster.secret_file holds this database's cluster: this "
                          "replica's requests to it and its to this one are refused; is %s the same file on every "
                          "replica?", config.secret_file.path)
            said = other
            await asyncio.sleep(config.lease_ttl / 3)
    finally:  # stopping: the claim goes with it (another replica running takes it again)
        with contextlib.suppress(Exception):
            await asyncio.shield(in_index_thread(_give_up, metadata, check))


def _give_up(metadata: Metadata, check: str) -> None:
    """Release the claim if it is this secret's (whichever replica of it took it: start-up's check
    takes it too)."""
    current = metadata.current_lease(LEASE)
    if current is not None and current.holder == check:
        metadata.release_lease(current)
