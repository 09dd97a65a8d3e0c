"""Train MiniCanvas-Flux (ComfyUI's Flux architecture, tiny) from scratch on CPU with rectified flow.

    OMP_NUM_THREADS=1 python -m bench.minicanvas.train_flux             # the shipped run -> spare_core/minicanvas/weights/
    OMP_NUM_THREADS=1 python -m bench.minicanvas.train_flux --steps 300 --out bench/minicanvas/_work/pilot.safetensors

Needs ComfyUI importable (COMFYUI_PATH or the cached checkout, flux_model.import_comfy) and its Python environment.
The recipe is train_model.py's (the UNet miniature's) where it applies:
- data: train_model.render_bank (DATA_VARIANTS rendered variants of every (style, object) pair), each image drawn with
  a fresh data.training_prompt (random template, canonical name or synonym) every time it is used; PROMPT_DROPOUT of
  prompts are "" for classifier-free guidance. Latent = pixel-unshuffled image (flux_model.to_latent).
- objective: rectified flow, ComfyUI's CONST formulas: x_t = (1 - s) x0 + s eps, MSE between the network output and
  v = eps - x0 (SD3 / Flux).
- noise levels: the UNet's distribution carried over through sigma_EDM = s / (1 - s) (the same noise-to-signal
  ratio: x_t / (1 - s) = x0 + sigma_EDM eps), i.e. logit(s) = log sigma_EDM: UNIFORM_T_FRACTION of the batch with
  logit(s) ~ U[LOGIT_MIN, LOGIT_MAX], the rest with logit(s) ~ N(P_MEAN, P_STD) (SD3's logit-normal, centred at
  0.8 instead of 0: the style of a 32 x 32 image is decided at high noise, so the prompt must be learnt there).
  LOGIT_MAX = 6 (s = 0.9975) reaches further than the UNet's sigma_max 80 (s = 0.988) because flow sampling starts
  at s = 1. Stratified quantiles, as train_model.
- AdamW (betas 0.9, 0.99) with linear warmup + cosine decay to FINAL_LR_FRACTION, grad clip 1, EMA 0.995 (the shipped
  weights are the EMA). Deterministic given --seed on the same torch build, unless --max-minutes cuts the run.
- size (flux_model.FluxMiniConfig defaults): hidden 128, 4 heads of 32 (RoPE axes 8 + 12 + 12), 2 double + 2 single
  blocks, mlp_ratio 4: 1.83M Flux parameters + 0.49M text encoder; 64 image tokens + 16 text tokens. Measured on one
  thread of the shared 2-core machine: 0.42-0.6 s per step of batch 32 (pilots: 400 steps in 2.8-4.1 min).
The defaults are the shipped run (--steps 3600 --lr 2e-3; it ran with --max-minutes 38 as a safety cut).
Pilots (400 steps, 5 minutes): lr 1e-3 and 2e-3 both gave style 100% and object 7-8.5% on held-out templates
(objects not yet conditioned on the prompt; 2e-3 ended at a slightly lower loss, 0.249 vs 0.260).
Shipped run: `python -m bench.minicanvas.train_flux --steps 3600 --lr 2e-3 --max-minutes 38` (OMP_NUM_THREADS=1):
all 3600 steps in 26.7 min wall (26.2 min CPU), loss 1.40 -> 0.098 (mean of the last 50 steps). Unerased accuracy
on held-out templates (flux_eval.py: harness.grid, harness.Judge, dpmpp_2m 12 steps, shift 1.15, 95% bootstrap over
pairs): cfg 4, 2 seeds/pair (200 images, the harness' base grid): style 100.0 [100, 100], object 100.0 [100, 100];
4 seeds/pair (400 images): cfg 4 style 100.0, object 100.0; cfg 2 style 100.0, object 99.8 [99.0, 100]; euler 12
steps cfg 4 (200): 100.0 / 100.0.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from spare_core.minicanvas import data
from spare_core.minicanvas.flux_model import MODEL_FILE, FluxMiniConfig, MiniCanvasFlux

from .train_model import DATA_VARIANTS, canonical_grid_prompts, render_bank, train_step

WORK = pathlib.Path(__file__).parent / "_work"

STEPS = 3600
BATCH = 32
LR = 2e-3
WARMUP = 100
FINAL_LR_FRACTION = 0.05
EMA_DECAY = 0.995
# gradient clip: train_model.GRAD_CLIP (1.0), applied by train_model.train_step
UNIFORM_T_FRACTION = 0.3
LOGIT_MIN, LOGIT_MAX = -4.0, 6.0
P_MEAN, P_STD = 0.8, 1.0
PROMPT_DROPOUT = 0.1


def lr_at(step: int, steps: int, lr: float = LR) -> float:
    if step < WARMUP:
        return lr * (step + 1) / WARMUP
    p = (step - WARMUP) / max(1, steps - WARMUP)
    return lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * p)))


def sample_sigmas(batch: int, uniform_fraction: float = UNIFORM_T_FRACTION, p_mean: float = P_MEAN) -> torch.Tensor:
    """Flow sigmas s in (0, 1) for one batch (module doc): stratified, uses torch's global generator."""
    q = (torch.arange(batch) + torch.rand(batch)) / batch
    n_uniform = int(round(uniform_fraction * batch))
    logit_u = LOGIT_MIN + (LOGIT_MAX - LOGIT_MIN) * q[torch.randperm(batch)[:n_uniform]]
    z = torch.special.ndtri(q[torch.randperm(batch)[: batch - n_uniform]].clamp(1e-4, 1 - 1e-4))
    logit_n = (p_mean + P_STD * z).clamp(LOGIT_MIN, LOGIT_MAX)
    return torch.sigmoid(torch.cat([logit_u, logit_n]))


