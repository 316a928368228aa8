#!/usr/bin/env bash
# The project's test command: set the environment up (idempotent), then run every test,
# including the slow ones. Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The venv first on PATH: its tools (and node/npm/npx where setup_env.sh put them there).
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -ra "$@"
