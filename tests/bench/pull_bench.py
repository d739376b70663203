"""Pull benchmark: the mirror against distribution's proxy mode and nginx, all on loopback.

Run by hand from the repository root (pytest does not collect it)::

    python3 -m tests.bench.pull_bench          # or: python3 tests/bench/pull_bench.py

An upstream docker-registry gets ``library/big:1``, an image with random layers of 64 MiB
(the *warm* blob) and 256 MiB (the *cold* blob).  In front of it run the mirror
(``--workers 1``, and 2 where cheap), docker-registry in proxy mode, and nginx serving the
same files.  Measured:

1. warm blob throughput with 1 and 8 clients (the servers taking turns, round after round), and
   server CPU-seconds per GB;
2. manifest GETs per second by tag and by digest (``wrk``);
3. a cold fetch of the 256 MiB blob by 1 and by 8 clients, each case on fresh storage, five
   times (the servers taking turns; medians): wall time, time to the first byte (against the
   upstream's own, measured directly), and bytes the upstream served divided by the blob's size;
4. peak RSS of each server's process tree while 32 clients fetch the warm blob.

GB is 10^9 bytes, MiB 2^20.  Every process started here is stopped (by process group)
however the run ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TypeVar

from tests.bench.harness import new_pages_write, progress, scratch
from tests.bench.load import Downloads, WrkResult, download, wrk
from tests.bench.nginx import NGINX_BINARY, NginxBlobServer
from tests.bench.proctree import PeakRss, cpu_seconds, machine_busy
from tests.support.client import fetch_blob_digest, get_manifest
from tests.support.images import OCI_MANIFEST, Image, Layer, build_image, random_layer
from tests.support.mirror import MirrorServer
from tests.support.registry import REGISTRY_BINARY, ProxyRegistry, UpstreamRegistry

MIB = 1 << 20
REPO, TAG = "library/big", "1"
WARM_SIZE, COLD_SIZE = 64 * MIB, 256 * MIB
#: Downloads of the warm blob per client: about 1.5 GiB in all with 1 client, 2 GiB with 8.
WARM_REPEATS = {1: 24, 8: 4}
#: Rounds of each warm measurement, the servers taking turns: the median throughput is reported (a
#: shared VM is noisy; a round costs about half a second).
WARM_ROUNDS = 5
COLD_CLIENTS = (1, 8)
#: Cold fetches per server and client count (fresh storage each, the servers taking turns): a single
#: fetch of a few tenths of a second moves by a third from one run to the next on a small VM, and its
#: first byte with eight clients by half (the upstream's own answer takes 1-9 ms of it).
COLD_ROUNDS = 5
RSS_CLIENTS = 32
WRK_SECONDS = 5

# Targets for the mirror.
MIN_WARM_RATIO = 1.0
MAX_CPU_PER_GB = 0.4
MIN_RPS_RATIO = {"tag": 30.0, "digest": 15.0}
#: Cold wall time over distribution's, by clients (distribution fetches once per client, plus once).
MAX_COLD_RATIO = {1: 1.2, 8: 1.0}
#: Seconds a cold fetch's first byte may come after the upstream's own first byte.
TTFB_SLACK = 0.010
UPSTREAM_TTFB_TRIES = 5
UPSTREAM_RATIO = 1.0
MAX_PEAK_RSS = 100 * MIB

T = TypeVar("T")

DISTRIBUTION = "distribution"
NGINX = "nginx"


@dataclass(frozen=True)
class Server:
    """A running server under test: its label, URL, process-tree root, and where it stores a blob."""

    label: str
    url: str
    pid: int
    blob_file: Callable[[str], Path]


@dataclass(frozen=True)
class Warm:
    """Warm blob throughput, and CPU-seconds per GB of the server and of the client."""

    label: str
    clients: int
    gb_per_s: float
    server_cpu_per_gb: float
    client_cpu_per_gb: float


@dataclass(frozen=True)
class Rps:
    """Manifest GETs per second by tag and by digest."""

    label: str
    tag: WrkResult
    digest: WrkResult


@dataclass(frozen=True)
class Cold:
    """A cold fetch: wall time until the last client is done, until the slowest client's first
    byte, and upstream bytes per blob byte."""

    label: str
    clients: int
    seconds: float
    first_byte: float
    upstream_ratio: float


@dataclass(frozen=True)
class Memory:
    """RSS of the server's process tree before the load, and the largest sample under it."""

    label: str
    idle: int
    peak: int


