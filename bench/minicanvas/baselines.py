"""Baseline erasure methods, re-implemented from their papers' objectives on the same `DiffusionModel` interface
that SPARE uses (spare_core/model.py). Each returns an edited *copy* of the model (the input is untouched)
and a record of what was trained.

- ESD (Gandikota et al. 2023): eps_theta(x_t, c) -> eps*(x_t) - eta * (eps*(x_t, c) - eps*(x_t)), eta = 1, frozen
  eps*; x_t from partial sampling of the *current* model with the concept prompt (as in the ESD code).
  ESD-x trains the cross-attention (attn2) parameters; ESD-u every parameter except cross-attention.
- CA, Concept Ablation (Kumari et al. 2023), model-based variant: eps_theta(x_t, c_target) -> sg eps*(x_t, c_anchor),
  cross-attention to_k / to_v only; x_t from anchor samples (the paper generates anchor images).
- SalUn (Fan et al. 2024): forgetting loss toward a surrogate prompt (its "random label" analogue for diffusion:
  eps_theta(x_t, c_concept) -> sg eps*(x_t, c_surrogate)) + retain denoising loss on retain samples, gradients
  masked by a weight saliency mask (global top 50% of |grad of the forgetting loss|), all parameters eligible.
- UCE (Gandikota et al. 2024): closed-form edit of every cross-attention to_k / to_v:
  W' = (lam*W + sum_i W c*_i c_i^T + sum_j W c_j c_j^T)(lam*I + sum_i c_i c_i^T + sum_j c_j c_j^T)^-1,
  c_i the concept prompt's token embeddings, c*_i the surrogate's at the same positions, c_j preserved prompts'.

All losses are eps-space MSE written through x0, like SPARE's.

"Cross-attention" means the UNet's spatial cross-attention (attn2 inside a transformer block), as in the papers'
SD code. MiniCanvas' attention-pooled text vector (`text_pool.attn2`) stands for the text encoder's pooled output of
SDXL, which none of these methods edits: UCE, ESD-x and CA leave it alone (before 2026-11-28 they edited it too,
which gave UCE a second, non-spatial text path to rewrite). ESD-u ("everything but cross-attention") and SalUn
("every parameter") do include it, as they include every other UNet weight.
Deviations from the papers: SalUn's retain loss distils the frozen model's prediction on retain samples instead of
denoising real images (there are none), and its forget and retain samples are self-generated; CA's anchor images are
self-generated; ESD's partial sampling uses Euler with cfg 3 (its code: DDIM); learning rates are the papers' x 20
and ESD runs 200 steps instead of 1000 in `--standard` (budgets.py, LR_SCALE and STANDARD_ESD_STEPS).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from spare_core.sampling import generate, guided_x0, noised, sigma_schedule, uniform_t


@dataclass
class Edited:
    model: object                 # the edited copy (a DiffusionModel)
    trainable_params: int         # parameters the method changes
    changed_bytes: int            # fp16 bytes needed to ship the change (dense delta of every changed tensor)
    seconds: float
    losses: list = field(default_factory=list)


def _eps_mse(pred_x0, target_x0, sigma):
    s = sigma.view(-1, *[1] * (pred_x0.dim() - 1))
    return (((pred_x0.float() - target_x0.float()) / s) ** 2).mean()


def is_unet_cross_attention(name: str) -> bool:
    """A parameter or module path inside the UNet's spatial cross-attention (attn2 of a transformer block)."""
    return ".transformer_blocks." in f".{name}" and ".attn2." in f".{name}."


def _params(network: nn.Module, which: str) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name, p in network.named_parameters():
        cross = is_unet_cross_attention(name)
        kv = cross and (".to_k." in name or ".to_v." in name)
        if which == "cross" and cross or which == "non_cross" and not cross or which == "cross_kv" and kv \
                or which == "all":
            out.append((name, p))
    return out


def _copy(model):
    edited = copy.deepcopy(model)
    for p in edited.network.parameters():
        p.requires_grad_(False)
    return edited


def _step(opt, loss, losses):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))


