"""Where SPARE's time goes, with each stage drawing its own concept samples (what the nodes did before SPARE Concept
Samples) and with one shared sample set (Concept Samples -> the three stages), on the bundled MiniCanvas model.

    .venv/bin/python -m bench.stage_times --concept ukiyo --steps 200
    .venv/bin/python -m bench.stage_times --concept ukiyo --steps 60

Wall seconds per stage on one torch thread (the model is tiny: one thread is fastest), product defaults (4 samples
per prompt, 8 Euler steps, the harness' retain list and learning rate). Both variants use the same samples (seed
0), in another order.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import spare_core as sc
from bench.minicanvas.budgets import LR, ERASABLE_OBJECTS, ERASABLE_STYLES, concept_prompts
from spare_core.minicanvas.model import load as load_model


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(model, concept: str, steps: int, shared: bool) -> dict:
    domain = "style" if concept in ERASABLE_STYLES else "object"
    forget, surrogate, retain, _, _ = concept_prompts(domain, concept, 0)
    cfg = sc.DistillConfig(forget, surrogate, retain=retain, steps=steps, learning_rate=LR["spare"], seed=0,
                           gradient_checkpointing=False)
    times, x = {}, None
    if shared:  # SPARE Concept Samples: one draw (the stages' sample-major order)
        x, times["concept samples"] = timed(lambda: sc.concept_samples(model, forget, cfg.samples, 0))
    # the stages one by one (spare_core.erase runs the same calls), each timed
    sal, times["saliency scan"] = timed(lambda: sc.saliency_scan(model, forget, retain, seed=0,
                                                                 gradient_checkpointing=False, latents=x))
    prof, times["timestep profile"] = timed(lambda: sc.timestep_profile(
        model, forget, surrogate, seed=0, loss_weighting=cfg.loss_weighting, latents=x))
    result, times["distill"] = timed(lambda: sc.distill(model, cfg, sal, prof, latents=x))
    times["total"] = sum(times.values())
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.stage_times", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ERASABLE_STYLES + ERASABLE_OBJECTS
    ap.add_argument("--concept", default="ukiyo", choices=names)
    ap.add_argument("--steps", type=int, default=sc.DistillConfig.steps, help="distill steps (default: product's)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    torch.set_num_threads(1)
    model = load_model()
    rows = {}
    for shared in (False, True):
        key = "shared samples" if shared else "each stage its own"
        rows[key] = run(model, args.concept, args.steps, shared)
        print(f"{key:20s} " + "  ".join(f"{k} {v:6.1f}s" for k, v in rows[key].items()), flush=True)
    saved = rows["each stage its own"]["total"] - rows["shared samples"]["total"]
    print(f"shared samples save {saved:.1f}s of {rows['each stage its own']['total']:.1f}s "
          f"({100 * saved / rows['each stage its own']['total']:.0f}%)")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "concept": args.concept, "steps": args.steps, "threads": 1}
        with open(args.out + ".tmp", "w") as f:
            json.dump({"meta": meta, "seconds": rows}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
