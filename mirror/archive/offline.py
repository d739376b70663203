"""``mirror preload`` and ``mirror export``: configuration, progress display (``mirror fsck``'s too), ``--url`` upload.

The work itself is in ``archive/preload.py`` and ``archive/export.py``; this module maps the command line onto
them.  A progress display (bytes and images) is drawn on stderr only when it is a terminal;
summaries go to stdout, errors to stderr as ``mirror: preload: FILE: ENTRY: problem``.
Exit status: 0 done, 1 an input or image failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config.load import DATA_DEFAULT, load_config
from ..config.sections import Config, ConfigError
from ..config.values import human

PRELOAD_PATH = "/_mirror/preload"
OPERATOR_PATH = "/_mirror/"
CHUNK = 1 << 20


class TerminalProgress:
    """tqdm bars on stderr when it is a terminal; nothing at all otherwise (CI, pipes, logs)."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.images = 0
        self._bar: Any = None

    def phase(self, label: str, total: int | None) -> None:
        self.close()
        if not self.enabled:
            return
        from tqdm import tqdm

        # A phase of no known size shows its time alone until it counts bytes ("index records" counts
        # none: "0.00B" would say nothing true).
        self._bar = tqdm(total=total, desc=f"{self.label}: {label}", unit="B", unit_scale=True,
                         unit_divisor=1024, file=sys.stderr, leave=False, dynamic_ncols=True,
                         bar_format=None if total is not None else "{desc}: {elapsed}{postfix}")
        if self.images:
            self._bar.set_postfix(images=self.images)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.bar_format = None  # bytes now counted: tqdm's usual display
            self._bar.update(nbytes)

    def image_done(self, name: str) -> None:
        self.images += 1
        if self._bar is not None:
            self._bar.set_postfix(images=self.images)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _config(args: argparse.Namespace, **overrides: Any) -> Config | None:
    try:
        return load_config(args.config, overrides={"storage.path": args.data, **overrides})
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return None


def _open(config: Config) -> Any:
    """``(store, metadata)`` of the data directory, or None after saying why it cannot be used."""
    from ..metadata.opening import CannotOpenIndex, bind_bucket, bind_data_directory, open_metadata
    from ..storage.driver import StoreUnavailable
    from ..storage.layout import foreign_data_directory
    from ..storage.opening import open_blob_store

    if (foreign := foreign_data_directory(config.storage.path)) is not None:
        print(f"mirror: {foreign}", file=sys.stderr)
        return None
    try:
        store = open_blob_store(config.storage)
        store.create()
        binding = store.layout.index_binding
        problem = bind_data_directory(config.metadata, binding, config.storage, record=False)
        if problem:
            print(f"mirror: {problem}", file=sys.stderr)
            return None
        metadata = open_metadata(config.metadata, store.layout.index, config.storage)
        # Recorded once the index opened: not an index a typo named, that never did.
        problem = bind_bucket(config.metadata, config.storage, store, metadata) \
            or bind_data_directory(config.metadata, binding, config.storage, index_id=metadata.index_id())
        if problem:
            metadata.close()
            print(f"mirror: {problem}", file=sys.stderr)
            return None
    except StoreUnavailable as exc:  # the bucket: its message names it, and what to check
        print(f"mirror: {exc.strerror}", file=sys.stderr)
        return None
    except OSError as exc:
        print(f"mirror: cannot use data directory {config.storage.path}: {exc.strerror}", file=sys.stderr)
        return None
    except CannotOpenIndex as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return None

    def counted(size: int) -> None:
        metadata.add_usage(size)  # the store's byte count, as the server keeps it

    store.on_commit = counted
    return store, metadata


# -- preload --


def run_preload(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="mirror: %(message)s")
    if args.url:
        readable, token = _operator_token(args)
        return _preload_url(args.url, args.files, token) if readable else 2
    config = _config(args)
    if config is None:
        return 2
    from ..metadata.driver import MetadataUnavailable
    from ..storage.driver import StoreUnavailable
    from .members import ArchiveError
    from .preload import preload_file

    opened = _open(config)
    if opened is None:
        return 2
    store, metadata = opened
    failed, images, new_bytes = 0, 0, 0
    try:
        for file in args.files:
            progress = TerminalProgress(file)
            try:
                summary = preload_file(_input(file), store, metadata, progress, label=file,
                                       registries={u.registry for u in config.upstreams},
                                       default_registry=config.upstream.registry)
            except ArchiveError as exc:
                print(f"mirror: preload: {file}: {exc}", file=sys.stderr)
                failed += 1
                continue
            except (StoreUnavailable, MetadataUnavailable) as exc:  # the rest would fail the same way
                print(f"mirror: preload: {file}: {exc}; run it again to go on (what is stored stays)",
                      file=sys.stderr)
                return 1
            finally:
                progress.close()
            for warning in summary.warnings:
                print(f"mirror: preload: {file}: warning: {warning}", file=sys.stderr)
            print(summary.describe())
            images, new_bytes = images + summary.images, new_bytes + summary.new_bytes
    finally:
        metadata.close()
    if len(args.files) > 1:
        print(f"total: {len(args.files) - failed} of {len(args.files)} files, {images} images, "
              f"{human(new_bytes)} new")
    return 1 if failed else 0


