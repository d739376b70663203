"""``mirror fsck``: check that the index and the store agree, and optionally repair them.

Checks: leftovers in ``tmp/`` and ``uploads/``; objects in ``blobs/`` with names that are not
digests; (with ``verify_content``) objects whose bytes do not hash to their name (a signed
schema 1 manifest: whose payload does not, see ``storage/filesystem.py``); tags whose
manifest is missing; manifest records and repository links whose object is missing; pushed
images whose layers are missing.  ``repair`` removes what is corrupt or dangling, so cached
content is fetched again on the next pull; it never invents data.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ..metadata.driver import LOCAL, Metadata
from ..observe.progress import NoProgress, Progress
from ..spec.manifest import is_nondistributable, references
from ..spec.reference import ParseError, parse_digest
from ..storage.driver import BlobStore, StoredObject
from ..storage.layout import UPLOAD_ID_RE


@dataclass
class Finding:
    kind: str
    subject: str
    repaired: bool = False

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}" + (" (repaired)" if self.repaired else "")


@dataclass
class FsckReport:
    objects: int = 0
    bytes: int = 0
    verified: int = 0
    tags: int = 0
    links: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return all(f.repaired for f in self.findings)


class Fsck:
    def __init__(self, store: BlobStore, metadata: Metadata, *, repair: bool = False, verify_content: bool = False,
                 progress: Progress | None = None, replica: bool = False) -> None:
        """*progress* hears of the bytes re-hashed (``verify_content``): one phase, ``verifying``.
        *replica*: the store is a replica's of a cluster, whose push uploads continue on any replica:
        a local file of an upload without a record is one that ended on another replica, which the
        server's sweep removes (``registry/roaming.py``), not a problem."""
        self.store = store
        self.replica = replica
        self.metadata = metadata
        self.repair = repair
        self.verify_content = verify_content
        self.progress = progress or NoProgress()
        self.report = FsckReport()

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

    def _objects(self) -> dict[str, int]:
        """Every well-named object and its size; strays and (optionally) corrupt ones are reported."""
        present: dict[str, int] = {}
        entries = list(self.store.objects())
        if self.verify_content:
            self.progress.phase("verifying", sum(e.size for e in entries if e.digest is not None))
        for found in entries:
            if found.digest is None:
                self._found("stray file in blobs/", found.location, partial(self.store.remove, found))
                continue
            digest, size = found.name, found.size
            if self.verify_content:
                matches = self.store.matches(found.digest)
                self.progress.advance(size)
                if not matches:
                    self._found("corrupt object (content does not match its digest)", digest,
                                partial(self._drop_object, found))
                    continue
                self.report.verified += 1
            present[digest] = size
            self.report.objects += 1
            self.report.bytes += size
        return present

    def _drop_object(self, found: StoredObject) -> None:
        self.store.remove(found)
        digest = found.name
        self.metadata.forget(manifests=[digest],
                             links=[(repo, d) for repo, d in self.metadata.all_links() if d == digest])

    def _temps(self) -> None:
        for path in self.store.layout.abandoned_temps():
            self._found("abandoned temp file", path)
        if self.repair and any(f.kind == "abandoned temp file" for f in self.report.findings):
            self.store.sweep_tmp()
            for finding in self.report.findings:
                if finding.kind == "abandoned temp file":
                    finding.repaired = True

    def _uploads(self) -> None:
        for entry in self.store.layout.upload_entries():
            if not UPLOAD_ID_RE.fullmatch(entry.name):
                self._found("upload without a record", entry.path, partial(_unlink, entry.path))
            elif not self.replica and self.metadata.get_upload(entry.name) is None:
                self._found("upload without a record", entry.path, partial(_unlink, entry.path))
        for uuid in self.metadata.upload_ids():
            record = self.metadata.get_upload(uuid)
            roaming = record is not None and record.written_at is not None  # its file may be on another replica
            if not UPLOAD_ID_RE.fullmatch(uuid) or not (roaming or self.store.layout.upload(uuid).exists()):
                self._found("upload record without its file", uuid, partial(self._drop_upload_record, uuid))

    def _drop_upload_record(self, uuid: str) -> None:
        """Remove an upload's record, and the parts it sent to the store (S3) first."""
        record = self.metadata.get_upload(uuid)
        if record is not None and record.parts is not None and UPLOAD_ID_RE.fullmatch(uuid):
            self.store.abort_upload(uuid, record.parts)
        self.metadata.delete_upload(uuid)

    # -- the index --

    def _index(self, present: dict[str, int]) -> None:
        for digest in self.metadata.manifest_digests():
            if digest not in present:
                self._found("manifest record without its object", digest,
                            partial(self.metadata.forget, manifests=[digest]))
        for repo, tag, record in self.metadata.all_tags():
            self.report.tags += 1
            digest = record.digest
            if digest not in present:
                self._found("tag points to a missing manifest", f"{repo}:{tag} -> {digest}",
                            partial(self.metadata.untag, repo, tag))
        for repo, digest in self.metadata.all_links():
            self.report.links += 1
            if digest not in present:
                # A cached repository may link what it has not fetched yet (or lost): it fetches
                # again on demand.  A pushed repository cannot.
                if repo.startswith(LOCAL + "/"):
                    self._found("pushed object missing", f"{repo}@{digest}",
                                partial(self.metadata.unlink, repo, digest))
            elif repo.startswith(LOCAL + "/") and self.metadata.get_manifest(digest) is not None:
                body = self._read(digest)
                for d in references(body or b""):
                    if d.digest not in present and d.digest != digest \
                            and not is_nondistributable(d.media_type):  # fetched from its urls, not here
                        self._found("pushed image refers to a missing object", f"{repo}@{digest} -> {d.digest}")

    def _read(self, digest: str) -> bytes | None:
        try:
            return self.store.read_bytes(parse_digest(digest))
        except ParseError:
            return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
