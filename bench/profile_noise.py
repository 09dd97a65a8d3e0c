"""How precisely the Timestep Profile measures its distribution: the spread of its per-bin probabilities over profile
seeds, for a number of concept samples (bench/HISTORY.md, "Speed"; the product's single noise draw per bin was chosen
there against two, with an earlier version of this script).

    .venv/bin/python -m bench.profile_noise --concepts ukiyo,circle --seeds 4

On the bundled MiniCanvas model, one torch thread; each concept's samples are drawn once (4 per prompt, seed 0, what
SPARE Concept Samples gives the stages) and the profile is measured with seeds 0..N-1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import spare_core as sc
from bench.minicanvas.budgets import ERASABLE_OBJECTS, ERASABLE_STYLES, concept_prompts
from spare_core.minicanvas.model import load as load_model

SHARES = (1.0, 0.5)  # share of the concept samples the profile measures on


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.profile_noise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="ukiyo,circle", help="comma-separated MiniCanvas styles / objects")
    ap.add_argument("--seeds", type=int, default=4, help="profile seeds per setting (>= 2)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    names = ERASABLE_STYLES + ERASABLE_OBJECTS
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    bad = [c for c in concepts if c not in names]
    if bad or not concepts:
        ap.error(f"--concepts {args.concepts!r}: unknown {bad}; valid: {', '.join(names)}")
    if args.seeds < 2:
        ap.error(f"--seeds {args.seeds}: must be >= 2 (a spread needs two)")
    torch.set_num_threads(1)
    model = load_model()
    rows = []
    for concept in concepts:
        domain = "style" if concept in ERASABLE_STYLES else "object"
        forget, surrogate, _, _, _ = concept_prompts(domain, concept, 0)
        x = sc.concept_samples(model, forget, sc.DistillConfig.samples, 0)  # the first rows: every prompt once
        first = None
        for share in SHARES:
            n = max(len(forget), round(share * x.shape[0]))
            started = time.perf_counter()
            probs = torch.stack([torch.tensor(sc.timestep_profile(model, forget, surrogate, seed=seed, latents=x[:n],
                                                                  samples=n // len(forget)).probs)
                                 for seed in range(args.seeds)])
            mean = [round(p, 4) for p in probs.mean(0).tolist()]
            first = first or {"samples": n, "mean_probs": mean}  # SHARES[0]: the reference
            row = {"concept": concept, "samples": n,
                   "seconds_per_profile": (time.perf_counter() - started) / args.seeds, "mean_probs": mean,
                   "max_sd": float(probs.std(0).max()),
                   "max_mean_shift_vs_first": max(abs(a - b) for a, b in zip(mean, first["mean_probs"]))}
            rows.append(row)
            print(f"{concept:8s} samples {n:3d}: {row['seconds_per_profile']:5.2f} s/profile, "
                  f"probs sd <= {row['max_sd']:.4f}, mean shift vs {first['samples']} samples <= {row['max_mean_shift_vs_first']:.4f}, "
                  f"probs {row['mean_probs']}", flush=True)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "seeds": args.seeds, "threads": 1}
        with open(args.out + ".tmp", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
