"""Preload: put the images of an archive into the store, as cached content of their registry.

What an archive may hold and how its images are named is ``archive/plan.py`` (step 1 below).

The import runs in three steps, and only the last touches the store:

1. *plan*: read the index/manifests, check every digest, size and reference;
2. *stage*: copy every blob the store lacks into ``DATA/tmp/stage-*.d/``, verifying its digest;
3. *commit*: move the staged blobs into the store, then per image: its manifests, the
   repository links, a pin of the root (``metadata.pin``), and its tags last.

Bad input raises :class:`~mirror.archive.members.ArchiveError` before step 3: the store is unchanged.
Imports ``preload_plan``, ``archive_readers``, ``archive``, ``staging``, ``store``, ``metadata`` and
``gc`` (the reference lock); nothing of HTTP.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.values import human
from ..maintenance.collecting import reference_lock
from ..metadata.driver import Metadata, TagRecord, unpin_if_untagged
from ..observe.progress import NoProgress, Progress
from ..registry.referrers import referrer_of
from ..spec.reference import parse_digest
from ..storage.driver import BlobStore
from ..storage.staging import Staging, copy_hashing
from .members import ArchiveError, ContentMismatch, NoRoom
from .plan import Content, Image, plan
from .readers import open_archive

log = logging.getLogger("mirror.archive.preload")


@dataclass
class Summary:
    """What one archive brought."""

    source: str
    images: int = 0
    tags: int = 0
    tags_changed: int = 0
    new_objects: int = 0
    new_bytes: int = 0
    present_bytes: int = 0
    names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def nothing_new(self) -> bool:
        return self.new_objects == 0 and self.tags_changed == 0

    def describe(self) -> str:
        counts = f"{self.images} image{'s' * (self.images != 1)}, {self.tags} tag{'s' * (self.tags != 1)}"
        if self.nothing_new:
            return f"{self.source}: nothing new: {counts}, {human(self.present_bytes)} already present"
        return (f"{self.source}: {counts} ({self.tags_changed} new or moved), {self.new_objects} new objects, "
                f"{human(self.new_bytes)} new, {human(self.present_bytes)} already present")

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "images": self.images, "tags": self.tags, "tags_changed": self.tags_changed,
            "new_objects": self.new_objects, "new_bytes": self.new_bytes, "present_bytes": self.present_bytes,
            "names": self.names, "warnings": self.warnings, "nothing_new": self.nothing_new,
        }


# -- steps 2 and 3 --


class NameTaken(ArchiveError):
    """An image is named for a repository pushed to this registry, which answers that name instead."""

    code = "DENIED"


def preload_file(path: Path, store: BlobStore, metadata: Metadata, progress: Progress | None = None,
                 label: str | None = None, now: Callable[[], float] = time.time,
                 registries: Collection[str] | None = None, default_registry: str = "docker.io",
                 size: int | None = None) -> Summary:
    """Import one archive (file or directory); raise ArchiveError and change nothing on bad input.

    *registries*: the upstreams' (``upstreams:``); an image named for another registry is stored all
    the same, with a warning: no request reaches it until that registry is one of them.
    *default_registry*: the one requests without ``?ns=`` go to (``upstream.registry``): an image named
    for a repository pushed there is refused (:class:`NameTaken`), since its name reads the pushed one.
    *size*: the bytes *path*, a pipe, will bring, when its writer says (a compressed one may decompress to
    ``MAX_EXPANSION`` times that, as a file may)."""
    progress = progress or NoProgress()
    summary = Summary(label or str(path))
    store.create()
    Staging.sweep(store.layout)
    try:
        staging = Staging(store.layout)
    except OSError as exc:  # no inode or no room left for its lock file or directory
        raise _io_error(exc) from exc
    try:
        def have(digest: str) -> bool:
            return store.exists(parse_digest(digest))

        try:
            size = path.stat().st_size if path.is_file() else size
        except OSError:
            pass
        progress.phase("reading", size)
        with open_archive(path, staging, have, progress.advance, size) as archive:
            images, content = plan(archive, store, summary.warnings)
            _refuse_pushed_names(images, metadata, default_registry)
            if registries is not None:
                summary.warnings += _unreachable(images, registries)
            staged = _stage(images, content, staging, progress, summary)
        _commit(images, staged, store, metadata, progress, summary, now())
    except OSError as exc:
        raise _io_error(exc) from exc
    finally:
        staging.cleanup()
    return summary


def _io_error(exc: OSError) -> ArchiveError:
    """The archive error an I/O error of the data directory makes: :class:`NoRoom` when it is full."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (NoRoom if full else ArchiveError)(None, f"I/O error: {exc.strerror or exc}")


def _refuse_pushed_names(images: list[Image], metadata: Metadata, default_registry: str) -> None:
    for image in images:
        for name in image.names:
            if name.registry != default_registry:
                continue
            paths = [name.name, name.name.removeprefix("library/")]  # library/x is read as x too
            pushed = next((p for p in dict.fromkeys(paths) if metadata.is_local(p)), None)
            if pushed is not None:
                raise NameTaken(None, f"{name}: {pushed} is a repository pushed to this registry, which answers "
                                      "that name for good: push the image to it instead")


