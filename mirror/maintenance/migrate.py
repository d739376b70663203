"""``mirror migrate``: move a store (its objects and its index) to other drivers, e.g. from the
filesystem and diskcache under ``--data`` to S3 and PostgreSQL, or back.

1. Both sides are opened and checked (:class:`Refused`, one line, when they cannot be): not the
   same store, the source a data directory opened with its own index (``DATA/index.json``), no
   server or collector working on either data directory (their ``DATA/gc.lock``, which a
   collection holds, and pushes share, is held for the whole migration), no other process with
   either index open (``metadata/occupancy.py``), the target's index
   empty or a copy, complete or not, of the source's (``transfer.strangers``), and the
   target store's objects all the source's too (``objectcopy.foreign``).  A target that records
   being a copy of the source (``copy_of``, marked by every run), or that the source records being
   a copy of (a rollback), may hold more when asked (``delete``): it catches up (``transfer.withdraw``,
   and its objects the source lacks are deleted).  The target's store and
   data directory are checked before its index is opened: a PostgreSQL index records the store
   that first opens it, and a refused run leaves it free for the store the next run names.
2. Every object of the source is copied through the target driver's verified write path
   (``put_bytes`` for a manifest, else ``ingest`` fed 1 MiB at a time: the digest is checked as
   it is written, nothing larger than a manifest or a part is held in memory), :data:`COPIERS`
   at a time; objects the target already has at that size are skipped, so a run that was
   interrupted goes on where it stopped.  No listing of a store is kept: each pass over the
   objects (counting them, checking the target's, copying, verifying) lists the store again
   (``objectcopy.py``), so memory does not grow with the number of objects.
3. Every record of the index is copied (``metadata/transfer.py``; idempotent writes), kind by
   kind, a batch at a time: memory holds no whole kind of record, however large the index.
4. Verified: every object of the source is in the target at its size (and, with
   ``verify_content``, hashes to its digest there: one that does not, damaged since it was copied, is
   copied again), and the target's index holds every record (``transfer.compare``, batch by batch too).

Sides that are the same (the same data directory under another index driver, say) are not
copied; when both use one data directory, it is bound to the target's index at the end.
Objects of the source that do not match their digest are not copied and make the run fail
(``mirror fsck`` the source).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from typing import Any, cast

from ..config.sections import Config, StorageConfig
from ..metadata.driver import Metadata
from ..metadata.occupancy import in_use_elsewhere
from ..metadata.opening import (
    CannotOpenIndex,
    bind_bucket,
    bound_elsewhere,
    index_identity,
    open_metadata,
    peek_lineage,
    rebind_data_directory,
)
from ..metadata.transfer import compare, copy_records, strangers, unstored, withdraw
from ..metadata.unfinished import index_problem
from ..observe.progress import NoProgress, Progress
from ..spec.manifest import MAX_MANIFEST_BYTES
from ..spec.reference import Digest
from ..storage.driver import BlobStore, StoredObject, StoreError
from ..storage.layout import Layout
from ..storage.opening import open_blob_store
from .migratereport import Refused, Report
from .migrateside import bind as _bind, exclusive as _exclusive, unfinished
from .objectcopy import StoredDigests, census, digested, foreign, looked_up, with_manifests

__all__ = ["COPIERS", "Migration", "Refused", "Report", "store_identity"]
CHUNK = 1 << 20
#: Objects copied at once (each holds at most one part of the target's writer in memory).
COPIERS = 4


def store_identity(storage: StorageConfig) -> str:
    """What tells the blob store *storage* names from any other."""
    if storage.driver == "s3":
        return (f"s3 {storage.s3_regionendpoint or storage.s3_region} bucket {storage.s3_bucket}"
                f" /{storage.s3_rootdirectory.strip('/')}")
    return f"filesystem {storage.path.resolve()}"


class Migration:
    """Copy the store *source* configures into the one *target* configures (see the module docstring)."""

    def __init__(self, source: Config, target: Config, *, verify_content: bool = False, delete: bool = False,
                 progress: Progress | None = None) -> None:
        self.source = source
        self.target = target
        self.verify_content = verify_content
        self.delete = delete  # a related target catches up (what the source no longer holds is withdrawn)
        self.progress = progress or NoProgress()
        self.report = Report()

    def run(self) -> Report:
        """Migrate; raises :class:`Refused` before writing anything if it cannot, ``OSError`` (or
        the index's errors) if a driver fails midway (run it again to go on)."""
        started = time.monotonic()
        source, target = self.source, self.target
        same_store = store_identity(source.storage) == store_identity(target.storage)
        source_index = index_identity(source.metadata, Layout(source.storage.path).index)
        same_index = source_index == index_identity(target.metadata, Layout(target.storage.path).index)
        if same_store and same_index:
            raise Refused(f"both configurations name the same store ({store_identity(source.storage)},"
                          f" {source_index}): nothing to migrate")
        old, new = Layout(source.storage.path), Layout(target.storage.path)
        one_directory = old.root.resolve() == new.root.resolve()
        self._check_source(old)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_exclusive(old, "source"))
            if not one_directory:
                stack.enter_context(_exclusive(new, "target"))
            for side, config, layout in (("source", source, old), ("target", target, new)):
                if side == "source" or not same_index:
                    users = in_use_elsewhere(config.metadata, layout.index)
                    if users:
                        raise Refused(f"{side}: {users} before migrating")
            old_store = self._open_store(source, "source", create=False)
            old_index = self._open_index(source, "source", stack)
            if (problem := index_problem(old_index, source_index)) is not None:  # part of a store: no source
                raise Refused(f"source: {problem}")
            # The source's index opened: a directory that recorded none records it.
            _bind(source, old, "source", index_id=old_index.index_id())
            new_store = self._open_store(target, "target", create=True, sweep=not same_store)
            pool = stack.enter_context(ThreadPoolExecutor(COPIERS, thread_name_prefix="migrate"))
            # The target's store and directory are checked before its index is opened: a PostgreSQL index
            # records the store that first opens it (settings.store), and a refused run must leave it as it
            # found it, free for the store the next run names.
            # A copy of this store made before (or the store it was copied from) catches up with it.
            try:  # a database that does not answer says so, not that the bucket is another index's
                target_id, copied_from = peek_lineage(target.metadata, new.index)
            except CannotOpenIndex as exc:
                raise Refused(f"target: cannot open the index: {_line(exc)}") from exc
            related = target_id != old_index.index_id() and (bool(copied_from) and copied_from == old_index.index_id()
                                                             or bool(target_id) and target_id == old_index.copy_of())
            catch_up = related and self.delete
            if not same_store and not catch_up:
                _check_target_objects(new_store, old_store, pool, related)
            if (problem := bound_elsewhere(target.storage, new_store, old_index.index_id(), target_id)) is not None:
                raise Refused(f"target: {problem}")
            if not one_directory:
                _bind(target, new, "target", record=False, migrating=True)
            new_index = self._open_index(target, "target", stack)
            if not same_index and source.metadata.driver == target.metadata.driver == "postgres" \
                    and old_index.index_id() == new_index.index_id():  # one database, named two ways
                if same_store:
                    raise Refused(f"both configurations name the same store ({store_identity(source.storage)}) and"
                                  f" the same index (id {old_index.index_id()}): nothing to migrate")
                same_index = True
            marking = not one_directory  # marked until this run reaches its end: no server takes a partial copy
            if marking and catch_up:  # from the first withdrawal (a refused run leaves no mark: below)
                stack.enter_context(unfinished(new, store_identity(source.storage), new_index))
            if not same_index:
                found = strangers(new_index, old_index) if not catch_up else withdraw(new_index, old_index)
                if catch_up and found.count:
                    self.report.notes.append(f"{found.count} records the source no longer holds were withdrawn from"
                                             f" the target (first: {found.first})")
                elif found.count and related:
                    raise Refused(f"the target's index holds {found.count} records the source does not (first:"
                                  f" {found.first}):{DELETE}")
                elif found.count and one_directory and target.metadata.driver == "diskcache":
                    # DATA/index/ of a directory bound to the source's index: what it held before a move
                    raise Refused(f"the target's index ({new.index}) is an older copy of this store's index: it holds"
                                  f" {found.count} records the source no longer does (first: {found.first});"
                                  f" remove {new.index} and run again")
                elif found.count:
                    raise Refused(f"the target's index holds {found.count} records the source does not"
                                  f" (first: {found.first}): it belongs to another store, {SINCE}")
                new_index.mark_copy_of(old_index.index_id())
            if marking and not catch_up:
                stack.enter_context(unfinished(new, store_identity(source.storage), new_index))
            gone = foreign(new_store, old_store, pool, COPIERS, remove=True) if catch_up and not same_store else None
            if gone is not None and gone.count:
                self.report.notes.append(f"{gone.count} objects the source no longer holds were deleted from the"
                                         " target")
            held = census(old_store)
            if not one_directory:
                _bind(target, new, "target", index_id=new_index.index_id(), migrating=True)
            self.report.objects, self.report.bytes, self.report.strays = held.objects, held.bytes, held.strays
            if not same_store:
                self._copy_objects(old_store, new_store, old_index, pool)
            if not same_index:
                self.progress.phase("index records", None)
                copy_records(old_index, new_index)
            self._verify(old_store, new_store, new_index, old_index, same_store, pool)
            self.report.uploads = len(old_index.upload_ids())
            if target.storage.driver == "s3" and not self.report.problems:  # its objects are the new index's now
                bind_bucket(target.metadata, target.storage, new_store, new_index, rebind=True)
            if one_directory and not same_index and not self.report.problems:
                problem = rebind_data_directory(target.metadata, new.index_binding, new_index.index_id())
                if problem:
                    self.report.problems.append(problem)
                else:
                    self.report.notes.append(f"{new.root} is now bound to {index_identity(target.metadata, new.index)}")
        if self.report.uploads:
            self.report.notes.append(f"{self.report.uploads} blob uploads in progress were not carried over"
                                     " (their clients push again)")
        if self.report.strays:
            self.report.notes.append(f"{self.report.strays} stray files in the source were left behind (mirror fsck)")
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- opening --

    def _check_source(self, old: Layout) -> None:
        if self.source.storage.driver == "filesystem" and not old.blobs.is_dir():
            raise Refused(f"source: {old.root} is not a mirror data directory (no blobs/)")
        if self.source.metadata.driver == "diskcache" and not old.index.is_dir():
            raise Refused(f"source: {old.root} is not a mirror data directory (no index/)")
        _bind(self.source, old, "source", record=False)

    def _open_store(self, config: Config, side: str, *, create: bool, sweep: bool = False) -> BlobStore:
        """The store *config* names; with *sweep* (a target that is not the source's store too: the source's
        pushes in progress are left alone, its clients may yet finish them there) what a killed run left
        is removed."""
        store = open_blob_store(config.storage)
        try:
            if create or config.storage.driver != "filesystem":
                store.create()  # the filesystem makes its directories; S3 checks that the bucket answers
            if sweep:
                if config.storage.driver == "s3":  # the target is this run's: unfinished uploads are a killed run's
                    cast(Any, store).stale_upload = 0.0  # (S3Store's)
                store.sweep_tmp()  # what an interrupted run left
        except OSError as exc:
            raise Refused(f"{side}: cannot open the store ({store_identity(config.storage)}): {_line(exc)}") from exc
        return store

    def _open_index(self, config: Config, side: str, stack: contextlib.ExitStack) -> Metadata:
        try:
            index = open_metadata(config.metadata, Layout(config.storage.path).index, config.storage)
        except Exception as exc:  # the driver's errors never hold a password
            named = index_identity(config.metadata, Layout(config.storage.path).index)
            raise Refused(f"{side}: cannot open the index ({named}): {_line(exc)}") from exc
        stack.callback(index.close)
        return index

    # -- objects --

    def _copy_objects(self, old: BlobStore, new: BlobStore, index: Metadata, pool: Executor) -> None:
        """Copy what the target lacks, listing the source once more, :data:`COPIERS` objects at a time
        in *pool* (an object store answers each request after a round trip: one at a time, a store of
        small objects takes as many round trips as it has objects).  Interrupted (``KeyboardInterrupt``)
        or failing, it starts no other copy, and those running stop before their next chunk."""
        self.progress.phase("objects", self.report.bytes)
        stopping = threading.Event()

        def one(found: StoredObject, manifest: bool) -> bool:  # True: copied, False: there already
            assert found.digest is not None
            if new.size(found.digest) == found.size:
                return False
            self._copy(old, new, found.digest, found.size, manifest, stopping)
            return True

        pending: dict[Future[bool], StoredObject] = {}
        queue = with_manifests((found for _, found in digested(old)), index)
        try:
            while True:
                for found, manifest in itertools.islice(queue, COPIERS * 2 - len(pending)):
                    pending[pool.submit(one, found, manifest)] = found
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    found = pending.pop(future)
                    try:
                        copied = future.result()
                    except StoreError as exc:
                        self.report.problems.append(f"source object {found.location}: {exc}")
                        continue
                    finally:
                        self.progress.advance(found.size)
                    if copied:
                        self.report.copied += 1
                        self.report.bytes_copied += found.size
                    else:
                        self.report.present += 1
        except BaseException:
            stopping.set()
            for future in pending:
                future.cancel()  # those not started yet
            raise

    def _copy(self, old: BlobStore, new: BlobStore, digest: Digest, size: int, manifest: bool,
              stopping: threading.Event) -> None:
        """Copy one object through the target's verified write path; raises :class:`_Stopped` (the write
        aborted) once *stopping* is set."""
        if manifest and size <= MAX_MANIFEST_BYTES:  # a signed schema 1 one is checked by its payload's digest
            data = old.read_bytes(digest)
            if data is None:
                raise StoreError(f"{digest} vanished from the source")
            _go_on(stopping, digest)
            new.put_bytes(digest, data)
            return
        writer = new.ingest(digest, size)
        try:
            with old.open_stream(digest) as stream:
                while chunk := stream.read(CHUNK):
                    _go_on(stopping, digest)
                    writer.write(chunk)
            _go_on(stopping, digest)
            writer.commit()
        finally:
            writer.close()  # aborts a write not committed

    def _copy_again(self, old: BlobStore, new: BlobStore, index: Metadata, found: StoredObject) -> None:
        """Replace a target object not matching its digest (damaged since copied) with the source's, verified."""
        assert found.digest is not None
        (_, manifest), = with_manifests([found], index)
        try:
            new.delete(found.digest)
            self._copy(old, new, found.digest, found.size, manifest, threading.Event())
        except (StoreError, OSError) as exc:
            self.report.problems.append(f"does not match its digest in the target: {found.digest} ({exc})")
            return
        self.report.notes.append(f"did not match its digest in the target, copied again: {found.digest}")
        self.report.copied_again += 1

    # -- verifying --

    def _verify(self, old: BlobStore, new: BlobStore, index: Metadata, source: Metadata, same_store: bool,
                pool: Executor) -> None:
        """Check the target against the source, listing the source once more for each pass over its
        objects; the problems found go to the report."""
        if not same_store:
            lookups = None if new.local else pool
            missing: set[Digest] = set()  # as many as the problems they make
            for (digest, found), size in looked_up(lookups, lambda pair: new.size(pair[0]), digested(old), COPIERS):
                if size != found.size:
                    missing.add(digest)
                    self.report.problems.append(f"not in the target at {found.size} bytes: {digest}")
            if self.verify_content:
                self.progress.phase("re-hashing", self.report.bytes)

                def rehash(digest: Digest) -> bool | None:  # None: not there to re-hash
                    return None if digest in missing else new.matches(digest)

                for (_, found), matches in looked_up(pool, lambda pair: rehash(pair[0]), digested(old), COPIERS):
                    if matches is not None:
                        if not matches:
                            self._copy_again(old, new, index, found)
                        self.report.verified += 1
                    self.progress.advance(found.size)
        compared = compare(source, index)
        self.report.records = compared.counts
        self.report.problems += [f"index: {line}" for line in compared.differences]
        lacking = unstored(source, StoredDigests(old, None if old.local else pool, COPIERS).among)
        if lacking.count:
            self.report.notes.append(f"{lacking.count} manifests the index names were not in the source store either"
                                     f" (first: {lacking.first}; mirror fsck)")


