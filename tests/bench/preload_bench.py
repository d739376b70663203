"""Preload benchmark: throughput and peak memory of ``mirror preload`` on a 1 GiB archive.

Run by hand from the repository root (pytest does not collect it)::

    python3 -m tests.bench.preload_bench            # or: python3 tests/bench/preload_bench.py
    python3 -m tests.bench.preload_bench --size-mib 256 --keep /tmp/preload-bench

An OCI archive of one image with four uncompressed random (incompressible) layers adding up to
``--size-mib`` is built once, plain and zstd-compressed.  Each case runs the real CLI
(``python -m mirror preload``) on fresh storage and reports wall time, MB/s (10^6 bytes of
archive per second) and the peak RSS of the process (``wait4``'s ``ru_maxrss``):

1. plain tar, ``--data`` (read in place with ``pread``);
2. zstd-compressed tar, ``--data`` (read once as a stream, staged while decompressed);
3. the plain tar again into the same store (nothing new: no blob is read);
4. plain tar, ``--url`` into a running mirror (streamed into the import as it arrives), with the
   server's peak RSS and the peak disk use of its data directory (sampled every 50 ms).

The archive is read from the page cache (it was just written, then synced); the store is on the
same disk, and each preload fsyncs what it stores, so the disk's write speed is the ceiling.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from tests.bench.proctree import PeakRss  # noqa: E402
from tests.support.archives import compress, pack  # noqa: E402
from tests.support.images import build_image, random_layer, write_oci_layout  # noqa: E402
from tests.support.mirror import PROJECT_ROOT, MirrorServer  # noqa: E402

MIB = 1 << 20
LAYERS = 4


@dataclass
class Result:
    case: str
    seconds: float
    archive_bytes: int
    peak_rss: int
    output: str

    def line(self) -> str:
        rate = self.archive_bytes / self.seconds / 1e6
        return (f"{self.case:<44} {self.seconds:7.2f} s  {rate:8.1f} MB/s  peak RSS {self.peak_rss / MIB:6.1f} MiB"
                f"   | {self.output.strip().splitlines()[-1] if self.output.strip() else ''}")


class PeakDisk:
    """The largest disk use (allocated blocks) of everything under a directory, sampled in a thread."""

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        self.root, self.interval, self.peak = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        total = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(directory, name)).st_blocks * 512
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> PeakDisk:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build(work: Path, size_mib: int) -> tuple[Path, Path]:
    blobs = work / "blobs"
    layers = [random_layer(blobs, size_mib * MIB // LAYERS, seed, compressed=False) for seed in range(LAYERS)]
    image = build_image(blobs, layers)
    layout = work / "layout"
    write_oci_layout(layout, image, "docker.io/library/bench:1")
    plain = pack(layout, work / "bench.tar")
    zstd = compress(plain, "zstd")
    os.sync()  # the build's writeback must not land on the first measurement
    return plain, zstd


def run_cli(*args: str | Path) -> tuple[float, int, str]:
    """Run ``python -m mirror ARGS``; return (seconds, peak RSS in bytes of that process, stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "mirror", *map(str, args)], cwd=PROJECT_ROOT, env=env,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its own rusage is ours to read
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"mirror {args} failed ({proc.returncode}): {err.read()}")
        return seconds, usage.ru_maxrss * 1024, out.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="archive size (default 1024 MiB)")
    parser.add_argument("--keep", type=Path, help="work directory to use and keep (default: a temp dir, removed)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="preload-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        plain, zstd = build(work, args.size_mib)
        print(f"built {plain.name} ({plain.stat().st_size / MIB:.0f} MiB) and {zstd.name} "
              f"({zstd.stat().st_size / MIB:.0f} MiB) in {time.perf_counter() - t0:.0f} s\n")
        results = []
        for case, source, data in (("plain tar, --data", plain, work / "data-plain"),
                                   ("plain tar again (nothing new), --data", plain, work / "data-plain"),
                                   ("zstd tar, --data", zstd, work / "data-zstd")):
            os.sync()
            seconds, rss, out = run_cli("preload", "--data", data, source)
            results.append(Result(case, seconds, source.stat().st_size, rss, out))
            print(results[-1].line(), flush=True)
        token = work / "operator-token"
        token.write_text(secrets.token_hex(32))
        server = MirrorServer(work / "data-url", "http://127.0.0.1:1", log_dir=work,
                              env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})
        server.start()
        try:
            assert server.pid is not None
            with PeakRss(server.pid) as peak, PeakDisk(work / "data-url") as disk:
                seconds, rss, out = run_cli("preload", "--url", server.url, "--token-file", token, plain)
            results.append(Result("plain tar, --url (client RSS)", seconds, plain.stat().st_size, rss, out))
            print(results[-1].line())
            print(f"{'  server during --url':<44} idle {peak.idle / MIB:.1f} MiB, peak {peak.peak / MIB:.1f} MiB")
            print(f"{'  data directory during --url':<44} peak {disk.peak / MIB:.0f} MiB on disk, "
                  f"{disk.peak / plain.stat().st_size:.2f}x the archive")
        finally:
            server.stop()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