def _operator_token(args: argparse.Namespace) -> tuple[bool, str | None]:
    """(readable, token) for ``--url``: the token of ``--token-file``, else of ``admin.token_file`` in
    the configuration (``--config``, ``MIRROR_ADMIN_TOKEN_FILE``), None when neither is set;
    readable is False (the reason printed) when the file or the configuration is bad."""
    from ..config.values import parse_token_file

    if args.token_file is not None:
        try:
            secret = parse_token_file(args.token_file)
        except ValueError as exc:
            print(f"mirror: --token-file {args.token_file}: {exc}", file=sys.stderr)
            return False, None
    else:
        config = _config(args)
        if config is None:
            return False, None
        secret = config.admin.token_file
    return True, secret.value if secret is not None else None


def _preload_url(url: str, files: list[str], token: str | None = None) -> int:
    import httpx

    from .preload import Summary

    endpoint = url.rstrip("/") + PRELOAD_PATH
    failed, images, new_bytes = 0, 0, 0
    credential = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(timeout=httpx.Timeout(30.0, read=None, write=None), trust_env=False) as client:
        try:  # is the credential good? asked before any archive is sent
            check = client.get(url.rstrip("/") + OPERATOR_PATH, headers=credential)
        except httpx.HTTPError as exc:
            print(f"mirror: preload: cannot reach {url}: {exc}", file=sys.stderr)
            return 1
        if check.status_code != 200:
            print(f"mirror: preload: {url}: {_error_message(check)}", file=sys.stderr)
            return 1
        for file in files:
            path = _input(file)
            progress = TerminalProgress(file)
            try:
                if path.is_dir():
                    progress.phase("uploading", None)
                    body: Iterator[bytes] = _tar_directory(path, progress)
                elif path.is_file() or file == "-":  # a file's size bounds what it may decompress to
                    size = path.stat().st_size if path.is_file() else None
                    progress.phase("uploading", size)
                    body = _file_chunks(path, progress)
                else:
                    print(f"mirror: preload: {file}: no such file or directory", file=sys.stderr)
                    failed += 1
                    continue
                try:
                    response = client.post(endpoint, content=body, headers={
                        "Content-Type": "application/octet-stream", "X-Mirror-Source": path.name, **credential,
                        **({"Content-Length": str(path.stat().st_size)} if path.is_file() else {})})
                except httpx.HTTPError as exc:
                    print(f"mirror: preload: {file}: cannot send to {endpoint}: {exc}", file=sys.stderr)
                    failed += 1
                    continue
            finally:
                progress.close()
            if response.status_code != 200:
                print(f"mirror: preload: {file}: {_error_message(response)}", file=sys.stderr)
                failed += 1
                continue
            doc = response.json()
            fields = {k: v for k, v in doc.items() if k in Summary.__dataclass_fields__}
            summary = Summary(**{**fields, "source": file})
            for warning in summary.warnings:
                print(f"mirror: preload: {file}: warning: {warning}", file=sys.stderr)
            print(summary.describe())
            images, new_bytes = images + summary.images, new_bytes + summary.new_bytes
    if len(files) > 1:
        print(f"total: {len(files) - failed} of {len(files)} files, {images} images, {human(new_bytes)} new")
    return 1 if failed else 0


