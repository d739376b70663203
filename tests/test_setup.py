"""The README's first command on a stock Debian: the distribution's own Python, a clean directory.

Debian 12 and Ubuntu 24.04 refuse ``pip install`` outside a virtual environment (PEP 668), so
``bash deploy/serve.sh`` must make one (``.venv``) and serve from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.mirror import PROJECT_ROOT
from tests.support.procs import Proc, free_port, wait_http

SYSTEM_PYTHON = Path("/usr/bin/python3")
#: What the first command needs of the checkout (the rest is tests and deploy files).
SOURCES = ("pyproject.toml", "README.md", "mirror", "deploy/serve.sh", "deploy/venv.sh")


@pytest.mark.slow
def test_first_readme_command_serves_with_the_system_python(tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.fail("no /usr/bin/python3: apt-get install -y python3", pytrace=False)
    checkout = tmp_path / "checkout"
    for name in SOURCES:
        source, target = PROJECT_ROOT / name, checkout / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    readme = (PROJECT_ROOT / "README.md").read_text().splitlines()
    assert readme[2].strip() == "bash deploy/serve.sh", "the README's first command changed: update this test"

    port = free_port()
    # Only the system's directories on PATH: `python3` is Debian's, as on a stock machine.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": "", "PYTHONHOME": "", "PYENV_VERSION": "system"}
    proc = Proc(["bash", "deploy/serve.sh", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "data"),
                 "--upstream", "http://127.0.0.1:9"], tmp_path / "serve.log", env=env, cwd=checkout, name="serve.sh")
    proc.start()
    try:
        answer = wait_http(f"http://127.0.0.1:{port}/v2/", timeout=600, alive=proc, interval=0.5)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        # The server runs from the virtual environment made from the system's Python.
        venv_python = checkout / ".venv" / "bin" / "python"
        base = subprocess.run([str(venv_python), "-c", "import sys; print(sys.base_prefix, sys.prefix)"],
                              capture_output=True, text=True, check=True).stdout.split()
        assert base == ["/usr", str(checkout / ".venv")]
        with httpx.Client(trust_env=False) as client:
            missing = client.get(f"http://127.0.0.1:{port}/v2/library/none/manifests/latest")
        assert missing.status_code in (404, 503) and missing.json()["errors"]
    finally:
        proc.stop()
    assert not any(p.name == "mirror-data" for p in checkout.iterdir())
    assert os.listdir(tmp_path / "data")
