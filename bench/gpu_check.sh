#!/usr/bin/env bash
# SPARE on full-size SD1.5 and SDXL UNets (random weights) on an NVIDIA GPU, in one command of at most ~8 minutes:
#
#   bash bench/gpu_check.sh                                            # from the repo root, on a GPU machine
#
# On a GPU machine that gets only a copy of the working tree: put a ComfyUI snapshot tarball in shared/vendor/ at the
# repo root first (git-ignored; e.g. comfyui-v0.3.64-<commit>.tar.gz) and copy that folder along, or set COMFYUI_PATH
# there; allow the run ~540 s; the figures are written under $OUT.
#   GPU_CHECK_ALLOW_CPU=1 OUT=/tmp/gpucheck_out bash bench/gpu_check.sh  # the same path as a tiny CPU smoke run
#
# Stages, each logged:
#   1. device: nvidia-smi must list a GPU (else exit 2), unless GPU_CHECK_ALLOW_CPU=1 (then the tiny CPU smoke
#      configurations run instead: SD1.5 fp32 at 64 px, 2 steps, a 2-step erase, one torch thread).
#   2. ComfyUI: $COMFYUI_PATH, else the snapshot tarball ($COMFYUI_SNAPSHOT, else the newest comfyui-v*.tar.gz in
#      shared/vendor/ at the repo root or in CI's folder beside the clone) unpacked OUTSIDE the repo, to
#      $GPU_CHECK_COMFY_DIR (default ${TMPDIR:-/tmp}/spare-comfyui/<snapshot name>). None found: exit 2.
#   3. Python: the first of $GPU_CHECK_PYTHON (alone, when set), python3, $GPU_CHECK_VENV/bin/python (default
#      .venv-gpu), .venv-comfy/bin/python whose torch sees CUDA and that imports what the benchmark imports. A Python
#      with CUDA torch but missing modules gets a venv at $GPU_CHECK_VENV that sees its packages (a .pth file) and
#      pip-installs the missing ones (from the wheels in $GPU_CHECK_WHEELS, default .whl, when that folder exists;
#      else from the index). No CUDA torch at all: `python3 -m venv` + torch==2.14.1 torchvision==0.29.1 + the
#      runtime packages scripts/setup_comfyui.sh installs. No usable Python in the end: exit 3. (CPU mode installs
#      nothing: it needs a Python with torch and those modules already, e.g. .venv-comfy.)
#   4. nvidia-smi's view of the GPU.
#   5. bench/host_speed.py, one configuration at a time, highest priority first, each with its own timeout cut to
#      what is left of the total budget ($GPU_CHECK_BUDGET_S from the script's start: 450 s on cuda, 2700 on the
#      CPU); a configuration that no longer fits is recorded as skipped. On cuda: SD1.5 512 px fp16 with
#      checkpointing on and the default erase ($GPU_CHECK_ERASE_STEPS distill steps, default 200), Flux.1-dev 1024 px
#      from fp8_e4m3fn weights and SD3.5-large 1024 px bf16 (checkpointing on, 5 steps), SDXL 1024 px fp16 on, SD1.5
#      fp16 off, SDXL fp16 off, SD1.5 bf16 on and off, Flux.1-dev fp8 with Distill's text_encoder "last" (all but
#      the first: step timing and floor only).
#      A failed or timed-out configuration does not stop the others.
# Output: every JSON line to $OUT/gpu_check.jsonl (OUT default: ./out), a table to $OUT/gpu_check.txt, the full log
# to $OUT/gpu_check.log; the last line says what ran. Exit: 0 all configurations ok, 1 some failed / timed out /
# skipped, 2 no GPU or no ComfyUI, 3 no usable Python.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)
START=$(date +%s)
OUT=${OUT:-$REPO/out}
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 1; }
JSONL=$OUT/gpu_check.jsonl
TXT=$OUT/gpu_check.txt
LOG=$OUT/gpu_check.log
: >"$JSONL"
: >"$LOG"
export PYTHONUNBUFFERED=1

