#!/usr/bin/env bash
# Set up (once) and run the tests: the core tests, the host tests against a real ComfyUI and the shipped workflows in
# its real frontend (headless Chromium). CI runs exactly this (.ci/run).
#
#   bash scripts/test.sh [pytest args...]          every test; needs a ComfyUI (below)
#   bash scripts/test.sh --core [pytest args...]   the core tests only, no ComfyUI (.venv, scripts/setup_dev.sh)
#   bash scripts/test.sh --help                    this text
#
# ComfyUI comes from the first of these that gives one:
#   1. COMFYUI_PATH=/path/to/ComfyUI   an existing ComfyUI folder (the usual case for a user);
#   2. a ComfyUI snapshot tarball (comfyui-v<version>-<commit>.tar.gz): $COMFYUI_SNAPSHOT, else the one CI keeps
#      beside its clone (.ci/run), unpacked to $COMFYUI_DIR (default ~/.cache/spare-comfyui/<snapshot name>).
#      COMFYUI_SNAPSHOT=none: no snapshot, not even CI's;
#   3. ComfyUI v0.3.64 from GitHub, when the network allows it: `git clone --depth 1 --branch v0.3.64
#      https://github.com/comfyanonymous/ComfyUI` into ~/.cache/spare-comfyui/comfyui-v0.3.64-git (at most
#      $COMFYUI_CLONE_TIMEOUT s, default 120; a clone made before is reused). COMFYUI_CLONE=0: do not try.
# With none of them it stops (exit 2) and says how to provide one. A COMFYUI_PATH or COMFYUI_SNAPSHOT that is set
# but holds no ComfyUI stops it too. ComfyUI is never put into this checkout.
#
# The tests run in the venv <repo>/.venv-comfy ($VENV): scripts/setup_comfyui.sh (torch 2.14.1, torchvision 0.29.1,
# ComfyUI's requirements.txt but torchaudio, pytest, peft; redone only when that script or ComfyUI's requirements.txt
# changed), then scripts/setup_browser.sh (Chromium, Playwright, ComfyUI's frontend; idempotent; SPARE_NO_BROWSER=1
# skips it and the browser test then skips, saying why). Set-up output goes to <venv>/setup.log (.venv/setup.log for
# --core); the console shows one status line, then pytest. OMP_NUM_THREADS defaults to 1 on every path: the test
# models are tiny (two threads on two busy cores ran ~100x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMFYUI_TAG=v0.3.64
COMFYUI_GIT=https://github.com/comfyanonymous/ComfyUI
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/spare-comfyui

usage() {
    sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed -E 's/^# ?//'
}

