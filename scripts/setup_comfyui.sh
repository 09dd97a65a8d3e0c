#!/usr/bin/env bash
# Set up a real ComfyUI (outside this repository) plus a virtual environment to run the host tests against it.
#
#   bash scripts/setup_comfyui.sh <ComfyUI snapshot .tar.gz, git dir or checkout> <dest dir>
#   e.g. bash scripts/setup_comfyui.sh ~/src/ComfyUI ~/comfyui        (a ComfyUI checkout: ~/comfyui links to it)
#        bash scripts/setup_comfyui.sh comfyui-v0.3.64-a125cd84.tar.gz ~/comfyui   (a snapshot: unpacked there)
#
# <source> is a snapshot tarball (unpacked to <dest>), a ComfyUI work tree (a directory holding main.py and comfy/) or a bare git copy of
# github.com/Comfy-Org/ComfyUI; a bare copy is exported with `git archive` to <dest>. The one tokenizer blob that
# may be absent from a copy (comfy/text_encoders/llama_tokenizer/tokenizer.json) is excluded; nothing here needs it.
# Given a work tree, <dest> is made a symlink to it unless it already exists.
#
# The venv goes to $VENV (default: <repo>/.venv-comfy, git-ignored by `.venv-*/`). It gets torch + torchvision
# (torchvision is a hard import of comfy/model_base.py; this pair is the one that works on our machines), what
# ComfyUI's requirements.txt lists (but torchaudio: see step 2), requests, pytest and peft. ComfyUI itself is never
# copied into this repository.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: bash $0 <ComfyUI snapshot .tar.gz, git dir or checkout> <dest dir>" >&2
    exit 2
fi
SRC=$1
DEST=$2
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO_ROOT/.venv-comfy}
PYTHON=${PYTHON:-python3}

case "$(realpath -m "$DEST")/" in
    "$REPO_ROOT"/*) echo "refusing: <dest> must lie outside the project checkout ($REPO_ROOT)" >&2; exit 2 ;;
esac

# --- 1. the ComfyUI work tree ------------------------------------------------------------------------------------
if [ -f "$SRC" ] && case "$SRC" in *.tar.gz|*.tgz) true ;; *) false ;; esac; then
    # A snapshot tarball (e.g. comfyui-v0.3.64-<commit>.tar.gz, a `git archive` of ComfyUI): unpack it once.
    if [ -f "$DEST/main.py" ]; then
        echo "$DEST already holds a ComfyUI tree; not unpacking"
    else
        mkdir -p "$DEST"
        tar -xzf "$SRC" -C "$DEST"
        # a tarball holding one top-level folder: use that folder's content
        if [ ! -f "$DEST/main.py" ] && [ "$(ls -A "$DEST" | wc -l)" -eq 1 ] && [ -f "$DEST"/*/main.py ]; then
            inner=$(ls -d "$DEST"/*/)
            mv "$inner"* "$inner".[!.]* "$DEST"/ 2>/dev/null || true
            rmdir "$inner"
        fi
        echo "unpacked $SRC to $DEST"
    fi
elif [ -f "$SRC/main.py" ] && [ -d "$SRC/comfy" ]; then
    # Already a checkout.
    if [ ! -e "$DEST" ]; then
        ln -s "$(realpath "$SRC")" "$DEST"
    fi
elif git --git-dir="$SRC" rev-parse --verify -q HEAD >/dev/null; then
    if [ -f "$DEST/main.py" ]; then
        echo "$DEST already holds a ComfyUI tree; not re-exporting"
    else
        mkdir -p "$DEST"
        # `git archive` may print "error: invalid object ... tokenizer.json" even though that path is excluded; it
        # still exits 0 and writes the full tree.
        git --git-dir="$SRC" archive HEAD -- . ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' \
            | tar -x -C "$DEST"
        echo "exported ComfyUI $(git --git-dir="$SRC" rev-parse --short HEAD) to $DEST"
    fi
else
    echo "$SRC is neither a ComfyUI snapshot tarball, a checkout nor a git directory" >&2
    exit 2
fi
DEST=$(realpath "$DEST")
[ -f "$DEST/comfy/model_management.py" ] || { echo "no comfy/ package under $DEST" >&2; exit 1; }

# --- 2. the virtual environment ------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
"${PIP[@]}" "${TORCH_PINS[@]}"
# Then everything ComfyUI's own requirements.txt lists (so that none of ComfyUI's own nodes prints IMPORT FAILED:
# kornia, spandrel, the frontend packages, ...), with torch/torchvision held at the pair above, plus `requests`
# (main.py needs it; requirements.txt leaves it out), pytest and peft. Left out: torchaudio. No torchaudio on PyPI
# matches torch 2.14.1 (the newest, 2.11.1, requires torch==2.11.1), so ComfyUI's audio nodes (nodes_audio.py,
# nodes_audio_encoder.py) stay IMPORT FAILED; nothing in this pack or its tests uses them.
REQS=$(mktemp)
CONSTRAINTS=$(mktemp)
trap 'rm -f "$REQS" "$CONSTRAINTS"' EXIT
grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;].*)?$' "$DEST/requirements.txt" >"$REQS"
printf '%s\n' "${TORCH_PINS[@]}" >"$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$REQS" requests pytest peft

# --- 3. smoke test: ComfyUI's model code imports headless on CPU ----------------------------------------------------
COMFYUI_PATH="$DEST" "$VENV/bin/python" - <<'EOF'
import os, sys
sys.path.insert(0, os.environ["COMFYUI_PATH"])
import comfy.cli_args
comfy.cli_args.args.cpu = True          # before comfy.model_management is imported
import comfy.model_management, comfy.sd, comfy.supported_models  # noqa: E401,F401
import torch
print("ComfyUI imports OK; torch", torch.__version__, "device", comfy.model_management.get_torch_device())
EOF

echo
echo "Done. To run the host tests:"
echo "export COMFYUI_PATH=$DEST"
echo "$VENV/bin/python -m pytest tests"
