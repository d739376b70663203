"""Export: images from the store, written as one OCI archive (an OCI image layout in a tar).

The archive::

    oci-layout          {"imageLayoutVersion": "1.0.0"}
    blobs/<alg>/<hex>   every index, manifest, config and layer, byte for byte as stored
    index.json          one descriptor per image name, annotated with the full name
                        (``docker.io/library/alpine:3.20``) as ``org.opencontainers.image.ref.name``
                        and ``io.containerd.image.name``

so ``skopeo copy oci-archive:FILE:docker.io/library/alpine:3.20 ...`` finds an image by name, and
``mirror preload FILE`` on another mirror restores every image with the same digests.  An image
not in the store is pulled through the upstream first (the upstream configured for its registry,
when there is one and it answers); pushed repositories are exported from the store only.
Which platforms of a multi-platform image go in:

* ``--all-platforms``: every one (missing ones are pulled);
* ``--platform P``: those matching ``P`` (``linux/arm64`` matches any variant);
* neither: the platforms already in the store, or the host's platform if none is.

The index is always exported byte for byte, so its digest stays the registry's: when only
some platforms are included, the archive's index names manifests the archive does not hold.
Every object is hashed again while it is written: a corrupt store object stops the export.
A compressed archive is written when FILE ends in ``.gz``/``.tgz`` (gzip) or ``.zst`` (zstd).

Platforms are parsed and matched in ``spec/platforms.py``.  Imports the store, metadata, manifest,
names and platforms modules; ``upstream``, ``pullthrough`` and ``fill`` only when an image must be
pulled first.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import secrets
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config.sections import Config, UpstreamConfig
from ..config.values import human
from ..metadata.driver import Metadata, local_repo
from ..observe.progress import NoProgress, Progress
from ..spec.manifest import INDEX_TYPES, MANIFEST_MEDIA_TYPES, SCHEMA1, SCHEMA1_SIGNED, detect_media_type
from ..spec.names import ImageName, InvalidImageName, parse_image_name, without_registry
from ..spec.platforms import Platform, platform_text
from ..spec.reference import Digest, ParseError, parse_digest
from ..storage.driver import BlobStore
from ..storage.staging import CHUNK
from .plan import CONTAINERD_NAME, REF_NAME

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MAX_DEPTH = 4


class ExportError(Exception):
    """An image cannot be exported (unknown, not cached and not pullable, corrupt...)."""


@dataclass
class _Image:
    text: str               # as the user wrote it
    name: ImageName         # normalised, for the annotations
    repo: str               # index key it is read from
    pull_name: str | None   # name to pull through the upstream, None if it cannot be
    digest: str = ""
    media_type: str = ""
    size: int = 0


@dataclass
class ExportSummary:
    output: str
    images: list[str] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0
    pulled: int = 0

    def describe(self) -> str:
        pulled = f" ({self.pulled} pulled through the upstream first)" if self.pulled else ""
        return (f"{self.output}: {len(self.images)} image{'s' * (len(self.images) != 1)}, {self.objects} objects, "
                f"{human(self.bytes)}{pulled}")


def read_image_list(path: Path) -> list[str]:
    """Image references from a file: one per line, ``#`` comments and blank lines ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror}") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


