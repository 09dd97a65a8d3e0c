"""The MiniCanvas demo: erase one named concept from the bundled model with SPARE (defaults), write the LoRA and a
before/after image grid (same seeds), and print UA / IRA / CRA for it.

    python -m bench.minicanvas.demo --concept neon --out out/demo

Rows of the grid: for each style (or object) of the grid, before | after, same prompt and seed. The erased concept's
row is marked in the printout; everything else should look the same before and after.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import spare_core as sc

from . import data, harness
from .model import load as load_model


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="neon", help=f"a style {harness.STYLES} or an object {harness.OBJECTS}")
    ap.add_argument("--steps", type=int, default=harness.Budget().spare, help="SPARE training steps")
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args(argv)
    if args.concept in harness.STYLES:
        domain = "style"
    elif args.concept in harness.OBJECTS:
        domain = "object"
    else:
        ap.error(f"unknown concept {args.concept!r}; styles: {harness.STYLES}; objects: {harness.OBJECTS}")
    torch.set_num_threads(int(os.environ.get("MINICANVAS_THREADS", "1")))  # 2 threads on 2 shared cores ran ~100x slower
    os.makedirs(args.out, exist_ok=True)
    model = load_model()
    judge = harness.Judge()
    budget = harness.Budget().scaled(1.0, 1)
    budget.spare = args.steps
    t0 = time.perf_counter()
    edited, info = harness.run_method("spare", model, domain, args.concept, budget)
    lora_path = sc.save_lora(os.path.join(args.out, f"erase_{args.concept}.safetensors"), edited[1])
    prompts, ls, lo, seeds = harness.grid(1)
    before = harness.generate(model, prompts, seeds, budget.sample_steps)
    after = harness.sample_edited(model, edited, prompts, seeds, budget.sample_steps)
    target = (data.style_index if domain == "style" else data.object_index)(args.concept)
    m, _ = harness.evaluate(judge, after, ls, lo, domain, target)
    # grid: one row per style, objects across; before and after side by side
    n_o = len(harness.OBJECTS)
    rows = []
    for si in range(len(harness.STYLES)):
        b = before[si * n_o:(si + 1) * n_o]
        a = after[si * n_o:(si + 1) * n_o]
        rows.append(torch.cat([b, torch.ones_like(b[:1]), a]))
    image = data.grid_image(torch.cat(rows), nrow=2 * n_o + 1)
    png = os.path.join(args.out, f"before_after_{args.concept}.png")
    image.save(png)
    print(f"erased {domain} '{args.concept}' in {time.perf_counter() - t0:.0f}s "
          f"({info['trainable_params']} trainable parameters, LoRA {info['lora_bytes'] / 1024:.0f} KiB)")
    print(f"UA {m['UA']:.2f}  IRA {m['IRA']:.2f}  CRA {m['CRA']:.2f}")
    print(f"wrote {lora_path} and {png} (left: before, right: after; one row per style)")


if __name__ == "__main__":
    main()
