"""Which saliency selection, and when to stop: SPARE's trajectory on held-out prompts, per concept.

    python -m bench.minicanvas.selection --scorings taylor,gradient,contrastive --out bench/runs/selection.json

For every concept, training seed and saliency option, SPARE runs with the product defaults to its step cap without
the stopping rule; at every probe check (DistillConfig.check_every) the LoRA is snapshotted with the share of the probe
gap closed, and each snapshot is judged on the held-out evaluation grid (grid). Because the learning rate
decays to the cap, the snapshot at step k is exactly what a run stopped there would return, so one run per setting
gives: the final erasure of each selection, and the UA / IRA / CRA a stopping threshold r would have produced
(stop at the first check where the gap closed reaches r). `summarize` prints both tables.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

import spare_core as sc
from spare_core.minicanvas import data
from spare_core.minicanvas.model import load as load_model

from . import metrics
from .budgets import ERASABLE_OBJECTS, ERASABLE_STYLES, Budget
from .dispatch import map_tasks, worker_model
from .judge import CLEAN_DROP, CLEAN_UA, ERASED_UA, Judge, evaluate, grid
from .methods import generate, run_method, sample_edited

# name -> Budget fields (SPARE's selection, retain list, DistillConfig overrides). Every option pins its retain
# list: the selection and stopping measurements (bench/runs/selection.json) used the short "neighbours" list.
_SHORT = dict(spare_retain="neighbours", spare_targets="all")  # the measurements' retain list, every Linear/Conv
OPTIONS = {
    "taylor": dict(_SHORT, spare_scoring="taylor"),
    "gradient": dict(_SHORT, spare_scoring="gradient"),  # the authors'
    "contrastive": dict(_SHORT, spare_scoring="contrastive"),
    "contrastive-attention": dict(_SHORT, spare_scoring="contrastive", spare_targets="attention"),  # first default
    "gradient-attention": dict(_SHORT, spare_scoring="gradient", spare_targets="attention"),
    # more modules, or more steps, for the concepts the default leaves
    "gradient-f75": dict(_SHORT, spare_scoring="gradient", spare_fraction=0.75),
    "gradient-f100": dict(_SHORT, spare_scoring="gradient", spare_fraction=1.0),
    "gradient-400": dict(_SHORT, spare_scoring="gradient", spare=400),
    # retention levers, on the authors' selection (gradient, all; the measured default)
    "retain-w3": dict(_SHORT, spare_scoring="gradient", spare_overrides=(("retain_weight", 3.0),)),
    "samples8": dict(_SHORT, spare_scoring="gradient", spare_overrides=(("samples", 8),)),
    "retain-all": dict(_SHORT, spare_scoring="gradient", spare_retain="all-pairs",
                       spare_overrides=(("retain_samples", 1),)),
    "retain-all-w3": dict(_SHORT, spare_scoring="gradient", spare_retain="all-pairs",
                          spare_overrides=(("retain_samples", 1), ("retain_weight", 3.0))),
    # the shipped defaults (every other pair retained, auto samples) and levers for the concepts they leave partly
    # erased (ring / cross: bench/HISTORY.md, "--standard")
    "default": dict(spare_scoring="gradient", spare_targets="all"),
    "anchor": dict(spare_scoring="gradient", spare_targets="all", spare_overrides=(("surrogate_anchor", 0.5),)),
    "rank8": dict(spare_scoring="gradient", spare_targets="all", spare_overrides=(("rank", 8), ("alpha", 8.0))),
    "forget-w06": dict(spare_scoring="gradient", spare_targets="all", spare_overrides=(("forget_weight", 0.6),)),
    "batch4": dict(spare_scoring="gradient", spare_targets="all", spare_overrides=(("batch_size", 4),)),
}
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
SNAPSHOT_STEPS = (20, 40, 60, 100, 140)  # checks judged on the grid (plus the cap); others only recorded (time)


def _task(task):
    option, domain, name, seed, budget = task
    model, judge = worker_model()
    env = os.environ.get("SPARE_SNAPSHOT_STEPS")
    snapshot_steps = SNAPSHOT_STEPS if env is None else tuple(int(x) for x in env.split(",") if x.strip())
    b = replace(budget, spare_stop=0.0, **OPTIONS[option])
    snaps = []
    edited, info = run_method("spare", model, domain, name, b, seed=seed,
                                      on_check=lambda check, ad: snaps.append(
                                          (check, sc.LoraWeights.from_adapters(ad)
                                           if check["step"] in snapshot_steps else None)))
    # the snapshots are the live adapters; the final LoRA has the network's part at the resolved model_strength
    # (DistillConfig: 0.9 on the UNet where the text encoder trains), so the snapshots get it too
    strength = json.loads(edited[1].metadata["spare.config"])["model_strength"]
    snaps = [(check, None if lora is None else lora.scaled(strength, text=1.0)) for check, lora in snaps]
    snaps.append(({"step": info["steps_used"], "gap_closed": info["gap_closed"],
                   "retain_drift": info.get("retain_drift")}, edited[1]))
    prompts, ls, lo, seeds = grid(budget.seeds)
    target = (data.style_index if domain == "style" else data.object_index)(name)
    points = []
    for check, lora in snaps:
        if lora is None:
            continue
        images = sample_edited(model, ("lora", lora), prompts, seeds, budget.sample_steps)
        m, _ = evaluate(judge, images, ls, lo, domain, target)
        points.append({"step": check["step"], "gap_closed": check["gap_closed"],
                       "retain_drift": check.get("retain_drift"), **m})
    print(f"{option:22s} {domain:6s} {name:9s} seed {seed}: " + " ".join(
        f"{p['step']}:{p['gap_closed']:.2f}/{p['UA']:.0f}/{p['IRA']:.0f}/{p['CRA']:.0f}" for p in points), flush=True)
    return {"option": option, "domain": domain, "concept": name, "seed": seed, "seconds": info["seconds"],
            "modules": info["modules"], "points": points}


def base_metrics(budget):
    model, judge = load_model(), Judge()
    prompts, ls, lo, seeds = grid(budget.seeds)
    j = judge(generate(model, prompts, seeds, budget.sample_steps))
    out = {}
    for domain, names in (("style", ERASABLE_STYLES), ("object", ERASABLE_OBJECTS)):
        for n in names:
            t = (data.style_index if domain == "style" else data.object_index)(n)
            out[n] = metrics.erasure_metrics(domain, t, ls, lo, j["style"], j["object"])
    return out


def stop_point(points, r):
    """The snapshot a run with stop_at_gap_closed r returns: the first judged check reaching r, else the last. (Checks
    between judged snapshots are not judged: the rule is emulated at SNAPSHOT_STEPS only.)"""
    for p in points[:-1]:
        if p["gap_closed"] >= r:
            return p
    return points[-1]


def summarize(result: dict, thresholds=THRESHOLDS) -> str:
    base = result["base"]
    runs = result["runs"]
    lines = ["| option | rule | steps (mean) | UA [95% CI] | IRA drop [CI] | CRA drop [CI] | erased (UA >= 90) | "
             "clean |", "|---|---|---|---|---|---|---|---|"]
    for option in dict.fromkeys(r["option"] for r in runs):
        mine = [r for r in runs if r["option"] == option]
        for rule in [None] + list(thresholds):
            rows = []
            for r in mine:
                p = r["points"][-1] if rule is None else stop_point(r["points"], rule)
                b = base[r["concept"]]
                rows.append({"concept": r["concept"], "seed": r["seed"], "UA": p["UA"], "step": p["step"],
                             "IRA_drop": b["IRA"] - p["IRA"], "CRA_drop": b["CRA"] - p["CRA"]})
            cell = {}
            for k in ("UA", "IRA_drop", "CRA_drop"):
                by_c = {}
                for row in rows:
                    by_c.setdefault(row["concept"], []).append(row[k])
                mean, lo, hi = metrics.bootstrap_ci(list(by_c.values()))
                cell[k] = f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"
            per_c = {}
            for row in rows:
                per_c.setdefault(row["concept"], []).append(row)
            erased = sum(np.mean([x["UA"] for x in v]) >= ERASED_UA for v in per_c.values())
            clean = sum(np.mean([x["UA"] for x in v]) >= CLEAN_UA
                        and np.mean([x["IRA_drop"] for x in v]) <= CLEAN_DROP
                        and np.mean([x["CRA_drop"] for x in v]) <= CLEAN_DROP for v in per_c.values())
            steps = np.mean([row["step"] for row in rows])
            lines.append(f"| {option} | {'cap' if rule is None else f'stop at {rule:g}'} | {steps:.0f} | "
                         f"{cell['UA']} | {cell['IRA_drop']} | {cell['CRA_drop']} | {erased}/{len(per_c)} | "
                         f"{clean}/{len(per_c)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.selection", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scorings", default="taylor,gradient", help="options: " + ", ".join(OPTIONS))
    ap.add_argument("--concepts", help="comma-separated (default: every style and object)")
    ap.add_argument("--train-seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="training seeds first .. first + train-seeds - 1")
    ap.add_argument("--seeds", type=int, default=1, help="images per grid pair")
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--snapshots", default=",".join(map(str, SNAPSHOT_STEPS)),
                    help="steps whose LoRA snapshot is judged besides the cap (comma-separated; '' = the cap only)")
    ap.add_argument("--summarize", help="print the tables of existing result files (comma-separated: their runs are "
                    "pooled) and exit")
    ap.add_argument("--out", default="selection.json")
    args = ap.parse_args(argv)
    if args.summarize:
        pooled = None
        for path in args.summarize.split(","):
            with open(path) as f:
                r = json.load(f)
            if pooled is None:
                pooled = r
            else:
                pooled["runs"] += r["runs"]
        print(summarize(pooled))
        return
    options = [o.strip() for o in args.scorings.split(",") if o.strip()]
    bad = [o for o in options if o not in OPTIONS]
    if bad:
        ap.error(f"unknown option(s) {bad}; choose from {', '.join(OPTIONS)}")
    names = [c.strip() for c in args.concepts.split(",")] if args.concepts else ERASABLE_STYLES + ERASABLE_OBJECTS
    threads = int(os.environ.get("MINICANVAS_THREADS", "1"))
    torch.set_num_threads(threads)
    budget = replace(Budget(), seeds=args.seeds, sample_steps=args.sample_steps)
    # read by _task in each worker (spawned after this line, so the module global travels as an environment variable)
    os.environ["SPARE_SNAPSHOT_STEPS"] = args.snapshots
    started = time.time()
    tasks = [(o, "style" if n in ERASABLE_STYLES else "object", n, seed, budget)
             for seed in range(args.first_seed, args.first_seed + args.train_seeds) for n in names for o in options]
    runs = map_tasks(_task, tasks, args.jobs, threads)
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "command": "python -m bench.minicanvas.selection "
                       + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                       "wall_seconds": round(time.time() - started, 1)},
              "base": base_metrics(budget), "runs": runs}
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(summarize(result))
    print(f"wrote {args.out} ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