@dataclass
class Results:
    """Everything measured, in the order it was measured."""

    warm: list[Warm] = field(default_factory=list)
    rps: list[Rps] = field(default_factory=list)
    cold: list[Cold] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The upstream's own time to the first byte of the cold blob (median of a few GETs), seconds.
    upstream_ttfb: float | None = None
    #: Share of the machine's CPU that was busy just before and just after the run (others' processes).
    busy: tuple[float, float] = (0.0, 0.0)
    #: Seconds to write 256 MiB to new page-cache pages at the start (harness.new_pages_write).
    new_pages: float = 0.0



# -- servers --

def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


@contextlib.contextmanager
def running_mirror(root: Path, upstream_url: str, workers: int) -> Iterator[Server]:
    with MirrorServer(root / "data", upstream_url, workers=workers, log_dir=root) as mirror:
        assert mirror.pid is not None
        yield Server(f"mirror w{workers}", mirror.url, mirror.pid,
                     lambda digest: root / "data" / "blobs" / "sha256" / _hex(digest)[:2] / _hex(digest))


@contextlib.contextmanager
def running_proxy(root: Path, upstream_url: str) -> Iterator[Server]:
    with ProxyRegistry(root, upstream_url) as proxy:
        assert proxy.pid is not None
        blobs = proxy.data_dir / "docker" / "registry" / "v2" / "blobs" / "sha256"
        yield Server(DISTRIBUTION, proxy.url, proxy.pid,
                     lambda digest: blobs / _hex(digest)[:2] / _hex(digest) / "data")


@contextlib.contextmanager
def running_nginx(root: Path, blobs: dict[str, Path]) -> Iterator[Server]:
    with NginxBlobServer(root, blobs) as nginx:
        assert nginx.pid is not None
        yield Server(NGINX, nginx.url, nginx.pid, lambda digest: root / "blobs" / digest)


def wait_stored(server: Server, digest: str, timeout: float = 60.0) -> None:
    """Wait until *server* has the blob in its own storage (distribution stores it in the background)."""
    deadline = time.monotonic() + timeout
    while not server.blob_file(digest).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.label} did not store {digest} within {timeout}s")
        time.sleep(0.05)


# -- measurements --

def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def check_blob(server: Server, layer: Layer) -> None:
    """Fetch the blob once, hashing it: the server serves the right bytes (and is warm afterwards)."""
    digest, size = fetch_blob_digest(server.url, REPO, layer.digest)
    if (digest, size) != (layer.digest, layer.size):
        raise RuntimeError(f"{server.label} served {size} bytes hashing to {digest} for {layer.digest}")
    wait_stored(server, layer.digest)


def measure_warm(servers: list[Server], layer: Layer, results: Results) -> None:
    """Each client count: :data:`WARM_ROUNDS` rounds, the servers taking turns in every round, so
    each meets the same machine (a writeback or a neighbour's burst does not fall on one alone).
    Reported: the median throughput of a server's rounds, and its CPU per GB over all of them."""
    measured: dict[str, list[Warm]] = {server.label: [] for server in servers}
    for clients in WARM_REPEATS:
        rounds: dict[str, list[Downloads]] = {server.label: [] for server in servers}
        cpu = dict.fromkeys(rounds, 0.0)
        for _ in range(WARM_ROUNDS):
            for server in servers:
                before = cpu_seconds(server.pid)
                rounds[server.label].append(download(server.url, blob_path(layer.digest), clients,
                                                     WARM_REPEATS[clients]))
                cpu[server.label] += cpu_seconds(server.pid) - before
        for label, got in rounds.items():
            gigabytes = sum(each.bytes for each in got) / 1e9
            measured[label].append(Warm(label, clients, statistics.median(each.gb_per_s for each in got),
                                        cpu[label] / gigabytes, sum(each.client_cpu for each in got) / gigabytes))
    for rows in measured.values():
        results.warm.extend(rows)


def measure_memory(server: Server, layer: Layer) -> Memory:
    with PeakRss(server.pid) as sampler:
        download(server.url, blob_path(layer.digest), RSS_CLIENTS, 1)
    return Memory(server.label, sampler.idle, sampler.peak)


def measure_rps(server: Server, image: Image) -> Rps:
    urls = {ref: f"{server.url}/v2/{REPO}/manifests/{ref}" for ref in (TAG, image.digest)}
    for ref in urls:
        answer = get_manifest(server.url, REPO, ref, accept=(OCI_MANIFEST,))
        if answer.status_code != 200 or answer.content != image.manifest:
            raise RuntimeError(f"{server.label}: manifest {ref} answered {answer.status_code}")
    tag, digest = (wrk(urls[ref], accept=OCI_MANIFEST, seconds=WRK_SECONDS) for ref in (TAG, image.digest))
    return Rps(server.label, tag, digest)


