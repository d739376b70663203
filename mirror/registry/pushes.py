"""A pushed repository as a :class:`~mirror.registry.repository.Repository` (``registry/local.py``
keeps its content; blob uploads are ``registry/uploads.py``'s)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..metadata.driver import local_repo
from ..spec.manifest import MAX_MANIFEST_BYTES
from ..spec.reference import Digest
from .local import LocalRegistry
from .repository import (
    BlobHead,
    BlobResult,
    ManifestResult,
    Outcome,
    PushedManifest,
    ReferrersResult,
    TagsPage,
    UploadState,
    paginate,
    read_limited,
)


class LocalRepository:
    """A pushed repository as a :class:`~mirror.registry.repository.Repository`; every answer is ``LOCAL``.

    Bound to a name that is local, or that a push may make local: each write first passes
    :meth:`LocalRegistry.check_push`, and a write the store's filesystem refuses is a ``507``
    (:meth:`LocalRegistry.storing`).
    """

    def __init__(self, local: LocalRegistry, name: str) -> None:
        self.local = local
        self.name = name

    async def manifest(self, reference: str | Digest, accept: set[str]) -> ManifestResult:
        return await self.local.manifest(self.name, reference, accept)

    async def manifest_head(self, reference: str | Digest, accept: set[str]) -> ManifestResult:
        return await self.manifest(reference, accept)

    async def blob_head(self, digest: Digest) -> BlobHead:
        return BlobHead(await self.local.blob_size(self.name, digest), Outcome.LOCAL)

    async def blob(self, digest: Digest) -> BlobResult:
        return BlobResult(await self.local.open_blob(self.name, digest), Outcome.LOCAL)

    async def tags(self, n: int | None, last: str | None) -> TagsPage:
        return TagsPage(*paginate(await self.local.tags(self.name), n, last), Outcome.LOCAL)

    async def referrers(self, digest: Digest, artifact_type: str | None) -> ReferrersResult:
        return ReferrersResult(await self.local.referrers(self.name, digest, artifact_type), Outcome.LOCAL)

    async def put_manifest(self, reference: str | Digest, content_type: str, body: AsyncIterator[bytes],
                           declared_length: str | None) -> PushedManifest:
        with self.local.storing():
            await self.local.check_push(self.name)
            try:
                data = await read_limited(body, declared_length, MAX_MANIFEST_BYTES)
                return PushedManifest(*await self.local.put_manifest(self.name, reference, content_type, data))
            except Exception:
                await self.local.give_back(self.name)
                raise

    async def delete_manifest(self, reference: str | Digest) -> None:
        await self.local.delete_manifest(self.name, reference, repo=local_repo(self.name))

    async def delete_blob(self, digest: Digest) -> None:
        await self.local.delete_blob(self.name, digest, repo=local_repo(self.name))

    async def start_upload(self) -> UploadState:
        with self.local.storing():
            await self.local.check_push(self.name)
            return await self.local.uploads.start(self.name)

    async def mount(self, digest: Digest, source: str) -> bool:
        with self.local.storing():
            await self.local.check_push(self.name)
            return await self.local.mount(self.name, digest, source)

    async def upload_status(self, uuid: str) -> UploadState:
        with self.local.storing():
            return await self.local.uploads.status(self.name, uuid)

    async def append(self, uuid: str, body: AsyncIterator[bytes], content_range: str | None,
                     length: int | None = None) -> UploadState:
        with self.local.storing():
            return await self.local.uploads.append(self.name, uuid, body, content_range, length)

    async def finish(self, uuid: str, digest: Digest, body: AsyncIterator[bytes],
                     content_range: str | None = None, length: int | None = None) -> None:
        with self.local.storing():
            await self.local.uploads.finish(self.name, uuid, digest, body, content_range, length)

    async def cancel(self, uuid: str) -> None:
        with self.local.storing():
            await self.local.uploads.cancel(self.name, uuid)
