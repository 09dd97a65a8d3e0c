"""Train the MiniCanvas diffusion model from scratch on CPU and ship its weights.

    python -m bench.minicanvas.train_model                       # full run -> spare_core/minicanvas/weights/
    python -m bench.minicanvas.train_model --steps 300 --out bench/minicanvas/_work/quick.safetensors

Data: DATA_VARIANTS rendered variants (seeds) of every (style, object) pair, each drawn with a fresh random prompt
(template, canonical name or synonym) every time it is used; PROMPT_DROPOUT of prompts are "" for classifier-free
guidance. Objective: V-prediction MSE (EDM's loss weighting in x0 space). Noise levels: UNIFORM_T_FRACTION of the
batch at t ~ U[0, 1] (sigma = sigma_at(t), log-uniform), the rest at log sigma ~ N(P_MEAN, P_STD) (EDM's log-normal,
centred higher than EDM's -1.2). A log-normal centred on low noise left the prompt nearly unused (on 32 x 32 images
the style is decided at sigma > 3); moving its mean from 0.3 to 0.8 doubled the share of recognisable objects
(31% -> 61% of generations on the first data, bench/HISTORY.md); the uniform part keeps the low noise levels that
clean up. AdamW with warmup + cosine decay; the shipped weights are the EMA of the trained ones. The defaults are
the shipped run (2800 steps, 26.9 min on 1 core). Deterministic given --seed (on the same torch build) unless
--max-minutes cuts.
"""
from __future__ import annotations

import os

# libgomp's default busy-waiting makes 2 threads ~7x slower than 1 when the cores are shared with other processes
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import pathlib
import time

import numpy as np
import torch

from spare_core.minicanvas import data
from spare_core.minicanvas.model import MODEL_FILE, MiniCanvasConfig, MiniCanvasModel, to_latent

WORK = pathlib.Path(__file__).parent / "_work"

STEPS = 2800
BATCH = 32
LR = 2e-3
WARMUP = 100
FINAL_LR_FRACTION = 0.05
EMA_DECAY = 0.995
GRAD_CLIP = 1.0
UNIFORM_T_FRACTION = 0.3
P_MEAN, P_STD = 0.8, 1.0
PROMPT_DROPOUT = 0.1
DATA_VARIANTS = 48         # rendered images per (style, object) pair
DATA_SEED_OFFSET = 0       # training images use seeds [0, DATA_VARIANTS); classifiers' held-out set uses others



def train_step(opt, params: list, ema: list, loss: torch.Tensor, lr: float, step: int,
               ema_decay: float = EMA_DECAY) -> None:
    """One optimiser step of every MiniCanvas trainer (this one, train_flux, train_flux_dev): set the learning rate,
    backward, clip the gradient norm to GRAD_CLIP, AdamW step, then the EMA update (decay warmed up as
    min(ema_decay, (1 + step) / (10 + step)))."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - decay)

def render_bank(variants: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs x variants: latents [N, 3, 32, 32] in [-1, 1], style ids [N], object ids [N]."""
    ns, no = len(data.STYLES), len(data.OBJECTS)
    imgs, st, ob = [], [], []
    for s in range(ns):
        for o in range(no):
            seeds = list(range(DATA_SEED_OFFSET, DATA_SEED_OFFSET + variants))
            imgs.append(data.render_batch([s] * variants, [o] * variants, seeds))
            st += [s] * variants
            ob += [o] * variants
    return to_latent(torch.cat(imgs)), torch.tensor(st), torch.tensor(ob)


def lr_at(step: int, steps: int, lr: float = LR) -> float:
    if step < WARMUP:
        return lr * (step + 1) / WARMUP
    p = (step - WARMUP) / max(1, steps - WARMUP)
    return lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * p)))


