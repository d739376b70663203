"""The fills of a replica of a cluster (``registry/cluster.py``): each fetch goes through a
:class:`~mirror.registry.cluster.ClusterFetch`, and a slow look in the bucket is raced by a look at
the blob's fill lease.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..observe.cluster import ClusterMetrics
from ..spec.reference import Digest
from ..storage.bypass import BypassBlob
from ..storage.driver import BlobReader, BlobStore
from ..storage.fill import Fills
from ..storage.growing import Fetch, GrowingBlob
from .cluster import ClusterFetch
from .reads import in_index_thread
from .replica import HEDGE_AFTER, HINTS, Cluster, lease_name


class ClusterFills(Fills):
    """The fills of a replica: each fetch goes through a :class:`ClusterFetch` (what the pull-through
    policy asks of :class:`~mirror.storage.fill.Fills` is otherwise unchanged).

    A fill started here that follows another replica's fetch is answered as *coalesced*: that fetch
    may be for another repository, so the policy asks the upstream's consent for this one, as for a
    fetch joined on this host (``registry/pullthrough.py``).
    """

    #: A fetch looks at the store once it holds the fill's lease (:meth:`ClusterFetch._lead`), which is
    #: the lock that counts across replicas: a look under this host's lock would only repeat it.
    look_after_lock = False

    def __init__(self, store: BlobStore, cluster: Cluster, figures: ClusterMetrics, **options: Any) -> None:
        super().__init__(store, **options)
        self.cluster = cluster
        self.figures = figures
        #: Digests :meth:`stored` found another's fill lease on -> its holder, for the fill that follows.
        self._holders: dict[Digest, str] = {}

    async def stored(self, digest: Digest) -> BlobReader | None:
        """The stored blob, or None; a look at the store (a HEAD) that takes longer than
        :data:`HEDGE_AFTER` seconds is raced by a look at the digest's fill lease in the index.

        A bucket busy taking a fill answers slowly, and a blob being filled is exactly what the
        clients of other replicas ask for at that moment.  If another replica (or another process of
        this one) holds the fill's lease, the answer is None at once: the fill then follows the
        fetch in progress, and the look under its own lease decides (:meth:`ClusterFetch._lead`),
        so an object stored meanwhile is still found.  A reader the slow look opens after all is
        let go.  The index down: the look is waited for.
        """
        look = asyncio.ensure_future(super().stored(digest))
        try:
            done, _ = await asyncio.wait([look], timeout=HEDGE_AFTER)
            if done:
                return look.result()
            lease = asyncio.ensure_future(in_index_thread(
                self.cluster.metadata.current_lease, lease_name(digest)))
            lease.add_done_callback(_retrieved)
            racing: list[asyncio.Future[Any]] = [look, lease]
            first, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            held_by = None if look in first or lease.exception() is not None else lease.result()
            if held_by is None:
                return await look
        except BaseException:
            look.add_done_callback(_close_reader)
            raise
        look.add_done_callback(_close_reader)
        if len(self._holders) > HINTS:
            self._holders.clear()
        self._holders[digest] = held_by.holder  # the fill that follows asks it first
        return None

    async def open(self, digest: Digest, fetch: Fetch, *, looked: bool = False, down: bool = False,
                   origin: str | None = None) -> BlobReader | GrowingBlob | BypassBlob:
        made: list[ClusterFetch] = []
        holder = self._holders.pop(digest, None)

        def start() -> ClusterFetch:
            made.append(ClusterFetch(self.cluster, digest, fetch, self.figures, holder, store_down=down))
            return made[-1]

        source = await super().open(digest, start, looked=looked, down=down, origin=origin)
        if isinstance(source, GrowingBlob) and not source.coalesced and made and made[0].stored_elsewhere():
            source.coalesced = True
            self.metrics.waiting(1)  # as a reader joining a fetch counts itself (``GrowingBlob``)
        return source


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a background look's outcome as seen (an error of it is not this request's)."""
    if not task.cancelled():
        task.exception()


def _close_reader(task: asyncio.Future[BlobReader | None]) -> None:
    """Let go of the reader a look opened after its answer was no longer wanted."""
    if not task.cancelled() and task.exception() is None and (reader := task.result()) is not None:
        reader.close()
