"""Manifest media types and the little the mirror needs to read inside a manifest.

Manifests are stored and served byte-for-byte; this module only looks into them to find the
descriptors they reference (so a repository may serve those blobs), for clients that do
not accept image indexes, the platform manifest to answer with, and to check that an
upstream's answer is a manifest at all (:func:`checked_manifest`) and what its registry
digest is (:func:`registry_digest`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import schema1
from .reference import DIGEST_RE, Digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
#: Layers a registry need not hold (OCI image-spec, "Non-distributable layers"; Docker's "foreign"
#: layers, e.g. Windows base layers): clients fetch them from the descriptor's ``urls``.
NONDISTRIBUTABLE_PREFIX = "application/vnd.oci.image.layer.nondistributable."
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def is_nondistributable(media_type: str) -> bool:
    """A layer media type the registry need not hold (non-distributable or foreign)."""
    return media_type.startswith(NONDISTRIBUTABLE_PREFIX) or media_type == DOCKER_FOREIGN_LAYER

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_MEDIA_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, SCHEMA1_SIGNED, SCHEMA1)
#: The largest manifest the mirror reads (distribution's limit); larger is not a manifest.
MAX_MANIFEST_BYTES = 4 << 20
#: What old registries (early distribution releases) label manifests with.
PLAIN_JSON = "application/json"


class InvalidManifest(ValueError):
    """An answer that is not the manifest it claims to be; the message says what is wrong."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None
    #: Where a non-distributable layer can be downloaded (the descriptor's ``urls``, strings only).
    urls: tuple[str, ...] = ()


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def detect_media_type(body: bytes, announced: str) -> str:
    """The announced ``Content-Type`` if it is a manifest type, else what the body says."""
    if announced in MANIFEST_MEDIA_TYPES:
        return announced
    doc = _json(body)
    if doc is None:
        return announced or "application/octet-stream"
    if isinstance(doc.get("mediaType"), str):
        return str(doc["mediaType"])
    if doc.get("schemaVersion") == 1:
        return SCHEMA1_SIGNED if "signatures" in doc else SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    return announced or "application/octet-stream"


def _descriptor(entry: Any) -> Descriptor | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
        return None
    size = entry.get("size")
    platform = entry.get("platform")
    urls = entry.get("urls")
    return Descriptor(
        media_type=str(entry.get("mediaType", "")),
        digest=entry["digest"],
        size=size if isinstance(size, int) else -1,
        platform=platform if isinstance(platform, dict) else None,
        urls=tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
    )


def references(body: bytes, *, subject: bool = True) -> list[Descriptor]:
    """Every descriptor a manifest points to: child manifests, config, layers, and (with *subject*) the
    subject, which a pull of a referrer does not need and which may be absent (distribution-spec,
    "Pushing Manifests with Subject")."""
    doc = _json(body)
    if doc is None:
        return []
    found: list[Descriptor] = []
    for key in ("manifests", "layers", "blobs"):
        entries = doc.get(key)
        if isinstance(entries, list):
            found.extend(d for d in map(_descriptor, entries) if d is not None)
    for key in ("config", "subject") if subject else ("config",):
        d = _descriptor(doc.get(key))
        if d is not None:
            found.append(d)
    fs_layers = doc.get("fsLayers")  # schema 1
    if isinstance(fs_layers, list):
        for entry in fs_layers:
            if isinstance(entry, dict) and isinstance(entry.get("blobSum"), str):
                found.append(Descriptor("", entry["blobSum"], -1))
    return found


def platform_manifest(body: bytes, os_name: str = "linux", architecture: str = "amd64") -> Descriptor | None:
    """In an index, the first manifest for ``os_name/architecture`` (what old clients get)."""
    for d in references(body):
        if d.platform and d.platform.get("os") == os_name and d.platform.get("architecture") == architecture:
            return d
    return None


