#!/usr/bin/env bash
# Create ./.venv with the pinned CPU build of PyTorch and this package (editable) with the browser app, the
# classical baselines of `iconreg evaluate` (ANTs, elastix) and the test tools. Idempotent: re-running only installs what is missing. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned: an unpinned spec would pull gigabytes of CUDA wheels on a CPU-only machine.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,app,baselines]"
