"""The package map: every import inside ``mirror`` points down the layers, never up or sideways.

Each subpackage's ``__init__.py`` docstring says what it owns and what it may import; this test
holds the code to those words, reading each module's imports with ``ast`` (type-only imports too:
a layer that needs a higher one's types has the wrong shape).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mirror"

# Lowest first. A package may import itself and any package listed before it.
LAYERS = [
    "spec",
    "config",
    "observe",
    "storage",
    "metadata",
    "upstream",
    "maintenance",
    "registry",
    "archive",
    "api",
    "ui",
    "server",
]
TOP = {"cli", "__main__", "__init__"}  # the entry points: may import anything


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` for each import of a mirror module in *path*."""
    module = ["mirror", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = module[:-1] if path.name != "__init__.py" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            else:
                names = [node.module or ""]
            found += [(node.lineno, n) for n in names if n == "mirror" or n.startswith("mirror.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mirror.")]
    return found


def _layer(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP)
    assert loose == [], f"modules outside the layer packages: {loose}"
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, target in _imports(path):
            to = _layer(target)
            if to is not None and to not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
            elif to is None and target not in ("mirror", "mirror.__version__"):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (outside the layers)")
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize("layer", LAYERS)
def test_each_package_says_what_it_owns_and_may_import(layer: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
    assert "May import" in doc, f"mirror/{layer}/__init__.py must say what it may import"


def test_modules_stay_under_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


#: Modules that may import boto3 when loaded: the S3 driver's own (the ``s3`` extra).
S3_ONLY = ("mirror/storage/s3.py", "mirror/storage/s3objects.py", "mirror/storage/s3fill.py",
           "mirror/storage/s3damage.py", "mirror/storage/s3notes.py", "mirror/storage/s3uploads.py",
           "mirror/storage/s3binding.py", "mirror/storage/s3client.py", "mirror/storage/s3room.py",
           "mirror/storage/s3breaker.py")


def test_only_the_s3_driver_loads_boto3_for_a_filesystem_store() -> None:
    """boto3 is the ``s3`` extra: a deployment on the filesystem (the image) does not install it,
    so no module outside the S3 driver may import it, or import the driver, when loaded."""
    driver = {Path(p).stem for p in S3_ONLY}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if str(path.relative_to(PACKAGE.parent)) in S3_ONLY:
            continue
        for node in ast.parse(path.read_text()).body:  # top-level statements only: what runs on load
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] in ("boto3", "botocore") or name.rsplit(".", 1)[-1] in driver:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}")
    assert wrong == [], "\n".join(wrong)