def _finish(edited, params, started, losses):
    """Freeze the edited copy again and record what changed."""
    for _, p in params:
        p.requires_grad_(False)
    n = sum(p.numel() for _, p in params)
    return Edited(edited, n, 2 * n, time.perf_counter() - started, losses)


def esd(model, concepts: Sequence[str], variant: str = "x", steps: int = 1000, lr: float = 1e-5, eta: float = 1.0,
        seed: int = 0, ddim_steps: int = 20) -> Edited:
    """ESD-x (variant "x") or ESD-u (variant "u"); one of the concept prompts is drawn per step."""
    started = time.perf_counter()
    edited, frozen = _copy(model), model
    params = _params(edited.network, "cross" if variant == "x" else "non_cross")
    for _, p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([p for _, p in params], lr=lr)
    with torch.no_grad():
        c_all, u = model.encode(list(concepts)), model.encode([""])
    gen = torch.Generator().manual_seed(seed)
    sigmas = sigma_schedule(model, ddim_steps)
    losses = []
    for step in range(steps):
        c = c_all[int(torch.randint(0, c_all.shape[0], (1,), generator=gen))][None]
        # partial sampling with the current (edited) model and the concept prompt, to a random step
        stop = int(torch.randint(1, ddim_steps, (1,), generator=gen))
        noise = torch.randn((1, *model.latent_shape), generator=gen)
        with torch.no_grad():
            x = edited.add_noise(torch.zeros_like(noise), noise, sigmas[:1])
            for i in range(stop):
                s = sigmas[i:i + 1]
                x0 = guided_x0(edited, x, s, c, u, 3.0)
                x = x + (x - x0) / s * (sigmas[i + 1] - s)
            s = sigmas[stop:stop + 1]
            e_u = frozen.predict_x0(x, s, u)
            e_c = frozen.predict_x0(x, s, c)
            # eps-space target eps* - eta (eps*_c - eps*_u) is, through x0 (eps = (x - x0)/sigma):
            target = e_u - eta * (e_c - e_u)
        pred = edited.predict_x0(x, s, c)
        loss = _eps_mse(pred, target, s)
        _step(opt, loss, losses)
    return _finish(edited, params, started, losses)


def concept_ablation(model, concepts: Sequence[str], anchors: Sequence[str], steps: int = 250, lr: float = 2e-6,
                     seed: int = 0, samples: int = 2, batch_size: int = 4) -> Edited:
    """Pairs concepts[i] -> anchors[i]; x_t from samples of the anchor prompts."""
    started = time.perf_counter()
    edited = _copy(model)
    params = _params(edited.network, "cross_kv")
    for _, p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([p for _, p in params], lr=lr)
    x_anchor, idx = generate(model, list(anchors), samples, seed)
    with torch.no_grad():
        c_t, c_a = model.encode(list(concepts)), model.encode(list(anchors))
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        rows = torch.randint(0, x_anchor.shape[0], (batch_size,), generator=gen)
        sigma, xt = noised(model, x_anchor[rows], uniform_t(batch_size, gen), gen)
        with torch.no_grad():
            target = model.predict_x0(xt, sigma, c_a[idx[rows]])
        pred = edited.predict_x0(xt, sigma, c_t[idx[rows]])
        loss = _eps_mse(pred, target, sigma)
        _step(opt, loss, losses)
    return _finish(edited, params, started, losses)


