"""What the web UI shows of a repository's tags and images, read from the store and the index.

Manifests come from the store as the API serves them (a manifest the index does not link to the
repository is not shown); an image's config blob is read when it is at most
:data:`MAX_CONFIG_BYTES`.  Nothing here asks an upstream: what was never pulled shows as not
cached.  What the index says (which manifests a repository serves, its tags) is read apart from
what the store holds (their bytes): a page whose database is slow or locked then waits for it
alone, as the API's requests do (``registry/reads.py``).  The functions that read one or the other
block: the pages run them in a worker thread of its kind.
Shapes follow the OCI image spec ("Image Manifest", "Image Index", "Image Configuration") and
Docker's schema 2, which has the same fields; a schema 1 image's settings are in its history.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from ..metadata.driver import ManifestRecord, Metadata, TagRecord
from ..registry.reads import in_index_thread
from ..spec.manifest import INDEX_TYPES, SCHEMA1, SCHEMA1_SIGNED, Descriptor, references
from ..spec.platforms import platform_text
from ..spec.reference import ParseError, parse_digest
from ..storage.driver import BlobStore
from .listing import LastPulls

#: The largest image config read to show its settings and history.
MAX_CONFIG_BYTES = 4 << 20
#: Tags on one page of a repository.
TAGS_PER_PAGE = 100
#: The config media types of an image (OCI image spec "Image Configuration"; Docker's schema 2).
IMAGE_CONFIG_TYPES = frozenset({"application/vnd.oci.image.config.v1+json",
                                "application/vnd.docker.container.image.v1+json"})


@dataclass(frozen=True)
class HistoryStep:
    created: str
    created_by: str
    comment: str
    empty_layer: bool


@dataclass(frozen=True)
class ImageConfig:
    platform: str
    created: str
    entrypoint: list[str] | None
    cmd: list[str] | None
    env: list[str]
    labels: dict[str, str]
    exposed_ports: list[str]
    workdir: str
    user: str
    history: list[HistoryStep]


@dataclass(frozen=True)
class ManifestView:
    """One stored manifest: an index (``children``) or an image (``config``, ``layers``)."""

    digest: str
    media_type: str
    size: int
    is_index: bool
    children: list[Descriptor] = field(default_factory=list)
    layers: list[Descriptor] = field(default_factory=list)
    config_descriptor: Descriptor | None = None
    config: ImageConfig | None = None
    subject: Descriptor | None = None
    artifact_type: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def image_size(self) -> int | None:
        """Config and layers in bytes (an image's download size); None for an index."""
        if self.is_index:
            return None
        parts = [d.size for d in self.layers] + ([self.config_descriptor.size] if self.config_descriptor else [])
        return None if any(p < 0 for p in parts) else sum(parts)  # schema 1 names no sizes

    @property
    def artifact_config(self) -> bool:
        """Its config is not an image's but an artifact's (OCI image spec 1.1, "Guidelines for
        Artifact Usage": e.g. the empty descriptor, ``application/vnd.oci.empty.v1+json``, ``{}``);
        it has no settings or history to show."""
        return self.config_descriptor is not None and self.config_descriptor.media_type not in IMAGE_CONFIG_TYPES


@dataclass(frozen=True)
class TagRow:
    tag: str
    digest: str
    media_type: str
    #: ``os/arch[/variant]`` of each image (an index's children, or the image's config).
    platforms: list[str]
    #: Bytes to pull (of every platform stored, for an index); None when not known.
    size: int | None
    stored: bool
    last_pulled: float | None
    #: Listed by the upstream and not cached here yet (nothing else is known of it then).
    upstream_only: bool = False


@dataclass(frozen=True)
class TagPage:
    rows: list[TagRow]
    total: int
    number: int
    pages: int
    #: Of *total*, the tags only the upstream lists.
    upstream_only: int = 0
    #: The tag the pull commands name: ``latest`` if there is one, else the first; None without tags.
    pull_tag: str | None = None


def _document(body: bytes | str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        return {}
    return doc if isinstance(doc, dict) else {}


def _strings(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) else None


def linked_records(metadata: Metadata, repo: str, digests: list[str]) -> dict[str, ManifestRecord]:
    """The records of those of *digests* that *repo* (an index key) serves: recorded and linked to it
    (the index only)."""
    found = {}
    for digest in digests:
        try:
            parse_digest(digest)
        except ParseError:
            continue
        record = metadata.get_manifest(digest)
        if record is not None and metadata.is_linked(repo, digest):
            found[digest] = record
    return found


def read_manifest(store: BlobStore, digest: str, record: ManifestRecord | None) -> ManifestView | None:
    """The manifest *digest* as the store holds it, shown as *record* (from :func:`linked_records`)
    describes it; None without a record or when the store no longer holds it (the store only)."""
    if record is None:
        return None
    try:
        body = store.read_bytes(parse_digest(digest))
    except ParseError:
        return None
    if body is None:
        return None
    doc = _document(body)
    found = references(body)
    subject = next((d for d in found if d.digest == (doc.get("subject") or {}).get("digest")), None) \
        if isinstance(doc.get("subject"), dict) else None
    annotations = doc.get("annotations")
    view = ManifestView(
        digest=digest, media_type=record.media_type, size=record.size, is_index=record.media_type in INDEX_TYPES,
        subject=subject, artifact_type=str(doc.get("artifactType") or ""),
        annotations={str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {})
    if view.is_index:
        return _replace(view, children=[d for d in found if d is not subject])
    if record.media_type in (SCHEMA1, SCHEMA1_SIGNED):  # layers top first, sizes and settings not in descriptors
        return _replace(view, layers=[_sized(store, d) for d in reversed(found)], config=schema1_config(doc))
    config_doc = doc.get("config")
    config = next((d for d in found if isinstance(config_doc, dict) and d.digest == config_doc.get("digest")), None)
    layers = [d for d in found if d is not config and d is not subject]
    view = _replace(view, layers=layers, config_descriptor=config)
    return view if config is None or view.artifact_config else _replace(view, config=read_config(store, config))


def stored(store: BlobStore, digests: list[str]) -> set[str]:
    """Those of *digests* the store holds (the store only)."""
    return {digest for digest in digests if store.exists(parse_digest(digest))}


async def served(store: BlobStore, metadata: Metadata, repo: str, digests: list[str]) -> set[str]:
    """Those of *digests* whose manifest *repo* serves from the store (an image page to link to);
    the others were never pulled (an index's other platforms, an upstream's referrers)."""
    records = await in_index_thread(linked_records, metadata, repo, digests)
    return await anyio.to_thread.run_sync(stored, store, list(records)) if records else set()


def _replace(view: ManifestView, **changes: Any) -> ManifestView:
    return ManifestView(**{**view.__dict__, **changes})


def read_config(store: BlobStore, descriptor: Descriptor) -> ImageConfig | None:
    """An image's settings and history from its config blob; None when absent, too large or not JSON."""
    try:
        digest = parse_digest(descriptor.digest)
    except ParseError:
        return None
    size = store.size(digest)
    if size is None or size > MAX_CONFIG_BYTES:
        return None
    body = store.read_bytes(digest)
    doc = _document(body or b"")
    if not doc:
        return None
    history = doc.get("history") if isinstance(doc.get("history"), list) else []
    assert isinstance(history, list)
    return _image_config(doc, platform_text(doc), [
        HistoryStep(str(h.get("created") or ""), str(h.get("created_by") or ""), str(h.get("comment") or ""),
                    bool(h.get("empty_layer"))) for h in history if isinstance(h, dict)])


def schema1_config(manifest: dict[str, Any]) -> ImageConfig | None:
    """A schema 1 image's settings and history, from its ``history`` entries' ``v1Compatibility``
    (top layer first; the first one holds the image's config, as Docker's "Image Manifest Version
    2, Schema 1" describes); None when it has none."""
    history = manifest.get("history")
    entries = [doc for h in history if isinstance(h, dict) and (doc := _document(str(h.get("v1Compatibility", ""))))] \
        if isinstance(history, list) else []
    if not entries:
        return None
    top = entries[0]
    platform = platform_text({"os": top.get("os"),
                              "architecture": top.get("architecture") or manifest.get("architecture")})
    steps = []
    for entry in reversed(entries):
        run = entry.get("container_config")
        command = _strings(run.get("Cmd")) if isinstance(run, dict) else None
        steps.append(HistoryStep(str(entry.get("created") or ""), " ".join(command or []),
                                 str(entry.get("comment") or ""), bool(entry.get("throwaway"))))
    return _image_config(top, platform, steps)


def _sized(store: BlobStore, descriptor: Descriptor) -> Descriptor:
    """*descriptor* with the stored blob's size when it names none (-1) and the blob is cached."""
    if descriptor.size >= 0:
        return descriptor
    try:
        size = store.size(parse_digest(descriptor.digest))
    except ParseError:
        return descriptor
    return descriptor if size is None else dataclasses.replace(descriptor, size=size)


def _image_config(doc: dict[str, Any], platform: str, history: list[HistoryStep]) -> ImageConfig:
    settings = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    assert isinstance(settings, dict)
    labels = settings.get("Labels")
    ports = settings.get("ExposedPorts")
    return ImageConfig(
        platform=platform,
        created=str(doc.get("created") or ""),
        entrypoint=_strings(settings.get("Entrypoint")),
        cmd=_strings(settings.get("Cmd")),
        env=_strings(settings.get("Env")) or [],
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        exposed_ports=sorted(str(p) for p in ports) if isinstance(ports, dict) else [],
        workdir=str(settings.get("WorkingDir") or ""),
        user=str(settings.get("User") or ""),
        history=history,
    )


def _platforms_and_size(view: ManifestView, children: dict[str, ManifestView]) -> tuple[list[str], int | None]:
    """An image's platform and size, or an index's platforms and the size of its *children* stored
    (build attestations, ``unknown/unknown``, left out: no platform to run, and no client pulls them)."""
    if not view.is_index:
        return ([view.config.platform] if view.config else []), view.image_size
    platforms, total, known = [], 0, False
    for child in view.children:
        text = platform_text(child.platform)
        if text == "unknown/unknown":
            continue
        if text != "unknown":  # a nested index names no platform
            platforms.append(text)
        stored = children.get(child.digest)
        if stored is not None and stored.image_size is not None:
            total += stored.image_size
            known = True
    return platforms, total if known else None


@dataclass(frozen=True)
class _Tags:
    """What the index says of one page of tags: the page, each tag's record (None: untagged since),
    the manifests the repository serves of them, and when each was last pulled."""

    total: int
    number: int
    pages: int
    shown: list[tuple[str, TagRecord | None]]
    only_listed: frozenset[str]
    records: dict[str, ManifestRecord]
    pulled: dict[tuple[str, str], float]
    pull_tag: str | None


def _tags(metadata: Metadata, last_pulls: LastPulls, repo: str, number: int, per_page: int,
          listed: frozenset[str]) -> _Tags:
    """The index's part of :func:`tag_page`."""
    cached = metadata.tags(repo)
    only_listed = listed.difference(cached)
    tags = sorted(only_listed.union(cached)) if only_listed else cached
    pages = max(1, math.ceil(len(tags) / per_page))
    number = min(max(number, 1), pages)
    shown = tags[(number - 1) * per_page:number * per_page]
    pulled = last_pulls.read(metadata)[0] if shown else {}
    records = [(tag, None if tag in only_listed else metadata.get_tag(repo, tag)) for tag in shown]
    digests = list(dict.fromkeys(record.digest for _, record in records if record is not None))
    return _Tags(len(tags), number, pages, records, frozenset(only_listed),
                 linked_records(metadata, repo, digests), pulled,
                 "latest" if "latest" in tags else next(iter(tags), None))


def _views(store: BlobStore, records: dict[str, ManifestRecord]) -> dict[str, ManifestView]:
    """The manifests of *records* the store holds, by digest (the store only)."""
    return {digest: view for digest, record in records.items()
            if (view := read_manifest(store, digest, record)) is not None}


async def tag_page(store: BlobStore, metadata: Metadata, last_pulls: LastPulls, repo: str, number: int,
                   per_page: int = TAGS_PER_PAGE, listed: frozenset[str] = frozenset()) -> TagPage:
    """Page *number* (1-based, clamped) of *repo*'s tags, sorted, each with what its manifest says;
    with the tags of *listed* (the upstream's list) that are not cached here among them."""
    found = await in_index_thread(_tags, metadata, last_pulls, repo, number, per_page, listed)
    views = await anyio.to_thread.run_sync(_views, store, found.records) if found.records else {}
    children = list(dict.fromkeys(c.digest for view in views.values() if view.is_index for c in view.children))
    child_records = await in_index_thread(linked_records, metadata, repo, children) if children else {}
    child_views = await anyio.to_thread.run_sync(_views, store, child_records) if child_records else {}
    rows = []
    for tag, record in found.shown:
        if tag in found.only_listed:
            rows.append(TagRow(tag, "", "", [], None, False, None, upstream_only=True))
            continue
        if record is None:
            continue
        view = views.get(record.digest)
        platforms, size = _platforms_and_size(view, child_views) if view else ([], None)
        rows.append(TagRow(tag, record.digest, record.media_type, platforms, size, view is not None,
                           found.pulled.get((repo, record.digest))))
    return TagPage(rows, found.total, found.number, found.pages, len(found.only_listed), found.pull_tag)


def referrers(metadata: Metadata, repo: str, digest: str) -> list[dict[str, Any]]:
    """Descriptors of the manifests whose subject is *digest*: pushed here, or as the upstream last listed them."""
    found: dict[str, dict[str, Any]] = {}
    for descriptor in [*metadata.referrers(repo, digest), *(metadata.upstream_referrers(repo, digest, None) or [])]:
        key = str(descriptor.get("digest", ""))
        found.setdefault(key, dict(descriptor))
    return list(found.values())
