"""A 256 MiB fill whose replica dies (``kill -9``) or hangs (``SIGSTOP``) at 30%, with clients spread
over three replicas behind HAProxy (the shipped configuration), and the cluster's metrics.

Clients resume as dockerd and containerd do: a transfer cut short or silent for some seconds is asked
for again through HAProxy with ``Range: bytes=<what they have>-``, so the balancer takes them to a
replica that answers.  Every client ends with the blob's bytes, the upstream serves it at most twice
(the first fetch and the takeover's), and ``mirror fsck`` finds the bucket and the index clean.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.faults import FaultProxy
from tests.support.haproxy import HAProxy
from tests.support.images import Image, build_image, random_layer
from tests.support.metrics import scrape, value
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3
from tests.support.storecheck import mirror_cli
from tests.support.waiting import wait_for
from tests.test_cluster import SECRET, replica_env
from tests.test_cluster_fills import Cluster, cluster_figures, start_replicas
from tests.test_cluster_haproxy import all_up
from tests.test_s3_serve import Bucket

pytestmark = pytest.mark.slow
MIB = 1 << 20
REPOSITORY = "library/cluster-huge"


@pytest.fixture(scope="module")
def huge_image(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamRegistry) -> Iterator[Image]:
    """One 256 MiB layer (incompressible), built once for the module in its temporary directory."""
    root = tmp_path_factory.mktemp("huge")
    image = build_image(root, [random_layer(root, 256 * MIB, seed=977, compressed=False)])
    upstream.push_image(REPOSITORY, "1", image)
    yield image
    for path in root.rglob("*"):
        if path.is_file():
            path.unlink()


@pytest.fixture
def cluster(seaweedfs: SeaweedS3, s3_bucket: str, postgres: PostgresServer, tmp_path: Path) -> Cluster:
    secret = tmp_path / "cluster-secret"
    secret.write_text(SECRET)
    return Cluster(Bucket(seaweedfs, s3_bucket), postgres.create_database(), secret)


def blob_bytes_received(replicas: list[MirrorServer]) -> float:
    """Blob bytes these replicas received from the upstream (``mirror_upstream_received_bytes_total``)."""
    return sum(value(scrape(f"{r.url}/metrics"), "mirror_upstream_received_bytes_total", kind="blob")
               for r in replicas)


@dataclass
class Resuming:
    """A client that gets the blob as dockerd does: on a broken or silent transfer it asks again
    through *balancer* from the byte it has (``Range``)."""

    first: str  # where the first request goes (HAProxy, or one replica)
    balancer: str
    read_timeout: float
    size: int = 0
    total: int | None = None
    sha256: str = ""
    #: ``(when, what)`` of each transfer that broke off or stalled.
    interruptions: list[tuple[float, str]] = field(default_factory=list)
    resumed: int = 0  # answers 206 to a Range request
    error: str | None = None


def pull_resuming(client: Resuming, digest: str, deadline: float) -> None:
    hasher = hashlib.sha256()
    url = client.first
    timeout = httpx.Timeout(client.read_timeout, connect=5.0)
    with httpx.Client(trust_env=False, timeout=timeout) as http:
        while client.total is None or client.size < client.total:
            if time.monotonic() > deadline:
                client.error = f"not done in time: {client.size} bytes, {client.interruptions}"
                return
            headers = {"Range": f"bytes={client.size}-"} if client.size else {}
            try:
                with http.stream("GET", f"{url}/v2/{REPOSITORY}/blobs/{digest}", headers=headers) as answer:
                    if answer.status_code not in ((206,) if client.size else (200,)):
                        answer.read()
                        client.interruptions.append((time.monotonic(), f"{answer.status_code} {answer.text[:200]}"))
                        time.sleep(1)
                    else:
                        if client.size:
                            client.resumed += 1
                            if not answer.headers.get("content-range", "").startswith(f"bytes {client.size}-"):
                                client.error = f"asked for bytes {client.size}-, got {answer.headers}"
                                return
                        else:
                            client.total = int(answer.headers["content-length"])
                        for chunk in answer.iter_bytes():
                            hasher.update(chunk)
                            client.size += len(chunk)
            except httpx.HTTPError as exc:
                client.interruptions.append((time.monotonic(), repr(exc)))
            url = client.balancer
    client.sha256 = "sha256:" + hasher.hexdigest()


def start_pulls(clients: list[Resuming], digest: str, timeout: float = 600) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    threads = [threading.Thread(target=pull_resuming, args=(c, digest, deadline)) for c in clients]
    for thread in threads:
        thread.start()
    return threads


def holder_of(cluster: Cluster) -> str | None:
    """The replica whose fill lease is unexpired, if any."""
    live = [holder for (_, holder, unexpired) in cluster.leases() if unexpired]
    return live[0] if live else None


def fsck_clean(cluster: Cluster, replica: MirrorServer) -> None:
    """``mirror fsck --verify-content`` on the bucket and the index, as *replica* sees them."""
    env = replica_env(cluster.bucket, cluster.dsn, cluster.secret_file, replica.port)
    check = mirror_cli("fsck", "--data", replica.data_dir, "--verify-content", env=env, timeout=300)
    assert check.returncode == 0 and check.stdout.rstrip().endswith("clean"), check.stdout + check.stderr


def start_fill(cluster: Cluster, huge: Image, fault_proxy: FaultProxy, balancer: HAProxy,
               replicas: list[MirrorServer], read_timeout: float,
               ) -> tuple[MirrorServer, list[Resuming], list[threading.Thread]]:
    """A first client through HAProxy starts the fill (slowly: about 30 s for the upstream's answer),
    five more follow (round-robin: two on each replica); returns once 30% of the blob was fetched,
    with the replica fetching it, the clients and their threads."""
    layer = huge.layers[0]
    fault_proxy.clear_counts()
    rule = fault_proxy.add("slow", f"/v2/{REPOSITORY}/blobs/{layer.digest}", method="GET", times=1,
                           chunk_size=256 << 10, delay=0.03)
    clients = [Resuming(balancer.url, balancer.url, read_timeout) for _ in range(6)]
    threads = start_pulls(clients[:1], layer.digest)
    wait_for(lambda: holder_of(cluster) is not None, timeout=60, what="the fill lease taken")
    owner = next(r for r in replicas if r.url == holder_of(cluster))
    threads += start_pulls(clients[1:], layer.digest)
    wait_for(lambda: all(c.size >= 8 * MIB for c in clients), timeout=120, what="every client under way")
    wait_for(lambda: rule.sent >= 0.3 * layer.size, timeout=120, what="30% of the blob fetched")
    return owner, clients, threads


def test_kill9_of_the_replica_fetching_256mib_at_30_percent_ends_every_client_with_the_blob(
    cluster: Cluster, huge_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    tmp_path: Path,
) -> None:
    layer = huge_image.layers[0]
    replicas = start_replicas(cluster, 3, fault_proxy.url, mirror_factory, MIRROR_CLUSTER_LEASE_TTL="2s")
    with HAProxy(tmp_path / "haproxy", [r.address for r in replicas]) as balancer:
        wait_for(lambda: all_up(balancer), timeout=15, what=f"every replica UP in HAProxy: {balancer.states()}")
        owner, clients, threads = start_fill(cluster, huge_image, fault_proxy, balancer, replicas, read_timeout=60)
        owner.kill9()
        for thread in threads:
            thread.join(600)
    others = [r for r in replicas if r is not owner]

    assert [(c.error, c.size, c.sha256) for c in clients] == [(None, layer.size, layer.digest)] * 6
    # The killed replica's clients went on from what they had, elsewhere; the others' only paused.
    cut = [c for c in clients if c.interruptions]
    assert cut and all(c.resumed for c in cut), [c.interruptions for c in clients]
    assert len(clients) - len(cut) >= 3, [c.interruptions for c in clients]
    # The replica that took the fill over asked the upstream for the rest only, one Range request: about
    # 70% of the blob.
    gets = [r.status for r in fault_proxy.requests() if r.method == "GET" and r.path.endswith(layer.digest)]
    assert gets == [200, 206], gets
    assert blob_bytes_received(others) < 0.9 * layer.size, blob_bytes_received(others)
    wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=60, what="the layer in the bucket")
    assert cluster.bucket.digest_of(layer.digest) == layer.digest
    # The killed replica's multipart upload was aborted by the one that took its fill over (it never restarts).
    wait_for(lambda: cluster.bucket.uploads() == [], timeout=30, what=f"no upload left: {cluster.bucket.uploads()}")
    figures = {r.url: cluster_figures(r) for r in others}
    assert sum(f["takeover"] for f in figures.values()) == 1, figures  # one of them took the fill over
    assert sum(f["follower"] for f in figures.values()) == 2, figures
    assert sum(f["stream errors"] for f in figures.values()) >= 2, figures  # both streams from it broke
    for replica in others:
        replica.stop()
    fsck_clean(cluster, others[0])


def test_a_hung_replica_fetching_256mib_is_taken_over_and_once_resumed_finds_itself_fenced(
    cluster: Cluster, huge_image: Image, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorServer],
    tmp_path: Path,
) -> None:
    """SIGSTOP at 30%: the hung replica's connections stay open and silent.  HAProxy's ``/readyz``
    check takes it out; its clients through HAProxy resume elsewhere after a read timeout; the
    followers' streams from it stall, and once its lease expired (no heartbeat) one of them takes
    the fill over.  Resumed (SIGCONT), it finds its lease's token gone, stores nothing and cuts its
    own clients off: one connected to it directly resumes through HAProxy."""
    layer = huge_image.layers[0]
    replicas = start_replicas(cluster, 3, fault_proxy.url, mirror_factory, MIRROR_CLUSTER_LEASE_TTL="2s")
    with HAProxy(tmp_path / "haproxy", [r.address for r in replicas]) as balancer:
        wait_for(lambda: all_up(balancer), timeout=15, what=f"every replica UP in HAProxy: {balancer.states()}")
        owner, clients, threads = start_fill(cluster, huge_image, fault_proxy, balancer, replicas, read_timeout=10)
        direct = Resuming(owner.url, balancer.url, read_timeout=600)
        threads += start_pulls([direct], layer.digest)
        wait_for(lambda: direct.size >= 8 * MIB, timeout=60, what="a client of the owner's own under way")
        owner.pause()
        try:
            name = f"mirror{replicas.index(owner) + 1}"
            wait_for(lambda: balancer.states()[name].startswith("DOWN"), timeout=30,
                     what=f"the hung replica out of the rotation: {balancer.states()}")
            wait_for(lambda: holder_of(cluster) not in (None, owner.url), timeout=120, what="the fill taken over")
        finally:
            resumed = time.monotonic()
            owner.resume()
        for thread in threads:
            thread.join(600)
    others = [r for r in replicas if r is not owner]

    assert [(c.error, c.size, c.sha256) for c in [*clients, direct]] == [(None, layer.size, layer.digest)] * 7
    # The hung replica's clients through HAProxy went on elsewhere after their read timeout.
    assert any(c.resumed for c in clients), [c.interruptions for c in clients]
    # Its own client was cut off once it was resumed, not before, and finished elsewhere.
    assert direct.interruptions and direct.interruptions[0][0] >= resumed, direct.interruptions
    assert direct.resumed >= 1
    assert "the fill lease expired or was taken over" in owner.log_path.read_text()
    assert fault_proxy.count("GET", f"/v2/{REPOSITORY}/blobs/{layer.digest}") <= 3
    assert blob_bytes_received(replicas) < 1.15 * layer.size, blob_bytes_received(replicas)  # the rest only
    wait_for(lambda: layer.digest in cluster.bucket.objects(), timeout=60, what="the layer in the bucket")
    assert cluster.bucket.digest_of(layer.digest) == layer.digest
    wait_for(lambda: cluster.bucket.uploads() == [], timeout=30, what="no multipart upload left")
    figures = {r.url: cluster_figures(r) for r in replicas}
    assert figures[owner.url]["fenced"] == 1, figures
    assert sum(figures[r.url]["takeover"] for r in others) == 1, figures
    assert sum(figures[r.url]["stream errors"] for r in others) >= 1, figures
    for replica in replicas:
        replica.stop()
    fsck_clean(cluster, others[0])