def salun(model, concepts: Sequence[str], surrogates: Sequence[str], retain: Sequence[str], steps: int = 500,
          lr: float = 1e-5, mask_fraction: float = 0.5, retain_weight: float = 1.0, seed: int = 0, samples: int = 2,
          batch_size: int = 4) -> Edited:
    """Pairs concepts[i] -> surrogates[i] for the forgetting loss; retain prompts for the retain loss."""
    started = time.perf_counter()
    edited = _copy(model)
    params = _params(edited.network, "all")
    x_f, i_f = generate(model, list(concepts), samples, seed)
    x_r, i_r = generate(model, list(retain), samples, seed + 1)
    with torch.no_grad():
        c_f, c_s, c_r = model.encode(list(concepts)), model.encode(list(surrogates)), model.encode(list(retain))
    gen = torch.Generator().manual_seed(seed + 2)

    def batch(x, n):
        rows = torch.randint(0, x.shape[0], (n,), generator=gen)
        return (rows, *noised(model, x[rows], uniform_t(n, gen), gen))

    def forget_loss(net_model):
        rows, sigma, xt = batch(x_f, batch_size)
        with torch.no_grad():
            target = model.predict_x0(xt, sigma, c_s[i_f[rows]])
        return _eps_mse(net_model.predict_x0(xt, sigma, c_f[i_f[rows]]), target, sigma)

    # weight saliency mask: |grad of the forgetting loss| accumulated over a few batches, global top fraction
    for _, p in params:
        p.requires_grad_(True)
    grads = {n: torch.zeros_like(p) for n, p in params}
    for _ in range(4):
        edited.network.zero_grad(set_to_none=True)
        forget_loss(edited).backward()
        for n, p in params:
            grads[n] += p.grad.abs()
    flat = torch.cat([g.flatten() for g in grads.values()])
    k = max(1, int(mask_fraction * flat.numel()))
    threshold = torch.topk(flat, k).values.min()
    masks = {n: (g >= threshold).float() for n, g in grads.items()}
    edited.network.zero_grad(set_to_none=True)
    opt = torch.optim.Adam([p for _, p in params], lr=lr)
    losses = []
    for step in range(steps):
        loss = forget_loss(edited)
        rows, sigma, xt = batch(x_r, batch_size)
        cr = c_r[i_r[rows]]
        with torch.no_grad():
            target = model.predict_x0(xt, sigma, cr)
        loss = loss + retain_weight * _eps_mse(edited.predict_x0(xt, sigma, cr), target, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in params:
            p.grad.mul_(masks[n])
        opt.step()
        losses.append(float(loss.detach()))
    changed = int(sum(m.sum() for m in masks.values()))
    out = _finish(edited, params, started, losses)
    out.trainable_params, out.changed_bytes = changed, 2 * changed
    return out


@torch.no_grad()
def uce(model, concepts: Sequence[str], surrogates: Sequence[str], preserve: Sequence[str],
        lam: float = 0.5, preserve_scale: float = 1.0, include_pool: bool = False) -> Edited:
    """Closed-form UCE on every UNet cross-attention to_k / to_v. cond must be a context tensor [B, L, D].
    include_pool: also edit MiniCanvas' text-pooling attention (`text_pool.attn2`), as this benchmark did before
    2026-11-28 -- a deviation from the paper kept only to measure what it changed (harness method "uce-pool")."""
    started = time.perf_counter()
    edited = _copy(model)
    c_e = model.encode(list(concepts))        # [N, L, D]
    c_s = model.encode(list(surrogates))
    c_p = model.encode(list(preserve)) if preserve else None
    if not torch.is_tensor(c_e) or c_e.dim() != 3:
        raise TypeError("UCE needs conditionings that are context tensors [B, L, D]")
    ce = c_e.reshape(-1, c_e.shape[-1]).T     # [D, N*L]
    cs = c_s.reshape(-1, c_s.shape[-1]).T
    cp = c_p.reshape(-1, c_p.shape[-1]).T if c_p is not None else None
    n = 0
    for name, module in edited.network.named_modules():
        if not (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
            continue
        if not is_unet_cross_attention(name) and not (include_pool and name.startswith("text_pool.")):
            continue
        w = module.weight.double()            # [out, D]
        d = w.shape[1]
        lhs = lam * w + (w @ cs.double()) @ ce.double().T
        rhs = lam * torch.eye(d, dtype=torch.float64) + ce.double() @ ce.double().T
        if cp is not None:
            lhs += preserve_scale * (w @ cp.double()) @ cp.double().T
            rhs += preserve_scale * cp.double() @ cp.double().T
        module.weight.copy_((lhs @ torch.linalg.inv(rhs)).to(module.weight.dtype))
        n += w.numel()
    return Edited(edited, n, 2 * n, time.perf_counter() - started)
