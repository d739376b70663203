"""The marks of a ``mirror migrate`` under way (``maintenance/migrateside.py`` makes them): a target
holds part of a store until a run reaches its end, and no server, collector or check takes it so.

Two marks, for the two ways a target is reached:

- ``DATA/migrating``, in the target's data directory: the store that directory holds (filesystem),
  or its work in progress beside a bucket (S3).
- ``settings.migrating`` in a PostgreSQL target index: that index, and the bucket its store is in,
  are shared by every data directory a configuration names (another host, a cluster's replicas, a
  pod's ``emptyDir``), none of which holds the first mark.  Without it a mirror started on another
  data directory took the partial copy as a whole store: ``mirror fsck`` called it clean, and
  ``mirror gc`` deleted the copied objects no record named yet once ``gc.grace`` had passed.

Each holds one line: the source, and when the run began.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

#: The file ``mirror migrate`` keeps in its target's data directory until a run reaches its end.
MIGRATING = "migrating"


def directory_problem(binding: Path) -> str | None:
    """Why the data directory whose binding file is *binding* (``DATA/index.json``) must not be used:
    the target of a ``mirror migrate`` stopped midway; or None."""
    mark = binding.with_name(MIGRATING)
    with contextlib.suppress(FileNotFoundError):
        return (f"{binding.parent} is the target of a `mirror migrate` that did not finish"
                f" ({mark.read_text().strip()}): it holds part of a store; run the same `mirror migrate` again"
                f" to finish it (or, to use the directory as it is, remove {mark}, and from a PostgreSQL index"
                f" the row 'migrating' of its settings table)")
    return None


def index_problem(metadata: Any, where: str) -> str | None:
    """Why the index *metadata* (described by *where*) must not be used: the target of a ``mirror
    migrate`` stopped midway (``settings.migrating``: PostgreSQL only, a diskcache index being its
    data directory's); or None."""
    recorded = getattr(metadata, "migrating", None)
    begun = recorded() if recorded is not None else None
    if begun is None:
        return None
    return (f"{where} is the target of a `mirror migrate` that did not finish ({begun}): it and its store hold part of"
            " a store; run the same `mirror migrate` again to finish it (or, to use them as they are, delete the"
            " row 'migrating' from that database's settings table)")
