"""The ``Content-Range`` of a push upload's chunk (distribution-spec, "Pushing a blob in chunks")."""

from __future__ import annotations

import re

from .errors import APIError


def chunk_range(value: str) -> tuple[int, int]:
    """A chunk's ``Content-Range``, ``start-end`` (distribution-spec), also as RFC 9110 section 14.4
    writes it (``bytes start-end/total``, the total a number or ``*``)."""
    start, sep, end = value.strip().removeprefix("bytes ").removeprefix("bytes=").partition("-")
    end, slash, total = end.partition("/")
    if not sep or not re.fullmatch(r"[0-9]{1,19}", start) or not re.fullmatch(r"[0-9]{1,19}", end) \
            or int(end) < int(start) or (slash and not re.fullmatch(r"\*|[0-9]{1,19}", total)):
        raise APIError("BLOB_UPLOAD_INVALID", f"invalid Content-Range {value!r}", status=416)
    return int(start), int(end)  # both inclusive