log() { printf '[gpu_check %s +%ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - START))" "$*" | tee -a "$LOG" >&2; }
die() {  # die <exit code> <message>: the message goes to the log, stderr and the summary file
    local code=$1
    shift
    log "ERROR: $*"
    printf 'gpu_check: nothing was benchmarked: %s\n' "$*" >"$TXT"
    exit "$code"
}

# --- 1. device ----------------------------------------------------------------------------------------------------
log "[1/5] device"
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    MODE=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models; the CPU may be shared
    log "GPU_CHECK_ALLOW_CPU=1: running the tiny CPU smoke configurations (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    die 2 "no NVIDIA GPU here (nvidia-smi not found); this check needs one. GPU_CHECK_ALLOW_CPU=1 runs a tiny CPU \
smoke run of the same path instead"
elif ! nvidia-smi -L >/dev/null 2>&1 || [ -z "$(nvidia-smi -L 2>/dev/null)" ]; then
    die 2 "nvidia-smi lists no GPU ($(nvidia-smi -L 2>&1 | head -n 1))"
else
    MODE=cuda
    log "GPU: $(nvidia-smi -L | head -n 1)"
fi

# --- 2. ComfyUI -----------------------------------------------------------------------------------------------------
log "[2/5] ComfyUI"
if [ -n "${COMFYUI_PATH:-}" ]; then
    [ -f "$COMFYUI_PATH/comfy/model_management.py" ] \
        || die 2 "COMFYUI_PATH=$COMFYUI_PATH holds no ComfyUI checkout (no comfy/model_management.py)"
else
    snapshot=${COMFYUI_SNAPSHOT:-}
    if [ -z "$snapshot" ]; then
        # CI's folder beside the clone (as scripts/test.sh), or shared/vendor/ in the repo (git-ignored)
        snapshot=$(ls -1 "$REPO"/../shared/vendor/comfyui-v*.tar.gz "$REPO"/shared/vendor/comfyui-v*.tar.gz \
            2>/dev/null | sort | tail -n 1)
    fi
    [ -n "$snapshot" ] && [ -f "$snapshot" ] || die 2 "no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, or \
COMFYUI_SNAPSHOT to a snapshot .tar.gz, or put comfyui-v*.tar.gz in shared/vendor/ (repo root)"
    dest=${GPU_CHECK_COMFY_DIR:-${TMPDIR:-/tmp}/spare-comfyui/$(basename "$snapshot" .tar.gz)}
    case "$(realpath -m "$dest")/" in
        "$REPO"/*) die 2 "GPU_CHECK_COMFY_DIR=$dest lies inside the repo; ComfyUI must be unpacked outside it" ;;
    esac
    if [ -f "$dest/comfy/model_management.py" ]; then
        log "ComfyUI already unpacked at $dest"
    elif [ -e "$dest" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then
        die 2 "$dest exists and holds no ComfyUI; remove it or set GPU_CHECK_COMFY_DIR elsewhere"
    else
        log "unpacking $snapshot to $dest"
        tmp="$dest.partial.$$"
        rm -rf "$tmp" && mkdir -p "$tmp" && tar -xzf "$snapshot" -C "$tmp" || die 2 "could not unpack $snapshot"
        tree=$(dirname "$(ls -1 "$tmp"/comfy/model_management.py "$tmp"/*/comfy/model_management.py 2>/dev/null \
            | head -n 1)")
        [ "$tree" != . ] || die 2 "$snapshot holds no comfy/model_management.py"
        tree=$(dirname "$tree")  # the folder holding comfy/ (the tarball's top level, or its one top folder)
        rmdir "$dest" 2>/dev/null  # an empty folder only (checked above)
        mkdir -p "$(dirname "$dest")" && mv "$tree" "$dest" || die 2 "could not move ComfyUI to $dest"
        rm -rf "$tmp"
    fi
    export COMFYUI_PATH=$dest
