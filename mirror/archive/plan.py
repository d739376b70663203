"""Step 1 of a preload, the plan: which images an archive holds, under which names, and which
blobs each needs, every digest, size and reference checked before anything is stored.

Inputs (see ``archive/members.py`` for how they are read safely): OCI image layouts (a directory, or
a tar such as ``skopeo copy ... oci-archive:`` and ``mirror export`` write), ``docker save``
tarballs in the classic layout (``manifest.json``, configs, ``layer.tar`` files) and in the
OCI layout newer Docker writes; any tar gzip- or zstd-compressed.

Names come from ``RepoTags`` or the ``io.containerd.image.name`` /
``org.opencontainers.image.ref.name`` annotations, normalised as Docker does (``spec/names.py``).
An image named ``ubuntu:18.04`` is filed as tag ``18.04`` of ``docker.io/library/ubuntu``;
``ghcr.io/x/y:1`` under ``ghcr.io/x/y``.

Manifests found in the archive are kept byte for byte, so digests are the registry's.
Classic ``docker save`` output has no manifest (and uncompressed layers): one is built (OCI,
config and uncompressed layers as they are), so its digest differs from the upstream's.

Bad input raises :class:`~mirror.archive.members.ArchiveError`.  Reads the store, never writes it.
Imports ``archive``, ``manifest``, ``names``, ``reference`` and ``store`` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..spec.manifest import INDEX_TYPES, MAX_MANIFEST_BYTES, OCI_MANIFEST, SCHEMA1, SCHEMA1_SIGNED, detect_media_type
from ..spec.names import ImageName, InvalidImageName, parse_image_name
from ..spec.pushed import subject_digest
from ..spec.reference import Digest, ParseError, parse_digest
from ..storage.driver import BlobStore
from .members import Archive, ArchiveError, ContentMismatch, Member, MissingContent, blob_name_digest, clean_name

MAX_JSON_BYTES = 16 << 20
MAX_DEPTH = 4
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


@dataclass
class Image:
    digest: str
    media_type: str
    names: list[ImageName]
    where: str                                                  # for messages
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # digest -> (type, body)
    blobs: dict[str, int] = field(default_factory=dict)         # digest -> size (configs, layers)


class Content:
    """Blobs by digest: from the store if it has them, else from the archive."""

    def __init__(self, archive: Archive, store: BlobStore) -> None:
        self.archive = archive
        self.store = store
        #: digest -> entry name, for archives that do not file blobs under blobs/<alg>/<hex>.
        self.locations: dict[str, str] = {}

    def location(self, digest: str) -> str:
        found = self.locations.get(digest)
        if found is not None:
            return found
        algorithm, _, hexdigest = digest.partition(":")
        return f"blobs/{algorithm}/{hexdigest}"

    def stored_size(self, digest: str) -> int | None:
        return self.store.size(parse_digest(digest))

    def member(self, digest: str) -> Member | None:
        return self.archive.member(self.location(digest))

    def available(self, digest: str) -> bool:
        return self.stored_size(digest) is not None or self.member(digest) is not None

    def manifest(self, digest: str, size: int | None, where: str) -> bytes:
        parsed = parse_digest(digest)
        body = self.store.read_bytes(parsed)
        if body is None:
            member = self.member(digest)
            if member is None:
                raise MissingContent(where, f"manifest {digest} is not in the archive")
            body = self.archive.read(member.name, MAX_MANIFEST_BYTES)
            if Digest.of(body, parsed.algorithm) != parsed:
                raise ContentMismatch(member.name, f"content does not match its digest {digest} "
                                                   f"(got {Digest.of(body, parsed.algorithm)})")
        if size is not None and size != len(body):
            raise ContentMismatch(self.location(digest), f"manifest is {len(body)} bytes, its descriptor says {size}")
        return body


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArchiveError(where, f"not valid JSON: {exc}") from None


def _descriptor(value: Any, where: str) -> tuple[str, str, int, dict[str, Any]]:
    """(media type, digest, size, the whole descriptor) of a checked descriptor."""
    if not isinstance(value, dict):
        raise ArchiveError(where, "descriptor is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ArchiveError(where, f"invalid descriptor {json.dumps(value)[:200]}")
    try:
        digest = str(parse_digest(digest if isinstance(digest, str) else ""))
    except ParseError:
        raise ArchiveError(where, f"invalid digest {digest!r} in descriptor") from None
    return media_type, digest, size, value


def _foreign(descriptor: dict[str, Any]) -> bool:
    """Layers the registry never holds (Windows base layers): fetched from their URLs."""
    media_type = str(descriptor.get("mediaType", ""))
    return bool(descriptor.get("urls")) or "foreign" in media_type or "nondistributable" in media_type


# -- step 1: plan --


def _walk(content: Content, image: Image, digest: str, media_type: str, size: int | None,
          where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ArchiveError(where, f"indexes nested more than {MAX_DEPTH} deep")
    if digest in image.manifests:
        return
    body = content.manifest(digest, size, where)
    entry = content.location(digest)
    media_type = detect_media_type(body, media_type)
    if media_type in (SCHEMA1, SCHEMA1_SIGNED):
        raise ArchiveError(entry, "schema 1 manifests are not supported")
    doc = _json(body, entry)
    if not isinstance(doc, dict):
        raise ArchiveError(entry, "a manifest must be a JSON object")
    image.manifests[digest] = (media_type, body)
    if media_type in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ArchiveError(entry, "an index needs a manifests list")
        present = 0
        for child in children:
            child_type, child_digest, child_size, _ = _descriptor(child, entry)
            if not content.available(child_digest):
                continue  # a partial export: only some platforms were included
            _walk(content, image, child_digest, child_type, child_size, entry, depth + 1)
            present += 1
        if children and not present:
            raise MissingContent(entry, f"index {digest} has none of its {len(children)} manifests in the archive")
        return
    config = doc.get("config")
    layers = doc.get("layers", [])
    if not isinstance(layers, list):
        raise ArchiveError(entry, "layers must be a list")
    for kind, value in [("config", config), *(("layer", layer) for layer in layers)]:
        _, blob, blob_size, descriptor = _descriptor(value, entry)
        stored = content.stored_size(blob)
        if stored is None:
            member = content.member(blob)
            if member is None:
                if kind == "layer" and _foreign(descriptor):
                    continue
                raise MissingContent(entry, f"manifest {digest} names {kind} {blob}, which is not in the archive")
            if member.size != blob_size:
                raise ContentMismatch(member.name, f"is {member.size} bytes, manifest {digest} says {blob_size}")
        image.blobs[blob] = blob_size


def _oci_names(annotations: Any, where: str) -> list[ImageName]:
    if not isinstance(annotations, dict):
        return []
    full, ref = annotations.get(CONTAINERD_NAME), annotations.get(REF_NAME)
    try:
        if isinstance(full, str) and full:
            return [parse_image_name(full)]
        if isinstance(ref, str) and ref:
            if not any(c in ref for c in "/:@"):
                raise ArchiveError(where, f"image is named only by the tag {ref!r} ({REF_NAME}), with no repository: "
                                          "write the archive with a full name, e.g. oci-archive:FILE:alpine:3.20")
            return [parse_image_name(ref)]
    except InvalidImageName as exc:
        raise ArchiveError(where, f"invalid image name {exc}") from None
    return []


def _oci_images(archive: Archive, content: Content, warnings: list[str]) -> list[Image]:
    layout = archive.member("oci-layout")
    if layout is not None:
        doc = _json(archive.read("oci-layout", 64 << 10), "oci-layout")
        if not isinstance(doc, dict) or not str(doc.get("imageLayoutVersion", "")).startswith("1."):
            raise ArchiveError("oci-layout", "unsupported image layout version")
    index = _json(archive.read("index.json", MAX_JSON_BYTES), "index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise ArchiveError("index.json", "needs a manifests list")
    images: dict[str, Image] = {}
    unnamed: list[tuple[str, str, str, int | None]] = []
    for i, entry in enumerate(entries):
        where = f"index.json manifests[{i}]"
        media_type, digest, size, descriptor = _descriptor(entry, where)
        names = _oci_names(descriptor.get("annotations"), where)
        if not names:
            unnamed.append((where, media_type, digest, size))
            continue
        for name in names:
            if name.digest is not None and name.digest != digest:
                raise ArchiveError(where, f"name {name} does not match the descriptor's digest {digest}")
        image = images.get(digest)
        if image is None:
            image = images[digest] = Image(digest, media_type, [], where)
            _walk(content, image, digest, media_type, size, where)
            image.media_type = image.manifests[digest][0]
        image.names += [n for n in names if n not in image.names]
    return list(images.values()) + _referrers(content, list(images.values()), unnamed, warnings)


def _referrers(content: Content, named: list[Image], unnamed: list[tuple[str, str, str, int | None]],
               warnings: list[str]) -> list[Image]:
    """The layout's manifests without a name whose ``subject`` is a manifest of a named image (a signature,
    an SBOM: OCI image-spec, "Image Layout", lists referrers so), each loaded by digest into that image's
    repositories, where the referrers API finds it; any other unnamed one is skipped with a warning."""
    found: list[Image] = []
    for where, media_type, digest, size in unnamed:
        image = Image(digest, media_type, [], where)
        try:
            if content.available(digest):
                _walk(content, image, digest, media_type, size, where)
        except ArchiveError as exc:  # as for any unnamed manifest: not what was asked for
            warnings.append(f"{where}: image {digest} has no name and cannot be loaded ({exc}): skipped")
            continue
        subject = subject_digest(image.manifests[digest][1]) if digest in image.manifests else None
        owner = next((i for i in named if subject is not None and subject in i.manifests), None)
        if owner is None:
            warnings.append(f"{where}: image {digest} has no name: skipped")
            continue
        image.media_type = image.manifests[digest][0]
        for name in owner.names:
            by_digest = ImageName(name.registry, name.name, None, digest, name.written, name.as_written)
            image.names += [by_digest] if by_digest not in image.names else []
        found.append(image)
    return found


def _digest_in_name(name: str) -> str | None:
    """The digest an entry's name gives (``blobs/sha256/<hex>``, or ``<hex>.json`` of docker save)."""
    found = blob_name_digest(name)
    if found is not None:
        return found
    stem = name.removesuffix(".json")
    if stem != name and "/" not in stem:
        try:
            return str(parse_digest(f"sha256:{stem}"))
        except ParseError:
            return None
    return None


