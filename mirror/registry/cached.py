"""The cache of one upstream repository as a :class:`~mirror.registry.repository.Repository`.

Reads follow the pull-through policy (``registry/pullthrough.py``), asking the upstream for the name it
knows the repository by.  Writes: a name under ``push.prefixes`` takes pushes, and the first one
makes it a pushed repository (``registry/local.py``; refused with ``DENIED`` if it already caches content,
unless ``push.over_cache``); any other name refuses them with the namespace policy's error.
Deletes forget cached content (``delete.enabled``), as for a pushed repository.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from ..spec.errors import APIError
from ..spec.reference import Digest
from .local import LocalRegistry, push_refusal
from .pullthrough import PullThrough
from .pushes import LocalRepository
from .repository import (
    BlobHead,
    BlobResult,
    ManifestResult,
    Outcome,
    PushedManifest,
    ReferrersResult,
    TagsPage,
    UploadState,
)


class CachedRepository:
    """One upstream repository's cache, bound to the name the client used (*name*) and the name
    the upstream knows it by (*upstream_name*)."""

    def __init__(self, pull: PullThrough, upstream_name: str, name: str, local: LocalRegistry, *,
                 foreign: bool = False) -> None:
        """*foreign*: the name is one of an upstream other than the default (``registry/namespaces.py``),
        which takes no pushes here."""
        self.pull = pull
        #: The repository's name at the upstream (without the registry prefix it may have here).
        self.upstream_name = upstream_name
        self.name = name
        self.local = local
        self.foreign = foreign
        #: A HEAD of a blob never pulled here is a pusher's question (see :meth:`PullThrough.blob_head`).
        self.pushable = not foreign and local.takes_pushes(name)
        self._pushes = LocalRepository(local, name)

    # -- reads --

    async def manifest(self, reference: str | Digest, accept: set[str]) -> ManifestResult:
        result = await self.pull.manifest(self.upstream_name, reference, accept)
        # Not stored, or stale: asked again next time.  By tag, only while fresh.
        memorable = result.outcome not in (Outcome.BYPASS, Outcome.STALE) \
            and (isinstance(reference, Digest) or result.fresh_until is not None)
        return dataclasses.replace(result, memorable=memorable,
                                   touch=self.pull.toucher(self.upstream_name, result.digest))

    async def manifest_head(self, reference: str | Digest, accept: set[str]) -> ManifestResult:
        return await self.manifest(reference, accept)

    async def blob_head(self, digest: Digest) -> BlobHead:
        return await self.pull.blob_head(self.upstream_name, digest, pushable=self.pushable)

    async def blob(self, digest: Digest) -> BlobResult:
        return await self.pull.blob(self.upstream_name, digest)

    async def tags(self, n: int | None, last: str | None) -> TagsPage:
        return await self.pull.tags(self.upstream_name, n, last)

    async def referrers(self, digest: Digest, artifact_type: str | None) -> ReferrersResult:
        return await self.pull.referrers(self.upstream_name, digest, artifact_type)

    # -- writes --

    def _refuse_push(self) -> None:
        if self.foreign:
            whose = self.name.partition("/")[0] if self.local.foreign(self.name) else self.pull.registry
            raise APIError("DENIED", f"{self.name} is a repository of {whose}, an upstream of this "
                           "mirror: it takes no pushes here; push to a name of this registry's own")
        if (refused := push_refusal(self.local.config.push, self.name)) is not None:
            raise refused

    async def put_manifest(self, reference: str | Digest, content_type: str, body: AsyncIterator[bytes],
                           declared_length: str | None) -> PushedManifest:
        self._refuse_push()
        return await self._pushes.put_manifest(reference, content_type, body, declared_length)

    async def delete_manifest(self, reference: str | Digest) -> None:
        await self.local.delete_manifest(self.name, reference, repo=self.pull.repo_key(self.upstream_name))

    async def delete_blob(self, digest: Digest) -> None:
        await self.local.delete_blob(self.name, digest, repo=self.pull.repo_key(self.upstream_name))

    async def start_upload(self) -> UploadState:
        self._refuse_push()
        return await self._pushes.start_upload()

    async def mount(self, digest: Digest, source: str) -> bool:
        self._refuse_push()
        return await self._pushes.mount(digest, source)

    # An upload exists only if a push started it: the name took pushes then.

    async def upload_status(self, uuid: str) -> UploadState:
        return await self._pushes.upload_status(uuid)

    async def append(self, uuid: str, body: AsyncIterator[bytes], content_range: str | None,
                     length: int | None = None) -> UploadState:
        return await self._pushes.append(uuid, body, content_range, length)

    async def finish(self, uuid: str, digest: Digest, body: AsyncIterator[bytes],
                     content_range: str | None = None, length: int | None = None) -> None:
        if self.foreign:  # an upload started by another route (?ns= of the default) ends here: not into this name
            self._refuse_push()
        await self._pushes.finish(uuid, digest, body, content_range, length)

    async def cancel(self, uuid: str) -> None:
        await self._pushes.cancel(uuid)


class UnmirroredRegistryRepository(CachedRepository):
    """A repository named for a registry no upstream is configured for (``quay.io/org/app``), not
    pushed here, while the default upstream is Docker Hub, whose names never begin with a host: its
    reads answer ``NAME_UNKNOWN`` saying so, without asking Docker Hub (which would only answer that
    it does not know it, and learn another registry's names); pushes go on as for any name."""

    def _unknown(self) -> APIError:
        registry = self.name.partition("/")[0]
        return APIError("NAME_UNKNOWN", f"no upstream is configured for {registry}", detail={"name": self.name})

    async def manifest(self, reference: str | Digest, accept: set[str]) -> ManifestResult:
        raise self._unknown()

    async def blob_head(self, digest: Digest) -> BlobHead:
        raise APIError("BLOB_UNKNOWN", detail={"digest": str(digest)}) if self.pushable else self._unknown()

    async def blob(self, digest: Digest) -> BlobResult:
        raise self._unknown()

    async def tags(self, n: int | None, last: str | None) -> TagsPage:
        raise self._unknown()

    async def referrers(self, digest: Digest, artifact_type: str | None) -> ReferrersResult:
        raise self._unknown()
