"""The pull-through policy: what to answer from the store, what to ask the upstream, and when.

* A digest is immutable: served from the store without asking the upstream.
* A tag is fresh for ``cache.tag_ttl``; then it is revalidated with a HEAD (free under
  Docker Hub's pull limit) and its manifest fetched again only if the digest changed.
* A missing blob is fetched once, however many requests want it (``storage/fill.py``), and every
  reader streams it while it arrives.
* When the upstream is down, answers 5xx or 429, the cached copy is served (``STALE``).  A revalidation
  of something cached waits for the upstream (which may accept connections and never answer) at most
  one attempt's time, ``upstream.connect_timeout`` + ``read_timeout``, and :data:`REVALIDATE_WAIT`
  seconds; one that ran out of time makes the cached copies of that upstream answer without asking
  for :data:`QUIET_TIMES` that long.
* A tag the upstream answers ``404`` for is forgotten here too: it leaves the tag list, and is no longer served stale.
* Non-distributable (foreign) layers are fetched from their manifest's ``urls`` only with ``upstream.foreign_layers:
  fetch``; by default they are the client's business (containerd).
* When the store cannot take what was fetched (full, over quota, read-only) or does not answer (an object
  store down), the upstream's bytes are served all the same, verified but not stored (``BYPASS``).

A repository may serve a stored object only if it is *linked* to it: the object was fetched for that repository,
or is referenced by a manifest that was.  This is the only layer that turns store and upstream errors into API errors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from ..maintenance.upkeep import AccessTracker
from ..metadata.driver import Metadata, TagRecord
from ..spec.errors import APIError
from ..spec.manifest import INDEX_TYPES, MANIFEST_MEDIA_TYPES, child_for_old_client
from ..spec.reference import Digest
from ..storage.bypass import BypassBlob
from ..storage.driver import BlobStore, StoreUnavailable
from ..storage.fill import Fills
from ..storage.growing import GrowingBlob, known_size
from ..storage.refusals import refusal
from ..upstream.answers import BlobDownload, Manifest
from ..upstream.client import Upstream
from ..upstream.errors import (
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from .failures import RATE_LIMITED_QUIET, UPSTREAM_RETRY_AFTER, api_error
from .flight import SharedTasks, SingleFlight
from .links import BackgroundLinks
from .manifests import ManifestBodies, PeerFlights, referred_digest
from .reads import IndexReads, in_index_thread
from .records import refresh_tag, save_pulled
from .referrers import UpstreamReferrers
from .repository import BlobHead, BlobResult, ManifestResult, Outcome, ReferrersResult, TagsPage, followed, paginate
from .takeover import UpstreamBlob
from .unrecorded import Unrecorded

T = TypeVar("T")
log = logging.getLogger("mirror.registry.pullthrough")
#: Most seconds a revalidation of a cached tag or tag list waits for the upstream (its retries
#: included) before the cached copy answers: the client waits too, and a hung upstream would hold it
#: for ``upstream.read_timeout`` times its attempts (3 minutes by default).
REVALIDATE_WAIT = 10.0
#: After a revalidation ran out of time, that upstream's cached copies answer (``STALE``) without
#: asking it for this many times the wait (30 s by default): each request would wait again.
QUIET_TIMES = 3


class PullThrough:
    def __init__(self, store: BlobStore, metadata: Metadata, fills: Fills, upstream: Upstream,
                 tag_ttl: float, registry: str) -> None:
        self.store = store
        self.metadata = metadata
        self.reads = IndexReads(metadata)
        self.fills = fills
        self.upstream = upstream
        self.tag_ttl = tag_ttl
        self.registry = registry
        #: With several upstreams (set by the app), the upstream fills say they wait for (Fills.open).
        self.origin: str | None = None
        self._flights: SingleFlight[tuple[str, str], ManifestResult] = SingleFlight()
        self._listings: SharedTasks[str, list[str]] = SharedTasks()  # one upstream listing for concurrent requests
        #: Where served manifests are recorded as used (for LRU eviction); set by the app.
        self.access: AccessTracker | None = None
        self._stale_logged: set[str] = set()
        self._unrecorded = Unrecorded()  # repositories pulled from while the store took no writes
        self._bodies = ManifestBodies(store)
        #: On replicas of a cluster: one upstream request per manifest across them (set by the app).
        self.peers: PeerFlights | None = None
        self._referrers = UpstreamReferrers(metadata, upstream, registry)
        self._links = BackgroundLinks(metadata)
        self._quiet_until = 0.0  # time.monotonic() until which cached copies answer without asking
        timeouts = upstream.config.connect_timeout + upstream.config.read_timeout
        self.revalidate_wait = min(REVALIDATE_WAIT, timeouts)

    def _repo(self, name: str) -> str:
        return f"{self.registry}/{name}"

    def repo_key(self, name: str) -> str:
        """The index key of the cache of the upstream's repository *name*."""
        return self._repo(self.upstream.canonical_name(name))

    # -- manifests --

    async def manifest(self, name: str, reference: str | Digest, accept: set[str]) -> ManifestResult:
        result = await self._manifest(self.upstream.canonical_name(name), reference, accept)
        if self.access is not None:
            self.access.touch(self.repo_key(name), result.digest)
        return result

    def toucher(self, name: str, digest: str) -> Callable[[], None] | None:
        """What :meth:`manifest` records about a use of *digest*, to repeat for answers kept elsewhere."""
        return None if self.access is None else functools.partial(self.access.touch, self.repo_key(name), digest)

    async def _manifest(self, name: str, reference: str | Digest, accept: set[str]) -> ManifestResult:
        if isinstance(reference, Digest):
            return await self._manifest_by_digest(name, reference)
        result = followed(await self._flights.run(("tag", f"{name}:{reference}"),
                                                     lambda: self._manifest_by_tag(name, reference)))
        if result.media_type in INDEX_TYPES and accept and not accept & (INDEX_TYPES | {"*/*"}) \
                and accept & set(MANIFEST_MEDIA_TYPES):
            # An old client that cannot read an index gets the linux/amd64 image, as registries do.
            child = child_for_old_client(result.body, accept)
            if isinstance(child, str):
                raise APIError("MANIFEST_UNKNOWN", detail=child)
            return await self._manifest_by_digest(name, referred_digest(child.digest))
        return result

    async def _manifest_by_tag(self, name: str, tag: str, *, peered: bool = False) -> ManifestResult:
        repo = self._repo(name)
        record = await self.reads.ask(self.metadata.get_tag, repo, tag)
        cached = await self._bodies.read(record.digest) if record else None
        if record is not None and cached is not None:
            if time.time() - record.fetched_at < self.tag_ttl:
                return ManifestResult(cached, record.media_type, record.digest, Outcome.HIT,
                                      record.fetched_at + self.tag_ttl)
            if await self.reads.ask(self.metadata.is_pinned, repo, record.digest):
                # Preloaded: a pinned tag is served as loaded, never replaced by the upstream's.
                return ManifestResult(cached, record.media_type, record.digest, Outcome.HIT,
                                      time.time() + self.tag_ttl)
        if self.peers is not None and not peered:  # one replica asks; the others then find its answer here
            return await self.peers.run(f"tag:{repo}:{tag}", lambda: self._manifest_by_tag(name, tag, peered=True))
        if record is not None and cached is not None:
            checked = time.time()
            try:
                head = await self._revalidating(self.upstream.head_manifest, name, tag)
            except (UpstreamUnavailable, UpstreamRateLimited, UpstreamDenied, UpstreamInvalid) as exc:
                return self._stale(f"{repo}:{tag}", exc, cached, record)
            except UpstreamNotFound as exc:
                await in_index_thread(self.metadata.untag, repo, tag)  # deleted there: not listed, not served stale
                raise api_error(exc, "MANIFEST_UNKNOWN") from exc
            self._stale_logged.discard(f"{repo}:{tag}")
            if head.digest == record.digest:
                try:  # the collector may have evicted it meanwhile
                    refreshed = await refresh_tag(self.store, self.metadata, repo, tag, record.digest,
                                                  record.media_type)
                except Exception as exc:  # (a store that does not answer: the copy in memory is the upstream's)
                    if refusal(exc) is None and not isinstance(exc, StoreUnavailable):
                        raise
                    refreshed = True  # still stored, still the upstream's: only its check time is not saved
                if refreshed:
                    return ManifestResult(cached, record.media_type, record.digest, Outcome.HIT,
                                          checked + self.tag_ttl)
        checked, ask = time.time(), self.upstream.get_manifest  # bounded as a revalidation while a copy can answer
        try:
            manifest = await (self._revalidating(ask, name, tag) if record and cached is not None else ask(name, tag))
        except UpstreamError as exc:
            if record is not None and cached is not None and not isinstance(exc, UpstreamNotFound):
                # The tag moved but its new manifest cannot be fetched (e.g. Hub's pull limit).
                return self._stale(f"{repo}:{tag}", exc, cached, record)
            raise self._bodies.unread(record) or api_error(exc, "MANIFEST_UNKNOWN") from exc
        saved = await self._save_manifest(repo, manifest, tag)
        return ManifestResult(manifest.body, manifest.media_type, str(manifest.digest),
                              Outcome.MISS if saved else Outcome.BYPASS, checked + self.tag_ttl if saved else None)

    async def _manifest_by_digest(self, name: str, digest: Digest) -> ManifestResult:
        repo = self._repo(name)
        key = str(digest)
        record = await self.reads.get_manifest(key)
        if record is not None and await self.reads.is_linked(repo, key):
            body = await self._bodies.read(key)
            if body is not None:
                return ManifestResult(body, record.media_type, key, Outcome.HIT)

        async def fetch() -> ManifestResult:
            if self.peers is not None and await self.reads.is_linked(repo, key):  # another replica's answer
                found = await self.reads.get_manifest(key)
                body = await self._bodies.read(key) if found is not None else None
                if found is not None and body is not None:
                    return ManifestResult(body, found.media_type, key, Outcome.HIT)
            try:
                manifest = await self.upstream.get_manifest(name, digest)
            except UpstreamError as exc:
                raise self._bodies.unread(record) or api_error(exc, "MANIFEST_UNKNOWN") from exc
            saved = await self._save_manifest(repo, manifest, None)
            return ManifestResult(manifest.body, manifest.media_type, key, Outcome.MISS if saved else Outcome.BYPASS)

        peers = self.peers
        return followed(await self._flights.run(("digest", f"{name}@{key}"), fetch if peers is None
                                                 else lambda: peers.run(f"digest:{repo}@{key}", fetch)))

    async def _save_manifest(self, repo: str, manifest: Manifest, tag: str | None) -> bool:
        """Store a fetched manifest and record it (``registry/records.py``); False when the store refused
        it (it is served all the same: the upstream layer verified it against its digest)."""
        saved = not self._bodies.failing() and await save_pulled(self.store, self.metadata, repo, manifest, tag)
        if not saved:
            self._unrecorded.add(repo)
        return saved

    # -- blobs --

    async def blob_head(self, name: str, digest: Digest, *, pushable: bool = False) -> BlobHead:
        """Whether the repository has the blob, and its size: from the store, else a HEAD upstream
        (nothing is fetched).

        *pushable* names a repository this registry takes pushes for.  If nothing was ever pulled
        from it, a HEAD there is a pusher checking what it must upload (dockerd asks before its
        first upload makes the repository local): it is answered here, since the upstream's answer
        would make it skip uploads this registry does not have, and leak private names.
        """
        name = self.upstream.canonical_name(name)
        key = str(digest)
        if await self.reads.is_linked(self._repo(name), key):
            try:
                size = await self.fills.look(known_size, self.store, digest)
            except StoreUnavailable:  # (an object store down) the upstream answers below
                size = None
            if size is not None:
                return BlobHead(size, Outcome.HIT)
        if (pushable and self._repo(name) not in self._unrecorded
                and not await self.reads.ask(self.metadata.has_repository, self._repo(name))):
            raise APIError("BLOB_UNKNOWN", detail={"digest": key})
        urls = await self._foreign_urls(name, key)
        try:
            size = await (self.upstream.head_foreign_blob(urls, digest) if urls
                          else self.upstream.head_blob(name, digest))
        except UpstreamError as exc:
            raise await self._blob_error(exc, name, key) from exc
        if size is None:
            raise APIError("UNAVAILABLE", detail="upstream did not announce the blob's size", status=502)
        return BlobHead(size, Outcome.MISS)

    async def blob(self, name: str, digest: Digest) -> BlobResult:
        """The blob's bytes: from the store, or streaming in from the upstream."""
        name = self.upstream.canonical_name(name)
        repo, key = self._repo(name), str(digest)
        linked = await self.reads.is_linked(repo, key)
        consented, down = False, None
        try:
            if linked and (stored := await self.fills.stored(digest)) is not None:
                return BlobResult(stored, Outcome.HIT)
            if not linked and await self.fills.stored_size(digest) is not None:
                # Stored for another repository: serve it here only if the upstream has it here too.
                await self._consent(name, digest)
                consented = True
        except StoreUnavailable as exc:  # filled as if missing: one fetch for all its readers, not stored
            log.info("%s: %s; streaming it from the upstream unstored", key, str(exc).rstrip("."))
            down = exc
        missing = not consented  # just looked at, and not stored: the fill need not look again first
        urls = await self._foreign_urls(name, key)
        fetch = ((lambda: self.upstream.foreign_blob(urls, digest)) if urls
                 else UpstreamBlob(lambda offset: self._fetch(name, repo, digest, offset)))
        try:
            source = await self.fills.open(digest, fetch, looked=missing, down=down is not None, origin=self.origin)
        except UpstreamError as exc:
            raise (down if linked and down else await self._blob_error(exc, name, key)) from exc
        if urls and (isinstance(source, BypassBlob) or isinstance(source, GrowingBlob) and not source.verified
                     and await source.verdict() != "done"):  # a stranger's URLs: nothing unverified is sent
            source.close()
            raise APIError("UNAVAILABLE", "the layer was not fetched whole and verified from its urls", status=502)
        if isinstance(source, BypassBlob):
            self._unrecorded.add(repo)
            return BlobResult(source, Outcome.BYPASS)  # nothing stored: nothing to link
        started_here = isinstance(source, GrowingBlob) and not (source.verified or source.coalesced)
        if (not started_here and not linked and not consented and not self._links.pending(repo, key)
                and not await self.reads.is_linked(repo, key)):
            # A fetch this request joined, one verified and only not yet moved into the store, or one
            # that landed in the store since the look above may be for another repository: served
            # here only if the upstream has it here too (a fetch for this repository linked it).
            try:
                await self._consent(name, digest)
            except APIError:
                source.close()
                raise
        if not linked and not self._links.pending(repo, key):
            # Recorded beside the answer, not before it: the first byte does not wait for the index.
            self._links.add(repo, key)
        if down is not None or self.fills.unstored(digest):  # the store found down, by this request or the fill's
            return BlobResult(source, Outcome.BYPASS)  # (a fill that started before may still store it)
        if not isinstance(source, GrowingBlob) or source.verified:  # verified: its fill is only being synced
            return BlobResult(source, Outcome.HIT)
        return BlobResult(source, Outcome.COALESCED if source.coalesced else Outcome.MISS)

    @asynccontextmanager
    async def _fetch(self, name: str, repo: str, digest: Digest, offset: int = 0) -> AsyncIterator[BlobDownload]:
        """The upstream's blob (from byte *offset* if it gives ranges: a fill taken over), linked to *repo*
        once it answered: requests joining the fill need no HEAD."""
        async with self.upstream.blob(name, digest, offset) as download:
            if not self._links.pending(repo, str(digest)):
                self._links.add(repo, str(digest))
            yield download

    async def settled(self) -> None:
        """Wait until the links recorded in the background are written (shutdown)."""
        await self._links.settled()

    async def _blob_error(self, exc: UpstreamError, name: str, digest: str) -> APIError:
        """The error for a blob the upstream did not give; for a non-distributable layer left to
        clients (``foreign_layers: skip``) its detail says where it is and what would fetch it."""
        error = api_error(exc, "BLOB_UNKNOWN")
        if (isinstance(exc, UpstreamNotFound) and self.upstream.config.foreign_layers == "skip"
                and await self.reads.is_linked(self._repo(name), digest)
                and (urls := await self.reads.ask(self.metadata.foreign_urls, digest))):
            return APIError("BLOB_UNKNOWN", "non-distributable layer: fetch it from its urls, or set "
                            "upstream.foreign_layers: fetch for clients that do not (dockerd)",
                            detail={"digest": digest, "urls": [u for u in urls if not u.startswith("#")]})
        return error

    async def _consent(self, name: str, digest: Digest) -> None:
        """The upstream has the blob in this repository too (a HEAD), or the client's error."""
        try:
            await self.upstream.head_blob(name, digest)
        except UpstreamError as exc:
            raise api_error(exc, "BLOB_UNKNOWN", unconfirmed=True) from exc

    async def _foreign_urls(self, name: str, digest: str) -> tuple[str, ...]:
        """Where to fetch a non-distributable layer of this repository, when ``foreign_layers: fetch``
        (else, or for any other blob, ``()``: the upstream is asked, as for every blob)."""
        wanted = self.upstream.config.foreign_layers == "fetch" and await self.reads.is_linked(self._repo(name), digest)
        return await self.reads.ask(self.metadata.foreign_urls, digest) if wanted else ()

    # -- tags --

    async def tags(self, name: str, n: int | None, last: str | None) -> TagsPage:
        """One page of a repository's tags in lexical order, at most *n* after *last* (OCI distribution
        spec, "Listing Tags"), whether more follow, and how it was served.  The upstream's whole list
        (it pages it its own way, see :meth:`Upstream.tags`; one listing for concurrent requests) plus
        the tags cached here (``MISS``); only the cached ones when the upstream fails (``STALE``)."""
        name = self.upstream.canonical_name(name)
        local = await self.reads.ask(self.metadata.tags, self._repo(name))
        ask = functools.partial(self._listings.run, self.upstream.tags)
        try:
            # (A long list of many pages may take its time: its wait does not quiet the upstream.)
            listed = await (self._revalidating(ask, name, quiets=False) if local else ask(name))
        except (UpstreamUnavailable, UpstreamRateLimited, UpstreamDenied, UpstreamInvalid, UpstreamNotFound) as exc:
            if not local:
                raise api_error(exc, "NAME_UNKNOWN") from exc
            self._log_stale(f"{self._repo(name)} tags", exc)
            return TagsPage(*paginate(local, n, last), Outcome.STALE)
        # Add the tags cached here (the upstream may have dropped some).
        tags = set(listed).union(local)
        return TagsPage(*paginate(sorted(tags), n, last), Outcome.MISS)

    # -- referrers --

    async def referrers(self, name: str, digest: Digest, artifact_type: str | None) -> ReferrersResult:
        """Referrers of a digest as the upstream lists them, or as known when it cannot (``registry/referrers.py``)."""
        name = self.upstream.canonical_name(name)
        answer = await self._referrers.list(self._repo(name), name, digest, artifact_type)
        return ReferrersResult(answer.manifests, Outcome.STALE if answer.stale else Outcome.MISS)

    # -- helpers --

    async def _revalidating(self, ask: Callable[..., Awaitable[T]], *args: str, quiets: bool = True) -> T:
        """``await ask(*args)``, a question to the upstream about something a cached copy can answer:
        :class:`UpstreamUnavailable` after :attr:`revalidate_wait` seconds, and at once while the
        upstream is quiet after one that ran out of time (see the module docstring; unless not
        *quiets*, running out of time makes it quiet)."""
        wait = self.revalidate_wait
        if time.monotonic() < self._quiet_until:
            raise UpstreamUnavailable("the upstream ran out of time or rate-limited a moment ago: not asked")
        try:
            return await asyncio.wait_for(ask(*args), wait)
        except TimeoutError:
            if not quiets:
                raise UpstreamUnavailable(f"no answer within {wait:g}s") from None
            self._quiet_until = time.monotonic() + QUIET_TIMES * wait
            raise UpstreamUnavailable(f"no answer within {wait:g}s; cached copies answer without asking "
                                      f"for {QUIET_TIMES * wait:g}s") from None

    def _stale(self, key: str, exc: UpstreamError, body: bytes, record: TagRecord) -> ManifestResult:
        """The cached copy of a tag the upstream did not revalidate (after a 429: see :data:`RATE_LIMITED_QUIET`)."""
        if isinstance(exc, UpstreamRateLimited):
            retry = exc.retry_after or ""
            wait = min(float(retry) if retry.isdigit() else UPSTREAM_RETRY_AFTER, RATE_LIMITED_QUIET)
            self._quiet_until = max(self._quiet_until, time.monotonic() + wait)
        self._log_stale(key, exc)
        return ManifestResult(body, record.media_type, record.digest, Outcome.STALE)

    def _log_stale(self, key: str, exc: Exception) -> None:
        if key not in self._stale_logged:
            self._stale_logged.add(key)
            log.warning("upstream failed for %s, serving the cached copy: %s", key, exc)