fi
log "COMFYUI_PATH=$COMFYUI_PATH"

# --- 3. Python ------------------------------------------------------------------------------------------------------
log "[3/5] Python"
VENV=${GPU_CHECK_VENV:-$REPO/.venv-gpu}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
# What bench/host_speed.py imports besides the standard library and ComfyUI itself (comfy/ and nodes/host.py need
# torchvision .. tqdm; tests/comfy_fixtures.py imports pytest).
MODULES=(torchvision transformers tokenizers safetensors einops numpy PIL yaml psutil tqdm pytest)
PROBE='
import importlib, sys
try:
    import torch
except Exception as e:
    print("notorch", type(e).__name__, e); sys.exit()
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    print("nocuda torch", torch.__version__, "cuda", torch.version.cuda); sys.exit()
missing = []
for m in sys.argv[2:]:
    try:
        importlib.import_module(m)
    except Exception:
        missing.append(m)
print("missing " + ",".join(missing) if missing else "ok", "torch", torch.__version__, "cuda", torch.version.cuda)
'
probe() { "$1" -c "$PROBE" "$MODE" "${MODULES[@]}" 2>/dev/null | tail -n 1; }
pip_name() { case $1 in PIL) echo Pillow ;; yaml) echo pyyaml ;; *) echo "$1" ;; esac; }
pip_install() {  # pip_install <python> <requirement>...: from $WHEELS when that folder exists
    local py=$1
    shift
    if [ -d "$WHEELS" ]; then
        "$py" -m pip install --quiet --no-index --find-links "$WHEELS" "$@"
    else
        "$py" -m pip install --quiet "$@"
    fi
}

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    candidates=("$GPU_CHECK_PYTHON")
else
    candidates=(python3 "$VENV/bin/python" "$REPO/.venv-comfy/bin/python")
fi
PY=""
repairable=""
for cand in "${candidates[@]}"; do
    command -v "$cand" >/dev/null 2>&1 || { log "python candidate $cand: not found"; continue; }
    result=$(probe "$cand")
    log "python candidate $cand: ${result:-no answer}"
    case $result in
        ok*) PY=$(command -v "$cand"); PYINFO=$result; break ;;
        missing*) [ -n "$repairable" ] || { repairable=$(command -v "$cand"); repair_result=$result; } ;;
    esac
done

if [ -z "$PY" ] && [ -n "$repairable" ] && [ "$MODE" = cuda ]; then
    # A Python with CUDA torch that lacks some modules: a venv that sees its packages through a .pth file (a venv
    # made from a venv's python would see the base interpreter's packages only, not that venv's), the missing
    # modules installed into it; torch stays the one that works with this machine's driver.
    read -r _ missing _ <<<"$repair_result"
    log "$repairable has CUDA torch but lacks: $missing; making $VENV on top of it"
    if "$repairable" -m venv --without-pip "$VENV"; then
        site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$repairable" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
            >"$site/spare-gpu-check-base.pth"
        # keep this torch; pinned by its public version: "==2.11.0" accepts the installed 2.11.0+cu130, while
        # "==2.11.0+cu130" can clash with a pip constraints file that caps torch by public version
        reqs=("torch==$("$repairable" -c 'import torch; print(torch.__version__.split("+")[0])')")
        for m in ${missing//,/ }; do reqs+=("$(pip_name "$m")"); done
        log "pip install ${reqs[*]}"
        pip_install "$VENV/bin/python" "${reqs[@]}" 2>&1 | tee -a "$LOG" \
            || log "pip install failed (no package index or wheels on this machine?)"
        result=$(probe "$VENV/bin/python")
        log "python candidate $VENV/bin/python: $result"
        case $result in ok*) PY=$VENV/bin/python; PYINFO=$result ;; esac
    else
        log "could not create $VENV"
    fi
fi