short() {  # a path as the user would type it: relative to the checkout, or with ~
    case "$1" in
        "$REPO"/*) echo "${1#"$REPO"/}" ;;
        "$HOME"/*) echo "~/${1#"$HOME"/}" ;;
        *) echo "$1" ;;
    esac
}

core=0
args=()
for a in "$@"; do
    case "$a" in
        --core) core=1 ;;
        *) args+=("$a") ;;
    esac
done
set -- ${args[@]+"${args[@]}"}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
quiet=(-q)  # pytest -q, unless the arguments set the verbosity (-q twice would drop pytest's summary line)
for a in "$@"; do
    case "$a" in
        -q*|--quiet|-v*|--verbose) quiet=() ;;
    esac
done

LOG=""
setup_step() {  # a set-up command; its output to $LOG; on failure the log's tail and stop
    if ! "$@" >>"$LOG" 2>&1; then
        echo >&2
        echo "test.sh: set-up failed: $*" >&2
        echo "--- last lines of $(short "$LOG") ---" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}

# --- --core: the core tests only, in .venv ---------------------------------------------------------------------------
if [ "$core" = 1 ]; then
    mkdir -p .venv
    LOG=$REPO/.venv/setup.log
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, safetensors, pytest, spare_core" 2>/dev/null; then
        echo "test.sh: core tests only (--core), in .venv; OMP_NUM_THREADS=$OMP_NUM_THREADS"
    else
        : >"$LOG"
        printf 'test.sh: core tests only (--core); setting up .venv (log: %s) ... ' "$(short "$LOG")"
        t0=$SECONDS
        setup_step bash scripts/setup_dev.sh .venv
        echo "done in $((SECONDS - t0)) s; OMP_NUM_THREADS=$OMP_NUM_THREADS"
    fi
    xml=$(mktemp "${TMPDIR:-/tmp}/spare-core-tests.XXXXXX")
    trap 'rm -f "$xml"' EXIT
    set +e
    env -u COMFYUI_PATH .venv/bin/python -m pytest ${quiet[@]+"${quiet[@]}"} --junitxml="$xml" "$@"
    rc=$?
    set -e
    # the tests that need ComfyUI skip with a reason naming COMFYUI_PATH (tests/comfy_fixtures.py, test_server_comfy)
    skipped=$(.venv/bin/python - "$xml" <<'EOF' 2>/dev/null || echo "?"
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("?")
else:
    print(sum(1 for s in root.iter("skipped") if "COMFYUI_PATH" in (s.get("message") or "")))
EOF
)
    echo "core tests only: $skipped host/browser tests were not run (they need ComfyUI; see bash scripts/test.sh --help)"
    exit "$rc"
fi

# --- every test: find ComfyUI ---------------------------------------------------------------------------------------
export VENV=${VENV:-$REPO/.venv-comfy}
mkdir -p "$VENV"
LOG=$VENV/setup.log
: >"$LOG"

is_comfyui() { [ -f "$1/comfy/model_management.py" ] && [ -f "$1/main.py" ]; }

howto() {  # $1: what was tried
    cat >&2 <<EOF
test.sh: no ComfyUI to run the host and browser tests against. Provide one of:
  1. an existing ComfyUI folder:  COMFYUI_PATH=/path/to/ComfyUI bash scripts/test.sh
  2. a ComfyUI snapshot tarball:  COMFYUI_SNAPSHOT=/path/to/comfyui-v0.3.64-<commit>.tar.gz bash scripts/test.sh
  3. network access to github.com: the script then clones ComfyUI $COMFYUI_TAG itself
     (git clone --depth 1 --branch $COMFYUI_TAG $COMFYUI_GIT, into $(short "$CACHE")/)
Or run the core tests only, without ComfyUI:  bash scripts/test.sh --core
Tried: $1
EOF
}

comfy=""
source_desc=""
src=""
tried=""
if [ -n "${COMFYUI_PATH:-}" ]; then
    if ! is_comfyui "$COMFYUI_PATH"; then
        howto "COMFYUI_PATH=$COMFYUI_PATH holds no ComfyUI (no main.py and comfy/model_management.py there)"
        exit 2
    fi
    comfy=$(cd "$COMFYUI_PATH" && pwd)
    src=$comfy
    source_desc="COMFYUI_PATH"
else
    tried="COMFYUI_PATH: unset"
fi

if [ -z "$comfy" ]; then
    snapshot=${COMFYUI_SNAPSHOT:-}
    if [ "$snapshot" = none ]; then
        tried="$tried; snapshot: COMFYUI_SNAPSHOT=none (not looked for)"
    elif [ -n "$snapshot" ]; then
        if [ ! -f "$snapshot" ]; then
            howto "$tried; snapshot: COMFYUI_SNAPSHOT=$snapshot: no such file"
            exit 2
        fi
    else
        # CI's snapshot: the newest in the folder CI keeps beside its clone (.ci/run); a user's clone has none there
        snapshot=$(ls -1 "$REPO"/../shared/vendor/comfyui-v*.tar.gz 2>/dev/null | sort | tail -n 1 || true)
        [ -n "$snapshot" ] || tried="$tried; snapshot: COMFYUI_SNAPSHOT unset (and no CI snapshot beside the checkout)"
    fi
    if [ -n "$snapshot" ] && [ "$snapshot" != none ]; then
        snapshot=$(realpath "$snapshot")
        comfy=${COMFYUI_DIR:-$CACHE/$(basename "$snapshot" .tar.gz)}
        src=$snapshot
        source_desc="snapshot $(short "$snapshot")"
    fi
fi

if [ -z "$comfy" ]; then
    cloned=$CACHE/comfyui-$COMFYUI_TAG-git
    if is_comfyui "$cloned"; then
        comfy=$cloned
        src=$cloned
        source_desc="a clone made before"
    elif [ "${COMFYUI_CLONE:-1}" = 0 ]; then
        tried="$tried; git clone: COMFYUI_CLONE=0 (not tried)"
    else
        printf 'test.sh: no COMFYUI_PATH and no snapshot: cloning ComfyUI %s (at most %s s) ... ' \
            "$COMFYUI_TAG" "${COMFYUI_CLONE_TIMEOUT:-120}"
        mkdir -p "$CACHE"
        rm -rf "$cloned.partial"
        echo "+ git clone --depth 1 --branch $COMFYUI_TAG $COMFYUI_GIT $cloned" >>"$LOG"
        if GIT_TERMINAL_PROMPT=0 timeout "${COMFYUI_CLONE_TIMEOUT:-120}" \
                git clone -q --depth 1 --branch "$COMFYUI_TAG" "$COMFYUI_GIT" "$cloned.partial" >>"$LOG" 2>&1 \
                && is_comfyui "$cloned.partial"; then
            mv "$cloned.partial" "$cloned"
            echo "done"
            comfy=$cloned
            src=$cloned
            source_desc="git clone of $COMFYUI_TAG"
        else
            rm -rf "$cloned.partial"
            echo "failed"
            why=$(grep -v '^+ ' "$LOG" | tail -n 1)
            tried="$tried; git clone: failed (${why:-timed out}; log: $(short "$LOG"))"
        fi
    fi
fi

if [ -z "$comfy" ]; then
    howto "$tried"
    exit 2
fi

# --- its venv (once), the browser test's needs, then pytest: one status line -------------------------------------------
want=$(cat scripts/setup_comfyui.sh "$comfy/requirements.txt" 2>/dev/null | sha256sum | cut -c1-16 || true)
stamp=$VENV/.spare-setup-stamp
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py" 2>/dev/null || true)
printf 'test.sh: ComfyUI %s from %s at %s; ' "${version:-?}" "$source_desc" "$(short "$comfy")"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && is_comfyui "$comfy" \
        && "$VENV/bin/python" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchvision', 'peft', 'pytest')))" 2>/dev/null; then
    printf 'venv %s ready; ' "$(short "$VENV")"
else
    printf 'setting up venv %s (minutes the first time) ... ' "$(short "$VENV")"
    t0=$SECONDS
    setup_step bash scripts/setup_comfyui.sh "$src" "$comfy"
    echo "$want" >"$stamp"
    printf 'done in %d s; ' $((SECONDS - t0))
fi
comfy=$(realpath "$comfy")
export COMFYUI_PATH=$comfy
if [ "${SPARE_NO_BROWSER:-0}" = 1 ]; then
    printf 'browser test off (SPARE_NO_BROWSER=1); '
elif bash scripts/setup_browser.sh >>"$LOG" 2>&1; then
    printf 'browser ready; '
else
    printf 'browser set-up FAILED: the browser test will skip; '
fi
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS; set-up log: $(short "$LOG")"
exec "$VENV/bin/python" -m pytest ${quiet[@]+"${quiet[@]}"} "$@"
