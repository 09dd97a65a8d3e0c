#!/usr/bin/env bash
# The main job on the bundled default, from a fresh clone: set up .venv (once), then erase one MiniCanvas concept with
# SPARE at the product defaults. Writes the LoRA and a labelled before/after picture and prints the measured verdict.
#
#   bash scripts/demo.sh                                 # erases the style "ukiyo" into out/demo
#   bash scripts/demo.sh --steps 5                       # still ukiyo: the defaults hold whatever else is given
#   bash scripts/demo.sh --concept ring --out out/ring   # any other style/object of the bundled model (see --help)
#
# Defaults: --concept ukiyo --out out/demo (the same as bench/minicanvas/demo.py's own; this script passes them
# explicitly, and a --concept given here comes after them, so it wins). Set-up output goes to
# .venv/setup.log; the console shows one line for it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_CONCEPT=ukiyo
DEFAULT_OUT=out/demo

ready() { [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, safetensors, spare_core" 2>/dev/null; }

for a in "$@"; do
    case "$a" in
        -h|--help)
            cat <<EOF
usage: bash scripts/demo.sh [--concept CONCEPT] [--steps STEPS] [--seed SEED] [--retain {half,nearest}] [--out OUT]

Erases one concept of the bundled MiniCanvas model with SPARE at the product defaults (sets up .venv first, once),
writes the LoRA and a labelled before/after picture into OUT and prints the measured verdict.

default concept: $DEFAULT_CONCEPT (a style), whatever other options are given; default OUT: $DEFAULT_OUT
EOF
            if ready; then
                # the options as bench/minicanvas/demo.py defines them (its own usage line and --concept default are
                # those of `python -m bench.minicanvas.demo`, not of this script: left out)
                echo
                .venv/bin/python -m bench.minicanvas.demo --help | sed -n '/^options:/,$p;/^optional arguments:/,$p'
            else
                echo
                echo "(the options in full: run the demo once, which sets up .venv, then --help again)"
            fi
            exit 0 ;;
    esac
done

if ! ready; then
    mkdir -p .venv
    log=.venv/setup.log
    : >"$log"
    printf 'demo.sh: setting up .venv, once (a few minutes; log: %s) ... ' "$log"
    t0=$SECONDS
    if ! bash scripts/setup_dev.sh .venv >>"$log" 2>&1; then
        echo "FAILED; last lines of $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    echo "done in $((SECONDS - t0)) s"
fi
# argparse keeps the last value of an option: the user's --concept / --out (if any) override these defaults
exec .venv/bin/python -m bench.minicanvas.demo --concept "$DEFAULT_CONCEPT" --out "$DEFAULT_OUT" "$@"
