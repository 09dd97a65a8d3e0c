#!/usr/bin/env bash
# The main job on the bundled default, from a fresh clone: set up .venv (once), then erase one MiniCanvas concept with
# SPARE at the product defaults. Writes the LoRA and a labelled before/after picture and prints the measured verdict.
#
#   bash scripts/demo.sh                       # erases the style "ukiyo" into out/demo
#   bash scripts/demo.sh --concept ring --out out/ring   # any other style/object of the bundled model (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, safetensors, spare_core" 2>/dev/null; then
    bash scripts/setup_dev.sh .venv
fi
if [ $# -eq 0 ]; then
    set -- --concept ukiyo --out out/demo
fi
exec .venv/bin/python -m bench.minicanvas.demo "$@"
