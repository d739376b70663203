"""Metrics of a replica's part in the cluster's shared fills (``registry/cluster.py``), on the
process's own registry (:class:`~mirror.observe.metrics.Metrics`).  Prometheus's ``instance``
label tells the replicas apart.

==============================================  ==========================================================
``mirror_cluster_fills_total``                   role: ``owner`` (took the lease, fetched from the upstream),
                                                 ``follower`` (streamed another replica's fill),
                                                 ``takeover`` (took the lease of a replica that died or hung,
                                                 fetched again from the byte it had)
``mirror_cluster_fills_fenced_total``            fills given up because their lease expired or was taken
                                                 over (the fencing token changed): nothing was stored
``mirror_cluster_peer_stream_errors_total``      reason: ``broken`` (a fill stream from another replica
                                                 ended early), ``stalled`` (no byte for the read timeout),
                                                 ``refused`` (401/403: ``cluster.secret_file`` differs)
``mirror_cluster_peer_received_bytes_total``     blob bytes streamed from other replicas' fills
==============================================  ==========================================================

Every label combination starts at 0, as in :class:`~mirror.observe.metrics.Metrics`.
"""

from __future__ import annotations

from prometheus_client import Counter

from .metrics import Metrics

ROLES = ("owner", "follower", "takeover")
STREAM_ERRORS = ("broken", "stalled", "refused")


class ClusterMetrics:
    """What one replica's fills record; built once per process, with the app's :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.enabled = metrics.enabled
        if not self.enabled:
            return
        r = metrics.registry
        self.fills = Counter(
            "mirror_cluster_fills", "Fills of a blob this replica took part in, by role (owner: fetched "
            "it under the lease, follower: streamed another replica's fill, takeover: took a stopped "
            "replica's lease over and fetched it again).", ["role"], registry=r)
        self.fenced = Counter(
            "mirror_cluster_fills_fenced", "Fills this replica gave up because its lease expired or was "
            "taken over by another replica (nothing stored).", registry=r)
        self.stream_errors = Counter(
            "mirror_cluster_peer_stream_errors", "Fill streams from another replica that failed, by reason "
            "(broken: cut short, stalled: silent for the read timeout, refused: signature not accepted).",
            ["reason"], registry=r)
        self.peer_bytes = Counter(
            "mirror_cluster_peer_received_bytes", "Blob bytes streamed from other replicas' fills.", registry=r)
        for role in ROLES:
            self.fills.labels(role)
        for reason in STREAM_ERRORS:
            self.stream_errors.labels(reason)

    def fill(self, role: str) -> None:
        """This replica took part in a fill as *role* (one of :data:`ROLES`)."""
        if self.enabled:
            self.fills.labels(role).inc()

    def fenced_off(self) -> None:
        """A fill under this replica's lease was given up: the lease is another's now."""
        if self.enabled:
            self.fenced.inc()

    def stream_error(self, reason: str) -> None:
        """A stream from another replica's fill failed (*reason*: one of :data:`STREAM_ERRORS`)."""
        if self.enabled:
            self.stream_errors.labels(reason).inc()

    def received(self, size: int) -> None:
        """*size* bytes came from another replica's fill."""
        if self.enabled and size:
            self.peer_bytes.inc(size)
