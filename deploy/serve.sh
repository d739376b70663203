#!/usr/bin/env bash
# Install the mirror into a virtual environment (.venv, or $VENV) and serve it on its embedded defaults:
# 0.0.0.0:5000, data in ./mirror-data, Docker Hub as the upstream. Arguments go to `mirror serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/venv.sh
venv_setup ""
exec "$VENV_PYTHON" -m mirror serve "$@"
