"""Library path vs ComfyUI path of the MiniCanvas harness: the side-by-side table of two result files, and where
the two paths part (one concept trained both ways in one process).

    # the two runs (bench/HISTORY.md, "Library vs ComfyUI host")
    python -m bench.minicanvas --host library --methods spare --concepts ukiyo,neon,ring,crescent --seeds 1 \
        --out bench/runs/host_library.json
    COMFYUI_PATH=~/comfyui python -m bench.minicanvas --host comfyui ... --out bench/runs/host_comfyui.json
    python -m bench.minicanvas.host_compare table bench/runs/host_library.json bench/runs/host_comfyui.json
    # where they part: A = library LoRA + bundled sampler, B = library LoRA (fp16) + Apply Erasure + KSampler,
    # C = nodes' LoRA + Apply Erasure + KSampler. A vs B: applying and sampling; B vs C: training.
    COMFYUI_PATH=~/comfyui python -m bench.minicanvas.host_compare split --concept ukiyo --out split.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

import spare_core as sc
from spare_core.minicanvas import data

from .budgets import EVAL_TEMPLATES, ERASABLE_OBJECTS, ERASABLE_STYLES, Budget
from .dispatch import LibraryHost
from .judge import Judge, grid
from .methods import default_inputs


def table(library: dict, comfyui: dict) -> str:
    """Markdown: per concept UA / IRA / CRA / synonym UA, steps, gap closed and seconds of both runs, and the
    differences (ComfyUI - library)."""
    lib, com = (r["methods"]["spare"] for r in (library, comfyui))
    lines = ["| concept | path | UA | IRA | CRA | synonym UA | FD | steps | gap closed | s / concept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for label, res in (("library", lib), ("comfyui", com)):
        for r in res["runs"]:
            rows.setdefault(r["concept"], {})[label] = r
    for concept, both in rows.items():
        for label in ("library", "comfyui"):
            r = both.get(label)
            if r is None:
                continue
            lines.append(f"| {concept} | {label} | {r['UA']:.0f} | {r['IRA']:.2f} | {r['CRA']:.2f} | "
                         f"{r['synonym_UA']:.0f} | {r['quality_fd']:.3f} | {r['steps_used']} | {r['gap_closed']:.3f} | "
                         f"{r['seconds']:.1f} |")
        if len(both) == 2:
            a, b = both["library"], both["comfyui"]
            lines.append(f"| {concept} | difference | {b['UA'] - a['UA']:+.0f} | {b['IRA'] - a['IRA']:+.2f} | "
                         f"{b['CRA'] - a['CRA']:+.2f} | {b['synonym_UA'] - a['synonym_UA']:+.0f} | "
                         f"{b['quality_fd'] - a['quality_fd']:+.3f} | | {b['gap_closed'] - a['gap_closed']:+.3f} | "
                         f"{b['seconds'] / a['seconds']:.2f}x |")
    out = "\n".join(lines) + "\n\n"
    out += ("| path | mean(UA, IRA, CRA) | erased / clean | unerased style / object accuracy | wall s |\n"
            "|---|---|---|---|---|\n")
    for label, run in (("library", library), ("comfyui", comfyui)):
        m, base = run["methods"]["spare"], run["base"]
        out += (f"| {label} | {m['mean3']['mean']:.2f} [{m['mean3']['lo']:.2f}, {m['mean3']['hi']:.2f}] | "
                f"{m['erased']} / {m['clean']} of {m['concepts']} | "
                f"{base['style_acc']:.2f} / {base['object_acc']:.2f} | {run['meta']['wall_seconds']} |\n")
    return out


def _agreement(judge, a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two image sets of the same grid differ: pixels, and the Judge's labels."""
    ja, jb = judge(a), judge(b)
    d = (a - b).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(),
            "style_label_agreement": 100.0 * (ja["style"] == jb["style"]).float().mean().item(),
            "object_label_agreement": 100.0 * (ja["object"] == jb["object"]).float().mean().item()}


