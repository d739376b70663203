"""The ``mirror`` command line: a thin mapping of options onto the typed configuration."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config.load import DATA_DEFAULT, load_config, to_environ
from .config.sections import Config, ConfigError

if TYPE_CHECKING:
    from .metadata.driver import Metadata
    from .storage.driver import BlobStore

#: ``mirror serve``'s exit status when the index's database cannot be used at start (uvicorn's
#: own, for an application whose start-up failed); 2 is for a configuration that is wrong.
STARTUP_FAILED = 3


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, but lines are never broken at a hyphen (``./mirror-data``, ``--config``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through caching mirror and private registry "
                                                                "for container images.")
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the /v2/ API", description=(
        "Serve the registry API from the local store, falling through to the upstream on a miss. "
        "Settings come from the config file, then MIRROR_<SECTION>_<KEY> environment variables, then these flags."))
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--data", metavar="DIR", help=f"data directory (default: {DATA_DEFAULT})")
    serve.add_argument("--upstream", metavar="URL", help="upstream registry (default https://registry-1.docker.io)")
    serve.add_argument("--workers", metavar="N", help="worker processes (default 1)")

    gc = commands.add_parser("gc", help="evict and garbage-collect the store", description=(
        "Evict least recently used cached images when the store is over cache.max_size (or unused for "
        "cache.unused_for), then remove objects nothing references any more that are older than gc.grace. "
        "Safe while the server runs: one collector works at a time."))
    gc.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    gc.add_argument("--data", metavar="DIR", help=f"data directory (default: {DATA_DEFAULT})")
    gc.add_argument("--dry-run", action="store_true", help="report what would be freed, change nothing")

    fsck = commands.add_parser("fsck", help="check the store and its index", description=(
        "Check that the index and the store agree: tags -> manifests -> objects present and of the sizes "
        "recorded, pushed images with every object stored and linked in their repository, no stray or "
        "abandoned files; optionally re-hash every object. Exits 1 when problems remain."))
    fsck.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    fsck.add_argument("--data", metavar="DIR", help=f"data directory (default: {DATA_DEFAULT})")
    fsck.add_argument("--repair", action="store_true",
                      help="remove corrupt and dangling entries (cached content is fetched again)")
    fsck.add_argument("--verify-content", action="store_true", help="re-hash every object (reads the whole store)")
    migrate = commands.add_parser("migrate", help="copy the store to other drivers", description=(
        "Copy every object and index record of the store OLD.yaml configures into the one NEW.yaml configures (e.g. "
        "filesystem + diskcache to S3 + PostgreSQL), each verified as written, then check the copy. What the target "
        "has is skipped: run it again after an interruption. Stop the server first. MIRROR_* variables are not read."))
    migrate.add_argument("--from-config", type=Path, required=True, metavar="OLD.yaml", help="the store to copy")
    migrate.add_argument("--to-config", type=Path, required=True, metavar="NEW.yaml", help="where to copy it")
    migrate.add_argument("--verify-content", action="store_true", help="re-hash every object in the target")
    migrate.add_argument("--delete", action="store_true", help="catch a copy made before up with the source:"
                         " withdraw from it what the source no longer holds (as rsync --delete)")
    from .archive.offline import add_parsers
    add_parsers(commands)
    for command in commands.choices.values():
        command.formatter_class = _HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from .storage.driver import StoreSetupError

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except StoreSetupError as exc:  # the store's client cannot be made (the AWS SDK's profile, say)
        print(f"mirror: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        try:
            config = load_config(args.config, overrides={
                "http.listen": args.listen,
                "http.workers": args.workers,
                "storage.path": args.data,
                "upstream.url": args.upstream,
            })
        except ConfigError as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 2
        return serve(config)
    # The commands below say in one line what failed: the driver's pool retrying and discarding
    # connections as a database goes away, or the object store's breaker opening, would only add lines before it.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("mirror.storage.s3.breaker").setLevel(logging.ERROR)
    if args.command in ("gc", "fsck"):
        try:
            config = load_config(args.config, overrides={"storage.path": args.data})
        except ConfigError as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 2
        return collect(config, args.dry_run) if args.command == "gc" else fsck(config, args.repair,
                                                                              args.verify_content)
    if args.command == "migrate":
        return migrate(args.from_config, args.to_config, args.verify_content, args.delete)
    if args.command in ("preload", "export"):
        from .archive.offline import run

        return run(args)
    return 2


def _open_store(config: Config) -> tuple[BlobStore, Metadata] | int:
    """The data directory's store and index, or the exit status after saying why not: 2 when it
    is not one (or not this index's, or its bucket another index's), 1 when its index or its bucket
    cannot be opened now."""
    from .metadata.opening import CannotOpenIndex, bind_bucket, bind_data_directory, open_metadata
    from .storage.layout import foreign_data_directory
    from .storage.opening import open_blob_store

    store = open_blob_store(config.storage, replica=config.cluster.enabled)
    local_index = config.metadata.driver == "diskcache"  # postgres keeps nothing in DATA/index/
    # What the data directory holds besides the index: blobs/ on the filesystem, uploads/ beside a bucket.
    local = store.layout.blobs if config.storage.driver == "filesystem" else store.layout.uploads
    if (foreign := foreign_data_directory(config.storage.path)) is not None:
        print(f"mirror: {foreign}", file=sys.stderr)
        return 2
    # Bound to another index (a config that forgot metadata.driver: postgres): said first, and why.
    problem = bind_data_directory(config.metadata, store.layout.index_binding, config.storage, record=False)
    if problem:
        print(f"mirror: {problem}", file=sys.stderr)
        return 2
    if (local_index and not store.layout.index.is_dir()) or not local.is_dir():
        why = "" if config.storage.driver == "filesystem" else (
            ": with storage.driver s3 it is still the server's own, whose uploads in progress are checked"
            " against the index; run this on the mirror's host, --data naming that directory")
        print(f"mirror: {config.storage.path} is not a mirror data directory (no index/ or {local.name}/){why}",
              file=sys.stderr)
        return 2
    if config.storage.driver == "s3":
        try:  # the bucket exists and takes the keys: checked before a new index records which store it holds
            store.create()
        except OSError as exc:
            print(f"mirror: {exc.strerror or exc}", file=sys.stderr)
            return 1
    try:
        metadata = open_metadata(config.metadata, store.layout.index, config.storage)
    except CannotOpenIndex as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    try:  # the index opened: the directory is bound to it (not to one a typo named)
        problem = bind_bucket(config.metadata, config.storage, store, metadata) or bind_data_directory(
            config.metadata, store.layout.index_binding, config.storage, index_id=metadata.index_id())
    except OSError as exc:  # the bucket does not answer, refuses the credentials, does not exist
        problem, status = exc.strerror or str(exc), 1
    else:
        status = 2
    if problem:
        metadata.close()
        print(f"mirror: {problem}", file=sys.stderr)
        return status
    return store, metadata


def collect(config: Config, dry_run: bool) -> int:
    from .maintenance.gc import Collector
    from .metadata.driver import MetadataUnavailable
    from .storage.driver import StoreUnavailable

    opened = _open_store(config)
    if isinstance(opened, int):
        return opened
    store, metadata = opened
    try:
        report = Collector(store, metadata, config.cache, config.gc).run(dry_run=dry_run, wait=True)
    except (StoreUnavailable, MetadataUnavailable) as exc:  # the store or the index does not answer: one line
        print(f"mirror: gc: {exc}", file=sys.stderr)
        return 1
    finally:
        metadata.close()
    assert report is not None
    print(report.summary())
    return 0


def fsck(config: Config, repair: bool, verify_content: bool) -> int:
    from .archive.offline import TerminalProgress
    from .maintenance.fsck import Fsck
    from .metadata.driver import MetadataUnavailable
    from .storage.driver import StoreUnavailable

    opened = _open_store(config)
    if isinstance(opened, int):
        return opened
    store, metadata = opened
    progress = TerminalProgress("fsck")
    try:
        report = Fsck(store, metadata, repair=repair, verify_content=verify_content, progress=progress,
                      replica=config.cluster.enabled, upload_ttl=config.push.upload_ttl).run()
    except (StoreUnavailable, MetadataUnavailable) as exc:  # the store or the index does not answer: one line
        progress.close()
        print(f"mirror: fsck: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        metadata.close()
    for line in report.lines(verify_content):
        print(line)
    return 0 if report.clean else 1


def migrate(old: Path, new: Path, verify_content: bool, delete: bool) -> int:
    from .archive.offline import TerminalProgress
    from .maintenance.migrate import Migration, Refused
    from .observe.progress import LineProgress, Progress
    from .storage.driver import StoreSetupError

    configs = []
    for path in (old, new):
        try:
            configs.append(load_config(path, env={}))
        except ConfigError as exc:
            print(f"mirror: migrate: {path}: {exc}", file=sys.stderr)
            return 2
        if not _names_data_directory(path):  # the default (./mirror-data) would be wherever this runs
            print(f"mirror: migrate: {path}: storage.path is not set: name the store's data directory",
                  file=sys.stderr)
            return 2
    source, target = configs
    terminal = TerminalProgress("migrate") if sys.stderr.isatty() else None
    progress: Progress = terminal or LineProgress("migrate", lambda line: print(line, flush=True))
    previous = None
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored (a background job)
        previous = signal.signal(signal.SIGINT, _Interrupts())
    try:
        report = Migration(source, target, verify_content=verify_content, delete=delete, progress=progress).run()
    except (Refused, StoreSetupError) as exc:
        print(f"mirror: migrate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mirror: migrate: interrupted; run it again to go on", file=sys.stderr)
        return 130
    except Exception as exc:  # a driver failed midway (OSError, the index unreachable): nothing copied is lost
        print(f"mirror: migrate: {exc}; run it again to go on", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if terminal is not None:
            terminal.close()
    for line in (*report.notes, *report.problems):
        print(line)
    print(report.summary())
    return 0 if not report.problems else 1


class _Interrupts:
    """``mirror migrate``'s SIGINT handler: the first Ctrl-C lets the copies in flight end (a store
    that hangs keeps them up to its timeouts) and says so at once; the second stops at once, leaving
    what the next run sweeps up (an open multipart upload, a temp file)."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.seen:
            print("mirror: migrate: stopped at once; run it again to go on (it cleans up what this one left)",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.seen = True
        print("mirror: migrate: interrupted: letting the copies in flight end (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        raise KeyboardInterrupt


def _names_data_directory(path: Path) -> bool:
    """True if the config file *path* (valid YAML, already loaded) sets ``storage.path``."""
    from .config.yamlfile import load_yaml

    doc = load_yaml(path.read_text())
    storage = doc.get("storage") if isinstance(doc, dict) else None
    return isinstance(storage, dict) and bool(storage.get("path"))


def serve(config: Config) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from .metadata.opening import CannotOpenIndex, bind_bucket, bind_data_directory, open_metadata
    from .registry.sharedsecret import secret_problem
    from .server.hardening import server_options, startup_problem
    from .server.metricsdir import metrics_directory
    from .server.workers import run_workers
    from .storage.driver import StoreUnavailable
    from .storage.opening import open_blob_store

    logging.basicConfig(level=config.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    store = open_blob_store(config.storage)
    problem = startup_problem(config, store.layout.auth_key, store.layout.tmp) \
        or bind_data_directory(config.metadata, store.layout.index_binding, config.storage, record=False)
    if problem:
        print(f"mirror: {problem}", file=sys.stderr)
        return 2
    try:
        store.create()
    except StoreUnavailable as exc:  # the bucket: its message names it, and what to check
        print(f"mirror: {exc.strerror}", file=sys.stderr)
        return 2
    except OSError as exc:  # (the bucket's failures are StoreUnavailable, above: this is the data directory)
        print(f"mirror: cannot use data directory {config.storage.path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:  # once here, not in each worker's start-up (a read-only index directory: one line, no traceback)
        metadata = open_metadata(config.metadata, store.layout.index, config.storage)
    except CannotOpenIndex as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    try:
        index_id = metadata.index_id()
        problem = bind_bucket(config.metadata, config.storage, store, metadata) \
            or secret_problem(config, metadata)
    except OSError as exc:
        problem = f"cannot use storage.s3.bucket {config.storage.s3_bucket}: {exc.strerror or exc}"
    finally:
        metadata.close()
    if problem:
        print(f"mirror: {problem}", file=sys.stderr)
        return 2
    # Recorded only now that the index opened (diskcache's opens in each worker): not one a typo named.
    problem = bind_data_directory(config.metadata, store.layout.index_binding, config.storage, index_id=index_id)
    if problem:
        print(f"mirror: {problem}", file=sys.stderr)
        return 2
    try:
        metrics_dir, metrics_lock = metrics_directory(Path(tempfile.gettempdir()))
    except OSError as exc:
        print(f"mirror: cannot create a metrics directory in {tempfile.gettempdir()}: {exc.strerror}",
              file=sys.stderr)
        return 2
    # Every process (this one, each worker) keeps its metric samples in files there, so whichever
    # answers a scrape reports them all.  prometheus-client reads this when it is first imported.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from .api.observability import logging_config, metrics_listener
    from .server.app import create_app

    # Our JSON access log (log.access) replaces uvicorn's.
    common = dict(host=config.http.host, port=config.http.port, log_level=config.log.level,
                  access_log=False, log_config=logging_config(config.log, LOGGING_CONFIG),
                  server_header=False, **server_options(config))

    def terminated(signum: int, frame: object) -> None:
        # uvicorn re-raises the SIGTERM it shut down for: clean up, then die of it as intended.
        shutil.rmtree(metrics_dir, ignore_errors=True)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        with metrics_listener(config):
            if config.http.workers > 1:
                # Inline secrets go to the workers as files in the metrics directory (0700, removed at exit).
                secrets = metrics_dir / "secrets"
                secrets.mkdir(mode=0o700)
                handed = to_environ(config, secrets)
                inline = {name.removesuffix("_FILE") for name in handed if name.endswith("_FILE")}
                for name in [name for name in os.environ if name.upper() in inline]:  # names are read in any case
                    del os.environ[name]  # a secret now in a file: not also in the variable the user set
                os.environ.update(handed)
                run_workers("mirror.server.app:create_app_from_environ", config.http.workers, **common)
            else:
                uvicorn.run(create_app(config), **common)
    except ConfigError as exc:  # metrics.listen cannot be bound
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except CannotOpenIndex as exc:  # metrics.listen's figures: gone since the check above
        print(f"mirror: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.close(metrics_lock)
    return 0
