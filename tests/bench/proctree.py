"""CPU time and resident memory of a process and all its descendants, read from ``/proc``.

A server under test may fork workers (``mirror serve --workers N``, nginx), so every figure
is summed over the whole tree below the process the benchmark started.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Fields of /proc/PID/stat counted from the one after "(comm)": state is 0, ppid 1, utime 11, stime 12.
_PPID, _UTIME, _STIME = 1, 11, 12


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """*root* and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[_PPID]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root: int) -> float:
    """User plus system CPU seconds used so far by *root* and its live descendants."""
    ticks = 0
    for pid in process_tree(root):
        if (fields := _stat(pid)) is not None:
            ticks += int(fields[_UTIME]) + int(fields[_STIME])
    return ticks / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    """Sum of ``VmRSS`` over *pids* (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total


class PeakRss:
    """Sample the tree's RSS every *interval* seconds in a thread; ``peak`` is the largest sum seen.

    The tree is listed once on entry: servers fork their workers at start-up, not under load.
    """

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.pids = process_tree(root)
        self.interval = interval
        self.idle = rss_bytes(self.pids)
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_bytes(self.pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()


def machine_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs' time that something was busy during the next *interval* seconds."""

    def sample() -> tuple[int, int]:
        first = Path("/proc/stat").read_text().split("\n", 1)[0]
        ticks = [int(value) for value in first.split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + ticks[4]

    total_before, idle_before = sample()
    time.sleep(interval)
    total_after, idle_after = sample()
    total = total_after - total_before
    return 1.0 - (idle_after - idle_before) / total if total else 0.0