class Exporter:
    def __init__(self, config: Config, store: BlobStore, metadata: Metadata, *, platforms: list[Platform] | None = None,
                 all_platforms: bool = False, progress: Progress | None = None) -> None:
        self.config, self.store, self.metadata = config, store, metadata
        self.platforms, self.all_platforms = platforms or [], all_platforms
        self.progress = progress or NoProgress()
        self._pulls: dict[str, Any] = {}
        self._fills: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self.pulled = 0

    def export(self, references: list[str], output: Path) -> ExportSummary:
        """Write every image named by *references* into *output* (replaced atomically), once each."""
        named: dict[tuple[str, str], _Image] = {}  # by the repository read and the name: once each
        for text in references:
            image = self._image(text)
            named.setdefault((image.repo, str(image.name)), image)
        images = list(named.values())
        if not images:
            raise ExportError("no image to export")
        self.progress.phase("collecting", None)
        objects = asyncio.run(self._collect(images))
        summary = ExportSummary(str(output), [str(i.name) for i in images], len(objects), sum(objects.values()),
                                self.pulled)
        self.progress.phase("writing", summary.bytes)
        self._write(output, images, objects)
        return summary

    # -- which repository --

    def _image(self, text: str) -> _Image:
        try:
            name = parse_image_name(text)
        except InvalidImageName as exc:
            raise ExportError(f"invalid image name {exc}") from None
        written = name.written
        if written is None and name.registry == self.config.upstream.registry:  # docker.io/team/x is team/x, as routed
            written = without_registry(name.as_written, name.registry)
        if written is not None and self.metadata.is_local(written):
            return _Image(text, name, local_repo(written), None)
        pullable = self._upstream_for(name.registry) is not None
        return _Image(text, name, name.repo, name.name if pullable else None)

    def _upstream_for(self, registry: str) -> UpstreamConfig | None:
        for upstream in getattr(self.config, "upstreams", None) or (self.config.upstream,):
            if upstream.registry == registry:
                return upstream
        return None

    def _registries(self) -> str:
        return ", ".join(u.registry for u in getattr(self.config, "upstreams", None) or (self.config.upstream,))

    # -- collecting (pulling what is missing) --

    async def _collect(self, images: list[_Image]) -> dict[str, int]:
        objects: dict[str, int] = {}
        async with contextlib.AsyncExitStack() as stack:
            self._stack = stack
            for image in images:
                image.digest, image.media_type = await self._root(image)
                image.size = await self._gather(image, image.digest, image.media_type, objects, 0)
                self.progress.image_done(str(image.name))
        return objects

    async def _puller(self, registry: str) -> Any:
        """The pull-through policy of the upstream filed as *registry* (built on first use)."""
        if registry not in self._pulls:
            from ..registry.pullthrough import PullThrough
            from ..storage.fill import Fills
            from ..upstream.client import Upstream

            assert self._stack is not None
            config = self._upstream_for(registry)
            assert config is not None
            if self._fills is None:
                self._fills = Fills(self.store)
                self._stack.push_async_callback(self._fills.aclose)
            upstream = Upstream(config)
            self._stack.push_async_callback(upstream.aclose)
            ttl = getattr(config, "tag_ttl", None)
            self._pulls[registry] = PullThrough(self.store, self.metadata, self._fills, upstream,
                                                self.config.cache.tag_ttl if ttl is None else ttl, registry)
        return self._pulls[registry]

    def _cannot_pull(self, image: _Image, what: str) -> ExportError:
        if image.repo.startswith("local/"):
            return ExportError(f"{image.text}: {what} is not in the store (a pushed repository)")
        if image.pull_name is None:
            return ExportError(f"{image.text}: {what} is not in the store, and {image.name.registry} is not one "
                               f"of this mirror's upstreams ({self._registries()})")
        return ExportError(f"{image.text}: {what} is not in the store")

    async def _from_upstream(self, image: _Image, what: str, call: Any) -> Any:
        from ..spec.errors import APIError

        if image.pull_name is None:
            raise self._cannot_pull(image, what)
        try:
            return await call(await self._puller(image.name.registry))
        except APIError as exc:
            detail = f": {exc.detail}" if exc.detail else ""
            url = self._upstream_for(image.name.registry).url  # type: ignore[union-attr]
            raise ExportError(f"{image.text}: {what} is not in the store and the upstream ({url}) could not "
                              f"provide it: {exc.message}{detail}") from None

    async def _root(self, image: _Image) -> tuple[str, str]:
        name = image.name
        if name.digest is not None:
            record = self.metadata.get_manifest(name.digest)
            if record is not None and self.metadata.is_linked(image.repo, name.digest) \
                    and self.store.exists(parse_digest(name.digest)):
                return name.digest, record.media_type
        elif name.tag is not None:
            tag = self.metadata.get_tag(image.repo, name.tag)
            if tag is not None and self.store.exists(parse_digest(tag.digest)):
                return tag.digest, tag.media_type
        reference: str | Digest = parse_digest(name.digest) if name.digest else str(name.tag)
        result = await self._from_upstream(
            image, "the image", lambda pull: pull.manifest(image.pull_name, reference, set(MANIFEST_MEDIA_TYPES)))
        self.pulled += 1
        return result.digest, result.media_type

    async def _manifest(self, image: _Image, digest: str) -> bytes:
        try:
            parsed = parse_digest(digest)
        except ParseError:
            raise ExportError(f"{image.text}: invalid digest {digest!r} in an index") from None
        body = self.store.read_bytes(parsed)
        if body is None:
            result = await self._from_upstream(
                image, f"manifest {digest}", lambda pull: pull.manifest(image.pull_name, parsed, set()))
            body = result.body
        return body

    async def _gather(self, image: _Image, digest: str, media_type: str, objects: dict[str, int],
                      depth: int) -> int:
        """Add a manifest and what it needs to *objects*; return the manifest's size."""
        if depth > MAX_DEPTH:
            raise ExportError(f"{image.text}: indexes nested more than {MAX_DEPTH} deep")
        body = await self._manifest(image, digest)
        media_type = detect_media_type(body, media_type)
        if media_type in (SCHEMA1, SCHEMA1_SIGNED):  # named by their payload's digest: not an OCI layout's blob
            raise ExportError(f"{image.text}: schema 1 manifests cannot be exported (schema 2 and OCI only)")
        objects[digest] = len(body)
        doc = json.loads(body)
        if media_type in INDEX_TYPES:
            for child in self._select(image, doc.get("manifests") or []):
                await self._gather(image, child["digest"], child.get("mediaType", ""), objects, depth + 1)
            return len(body)
        for descriptor in [doc.get("config"), *(doc.get("layers") or [])]:
            if not isinstance(descriptor, dict) or descriptor.get("urls"):
                continue  # foreign layers live elsewhere
            blob = str(descriptor.get("digest"))
            objects[blob] = await self._blob(image, blob)
        return len(body)

    def _select(self, image: _Image, children: list[Any]) -> list[dict[str, Any]]:
        children = [c for c in children if isinstance(c, dict) and isinstance(c.get("digest"), str)]
        if self.all_platforms:
            return children
        if self.platforms:
            chosen = [c for c in children if any(p.matches(c.get("platform")) for p in self.platforms)]
            if not chosen:
                raise ExportError(f"{image.text}: no manifest for {', '.join(map(str, self.platforms))} "
                                  f"(it has {', '.join(platform_text(c.get('platform')) for c in children)})")
            return chosen
        cached = [c for c in children if self._cached(c["digest"])]
        if cached:
            return cached
        here = Platform.of_host()
        chosen = [c for c in children if here.matches(c.get("platform"))][:1]
        if not chosen:
            raise ExportError(f"{image.text}: none of its platforms is in the store and it has none for this "
                              f"host ({here}): name one with --platform, or use --all-platforms")
        return chosen

    def _cached(self, digest: str) -> bool:
        try:
            return self.metadata.get_manifest(digest) is not None and self.store.exists(parse_digest(digest))
        except ParseError:
            return False

    async def _blob(self, image: _Image, digest: str) -> int:
        try:
            parsed = parse_digest(digest)
        except ParseError:
            raise ExportError(f"{image.text}: invalid digest {digest!r} in a manifest") from None
        size = self.store.size(parsed)
        if size is not None:
            return size
        from ..storage.bypass import FillFailed
        from ..storage.growing import GrowingBlob

        result = await self._from_upstream(image, f"blob {digest}", lambda pull: pull.blob(image.pull_name, parsed))
        try:
            if isinstance(result.source, GrowingBlob):
                async for _ in result.source.chunks():
                    pass
                await result.source.fills.settled()  # the blob is in the store once its fill ended
        except FillFailed as exc:
            raise ExportError(f"{image.text}: fetching blob {digest} from the upstream failed: {exc}") from None
        finally:
            result.source.close()
        size = self.store.size(parsed)
        if size is None:
            raise ExportError(f"{image.text}: blob {digest} did not reach the store")
        return size

    # -- writing --

    def _write(self, output: Path, images: list[_Image], objects: dict[str, int]) -> None:
        if str(output) == "-":  # standard output, as it goes (e.g. into mirror preload - on another host)
            self._write_tar(sys.stdout.buffer, images, objects)
            sys.stdout.buffer.flush()
            return
        output = output.absolute()
        partial = output.with_name(f".{output.name}.{secrets.token_hex(6)}.partial")
        try:
            with open(partial, "wb") as raw:
                with _compressor(output.name, raw) as sink:
                    self._write_tar(sink, images, objects)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, output)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise

    def _write_tar(self, sink: IO[bytes], images: list[_Image], objects: dict[str, int]) -> None:
        """A tar stream (POSIX.1-2001 headers, mtime 0), written as it goes: nothing held in memory."""
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
            tar.copybufsize = CHUNK  # type: ignore[attr-defined]  # (not in typeshed) a MiB at a time
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            tar.addfile(_entry("blobs/", tarfile.DIRTYPE))
            for algorithm in sorted({d.partition(":")[0] for d in objects}):
                tar.addfile(_entry(f"blobs/{algorithm}/", tarfile.DIRTYPE))
            for digest, size in objects.items():
                self._add_object(tar, digest, size)
            _add_bytes(tar, "index.json", _index_json(images))

    def _add_object(self, tar: tarfile.TarFile, digest: str, size: int) -> None:
        parsed = parse_digest(digest)
        with self.store.open_stream(parsed) as source:
            reader = _CheckedReader(source, digest, self.progress)
            tar.addfile(_entry(f"blobs/{parsed.algorithm}/{parsed.hex}", tarfile.REGTYPE, size), reader)
        if reader.hasher.hexdigest() != parsed.hex:
            raise ExportError(f"store object {digest} does not match its digest: run mirror fsck --repair")


