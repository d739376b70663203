"""One path-matching rule for every request counter in tests/support.

``count(method, path, status)`` on the upstream registry, the proxy
registry, the fault proxy and the Hub emulator all take *path* as either a
``str`` (matched as a substring) or a compiled ``re.Pattern`` (searched).
"""

from __future__ import annotations

import re

PathMatch = str | re.Pattern[str]


def path_matches(path: str, pattern: PathMatch) -> bool:
    """True if *path* contains the string *pattern*, or the regex finds a match."""
    if isinstance(pattern, str):
        return pattern in path
    return pattern.search(path) is not None


def request_matches(
    method: str, path: str, status: int | None,
    want_method: str | None, want_path: PathMatch, want_status: int | None,
) -> bool:
    """Match a logged request against a query; None in a query means "any"."""
    return (
        (want_method is None or method == want_method.upper())
        and (want_status is None or status == want_status)
        and path_matches(path, want_path)
    )
