"""``python -m tests.support.skewed_clock serve ...``: ``python -m mirror`` on a host whose clock is
``SKEWED_CLOCK_SECONDS`` seconds off (a VM without NTP): ``time.time`` and ``time.time_ns`` are
shifted before the mirror starts; monotonic clocks are not.  Only with one worker (``--workers 1``):
workers start fresh interpreters.
"""

from __future__ import annotations

import os
import time


def install(skew: float) -> None:
    wall, wall_ns = time.time, time.time_ns
    time.time = lambda: wall() + skew
    time.time_ns = lambda: wall_ns() + int(skew * 1e9)


if __name__ == "__main__":
    install(float(os.environ["SKEWED_CLOCK_SECONDS"]))
    from mirror.cli import main

    raise SystemExit(main())