def measure_servers(servers: list[Server], upstream: UpstreamRegistry, image: Image, warm: Layer,
                    results: Results, parts: tuple[str, ...]) -> None:
    """Of *parts*: warm throughput (1 and 8 clients, the servers taking turns) and peak RSS (32
    clients), manifest rps (of the servers that have an upstream: not nginx)."""
    if "warm" in parts:
        for server in servers:
            progress(f"{server.label}: fetching the warm blob once")
            check_blob(server, warm)
        os.sync()  # what the set-up wrote goes to the disk now, not during some server's rounds
        upstream.clear_counts()
        progress(f"warm blob throughput, {', '.join(server.label for server in servers)} taking turns")
        measure_warm(servers, warm, results)
        for server in servers:
            progress(f"{server.label}: memory")
            results.memory.append(measure_memory(server, warm))
        refetched = upstream.bytes_served(_hex(warm.digest))
        if refetched:
            results.notes.append(f"{refetched} bytes of the warm blob were fetched again from upstream")
    if "rps" in parts:
        for server in servers:
            if server.label != NGINX:
                progress(f"{server.label}: manifest requests per second")
                results.rps.append(measure_rps(server, image))


def measure_cold(start: Callable[[Path], AbstractContextManager[Server]], root: Path,
                 upstream: UpstreamRegistry, cold: Layer, clients: int) -> Cold:
    """*clients* fetch the cold blob at once from a server with empty storage."""
    os.sync()  # the previous case's writes go to the disk before this one, not during it
    with start(root) as server:
        progress(f"{server.label}: cold fetch by {clients} client(s)")
        upstream.clear_counts()
        got = download(server.url, blob_path(cold.digest), clients, 1)
        wait_stored(server, cold.digest)
        upstream.settle(quiet=1.0)
        served = upstream.bytes_served(_hex(cold.digest), wait=False)
    return Cold(server.label, clients, got.seconds, got.first_byte, served / cold.size)


def measure_upstream_ttfb(upstream: UpstreamRegistry, cold: Layer) -> float:
    """The upstream's own time to the first byte of the cold blob: the median of a few GETs."""
    return statistics.median(download(upstream.url, blob_path(cold.digest), 1, 1).first_byte
                             for _ in range(UPSTREAM_TTFB_TRIES))


# -- the run --

def build_image_files(dir: Path) -> tuple[Image, Layer, Layer]:
    progress("building the image (random layers of 64 and 256 MiB)")
    warm = random_layer(dir, WARM_SIZE, seed=64, compressed=False)
    cold = random_layer(dir, COLD_SIZE, seed=256, compressed=False)
    return build_image(dir, [warm, cold]), warm, cold


#: The parts of the run ``--only`` can choose.
PARTS = ("warm", "rps", "cold")


def run(root: Path, *, workers2: bool, parts: tuple[str, ...] = PARTS) -> Results:
    image, warm, cold = build_image_files(root / "images")
    results = Results()
    with UpstreamRegistry(root / "upstream") as upstream:
        progress(f"pushing {REPO}:{TAG} to {upstream.url}")
        upstream.push_image(REPO, TAG, image)
        worker_counts = (1, 2) if workers2 else (1,)
        if "warm" in parts or "rps" in parts:
            with contextlib.ExitStack() as running:
                servers = [running.enter_context(running_mirror(root / f"mirror-warm-w{n}", upstream.url, n))
                           for n in worker_counts]
                servers.append(running.enter_context(running_proxy(root / "proxy-warm", upstream.url)))
                if "warm" in parts:
                    servers.append(running.enter_context(running_nginx(root / "nginx", {warm.digest: warm.path})))
                measure_servers(servers, upstream, image, warm, results, parts)
        if "cold" not in parts:
            return results
        progress("upstream: time to first byte of the cold blob")
        results.upstream_ttfb = measure_upstream_ttfb(upstream, cold)

        starters: list[tuple[str, Callable[[Path], AbstractContextManager[Server]]]] = [
            *((f"mirror-w{n}", lambda dir, n=n: running_mirror(dir, upstream.url, n)) for n in worker_counts),
            ("proxy", lambda dir: running_proxy(dir, upstream.url)),
        ]
        rounds: dict[tuple[str, int], list[Cold]] = {}
        for round_ in range(COLD_ROUNDS):
            for name, start in starters:
                for clients in COLD_CLIENTS:
                    cold_root = root / f"cold-{name}-{clients}-{round_}"
                    rounds.setdefault((name, clients), []).append(
                        measure_cold(start, cold_root, upstream, cold, clients))
                    shutil.rmtree(cold_root, ignore_errors=True)
        results.cold.extend(median_cold(each) for each in rounds.values())
    return results