def child_for_old_client(body: bytes, accept: set[str]) -> Descriptor | str:
    """The manifest of the index *body* a client that takes no index gets (its ``Accept`` media types
    *accept*): the first ``linux/amd64`` one, as registries answer old clients, if the client takes its
    media type; else why none (a ``404 MANIFEST_UNKNOWN`` detail, as distribution answers a client
    that takes neither an OCI index nor what it holds)."""
    child = platform_manifest(body)
    if child is None:
        return "no linux/amd64 manifest for a client without index support"
    if child.media_type not in accept:
        return (f"the index's linux/amd64 manifest is a {child.media_type}, which the Accept header "
                "does not take (nor the index)")
    return child


def accepted(accept_header: str | None) -> set[str]:
    """Media types named by an ``Accept`` header (parameters and q-values dropped)."""
    if not accept_header:
        return set()
    return {part.split(";")[0].strip() for part in accept_header.split(",") if part.strip()}


def checked_manifest(body: bytes, content_type: str) -> str:
    """The media type of *body*, received as a manifest with *content_type*, once it is checked.

    The Content-Type must be a manifest media type, or ``application/json`` (then the body says
    which); the body a JSON object of that kind: ``schemaVersion`` 2 with the descriptors its
    type has (``manifests``, or ``config`` and ``layers``) and no other ``mediaType``, or
    ``schemaVersion`` 1 with ``fsLayers`` (signed: with signatures that cut out its payload,
    see ``schema1.py``).  Raises :class:`InvalidManifest` naming what is wrong.

    The rule for ``mediaType`` is the OCI distribution spec's (a manifest's ``mediaType``, when
    present, matches the Content-Type it is served with); ``application/json`` is what
    early distribution releases labelled schema 1 with.
    """
    media_type = content_type.split(";")[0].strip().lower()
    if media_type not in MANIFEST_MEDIA_TYPES and media_type != PLAIN_JSON:
        raise InvalidManifest(f"Content-Type {media_type or '(none)'!r} is not a manifest media type")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise InvalidManifest(f"the body sent as {media_type} is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidManifest(f"the body sent as {media_type} is not a JSON object")
    if media_type == PLAIN_JSON:
        media_type = detect_media_type(body, media_type)
        if media_type not in MANIFEST_MEDIA_TYPES:
            raise InvalidManifest("the body sent as application/json is not a manifest")
    in_body = doc.get("mediaType")
    if in_body is not None and in_body != media_type:
        raise InvalidManifest(f"sent as {media_type} but its mediaType is {in_body!r}")
    version = 1 if media_type in (SCHEMA1, SCHEMA1_SIGNED) else 2
    if doc.get("schemaVersion") != version or isinstance(doc.get("schemaVersion"), bool):
        raise InvalidManifest(f"a {media_type} manifest needs schemaVersion {version}, "
                              f"not {doc.get('schemaVersion')!r}")
    if version == 1:
        _check_entries(doc, "fsLayers", "blobSum")
        if media_type == SCHEMA1_SIGNED:
            try:
                schema1.payload(body)
            except schema1.Schema1Error as exc:
                raise InvalidManifest(f"a signed schema 1 manifest: {exc}") from None
    elif media_type in INDEX_TYPES:
        _check_entries(doc, "manifests", "digest")
    else:
        _check_entries({"config": [doc.get("config")]}, "config", "digest")
        _check_entries(doc, "layers", "digest")
    return media_type


def _check_entries(doc: dict[str, Any], key: str, digest_key: str) -> None:
    entries = doc.get(key)
    if not isinstance(entries, list):
        raise InvalidManifest(f"{key} is not a list")
    for entry in entries:
        value = entry.get(digest_key) if isinstance(entry, dict) else None
        if not isinstance(value, str) or not DIGEST_RE.fullmatch(value):
            raise InvalidManifest(f"an entry of {key} has no valid {digest_key}")


def registry_digest(body: bytes, media_type: str, algorithm: str = "sha256") -> Digest:
    """The digest registries name a manifest by: of its bytes, except a signed schema 1 manifest,
    named by its payload (``schema1.py``).  Raises :class:`InvalidManifest` if that cannot be cut."""
    if media_type != SCHEMA1_SIGNED:
        return Digest.of(body, algorithm)
    try:
        return schema1.digest(body, algorithm)
    except schema1.Schema1Error as exc:
        raise InvalidManifest(f"a signed schema 1 manifest: {exc}") from None
