"""MiniCanvas-Flux-dev: MiniCanvas-Flux guidance-distilled into Flux.1-dev's form (a `guidance_in` embedding, sampled
at cfg 1), so SPARE's guidance input and erasure at other FluxGuidance values are measured on trained weights.

    OMP_NUM_THREADS=1 python -m bench.minicanvas.train_flux_dev        # the shipped run -> spare_core/minicanvas/weights/
    OMP_NUM_THREADS=1 python -m bench.minicanvas.train_flux_dev --steps 50 --out /tmp/pilot.safetensors

Needs ComfyUI importable (COMFYUI_PATH or the cached checkout) and the shipped MiniCanvas-Flux weights (the teacher).
The recipe is Flux.1-dev's guidance distillation as its authors describe it (a student that takes the guidance scale
as an input, trained to reproduce the teacher's classifier-free-guided prediction), on MiniCanvas-Flux:
- student: the teacher's network with Flux's `guidance_in` (MLPEmbedder over timestep_embedding(guidance, 256), added
  to the modulation vector, ComfyUI's own code) whose output layer starts at 0, so step 0 is the teacher's
  conditional prediction; the text encoder is the teacher's, frozen (the student shares its conditioning).
- objective: on x_t from the training images (train_model.render_bank, fresh training prompts, the same sigma
  distribution as train_flux), MSE between the student's v at guidance g and the teacher's guided
  v_u + g (v_c - v_u), g ~ U[GUIDANCE_MIN, GUIDANCE_MAX] per row; PROMPT_DROPOUT of prompts are "" (guided "" = "").
- AdamW, warmup + cosine, grad clip 1, EMA (the shipped weights are the EMA), every network parameter trained.
The shipped run's command, time and accuracy are in its metadata and in bench/RESULTS.md ("MiniCanvas-Flux-dev").
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import pathlib
import time

import numpy as np
import torch
from torch import nn

from spare_core.minicanvas import data
from spare_core.minicanvas.flux_model import DEV_MODEL_FILE, MODEL_FILE, MiniCanvasFlux, load

from .train_flux import PROMPT_DROPOUT, lr_at, sample_sigmas
from .train_model import DATA_VARIANTS, render_bank, train_step

STEPS = 1200
BATCH = 32
LR = 5e-4
EMA_DECAY = 0.99
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 6.0  # FluxGuidance values trained (ComfyUI's default 3.5 in the middle)


def make_student(teacher: MiniCanvasFlux) -> MiniCanvasFlux:
    """The teacher with a guidance embedding whose output starts at 0 (step 0 = the teacher's conditional v)."""
    import dataclasses

    student = MiniCanvasFlux(dataclasses.replace(teacher.cfg, guidance_embed=True), device=teacher.device)
    missing, unexpected = student.network.load_state_dict(teacher.network.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_in.") for k in missing), (missing, unexpected)
    nn.init.zeros_(student.network.guidance_in.out_layer.weight)
    nn.init.zeros_(student.network.guidance_in.out_layer.bias)
    student.text_encoder = copy.deepcopy(teacher.text_encoder).requires_grad_(False)
    return student


def train(args, log=print) -> MiniCanvasFlux:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start, c_start = time.time(), time.process_time()
    teacher = load(args.teacher)
    student = make_student(teacher)
    x_img, s_bank, o_bank = render_bank(args.variants)
    x_bank = torch.nn.functional.pixel_unshuffle(x_img, teacher.cfg.pixel_unshuffle).contiguous()
    params = [p for p in student.network.parameters()]
    for p in params:
        p.requires_grad_(True)
    student.network.train()
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    empty = teacher.encode([""])
    losses, done = [], 0
    for step in range(args.steps):
        if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
            log(f"stopped at step {step} (--max-minutes {args.max_minutes})")
            break
        idx = torch.from_numpy(rng.integers(len(x_bank), size=args.batch))
        x0 = x_bank[idx]
        prompts = ["" if rng.random() < PROMPT_DROPOUT else data.training_prompt(rng, int(s), int(o))
                   for s, o in zip(s_bank[idx], o_bank[idx])]
        sigma = sample_sigmas(args.batch)
        x_t = teacher.add_noise(x0, torch.randn_like(x0), sigma)
        g = GUIDANCE_MIN + (GUIDANCE_MAX - GUIDANCE_MIN) * torch.rand(args.batch)
        with torch.no_grad():
            cond = teacher.encode(prompts)
            both = (torch.cat([cond[0], empty[0].expand_as(cond[0])]), torch.cat([cond[1], empty[1].expand_as(cond[1])]))
            v_c, v_u = teacher.predict_v(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both).chunk(2)
            target = v_u + g.view(-1, 1, 1, 1) * (v_c - v_u)
        pred = student.network(x_t, sigma, cond[0], y=cond[1], guidance=g)
        loss = (pred - target).pow(2).mean()
        train_step(opt, params, ema, loss, lr_at(step, args.steps, args.lr), step, EMA_DECAY)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or step == 0:
            log(f"step {done}/{args.steps} loss {np.mean(losses[-50:]):.4f} wall {time.time() - t_start:.0f}s "
                f"cpu {time.process_time() - c_start:.0f}s")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    student.network.eval().requires_grad_(False)
    wall, cpu = time.time() - t_start, time.process_time() - c_start
    log(f"TRAINING TIME: wall {wall:.0f}s ({wall / 60:.1f} min), process cpu {cpu:.0f}s ({cpu / 60:.1f} min)")
    student.save(args.out, metadata={
        "teacher": pathlib.Path(args.teacher).name, "steps": str(args.steps), "steps_done": str(done),
        "batch": str(args.batch), "seed": str(args.seed), "lr": str(args.lr), "ema": str(EMA_DECAY),
        "guidance_range": f"{GUIDANCE_MIN},{GUIDANCE_MAX}", "train_wall_s": f"{wall:.0f}", "train_cpu_s": f"{cpu:.0f}",
        "final_loss": f"{np.mean(losses[-50:]):.5f}", "objective": "guidance distillation: v(x, s, c, g) -> "
        "v_u + g (v_c - v_u) of the teacher", "command": "python -m bench.minicanvas.train_flux_dev " + " ".join(args.argv)})
    log(f"saved {args.out}")
    return student


def main(argv=None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=int, default=DATA_VARIANTS)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--max-minutes", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", type=pathlib.Path, default=MODEL_FILE)
    ap.add_argument("--out", type=pathlib.Path, default=DEV_MODEL_FILE)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    train(args, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
