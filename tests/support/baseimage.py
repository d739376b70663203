"""A Python base image made offline from this machine's own Python, for building deploy/Dockerfile.

Docker Hub (``python:3.11-slim``) cannot be reached from the test machines, so the test builds
the Dockerfile with ``--build-arg BASE=<this image>``.  :func:`rootfs_tar` writes a root
filesystem holding:

- the running interpreter under ``/usr/local`` (binary, ``libpython``, the standard library
  without its tests, Tk and IDLE, and ``pip`` as the only site package);
- every shared library that interpreter and its extension modules load (found with ``ldd``),
  at their Debian paths, with the dynamic loader;
- static busybox as ``/bin/sh`` and the usual utilities (for the Dockerfile's ``RUN`` lines);
- ``/wheelhouse``: wheels of the project's dependencies (the ``s3`` extra's too) and build backend.
  The image's environment sets ``PIP_NO_INDEX=1`` and ``PIP_FIND_LINKS=/wheelhouse``, so the Dockerfile's
  unchanged ``pip`` commands install from it with no network.

The wheels are fetched once with ``pip download`` from the package index and cached under
``~/.cache/mirror-tests/`` (:func:`wheelhouse`); everything else comes from this machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .procs import require_tool

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mirror-tests"
#: What the Dockerfile's build stage needs besides the project's own dependencies.
BUILD_REQUIREMENTS = ("setuptools>=68", "wheel")
#: Standard-library parts an image never needs (and Tk, whose libraries pull in X11).
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
               "__pycache__", "config-3.11-x86_64-linux-gnu"}
DYNLOAD_SKIP = re.compile(r"^_tkinter\.")
#: Libraries that manylinux wheels' extension modules may load beyond what this Python does.
EXTRA_LIBRARIES = ("libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1", "libgcc_s.so.1",
                   "libstdc++.so.6")
ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "PIP_NO_INDEX": "1",
    "PIP_FIND_LINKS": "/wheelhouse",
    "PIP_ROOT_USER_ACTION": "ignore",
}


def project_requirements() -> list[str]:
    """The project's runtime dependencies, as pyproject.toml lists them."""
    document = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    return list(document["project"]["dependencies"])


def extra_requirements(extra: str) -> list[str]:
    """What the project's optional part *extra* (``s3``) adds, as pyproject.toml lists it."""
    document = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    return list(document["project"]["optional-dependencies"][extra])


