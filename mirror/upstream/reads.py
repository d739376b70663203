"""The size of httpcore's socket reads: upstream answers a mebibyte at a time, where httpcore allows.

A library's private internal, used for a measured gain (``tests/bench/README.md``): behind a check
that falls back to httpcore's own reads, logged once (``mirror.upstream.client``), with a test that shows
which path ran (``tests/test_pull_api.py``).  Imports nothing of the mirror.
"""

from __future__ import annotations

import logging

import httpcore

log = logging.getLogger("mirror.upstream.client")

#: Bytes asked of the socket per read of an upstream answer.  httpcore asks 64 KiB; a blob body
#: then costs a pass through httpcore, h11 and httpx every 64 KiB, which kept a cold fill on the
#: event loop at ~300 MB/s (``tests/bench/README.md``).  A read returns what the socket holds, so a
#: larger one never waits for more.
READ_BYTES = 1 << 20


def larger_reads() -> bool:
    """Make httpcore's HTTP/1.1 connections read :data:`READ_BYTES` at a time; whether they do.

    ``AsyncHTTP11Connection.READ_NUM_BYTES`` is httpcore's own class constant, not public API
    (pyproject bounds httpcore to the releases that have it).  When it is gone, one warning is logged
    and answers are read httpcore's way: slower cold fills, nothing else.
    """
    connection = getattr(httpcore, "AsyncHTTP11Connection", None)
    if not isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        log.warning("httpcore %s has no AsyncHTTP11Connection.READ_NUM_BYTES: upstream answers are read "
                    "64 KiB at a time (slower cold pulls)", getattr(httpcore, "__version__", "?"))
        return False
    connection.READ_NUM_BYTES = READ_BYTES  # type: ignore[union-attr]
    return True
