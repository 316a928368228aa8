#!/usr/bin/env bash
# Idempotent development / CI environment: system servers, .venv, project, reference SAM 2.
#
# Order matters: the CPU torch goes in first, on its own, so that nothing later resolves a
# (CUDA) torch of its own; Meta's reference (PyPI sam2==1.1.0, an sdist) is built without
# build isolation and without dependencies for the same reason, and without its CUDA
# extension. torchvision is never installed (the parity harness provides a stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="2.13.0"
SAM2_VERSION="1.1.0"
APT_PACKAGES=(redis-server prometheus)

log() { printf '[setup_env] %s\n' "$*"; }

# --- system packages (servers started by the integration tests) -------------------------
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
else
  log "apt packages present: ${APT_PACKAGES[*]}"
fi

# --- virtual environment ----------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

installed_version() {  # prints the installed version of a distribution, or nothing
  "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null || true
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PY
}

# torch first and alone (a CPU build; a later resolver step must never replace it).
if [[ "$(installed_version torch)" != "$TORCH_VERSION"* ]]; then
  log "pip install torch==$TORCH_VERSION"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

# The project (editable) with its test extra, held to the exact pins.
log "pip install -e .[test] with requirements-dev.txt"
"${PIP[@]}" install -q -e '.[test]' -r requirements-dev.txt "torch==$TORCH_VERSION"

# Meta's reference implementation for the parity tests.
if [[ "$(installed_version sam2)" != "$SAM2_VERSION" ]]; then
  log "pip install sam2==$SAM2_VERSION (reference, no CUDA extension, no deps)"
  SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation --no-deps "sam2==$SAM2_VERSION"
fi

if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  log "error: torchvision is installed in $VENV; it must not be (remove it)" >&2
  exit 1
fi
log "ready: $("$VENV/bin/python" -c 'import torch, sam2; print("torch", torch.__version__)')"
