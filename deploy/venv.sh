# Sourced by deploy/serve.sh and tests/run.sh: make sure the virtual environment VENV (default .venv in
# the repository) exists and holds this checkout installed with the extras in $1 ("" or "[test]").
# Stock Debian and Ubuntu refuse `pip install` outside a virtual environment (PEP 668), and their
# python3 makes one only with the python3-venv package, which is installed here when it is missing.
venv_setup() {
  local extras=${1:-} venv=${VENV:-.venv} sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      $sudo apt-get update
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends python3-venv
      python3 -m venv "$venv"
    fi
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".$extras"
  VENV_PYTHON="$venv/bin/python"
}
