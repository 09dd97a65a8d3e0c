#!/usr/bin/env bash
# Set up what tests/test_browser_comfy.py needs to load the shipped workflows in a real browser:
#   - Debian's Chromium (/usr/bin/chromium), from apt, only when it is missing (sudo only when not root);
#   - Playwright from PyPI in the ComfyUI venv ($VENV, default <repo>/.venv-comfy). Its Node driver ships inside the
#     wheel; `playwright install` (which downloads browser builds) is NEVER run: the test drives /usr/bin/chromium;
#   - ComfyUI's frontend packages at the versions $COMFYUI_PATH/requirements.txt pins (comfyui-frontend-package,
#     comfyui-workflow-templates, comfyui-embedded-docs), so that the server serves the real web UI;
#   - spandrel (one of ComfyUI's "non essential" requirements): without it
#     comfy_extras/nodes_upscale_model.py does not import, UpscaleModelLoader is missing from /object_info, and
#     frontend 1.27.10 then fails to build every Load Checkpoint / LoRA loader node (its model-to-node map holds an
#     undefined entry: "Cannot read properties of undefined (reading 'has')" in isAssetBrowserEligible), so they show
#     as red broken nodes.
#
#   COMFYUI_PATH=/work/comfyui bash scripts/setup_browser.sh
#
# Idempotent: each step is skipped when what it installs is already there (a venv made by scripts/setup_comfyui.sh
# has the frontend packages and spandrel already: it installs all of ComfyUI's requirements.txt but torchaudio).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO_ROOT/.venv-comfy}
COMFYUI_PATH=${COMFYUI_PATH:-/work/comfyui}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "no venv at $VENV (run scripts/setup_comfyui.sh first, or set VENV)" >&2
    exit 2
fi
if [ ! -f "$COMFYUI_PATH/requirements.txt" ]; then
    echo "no ComfyUI at $COMFYUI_PATH (set COMFYUI_PATH)" >&2
    exit 2
fi

# --- 1. Chromium --------------------------------------------------------------------------------------------------
# Debian's /usr/bin/chromium is a shell launcher that sources /etc/chromium.d/*. Its dev-shm snippet runs
# `[ $(findmnt -bnr -o avail -T /dev/shm) -lt ... ]`, which fails ("[: 25275944960: unexpected operator") where
# /dev/shm is mounted twice (containers: findmnt prints two lines); the launcher then goes on. The version is asked of
# the binary it launches (/usr/lib/chromium/chromium), which never runs that snippet.
chromium_version() {
    local bin=$CHROMIUM
    if [ "$CHROMIUM" = /usr/bin/chromium ] && [ -x /usr/lib/chromium/chromium ]; then
        bin=/usr/lib/chromium/chromium
    fi
    "$bin" --version
}
if [ -x "$CHROMIUM" ]; then
    echo "chromium: $(chromium_version) already installed"
else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
    echo "chromium: $(chromium_version) installed"
fi

# --- 2. Playwright (the Python package; no browser download) -------------------------------------------------------
version_of() {  # the installed version of a distribution, without importing it (importing torch takes seconds)
    "$PY" -c "import sys; from importlib.metadata import version; print(version(sys.argv[1]))" "$1"
}
if "$PY" -c "import playwright.sync_api" 2>/dev/null; then
    echo "playwright: $(version_of playwright) already installed"
else
    "$PY" -m pip install --quiet --disable-pip-version-check playwright
    echo "playwright: $(version_of playwright) installed"
fi

# --- 3. ComfyUI's frontend, at ComfyUI's pins ----------------------------------------------------------------------
PINS=()
for pkg in comfyui-frontend-package comfyui-workflow-templates comfyui-embedded-docs; do
    pin=$(grep -E "^${pkg}[[:space:]]*(==|>=|~=)" "$COMFYUI_PATH/requirements.txt" | head -1 | tr -d '[:space:]' || true)
    if [ -n "$pin" ]; then
        PINS+=("$pin")
    fi
done
if [ ${#PINS[@]} -eq 0 ]; then
    echo "no frontend pins found in $COMFYUI_PATH/requirements.txt" >&2
    exit 1
fi
# pip's own check: "already satisfied" for every pin -> nothing is downloaded
if "$PY" - "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for pin in sys.argv[1:]:
    name, _, want = pin.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        ok = False
        continue
    if want and have != want:
        ok = False
sys.exit(0 if ok else 1)
EOF
then
    echo "frontend: ${PINS[*]} already installed"
else
    "$PY" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
    echo "frontend: ${PINS[*]} installed"
fi

# --- 4. spandrel (UpscaleModelLoader; see the top; scripts/setup_comfyui.sh installs it already) ---------------------
if version_of spandrel >/dev/null 2>&1; then
    echo "spandrel: $(version_of spandrel) already installed"
else
    "$PY" -m pip install --quiet --disable-pip-version-check spandrel
    echo "spandrel: $(version_of spandrel) installed"
fi
