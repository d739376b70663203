"""The data directories of ``mirror migrate``'s two sides (``migrate.py``): the lock it holds on each,
their binding to an index, and the mark of a copy under way in the target's (``DATA/migrating``)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shutil
from collections.abc import Iterator

from ..config.sections import Config
from ..metadata.driver import Metadata
from ..metadata.opening import bind_data_directory
from ..metadata.unfinished import MIGRATING
from ..storage.layout import Layout
from .migratereport import Refused


def bind(config: Config, layout: Layout, side: str, *, record: bool = True, index_id: str | None = None,
         migrating: bool = False) -> None:
    """Refuse a data directory bound to another index than *config*'s (whose id is *index_id* once it
    opened), or, unless *migrating* (the target's, which a run goes on with), the target of another
    migration left unfinished; with *record*, bind one that is bound to none (only once its index
    opened: see :func:`bind_data_directory`)."""
    problem = bind_data_directory(config.metadata, layout.index_binding, config.storage, record=record,
                                  index_id=index_id, migrating=migrating)
    if problem:
        raise Refused(f"{side}: {problem}")


@contextlib.contextmanager
def exclusive(layout: Layout, side: str) -> Iterator[None]:
    """Hold ``DATA/gc.lock`` exclusively: no collection runs and no push makes content reachable meanwhile.
    A data directory made for it is removed again if the run is :class:`Refused` (which writes nothing
    there but the directories a store opens with): a mistyped target leaves no directory behind."""
    made = not layout.root.exists()
    try:
        yield from _locked(layout, side)
    except Refused:
        if made:
            shutil.rmtree(layout.root, ignore_errors=True)
        raise


def _locked(layout: Layout, side: str) -> Iterator[None]:
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.gc_lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise Refused(f"{side}: cannot use {layout.root}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(f"{side}: {layout.gc_lock} is held: a server or `mirror gc` is working on {layout.root};"
                          " stop it before migrating") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def unfinished(layout: Layout, source: str, index: Metadata) -> Iterator[None]:
    """Mark the target's data directory (``DATA/migrating``: the source, and when the run began) and
    its index, if PostgreSQL (``settings.migrating``: other data directories share it), until the run
    reaches its end, problems or not; a run stopped midway (Ctrl-C, ``kill``, a driver's failure)
    leaves them, and ``serve``, ``fsck``, ``gc``, ``preload`` and ``export`` refuse the directory and
    the index (``metadata/unfinished.py``) until a run again ends."""
    mark = layout.root / MIGRATING
    begun = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    partial = mark.with_name(f".{MIGRATING}.partial")  # one run at a time: the lock on the directory
    partial.write_text(f"from {source}, begun {begun}\n")
    os.replace(partial, mark)  # whole or absent: a run killed as it began leaves no empty mark
    shared = getattr(index, "mark_migrating", None)  # (PostgresMetadata's)
    if shared is not None:
        shared(f"from {source}, begun {begun}")
    yield
    if shared is not None:
        shared(None)
    mark.unlink(missing_ok=True)
