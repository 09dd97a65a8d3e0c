#!/usr/bin/env bash
# Fresh-machine set-up for the core tests: a venv with the CPU torch build and the pack's requirements.
# Usage: bash scripts/setup_dev.sh [venv dir, default .venv]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0   # CPU build from local disk; a bare `torch` would pull a CUDA build
"$VENV/bin/pip" install -q -r requirements-dev.txt
"$VENV/bin/pip" install -q -e .   # spare_core (and the bundled benchmark) importable from anywhere
echo "ready: $VENV/bin/python -m pytest"
