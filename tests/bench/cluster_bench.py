"""Cluster benchmark: three mirror replicas against three distribution proxies, each trio behind the
shipped HAProxy configuration (round-robin, no stickiness) on one SeaweedFS.

Run by hand from the repository root (pytest does not collect it)::

    python3 -m tests.bench.cluster_bench          # or: python3 tests/bench/cluster_bench.py

An upstream docker-registry gets ``library/big:1`` with random 64 MiB layers.  Compared:

* ``mirror x3`` -- three mirror processes (``--workers 1`` each, a data directory each) in cluster mode on
  one bucket and one PostgreSQL database: one upstream fetch per blob for all of them;
* ``distribution x3`` -- three docker-registry 2.8 proxies with the ``s3`` driver on one bucket (HAProxy
  checks their ``/v2/``: they have no ``/readyz``).

Measured, each trio on empty storage: upstream bytes per blob byte when 8 and when 32 clients ask for one
cold blob at once through HAProxy (and the wall time for 8); warm GB/s for 8 clients through HAProxy; and,
for the mirror, the extra time to first byte a follower replica adds: a client of the replica fetching
and a client of another replica ask at the same moment while the fetch runs (median of a few blobs).
GB is 10^9 bytes.  Every process started here is stopped however the run ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import contextlib
import os
import secrets
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.bench.harness import progress, scratch
from tests.bench.load import BlobClient, download
from tests.bench.proctree import machine_busy
from tests.bench.pull_bench import REPO, TAG
from tests.bench.s3_bench import S3ProxyRegistry
from tests.support.haproxy import HAProxy
from tests.support.images import Layer, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry import REGISTRY_BINARY, UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3, start_seaweedfs

REPLICAS = 3
BLOB = 64 << 20
COLD_CLIENTS = (8, 32)
WARM_CLIENTS, WARM_REPEATS, WARM_ROUNDS = 8, 2, 3
FOLLOWER_TRIALS = 9

MIRROR, DISTRIBUTION = "mirror x3", "distribution x3"
# Targets.
UPSTREAM_RATIO = 1.0
MIN_WARM_RATIO = 1.0
MAX_FOLLOWER_MS = 20.0


@dataclass
class Results:
    cold: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)  # (label, clients) -> (s, ratio)
    warm: dict[str, float] = field(default_factory=dict)  # label -> GB/s
    follower_ms: list[float] = field(default_factory=list)  # extra first-byte ms, one per trial
    busy: tuple[float, float] = (0.0, 0.0)


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


# -- the trios --

@contextlib.contextmanager
def mirror_trio(root: Path, upstream_url: str, s3: SeaweedS3, postgres: PostgresServer
                ) -> Iterator[tuple[HAProxy, list[MirrorServer]]]:
    bucket, secret = s3.new_bucket(), root / "cluster-secret"
    root.mkdir(parents=True, exist_ok=True)
    secret.write_text(secrets.token_hex(32) + "\n")
    dsn = postgres.create_database()
    try:
        with contextlib.ExitStack() as stack:
            replicas = []
            for n in range(REPLICAS):
                port = free_port()
                env = {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": bucket,
                       "MIRROR_STORAGE_S3_REGIONENDPOINT": s3.endpoint, "MIRROR_STORAGE_S3_FORCEPATHSTYLE": "true",
                       "MIRROR_STORAGE_S3_ACCESSKEY": s3.accesskey, "MIRROR_STORAGE_S3_SECRETKEY": s3.secretkey,
                       "MIRROR_STORAGE_S3_ROOTDIRECTORY": "/registry", "MIRROR_CACHE_MAX_SIZE": "100GiB",
                       "MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn,
                       "MIRROR_CLUSTER_ADVERTISE": f"http://127.0.0.1:{port}",
                       "MIRROR_CLUSTER_SECRET_FILE": str(secret)}
                replicas.append(stack.enter_context(
                    MirrorServer(root / f"replica-{n}" / "data", upstream_url, workers=1, env=env, port=port,
                                 log_dir=root / f"replica-{n}")))
            balancer = stack.enter_context(HAProxy(root / "haproxy", [m.address for m in replicas]))
            yield balancer, replicas
    finally:
        s3.drop_bucket(bucket)


@contextlib.contextmanager
def distribution_trio(root: Path, upstream_url: str, s3: SeaweedS3) -> Iterator[HAProxy]:
    bucket = s3.new_bucket()
    try:
        with contextlib.ExitStack() as stack:
            proxies = [stack.enter_context(S3ProxyRegistry(root / f"proxy-{n}", upstream_url, s3, bucket))
                       for n in range(REPLICAS)]
            yield stack.enter_context(HAProxy(root / "haproxy", [p.url.removeprefix("http://") for p in proxies],
                                              check="/v2/"))
    finally:
        s3.drop_bucket(bucket)


# -- measurements --

def measure_cold(label: str, url: str, upstream: UpstreamRegistry, layers: dict[int, Layer],
                 results: Results) -> None:
    for clients, layer in layers.items():
        progress(f"{label}: {clients} cold clients on one 64 MiB blob")
        upstream.clear_counts()
        got = download(url, blob_path(layer.digest), clients, 1)
        if got.bytes != clients * layer.size:
            raise RuntimeError(f"{label}: {got.bytes} bytes for {clients} x {layer.size}")
        upstream.settle(quiet=1.0)
        served = upstream.log.bytes_served(layer.digest.removeprefix("sha256:"), wait=False)
        results.cold[label, clients] = (got.seconds, served / layer.size)


def measure_warm(label: str, url: str, layer: Layer, results: Results) -> None:
    progress(f"{label}: warm blob, {WARM_CLIENTS} clients")
    rounds = [download(url, blob_path(layer.digest), WARM_CLIENTS, WARM_REPEATS) for _ in range(WARM_ROUNDS)]
    results.warm[label] = statistics.median(got.gb_per_s for got in rounds)


def first_byte(url: str, layer: Layer, out: list[float], go: threading.Event) -> None:
    """GET *layer* from *url* once *go* is set; append the seconds to its first body byte."""
    with BlobClient(url) as client:
        go.wait()
        started = time.perf_counter()
        size = client.get(blob_path(layer.digest))
        if size != layer.size:
            raise RuntimeError(f"{url}: {size} bytes of {layer.digest}")
        out.append(client.first_byte - started)


def measure_follower(replicas: list[MirrorServer], layers: list[Layer], results: Results) -> None:
    """A fetch is started on replica 0; once its first byte is out, one client of replica 0 and one of
    replica 1 ask together: how much later the follower replica's first byte comes."""
    progress(f"{MIRROR}: first byte through a follower replica ({len(layers)} blobs)")
    owner, follower = replicas[0], replicas[1]
    for layer in layers:
        path = blob_path(layer.digest)
        with BlobClient(owner.url) as starter:
            starter_done = threading.Thread(target=starter.get, args=(path,))
            starter_done.start()
            while starter.first_byte == 0.0 and starter_done.is_alive():
                time.sleep(0.0005)
            local: list[float] = []
            remote: list[float] = []
            go = threading.Event()
            threads = [threading.Thread(target=first_byte, args=(owner.url, layer, local, go)),
                       threading.Thread(target=first_byte, args=(follower.url, layer, remote, go))]
            for thread in threads:
                thread.start()
            time.sleep(0.05)  # both connected
            go.set()
            for thread in threads:
                thread.join(120)
            starter_done.join(120)
        if local and remote:
            results.follower_ms.append((remote[0] - local[0]) * 1000)


