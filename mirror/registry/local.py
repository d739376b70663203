"""The private registry: pushed repositories, manifest puts, mounts, deletes and referrers.

A repository that was pushed to is *local*: it is filed under ``local/<name>`` in the index,
served from the store only (a pull never falls through to the upstream for it) and pinned.
Cached repositories share the store (a layer pulled from the upstream can be mounted into a
pushed repository without a second copy) but never their index entries.

:class:`~mirror.registry.pushes.LocalRepository` is one pushed repository (or one about to be: its
first write makes it local) as a :class:`~mirror.registry.repository.Repository`; blob uploads are
``registry/uploads.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ..config.sections import Config, PushConfig
from ..metadata.driver import LOCAL, Metadata, local_repo, unpin_if_untagged
from ..observe.metrics import Metrics
from ..spec.errors import APIError
from ..spec.manifest import INDEX_TYPES, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES, child_for_old_client
from ..spec.names import without_registry
from ..spec.pushed import (
    check_manifest,
    manifest_document,
    manifest_media_type,
    referrer_descriptor,
    required_digests,
    subject_digest,
)
from ..spec.reference import Digest, ParseError, parse_digest, parse_name
from ..storage.driver import BlobReader, BlobStore
from ..storage.refusals import refusal
from .reads import IndexReads, in_index_thread
from .records import absent, referencing, save_pushed, to_the_end
from .repository import ManifestResult, Outcome
from .uploads import Uploads

if TYPE_CHECKING:
    from ..maintenance.upkeep import AccessTracker

log = logging.getLogger("mirror.registry.local")

#: HTTP status of a write the store cannot take (RFC 4918 section 11.5, "Insufficient Storage").
INSUFFICIENT_STORAGE = 507


class LocalRegistry:
    def __init__(self, store: BlobStore, metadata: Metadata, config: Config,
                 canonical_name: Callable[[str], str], *, metrics: Metrics | None = None,
                 upstream_serves: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """*upstream_serves*: whether the default upstream serves a repository (``registry/shadowing.py``)."""
        self.upstream_serves = upstream_serves
        self.store = store
        self.metadata = metadata
        self.config = config
        self.canonical_name = canonical_name
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        self.uploads = Uploads(store, metadata, config.push.upload_ttl, self.metrics)
        self.reads = IndexReads(metadata)
        self.access: AccessTracker | None = None  # pulls of pushed manifests, for the UI's "last pull"

    # -- naming --

    def own_name(self, name: str) -> str:
        """*name* without the default registry's prefix (``docker.io/team/x`` is ``team/x``), as a
        request without ``?ns=`` is routed (``registry/namespaces.py``)."""
        return without_registry(name, self.config.upstream.registry)

    def repo_key(self, name: str) -> str:
        """The index key of the repository a request for *name* without ``?ns=`` reaches: local if
        pushed to (and not named for another upstream: ``registry/namespaces.py``), else the cache."""
        name = self.own_name(name)
        return local_repo(name) if not self.foreign(name) and self.metadata.is_local(name) else self.cache_key(name)

    async def read_repo_key(self, name: str) -> str:
        """:meth:`repo_key`, for code on the event loop (``registry/reads.py``)."""
        name = self.own_name(name)
        local = not self.foreign(name) and await self.reads.is_local(name)
        return local_repo(name) if local else self.cache_key(name)

    def foreign(self, name: str) -> bool:
        """Whether *name* begins with the registry of an upstream other than the default
        (``ghcr.io/org/app``): that registry's repository, which takes no pushes."""
        first, _, rest = name.partition("/")
        return bool(rest) and first in {u.registry for u in self.config.upstreams[1:]}

    def cache_key(self, name: str) -> str:
        """The index key of *name* as the upstream's cache, whether or not it is local now."""
        if self.foreign(name):
            return name  # another upstream's repository, named with its registry prefix
        return f"{self.config.upstream.registry}/{self.canonical_name(name)}"

    def served(self, repo: str) -> bool:
        """Whether requests reach the repository of index key *repo*: a pushed one, or the cache of a
        configured upstream's (not one preloaded for a registry that is none: ``archive/preload.py``
        warns of those, kept until that registry is configured)."""
        prefix = repo.partition("/")[0]
        return prefix == LOCAL or any(u.registry == prefix for u in self.config.upstreams)

    def catalog_name(self, repo: str) -> str:
        """A repository's name as clients see it, from its index key."""
        prefix, _, rest = repo.partition("/")
        return rest if prefix in (LOCAL, self.config.upstream.registry) else repo

    def takes_pushes(self, name: str) -> bool:
        """Would a push to *name* be accepted by the namespace policy (``push.enabled``, ``push.prefixes``)?"""
        return self.config.push.enabled and self.config.push.allows(name)

    @contextlib.contextmanager
    def storing(self) -> Iterator[None]:
        """Turn a write the store's filesystem refuses (full, over quota, read-only) into a
        ``507`` ``UNAVAILABLE`` error, after the state it had before the write was kept."""
        try:
            yield
        except APIError:
            raise
        except Exception as exc:
            reason = refusal(exc)
            if reason is None:
                raise
            self.store.refused(exc, None)
            raise APIError("UNAVAILABLE", "the registry's storage cannot take this write",
                           detail=f"store is full or read-only: {reason}", status=INSUFFICIENT_STORAGE) from exc

    async def check_push(self, name: str) -> None:
        """Refuse a push the policy does not allow; make the repository local otherwise."""
        if (refused := push_refusal(self.config.push, name)) is not None:
            raise refused
        if not await self.reads.is_local(name):
            push = self.config.push  # (push.prefixes: the site's own names, never asked about upstream)
            if (not push.over_cache and not push.prefixes and self.upstream_serves is not None
                    and not self.foreign(name) and not await self.reads.ask(self.metadata.has_repository,
                                                                            self.cache_key(name))
                    and await self.upstream_serves(name)):  # (a cached one is refused as such, below)
                raise APIError("DENIED", f"{name} is a repository of the upstream registry; push to another name")
            await in_index_thread(self._make_local, name)

    def _make_local(self, name: str) -> None:
        push = self.config.push
        # The cache's key, not repo_key(): a push made local by another process since the look above
        # (another worker or replica taking one of this push's layers) is no cache of the upstream.
        if self.metadata.has_repository(self.cache_key(name)) and not push.over_cache:
            raise APIError("DENIED", f"{name} is a cache of the upstream registry; push to another name")
        self.metadata.mark_local(name, time.time())

    async def give_back(self, name: str) -> None:
        """A manifest push to *name* was refused: undo the claim :meth:`check_push` made, unless something
        landed in it or an upload of it is open (``metadata/releases.py``).  Else a refused ``PUT`` (a
        missing blob, a body that is no manifest) kept the name a pushed repository for good: in the
        catalog, and hiding the upstream's repository of that name when its check blipped."""
        try:
            if await in_index_thread(self.metadata.release_local, name):
                log.info("%s is no pushed repository any more: a manifest push to it was refused before any "
                         "content landed", name)
        except Exception as exc:  # noqa: BLE001 (the index is down: the refusal is what the client hears of)
            log.warning("could not give the name %s back after a refused manifest push: %s", name, exc)

    def kept_local(self, name: str) -> None:
        """Content just landed in *name*: mark it local again, in case an upload of it, cancelled or
        expired meanwhile, gave it back before this content showed (``metadata/releases.py``; asked
        of the database, not of answers kept in memory, which may not know of that yet)."""
        self.metadata.mark_local(name, time.time())

    # -- reads of local repositories --

    async def manifest(self, name: str, reference: str | Digest, accept: set[str]) -> ManifestResult:
        repo = local_repo(name)
        if isinstance(reference, Digest):
            found = await self._read_manifest(repo, str(reference))
        else:
            record = await self.reads.ask(self.metadata.get_tag, repo, reference)
            found = await self._read_manifest(repo, record.digest) if record else None
        if found is None:
            raise APIError("MANIFEST_UNKNOWN", detail={"name": name, "reference": str(reference)})
        if not isinstance(reference, Digest) and found.media_type in INDEX_TYPES and accept \
                and not accept & (INDEX_TYPES | {"*/*"}) and accept & set(MANIFEST_MEDIA_TYPES):
            child = child_for_old_client(found.body, accept)
            if isinstance(child, str):
                raise APIError("MANIFEST_UNKNOWN", detail=child)
            child_found = await self._read_manifest(repo, child.digest)
            if child_found is None:
                raise APIError("MANIFEST_UNKNOWN", detail="no linux/amd64 manifest for a client without index support")
            return child_found
        return found

    async def _read_manifest(self, repo: str, digest: str) -> ManifestResult | None:
        record = await self.reads.get_manifest(digest)
        if record is None or not await self.reads.is_linked(repo, digest):
            return None
        try:
            parsed = parse_digest(digest)
        except ParseError:
            return None
        body = await anyio.to_thread.run_sync(self.store.read_bytes, parsed)
        if body is None:
            return None
        touch = None if self.access is None else self.access.used(repo, digest)
        # Given again from memory until the index moves (a push, a delete): nothing else changes it.
        return ManifestResult(body, record.media_type, digest, Outcome.LOCAL, memorable=True, touch=touch)

    async def open_blob(self, name: str, digest: Digest) -> BlobReader:
        if await self.reads.is_linked(local_repo(name), str(digest)):
            stored = await anyio.to_thread.run_sync(self.store.open, digest)
            if stored is not None:
                return stored
        raise APIError("BLOB_UNKNOWN", detail={"digest": str(digest)})

    async def blob_size(self, name: str, digest: Digest) -> int:
        if await self.reads.is_linked(local_repo(name), str(digest)):
            size = await anyio.to_thread.run_sync(self.store.size, digest)
            if size is not None:
                return size
        raise APIError("BLOB_UNKNOWN", detail={"digest": str(digest)})

    async def tags(self, name: str) -> list[str]:
        return await self.reads.ask(self.metadata.tags, local_repo(name))

    # -- mounts --

    async def mount(self, name: str, digest: Digest, source: str) -> bool:
        """Link a blob another repository holds into *name*; False when it cannot be mounted."""
        try:
            source = parse_name(source)
        except ParseError:
            return False
        key = str(digest)

        async def mount() -> bool:
            async with referencing(self.store):  # (registry/records.py)
                if await absent(self.store, self.metadata, await self.read_repo_key(source), [key]):
                    return False
                await in_index_thread(self.metadata.link, local_repo(name), [key])
                await in_index_thread(self.kept_local, name)
                await anyio.to_thread.run_sync(self.store.touch, digest)  # young again: the manifest's grace
            return True

        if not await to_the_end(mount()):
            return False
        self.metrics.mounted()
        return True

    # -- manifests --

    async def put_manifest(self, name: str, reference: str | Digest, content_type: str,
                           body: bytes) -> tuple[str, str | None]:
        """Validate and store a pushed manifest; return its digest and its subject (if any)."""
        repo = local_repo(name)
        if len(body) > MAX_MANIFEST_BYTES:
            raise APIError("MANIFEST_INVALID", f"manifest is larger than {MAX_MANIFEST_BYTES} bytes", status=413)
        digest = Digest.of(body, reference.algorithm if isinstance(reference, Digest) else "sha256")
        if isinstance(reference, Digest) and digest != reference:
            raise APIError("DIGEST_INVALID", detail=f"manifest digest is {digest}, not {reference}")
        doc = manifest_document(body)
        media_type = manifest_media_type(content_type, doc)
        subject = check_manifest(doc, media_type)
        descriptor = referrer_descriptor(doc, media_type, str(digest), len(body)) if subject else None

        await save_pushed(self.store, self.metadata, repo, reference, digest, body, media_type,
                          required_digests(doc, media_type), subject, descriptor)
        await in_index_thread(self.kept_local, name)
        return str(digest), subject

    # -- deletes --

    async def delete_manifest(self, name: str, reference: str | Digest, *, repo: str | None = None) -> None:
        """Forget a tag, or a manifest with its tags, in repository *name* (index key *repo*, if the
        caller knows it better than :meth:`repo_key`: a cached repository named through ``?ns=``)."""
        self._check_delete("GET, HEAD, PUT")
        repo = repo if repo is not None else await self.read_repo_key(name)
        if not isinstance(reference, Digest):
            if not await in_index_thread(self._untag, repo, reference):
                raise APIError("MANIFEST_UNKNOWN", detail={"tag": reference})
            return
        key = str(reference)
        if await self.reads.get_manifest(key) is None or not await self.reads.is_linked(repo, key):
            raise APIError("MANIFEST_UNKNOWN", detail={"digest": key})
        body = await anyio.to_thread.run_sync(self.store.read_bytes, reference)

        def forget() -> None:
            for tag in self.metadata.tags_pointing_to(repo, key):
                self.metadata.untag(repo, tag)
            subject = subject_digest(body) if body else None
            if subject:
                self.metadata.remove_referrer(repo, subject, key)
            self.metadata.unlink(repo, key)
            self.metadata.unpin(repo, key)  # a preloaded image: deleted, it is no longer kept
            if self.metadata.tags_pointing_to(repo, key):  # a push tagged it meanwhile: that push came last
                self.metadata.link(repo, [key])

        await in_index_thread(forget)

    def _untag(self, repo: str, tag: str) -> bool:
        record = self.metadata.get_tag(repo, tag)
        if not self.metadata.untag(repo, tag):
            return False
        if record is not None:
            unpin_if_untagged(self.metadata, repo, record.digest)
        return True

    async def delete_blob(self, name: str, digest: Digest, *, repo: str | None = None) -> None:
        self._check_delete()
        repo = repo if repo is not None else await self.read_repo_key(name)
        if not await in_index_thread(self.metadata.unlink, repo, str(digest)):
            raise APIError("BLOB_UNKNOWN", detail={"digest": str(digest)})

    def _check_delete(self, allow: str = "GET, HEAD") -> None:
        if not self.config.delete.enabled:  # (405 names what is allowed: RFC 9110 section 15.5.6)
            raise APIError("UNSUPPORTED", "deletes are disabled on this registry", headers={"Allow": allow})

    # -- referrers --

    async def referrers(self, name: str, subject: Digest, artifact_type: str | None) -> list[dict[str, Any]]:
        repo = local_repo(name)  # a pushed repository's (LocalRepository)
        found = [dict(d) for d in await self.reads.ask(self.metadata.referrers, repo, str(subject))]
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
        return found


def push_refusal(push: PushConfig, name: str) -> APIError | None:
    """The error for a push to *name* the namespace policy refuses (``push.enabled``,
    ``push.prefixes``), or None when it takes it."""
    if not push.enabled:
        return APIError("UNSUPPORTED", "push is disabled on this registry", headers={"Allow": "GET, HEAD"})
    if not push.allows(name):
        return APIError("DENIED", f"push to {name} is not allowed here",
                        detail={"allowed_prefixes": list(push.prefixes)})
    return None
