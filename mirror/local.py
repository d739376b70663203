"""The private registry: pushed repositories, blob uploads, manifest puts, deletes and referrers.

A repository that was pushed to is *local*: it is filed under ``local/<name>`` in the index,
served from the store only (a pull never falls through to the upstream for it) and pinned.
Cached repositories share the store (a layer pulled from the upstream can be mounted into a
pushed repository without a second copy) but never their index entries.

Uploads collect in ``DATA/uploads/<uuid>`` with their state in the index, so an upload can
be continued by any worker process and after a restart.  Requests on one upload are
serialised with ``flock`` on its file.  Finishing an upload verifies the digest (with the
hash kept while the chunks arrived when this process saw them all, else by reading the file)
before the file is moved into the store, like every other ingest.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from .blobstore import BlobReader, DigestMismatch
from .config import Config
from .errors import APIError
from .gc import reference_lock
from .layout import new_upload_id
from .manifest import INDEX_TYPES, MANIFEST_MEDIA_TYPES, platform_manifest
from .metadata import LOCAL, Metadata, TagRecord, UploadRecord, local_repo
from .metrics import Metrics
from .pushed import (
    check_manifest,
    manifest_document,
    manifest_media_type,
    referrer_descriptor,
    required_digests,
    subject_digest,
)
from .reference import Digest, ParseError, parse_digest, parse_name
from .refusals import refusal
from .store import Store

log = logging.getLogger("mirror.local")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
WRITE_BATCH = 1024 * 1024
#: HTTP status of a write the store cannot take (RFC 4918 section 11.5, "Insufficient Storage").
INSUFFICIENT_STORAGE = 507


@dataclass(frozen=True)
class UploadState:
    uuid: str
    offset: int


@dataclass(frozen=True)
class StoredManifest:
    body: bytes
    media_type: str
    digest: str


class LocalRegistry:
    def __init__(self, store: Store, metadata: Metadata, config: Config,
                 canonical_name: Callable[[str], str], *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metadata = metadata
        self.config = config
        self.canonical_name = canonical_name
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        # uuid -> (offset, hasher) while this process has seen every byte of the upload.
        self._hashers: dict[str, tuple[int, Any]] = {}

    # -- naming --

    def is_local(self, name: str) -> bool:
        return self.metadata.is_local(name)

    def repo_key(self, name: str) -> str:
        """The index key of a repository: local if pushed to, else the upstream's cache."""
        if self.metadata.is_local(name):
            return local_repo(name)
        first, _, rest = name.partition("/")
        if rest and first in {u.registry for u in self.config.upstreams[1:]}:
            return name  # another upstream's repository, named with its registry prefix
        return f"{self.config.upstream.registry}/{self.canonical_name(name)}"

    def catalog_name(self, repo: str) -> str:
        """A repository's name as clients see it, from its index key."""
        prefix, _, rest = repo.partition("/")
        if prefix == LOCAL:
            return rest
        if prefix == self.config.upstream.registry:
            return rest
        return repo

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

    def check_push(self, name: str) -> None:
        """Refuse a push the policy does not allow; make the repository local otherwise."""
        push = self.config.push
        if not push.enabled:
            raise APIError("UNSUPPORTED", "push is disabled on this registry")
        if not push.allows(name):
            raise APIError("DENIED", f"push to {name} is not allowed here",
                           detail={"allowed_prefixes": list(push.prefixes)})
        if self.metadata.is_local(name):
            return
        if self.metadata.has_repository(self.repo_key(name)) and not push.over_cache:
            raise APIError("DENIED", f"{name} is a cache of the upstream registry; push to another name")
        self.metadata.mark_local(name, time.time())

    # -- reads of local repositories --

    async def manifest(self, name: str, reference: str | Digest, accept: set[str]) -> StoredManifest:
        repo = local_repo(name)
        if isinstance(reference, Digest):
            found = await self._read_manifest(repo, str(reference))
        else:
            record = self.metadata.get_tag(repo, reference)
            found = await self._read_manifest(repo, record.digest) if record else None
        if found is None:
            raise APIError("MANIFEST_UNKNOWN", detail={"name": name, "reference": str(reference)})
        if not isinstance(reference, Digest) and found.media_type in INDEX_TYPES and accept \
                and not accept & (INDEX_TYPES | {"*/*"}) and accept & set(MANIFEST_MEDIA_TYPES):
            child = platform_manifest(found.body)
            child_found = await self._read_manifest(repo, child.digest) if child else None
            if child_found is None:
                raise APIError("MANIFEST_UNKNOWN", detail="no linux/amd64 manifest for a client without index support")
            return child_found
        return found

    async def _read_manifest(self, repo: str, digest: str) -> StoredManifest | None:
        record = self.metadata.get_manifest(digest)
        if record is None or not self.metadata.is_linked(repo, digest):
            return None
        try:
            parsed = parse_digest(digest)
        except ParseError:
            return None
        body = await anyio.to_thread.run_sync(self.store.read_bytes, parsed)
        return None if body is None else StoredManifest(body, record.media_type, digest)

    async def open_blob(self, name: str, digest: Digest) -> BlobReader:
        if self.metadata.is_linked(local_repo(name), str(digest)):
            stored = await anyio.to_thread.run_sync(self.store.open, digest)
            if stored is not None:
                return stored
        raise APIError("BLOB_UNKNOWN", detail={"digest": str(digest)})

    async def blob_size(self, name: str, digest: Digest) -> int:
        if self.metadata.is_linked(local_repo(name), str(digest)):
            size = await anyio.to_thread.run_sync(self.store.size, digest)
            if size is not None:
                return size
        raise APIError("BLOB_UNKNOWN", detail={"digest": str(digest)})

    def tags(self, name: str) -> list[str]:
        return self.metadata.tags(local_repo(name))

    # -- uploads --

    async def start_upload(self, name: str) -> UploadState:
        uuid = new_upload_id()

        def create() -> None:
            fd = os.open(self.store.layout.upload(uuid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            self.metadata.put_upload(uuid, UploadRecord(name, time.time()))

        await anyio.to_thread.run_sync(create)
        self._hashers[uuid] = (0, Digest("sha256", "").hasher())
        return UploadState(uuid, 0)

    def _record(self, name: str, uuid: str) -> UploadRecord:
        try:
            self.store.layout.upload(uuid)
        except ValueError:
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid}) from None
        record = self.metadata.get_upload(uuid)
        if record is None or record.name != name or not self.store.layout.upload(uuid).exists():
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid})
        return record

    async def upload_status(self, name: str, uuid: str) -> UploadState:
        self._record(name, uuid)
        size = await anyio.to_thread.run_sync(lambda: os.stat(self.store.layout.upload(uuid)).st_size)
        return UploadState(uuid, size)

    async def append(self, name: str, uuid: str, body: AsyncIterator[bytes],
                     content_range: str | None = None) -> UploadState:
        """Add a chunk at the end of the upload (``Content-Range`` must start there)."""
        self._record(name, uuid)
        fd = await anyio.to_thread.run_sync(self._lock_upload, uuid)
        try:
            offset = os.fstat(fd).st_size
            self._check_range(name, uuid, offset, content_range)
            offset = await self._write(uuid, fd, offset, body)
        finally:
            os.close(fd)
        return UploadState(uuid, offset)

    def _check_range(self, name: str, uuid: str, offset: int, content_range: str | None) -> None:
        """A chunk's ``Content-Range`` must start where the upload ends: else ``416`` with the ``Range``
        the upload holds (distribution-spec, "Pushing a blob in chunks"), and nothing is written."""
        if content_range:
            start, _ = _content_range(content_range)
            if start != offset:
                raise APIError("BLOB_UPLOAD_INVALID", f"chunk starts at {start}, upload is at {offset}",
                               status=416, headers=self._upload_headers(name, uuid, offset))

    async def finish(self, name: str, uuid: str, digest: Digest, body: AsyncIterator[bytes],
                     content_range: str | None = None) -> None:
        """Append the last bytes (if any; ``Content-Range`` as for :meth:`append`), verify the digest
        and move the blob into the store."""
        self._record(name, uuid)
        path = self.store.layout.upload(uuid)
        fd = await anyio.to_thread.run_sync(self._lock_upload, uuid)
        try:
            before = os.fstat(fd).st_size
            self._check_range(name, uuid, before, content_range)
            offset = await self._write(uuid, fd, before, body)
            known = self._hashers.get(uuid)
            known_hex = known[1].hexdigest() if known and known[0] == offset and digest.algorithm == "sha256" \
                else None
            try:
                await anyio.to_thread.run_sync(self.store.commit_file, path, digest, known_hex)
            except DigestMismatch as exc:
                await anyio.to_thread.run_sync(self._drop_upload, uuid)
                self.metrics.upload_failed()
                raise APIError("DIGEST_INVALID", detail=str(exc)) from exc
            except OSError as exc:
                if refusal(exc) is not None and os.path.exists(path):  # as it was before this request
                    self._hashers.pop(uuid, None)
                    await anyio.to_thread.run_sync(os.ftruncate, fd, before)
                raise
        finally:
            os.close(fd)
        self._hashers.pop(uuid, None)
        self.metrics.upload_finished(offset)
        await anyio.to_thread.run_sync(self._linked_upload_done, name, uuid, digest)

    def _linked_upload_done(self, name: str, uuid: str, digest: Digest) -> None:
        self.metadata.link(local_repo(name), [str(digest)])
        self.metadata.delete_upload(uuid)

    async def cancel(self, name: str, uuid: str) -> None:
        self._record(name, uuid)
        await anyio.to_thread.run_sync(self._drop_upload, uuid)

    def _drop_upload(self, uuid: str) -> None:
        self._hashers.pop(uuid, None)
        self.metadata.delete_upload(uuid)
        try:
            os.unlink(self.store.layout.upload(uuid))
        except FileNotFoundError:
            pass

    def _lock_upload(self, uuid: str) -> int:
        try:
            fd = os.open(self.store.layout.upload(uuid), os.O_RDWR)
        except FileNotFoundError:
            raise APIError("BLOB_UPLOAD_UNKNOWN", detail={"uuid": uuid}) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    async def _write(self, uuid: str, fd: int, offset: int, body: AsyncIterator[bytes]) -> int:
        """Write the request body at *offset*, 1 MiB per thread hop; return the new end."""
        known = self._hashers.get(uuid)
        hasher = known[1] if known and known[0] == offset else None
        if hasher is None:
            self._hashers.pop(uuid, None)

        def flush(data: bytes, at: int) -> None:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if hasher is not None:
                hasher.update(data)

        pending: list[bytes] = []
        pending_size = 0
        start = offset
        try:
            async for chunk in body:
                if not chunk:
                    continue
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_BATCH:
                    await anyio.to_thread.run_sync(flush, b"".join(pending), offset)
                    offset += pending_size
                    pending, pending_size = [], 0
            if pending:
                await anyio.to_thread.run_sync(flush, b"".join(pending), offset)
                offset += pending_size
        except OSError as exc:
            if refusal(exc) is not None:  # the upload stays as it was before this request
                self._hashers.pop(uuid, None)
                await anyio.to_thread.run_sync(os.ftruncate, fd, start)
            raise
        if hasher is not None:
            self._hashers[uuid] = (offset, hasher)
        return offset

    def upload_location(self, name: str, uuid: str) -> str:
        return f"/v2/{name}/blobs/uploads/{uuid}"

    def _upload_headers(self, name: str, uuid: str, offset: int) -> dict[str, str]:
        return {
            "Location": self.upload_location(name, uuid),
            "Docker-Upload-UUID": uuid,
            "Range": f"0-{max(offset - 1, 0)}",
        }

    def upload_headers(self, name: str, state: UploadState) -> dict[str, str]:
        return self._upload_headers(name, state.uuid, state.offset)

    def sweep_uploads(self) -> int:
        """Remove upload files untouched for ``push.upload_ttl``, and their records; return how many.

        A file without a record is swept by the same rule, not at once: another worker may be
        creating it (the file comes before its record) or finishing it (the record goes first).
        """
        removed = 0
        cutoff = time.time() - self.config.push.upload_ttl
        for entry in self.store.layout.upload_entries():
            try:
                stale = entry.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                self._drop_upload(entry.name)
                removed += 1
        return removed

    # -- mounts --

    def mount(self, name: str, digest: Digest, source: str) -> bool:
        """Link a blob another repository holds into *name*; False when it cannot be mounted."""
        try:
            source = parse_name(source)
        except ParseError:
            return False
        key = str(digest)
        with reference_lock(self.store):
            if not self.metadata.is_linked(self.repo_key(source), key) or self.store.size(digest) is None:
                return False
            self.metadata.link(local_repo(name), [key])
            self.store.touch(digest)  # young again: the grace period covers the manifest to come
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

        def save() -> None:
            with reference_lock(self.store):  # the collector must not sweep what was just checked
                if missing := [d for d in required_digests(doc, media_type) if not self._present(repo, d)]:
                    raise APIError("MANIFEST_BLOB_UNKNOWN", detail={"digests": missing}, status=400)
                self._save_manifest(repo, reference, digest, body, media_type, subject, descriptor)

        await anyio.to_thread.run_sync(save)
        return str(digest), subject

    def _save_manifest(self, repo: str, reference: str | Digest, digest: Digest, body: bytes, media_type: str,
                       subject: str | None, descriptor: dict[str, Any] | None) -> None:
        self.store.put_bytes(digest, body)
        self.metadata.put_manifest(str(digest), media_type, len(body))
        self.metadata.link(repo, [str(digest)])
        if subject and descriptor:
            self.metadata.add_referrer(repo, subject, descriptor)
        if not isinstance(reference, Digest):
            self.metadata.set_tag(repo, reference, TagRecord(str(digest), media_type, time.time()))

    def _present(self, repo: str, digest: str) -> bool:
        try:
            parsed = parse_digest(digest)
        except ParseError:
            return False
        return self.metadata.is_linked(repo, digest) and self.store.size(parsed) is not None

    # -- deletes --

    async def delete_manifest(self, name: str, reference: str | Digest) -> None:
        self._check_delete()
        repo = self.repo_key(name)
        if not isinstance(reference, Digest):
            if not await anyio.to_thread.run_sync(self.metadata.untag, repo, reference):
                raise APIError("MANIFEST_UNKNOWN", detail={"tag": reference})
            return
        key = str(reference)
        if self.metadata.get_manifest(key) is None or not self.metadata.is_linked(repo, key):
            raise APIError("MANIFEST_UNKNOWN", detail={"digest": key})
        body = await anyio.to_thread.run_sync(self.store.read_bytes, reference)

        def forget() -> None:
            for tag in self.metadata.tags_pointing_to(repo, key):
                self.metadata.untag(repo, tag)
            subject = subject_digest(body) if body else None
            if subject:
                self.metadata.remove_referrer(repo, subject, key)
            self.metadata.unlink(repo, key)

        await anyio.to_thread.run_sync(forget)

    async def delete_blob(self, name: str, digest: Digest) -> None:
        self._check_delete()
        if not await anyio.to_thread.run_sync(self.metadata.unlink, self.repo_key(name), str(digest)):
            raise APIError("BLOB_UNKNOWN", detail={"digest": str(digest)})

    def _check_delete(self) -> None:
        if not self.config.delete.enabled:
            raise APIError("UNSUPPORTED", "deletes are disabled on this registry")

    # -- referrers --

    def referrers(self, name: str, subject: Digest, artifact_type: str | None) -> list[dict[str, Any]]:
        found = [dict(d) for d in self.metadata.referrers(self.repo_key(name), str(subject))]
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
        return found


def _content_range(value: str) -> tuple[int, int]:
    start, sep, end = value.strip().removeprefix("bytes ").removeprefix("bytes=").partition("-")
    if not sep or not re.fullmatch(r"[0-9]{1,19}", start) or not re.fullmatch(r"[0-9]{1,19}", end) \
            or int(end) < int(start):
        raise APIError("BLOB_UPLOAD_INVALID", f"invalid Content-Range {value!r}", status=416)
    return int(start), int(end)