def train(args, log=print) -> MiniCanvasFlux:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start, c_start = time.time(), time.process_time()
    x_img, s_bank, o_bank = render_bank(args.variants)   # [-1, 1] images
    cfg = FluxMiniConfig(hidden_size=args.hidden, num_heads=args.heads, depth=args.depth,
                         depth_single_blocks=args.single, mlp_ratio=args.mlp_ratio,
                         axes_dim=tuple(int(a) for a in args.axes_dim.split(",")), shift=args.shift)
    x_bank = F.pixel_unshuffle(x_img, cfg.pixel_unshuffle).contiguous()
    log(f"rendered {len(x_bank)} training images in {time.time() - t_start:.1f}s")
    model = MiniCanvasFlux(cfg)
    params = list(model.network.parameters()) + list(model.text_encoder.parameters())
    n_net = sum(p.numel() for p in model.network.parameters())
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    log(f"parameters: flux {n_net / 1e6:.2f}M, text encoder {n_text / 1e6:.2f}M")
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    losses, done = [], 0
    for step in range(args.steps):
        if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
            log(f"stopped at step {step} (--max-minutes {args.max_minutes})")
            break
        idx = torch.from_numpy(rng.integers(len(x_bank), size=args.batch))
        x0 = x_bank[idx]
        prompts = ["" if rng.random() < PROMPT_DROPOUT else data.training_prompt(rng, int(s), int(o))
                   for s, o in zip(s_bank[idx], o_bank[idx])]
        sigma = sample_sigmas(args.batch, args.uniform_fraction, args.p_mean)
        noise = torch.randn_like(x0)
        x_t = model.add_noise(x0, noise, sigma)
        loss = (model.predict_v(x_t, sigma, model.encode(prompts)) - model.v_target(x0, noise)).pow(2).mean()
        train_step(opt, params, ema, loss, lr_at(step, args.steps, args.lr), step, EMA_DECAY)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or step == 0:
            log(f"step {done}/{args.steps} loss {np.mean(losses[-50:]):.4f} lr {lr_at(step, args.steps, args.lr):.2e} "
                f"wall {time.time() - t_start:.0f}s cpu {time.process_time() - c_start:.0f}s")
        if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps:
            _save(model, params, ema, args, done, t_start, c_start, args.out.with_name(args.out.stem + "_ckpt.safetensors"), log)
    _save(model, params, ema, args, done, t_start, c_start, args.out, log, final=True)
    return model


def _save(model, params, ema, args, done, t_start, c_start, path, log, final=False):
    backup = None if final else [p.detach().clone() for p in params]
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    wall, cpu = time.time() - t_start, time.process_time() - c_start
    if final:
        log(f"TRAINING TIME: wall {wall:.0f}s ({wall / 60:.1f} min), process cpu {cpu:.0f}s ({cpu / 60:.1f} min)")
    model.save(path, metadata={"steps": str(args.steps), "steps_done": str(done), "batch": str(args.batch),
                               "seed": str(args.seed), "variants": str(args.variants), "lr": str(args.lr),
                               "train_wall_s": f"{wall:.0f}", "train_cpu_s": f"{cpu:.0f}",
                               "uniform_fraction": str(args.uniform_fraction), "logit_range": f"{LOGIT_MIN},{LOGIT_MAX}",
                               "p_mean": str(args.p_mean), "p_std": str(P_STD), "objective": "rectified flow, v = eps - x0",
                               "prompt_dropout": str(PROMPT_DROPOUT), "ema": str(EMA_DECAY),
                               "command": "python -m bench.minicanvas.train_flux " + " ".join(args.argv)})
    log(f"saved {path} ({pathlib.Path(path).stat().st_size / 1e6:.2f} MB) at step {done}")
    if backup is not None:
        with torch.no_grad():
            for b, p in zip(backup, params):
                p.copy_(b)


def main(argv=None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=int, default=DATA_VARIANTS)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--hidden", type=int, default=FluxMiniConfig.hidden_size)
    ap.add_argument("--heads", type=int, default=FluxMiniConfig.num_heads)
    ap.add_argument("--depth", type=int, default=FluxMiniConfig.depth)
    ap.add_argument("--single", type=int, default=FluxMiniConfig.depth_single_blocks)
    ap.add_argument("--mlp-ratio", type=float, default=FluxMiniConfig.mlp_ratio)
    ap.add_argument("--axes-dim", type=str, default=",".join(map(str, FluxMiniConfig.axes_dim)))
    ap.add_argument("--shift", type=float, default=FluxMiniConfig.shift, help="ModelSamplingFlux shift stored with the model")
    ap.add_argument("--p-mean", type=float, default=P_MEAN)
    ap.add_argument("--uniform-fraction", type=float, default=UNIFORM_T_FRACTION)
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop after this much wall time (the cosine schedule still assumes --steps)")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="EMA checkpoint <out>_ckpt every N steps (0: off)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=pathlib.Path, default=MODEL_FILE)
    ap.add_argument("--grid", type=str, default=str(WORK / "flux_grid.png"), help='"" to skip the sample grid')
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    model = train(args, log=lambda m: print(m, flush=True))
    if not args.grid:
        return
    model.network.eval()
    model.text_encoder.eval()
    prompts, ncol = canonical_grid_prompts()
    imgs = model.sample(prompts, seed=1000)
    pathlib.Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    data.grid_image(imgs, ncol, scale=4).save(args.grid)
    print(f"sample grid -> {args.grid}", flush=True)


if __name__ == "__main__":
    main()