def _unreachable(images: list[Image], registries: Collection[str]) -> list[str]:
    """A warning per registry the images name that is not one of *registries*."""
    named: dict[str, list[str]] = {}
    for image in images:
        for name in image.names:
            if name.registry not in registries:
                named.setdefault(name.registry, []).append(str(name))
    return [f"{', '.join(names)}: {registry} is not an upstream of this mirror, so no pull reaches "
            f"{'them' if len(names) > 1 else 'it'} until it is one (upstreams: - {{registry: {registry}}})"
            for registry, names in named.items()]


def _stage(images: list[Image], content: Content, staging: Staging, progress: Progress,
           summary: Summary) -> dict[str, tuple[Path, str]]:
    """Copy the blobs the store lacks into staging, verified; return digest -> (path, hex)."""
    blobs = {digest: size for image in images for digest, size in image.blobs.items()}
    wanted = {digest: size for digest, size in blobs.items() if content.stored_size(digest) is None}
    summary.present_bytes += sum(size for digest, size in blobs.items() if digest not in wanted)
    progress.phase("storing", sum(wanted.values()))
    staged: dict[str, tuple[Path, str]] = {}
    for digest, size in wanted.items():
        member = content.member(digest)
        assert member is not None  # checked by plan()
        algorithm = digest.partition(":")[0]
        if member.digest is not None and member.path is not None:  # staged while a stream was read
            if member.digest != digest:
                raise ContentMismatch(member.name, f"content does not match {digest} (got {member.digest})")
            staged[digest] = (member.path, member.digest.partition(":")[2])
            progress.advance(size)
            continue
        if size > staging.free_bytes():
            raise NoRoom(member.name, f"needs {human(size)}, more than is free in the data directory")
        path, fd = staging.new_file()
        try:
            with content.archive.open(member) as reader:
                hexdigest = copy_hashing(reader.read, fd, size, algorithm, progress.advance)
        except EOFError:
            raise ArchiveError(member.name, "archive is truncated: entry data ends early") from None
        finally:
            os.close(fd)
        if hexdigest != digest.partition(":")[2]:
            raise ContentMismatch(member.name, f"content does not match {digest} (got {algorithm}:{hexdigest})")
        staged[digest] = (path, hexdigest)
    return staged


def _commit(images: list[Image], staged: dict[str, tuple[Path, str]], store: BlobStore, metadata: Metadata,
            progress: Progress, summary: Summary, now: float) -> None:
    # Shared with other writers, exclusive for the collector: nothing found present can be swept
    # between the check below and the links that make it reachable.
    with reference_lock(store):
        for image in images:
            for digest in image.blobs:
                if digest not in staged and not store.exists(parse_digest(digest)):
                    raise ArchiveError(None, f"{digest} was removed from the store while this preload ran "
                                             "(garbage collection): run it again")
        _commit_locked(images, staged, store, metadata, progress, summary, now)


def _commit_locked(images: list[Image], staged: dict[str, tuple[Path, str]], store: BlobStore, metadata: Metadata,
                   progress: Progress, summary: Summary, now: float) -> None:
    for digest, (path, hexdigest) in staged.items():
        parsed = parse_digest(digest)
        existed = store.exists(parsed)
        size = path.stat().st_size
        store.commit_file(path, parsed, hexdigest)
        if not existed:
            summary.new_objects += 1
            summary.new_bytes += size
    counted: set[str] = set()
    pinned: set[tuple[str, str]] = set()
    moved: set[tuple[str, str]] = set()  # images a tag named before this preload moved it
    for image in images:
        for digest, (media_type, body) in image.manifests.items():
            parsed = parse_digest(digest)
            if digest in counted:
                pass
            elif store.exists(parsed):
                summary.present_bytes += len(body)
            else:
                store.put_bytes(parsed, body)
                summary.new_objects += 1
                summary.new_bytes += len(body)
            counted.add(digest)
            if metadata.get_manifest(digest) is None:
                metadata.put_manifest(digest, media_type, len(body))
        linked = [*image.manifests, *image.blobs]
        # A manifest's subject knows it as a referrer, as for one pulled through: known offline too.
        referring = [found for digest, (media_type, body) in image.manifests.items()
                     if (found := referrer_of(body, media_type, digest)) is not None]
        for name in image.names:
            metadata.link(name.repo, linked)
            for subject, descriptor in referring:
                metadata.add_referrer(name.repo, subject, descriptor)
            metadata.pin(name.repo, image.digest, tagged=name.tag is not None)  # by digest: for good
            pinned.add((name.repo, image.digest))
        # Tags last: until now nothing pointed at this image.
        for name in image.names:
            if name.tag is None:
                continue
            summary.tags += 1
            record = metadata.get_tag(name.repo, name.tag)
            if record is None or record.digest != image.digest or record.media_type != image.media_type:
                metadata.set_tag(name.repo, name.tag, TagRecord(image.digest, image.media_type, now))
                summary.tags_changed += 1
                if record is not None and record.digest != image.digest:
                    moved.add((name.repo, record.digest))
        summary.images += 1
        summary.names += [str(n) for n in image.names]
        progress.image_done(str(image.names[0]))
        log.info("preloaded %s (%s)", ", ".join(map(str, image.names)), image.digest)
    for repo, digest in moved - pinned:  # no longer kept, unless another tag names it
        unpin_if_untagged(metadata, repo, digest)
