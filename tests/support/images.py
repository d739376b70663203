"""Build container images (OCI or Docker schema 2) as files on disk.

Layers are written by streaming a tar archive through SHA-256 hashers (and
gzip) straight into a file, so a 256 MiB layer never sits in memory.  Every
JSON document (config, manifest, index) is serialised exactly once; its
digest is the SHA-256 of those very bytes, which the tests then compare
byte-for-byte with what registries and the mirror serve.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os as _os
import random
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

#: Every manifest media type, e.g. for an ``Accept`` header.
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

Media = Literal["oci", "docker"]

#: Fixed timestamp for tar entries and configs, so builds are reproducible.
EPOCH = 946684800  # 2000-01-01T00:00:00Z
EPOCH_ISO = "2000-01-01T00:00:00Z"
CHUNK = 1024 * 1024
BUSYBOX = Path("/bin/busybox")
DEFAULT_APPLETS = ("sh", "echo", "cat", "ls", "sleep", "true", "wc", "sha256sum")
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    with path.open("rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def dump_json(document: Mapping[str, Any]) -> bytes:
    """Serialise a JSON document once, compactly, as the bytes to publish."""
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Layer:
    """A layer blob on disk: ``digest`` hashes the file, ``diff_id`` the tar."""

    path: Path
    digest: str
    diff_id: str
    size: int
    compressed: bool

    def media_type(self, media: Media) -> str:
        """The layer media type to use in an OCI or Docker manifest."""
        if media == "oci":
            return OCI_LAYER_GZIP if self.compressed else OCI_LAYER_TAR
        return DOCKER_LAYER_GZIP if self.compressed else DOCKER_LAYER_TAR


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest and config bytes, blobs as files."""

    manifest: bytes
    media_type: str
    digest: str
    config: bytes
    config_digest: str
    layers: tuple[Layer, ...]
    blobs: dict[str, Path]
    architecture: str
    os: str
    variant: str | None = None

    @property
    def size(self) -> int:
        """Length of the manifest in bytes."""
        return len(self.manifest)

    @property
    def platform(self) -> dict[str, str]:
        """The platform object used for this image in an index."""
        platform = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            platform["variant"] = self.variant
        return platform

    def descriptor(self) -> dict[str, Any]:
        """An OCI descriptor of the manifest (media type, digest, size)."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    @property
    def manifests(self) -> dict[str, tuple[str, bytes]]:
        """Every manifest of this image by digest: ``{digest: (type, bytes)}``."""
        return {self.digest: (self.media_type, self.manifest)}


@dataclass(frozen=True)
class Index:
    """A multi-platform index (OCI) or manifest list (Docker) and its children."""

    manifest: bytes
    media_type: str
    digest: str
    children: tuple[Image, ...]
    blobs: dict[str, Path] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Length of the index document in bytes."""
        return len(self.manifest)

    def descriptor(self) -> dict[str, Any]:
        """An OCI descriptor of the index document."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    @property
    def manifests(self) -> dict[str, tuple[str, bytes]]:
        """The index and every child manifest: ``{digest: (type, bytes)}``."""
        found = {self.digest: (self.media_type, self.manifest)}
        for child in self.children:
            found.update(child.manifests)
        return found

    def child(self, architecture: str) -> Image:
        """The child image for *architecture* (first match)."""
        for image in self.children:
            if image.architecture == architecture:
                return image
        raise KeyError(architecture)


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts bytes, then passes them on."""

    def __init__(self, sink: IO[bytes] | io.RawIOBase | gzip.GzipFile | None) -> None:
        super().__init__()
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += len(view)
        if self.sink is not None:
            self.sink.write(view)
        return len(view)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class RandomReader(io.RawIOBase):
    """A readable stream of *size* deterministic, incompressible bytes.

    Bytes are produced 1 MiB at a time from ``random.Random(seed)``, so any
    size can be streamed with constant memory.
    """

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        self._left = size
        self._rng = random.Random(seed)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill *buffer* completely unless the stream ends (tarfile needs that)."""
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if not self._buffer:
                if self._left == 0:
                    break
                count = min(CHUNK, self._left)
                self._buffer = memoryview(self._rng.randbytes(count))
                self._left -= count
            count = min(len(target) - filled, len(self._buffer))
            target[filled:filled + count] = self._buffer[:count]
            self._buffer = self._buffer[count:]
            filled += count
        return filled


#: One tar entry: its header, and a reader for the content of regular files.
TarEntry = tuple[tarfile.TarInfo, IO[bytes] | io.RawIOBase | None]


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, size: int = 0,
             linkname: str = "") -> tarfile.TarInfo:
    """A reproducible tar header (root-owned, fixed mtime)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_layer(path: Path, entries: Iterable[TarEntry], *, compressed: bool = True) -> Layer:
    """Stream *entries* into a tar (gzip-compressed if *compressed*) at *path*.

    The diff_id (SHA-256 of the tar) and the digest (SHA-256 of the file) are
    computed on the way, so the layer is never held in memory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        file_hasher = _HashingWriter(out)
        compressor = (
            gzip.GzipFile(fileobj=file_hasher, mode="wb", compresslevel=1, mtime=0)
            if compressed else None
        )
        tar_hasher = _HashingWriter(compressor) if compressor is not None else file_hasher
        with tarfile.open(fileobj=tar_hasher, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for info, reader in entries:
                tar.addfile(info, reader)
        if compressor is not None:
            compressor.close()
    return Layer(
        path=path,
        digest=file_hasher.digest,
        diff_id=tar_hasher.digest,
        size=file_hasher.size,
        compressed=compressed,
    )


def _busybox_entries(applets: Sequence[str], marker: str | None) -> Iterator[TarEntry]:
    yield tar_info("bin", tarfile.DIRTYPE, mode=0o755), None
    yield tar_info("etc", tarfile.DIRTYPE, mode=0o755), None
    yield tar_info("tmp", tarfile.DIRTYPE, mode=0o1777), None
    with BUSYBOX.open("rb") as binary:
        size = _os.fstat(binary.fileno()).st_size
        yield tar_info("bin/busybox", mode=0o755, size=size), binary
    for applet in applets:
        yield tar_info(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777, linkname="busybox"), None
    if marker is not None:
        data = marker.encode()
        yield tar_info("etc/image-marker", size=len(data)), io.BytesIO(data)


def busybox_layer(
    dir: Path,
    *,
    marker: str | None = None,
    applets: Sequence[str] = DEFAULT_APPLETS,
    compressed: bool = True,
) -> Layer:
    """A base layer with ``/bin/busybox`` and applet symlinks (``sh``, ``echo``...).

    Enough for ``docker run IMAGE echo hi``.  A *marker* adds
    ``etc/image-marker`` with that text, giving the layer a distinct digest.
    """
    suffix = ".tar.gz" if compressed else ".tar"
    tag = hashlib.sha256((marker or "").encode()).hexdigest()[:12] if marker else "plain"
    path = dir / f"busybox-{tag}{suffix}"
    return write_layer(path, _busybox_entries(applets, marker), compressed=compressed)


def random_layer(dir: Path, size_bytes: int, seed: int, *, compressed: bool = True) -> Layer:
    """A layer holding one file of *size_bytes* incompressible bytes from *seed*."""
    suffix = ".tar.gz" if compressed else ".tar"
    path = dir / f"random-{seed}-{size_bytes}{suffix}"
    entry = tar_info(f"random-{seed}.bin", size=size_bytes), RandomReader(size_bytes, seed)
    return write_layer(path, [entry], compressed=compressed)


def build_image(
    dir: Path,
    layers: Sequence[Layer],
    arch: str = "amd64",
    os: str = "linux",
    media: Media = "oci",
    cmd: Sequence[str] = ("sh",),
    *,
    variant: str | None = None,
    env: Sequence[str] = DEFAULT_ENV,
    settings: Mapping[str, Any] | None = None,
    history: Sequence[str] | None = None,
) -> Image:
    """Write the config blob for *layers* into *dir* and build the manifest.

    *settings* go into the config's ``config`` beside ``Cmd`` and ``Env`` (``Labels``,
    ``Entrypoint``, ``ExposedPorts``...); *history* is each layer's ``created_by``.
    """
    steps = list(history) if history is not None else ["tests.support.images"] * len(layers)
    config_doc: dict[str, Any] = {
        "architecture": arch,
        "os": os,
        "created": EPOCH_ISO,
        "config": {"Cmd": list(cmd), "Env": list(env), **(settings or {})},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": EPOCH_ISO, "created_by": step} for step in steps],
    }
    if variant:
        config_doc["variant"] = variant
    config = dump_json(config_doc)
    config_digest = sha256_digest(config)
    dir.mkdir(parents=True, exist_ok=True)
    config_path = dir / f"config-{config_digest.removeprefix('sha256:')}.json"
    config_path.write_bytes(config)

    manifest_type = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
    config_type = OCI_CONFIG if media == "oci" else DOCKER_CONFIG
    manifest = dump_json({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
        "layers": [
            {"mediaType": layer.media_type(media), "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    })
    blobs = {layer.digest: layer.path for layer in layers}
    blobs[config_digest] = config_path
    return Image(
        manifest=manifest,
        media_type=manifest_type,
        digest=sha256_digest(manifest),
        config=config,
        config_digest=config_digest,
        layers=tuple(layers),
        blobs=blobs,
        architecture=arch,
        os=os,
        variant=variant,
    )


def build_index(images: Sequence[Image], media: Media = "oci") -> Index:
    """An OCI image index or a Docker manifest list over *images*."""
    if media == "docker" and any(image.media_type != DOCKER_MANIFEST for image in images):
        raise ValueError("a Docker manifest list needs Docker schema 2 children")
    index_type = OCI_INDEX if media == "oci" else DOCKER_LIST
    document = dump_json({
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [{**image.descriptor(), "platform": image.platform} for image in images],
    })
    blobs: dict[str, Path] = {}
    for image in images:
        blobs.update(image.blobs)
    return Index(
        manifest=document,
        media_type=index_type,
        digest=sha256_digest(document),
        children=tuple(images),
        blobs=blobs,
    )


def _place_blob(blobs_dir: Path, digest: str, source: Path | bytes) -> None:
    target = blobs_dir / digest.removeprefix("sha256:")
    if target.exists():
        return
    if isinstance(source, bytes):
        target.write_bytes(source)
        return
    try:
        _os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_oci_layout(dir: Path, image_or_index: Image | Index, tag: str) -> str:
    """Write (or add to) an OCI image layout in *dir*, tagging the image *tag*.

    Blobs are hard-linked to the built files where possible, so do not
    modify layout blobs in place (replace them instead).  Returns the skopeo
    reference ``oci:DIR:TAG``.
    """
    blobs_dir = dir / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for digest, path in image_or_index.blobs.items():
        _place_blob(blobs_dir, digest, path)
    for digest, (_, manifest) in image_or_index.manifests.items():
        _place_blob(blobs_dir, digest, manifest)

    ref_key = "org.opencontainers.image.ref.name"
    index_path = dir / "index.json"
    entries: list[dict[str, Any]] = []
    if index_path.exists():
        entries = json.loads(index_path.read_bytes()).get("manifests", [])
    entries = [e for e in entries if e.get("annotations", {}).get(ref_key) != tag]
    entries.append({**image_or_index.descriptor(), "annotations": {ref_key: tag}})
    index_path.write_bytes(dump_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
    return f"oci:{dir}:{tag}"
