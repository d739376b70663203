"""GC benchmark: the collector, eviction, fsck and manifest serving on a store of 100k objects.

Run by hand from the repository root (pytest does not collect it)::

    python3 -m tests.bench.gc_bench          # or: python3 tests/bench/gc_bench.py

A synthetic store is written with the mirror's own ``Store`` and ``Metadata`` (no upstream):
10,000 cached images in 500 repositories under ``docker.io``, one tag each.  An image is an OCI
manifest stored byte-for-byte, linked with its config and 8 small random layers (the first
from a pool of base layers shared between images); access times are spread over 30 days, and
the rest of the 100,000 objects are orphans with old mtimes.  Measured:

1. ``mirror gc --dry-run`` and ``mirror gc`` with ``gc.grace`` 0 and no size cap: wall time and
   peak RSS (``ru_maxrss`` from ``wait4``); both must find exactly the orphans;
2. ``mirror fsck`` (without ``--verify-content``);
3. manifest GETs per second by tag and by digest (``wrk``) from a mirror on the big store and
   from one on a store holding a single image of the same shape: the ratio should be ~1;
4. eviction: ``mirror gc`` with ``cache.max_size`` half the store: images evicted, bytes freed,
   time, peak RSS, and whether the evicted images are exactly the least recently used.

Every process started here is stopped (by process group) however the run ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import httpx

from mirror.metadata.diskcache import DiskcacheMetadata
from mirror.metadata.driver import TagRecord
from mirror.spec.reference import parse_digest
from mirror.storage.filesystem import Store
from tests.bench.harness import progress, scratch
from tests.bench.load import WrkResult, wrk
from tests.bench.proctree import machine_busy
from tests.support.images import (
    MANIFEST_MEDIA_TYPES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    dump_json,
    sha256_digest,
)
from tests.support.mirror import PROJECT_ROOT, MirrorServer

MIB = 1 << 20
DAY = 86400.0
REGISTRY = "docker.io"  # the index key of the default upstream
REPOS, TAGS_PER_REPO = 500, 20
LAYERS_PER_IMAGE = 8
SHARED_BASES = 200  # every image's first layer comes from this pool
TOTAL_OBJECTS = 100_000  # what the images do not use is orphans
LAYER_SIZES = (64, 512)
#: Upstream of the mirrors under wrk: nothing listens there, so only the cache can answer.
DEAD_UPSTREAM = "http://127.0.0.1:9"
ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
WRK_SECONDS = 5
WRK_ROUNDS = 3
CLI_TIMEOUT = 600.0
#: Objects written per task of the builder's worker processes.
WRITE_CHUNK = 2000
IMAGES_PER_TRANSACTION = 500



# -- the synthetic store --

@dataclass(frozen=True)
class SyntheticImage:
    name: str  # as clients write it, e.g. bench/app-0001
    tag: str
    digest: str
    objects: tuple[str, ...]  # config and layers
    accessed: float

    @property
    def repo(self) -> str:
        return f"{REGISTRY}/{self.name}"


@dataclass
class Plan:
    """Everything to write: objects by digest with their mtimes, the images, the orphans."""

    images: list[SyntheticImage]
    blobs: dict[str, bytes]
    mtimes: dict[str, float]
    orphans: set[str]
    #: The most recently used image: the one wrk asks for (its tag is fresh, so served from cache).
    probe: SyntheticImage
    built_at: float

    def size(self, digests: Iterable[str]) -> int:
        return sum(len(self.blobs[d]) for d in digests)


def make_plan(repos: int, tags_per_repo: int, total_objects: int | None, seed: int) -> Plan:
    """A deterministic store: *repos* x *tags_per_repo* images, then orphans up to *total_objects*."""
    rng = random.Random(seed)
    now = time.time()
    blobs: dict[str, bytes] = {}
    mtimes: dict[str, float] = {}

    def put(data: bytes, mtime: float) -> str:
        digest = sha256_digest(data)
        blobs[digest] = data
        mtimes[digest] = mtime
        return digest

    def layer() -> bytes:
        return rng.randbytes(rng.randint(*LAYER_SIZES))

    count = repos * tags_per_repo
    old = now - 40 * DAY  # every referenced object is older than every access time
    bases = [layer() for _ in range(min(SHARED_BASES, count))]
    ranks = list(range(count))
    rng.shuffle(ranks)  # access order unrelated to repository order
    images: list[SyntheticImage] = []
    for r in range(repos):
        name = f"bench/app-{r:04d}"
        for t in range(tags_per_repo):
            i = r * tags_per_repo + t
            layers = [bases[i % len(bases)], *(layer() for _ in range(LAYERS_PER_IMAGE - 1))]
            layer_digests = [put(data, old) for data in layers]
            config = dump_json({
                "architecture": "amd64", "os": "linux", "created": "2000-01-01T00:00:00Z",
                "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"], "Labels": {"bench.image": f"{name}:{t}"}},
                "rootfs": {"type": "layers", "diff_ids": layer_digests},
                "history": [{"created_by": f"layer {n}"} for n in range(len(layers))],
            })
            config_digest = put(config, old)
            manifest = dump_json({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": d, "size": len(data)}
                           for d, data in zip(layer_digests, layers, strict=True)],
            })
            accessed = now - 30 * DAY + ranks[i] * (29 * DAY / count)
            images.append(SyntheticImage(name, f"v{t:02d}", put(manifest, old),
                                         (config_digest, *layer_digests), accessed))
    orphans: set[str] = set()
    while total_objects is not None and len(blobs) < total_objects:
        orphans.add(put(layer(), now - rng.uniform(31, 90) * DAY))
    probe = max(images, key=lambda image: image.accessed)
    return Plan(images, blobs, mtimes, orphans, probe, now)


def _skip_fsync(fd: object) -> None:
    pass


def _builder_process() -> None:
    """Initialise a worker process of the builder: no fsync per object (one ``sync`` at the end).

    ``Store.put_bytes`` commits like any ingest, with an fsync per object: on a busy disk 100k of
    them take minutes and measure nothing about the collector.  These processes only build.
    """
    os.fsync = _skip_fsync


def _write_objects(root: str, chunk: list[tuple[str, bytes, float]]) -> int:
    """In a worker process: store objects through ``Store.put_bytes`` and date them."""
    store = Store(Path(root))
    for digest, data, mtime in chunk:
        parsed = parse_digest(digest)
        store.put_bytes(parsed, data)
        os.utime(store.layout.blob(parsed), (mtime, mtime))
    return len(chunk)


def _write_index(root: Path, plan: Plan) -> None:
    """Tags, manifest records, links and access times of *plan*, as a pull would leave them."""
    metadata = DiskcacheMetadata(Store(root).layout.index)
    fetched = plan.built_at - 40 * DAY
    try:
        for n in range(0, len(plan.images), IMAGES_PER_TRANSACTION):
            # One SQLite transaction per batch (Metadata's own transactions nest inside it).
            with metadata._cache.transact():
                for image in plan.images[n:n + IMAGES_PER_TRANSACTION]:
                    metadata.put_manifest(image.digest, OCI_MANIFEST, len(plan.blobs[image.digest]))
                    metadata.link(image.repo, [image.digest, *image.objects])
                    when = plan.built_at if image is plan.probe else fetched
                    metadata.set_tag(image.repo, image.tag, TagRecord(image.digest, OCI_MANIFEST, when))
        metadata.record_access({(image.repo, image.digest): image.accessed for image in plan.images})
        metadata.set_usage(plan.size(plan.blobs))
    finally:
        metadata.close()


def build_store(root: Path, plan: Plan) -> float:
    """Write *plan* under *root* (objects in worker processes, the index here); return seconds."""
    started = time.monotonic()
    Store(root).create()
    items = [(digest, data, plan.mtimes[digest]) for digest, data in plan.blobs.items()]
    with ProcessPoolExecutor(max(2, os.cpu_count() or 2), initializer=_builder_process) as pool:
        # The workers fork at the first submit, before this process opens the index.
        futures: list[Future[int]] = [pool.submit(_write_objects, str(root), items[n:n + WRITE_CHUNK])
                                      for n in range(0, len(items), WRITE_CHUNK)]
        try:
            _write_index(root, plan)
            written = sum(future.result() for future in futures)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    assert written == len(plan.blobs)
    os.sync()  # the objects reach the disk now, not while the collector is being timed
    return time.monotonic() - started


# -- the command line under test --

@dataclass(frozen=True)
class CliRun:
    label: str
    seconds: float
    peak_rss: int
    code: int
    output: str


def mirror_env(**settings: str) -> dict[str, str]:
    """This environment without any MIRROR_* setting of the caller's, plus *settings*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env.update(settings)
    return env


