"""UA versus training steps, timestep profile versus uniform timesteps (the claim SPARE's stage 3 must earn).

    python -m bench.minicanvas.curve --concepts ukiyo,ring --steps 25,50,100,200 --out curve.json

For each concept and step budget, SPARE is trained twice from the same seed — once with the timestep profile, once
with uniform timesteps — and UA is measured on the concept's own prompts (every object / every style, `seeds` seeds).
A budget is a separate run (cosine schedule to 0 at that budget), as a user would run it.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from spare_core.minicanvas import data

from . import metrics
from .budgets import ERASABLE_OBJECTS, ERASABLE_STYLES, Budget
from .dispatch import map_tasks, worker_model
from .judge import grid
from .methods import run_method, sample_edited


def ua_curve(model, judge, domain, name, budgets, seeds=2, sample_steps=12, log=print):
    target = (data.style_index if domain == "style" else data.object_index)(name)
    prompts, ls, lo, sd = grid(seeds)
    rows = ((ls if domain == "style" else lo) == target).nonzero().flatten().tolist()
    prompts, sd = [prompts[i] for i in rows], [sd[i] for i in rows]
    out = {}
    for method in ("spare", "spare-uniform-t"):
        out[method] = []
        for steps in budgets:
            budget = Budget().scaled(1.0, seeds)
            budget.spare = steps
            edited, info = run_method(method, model, domain, name, budget)
            images = sample_edited(model, edited, prompts, sd, sample_steps)
            ua = metrics.unlearning_accuracy(judge(images)[domain], target)
            out[method].append({"steps": steps, "UA": ua, "seconds": info["seconds"]})
            log(f"{domain} {name:10s} {method:16s} steps {steps:4d} UA {ua:6.2f} ({info['seconds']:.1f}s)")
    return out


def _concept_curve(task):
    name, budgets, seeds = task
    model, judge = worker_model()
    domain = "style" if name in ERASABLE_STYLES else "object"
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    return name, ua_curve(model, judge, domain, name, budgets, seeds, log=log)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="ukiyo,neon,ring,crescent")
    ap.add_argument("--steps", default="25,50,100,200")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (one per concept)")
    ap.add_argument("--out", default="curve.json")
    args = ap.parse_args(argv)
    budgets = [int(s) for s in args.steps.split(",")]
    threads = int(os.environ.get("MINICANVAS_THREADS", "1"))  # 2 threads on 2 shared cores ran ~100x slower
    torch.set_num_threads(threads)
    started = time.time()
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "command": "python -m bench.minicanvas.curve "
                       + " ".join(argv if argv is not None else __import__("sys").argv[1:]), "seeds": args.seeds},
              "concepts": {}}
    names = [c.strip() for c in args.concepts.split(",") if c.strip()]
    bad = [n for n in names if n not in ERASABLE_STYLES and n not in ERASABLE_OBJECTS]
    if bad:
        ap.error(f"unknown concept(s) {bad}; styles: {ERASABLE_STYLES}; objects: {ERASABLE_OBJECTS}")
    tasks = [(n, budgets, args.seeds) for n in names]
    done = map_tasks(_concept_curve, tasks, args.jobs, threads)
    result["concepts"] = dict(done)
    result["meta"]["wall_seconds"] = round(time.time() - started, 1)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