if [ -z "$PY" ] && [ "$MODE" = cuda ] && [ -z "$repairable" ]; then
    log "no Python with CUDA torch: creating $VENV with torch==2.14.1 torchvision==0.29.1 (a large download)"
    if python3 -m venv "$VENV"; then
        pip_install "$VENV/bin/python" torch==2.14.1 torchvision==0.29.1 2>&1 | tee -a "$LOG" \
            || log "pip install torch==2.14.1 torchvision==0.29.1 failed (no package index here?)"
        # the runtime packages of scripts/setup_comfyui.sh
        pip_install "$VENV/bin/python" numpy einops transformers tokenizers sentencepiece safetensors aiohttp yarl \
            pyyaml Pillow scipy tqdm psutil torchsde av pydantic pydantic-settings alembic SQLAlchemy requests pytest \
            peft 2>&1 | tee -a "$LOG" || log "pip install of ComfyUI's runtime packages failed"
        result=$(probe "$VENV/bin/python")
        log "python candidate $VENV/bin/python: $result"
        case $result in ok*) PY=$VENV/bin/python; PYINFO=$result ;; esac
    else
        log "python3 -m venv $VENV failed (python3-venv missing?)"
    fi
fi

if [ -z "$PY" ]; then
    if [ "$MODE" = cpu ]; then
        die 3 "no Python with torch and ${MODULES[*]} (CPU mode installs nothing; e.g. run \
scripts/setup_comfyui.sh first)"
    fi
    die 3 "no Python with CUDA torch and ${MODULES[*]} could be found or set up (see $LOG); set GPU_CHECK_PYTHON, or \
carry wheels in $WHEELS"
fi
log "using $PY ($PYINFO)"

# --- 4. the GPU -----------------------------------------------------------------------------------------------------
log "[4/5] GPU info"
if [ "$MODE" = cuda ]; then
    GPU_LINE=$(nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,power.limit,clocks.max.sm \
        --format=csv,noheader 2>&1 | head -n 1)
    log "GPU: $GPU_LINE (name, memory total, used, driver, power limit, max SM clock)"
    nvidia-smi 2>&1 | tee -a "$LOG" >&2
else
    GPU_LINE="none (CPU smoke run, $(getconf _NPROCESSORS_ONLN) cores, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
fi

# --- 5. the benchmark -----------------------------------------------------------------------------------------------
log "[5/5] benchmark"
if [ "$MODE" = cuda ]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-450}
    MIN_RUN=45   # a configuration needs about this much to import, build and time anything
else
    BUDGET=${GPU_CHECK_BUDGET_S:-2700}
    MIN_RUN=120
fi
ERASE_STEPS=${GPU_CHECK_ERASE_STEPS:-200}
STEPS=${GPU_CHECK_STEPS:-10}
planned=0

record() {  # record <family> <latent> <dtype> <on|off> <status> <error>: the line of a configuration host_speed left
    local ckpt=false
    [ "$4" = on ] && ckpt=true
    printf '{"family": "%s", "latent": %s, "pixels": %s, "dtype": "%s", "checkpointing": %s, "device": "%s", ' \
        "$1" "$2" "$(($2 * 8))" "$3" "$ckpt" "$MODE" >>"$JSONL"
    printf '"status": "%s", "error": "%s"}\n' "$5" "$6" >>"$JSONL"
}

