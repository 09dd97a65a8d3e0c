"""MiniCanvas harness: erase concepts from the bundled model with SPARE, its ablations and the baselines, and score
every edit with the UnlearnCanvas definitions.

    python -m bench.minicanvas --standard --out results.json  # 20 concepts x 3 training seeds, papers' budgets
    python -m bench.minicanvas --quick --out results.json     # 4 concepts, SPARE at product defaults, <= 10 min
    COMFYUI_PATH=~/comfyui .venv-comfy/bin/python -m bench.minicanvas --host comfyui --methods spare --quick \
        --out results_comfyui.json   # SPARE through the pack's nodes, grids through ComfyUI's KSampler (host_path.py)

Train/test split: every method trains on UnlearnCanvas' template "A {object} image in {style} style." (forget,
surrogate and retain prompts); the evaluation grid (10 x 10 non-neutral style x object pairs, `seeds` images per pair)
asks with the *other* templates of data.TEMPLATES, so an erasure is judged on prompts it never trained on. The
shipped classifiers judge it (metrics.py). Same model, grid and seeds for every method; the unerased model is scored
once ("base"). The training seed (samples, adapter init, retain neighbours) varies over `train_seeds`; every figure
is reported with a 95% bootstrap interval over concepts and training seeds (metrics.bootstrap_ci).

Hosts (--host): "library" (default) trains through spare_core on the bundled MiniCanvasModel and samples the grids
with its own sampler; "comfyui" runs the same harness inside ComfyUI (COMFYUI_PATH, ComfyUI's Python environment):
SPARE through the pack's nodes on the SPARE Demo Model, the grids (the unerased model's too) through ComfyUI's
KSampler sampling call and VAE decode, the same Judge (host_path.py lists every difference). SPARE only.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import replace

import spare_core as sc
from spare_core.minicanvas import data

from .budgets import (EVAL_TEMPLATES, FLUX_MODELS, FLUX_ONLY_METHODS, METHODS, MODEL_METHODS, ERASABLE_OBJECTS,
                      QUICK_BASELINE_SCALE, QUICK_CONCEPTS, QUICK_METHODS,
                      QUICK_SAMPLE_STEPS, RETAIN_SETS, STANDARD_BASELINE_SEEDS, STANDARD_CLOSED_FORM_SEEDS,
                      STANDARD_ESD_STEPS, STANDARD_METHODS,
                      ERASABLE_STYLES, TRAIN_TEMPLATE, MODELS, Budget, parse_override, split_variant)
from .dispatch import HOSTS, check_model_methods, run


def comfyui_version(path: str) -> str:
    """ComfyUI's version string (comfyui_version.py) and its folder, for the results' meta."""
    try:
        with open(os.path.join(path, "comfyui_version.py")) as f:
            version = next((ln.split("=", 1)[1].strip().strip("\"'") for ln in f if ln.startswith("__version__")), "?")
    except OSError:
        version = "?"
    return f"ComfyUI {version} ({path})"


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--standard", action="store_true",
                      help="every style and object, 3 training seeds, " + ", ".join(STANDARD_METHODS) + " at the "
                      f"papers' budgets (ESD {STANDARD_ESD_STEPS} steps; the step-trained baselines and the all-pairs "
                      "reference row 1 training seed); every method's retain list leaves half of the other classes "
                      "out; with --model flux: " + ", ".join(MODEL_METHODS["flux"]["standard"]) + ", UCE 1 training seed "
                      "(<= 90 min on 2 cores)")
    mode.add_argument("--quick", action="store_true",
                      help="4 concepts, 1 training seed, SPARE at the product defaults, baselines' budgets x "
                      f"{QUICK_BASELINE_SCALE} (<= 10 min on 2 cores)")
    ap.add_argument("--methods", help="comma-separated subset of " + ", ".join(METHODS) + " or 'all' (default: "
                    "standard: " + ", ".join(STANDARD_METHODS) + "; quick: " + ", ".join(QUICK_METHODS) + "; with --model "
                    "flux: standard as said there, quick adds " + ", ".join(FLUX_ONLY_METHODS) + "; without a preset "
                    "it is spare); "
                    "spare+FIELD=VALUE[+...] is SPARE with DistillConfig fields set, e.g. spare+surrogate_anchor=1.0")
    ap.add_argument("--concepts", help="comma-separated style/object names to erase (default: all, or quick set)")
    ap.add_argument("--seeds", type=int, help="images per grid pair (default 2, quick 1)")
    ap.add_argument("--train-seeds", type=int, help="training seeds per concept (default 1, standard 3)")
    ap.add_argument("--first-train-seed", type=int, default=0,
                    help="the first training seed (default 0): --first-train-seed 3 --train-seeds 2 runs seeds 3 and "
                    "4, to extend an earlier run; report --results a.json,b.json pools a method's runs of two files")
    ap.add_argument("--baseline-seeds", type=int,
                    help="training seeds of the step-trained baselines (default: as many as --train-seeds; "
                    f"--standard {STANDARD_BASELINE_SEEDS})")
    ap.add_argument("--budget-scale", type=float, help="multiply every method's steps, SPARE's cap included")
    ap.add_argument("--sample-steps", type=int, help="sampler steps of the evaluation grids (default 12, quick 8)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes, one (concept, seed) at a time each (default: 2 or the core count)")
    ap.add_argument("--spare-weighting", choices=sc.LOSS_WEIGHTINGS, default=Budget.spare_weighting,
                    help="loss weighting of SPARE and its ablations (default v; eps = the authors')")
    ap.add_argument("--spare-scoring", choices=sc.config.SCORINGS, default=Budget.spare_scoring)
    ap.add_argument("--spare-targets", choices=sc.config.TARGET_SETS, default=Budget.spare_targets)
    ap.add_argument("--spare-fraction", type=float, default=Budget.spare_fraction,
                    help="share of the candidate modules the saliency scan selects (default: the product's)")
    ap.add_argument("--spare-stop", type=float, default=Budget.spare_stop,
                    help="SPARE's stopping rule target (gap closed); 0 = run every step")
    ap.add_argument("--retain-set", choices=RETAIN_SETS, default=Budget.retain_set,
                    help="every method's retain list (budgets.listed_classes): half (default; half of the other "
                    "classes, drawn per training seed), few (the shipped workflows' builder line), near (the half "
                    "nearest to the concept in the pooled text code; near-token: in the word's token state; nearest: "
                    "the half SPARE Nearest Concepts ranked nearest until 2026-12-06; nearest-unpadded: as it "
                    "ranks them since, the padding left out), "
                    "all-pairs (every other pair: the reference), neighbours, growK (experiments: 3 unlisted, K of the "
                    "other 6 listed; grow3near: the 3 of those 6 that SPARE Nearest Concepts ranked nearest until "
                    "2026-12-06, grow3near-unpadded: as it ranks them since)")
    ap.add_argument("--host", choices=HOSTS, default="library",
                    help="library (default): SPARE through spare_core, grids through the bundled sampler; comfyui: "
                    "SPARE through the pack's nodes and the grids through ComfyUI's KSampler on the SPARE Demo Model "
                    "(needs COMFYUI_PATH and ComfyUI's Python environment, .venv-comfy; SPARE only: --methods spare "
                    "is the default then; see bench/minicanvas/host_path.py)")
    ap.add_argument("--model", choices=MODELS, default=Budget.model,
                    help="the bundled model to erase from: unet (MiniCanvas, default), flux (MiniCanvas-Flux, "
                    "ComfyUI's Flux class trained on the same images: run with ComfyUI's Python environment and "
                    "COMFYUI_PATH; every baseline in its Flux form (baselines.py) plus eraseanything; without --standard or "
                    "--quick, --methods spare is the default then) or flux-dev (MiniCanvas-Flux guidance-distilled "
                    "as Flux.1-dev is: SPARE trains at FluxGuidance 3.5, --eval-guidance sets the grids')")
    ap.add_argument("--eval-guidance", type=float, default=0.0,
                    help="--model flux-dev: the FluxGuidance the evaluation grids (unerased and erased) are sampled at; "
                    "0 = the guidance SPARE trains at (3.5, ComfyUI's default)")
    ap.add_argument("--spare-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="experiments: set a DistillConfig field for SPARE and its variants (repeatable), e.g. "
                    "--spare-set surrogate_anchor=1.0")
    ap.add_argument("--out", default="results.json")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "standard" if args.standard else None
    if args.methods is None and (args.host == "comfyui" or args.model != "unet" and preset is None):
        methods = ["spare"]
    elif args.methods in (None, "all"):
        default = MODEL_METHODS[args.model][preset] if preset else METHODS
        methods = list(default if args.methods is None else METHODS)
        if args.methods == "all" and args.model not in FLUX_MODELS:
            methods = [m for m in methods if m not in FLUX_ONLY_METHODS]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = []
    for m in methods:
        try:
            if split_variant(m)[0] not in METHODS:
                unknown.append(m)
        except ValueError as e:
            ap.error(str(e))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    try:
        check_model_methods(methods, args.model)
    except ValueError as e:
        ap.error(str(e))
    if args.model != "unet":
        from spare_core.minicanvas.flux_model import import_comfy
        try:
            import_comfy()
        except Exception as e:  # ComfyUI's code (or its dependencies) not importable here
            ap.error(f"--model {args.model} builds ComfyUI's Flux class: run it with ComfyUI's Python environment and "
                     f"COMFYUI_PATH set (e.g. COMFYUI_PATH=... .venv-comfy/bin/python -m bench.minicanvas ...): {e}")
    comfyui_path = None
    if args.host == "comfyui" and args.model == "flux-dev":
        ap.error("--host comfyui runs the SPARE Demo Model's models (unet, flux); MiniCanvas-Flux-dev runs with "
                 "--host library")
    if args.host == "comfyui":
        from . import host_path
        try:
            host_path.check_methods(methods)
            comfyui_path = host_path.import_comfyui()
        except (ValueError, host_path.HostUnavailable) as e:
            ap.error(str(e))
    budget = Budget(spare_weighting=args.spare_weighting, spare_scoring=args.spare_scoring,
                    spare_targets=args.spare_targets, spare_stop=args.spare_stop, retain_set=args.retain_set,
                    spare_fraction=args.spare_fraction, model=args.model)
    if args.eval_guidance:
        if args.model != "flux-dev":
            ap.error(f"--eval-guidance is the guidance input of --model flux-dev; --model {args.model} is sampled "
                     f"with classifier-free guidance")
        budget = replace(budget, eval_guidance=args.eval_guidance)
    try:
        overrides = [parse_override(item) for item in args.spare_set]
    except ValueError as e:
        ap.error(f"--spare-set {e}")
    budget = replace(budget, spare_overrides=tuple(overrides))
    if args.quick:
        budget = replace(budget.scaled(QUICK_BASELINE_SCALE, 1), spare=Budget.spare,
                         sample_steps=QUICK_SAMPLE_STEPS)
    if args.standard:
        budget = replace(budget, esd=STANDARD_ESD_STEPS, train_seeds=3, baseline_seeds=STANDARD_BASELINE_SEEDS,
                         closed_form_seeds=STANDARD_CLOSED_FORM_SEEDS[args.model])
    if args.budget_scale is not None:
        budget = budget.scaled(args.budget_scale, budget.seeds)
    if args.seeds:
        budget.seeds = args.seeds
    if args.train_seeds:
        budget.train_seeds = args.train_seeds
    if args.first_train_seed < 0:
        ap.error(f"--first-train-seed {args.first_train_seed}: must be >= 0")
    budget.first_train_seed = args.first_train_seed
    if args.baseline_seeds is not None:
        if args.baseline_seeds < 1:
            ap.error(f"--baseline-seeds {args.baseline_seeds}: must be >= 1")
        budget.baseline_seeds = args.baseline_seeds
    if args.sample_steps:
        budget.sample_steps = args.sample_steps
    concepts = QUICK_CONCEPTS if args.quick else None
    if args.concepts:
        names = [c.strip() for c in args.concepts.split(",") if c.strip()]
        concepts = {"style": [n for n in names if n in ERASABLE_STYLES], "object": [n for n in names if n in ERASABLE_OBJECTS]}
        bad = [n for n in names if n not in ERASABLE_STYLES and n not in ERASABLE_OBJECTS]
        if bad:
            ap.error(f"unknown concept(s) {bad}; styles: {ERASABLE_STYLES}; objects: {ERASABLE_OBJECTS}")
    started = time.time()
    results = run(methods, concepts, budget, jobs=max(1, args.jobs), host=args.host)
    results["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{platform.processor() or platform.platform()}", "command": "python -m bench.minicanvas "
                       + " ".join(sys.argv[1:] if argv is None else argv), "seeds": budget.seeds,
                       "train_seeds": budget.train_seeds, "first_train_seed": budget.first_train_seed,
                       "eval_templates": [data.TEMPLATES[i] for i in EVAL_TEMPLATES],
                       "train_template": data.TEMPLATES[TRAIN_TEMPLATE],
                       "wall_seconds": round(time.time() - started, 1), "host": args.host,
                       "model": args.model, "eval_guidance": budget.eval_guidance}
    if comfyui_path:
        results["meta"]["comfyui"] = comfyui_version(comfyui_path)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} in {time.time() - started:.0f}s")