def canonical_grid_prompts() -> tuple[list[str], int]:
    """One canonical UnlearnCanvas prompt per (style, object): rows = styles, columns = objects."""
    return [data.prompt(s.name, o.name) for s in data.STYLES for o in data.OBJECTS], len(data.OBJECTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=int, default=DATA_VARIANTS)
    ap.add_argument("--channels", type=int, default=MiniCanvasConfig.model_channels)
    ap.add_argument("--attention-levels", type=str, default=",".join(map(str, MiniCanvasConfig.attention_levels)))
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--text-layers", type=int, default=MiniCanvasConfig.text_layers)
    ap.add_argument("--patch", type=int, default=MiniCanvasConfig.patch)
    ap.add_argument("--channel-mult", type=str, default=",".join(map(str, MiniCanvasConfig.channel_mult)))
    ap.add_argument("--no-pooled-text", action="store_true", help="cross-attention as the only text path")
    ap.add_argument("--no-scale-shift", action="store_true", help="ldm's additive timestep embedding")
    ap.add_argument("--p-mean", type=float, default=P_MEAN)
    ap.add_argument("--uniform-fraction", type=float, default=UNIFORM_T_FRACTION)
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="experiments: stop after this much wall time (the cosine schedule still assumes --steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=pathlib.Path, default=MODEL_FILE)
    ap.add_argument("--grid", type=str, default=str(WORK / "model_grid.png"), help='"" to skip the sample grid')
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start, c_start = time.time(), time.process_time()

    x_bank, s_bank, o_bank = render_bank(args.variants)
    print(f"rendered {len(x_bank)} training images in {time.time() - t_start:.1f}s", flush=True)

    model = MiniCanvasModel(MiniCanvasConfig(
        model_channels=args.channels, text_layers=args.text_layers, patch=args.patch,
        channel_mult=tuple(int(a) for a in args.channel_mult.split(",")), pooled_text=not args.no_pooled_text, scale_shift=not args.no_scale_shift,
        attention_levels=tuple(int(a) for a in args.attention_levels.split(","))))
    # channels_last: mkldnn's convolutions (forward and backward) run ~10% faster on it on this CPU
    model.network.to(memory_format=torch.channels_last)
    params = list(model.network.parameters()) + list(model.text_encoder.parameters())
    n_unet = sum(p.numel() for p in model.network.parameters())
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    print(f"parameters: unet {n_unet / 1e6:.2f}M, text encoder {n_text / 1e6:.2f}M", flush=True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    losses = []
    for step in range(args.steps):
        if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
            print(f"stopped at step {step} (--max-minutes {args.max_minutes})", flush=True)
            break
        idx = torch.from_numpy(rng.integers(len(x_bank), size=args.batch))
        x0 = x_bank[idx]
        prompts = ["" if rng.random() < PROMPT_DROPOUT else data.training_prompt(rng, int(s), int(o))
                   for s, o in zip(s_bank[idx], o_bank[idx])]
        q = (torch.arange(args.batch) + torch.rand(args.batch)) / args.batch  # stratified quantiles
        n_uniform = int(round(args.uniform_fraction * args.batch))
        sigma_uniform = model.sigma_at(q[torch.randperm(args.batch)[:n_uniform]])
        z = torch.special.ndtri(q[torch.randperm(args.batch)[: args.batch - n_uniform]].clamp(1e-4, 1 - 1e-4))
        sigma_lognormal = torch.exp(args.p_mean + P_STD * z).clamp(model.cfg.sigma_min, model.cfg.sigma_max)
        sigma = torch.cat([sigma_uniform, sigma_lognormal])
        x_t = model.add_noise(x0, torch.randn_like(x0), sigma).contiguous(memory_format=torch.channels_last)
        pred = model.predict_v(x_t, sigma, model.encode(prompts))
        loss = (pred - model.v_target(x0, x_t, sigma)).pow(2).mean()
        train_step(opt, params, ema, loss, lr_at(step, args.steps, args.lr), step)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step == 0:
            print(f"step {step + 1}/{args.steps} loss {np.mean(losses[-50:]):.4f} lr {lr_at(step, args.steps, args.lr):.2e} "
                  f"wall {time.time() - t_start:.0f}s cpu {time.process_time() - c_start:.0f}s", flush=True)

    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    wall, cpu = time.time() - t_start, time.process_time() - c_start
    print(f"TRAINING TIME: wall {wall:.0f}s ({wall / 60:.1f} min), process cpu {cpu:.0f}s "
          f"({cpu / 60:.1f} min over {args.threads} threads)", flush=True)
    model.save(args.out, metadata={"steps": str(args.steps), "batch": str(args.batch), "seed": str(args.seed),
                                   "variants": str(args.variants), "lr": str(args.lr), "train_wall_s": f"{wall:.0f}",
                                   "train_cpu_s": f"{cpu:.0f}", "uniform_t_fraction": str(args.uniform_fraction),
                                   "p_mean": str(args.p_mean), "p_std": str(P_STD), 
                                   "objective": "v", "sigma_min": str(model.cfg.sigma_min),
                                   "sigma_max": str(model.cfg.sigma_max)})
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)", flush=True)

    if not str(args.grid):
        return
    model.network.eval()
    model.text_encoder.eval()
    prompts, ncol = canonical_grid_prompts()
    imgs = model.sample(prompts, seed=1000, steps=20, cfg=4.0)
    args.grid = pathlib.Path(args.grid)
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    data.grid_image(imgs, ncol, scale=4).save(args.grid)
    print(f"sample grid -> {args.grid}", flush=True)


if __name__ == "__main__":
    main()
