"""The report of one run of ``mirror fsck`` (``maintenance/fsck.py``): its findings, what it looked at,
and the objects no repository links; and the images it checks, with what a pull of each needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.values import human
from ..metadata.driver import LOCAL
from ..spec.manifest import is_nondistributable, references
from ..spec.pushed import subject_digest


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
    unreferenced: list[int] = field(default_factory=list)  # sizes of the objects no repository links

    @property
    def clean(self) -> bool:
        return all(f.repaired for f in self.findings)

    def lines(self, verify_content: bool) -> list[str]:
        """What ``mirror fsck`` prints: each finding, the objects no repository links (a count: not a
        problem, ``mirror gc`` removes them), then the summary, whose last word is ``clean``,
        ``repaired`` or the number of problems."""
        unused, count = self.unreferenced, len(self.findings)
        said = [f"{len(unused)} object{'s' * (len(unused) != 1)} ({human(sum(unused))}) no repository links: "
                "mirror gc removes them once older than gc.grace"] if unused else []
        state = "clean" if not count else ("repaired" if self.clean else f"{count} problem{'s' * (count != 1)}")
        verified = f", {self.verified} re-hashed" if verify_content else ""
        return [*map(str, self.findings), *said, f"{self.objects} objects ({self.bytes} bytes{verified}), "
                f"{self.tags} tags, {self.links} links: {state}"]


@dataclass(frozen=True, slots=True)
class Image:
    """A manifest linked in a repository, and the ``(digest, size)`` of each object a pull of it
    needs (size -1: not given)."""

    repo: str
    digest: str
    needs: tuple[tuple[str, int], ...]
    index: bool = False  # an image index (or manifest list): what it needs are manifests


def pull_needs(body: bytes, digest: str) -> tuple[tuple[str, int], ...]:
    """``(digest, size)`` of what a pull of the manifest *body* (named *digest*) needs from the store."""
    subject = subject_digest(body)
    return tuple((d.digest, -1 if isinstance(d.size, bool) else d.size) for d in references(body)
                 if d.digest not in (digest, subject) and not is_nondistributable(d.media_type))


def cached_repo(repo: str) -> bool:
    """Whether *repo* is a cached repository (one of an upstream), not a pushed one."""
    return not repo.startswith(LOCAL + "/")