# -- the run --

def run(root: Path) -> Results:
    progress("building the image (random layers of 64 MiB)")
    dir = root / "images"
    layers = [random_layer(dir, BLOB, seed=700 + n, compressed=False) for n in range(4 + FOLLOWER_TRIALS)]
    image = build_image(dir, layers)
    results = Results()
    with contextlib.ExitStack() as stack:
        progress("starting SeaweedFS, PostgreSQL and the upstream")
        s3 = start_seaweedfs(root / "weed")
        stack.callback(s3.stop)
        postgres = stack.enter_context(PostgresServer())
        upstream = stack.enter_context(UpstreamRegistry(root / "upstream"))
        upstream.push_image(REPO, TAG, image)
        with mirror_trio(root / "mirror", upstream.url, s3, postgres) as (balancer, replicas):
            measure_cold(MIRROR, balancer.url, upstream, dict(zip(COLD_CLIENTS, layers[:2], strict=True)), results)
            measure_warm(MIRROR, balancer.url, layers[0], results)
            measure_follower(replicas, layers[4:], results)
        with distribution_trio(root / "distribution", upstream.url, s3) as balancer:
            measure_cold(DISTRIBUTION, balancer.url, upstream, dict(zip(COLD_CLIENTS, layers[2:4], strict=True)),
                         results)
            measure_warm(DISTRIBUTION, balancer.url, layers[2], results)
    return results


