"""Web UI benchmark: how long the pages take to render with 10,000 repositories.

Run by hand from the repository root (pytest does not collect it)::

    python3 -m tests.bench.ui_bench                 # or: python3 tests/bench/ui_bench.py
    python3 -m tests.bench.ui_bench --repositories 50000 --keep

An index is written with the mirror's own ``Store`` and ``DiskcacheMetadata`` (no upstream):
N cached repositories under ``docker.io`` (a tenth of them pushed, ``local/...``), each with 1
to 5 tags over a pool of 200 stored OCI image manifests and their configs, and an access time for
every tag's manifest.  The mirror (``--workers 1``) then serves it, and each page is asked for
sequentially, one client, the first time and then *rounds* times: the list (first and a middle page), the
filter over every name (as the script asks while typing, and as the plain form does), a
repository, an image and the cache page.  Printed: the first request's time (the list's reads
every access time of the index: ``ui/listing.LastPulls``, again at most every few seconds; a cached
repository's page asks its upstream for its tags, here a closed port, retries included, and remembers
the failure 10 s: ``ui/listed.py``), the median and p95 of the others (client-side, keep-alive,
loopback), and the page's size.  Target: every page under 100 ms at 10,000 repositories.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import random
import statistics
import time

import httpx

from mirror.metadata.diskcache import DiskcacheMetadata
from mirror.metadata.driver import TagRecord, local_repo
from mirror.spec.reference import parse_digest
from mirror.storage.filesystem import Store
from tests.bench.harness import progress, scratch
from tests.bench.proctree import machine_busy
from tests.support.images import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, dump_json, sha256_digest
from tests.support.mirror import MirrorServer

DEAD_UPSTREAM = "http://127.0.0.1:9"
MANIFESTS = 200
BATCH = 500


def _images(store: Store, rng: random.Random) -> list[str]:
    """Store :data:`MANIFESTS` image manifests with their configs; return their digests."""
    digests = []
    for n in range(MANIFESTS):
        config = dump_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"], "Labels": {"n": str(n)}},
                            "rootfs": {"type": "layers", "diff_ids": []},
                            "history": [{"created_by": f"RUN step {i}"} for i in range(8)]})
        config_digest = sha256_digest(config)
        store.put_bytes(parse_digest(config_digest), config)
        layers = [{"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(f"{n}-{i}".encode()),
                   "size": rng.randrange(1 << 20, 1 << 26)} for i in range(6)]
        manifest = dump_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                              "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                              "layers": layers})
        digest = sha256_digest(manifest)
        store.put_bytes(parse_digest(digest), manifest)
        digests.append(digest)
    return digests


def build(data: Path, repositories: int) -> tuple[str, str]:
    """Write the index; return one repository's name and one of its manifests' digest."""
    rng = random.Random(7)
    store = Store(data)
    store.create()
    digests = _images(store, rng)
    metadata = DiskcacheMetadata(store.layout.index)
    now = time.time()
    try:
        for digest in digests:
            body = store.read_bytes(parse_digest(digest))
            assert body is not None
            metadata.put_manifest(digest, OCI_MANIFEST, len(body))
        for start in range(0, repositories, BATCH):
            accesses = {}
            with metadata._cache.transact():
                for n in range(start, min(start + BATCH, repositories)):
                    name = f"team{n % 97:02d}/app-{n:06d}"
                    if n % 10 == 0:
                        metadata.mark_local(name, now)
                        repo = local_repo(name)
                    else:
                        repo = f"docker.io/{name}"
                    for t in range(1 + n % 5):
                        digest = digests[(n + t) % len(digests)]
                        metadata.link(repo, [digest])
                        metadata.set_tag(repo, f"v{t}", TagRecord(digest, OCI_MANIFEST, now - t * 3600))
                        accesses[(repo, digest)] = now - rng.randrange(0, 30 * 86400)
            metadata.record_access(accesses)
    finally:
        metadata.close()
    sample = repositories // 2 + 1  # cached, with several tags
    return f"team{sample % 97:02d}/app-{sample:06d}", digests[sample % len(digests)]


def measure(http: httpx.Client, url: str, rounds: int) -> tuple[float, float, float, int]:
    """Seconds of the first GET of *url*, median and p95 of *rounds* more, and the body's size."""
    started = time.perf_counter()
    first = http.get(url)
    cold = time.perf_counter() - started
    assert first.status_code == 200, (url, first.status_code, first.text[:300])
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        answer = http.get(url)
        times.append(time.perf_counter() - started)
        assert answer.status_code == 200
    times.sort()
    return cold, statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))], len(first.content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repositories", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory and print its path")
    args = parser.parse_args()
    with scratch("ui-bench-", keep=args.keep) as root:
        progress(f"writing an index of {args.repositories} repositories")
        started = time.monotonic()
        name, digest = build(root / "data", args.repositories)
        progress(f"written in {time.monotonic() - started:.1f}s; starting the mirror")
        pages = [
            ("list, page 1", "/ui/"),
            ("list, middle page", f"/ui/?page={max(1, args.repositories // 200)}"),
            ("filter, plain form", "/ui/?q=app-0012"),
            ("filter, as you type", "/ui/?q=team42+app-00&partial=1"),
            ("filter, no match", "/ui/?q=nothing-like-this"),
            ("repository", f"/ui/r/{name}"),
            ("image", f"/ui/r/{name}@{digest}"),
            ("cache", "/ui/cache"),
        ]
        busy_before = machine_busy()
        rows = []
        with MirrorServer(root / "data", DEAD_UPSTREAM, log_dir=root,
                          env={"MIRROR_UPSTREAM_LIBRARY_NAMESPACE": "false", "MIRROR_GC_INTERVAL": "0"}) as mirror, \
                httpx.Client(trust_env=False, timeout=60) as http:
            for label, path in pages:
                cold, median, p95, size = measure(http, mirror.url + path, args.rounds)
                rows.append((label, path, cold, median, p95, size))
        busy_after = machine_busy()
    print(f"\nweb UI, {args.repositories} repositories, {args.rounds} rounds per page "
          f"(machine busy before/after: {busy_before:.0%}/{busy_after:.0%})\n")
    print("| page | path | first | median | p95 | size |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for label, path, cold, median, p95, size in rows:
        shown = path if len(path) < 40 else path[:37] + "..."
        print(f"| {label} | `{shown}` | {cold * 1000:.1f} ms | {median * 1000:.1f} ms | {p95 * 1000:.1f} ms "
              f"| {size / 1024:.0f} KiB |")
    slow = [label for label, _, _, median, _, _ in rows if median > 0.1]
    print(f"\ntarget (every page's median under 100 ms): {'met' if not slow else 'missed by ' + ', '.join(slow)}")
    return 0 if not slow else 1


if __name__ == "__main__":
    sys.exit(main())