run_config() {  # run_config <family> <latent> <dtype> <on|off> <erase steps> <planned timeout s> [host_speed args]
    local family=$1 latent=$2 dtype=$3 ckpt=$4 erase=$5 want=$6 left t rc
    shift 6
    planned=$((planned + 1))
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$MIN_RUN" ]; then
        log "SKIP $family $dtype ckpt=$ckpt: ${left}s of the ${BUDGET}s budget left"
        record "$family" "$latent" "$dtype" "$ckpt" skipped "${left}s of the ${BUDGET}s budget left"
        return
    fi
    t=$((want < left ? want : left))
    log "RUN $family $((latent * 8))px $dtype ckpt=$ckpt erase_steps=$erase timeout=${t}s"
    # host_speed kills its configuration at --timeout and records it; `timeout` is the backstop for host_speed itself
    timeout -k 10 $((t + 30)) "$PY" bench/host_speed.py --device "$MODE" --family "$family" --latent "$latent" \
        --dtype "$dtype" --checkpointing "$ckpt" --erase-steps "$erase" --timeout "$t" --out "$JSONL" "$@" \
        2>&1 | tee -a "$LOG"
    rc=$?
    if [ "$rc" -ge 124 ]; then
        log "host_speed itself was killed (rc $rc)"
        record "$family" "$latent" "$dtype" "$ckpt" timeout "host_speed killed by the backstop timeout"
    fi
    log "END $family $dtype ckpt=$ckpt (rc $rc)"
}

if [ "$MODE" = cuda ]; then
    run_config sd15 64 fp16 on "$ERASE_STEPS" 210 --steps "$STEPS"
    # full-size DiTs at 1024 px (README's VRAM estimates): Flux.1-dev from an fp8_e4m3fn checkpoint (what 24 GB
    # users load; computes in bf16 through ComfyUI's casting ops), SD3.5-large in bf16; step timing and peak only
    run_config flux 128 fp8 on 0 90 --steps 5
    run_config sd3 128 bf16 on 0 90 --steps 5
    run_config sdxl 128 fp16 on 0 120 --steps "$STEPS"
    run_config sd15 64 fp16 off 0 60 --steps "$STEPS"
    run_config sdxl 128 fp16 off 0 120 --steps "$STEPS"
    run_config sd15 64 bf16 on 0 60 --steps "$STEPS"
    run_config sd15 64 bf16 off 0 60 --steps "$STEPS"
    # the DiT text-encoder option on CUDA (Distill's text_encoder last: the CLIP loaded beside the model, fp8 T5)
    run_config flux 128 fp8 on 0 90 --steps 5 --text-encoder last
else
    run_config sd15 8 fp32 on 2 900 --steps 2 --erase-retain empty
    run_config sd15 8 fp32 off 0 400 --steps 2
    run_config flux 8 fp8 on 0 400 --steps 2 --blocks 1   # full width, one double + one single block
    run_config sd3 8 fp32 on 0 400 --steps 2 --blocks 2
    run_config flux 8 fp8 on 0 400 --steps 2 --blocks 1 --text-encoder last
fi

# --- summary --------------------------------------------------------------------------------------------------------
count() { grep -c "\"status\": \"$1\"" "$JSONL"; }
ok=$(count ok)
failed=$(count failed)
timedout=$(count timeout)
skipped=$(count skipped)
FINAL="gpu_check: mode $MODE, $((planned - skipped)) of $planned configurations ran in $(($(date +%s) - START)) s: \
$ok ok, $failed failed, $timedout timed out, $skipped skipped; JSON lines in $JSONL, table in $TXT, log in $LOG"
{
    echo "SPARE gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null \
        || echo '?')$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ' (uncommitted changes)')"
    echo "GPU: $GPU_LINE"
    echo "Python: $PY ($PYINFO)"
    echo "ComfyUI: $COMFYUI_PATH"
    echo "s/step: one Sparse LoRA Distill step (batch 2+2, +2 cross rows on UNets, node defaults, half of all Linear/Conv2d adapted); floor:"
    echo "teacher+student forwards and backward of that step alone; ratio = s/step / floor; erase: the default erase"
    echo "(Concept Samples, Saliency Scan, Timestep Profile, Distill) in seconds; VRAM: peak allocated/reserved MB."
    echo
    "$PY" bench/host_speed.py --summarize "$JSONL"
    echo
    echo "$FINAL"
} >"$TXT" 2>&1
cat "$TXT" >&2
log "$FINAL"
[ "$ok" -eq "$planned" ]