# -- the report --

def _verdict(ok: bool) -> str:
    return "MET " if ok else "MISS"


def report(results: Results) -> str:
    lines: list[str] = []
    out = lines.append
    before, after = results.busy
    out(f"Machine: {os.cpu_count()} CPUs; busy {before:.0%} just before the run, {after:.0%} just after")
    out("")
    out("1. Cold 64 MiB blob, clients at once through HAProxy over 3 replicas")
    out(f"   {'servers':<18}{'clients':>8}{'wall s':>9}{'upstream bytes / blob':>24}")
    for (label, clients), (seconds, ratio) in sorted(results.cold.items()):
        out(f"   {label:<18}{clients:>8}{seconds:>9.2f}{ratio:>23.2f}x")
    out("")
    out(f"2. Warm 64 MiB blob through HAProxy, {WARM_CLIENTS} clients, GB/s (median of {WARM_ROUNDS} rounds)")
    for label, rate in results.warm.items():
        out(f"   {label:<18}{rate:>8.2f}")
    out("")
    out("3. First byte through a follower replica, ms later than through the replica fetching")
    out("   " + ", ".join(f"{ms:.1f}" for ms in results.follower_ms))
    out("")
    out("Targets")
    for clients in COLD_CLIENTS:
        mine = results.cold.get((MIRROR, clients))
        theirs = results.cold.get((DISTRIBUTION, clients))
        if mine is not None:
            baseline = f"{theirs[1]:.2f}x" if theirs else "n/a"
            out(f"  [{_verdict(abs(mine[1] - UPSTREAM_RATIO) < 0.005)}] upstream bytes, {clients} cold clients: "
                f"{mine[1]:.2f}x (target {UPSTREAM_RATIO:.2f}x; distribution {baseline})")
    mine8, theirs8 = results.cold.get((MIRROR, 8)), results.cold.get((DISTRIBUTION, 8))
    if mine8 and theirs8:
        out(f"  [info] cold wall time, 8 clients: {mine8[0] / theirs8[0]:.2f}x distribution's")
    if results.warm.get(DISTRIBUTION):
        ratio = results.warm.get(MIRROR, 0.0) / results.warm[DISTRIBUTION]
        out(f"  [{_verdict(ratio >= MIN_WARM_RATIO)}] warm through HAProxy: {ratio:.2f}x distribution "
            f"(target >= {MIN_WARM_RATIO:.1f}x)")
    if results.follower_ms:
        median = statistics.median(results.follower_ms)
        out(f"  [{_verdict(median <= MAX_FOLLOWER_MS)}] a follower replica's extra first-byte latency: "
            f"{median:.1f} ms median (target <= {MAX_FOLLOWER_MS:.0f} ms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster_bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data) afterwards")
    args = parser.parse_args(argv)
    missing = [tool for tool in (REGISTRY_BINARY, "/usr/sbin/haproxy") if shutil.which(tool) is None]
    if missing:
        print(f"cluster_bench: missing {', '.join(missing)}: apt-get install -y docker-registry haproxy",
              file=sys.stderr)
        return 2
    os.environ.pop("AWS_CA_BUNDLE", None)  # distribution's SDK refuses a CA bundle with its own transport
    started = time.monotonic()
    busy_before = machine_busy()
    with scratch("cluster-bench-", keep=args.keep) as root:
        results = run(root)
        results.busy = (busy_before, machine_busy())
    print(report(results))
    print(f"\n(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
