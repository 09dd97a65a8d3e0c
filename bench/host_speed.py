"""Sparse LoRA Distill on a FULL-SIZE architecture with random weights, on the real ComfyUI host: seconds per training
step and peak RSS, with and without gradient checkpointing.

    COMFYUI_PATH=/path/to/ComfyUI .venv-comfy/bin/python bench/host_speed.py --family sd15 --latent 32 --steps 3

Steps after the first are timed (wall and process CPU seconds; CPU time is the steadier figure on a shared machine).
Each configuration runs in its own subprocess so that peak RSS is its own. The UNet is the family's real full-size
ComfyUI model (comfy.supported_models config -> BaseModel -> ModelPatcher) filled with random weights; the text
encoder is ComfyUI's CLIP class at the real width but one-to-three layers (only its output width matters here, and
it runs once per prompt). Self-generation is cut to 1 sample x 2 Euler steps so the figure is the training step.
The same script runs on a GPU (no --cpu) when one is lent.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WIDTHS = {"sd15": {"clip_l": 768}, "sd2v": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}


def one(family: str, latent: int, steps: int, checkpointing: bool, cpu: bool) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import comfy_fixtures as cf

    if cpu:
        cf.comfy_or_skip()
    else:
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    import spare_core as sc

    host = cf.load_pack_module("nodes/host.py")
    t0 = time.perf_counter()
    config = cf._model_config(family, cf._full_unet_config(family), tiny=False)
    base = cf._base_model(family, config)
    cf.init_params_(base.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    target = {"sd15": sm.SD15, "sd2v": sm.SD20, "sdxl": sm.SDXL}[family]({}).clip_target()
    options = {f"{n}_model_config": {"hidden_size": w, "intermediate_size": w, "num_attention_heads": 8,
                                     "num_hidden_layers": 3, "projection_dim": w}
               for n, w in WIDTHS[family].items()}
    options["dtype"] = torch.float32
    clip = comfy.sd.CLIP(target, model_options=options)
    cf.init_params_(clip.cond_stage_model, 1)
    build_s = time.perf_counter() - t0
    dm = host.ComfyDiffusionModel(model, clip, latent * 8, latent * 8)
    saliency = sc.Saliency({}, [p for p in sc.candidate_modules(dm.network, "attention")][::2], None, {})
    cfg = sc.DistillConfig(["Van Gogh style"], ["a painting"], retain=["Monet style"], steps=steps, lr=1e-4,
                           samples_per_prompt=1, sample_steps=2, batch_size=1, gradient_checkpointing=checkpointing)
    stamps = []
    dm.encode(cfg.concepts + cfg.surrogates + cfg.retain + [""])
    with torch.inference_mode():  # as under the executor
        with host.trainable(dm):
            result = sc.distill(dm, cfg, saliency, progress=lambda s, n, loss: stamps.append(
                (time.perf_counter(), time.process_time())))
    per_step = (stamps[-1][0] - stamps[0][0]) / max(len(stamps) - 1, 1)
    cpu_per_step = (stamps[-1][1] - stamps[0][1]) / max(len(stamps) - 1, 1)
    out = {"family": family, "latent": latent, "pixels": latent * 8, "checkpointing": checkpointing,
           "steps": steps, "seconds_per_step": round(per_step, 3),
           "cpu_seconds_per_step": round(cpu_per_step, 3), "torch_threads": torch.get_num_threads(), "build_seconds": round(build_s, 1),
           "unet_params_M": round(sum(p.numel() for p in base.diffusion_model.parameters()) / 1e6, 1),
           "adapted_modules": len(saliency.selected), "trainable_params": result.trainable_params,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
           "device": str(dm.device)}
    if dm.device.type == "cuda":
        out["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", choices=sorted(WIDTHS))
    ap.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="use the GPU instead of --cpu")
    ap.add_argument("--only", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help="append the JSON lines to this file")
    args = ap.parse_args()
    if "COMFYUI_PATH" not in os.environ:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (scripts/setup_comfyui.sh)")
    if args.only:
        print(json.dumps(one(args.family, args.latent, args.steps, args.only == "on", not args.gpu)))
        return
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch threads default")
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--family", args.family, "--latent", str(args.latent), "--steps",
               str(args.steps), "--only", mode] + (["--gpu"] if args.gpu else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not line:
            print(f"checkpointing={mode}: FAILED\n{proc.stderr[-3000:]}")
            continue
        print(line[-1])
        if args.out:
            with open(args.out, "a") as f:
                f.write(line[-1] + "\n")


if __name__ == "__main__":
    main()
