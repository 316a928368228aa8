#!/usr/bin/env bash
# Set up what the tiers need (idempotent; no test servers) and run the main job: both tiers on the embedded diskcache store,
# segment samples/scene.jpg through the Python client, write out/overlay.png.
# Checkpoint: --checkpoint PATH, $SAM2_CHECKPOINT, or the official file in
# $SAM2_CHECKPOINT_DIR (default ~/.cache/sam2), downloaded from Meta where a network exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --runtime
exec .venv/bin/python scripts/demo.py "$@"
