#!/usr/bin/env bash
# What CI runs: lint, then every test (slow and network included). A run that collects no test fails
# (pytest exits 5), as does any lint finding.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${LOCOSWARM_VENV:-.venv}/bin
"$BIN/ruff" check .
"$BIN/ruff" format --check .
markers="not gpu"
if "$BIN/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    markers=""
fi
exec "$BIN/pytest" -q -m "$markers" --durations=15 "$@"
