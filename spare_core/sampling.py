"""Self-generated training data: SPARE's users have no dataset, so concept (and retain) samples come from the model.

A few Euler steps with classifier-free guidance give latents that carry the concept; SPARE re-noises them at the
timesteps it trains on, so they need to be recognisable, not beautiful. The re-noising itself (`uniform_t`, `noised`:
t -> sigma -> eps -> x_t) is written once, here, for every stage and baseline.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .config import LOSS_WEIGHTINGS
from .errors import Cancelled
from .families import family_of
from .model import DiffusionModel

T_MIN = 1e-3  # the clean end of the schedule is never sampled exactly (discrete schedules have no sigma at t=0)

# Rows per no-grad forward (self-generation, the distillation's teacher) when the caller does not say. On a GPU: 4
# samples (8 rows with guidance), the memory of a KSampler at batch 4 on an 8 GB card. On the CPU a forward costs
# far less per row in larger batches (MiniCanvas, one thread: 4.4 ms per row at 4 rows, 2.8 at 16) and memory is
# not the limit, so 16 (bench/HISTORY.md, "Speed for the time target").
CPU_FORWARD_ROWS = 16
GPU_SAMPLE_BATCH = 4


def forward_rows(device: torch.device, gpu_rows: int) -> int:
    """How many rows a no-grad forward takes at once on `device`: `gpu_rows` on an accelerator, more on the CPU."""
    return max(gpu_rows, CPU_FORWARD_ROWS) if torch.device(device).type == "cpu" else gpu_rows

# How a squared x0-space error ||x0_student - x0_teacher||^2 at noise level sigma is weighted:
#   "eps": 1 / sigma^2                    -- the error of the noise prediction (the authors' loss: SD is an EPS model)
#   "v":   1 / sigma^2 + 1 / sigma_data^2 -- the error of the v prediction (Salimans & Ho; EDM's weighting)
# "eps" all but ignores the high noise levels where an image's style and layout are decided (the weight falls as
# 1 / sigma^2); "v" keeps a floor of 1 / sigma_data^2 there. sigma_data is the std of the model's own samples.


def loss_weight(sigma: torch.Tensor, weighting: str, sigma_data: float) -> torch.Tensor:
    """Per-sample weight [B] on a squared x0-space error at noise levels `sigma` [B] (see LOSS_WEIGHTINGS)."""
    w = 1.0 / sigma.float() ** 2
    if weighting == "v":
        return w + 1.0 / sigma_data ** 2
    if weighting == "eps":
        return w
    raise ValueError(f"weighting={weighting!r}; valid: {', '.join(LOSS_WEIGHTINGS)}")


def data_std(x0: torch.Tensor) -> float:
    """sigma_data estimated from clean samples (floored so a blank sample set cannot divide by zero)."""
    return max(float(x0.float().std()), 1e-2)


def uniform_t(n: int, generator: torch.Generator) -> torch.Tensor:
    """n positions t uniform in [T_MIN, 1 - T_MIN] (float32, CPU): the authors' timestep sampling."""
    return T_MIN + (1 - 2 * T_MIN) * torch.rand(n, generator=generator)


def noised(model: DiffusionModel, x0: torch.Tensor, t: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process at positions t [B]: returns (sigma [B] float32, x_t = add_noise(x0, eps, sigma)), both on
    model.device. eps ~ N(0, I), shaped like x0 [B, C, H, W], is drawn on the CPU from `generator` (so results do not
    depend on the device's RNG); every stage and baseline draws its training x_t here."""
    sigma = model.sigma_at(t).float().to(model.device)
    noise = torch.randn(x0.shape, generator=generator).to(model.device)
    return sigma, model.add_noise(x0, noise, sigma)


def sigma_schedule(model: DiffusionModel, steps: int) -> torch.Tensor:
    """Descending sigmas [steps + 1]: `steps` levels evenly spaced in t from the noisiest end, then 0."""
    t = torch.linspace(1.0 - T_MIN, T_MIN, steps, dtype=torch.float32)
    sigmas = model.sigma_at(t).float().cpu()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def guided_x0(model: DiffusionModel, x: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any,
              cfg: float) -> torch.Tensor:
    """Classifier-free guidance in x0 space (the same as eps-space guidance for a shared x_t), one forward for the
    conditional and one for the unconditional half (ESD's partial sampling; `generate` batches both halves into one
    forward instead). Float32 result."""
    x0_cond = model.predict_x0(x, sigma, cond).float()
    if uncond is None or cfg == 1.0:
        return x0_cond
    x0_uncond = model.predict_x0(x, sigma, uncond).float()
    return cfg_combine(x0_cond, x0_uncond, cfg)


def cfg_combine(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    return x0_uncond + cfg * (x0_cond - x0_uncond)


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts: Sequence[str],
    per_prompt: int,
    seed: int,
    steps: int = 8,
    cfg: float = 5.0,
    batch_size: Optional[int] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `per_prompt` latents for each prompt with Euler + CFG.

    A guidance-distilled family (Flux-dev, Flux-schnell: guidance is the network's input) is sampled at cfg 1, as
    ComfyUI's Flux workflows do. Returns (x0 [len(prompts) * per_prompt, C, H, W] float32 on model.device, prompt index [N] long on CPU).
    Noise is drawn on the CPU from `seed`, so results do not depend on the device's RNG. batch_size: samples per
    forward (None: GPU_SAMPLE_BATCH on an accelerator, CPU_FORWARD_ROWS on the CPU; the samples do not depend on it
    beyond float rounding).
    """
    if batch_size is None:
        batch_size = forward_rows(model.device, GPU_SAMPLE_BATCH)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if family_of(model).guidance_distilled:
        cfg = 1.0  # Flux-dev/schnell take guidance as an input and are sampled without a negative prompt
    guided = cfg != 1.0
    cond = model.encode(list(prompts) + ([""] if guided else []))  # the last row: the unconditional prompt
    index = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    noise = torch.randn((len(index), *model.latent_shape), generator=torch.Generator().manual_seed(seed))
    sigmas = sigma_schedule(model, steps)
    out = []
    for start in range(0, len(index), batch_size):
        rows = index[start:start + batch_size]
        n = len(rows)
        # cond rows then as many unconditional rows: both halves of the guidance in one forward, as ComfyUI's
        # sampler batches them (2/3 of the time of two forwards on the CPU; on a GPU the memory of a KSampler at
        # batch n)
        c = model.select_cond(cond, torch.cat([rows, torch.full((n,), len(prompts))]) if guided else rows)
        eps = noise[start:start + n].to(model.device)
        x = model.add_noise(torch.zeros_like(eps), eps, sigmas[0].expand(n).to(model.device)).float()
        for i in range(steps):
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled while generating training samples")
            s = float(sigmas[i])
            sig = torch.full((n,), s, device=model.device)
            if guided:
                x0 = cfg_combine(*model.predict_x0(torch.cat([x, x]), sig.repeat(2), c).float().chunk(2), cfg)
            else:
                x0 = model.predict_x0(x, sig, c).float()
            s_next = float(sigmas[i + 1])
            # Euler step on the probability-flow ODE: dx/dsigma = (x - x0) / sigma.
            x = x0 if s_next == 0.0 else x + (x - x0) / s * (s_next - s)
        out.append(x.float())
    return torch.cat(out), index
