"""Image archives as files, for ``mirror preload``: OCI archives, ``docker save`` layouts, bad tars.

* :func:`pack` -- a directory (an OCI layout) as a tar, plain, gzip or zstd.
* :func:`docker_save` -- the classic ``docker save`` layout (dockerd 20.10 and older):
  ``<config hex>.json``, ``<id>/layer.tar`` (a symlink for a layer seen before),
  ``manifest.json``, ``repositories``.
* :func:`docker_save_oci` -- the OCI form newer Docker writes: an OCI layout whose
  ``index.json`` names images by ``io.containerd.image.name`` (ref.name is the tag only),
  plus ``manifest.json`` and legacy ``<id>/layer.tar`` symlinks into ``blobs/``.
* :func:`write_tar` -- any entries, including the unsafe ones a bad archive has.

Layers of docker-save archives must be uncompressed (``compressed=False``), as Docker's are.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .images import EPOCH, Image, dump_json

#: One entry: its header, and its content (bytes, a file, or None for links/dirs/devices).
Entry = tuple[tarfile.TarInfo, bytes | Path | None]


def info(name: str, kind: bytes = tarfile.REGTYPE, *, size: int = 0, linkname: str = "",
         mode: int = 0o644) -> tarfile.TarInfo:
    header = tarfile.TarInfo(name)
    header.type, header.size, header.linkname, header.mode, header.mtime = kind, size, linkname, mode, EPOCH
    return header


def file_entry(name: str, content: bytes | Path) -> Entry:
    size = len(content) if isinstance(content, bytes) else content.stat().st_size
    return info(name, size=size), content


def write_tar(path: Path, entries: Iterable[Entry]) -> Path:
    """A plain tar of *entries*, in order, exactly as given (duplicates and unsafe names included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for header, content in entries:
            if isinstance(content, bytes):
                tar.addfile(header, io.BytesIO(content))
            elif isinstance(content, Path):
                with content.open("rb") as f:
                    tar.addfile(header, f)
            else:
                tar.addfile(header)
    return path


def layout_entries(layout: Path) -> list[Entry]:
    """The files of an OCI layout directory as entries (``oci-layout``, ``index.json``, blobs)."""
    entries: list[Entry] = [(info("blobs", tarfile.DIRTYPE, mode=0o755), None),
                            (info("blobs/sha256", tarfile.DIRTYPE, mode=0o755), None)]
    for blob in sorted((layout / "blobs" / "sha256").iterdir()):
        entries.append(file_entry(f"blobs/sha256/{blob.name}", blob))
    entries.append(file_entry("oci-layout", (layout / "oci-layout").read_bytes()))
    entries.append(file_entry("index.json", (layout / "index.json").read_bytes()))
    return entries


def compress(path: Path, how: str | None) -> Path:
    """*path* compressed with gzip or zstd (a new file beside it), or *path* itself."""
    if how is None:
        return path
    if how == "gzip":
        out = path.with_name(path.name + ".gz")
        with path.open("rb") as src, gzip.open(out, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return out
    if how == "zstd":
        out = path.with_name(path.name + ".zst")
        subprocess.run(["zstd", "-q", "-f", "-o", str(out), str(path)], check=True)
        return out
    raise ValueError(how)


def pack(layout: Path, out: Path, how: str | None = None) -> Path:
    """An OCI layout directory as a tar (``skopeo copy ... oci-archive:`` writes the same)."""
    return compress(write_tar(out, layout_entries(layout)), how)


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def docker_save(out: Path, images: Sequence[tuple[Image, Sequence[str] | None]]) -> Path:
    """The classic ``docker save`` layout of *images*, each with its RepoTags (None: untagged)."""
    entries: list[Entry] = []
    manifest = []
    seen: dict[str, str] = {}  # diff_id -> the layer.tar entry holding it
    repositories: dict[str, dict[str, str]] = {}
    for image, tags in images:
        assert all(not layer.compressed for layer in image.layers), "docker save layers are uncompressed"
        entries.append(file_entry(f"{_hex(image.config_digest)}.json", image.config))
        layer_names = []
        parent = ""
        for layer in image.layers:
            # Per-image ids, so a layer another image already holds becomes a symlink (as Docker writes it).
            layer_id = hashlib.sha256(f"{image.config_digest}{parent}{layer.diff_id}".encode()).hexdigest()
            parent = layer_id
            name = f"{layer_id}/layer.tar"
            entries.append((info(layer_id, tarfile.DIRTYPE, mode=0o755), None))
            entries.append(file_entry(f"{layer_id}/VERSION", b"1.0"))
            entries.append(file_entry(f"{layer_id}/json", dump_json({"id": layer_id})))
            if layer.diff_id in seen:
                entries.append((info(name, tarfile.SYMTYPE, linkname=f"../{seen[layer.diff_id]}"), None))
            else:
                entries.append(file_entry(name, layer.path))
                seen[layer.diff_id] = name
            layer_names.append(name)
        manifest.append({"Config": f"{_hex(image.config_digest)}.json", "RepoTags": list(tags) if tags else None,
                         "Layers": layer_names})
        for tag in tags or []:
            repo, _, version = tag.rpartition(":")
            repositories.setdefault(repo, {})[version] = parent
    entries.append(file_entry("manifest.json", json.dumps(manifest).encode()))
    entries.append(file_entry("repositories", json.dumps(repositories).encode()))
    return write_tar(out, entries)


def docker_save_oci(out: Path, image: Image, names: Sequence[str]) -> Path:
    """What newer Docker's ``docker save`` writes: an OCI layout plus ``manifest.json``.

    *names* are full names (``docker.io/library/app:1``); ref.name gets only the tag.
    """
    blobs = {**{digest: path for digest, path in image.blobs.items()}, image.digest: image.manifest}
    entries: list[Entry] = [(info("blobs", tarfile.DIRTYPE, mode=0o755), None),
                            (info("blobs/sha256", tarfile.DIRTYPE, mode=0o755), None)]
    for digest, content in blobs.items():
        entries.append(file_entry(f"blobs/sha256/{_hex(digest)}", content))
    for layer in image.layers:  # legacy directories, as symlinks into blobs/
        entries.append((info(_hex(layer.diff_id), tarfile.DIRTYPE, mode=0o755), None))
        entries.append((info(f"{_hex(layer.diff_id)}/layer.tar", tarfile.SYMTYPE,
                             linkname=f"../blobs/sha256/{_hex(layer.digest)}"), None))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {**image.descriptor(), "annotations": {"io.containerd.image.name": name,
                                               "org.opencontainers.image.ref.name": name.rpartition(":")[2]}}
        for name in names]}
    manifest = [{"Config": f"blobs/sha256/{_hex(image.config_digest)}",
                 "RepoTags": [n.removeprefix("docker.io/library/") for n in names],
                 "Layers": [f"blobs/sha256/{_hex(layer.digest)}" for layer in image.layers]}]
    entries.append(file_entry("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'))
    entries.append(file_entry("index.json", dump_json(index)))
    entries.append(file_entry("manifest.json", json.dumps(manifest).encode()))
    return write_tar(out, entries)
