"""The ``mirror`` command line: a thin mapping of options onto the typed configuration."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load_config, to_environ


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
    serve.add_argument("--data", metavar="DIR", help="data directory (default ./mirror-data)")
    serve.add_argument("--upstream", metavar="URL", help="upstream registry (default https://registry-1.docker.io)")
    serve.add_argument("--workers", metavar="N", help="worker processes (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    return 2


def serve(config: Config) -> int:
    import uvicorn

    from .app import create_app
    from .store import Store

    logging.basicConfig(level=config.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    store = Store(config.storage.path)
    try:
        store.create()
    except OSError as exc:
        print(f"mirror: cannot use data directory {config.storage.path}: {exc.strerror}", file=sys.stderr)
        return 2
    common = dict(host=config.http.host, port=config.http.port, log_level=config.log.level,
                  access_log=config.log.access, timeout_keep_alive=75, server_header=False)
    if config.http.workers > 1:
        os.environ.update(to_environ(config))
        uvicorn.run("mirror.app:create_app_from_environ", factory=True, workers=config.http.workers,
                    **common)  # type: ignore[arg-type]
    else:
        uvicorn.run(create_app(config), **common)  # type: ignore[arg-type]
    return 0
