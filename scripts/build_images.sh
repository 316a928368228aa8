#!/usr/bin/env bash
# Build both container images: ghcr.io/sam2-serving/{encoder,decoder}:<pyproject version>
# (the names k8s/ and compose.yaml use).
#
#   bash scripts/build_images.sh                      # public bases, torch from its index
#   bash scripts/build_images.sh --local-base --torch-wheels /opt/wheels   # what CI runs
#
# --local-base       where no image registry is reachable: make local/debian:bookworm with
#                    debootstrap from this machine's Debian mirror (once; skipped when the
#                    image exists) and build both images on it (BASE_IMAGE).
# --torch-wheels DIR install torch from the wheel in DIR (its exact version, dependencies from
#                    PyPI), never a download of another torch build (a CUDA one is GBs).
# PIP_CERT (pip's own variable): a CA bundle pip inside the build trusts too (a TLS-intercepting
# proxy in front of the package index). Prints each image's build time and size. Needs a
# running Docker daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCAL_BASE="local/debian:bookworm"
REGISTRY="ghcr.io/sam2-serving"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
use_local_base=false
torch_wheels=""
while (($#)); do
  case "$1" in
    --local-base) use_local_base=true ;;
    --torch-wheels) torch_wheels="$2"; shift ;;
    *) echo "usage: $0 [--local-base] [--torch-wheels DIR]" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[build_images] %s\n' "$*"; }

debian_mirror() {  # the first Debian URI of this machine's apt sources
  local uri
  uri=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources \
        2>/dev/null | head -1)
  [[ -n "$uri" ]] || uri=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*\/debian\) .*/\2/p' \
                           /etc/apt/sources.list 2>/dev/null | head -1)
  echo "${uri:-http://deb.debian.org/debian}"
}

make_local_base() {
  if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    log "$LOCAL_BASE exists"
    return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  local rootfs mirror started
  rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/sam2-rootfs.XXXXXX")
  mirror=$(debian_mirror)
  started=$SECONDS
  log "debootstrap bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  log "$LOCAL_BASE made in $((SECONDS - started)) s"
}

# A build context holding only what the .dockerignore lets through (the legacy builder ignores
# <Dockerfile>.dockerignore and would send .venv), plus in docker/pip/ the torch wheel when one
# is given and the host's PIP_CERT CA bundle when set (docker/pip/README.md).
make_context() {
  local dockerfile="$1" context="$2" path
  while read -r path; do
    cp -a --parents "$path" "$context"/
  done < <(sed -n 's/^!\(.*\)/\1/p' "$dockerfile.dockerignore" | sed 's:/$::')
  find "$context" -name __pycache__ -prune -exec rm -rf {} +
  if [[ -n "$torch_wheels" ]]; then
    cp -l "$torch_wheels"/torch-*.whl "$context/docker/pip/" 2>/dev/null \
      || cp "$torch_wheels"/torch-*.whl "$context/docker/pip/"
  fi
  if [[ -n "${PIP_CERT:-}" ]]; then cp "$PIP_CERT" "$context/docker/pip/ca-bundle.crt"; fi
}

build_args=()
if $use_local_base; then
  make_local_base
  build_args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
fi
if [[ -n "$torch_wheels" ]]; then
  wheels=("$torch_wheels"/torch-*.whl)
  [[ -f "${wheels[0]}" && ${#wheels[@]} -eq 1 ]] \
    || { log "want exactly one torch-*.whl in $torch_wheels, found: ${wheels[*]}"; exit 1; }
  torch_version=$(basename "${wheels[0]}" | cut -d- -f2)  # e.g. 2.13.0+cpu
  build_args+=(--build-arg "TORCH_VERSION=$torch_version"
               --build-arg "TORCH_INDEX=https://pypi.org/simple")
fi

if [[ -n "${PIP_CERT:-}" ]]; then
  [[ -f "$PIP_CERT" ]] || { log "PIP_CERT=$PIP_CERT is not a file"; exit 1; }
  build_args+=(--build-arg "PIP_CERT=/pip/ca-bundle.crt")
fi

for tier in encoder decoder; do
  context=$(mktemp -d "${TMPDIR:-/tmp}/sam2-context.XXXXXX")
  trap 'rm -rf "$context"' EXIT
  make_context "docker/$tier.Dockerfile" "$context"
  image="$REGISTRY/$tier:$VERSION"
  started=$SECONDS
  log "building $image ${build_args[*]}"
  docker build -f "docker/$tier.Dockerfile" -t "$image" "${build_args[@]}" "$context"
  rm -rf "$context"
  size=$(docker image inspect -f '{{.Size}}' "$image")
  log "$image built in $((SECONDS - started)) s, $((size / 1000000)) MB"
done