def median_cold(rounds: list[Cold]) -> Cold:
    """One server's cold fetches with one client count: the medians of the times, and the most the
    upstream served (1.00x must hold in every round)."""
    return Cold(rounds[0].label, rounds[0].clients, statistics.median(c.seconds for c in rounds),
                statistics.median(c.first_byte for c in rounds), max(c.upstream_ratio for c in rounds))


# -- the report --

def _find(items: list[T], **want: object) -> T | None:
    return next((item for item in items if all(getattr(item, k) == v for k, v in want.items())), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _verdict(ok: bool) -> str:
    return "MET " if ok else "MISS"


def report(results: Results) -> str:
    lines: list[str] = []
    out = lines.append
    mirrors = sorted({row.label for row in (*results.warm, *results.rps, *results.cold)
                      if row.label.startswith("mirror")})

    before, after = results.busy
    out(f"Machine: {os.cpu_count()} CPUs; busy {before:.0%} just before the run, {after:.0%} just after "
        f"(other processes; anything but ~0% makes the figures noisy); 256 MiB written to new "
        f"page-cache pages in {results.new_pages:.2f} s (a cold fill writes so: see tests/bench/README.md)")
    out("")
    out(f"1. Warm blob throughput: 64 MiB blob, already cached; median of {WARM_ROUNDS} rounds, "
        "the servers taking turns; GB = 1e9 bytes")
    out(f"   {'server':<14}{'clients':>8}{'GB/s':>8}{'server CPU-s/GB':>17}{'client CPU-s/GB':>17}")
    for w in results.warm:
        out(f"   {w.label:<14}{w.clients:>8}{w.gb_per_s:>8.2f}{w.server_cpu_per_gb:>17.3f}"
            f"{w.client_cpu_per_gb:>17.3f}")
    for label in mirrors:
        for other in (DISTRIBUTION, NGINX):
            ratios = ", ".join(
                f"{clients} client(s) {_x(_ratio(_gbps(results, label, clients), _gbps(results, other, clients)))}"
                for clients in WARM_REPEATS)
            out(f"   {label} / {other}: {ratios}")

    out("")
    out(f"2. Manifest GETs per second: wrk -t2 -c32 -d{WRK_SECONDS}s, Accept: {OCI_MANIFEST}")
    out(f"   {'server':<14}{'by tag':>10}{'by digest':>12}{'errors':>8}")
    for r in results.rps:
        out(f"   {r.label:<14}{r.tag.rps:>10.0f}{r.digest.rps:>12.0f}{r.tag.bad + r.digest.bad:>8}")
    for label in mirrors:
        out(f"   {label} / {DISTRIBUTION}: by tag {_x(_rps_ratio(results, label, 'tag'))}, "
            f"by digest {_x(_rps_ratio(results, label, 'digest'))}")

    out("")
    out(f"3. Cold fetch of the 256 MiB blob, fresh storage for each case, medians of {COLD_ROUNDS} rounds;"
        " first byte: the slowest client's")
    if results.upstream_ttfb is not None:
        out(f"   upstream's own first byte (median of {UPSTREAM_TTFB_TRIES} GETs): "
            f"{results.upstream_ttfb * 1000:.1f} ms")
    out(f"   {'server':<14}{'clients':>8}{'wall s':>8}{'first byte ms':>15}{'upstream bytes / blob':>23}")
    for c in results.cold:
        out(f"   {c.label:<14}{c.clients:>8}{c.seconds:>8.2f}{c.first_byte * 1000:>15.1f}"
            f"{_x(c.upstream_ratio):>23}")
    for label in mirrors:
        ratios = ", ".join(f"{clients} client(s) {_x(_cold_ratio(results, label, clients))}"
                           for clients in COLD_CLIENTS)
        out(f"   {label} / {DISTRIBUTION} wall time: {ratios}")

    out("")
    out(f"4. Memory: sum of VmRSS over the server's processes, {RSS_CLIENTS} clients fetching the warm blob")
    out(f"   {'server':<14}{'idle MiB':>10}{'peak MiB':>10}")
    for m in results.memory:
        out(f"   {m.label:<14}{m.idle / MIB:>10.1f}{m.peak / MIB:>10.1f}")

    out("")
    out("Targets")
    for label in mirrors:
        out(f"  {label}:")
        for line in _targets(results, label):
            out(f"    {line}")
    for note in results.notes:
        out(f"  note: {note}")
    return "\n".join(lines)


def _gbps(results: Results, label: str, clients: int) -> float | None:
    row = _find(results.warm, label=label, clients=clients)
    return row.gb_per_s if row else None


def _rps_ratio(results: Results, label: str, kind: str) -> float | None:
    mine, theirs = _find(results.rps, label=label), _find(results.rps, label=DISTRIBUTION)
    if mine is None or theirs is None:
        return None
    return _ratio(getattr(mine, kind).rps, getattr(theirs, kind).rps)


def _cold_ratio(results: Results, label: str, clients: int) -> float | None:
    mine, theirs = _find(results.cold, label=label, clients=clients), _find(results.cold, label=DISTRIBUTION,
                                                                           clients=clients)
    return _ratio(mine.seconds, theirs.seconds) if mine is not None and theirs is not None else None


def _targets(results: Results, label: str) -> list[str]:
    lines = []
    for clients in WARM_REPEATS if _find(results.warm, label=label) else ():
        ratio = _ratio(_gbps(results, label, clients), _gbps(results, DISTRIBUTION, clients))
        ok = ratio is not None and ratio >= MIN_WARM_RATIO
        lines.append(f"[{_verdict(ok)}] warm throughput, {clients} client(s): {_x(ratio)} distribution "
                     f"(target >= {MIN_WARM_RATIO:.1f}x)")
    for w in (row for row in results.warm if row.label == label):
        lines.append(f"[{_verdict(w.server_cpu_per_gb <= MAX_CPU_PER_GB)}] server CPU, {w.clients} client(s): "
                     f"{w.server_cpu_per_gb:.3f} CPU-s/GB (target <= {MAX_CPU_PER_GB})")
    for kind in ("tag", "digest") if _find(results.rps, label=label) else ():
        ratio = _rps_ratio(results, label, kind)
        # The targets are for one process; --workers N shares the same two cores.
        verdict = _verdict(ratio is not None and ratio >= MIN_RPS_RATIO[kind]) if label == "mirror w1" else "info"
        lines.append(f"[{verdict}] manifest rps by {kind}: {_x(ratio)} distribution "
                     f"(target >= {MIN_RPS_RATIO[kind]:.0f}x with --workers 1)")
    for c in (row for row in results.cold if row.label == label):
        ratio = _cold_ratio(results, label, c.clients)
        ok = ratio is not None and ratio <= MAX_COLD_RATIO[c.clients]
        lines.append(f"[{_verdict(ok)}] cold wall time, {c.clients} client(s): {_x(ratio)} distribution "
                     f"(target <= {MAX_COLD_RATIO[c.clients]:.1f}x)")
        if results.upstream_ttfb is not None:
            ok = c.first_byte <= results.upstream_ttfb + TTFB_SLACK
            lines.append(f"[{_verdict(ok)}] cold first byte, {c.clients} client(s): {c.first_byte * 1000:.1f} ms "
                         f"(target <= upstream's {results.upstream_ttfb * 1000:.1f} ms + {TTFB_SLACK * 1000:.0f} ms)")
        ok = abs(c.upstream_ratio - UPSTREAM_RATIO) < 0.005
        lines.append(f"[{_verdict(ok)}] upstream bytes, cold, {c.clients} client(s): {_x(c.upstream_ratio)} "
                     f"(target {UPSTREAM_RATIO:.2f}x)")
    memory = _find(results.memory, label=label)
    if memory is not None:
        # The target is for one process; --workers N runs a supervisor and N workers.
        verdict = _verdict(memory.peak <= MAX_PEAK_RSS) if label == "mirror w1" else "info"
        lines.append(f"[{verdict}] peak RSS, {RSS_CLIENTS} clients: {memory.peak / MIB:.1f} MiB "
                     f"(target <= {MAX_PEAK_RSS // MIB} MiB for --workers 1)")
    return lines


# -- entry point --


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pull_bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--no-workers2", action="store_true", help="measure the mirror with --workers 1 only")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data) afterwards")
    parser.add_argument("--only", metavar="PART", action="append", choices=PARTS,
                        help=f"measure only this part (repeatable; one of {', '.join(PARTS)}; warm includes memory)")
    args = parser.parse_args(argv)
    missing = [tool for tool in (REGISTRY_BINARY, NGINX_BINARY, "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"pull_bench: missing {', '.join(missing)}: apt-get install -y docker-registry nginx-light wrk",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    busy_before = machine_busy()
    with scratch("pull-bench-", keep=args.keep) as root:
        new_pages = new_pages_write(root)
        results = run(root, workers2=not args.no_workers2, parts=tuple(args.only or PARTS))
        results.busy, results.new_pages = (busy_before, machine_busy()), new_pages
    print(report(results))
    print(f"\n(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
