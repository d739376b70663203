"""What ``mirror migrate`` (``migrate.py``) did and found, with its one-line summary, or why it could not start."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Refused", "Report"]


class Refused(Exception):
    """The migration cannot start; the message (one line) says why.  No object or record was
    written (an empty target's directories may have been made)."""


@dataclass
class Report:
    """What a migration did and found."""

    objects: int = 0  # objects of the source (with a well-formed digest)
    bytes: int = 0
    copied: int = 0
    bytes_copied: int = 0
    present: int = 0  # already in the target
    strays: int = 0  # not objects: left behind
    records: dict[str, int] = field(default_factory=dict)
    uploads: int = 0  # blob uploads in progress, not carried over
    verified: int = 0  # re-hashed in the target
    copied_again: int = 0  # found not matching their digest there when re-hashed, and copied again
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        records = ", ".join(f"{count} {kind}" for kind, count in self.records.items() if count)
        rehashed = f", {self.verified} re-hashed" if self.verified else ""
        rehashed += f", {self.copied_again} of them copied again" if self.copied_again else ""
        state = "verified" if not self.problems else f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}"
        return (f"{self.objects} objects ({self.bytes} bytes; {self.copied} copied, {self.present} already there"
                f"{rehashed}); {records or 'no records'}; {self.seconds:.1f}s: {state}")