def _error_message(response: Any) -> str:
    try:
        errors = response.json()["errors"]
        return str(errors[0]["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        return f"the mirror answered {response.status_code}: {response.text[:200]}"


def _input(file: str) -> Path:
    """An archive named on the command line: ``-`` is standard input (``docker save IMAGE | mirror preload -``)."""
    return Path("/dev/stdin") if file == "-" else Path(file)


def _file_chunks(path: Path, progress: TerminalProgress) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            progress.advance(len(data))
            yield data


def _tar_directory(root: Path, progress: TerminalProgress) -> Iterator[bytes]:
    """A directory (an OCI layout) as a tar stream, written by a thread, never whole in memory."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)

    class Sink:
        def write(self, data: bytes) -> int:
            chunks.put(bytes(data))
            return len(data)

    def work() -> None:
        try:
            with tarfile.open(fileobj=Sink(), mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                              bufsize=CHUNK) as tar:
                for child in sorted(root.iterdir()):
                    tar.add(child, arcname=child.name)
            chunks.put(None)
        except BaseException as exc:  # handed to the reading side
            chunks.put(exc)

    threading.Thread(target=work, name="tar-directory", daemon=True).start()
    while True:
        item = chunks.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        progress.advance(len(item))
        yield item


# -- export --


def run_export(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="mirror: %(message)s")
    from ..metadata.driver import MetadataUnavailable
    from ..spec.platforms import Platform
    from ..storage.driver import StoreUnavailable
    from .export import Exporter, ExportError, read_image_list

    try:
        platforms = [Platform.parse(p) for p in args.platform or []]
    except ValueError as exc:
        print(f"mirror: export: --platform {exc}", file=sys.stderr)
        return 2
    references = list(args.images)
    try:
        if args.from_list:
            references += read_image_list(Path(args.from_list))
    except ExportError as exc:
        print(f"mirror: export: {exc}", file=sys.stderr)
        return 2
    if not references:
        print("mirror: export: name at least one image (IMAGE... or --from-list FILE)", file=sys.stderr)
        return 2
    config = _config(args, **{"upstream.url": args.upstream})
    if config is None:
        return 2
    opened = _open(config)
    if opened is None:
        return 2
    store, metadata = opened
    progress = TerminalProgress("export")
    try:
        summary = Exporter(config, store, metadata, platforms=platforms, all_platforms=args.all_platforms,
                           progress=progress).export(references, Path(args.output))
    except ExportError as exc:
        print(f"mirror: export: {exc}", file=sys.stderr)
        return 1
    except (StoreUnavailable, MetadataUnavailable) as exc:  # not the output's fault: the store or the index
        print(f"mirror: export: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mirror: export: {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        metadata.close()
    out = sys.stderr if args.output == "-" else sys.stdout  # "-": the archive itself is on stdout
    print(summary.describe(), file=out)
    for name in summary.images:
        print(f"  {name}", file=out)
    return 0


def add_parsers(commands: Any) -> None:
    """The ``preload`` and ``export`` subcommands."""
    preload = commands.add_parser("preload", help="load image archives into the store (air-gapped sites)",
                                  description=(
        "Load images from docker save tarballs (classic or OCI form), OCI image layouts (directory or tar, e.g. "
        "skopeo copy ... oci-archive:FILE) and mirror export bundles, plain or gzip/zstd-compressed, into the "
        "store as cached content of their registry (ubuntu:18.04 is docker.io/library/ubuntu:18.04). Preloaded "
        "images are pinned: eviction never removes them. Digests are kept wherever the archive carries the "
        "registry's manifests; classic docker save output gets a manifest built here, whose digest differs "
        "from the registry's. Running it twice stores nothing new."))
    target = preload.add_mutually_exclusive_group()
    target.add_argument("--data", metavar="DIR", help="write the data directory directly (the server may be "
                                                      f"running); default: {DATA_DEFAULT}")
    target.add_argument("--url", metavar="URL", help="send the archives to a running mirror (e.g. "
                                                     "http://127.0.0.1:5000), authenticated with its operator "
                                                     "token (admin.token_file)")
    preload.add_argument("--token-file", metavar="FILE", help="with --url: the file holding the mirror's "
                                                              "operator token (default: admin.token_file of the "
                                                              "config, or MIRROR_ADMIN_TOKEN_FILE)")
    preload.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    preload.add_argument("files", nargs="+", metavar="FILE", help="archive file or OCI layout directory; - reads "
                                                                  "a (compressed) tar from standard input")

    export = commands.add_parser("export", help="write images into one OCI archive", description=(
        "Write images (their indexes, manifests, configs and layers, byte for byte) from the store into one OCI "
        "archive, pulling what is not cached through the upstream first. skopeo copy oci-archive:FILE:NAME reads "
        "it (NAME is the full name, e.g. docker.io/library/alpine:3.20) and mirror preload restores it on another "
        "mirror with the same digests. Without --platform or --all-platforms, a multi-platform image contributes "
        "the platforms already in the store (or the host's); its index is kept byte for byte either way. "
        "FILE ending in .gz or .zst is compressed."))
    export.add_argument("images", nargs="*", metavar="IMAGE", help="image reference, e.g. alpine:3.20, "
                                                                   "ghcr.io/org/app:1, name@sha256:...")
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="archive to write (replaced whole); -: an uncompressed tar to standard output")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                       help="only this platform of multi-platform images (repeatable)")
    which.add_argument("--all-platforms", action="store_true", help="every platform of multi-platform images")
    export.add_argument("--from-list", metavar="FILE", help="more image references, one per line")
    export.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    export.add_argument("--data", metavar="DIR", help=f"data directory (default: {DATA_DEFAULT})")
    export.add_argument("--upstream", metavar="URL", help="upstream to pull missing images from "
                                                          "(default: upstream.url of the config)")


def run(args: argparse.Namespace) -> int:
    return run_preload(args) if args.command == "preload" else run_export(args)

