"""Accuracy of the unerased MiniCanvas-Flux model on held-out templates, judged by the shipped classifiers.

    OMP_NUM_THREADS=1 python -m bench.minicanvas.flux_eval                      # shipped weights
    OMP_NUM_THREADS=1 python -m bench.minicanvas.flux_eval --weights PATH --seeds 2 --steps 12 --cfg 4
    OMP_NUM_THREADS=1 python -m bench.minicanvas.flux_eval --dev --guidance 1.5 3.5 5   # MiniCanvas-Flux-dev

The grid is judge.grid(seeds) (10 x 10 non-neutral style x object pairs, `seeds` images per pair, every prompt in a
template other than UnlearnCanvas' training template 0, the harness' seeds), the judge judge.Judge, exactly as the
harness scores its unerased ("base") model. Intervals: 95% bootstrap over the 100 pairs (metrics.bootstrap_ci with one
group per pair, the images of the pair inside it).

Shipped weights (3600 steps): style 100.0% [100.0, 100.0], object 100.0% [100.0, 100.0] with the defaults (200
images, dpmpp_2m 12 steps, cfg 4, shift 1.15); train_flux.py's docstring lists the other settings measured.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time

import torch

from spare_core.minicanvas.flux_model import DEFAULT_CFG, DEFAULT_STEPS, DEV_MODEL_FILE, MODEL_FILE, load

from . import metrics


def evaluate(model, seeds: int = 2, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, sampler: str = "dpmpp_2m",
             shift: float | None = None) -> dict:
    from .judge import Judge, grid

    prompts, ls, lo, sd = grid(seeds)
    t0 = time.time()
    images = model.sample(prompts, seed=sd, steps=steps, cfg=cfg, sampler=sampler, shift=shift)
    wall = time.time() - t0
    out = Judge()(images)
    res = {"images": len(prompts), "steps": steps, "cfg": 1.0 if model.cfg.guidance_embed else cfg,
           "guidance": model.guidance if model.cfg.guidance_embed else None, "sampler": sampler,
           "shift": model.cfg.shift if shift is None else shift, "sample_wall_s": round(wall, 1)}
    for dom, true in (("style", ls), ("object", lo)):
        hit = (out[dom] == true).float().view(-1, seeds)   # grid order: pair-major, `seeds` images per pair
        mean, lo_ci, hi_ci = metrics.bootstrap_ci([list(100 * h.numpy()) for h in hit])
        res[f"{dom}_acc"], res[f"{dom}_ci"] = round(mean, 2), [round(lo_ci, 2), round(hi_ci, 2)]
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="default: the shipped MiniCanvas-Flux (with --dev: -dev) weights")
    ap.add_argument("--dev", action="store_true", help="MiniCanvas-Flux-dev (guidance-distilled; sampled at cfg 1)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[None],
                    help="FluxGuidance values of a guidance-distilled model (default: its 3.5)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--cfg", type=float, nargs="+", default=[DEFAULT_CFG])
    ap.add_argument("--shift", type=float, nargs="+", default=[None])
    ap.add_argument("--sampler", default="dpmpp_2m")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load(args.weights or (DEV_MODEL_FILE if args.dev else MODEL_FILE))
    for shift in args.shift:
        for cfg in ([1.0] if model.cfg.guidance_embed else args.cfg):
            for guidance in args.guidance:
                if guidance is not None:
                    if not model.cfg.guidance_embed:
                        ap.error("--guidance: this model has no guidance input (use --cfg, or --dev)")
                    model.guidance = guidance
                r = evaluate(model, args.seeds, args.steps, cfg, args.sampler, shift)
                how = f"guidance {r['guidance']}" if r["guidance"] is not None else f"cfg {r['cfg']}"
                print(f"style {r['style_acc']:.1f}% [{r['style_ci'][0]:.1f}, {r['style_ci'][1]:.1f}]  "
                      f"object {r['object_acc']:.1f}% [{r['object_ci'][0]:.1f}, {r['object_ci'][1]:.1f}]  "
                      f"(held-out templates, {r['images']} images, {r['sampler']} {r['steps']} steps, {how}, "
                      f"shift {r['shift']})", flush=True)
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
