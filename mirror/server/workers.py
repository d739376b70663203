"""Several worker processes (``http.workers``) under uvicorn's supervisor, whose ``SIGTERM`` refuses
new connections at once, as one process's does.

The supervisor binds the listening socket and hands it to each worker.  On ``SIGTERM`` each worker
closes its copy and drains for ``http.draintimeout`` (``server/hardening.py``), but the supervisor kept
its own copy open until the last worker ended: the kernel went on queueing connections nobody would
accept, and clients (a load balancer's health checks among them) hung for the whole drain instead of
being refused and going elsewhere.  :class:`DrainingWorkers` closes the supervisor's copy first.
"""

from __future__ import annotations

from typing import Any

from uvicorn import Config
from uvicorn.supervisors.multiprocess import Multiprocess

__all__ = ["DrainingWorkers", "run_workers"]


class DrainingWorkers(Multiprocess):
    def terminate_all(self) -> None:
        for sock in self.sockets:  # the workers close theirs as they begin to drain
            sock.close()
        super().terminate_all()


def run_workers(app: str, workers: int, **options: Any) -> None:
    """``uvicorn.run(app, factory=True, workers=workers, **options)``, under :class:`DrainingWorkers`."""
    config = Config(app, factory=True, workers=workers, **options)
    DrainingWorkers(config, sockets=[config.bind_socket()]).run()
