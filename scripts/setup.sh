#!/usr/bin/env bash
# Create ./.venv with the pinned CPU build of PyTorch and this package (editable) with the browser app, the
# classical baselines of `iconreg evaluate` (ANTs, elastix) and the test tools. Idempotent: re-running only installs what is missing. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || { echo "could not create .venv: Debian/Ubuntu's python3 needs 'apt install python3-venv'" >&2; exit 1; }
fi
# torch is pinned: an unpinned spec would pull gigabytes of CUDA wheels on a CPU-only machine. Where pip reaches
# PyPI directly, the pinned version is PyTorch's default (CUDA) build; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# gets the CPU build instead.
.venv/bin/python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install --quiet -e ".[test,app,baselines,native]"
# The compiled CPU sampler (ICONRegistrationLib/core/native_sampler.py): built once here (about 30 s; cached in
# PyTorch's extension folder) so that every later run samples with it. Without a C++ compiler it says why and the
# package uses PyTorch's grid_sample; setup does not fail.
.venv/bin/python -c "from ICONRegistrationLib.core import native_sampler as n; s = n.enable(); print('compiled CPU sampler:', 'ready' if s.available else 'not available (' + s.reason + '); using grid_sample')"