class _CheckedReader:
    """A store object as tarfile copies it into the archive: hashed and counted on the way."""

    def __init__(self, source: IO[bytes], digest: str, progress: Progress) -> None:
        self.source = source
        self.digest = digest
        self.hasher = hashlib.new(digest.partition(":")[0])
        self.progress = progress

    def read(self, size: int = -1, /) -> bytes:
        data = self.source.read(size)
        if len(data) < size:  # tarfile asks for no more than the entry's size
            raise ExportError(f"store object {self.digest} is shorter than its size: run mirror fsck")
        self.hasher.update(data)
        self.progress.advance(len(data))
        return data


def _entry(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, 0o755 if kind == tarfile.DIRTYPE else 0o644, 0
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_entry(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))


def _index_json(images: list[_Image]) -> bytes:
    entries = []
    for image in images:
        name = str(image.name)
        entries.append({"mediaType": image.media_type, "digest": image.digest, "size": image.size,
                        "annotations": {REF_NAME: name, CONTAINERD_NAME: name}})
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                      separators=(",", ":")).encode()


@contextlib.contextmanager
def _compressor(filename: str, raw: IO[bytes]) -> Any:
    if filename.endswith((".gz", ".tgz")):
        with gzip.GzipFile(filename, mode="wb", compresslevel=1, mtime=0, fileobj=raw) as sink:  # named, not the temp
            yield sink
    elif filename.endswith((".zst", ".zstd")):
        import zstandard

        with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as sink:
            yield sink
    else:
        yield raw