def split(concept: str, seed: int = 0, grid_seeds: int = 1, sample_steps: int = 12, steps: int = 0) -> dict:
    """Train `concept` through both paths (the harness' SPARE settings) and sample the evaluation grid three ways
    (module docstring: A, B, C); pixel differences and label agreement between them, and the LoRAs' difference."""
    import spare_core as sc
    from . import host_path

    domain = "style" if concept in ERASABLE_STYLES else "object"
    budget = Budget() if not steps else replace(Budget(), spare=steps)
    comfy, library, judge = host_path.ComfyHost(default_inputs()), LibraryHost(), Judge()
    try:
        prompts, _, _, seeds = grid(grid_seeds)
        # CPU seconds as well as wall: on shared cores only the former compare (one torch thread each)
        c0, t0 = time.process_time(), time.perf_counter()
        (_, lib_lora), lib_info = library.erase("spare", domain, concept, budget, seed=seed)
        c1, t1 = time.process_time(), time.perf_counter()
        (_, node_model), node_info = comfy.erase("spare", domain, concept, budget, seed=seed)
        c2, t2 = time.process_time(), time.perf_counter()
        times = {"library": {"wall_s": t1 - t0, "cpu_s": c1 - c0}, "comfyui": {"wall_s": t2 - t1, "cpu_s": c2 - c1}}
        from safetensors.torch import load_file
        node_lora = sc.lora.LoraWeights.from_state_dict(
            load_file(os.path.join(comfy.loras, node_info["lora_file"])), sc.lora_targets(library.model))
        rel = {}
        for part in ("up", "down"):
            num = sum(((node_lora.modules[p][part].float() - m[part]) ** 2).sum() for p, m in lib_lora.modules.items())
            den = sum((m[part] ** 2).sum() for m in lib_lora.modules.values())
            rel[part] = (num / den).sqrt().item()
        lib_sd = lib_lora.state_dict("comfyui")  # what the library would save (fp16), applied by the node
        lib_in_comfy = host_path.run_node(comfy.nodes.ApplyErasure, model=comfy.model, strength=1.0,
                                          lora_name=comfy.nodes.NO_FILE, lora=lib_sd, clip=comfy.clip)
        a = library.sample(("lora", lib_lora), prompts, seeds, sample_steps)
        b = comfy.sample(("model", lib_in_comfy), prompts, seeds, sample_steps)
        c = comfy.sample(("model", node_model), prompts, seeds, sample_steps)
        base_lib = library.sample(None, prompts, seeds, sample_steps)
        base_comfy = comfy.sample(None, prompts, seeds, sample_steps)
        return {"concept": concept, "seed": seed, "grid_images": len(prompts), "sample_steps": sample_steps,
                "erase_seconds": times, "same_modules": set(node_lora.modules) == set(lib_lora.modules),
                "lora_relative_difference": rel,
                "gap_closed": {"library": lib_info["gap_closed"], "comfyui": node_info["gap_closed"]},
                "unerased: bundled sampler vs KSampler": _agreement(judge, base_lib, base_comfy),
                "A vs B (apply + sampler; same LoRA)": _agreement(judge, a, b),
                "B vs C (training; both through KSampler)": _agreement(judge, b, c),
                "A vs C (library path vs ComfyUI path)": _agreement(judge, a, c)}
    finally:
        comfy.close()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.host_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="markdown table of two result files (library first)")
    t.add_argument("library")
    t.add_argument("comfyui")
    s = sub.add_parser("split", help="one concept trained both ways: where the paths part (needs COMFYUI_PATH)")
    s.add_argument("--concept", default="ukiyo", choices=ERASABLE_STYLES + ERASABLE_OBJECTS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sample-steps", type=int, default=Budget.sample_steps)
    s.add_argument("--steps", type=int, default=0, help="SPARE's steps (default: the harness', 200)")
    s.add_argument("--out")
    args = ap.parse_args(argv)
    if args.cmd == "table":
        with open(args.library) as f, open(args.comfyui) as g:
            print(table(json.load(f), json.load(g)))
        return
    torch.set_num_threads(int(os.environ.get("MINICANVAS_THREADS", "1")))
    out = split(args.concept, args.seed, sample_steps=args.sample_steps, steps=args.steps)
    out["meta"] = {"date": time.strftime("%Y-%m-%d"), "command": "python -m bench.minicanvas.host_compare split "
                   f"--concept {args.concept} --seed {args.seed} --sample-steps {args.sample_steps}"
                   + (f" --steps {args.steps}" if args.steps else ""),
                   "templates": [data.TEMPLATES[i] for i in EVAL_TEMPLATES]}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
