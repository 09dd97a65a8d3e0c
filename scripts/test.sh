#!/usr/bin/env bash
# Set up (once) and run EVERY test: the core tests, the host tests against a real ComfyUI and the workflows in its
# real frontend (headless Chromium). CI runs exactly this.
#
#   bash scripts/test.sh [pytest args...]
#
# ComfyUI comes from, in this order: $COMFYUI_PATH (an existing checkout), else the snapshot tarball
# $COMFYUI_SNAPSHOT or ../shared/vendor/comfyui-v*.tar.gz beside this checkout, unpacked (outside the checkout, never
# committed) to $COMFYUI_DIR (default: ~/.cache/spare-comfyui/<snapshot name>). Its venv is <repo>/.venv-comfy
# (scripts/setup_comfyui.sh; set-up is skipped when the venv already imports ComfyUI). Without any ComfyUI, the core
# tests run in .venv (scripts/setup_dev.sh) and the host tests are skipped, with a loud warning.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export VENV=${VENV:-$REPO/.venv-comfy}

comfy=${COMFYUI_PATH:-}
if [ -z "$comfy" ] || [ ! -f "$comfy/comfy/model_management.py" ]; then
    snapshot=${COMFYUI_SNAPSHOT:-}
    if [ -z "$snapshot" ]; then
        snapshot=$(ls -1 "$REPO"/../shared/vendor/comfyui-v*.tar.gz 2>/dev/null | sort | tail -n 1 || true)
    fi
    if [ -n "$snapshot" ] && [ -f "$snapshot" ]; then
        name=$(basename "$snapshot" .tar.gz)
        comfy=${COMFYUI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/spare-comfyui/$name}
    else
        comfy=""
    fi
fi

if [ -n "$comfy" ]; then
    if [ -f "$comfy/comfy/model_management.py" ] && [ -x "$VENV/bin/python" ] \
            && COMFYUI_PATH="$comfy" "$VENV/bin/python" -c "import sys, os; sys.path.insert(0, os.environ['COMFYUI_PATH']); import comfy.model_base, peft, pytest" 2>/dev/null; then
        echo "ComfyUI at $comfy, venv $VENV: ready"
    else
        bash scripts/setup_comfyui.sh "${snapshot:-$comfy}" "$comfy"
    fi
    export COMFYUI_PATH=$comfy
    # the browser test's needs (Chromium from apt, Playwright, ComfyUI's frontend); idempotent, ~30 s the first time.
    # SPARE_NO_BROWSER=1 skips it (the browser test then skips, saying why).
    if [ "${SPARE_NO_BROWSER:-0}" != 1 ] && ! bash scripts/setup_browser.sh; then
        echo "WARNING: scripts/setup_browser.sh failed: the browser test will be SKIPPED" >&2
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: one thread each (two on 2 busy cores ran ~100x slower)
    exec "$VENV/bin/python" -m pytest -q "$@"
fi

echo "WARNING: no ComfyUI found (set COMFYUI_PATH, or COMFYUI_SNAPSHOT to a ComfyUI snapshot .tar.gz);" \
     "the host tests will be SKIPPED" >&2
[ -x .venv/bin/python ] || bash scripts/setup_dev.sh .venv
exec .venv/bin/python -m pytest -q "$@"
