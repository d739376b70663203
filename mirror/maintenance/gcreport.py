"""The report of one run of the collector (``maintenance/gc.py``): what it removed, what it kept,
and why the store stays above its target when it does."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.values import human
from ..observe.labels import HELD_REASONS


@dataclass
class Report:
    dry_run: bool
    usage_before: int = 0
    usage_after: int = 0
    budget: int | None = None
    evicted: list[str] = field(default_factory=list)
    tags_removed: int = 0
    links_removed: int = 0
    objects_removed: int = 0
    bytes_freed: int = 0
    objects_kept: int = 0
    seconds: float = 0.0
    target: int | None = None  # bytes to get down to (the low watermark, or less for room a write wanted)
    held: dict[str, int] = field(default_factory=dict)  # reason -> bytes, when the target was not reached

    def kept(self, digests: set[str], files: dict[str, tuple[int, float]]) -> None:
        """Count *digests* (of ``files``: ``digest -> (size, mtime)``), meant to be removed, as kept."""
        held_back = sum(files[d][0] for d in digests if d in files)
        self.objects_removed -= len(digests)
        self.objects_kept += len(digests)
        self.bytes_freed -= held_back
        self.usage_after += held_back

    @property
    def over_budget(self) -> bool:
        return self.budget is not None and self.usage_after > self.budget

    def held_summary(self) -> str:
        """Why the store stays above its target, e.g. ``store 130.0 MiB stays above its budget
        (100.0 MiB): 120.0 MiB in open transfers, 10.0 MiB pinned or pushed``."""
        parts = [f"{human(n)} {HELD_REASONS[reason]}" for reason, n in self.held.items() if n]
        line, limit = ("its budget", self.budget) if self.over_budget else ("the low watermark", self.target)
        return f"store {human(self.usage_after)} stays above {line} ({human(limit or 0)}): " + ", ".join(parts)

    def summary(self) -> str:
        """One line of what the run did; a second, :meth:`held_summary`, when the store stays above its target."""
        verb = "would free" if self.dry_run else "freed"
        budget = f" of a {human(self.budget)} budget" if self.budget else ""
        held = f"\n{self.held_summary()}" if any(self.held.values()) else ""
        return (f"{verb} {self.objects_removed} objects, {human(self.bytes_freed)} "
                f"({len(self.evicted)} images evicted, {self.tags_removed} tags and {self.links_removed} links "
                f"removed); store {human(self.usage_before)} -> {human(self.usage_after)}{budget}, "
                f"{self.objects_kept} objects kept, {self.seconds:.2f}s{held}")
