#!/usr/bin/env bash
# One-time, idempotent set-up: a virtualenv in .venv with locoswarm and its dev/notebook extras.
# Fast on CPU-only machines (pins the CPU torch build), and keeps whatever torch a GPU user already has.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LOCOSWARM_VENV:-.venv}

# The emulated-WAN testbed (locoswarm-netem, its tests and benchmarks) needs ip and tc; as root we can add them.
if [ "$(id -u)" = 0 ] && ! command -v tc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing iproute2 (ip, tc) for the network testbed"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux) >/dev/null \
        || echo "[setup] could not install iproute2; netem tests will report it"
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Re-run the install only when the dependency list or this script changed.
stamp="$VENV/.setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
    exit 0
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    if [ -n "${LOCOSWARM_TORCH:-}" ]; then
        torch_spec="$LOCOSWARM_TORCH"            # e.g. LOCOSWARM_TORCH='torch==2.5.1'
    elif command -v nvidia-smi >/dev/null 2>&1; then
        torch_spec="torch"                       # GPU machine: the default (CUDA) build
    else
        torch_spec="torch==2.13.0"               # CPU machine: the small CPU build
    fi
    echo "[setup] installing $torch_spec"
    "$PY" -m pip install -q "$torch_spec" 2> >(grep -v "is ignored: it is neither" >&2)
fi
echo "[setup] installing locoswarm[dev,notebooks] into $VENV"
"$PY" -m pip install -q -e ".[dev,notebooks]" 2> >(grep -v "is ignored: it is neither" >&2)
"$PY" -m ipykernel install --sys-prefix --name python3 >/dev/null 2>&1 || true
rm -f "$VENV"/.setup-*
touch "$stamp"
echo "[setup] done"
