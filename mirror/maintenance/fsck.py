"""``mirror fsck``: check that the index and the store agree, and optionally repair them.

Checks: leftovers in ``tmp/`` and ``uploads/`` (on S3, also an upload's tail in the bucket that outlived its record:
``registry/roaming.py``, and its completed object ``uploads/<uuid>/data`` once older than
:data:`~mirror.storage.layout.ORPHAN_GRACE`: one a commit failed to delete); objects in ``blobs/`` with names that are
not digests; (with ``verify_content``) objects whose bytes do not hash to their name (a signed schema 1 manifest:
whose payload does not, see ``storage/filesystem.py``), and without it the pushed manifests, which fsck reads anyway
(as stored: the S3 driver's own read would remove one that does not match, and fsck without ``repair`` changes
nothing); objects whose size (as the store lists it: no object is read) differs from their manifest record or from a
descriptor of an image in the index that needs them (pushed or cached: a truncated layer shows so); tags whose
manifest is missing, or has no manifest record (``repair`` records it again from the object, or removes a tag naming
what is no manifest); manifest records and repository links whose object is missing; pushed images that need an object
missing from the store, or not linked in their repository (a ``DELETE`` of a blob or of a child manifest the image
still needs, which a pull of it then fails on); preloaded (pinned) images, with their child manifests, that need an
object missing from the store, which an air-gapped mirror cannot fetch again. What an image needs: its layers (not
non-distributable ones, fetched from their urls), config, child manifests; not its ``subject``, which may be absent.
Objects no repository links are counted, not reported (``mirror gc`` removes those older than ``gc.grace``: a
collector killed between its index and its deletes leaves some).

fsck may run beside a serving mirror: it lists the store first, then reads the index, so an object stored in between
(a push, a fill) is looked up again before a record, link or tag of it is called missing.

``repair`` removes what is corrupt or dangling, so cached content is fetched again on the next pull; it never invents
data. An object whose size differs from its manifest record is removed as a corrupt one: the record is the length of
the very bytes named by the digest (but for a signed schema 1 manifest, named by its payload, whose copy signed again
by its upstream may be the one recorded: not compared). One whose size differs only from an image's descriptor, which
the client (or the upstream) wrote, is re-hashed first (a pushed image's by ``repair``, a cached image's by any run)
and removed only if it does not match its digest (a cached one is fetched again on the next pull); if it does, a
pushed image's manifest is what is wrong, and stays reported (a cached image's is its upstream's: nothing to repair
here). Pushed images that lack an object or its link are reported, never repaired: the bytes may be gone, and a link
the repository's owner deleted is not restored. A pushed repository's link to a missing manifest, or to a missing blob
that no cached repository links, is removed (a pull gets a clean ``404``, and a push of it again links it again); to a
missing blob a cached repository links, it is kept, and so are the links of such a blob that a repair removes as
corrupt: the cached image's next pull fetches the blob again, and the pushed images that share it (one built on a
cached base image) are whole again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..metadata.driver import Metadata
from ..metadata.holders import held_elsewhere, leases_of
from ..metadata.records import RecordKind
from ..observe.progress import NoProgress, Progress
from ..spec.manifest import (
    INDEX_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    SCHEMA1,
    SCHEMA1_SIGNED,
    detect_media_type,
)
from ..spec.reference import ParseError, parse_digest
from ..storage.driver import BlobStore, StoredObject
from ..storage.layout import UPLOAD_ID_RE
from ..storage.staging import Staging
from ..storage.verify import signed_schema1_named
from .fsckreport import Finding, FsckReport, Image, cached_repo, pull_needs
from .leftovers import bucket_uploads, left_behind

#: What a finding of an object whose listed size is not the one recorded of it is called.
SIZE_DIFFERS = "object size differs from its record"
#: ... from an image's descriptor only, not re-hashed: the object or the manifest is wrong.
DESCRIPTOR_DIFFERS = "object size differs from an image's descriptor"
#: ... once re-hashed (``repair``, ``verify_content``) and found whole: the descriptor is wrong.
WRONG_DESCRIPTOR = "image gives a wrong size for an object"
#: A pushed repository's link to a blob missing from the store that a cached repository links too.
REFETCHED = "pushed object missing until a pull of a cached image that has it fetches it again"


class Fsck:
    def __init__(self, store: BlobStore, metadata: Metadata, *, repair: bool = False, verify_content: bool = False,
                 progress: Progress | None = None, replica: bool = False, upload_ttl: float = 86400.0) -> None:
        """*progress* hears of the bytes re-hashed (``verify_content``): one phase, ``verifying``.
        *replica*: the store is a replica's of a cluster, whose push uploads continue on any replica:
        a local file of an upload without a record is one that ended on another replica, which the
        server's sweep removes (``registry/roaming.py``), not a problem.  An upload record younger than
        *upload_ttl* (s) whose file another running mirror may hold (``metadata/holders.py``) is none either."""
        self.store, self.replica, self.upload_ttl = store, replica, upload_ttl
        self.metadata = metadata
        self.repair = repair
        self.verify_content = verify_content
        self.progress = progress or NoProgress()
        self.report = FsckReport()
        self._sized: set[str] = set()  # objects whose size was found wrong (reported once)
        self._dropped: set[str] = set()  # objects removed by a repair
        self._unlinked: set[tuple[str, str]] = set()  # the links a repair removed with them

    def run(self) -> FsckReport:
        if self.repair:
            # Repairs change the index: one collector-like writer at a time.
            fd = os.open(self.store.layout.gc_lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._run()
            finally:
                os.close(fd)
        else:
            self._run()
        return self.report

    def _found(self, kind: str, subject: str, fix: Callable[[], object] | None = None) -> None:
        finding = Finding(kind, subject)
        if self.repair and fix is not None:
            fix()
            finding.repaired = True
        self.report.findings.append(finding)

    def _run(self) -> None:
        present = self._objects()
        self._temps()
        self._uploads()
        self._index(present)

    # -- the store --

    def _objects(self) -> dict[str, StoredObject]:
        """Every well-named object by its name; strays and (optionally) corrupt ones are reported."""
        present: dict[str, StoredObject] = {}
        entries = list(self.store.objects())
        if self.verify_content:
            self.progress.phase("verifying", sum(e.size for e in entries if e.digest is not None))
        for found in entries:
            if found.digest is None:
                if os.path.isdir(found.location):  # never written by the mirror: left to whoever put it there
                    self._found("stray directory in blobs/ (not removed)", found.location)
                else:
                    self._found("stray file in blobs/", found.location, partial(self.store.remove, found))
                continue
            if self.verify_content:
                matches = self.store.matches(found.digest)
                self.progress.advance(found.size)
                if not matches:
                    self._found("corrupt object (content does not match its digest)", found.name,
                                partial(self._drop_object, found))
                    continue
                self.report.verified += 1
            present[found.name] = found
            self.report.objects += 1
            self.report.bytes += found.size
        return present

    def _drop_object(self, found: StoredObject, counted: int | None = None) -> None:
        """Remove a corrupt object, its manifest record and its links; but a blob a cached repository
        links keeps every link: that repository's next pull fetches it again, and then the pushed
        images that share it (one built on a cached base image) are whole again.  The store's size in
        the index loses *counted* bytes, the size the object was stored with (as recorded, or as a
        descriptor gives it; else its size as listed)."""
        self.store.remove(found)
        self.metadata.add_usage(-(found.size if counted is None or counted < 0 else counted))
        digest = found.name
        self._dropped.add(digest)
        links = [(repo, d) for repo, d in self.metadata.all_links() if d == digest]
        recorded = self.metadata.get_manifest(digest) is not None
        if recorded or not any(cached_repo(repo) for repo, _ in links):
            self._unlinked.update(links)
        else:
            links = []
        self.metadata.forget(manifests=[digest], links=links)

    def _temps(self) -> None:
        abandoned = self.store.layout.abandoned_temps()
        for path in abandoned:
            self._found("abandoned temp file", path)
        for lock, directory in self.store.layout.stages():  # a preload's blobs, kept alive by its lock
            if str(lock) in abandoned or not lock.exists():
                self._found("abandoned temp file", str(directory))
        if self.repair and any(f.kind == "abandoned temp file" for f in self.report.findings):
            self.store.sweep_tmp()
            Staging.sweep(self.store.layout)
            for finding in self.report.findings:
                if finding.kind == "abandoned temp file":
                    finding.repaired = True

    def _uploads(self) -> None:
        for entry in self.store.layout.upload_entries():
            if not UPLOAD_ID_RE.fullmatch(entry.name):
                self._found("upload without a record", entry.path, partial(Path(entry.path).unlink, missing_ok=True))
            elif not self.replica and self.metadata.get_upload(entry.name) is None:
                self._found("upload without a record", entry.path, partial(Path(entry.path).unlink, missing_ok=True))
        leases = leases_of(self.metadata, self.store.local)
        for uuid in self.metadata.upload_ids():
            record = self.metadata.get_upload(uuid)
            roaming = record is not None and (  # its file with another replica, or another mirror
                record.written_at is not None or held_elsewhere(record, self.upload_ttl, None, leases))
            if not UPLOAD_ID_RE.fullmatch(uuid) or not (roaming or self.store.layout.upload(uuid).exists()):
                self._found("upload record without its file", uuid, partial(self._drop_upload_record, uuid))

        if (tails := bucket_uploads(self.store)) is not None:
            for left in left_behind(tails, self.metadata):
                self._found(f"upload {left.what} without a record", left.uuid, left.remove)

    def _drop_upload_record(self, uuid: str) -> None:
        """Remove an upload's record, and the parts it sent to the store (S3) first; give its name back if
        nothing landed in it (``metadata/releases.py``), as the server's sweep does."""
        record = self.metadata.get_upload(uuid)
        if record is not None and record.parts is not None and UPLOAD_ID_RE.fullmatch(uuid):
            self.store.abort_upload(uuid, record.parts)
        self.metadata.delete_upload(uuid)
        if record is not None:
            self.metadata.release_local(record.name)

    # -- the index --

    def _index(self, present: dict[str, StoredObject]) -> None:
        manifests = self._manifests(present)
        links = self.metadata.all_links()
        bodies: dict[str, bytes | None] = {}  # each manifest read once (not one of a wrong size)
        images = []
        for repo, digest in links:
            if digest in manifests and digest in present and digest not in self._sized:
                if digest not in bodies:
                    bodies[digest] = self._read(present[digest])
                    if self.repair and digest in self._dropped:
                        del present[digest]
                if (body := bodies[digest]) is not None:
                    images.append(Image(repo, digest, pull_needs(body, digest),
                                        detect_media_type(body, "") in INDEX_TYPES))
        self._descriptor_sizes(images, present)
        for repo, tag, record in self.metadata.all_tags():
            self.report.tags += 1
            digest = record.digest
            if digest not in present and self._missing(digest):
                self._found("tag points to a missing manifest", f"{repo}:{tag} -> {digest}",
                            partial(self.metadata.untag, repo, tag))
            elif digest in present and digest not in manifests and self.metadata.get_manifest(digest) is None:
                self._found("tag points to a manifest the index has no record of", f"{repo}:{tag} -> {digest}",
                            partial(self._record, repo, tag, present[digest]))
        # A cached repository may link what it has not fetched yet (or lost): it fetches again on
        # demand.  A pushed repository cannot, but a blob a cached repository links comes back with
        # its next pull: the pushed repository's link then serves it again, and is kept.
        refetched = {d for repo, d in links if cached_repo(repo) and d not in manifests
                     and (repo, d) not in self._unlinked}
        for repo, digest in links:
            if (repo, digest) in self._unlinked:
                continue  # forgotten with its object
            self.report.links += 1
            if digest not in present and not cached_repo(repo) and self._missing(digest):
                if digest in refetched:
                    self._found(REFETCHED, f"{repo}@{digest}")
                else:
                    self._found("pushed object missing", f"{repo}@{digest}",
                                partial(self.metadata.unlink, repo, digest))
        referenced = {d for _, d in links} | {d for image in images for d, _ in image.needs}
        referenced |= self._dropped
        self.report.unreferenced = [o.size for d, o in present.items() if d not in referenced]
        self._needs([i for i in images if not cached_repo(i.repo)], set(links), present)
        self._preloaded(images, present)

    def _preloaded(self, images: list[Image], present: dict[str, StoredObject]) -> None:
        """Images preloaded under a tag (and their child manifests) lacking a layer or config an air-gapped
        mirror cannot fetch again (not an index's children: an export of some platforms keeps them all)."""
        kept = set(self.metadata.pins(tagged=True))
        by_key = {(i.repo, i.digest): i for i in images}
        todo = [by_key[key] for key in kept if key in by_key]
        while todo:  # the child manifests of the pinned indexes
            image = todo.pop()
            children = [by_key[image.repo, d] for d, _ in image.needs
                        if (image.repo, d) in by_key and (image.repo, d) not in kept]
            kept.update((child.repo, child.digest) for child in children)
            todo += children
        for image in [by_key[key] for key in sorted(kept & by_key.keys()) if key[1] in present]:
            for needed, _ in () if image.index else image.needs:  # (not one a repair removed)
                if needed not in present and self._missing(needed):
                    self._found("preloaded image refers to a missing object (preload it again)",
                                f"{image.repo}@{image.digest} -> {needed}")

    def _manifests(self, present: dict[str, StoredObject]) -> set[str]:
        """The digests of the manifest records; those whose object is missing, or of another size
        than recorded, are reported."""
        recorded = set()
        for (digest,), record in self.metadata.records(RecordKind.MANIFESTS):
            recorded.add(digest)
            found = present.get(digest)
            if found is None:
                if not self._missing(digest):
                    continue
                self._found("manifest record without its object", digest,
                            partial(self.metadata.forget, manifests=[digest]))
            elif found.size != record.size and record.media_type not in (SCHEMA1, SCHEMA1_SIGNED):
                self._sized.add(digest)
                self._found(SIZE_DIFFERS, f"{digest}: {found.size} bytes, the index records {record.size}",
                            partial(self._drop_object, found, record.size))
                if self.repair:
                    del present[digest]
        return recorded

    def _descriptor_sizes(self, images: list[Image], present: dict[str, StoredObject]) -> None:
        """Objects of another size than a descriptor of an image that needs them says.

        The client (or the upstream) wrote the descriptor (a push does not check sizes, nor does
        distribution's): whether the object or the manifest is wrong, only the object's bytes can say.
        Re-hashed (``verify_content`` did already, ``repair`` does, and so does any run for a cached
        image's: a rare case, and an upstream's manifest is nothing to report here), an object that
        does not match its digest is removed; one that does leaves each pushed image that gives it a
        wrong size reported."""
        whole: dict[str, bool | None] = {}  # the verdict on each object (None: not re-hashed, reported once)
        for image in images:
            pushed = not cached_repo(image.repo)
            for digest, size in image.needs:
                found = present.get(digest)
                if found is None or size < 0 or found.size == size or digest in self._sized:
                    continue
                if digest not in whole or (whole[digest] is None and not pushed):
                    whole[digest] = self._whole(found, now=not pushed)
                    where = f"{image.repo}@{image.digest}"
                    if whole[digest] is None:  # not re-hashed: either may be wrong
                        self._found(DESCRIPTOR_DIFFERS, f"{digest}: {found.size} bytes, {size} in {where} (the "
                                                        "object or the manifest is wrong: --repair re-hashes it)")
                    elif not whole[digest]:
                        self._found(SIZE_DIFFERS, f"{digest}: {found.size} bytes, {size} in {where}",
                                    partial(self._drop_object, found, size))
                        if self.repair:
                            del present[digest]
                if whole[digest] and pushed:
                    self._found(WRONG_DESCRIPTOR, f"{image.repo}@{image.digest} -> {digest}: {size} bytes, "
                                                  f"stored {found.size}")

    def _whole(self, found: StoredObject, *, now: bool = False) -> bool | None:
        """Whether *found* matches its digest: known (``verify_content`` re-hashed it) or found out
        (``repair``, or *now*); None otherwise."""
        if self.verify_content:
            return True
        if (self.repair or now) and found.digest is not None:
            return self.store.matches(found.digest)
        return None

    def _needs(self, images: list[Image], linked: set[tuple[str, str]], present: dict[str, StoredObject]) -> None:
        """Pushed images that need an object missing from the store, or not linked in their repository."""
        for image in images:
            if image.digest not in present:
                continue  # removed by a repair, with its links
            for digest, _ in image.needs:
                if digest not in present:
                    if self._missing(digest):
                        self._found("pushed image refers to a missing object",
                                    f"{image.repo}@{image.digest} -> {digest}")
                elif (image.repo, digest) not in linked:
                    self._found("pushed image refers to an object not linked in its repository",
                                f"{image.repo}@{image.digest} -> {digest}")

    def _missing(self, digest: str) -> bool:
        """Whether an object the listing did not have is still missing: one stored since (a push or a
        fill of a server running beside fsck) is not, and its record, link or tag is no problem."""
        if digest in self._dropped:
            return True
        try:
            return not self.store.exists(parse_digest(digest))
        except ParseError:
            return True

    def _record(self, repo: str, tag: str, found: StoredObject) -> None:
        """Record again the manifest *found* that *repo*:*tag* names, from its bytes (verified); if they are
        not a manifest's, remove the tag."""
        body = self._read(found)
        media_type = "" if body is None else detect_media_type(body, "")
        if body is not None and media_type in MANIFEST_MEDIA_TYPES:
            self.metadata.put_manifest(found.name, media_type, len(body))
        else:
            self.metadata.untag(repo, tag)

    def _read(self, found: StoredObject) -> bytes | None:
        """A manifest's bytes as stored, read past the driver's own check (the S3 driver removes an
        object that does not match as it reads it: without ``repair`` fsck changes nothing); None,
        and the object reported as corrupt, if they do not match its digest (``verify_content``
        checked every object already)."""
        if found.digest is None:
            return None
        try:
            with self.store.open_stream(found.digest) as stream:
                data = stream.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return None
        if not self.verify_content and hashlib.new(found.digest.algorithm, data).hexdigest() != found.digest.hex \
                and not signed_schema1_named(data, found.digest):
            self._found("corrupt object (content does not match its digest)", found.name,
                        partial(self._drop_object, found))
            return None
        return data