def wheelhouse() -> Path:
    """A directory of wheels for the build backend and every dependency (downloaded once)."""
    wanted = sorted([*BUILD_REQUIREMENTS, *project_requirements(), *extra_requirements("s3")])
    constraints = PROJECT_ROOT / "deploy" / "constraints.txt"  # the versions the Dockerfile installs
    key = hashlib.sha256("\n".join([sys.version, *wanted, constraints.read_text()]).encode()).hexdigest()[:16]
    target = CACHE / f"wheelhouse-{key}"
    if (target / ".complete").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(partial),
         "--constraint", str(constraints), *wanted],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot download the wheels the image build needs (pip download {' '.join(wanted)}):\n"
                    f"{done.stderr[-3000:]}", pytrace=False)
    (partial / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _ldd(paths: list[Path]) -> set[Path]:
    """Shared libraries (resolved host paths) that *paths* load, and the dynamic loader."""
    found: set[Path] = set()
    for chunk in range(0, len(paths), 50):
        done = subprocess.run(["ldd", *map(str, paths[chunk:chunk + 50])], capture_output=True, text=True,
                              check=False)
        for line in done.stdout.splitlines():
            m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s+(/\S+)\s+\(0x", line)
            if m:
                found.add(Path(m.group(1)))
    return found


def _dependency_extensions() -> list[Path]:
    """Extension modules of the project's dependencies (and their extras) as installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    found: list[Path] = []
    todo = [Requirement(r) for r in project_requirements()]
    seen: set[str] = set()
    while todo:
        wanted = todo.pop()
        key = f"{wanted.name.lower()}{sorted(wanted.extras)}"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(wanted.name)
        except metadata.PackageNotFoundError:
            continue
        found += [Path(str(dist.locate_file(f))) for f in dist.files or () if str(f).endswith(".so")]
        for text in dist.requires or ():
            requirement = Requirement(text)
            extras = [""] + sorted(wanted.extras)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras):
                todo.append(requirement)
    return found


def _image_path(host_path: Path) -> str:
    """Where a library goes in the image: Debian's merged /usr layout (``lib`` -> ``usr/lib``)."""
    text = str(host_path)
    for prefix in ("/lib/", "/lib64/"):
        if text.startswith(prefix):
            return "usr" + text
    return text.lstrip("/")


def _walk(root: Path, skip_top: set[str]) -> Iterator[Path]:
    for entry in sorted(root.iterdir()):
        if entry.name in skip_top or entry.name == "__pycache__":
            continue
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry, set())
        else:
            yield entry


def rootfs_tar(path: Path) -> Path:
    """Write the root filesystem (see the module docstring) as a tar file at *path*."""
    require_tool("ldd", "libc-bin")
    busybox = Path(require_tool("busybox", "busybox-static"))
    prefix = Path(sys.base_prefix)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    libpython = prefix / "lib" / sysconfig.get_config_var("INSTSONAME")
    python_bin = Path(os.path.realpath(sys.executable))
    dynload = stdlib / "lib-dynload"
    loaded = [python_bin, *(p for p in dynload.iterdir() if p.suffix == ".so" and not DYNLOAD_SKIP.match(p.name)),
              *_dependency_extensions()]
    libraries = {lib for lib in _ldd(loaded) if not str(lib).startswith(str(prefix))}
    multiarch = next(lib.parent for lib in libraries if lib.name.startswith("libc.so"))
    for name in EXTRA_LIBRARIES:
        if (multiarch / name).exists():
            libraries.add(multiarch / name)
    site = Path(sysconfig.get_paths()["purelib"])
    pip_parts = [p for p in site.iterdir() if p.name == "pip" or re.fullmatch(r"pip-[\d.]+\.dist-info", p.name)]
    wheels = wheelhouse()

    with tarfile.open(path, "w") as tar:
        def directory(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def symlink(name: str, target: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            tar.addfile(info)

        def text(name: str, content: str, mode: int = 0o644) -> None:
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        def file(name: str, source: Path) -> None:
            tar.add(str(source), arcname=name, recursive=False, filter=_owned_by_root)

        for name in ("usr", "usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "usr/local", "usr/local/bin",
                     "usr/local/lib", "etc", "var", "var/lib", "home", "root", "proc", "sys", "dev", "run"):
            directory(name)
        directory("tmp", 0o1777)
        for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            symlink(link, target)
        text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        text("etc/group", "root:x:0:\nnogroup:x:65534:\n")
        text("etc/os-release", 'NAME="mirror test base"\nID=mirror-test-base\n')

        # busybox: /bin/sh and the utilities, except where Python has a name of its own.
        file("usr/bin/busybox", busybox)
        applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox" and not applet.startswith("python"):
                symlink(f"usr/bin/{applet}", "busybox")

        # Shared libraries at their Debian paths; libpython beside them (a directory ld.so searches).
        seen_dirs = {"usr", "usr/lib", "usr/lib64"}
        for lib in sorted(libraries):
            target = _image_path(lib)
            parent = str(Path(target).parent)
            if parent not in seen_dirs:
                directory(parent)
                seen_dirs.add(parent)
            file(target, Path(os.path.realpath(lib)))
        file(f"{_image_path(multiarch)}/{libpython.name}", Path(os.path.realpath(libpython)))

        # The interpreter under /usr/local, as the official images have it.
        file(f"usr/local/bin/python{version}", python_bin)
        for alias in ("python3", "python"):
            symlink(f"usr/local/bin/{alias}", f"python{version}")
        base = f"usr/local/lib/python{version}"
        directory(base)
        for source in _walk(stdlib, STDLIB_SKIP):
            relative = source.relative_to(stdlib)
            if relative.parts[0] == "lib-dynload" and DYNLOAD_SKIP.match(source.name):
                continue
            if source.is_dir() and not source.is_symlink():
                continue
            _parents(directory, base, relative, seen_dirs)
            file(f"{base}/{relative}", source)
        _parents(directory, base, Path("site-packages/x"), seen_dirs)
        for part in pip_parts:
            for source in [part] if part.is_file() else _walk(part, set()):
                relative = source.relative_to(site)
                _parents(directory, f"{base}/site-packages", relative, seen_dirs)
                file(f"{base}/site-packages/{relative}", source)
        text("usr/local/bin/pip3", f"#!/bin/sh\nexec /usr/local/bin/python{version} -m pip \"$@\"\n", 0o755)
        symlink("usr/local/bin/pip", "pip3")

        directory("wheelhouse")
        for wheel in sorted(wheels.glob("*.whl")):
            file(f"wheelhouse/{wheel.name}", wheel)
    return path


def _parents(directory: Callable[[str], None], base: str, relative: Path, seen: set[str]) -> None:
    """Add the directories leading to ``base/relative`` that are not in the tar yet."""
    for parent in reversed(relative.parents[:-1]):
        name = f"{base}/{parent}"
        if name not in seen:
            directory(name)
            seen.add(name)


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def import_args() -> list[str]:
    """``docker import`` options giving the image its environment and command."""
    changes = [f"ENV {key}={value}" for key, value in ENVIRONMENT.items()]
    changes.append('CMD ["python3"]')
    return [arg for change in changes for arg in ("--change", change)]
