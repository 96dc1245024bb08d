#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the default test suite. Extra arguments go to pytest.
# As root on Debian/Ubuntu it also installs what the browser tests need (Chromium, EGL for offscreen rendering);
# elsewhere those tests skip and say what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh || echo "note: Chromium/EGL not installed; the browser tests will skip" >&2
exec .venv/bin/python -m pytest -q "$@"