def _docker_save_images(archive: Archive, content: Content, warnings: list[str]) -> list[Image]:
    doc = _json(archive.read("manifest.json", MAX_JSON_BYTES), "manifest.json")
    if not isinstance(doc, list):
        raise ArchiveError("manifest.json", "must be a list of images")
    images: list[Image] = []
    for i, entry in enumerate(doc):
        where = f"manifest.json[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                or not isinstance(entry.get("Layers"), list) or not all(isinstance(x, str) for x in entry["Layers"]):
            raise ArchiveError(where, "needs Config and Layers")
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ArchiveError(where, "RepoTags must be a list of names")
        if not tags:
            warnings.append(f"{where}: image {entry['Config']} has no RepoTags: skipped")
            continue
        try:
            names = [parse_image_name(t) for t in tags]
        except InvalidImageName as exc:
            raise ArchiveError(where, f"invalid RepoTags entry {exc}") from None
        config_name = clean_name(entry["Config"])
        if archive.member(config_name) is None:
            raise MissingContent(where, f"names config {config_name}, which is not in the archive")
        config = archive.read(config_name, MAX_MANIFEST_BYTES)
        config_digest = str(Digest.of(config))
        named = _digest_in_name(config_name)
        if named is not None and named != config_digest:
            raise ContentMismatch(config_name, f"content does not match its digest (got {config_digest})")
        config_doc = _json(config, config_name)
        rootfs = config_doc.get("rootfs") if isinstance(config_doc, dict) else None
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(entry["Layers"]):
            raise ArchiveError(config_name, f"rootfs.diff_ids does not list the {len(entry['Layers'])} layers "
                                            f"of {where}")
        content.locations[config_digest] = config_name
        layers: list[tuple[str, int]] = []
        for layer_name, diff_id in zip(entry["Layers"], diff_ids, strict=True):
            layer_name = clean_name(layer_name)
            try:
                diff_id = str(parse_digest(diff_id if isinstance(diff_id, str) else ""))
            except ParseError:
                raise ArchiveError(config_name, f"invalid diff_id {diff_id!r}") from None
            stored = content.stored_size(diff_id)
            member = archive.member(layer_name)
            if member is None and stored is None:
                raise MissingContent(where, f"names layer {layer_name}, which is not in the archive")
            content.locations[diff_id] = layer_name
            layers.append((diff_id, stored if stored is not None else member.size))  # type: ignore[union-attr]
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_TAR, "digest": d, "size": n} for d, n in layers],
        }, separators=(",", ":")).encode()
        digest = str(Digest.of(manifest))
        image = Image(digest, OCI_MANIFEST, names, where, {digest: (OCI_MANIFEST, manifest)},
                       {config_digest: len(config), **dict(layers)})
        images.append(image)
    return images


def plan(archive: Archive, store: BlobStore, warnings: list[str]) -> tuple[list[Image], Content]:
    """Read what the archive holds; check names, manifests and that every blob is there."""
    content = Content(archive, store)
    if archive.member("index.json") is not None:
        images = _oci_images(archive, content, warnings)
    elif archive.member("manifest.json") is not None:
        images = _docker_save_images(archive, content, warnings)
    else:
        raise ArchiveError(None, "not an image archive: it has neither index.json (OCI layout) "
                                 "nor manifest.json (docker save)")
    if not images:
        raise ArchiveError(None, "no named image in the archive")
    owner: dict[tuple[str, str], str] = {}
    for image in images:
        for name in image.names:
            if name.tag is None:
                continue
            other = owner.setdefault((name.repo, name.tag), image.digest)
            if other != image.digest:
                raise ArchiveError(image.where, f"{name.repo}:{name.tag} is given to two images, {other} "
                                                f"and {image.digest}")
    return images, content
