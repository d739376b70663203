#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian 12 machine, then run ruff, mypy and all of the tests.
# (libatomic1: the Node.js that Playwright's Python package runs; the web UI's tests launch Debian's chromium with it.)
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow"` for the quick part.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker.io docker-registry skopeo busybox-static nginx-light wrk prometheus e2fsprogs containerd runc podman docker-compose openssl systemd iproute2 python3-venv postgresql chromium libatomic1 haproxy strace faketime)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The package and the test dependencies go into a virtual environment (.venv, or $VENV): stock Debian's
# python3 refuses `pip install` outside one (PEP 668).
. deploy/venv.sh
venv_setup "[test]"
# Lint and types first (settings in pyproject.toml): any finding fails the run.
"$VENV_PYTHON" -m ruff check mirror tests
"$VENV_PYTHON" -m mypy
exec "$VENV_PYTHON" -m pytest "$@"