def _check_target_objects(new: BlobStore, old: BlobStore, pool: Executor, related: bool) -> None:
    """Refuse a target store holding objects the source does not: another store lives there (a
    bucket's is not bound to an index as a data directory is, so a new database does not show it),
    or a copy of this one made before (*related*) that the source has dropped some of since."""
    found = foreign(new, old, pool, COPIERS)
    if found.count:
        raise Refused(f"the target store holds {found.count} objects the source does not (first: {found.first}):"
                      + (f" it belongs to another store, {SINCE}" if not related else DELETE))


#: The other reason a target holds what the source does not, and what to do (both refusals say it).
SINCE = ("or is a copy of this one made by an older version of the mirror (copies made now catch up when run"
         " again): migrate into an empty one")


#: What to do with a copy made before that holds what the source no longer does.
DELETE = (" it is a copy of this store made before: to withdraw from it what the source no longer holds, run again"
          " with --delete (what was written to the target since it was copied is lost)")


class _Stopped(Exception):
    """A copy given up because the migration is stopping (interrupted, or a driver failed): its write
    was aborted, nothing of it is stored."""


def _go_on(stopping: threading.Event, digest: Digest) -> None:
    if stopping.is_set():
        raise _Stopped(f"the copy of {digest} was given up: the migration is stopping")


def _line(exc: BaseException) -> str:
    """An error's message on one line (libpq's span several)."""
    return " ".join(str(exc).split())