def _peak_rss(pid: int) -> int | None:
    """``VmHWM`` (the peak resident set) of a live process, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def run_cli(label: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path) -> CliRun:
    """Run ``python -m mirror ARGS``: wall time, and ``VmHWM`` as last read before it exited.

    (Not ``ru_maxrss`` from ``wait4``: Linux carries the parent's peak across fork and exec into it.)
    """
    log_path = log_dir / f"{label.replace(' ', '-')}.log"
    peak = 0
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "mirror", *args], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(env), cwd=PROJECT_ROOT, start_new_session=True)
        try:
            while True:
                # A zombie's status no longer has VmHWM: the last read of a live process counts.
                peak = max(peak, _peak_rss(proc.pid) or 0)
                if proc.poll() is not None:
                    break
                if time.monotonic() - started > CLI_TIMEOUT:
                    raise TimeoutError(f"{label} ran for more than {CLI_TIMEOUT:.0f}s")
                time.sleep(0.005)
            seconds = time.monotonic() - started
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return CliRun(label, seconds, peak, proc.returncode, log_path.read_text())


_SUMMARY = re.compile(r"(?:would free|freed) (\d+) objects, .*\((\d+) images evicted, (\d+) tags and (\d+) links "
                      r"removed\);.*, (\d+) objects kept, ([\d.]+)s\s*$")


@dataclass(frozen=True)
class GcSummary:
    objects_removed: int
    evicted: int
    tags_removed: int
    links_removed: int
    objects_kept: int
    seconds: float


def parse_summary(run: CliRun) -> GcSummary:
    found = _SUMMARY.search(run.output)
    if run.code != 0 or found is None:
        raise RuntimeError(f"{run.label} exited {run.code}; output:\n{run.output}")
    removed, evicted, tags, links, kept = (int(found.group(n)) for n in range(1, 6))
    return GcSummary(removed, evicted, tags, links, kept, float(found.group(6)))


def present(root: Path, digests: Iterable[str]) -> set[str]:
    store = Store(root)
    return {d for d in digests if store.layout.blob(parse_digest(d)).exists()}


# -- measurements --

@dataclass
class Row:
    label: str
    run: CliRun
    collector_seconds: float | None
    result: str


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    rps: dict[tuple[str, str], list[WrkResult]] = field(default_factory=dict)
    checks: list[tuple[bool, str]] = field(default_factory=list)
    store_line: str = ""
    #: Share of the machine's CPU that was busy just before and just after the run (others' processes).
    busy: tuple[float, float] = (0.0, 0.0)

    def check(self, ok: bool, what: str) -> None:
        self.checks.append((ok, what))


def measure_collect(root: Path, plan: Plan, results: Results, logs: Path) -> None:
    data = ["gc", "--data", str(root)]
    env = mirror_env(MIRROR_GC_GRACE="0s", MIRROR_CACHE_MAX_SIZE="0")
    referenced = set(plan.blobs) - plan.orphans
    for dry_run in (True, False):
        label = "gc --dry-run" if dry_run else "gc"
        progress(f"mirror {label} (grace 0, no size cap)")
        run = run_cli(label, data + ["--dry-run"] * dry_run, env, logs)
        summary = parse_summary(run)
        left = present(root, plan.blobs)
        gone = set(plan.blobs) - left
        results.rows.append(Row(f"{label} (grace 0, no cap)", run, summary.seconds,
                                f"{'would free' if dry_run else 'freed'} {summary.objects_removed} objects, "
                                f"{summary.evicted} evicted"))
        results.check(summary.objects_removed == len(plan.orphans) and summary.evicted == 0,
                      f"{label}: {summary.objects_removed} objects to sweep, {len(plan.orphans)} orphans")
        want_gone = set() if dry_run else plan.orphans
        results.check(gone == want_gone and referenced <= left,
                      f"{label}: {len(gone)} objects gone from disk (expected {len(want_gone)}), "
                      f"{len(referenced - left)} referenced objects missing")


def measure_fsck(root: Path, results: Results, logs: Path) -> None:
    progress("mirror fsck")
    run = run_cli("fsck", ["fsck", "--data", str(root)], mirror_env(), logs)
    last = run.output.strip().splitlines()[-1] if run.output.strip() else ""
    results.rows.append(Row("fsck", run, None, last))
    results.check(run.code == 0 and last.endswith("clean"), f"fsck exited {run.code}: {last}")


def measure_evict(root: Path, plan: Plan, results: Results, logs: Path) -> None:
    store_bytes = plan.size(present(root, plan.blobs))
    budget = store_bytes // 2
    progress(f"mirror gc with a budget of {budget / MIB:.1f} MiB (store {store_bytes / MIB:.1f} MiB)")
    env = mirror_env(MIRROR_GC_GRACE="0s", MIRROR_CACHE_MAX_SIZE=str(budget), MIRROR_CACHE_KEEP_RECENT="0s")
    run = run_cli("gc evict", ["gc", "--data", str(root)], env, logs)
    summary = parse_summary(run)
    after = plan.size(present(root, plan.blobs))
    freed = store_bytes - after
    evicted = {image.digest for image in plan.images} - present(root, (image.digest for image in plan.images))
    by_use = sorted(plan.images, key=lambda image: image.accessed)
    lru = {image.digest for image in by_use[:len(evicted)]}
    results.rows.append(Row(f"gc evict (cap {budget / MIB:.1f} MiB)", run, summary.seconds,
                            f"{summary.evicted} images evicted, {freed / MIB:.1f} MiB freed "
                            f"({summary.objects_removed} objects)"))
    results.check(summary.evicted == len(evicted) == summary.tags_removed,
                  f"eviction: {summary.evicted} reported, {len(evicted)} manifests gone, "
                  f"{summary.tags_removed} tags removed")
    results.check(bool(evicted) and evicted == lru,
                  f"eviction: the {len(evicted)} evicted images are the least recently used "
                  f"({len(evicted - lru)} evicted out of order)")
    target = budget * 0.85  # cache.low_watermark's default
    results.check(after <= target, f"eviction: store {after / MIB:.1f} MiB after, low watermark "
                                   f"{target / MIB:.1f} MiB")


@contextlib.contextmanager
def running_mirror(root: Path, data: Path) -> Iterator[MirrorServer]:
    env = {"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "false", "MIRROR_CACHE_TAG_TTL": "1h", "MIRROR_GC_INTERVAL": "0"}
    with MirrorServer(data, DEAD_UPSTREAM, env=env, log_dir=root) as mirror:
        yield mirror


def check_served(mirror: MirrorServer, image: SyntheticImage, body: bytes) -> None:
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        for ref in (image.tag, image.digest):
            answer = http.get(f"{mirror.url}/v2/{image.name}/manifests/{ref}", headers={"accept": ACCEPT})
            if answer.status_code != 200 or answer.content != body or answer.headers.get("x-mirror-cache") != "HIT":
                raise RuntimeError(f"{mirror.url} answered {answer.status_code} "
                                   f"({answer.headers.get('x-mirror-cache')}) for {image.name}:{ref}")


def measure_rps(root: Path, big: Path, big_plan: Plan, small: Path, small_plan: Plan, results: Results) -> None:
    progress("manifest GETs/s: mirrors on the big store and on a one-image store")
    with running_mirror(root, big) as big_mirror, running_mirror(root, small) as small_mirror:
        targets = {"big": (big_mirror, big_plan), "one image": (small_mirror, small_plan)}
        for mirror, plan in targets.values():
            check_served(mirror, plan.probe, plan.blobs[plan.probe.digest])
        for _ in range(WRK_ROUNDS):  # interleaved, so drift in the machine's load hits both alike
            for kind in ("tag", "digest"):
                for label, (mirror, plan) in targets.items():
                    ref = plan.probe.tag if kind == "tag" else plan.probe.digest
                    url = f"{mirror.url}/v2/{plan.probe.name}/manifests/{ref}"
                    results.rps.setdefault((label, kind), []).append(wrk(url, accept=ACCEPT, seconds=WRK_SECONDS))


# -- the report --

def _median_rps(results: Results, label: str, kind: str) -> float:
    return statistics.median(r.rps for r in results.rps.get((label, kind), [])) if results.rps else 0.0


def report(results: Results) -> str:
    before, after = results.busy
    lines: list[str] = []
    out = lines.append
    out(f"Machine: {os.cpu_count()} CPUs; busy {before:.0%} just before the run, {after:.0%} just after "
        f"(other processes; anything but ~0% makes the figures noisy)")
    out(results.store_line)
    out("")
    out(f"   {'run':<32}{'wall s':>8}{'collector s':>13}{'peak RSS MiB':>14}   result")
    for row in results.rows:
        collector = f"{row.collector_seconds:.2f}" if row.collector_seconds is not None else "-"
        out(f"   {row.label:<32}{row.run.seconds:>8.2f}{collector:>13}{row.run.peak_rss / MIB:>14.1f}   {row.result}")
    if results.rps:
        out("")
        out(f"   {f'manifest GETs/s, wrk -t2 -c32 -d{WRK_SECONDS}s, median of {WRK_ROUNDS}':<46}"
            f"{'big':>8}{'one image':>11}{'big/one':>9}{'errors':>8}   big/one per round")
        for kind in ("tag", "digest"):
            big, small = _median_rps(results, "big", kind), _median_rps(results, "one image", kind)
            bad = sum(r.bad for key, runs in results.rps.items() if key[1] == kind for r in runs)
            rounds = ", ".join(f"{b.rps / o.rps:.2f}" for b, o in zip(results.rps[("big", kind)],
                                                                      results.rps[("one image", kind)], strict=False))
            out(f"   {'by ' + kind:<46}{big:>8.0f}{small:>11.0f}{big / small if small else 0:>8.2f}x{bad:>8}   "
                f"{rounds}")
    out("")
    out("Checks")
    for ok, what in results.checks:
        out(f"  [{'OK  ' if ok else 'FAIL'}] {what}")
    return "\n".join(lines)


def run(root: Path, *, rps: bool) -> Results:
    results = Results()
    logs = root / "logs"
    logs.mkdir()
    progress(f"planning {REPOS * TAGS_PER_REPO} images and {TOTAL_OBJECTS} objects")
    plan = make_plan(REPOS, TAGS_PER_REPO, TOTAL_OBJECTS, seed=1)
    small_plan = make_plan(1, 1, None, seed=2)
    big, small = root / "big", root / "one-image"
    progress("writing the big store")
    seconds = build_store(big, plan)
    build_store(small, small_plan)
    results.store_line = (
        f"Store: {len(plan.images)} images ({REPOS} repositories x {TAGS_PER_REPO} tags, {LAYERS_PER_IMAGE} layers "
        f"each, the first from {SHARED_BASES} shared), {len(plan.blobs)} objects ({len(plan.orphans)} orphans), "
        f"{plan.size(plan.blobs) / MIB:.1f} MiB; built in {seconds:.1f} s")
    progress(results.store_line)
    measure_collect(big, plan, results, logs)
    measure_fsck(big, results, logs)
    if rps:
        measure_rps(root, big, plan, small, small_plan, results)
    measure_evict(big, plan, results, logs)  # last: it changes the store
    return results



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gc_bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--no-rps", action="store_true", help="skip the manifest GETs/s measurement (wrk)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (stores, logs) afterwards")
    args = parser.parse_args(argv)
    if not args.no_rps and shutil.which("wrk") is None:
        print("gc_bench: missing wrk: apt-get install -y wrk (or pass --no-rps)", file=sys.stderr)
        return 2
    started = time.monotonic()
    busy_before = machine_busy()
    with scratch("gc-bench-", keep=args.keep) as root:
        results = run(root, rps=not args.no_rps)
        results.busy = (busy_before, machine_busy())
    print(report(results))
    print(f"\n(total run time {time.monotonic() - started:.0f} s)")
    return 0 if all(ok for ok, _ in results.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
