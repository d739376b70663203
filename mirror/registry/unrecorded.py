"""Repositories pulled from while the store could not record them (it took no writes, or did not
answer): their blob HEADs still go upstream, as after any pull (``PullThrough.blob_head``).  Kept in
memory, the most recent :data:`KEPT`."""

from __future__ import annotations

__all__ = ["KEPT", "Unrecorded"]

#: Repositories remembered.
KEPT = 1024


class Unrecorded:
    """The most recent *kept* repositories added, newest last."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._repos: dict[str, None] = {}

    def add(self, repo: str) -> None:
        self._repos.pop(repo, None)
        self._repos[repo] = None
        while len(self._repos) > self._kept:
            self._repos.pop(next(iter(self._repos)), None)

    def __contains__(self, repo: object) -> bool:
        return repo in self._repos
