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

On a Flux-class DiT (MiniCanvas-Flux: ComfyUI's Flux class) the text reaches the image through joint attention, not
cross-attention, so each method takes the form published for Flux (`text_paths` names the modules):
- UCE (its authors' Flux script): the closed form on `txt_in` (the per-token text projection: the analogue of the
  UNet's to_k / to_v inputs); "uce-pool" also edits `vector_in`'s first layer (the pooled text vector, Flux's CLIP-L
  `y`: the analogue of the UNet's pooled path).
- ESD-x: the attention of the double blocks (`double_blocks.N.{img,txt}_attn`: qkv, q/k norms, proj), where text and
  image tokens meet; ESD-u: every other parameter.
- CA: the text stream's key and value rows of the double blocks' fused `txt_attn.qkv` (the UNet's to_k / to_v).
- EraseAnything (Gao et al. 2025; "eraseanything", Flux only): ESD's objective and partial sampling, trained as a
  rank-8 LoRA on the text stream's query and key rows (`double_blocks.N.txt_attn.qkv`, rows [0, 2 x hidden)); its
  attention-map and reverse self-contrastive regularisers are left out ("EraseAnything-like").
- SalUn: every parameter, as on the UNet.

Deviations from the papers: SalUn's retain loss distils the frozen model's prediction on retain samples instead of
denoising real images (there are none), and its forget and retain samples are self-generated; CA's anchor images are
self-generated; ESD's partial sampling uses Euler with cfg 3 (its code: DDIM); learning rates are the papers' x 20
and ESD runs 200 steps instead of 1000 in `--standard` (budgets.py, LR_SCALE and STANDARD_ESD_STEPS); EraseAnything
runs ESD's steps at the usual Flux LoRA learning rate (1e-4, x LR_SCALE).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

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


def is_flux(network: nn.Module) -> bool:
    """A Flux-class DiT (ComfyUI's comfy.ldm.flux.model.Flux: double blocks, `txt_in`, `vector_in`)."""
    return hasattr(network, "double_blocks") and hasattr(network, "txt_in")


def _flux_text_attention(name: str) -> bool:
    """A parameter of a double block's attention (either stream): Flux's analogue of the UNet's cross-attention."""
    parts = name.split(".")
    return len(parts) > 3 and parts[0] == "double_blocks" and parts[2] in ("img_attn", "txt_attn")


def _params(network: nn.Module, which: str) -> list[tuple[str, nn.Parameter, slice | None]]:
    """(name, parameter, rows) the method `which` trains: "cross" (ESD-x), "non_cross" (ESD-u), "cross_kv" (CA),
    "all" (SalUn). rows: the slice of the parameter's first dimension that is trained (None: all of it), for Flux's
    fused qkv, of which CA trains the key and value rows only."""
    flux = is_flux(network)
    hidden = getattr(network, "hidden_size", 0)
    out = []
    for name, p in network.named_parameters():
        cross = _flux_text_attention(name) if flux else is_unet_cross_attention(name)
        rows = None
        if flux:
            kv = name.startswith("double_blocks.") and (name.endswith("txt_attn.qkv.weight")
                                                        or name.endswith("txt_attn.qkv.bias"))
            rows = slice(hidden, 3 * hidden) if kv else None
        else:
            kv = cross and (".to_k." in name or ".to_v." in name)
        if which == "cross" and cross or which == "non_cross" and not cross or which == "cross_kv" and kv:
            out.append((name, p, rows if which == "cross_kv" else None))
        elif which == "all":
            out.append((name, p, None))
    return out


def _train(params) -> list:
    """Make `params` trainable; a row slice gets a gradient hook that zeroes the other rows (Adam then leaves them
    unchanged: a zero gradient gives a zero step). Returns the hook handles (_finish removes them)."""
    handles = []
    for _, p, rows in params:
        p.requires_grad_(True)
        if rows is not None:
            mask = torch.zeros(p.shape[0], *[1] * (p.dim() - 1), dtype=p.dtype)
            mask[rows] = 1
            handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.device)))
    return handles


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


def _finish(edited, params, started, losses, handles=()):
    """Freeze the edited copy again and record what changed."""
    for h in handles:
        h.remove()
    for _, p, _rows in params:
        p.requires_grad_(False)
    n = sum(p[rows].numel() if rows is not None else p.numel() for _, p, rows in params)
    return Edited(edited, n, 2 * n, time.perf_counter() - started, losses)


def esd(model, concepts: Sequence[str], variant: str = "x", steps: int = 1000, lr: float = 1e-5, eta: float = 1.0,
        seed: int = 0, ddim_steps: int = 20) -> Edited:
    """ESD-x (variant "x") or ESD-u (variant "u"); one of the concept prompts is drawn per step."""
    started = time.perf_counter()
    edited = _copy(model)
    params = _params(edited.network, "cross" if variant == "x" else "non_cross")
    handles = _train(params)
    opt = torch.optim.Adam([p for _, p, _rows in params], lr=lr)
    losses = _esd_loop(model, edited, concepts, steps, opt, eta, seed, ddim_steps)
    return _finish(edited, params, started, losses, handles)


def _esd_loop(frozen, edited, concepts, steps, opt, eta, seed, ddim_steps) -> list:
    """ESD's training loop on `edited` (whatever `opt` holds is trained): x_t from partial sampling of the current
    (edited) model with a concept prompt, to a random step; the frozen model's negatively guided prediction as target."""
    with torch.no_grad():
        c_all, u = frozen.encode(list(concepts)), frozen.encode([""])
    gen = torch.Generator().manual_seed(seed)
    sigmas = sigma_schedule(frozen, ddim_steps)
    losses = []
    for step in range(steps):
        c = frozen.select_cond(c_all, torch.randint(0, len(concepts), (1,), generator=gen))
        # partial sampling with the current (edited) model and the concept prompt, to a random step
        stop = int(torch.randint(1, ddim_steps, (1,), generator=gen))
        noise = torch.randn((1, *frozen.latent_shape), generator=gen)
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
    return losses


class LowRankRows(nn.Module):
    """A parametrization W -> W + (alpha / rank) B A on the rows `rows` of W only: a LoRA on a row slice of a fused
    projection (EraseAnything trains the query and key of Flux's text stream, which ComfyUI's Flux fuses with the
    value in one `qkv` Linear). Written by hand because peft adapts whole modules, not row slices; B starts at zero,
    A as peft's default (Kaiming-uniform), so training starts from the unedited model."""

    def __init__(self, weight: torch.Tensor, rows: slice, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.rows = rows
        n = rows.stop - rows.start
        bound = 1.0 / weight.shape[1] ** 0.5
        self.A = nn.Parameter((torch.rand(rank, weight.shape[1], generator=generator) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(n, rank))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        r = self.rows
        return torch.cat([w[:r.start], w[r] + self.scale * (self.B @ self.A).to(w.dtype), w[r.stop:]])


def erase_anything(model, concepts: Sequence[str], steps: int = 1000, lr: float = 1e-4, rank: int = 8,
                   eta: float = 1.0, seed: int = 0, ddim_steps: int = 20) -> Edited:
    """EraseAnything-like (Flux only): ESD's objective and partial sampling, trained as a rank-`rank` LoRA on the query
    and key rows of every double block's text-stream `txt_attn.qkv`; the LoRA is merged into the returned copy."""
    started = time.perf_counter()
    edited = _copy(model)
    net = edited.network
    if not is_flux(net):
        raise ValueError("eraseanything adapts Flux's text-stream q / k (double_blocks.N.txt_attn.qkv); this model "
                         "has no double blocks: use it with --model flux")
    gen = torch.Generator().manual_seed(seed + 3)
    targets = [m for name, m in net.named_modules() if name.startswith("double_blocks.")
               and name.endswith("txt_attn.qkv")]
    adapters = []
    for m in targets:
        adapter = LowRankRows(m.weight, slice(0, 2 * net.hidden_size), rank, float(rank), gen)
        parametrize.register_parametrization(m, "weight", adapter)
        adapters.append(adapter)
    opt = torch.optim.Adam([p for a in adapters for p in (a.A, a.B)], lr=lr)
    losses = _esd_loop(model, edited, concepts, steps, opt, eta, seed, ddim_steps)
    n = sum(a.A.numel() + a.B.numel() for a in adapters)
    with torch.no_grad():
        for m in targets:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    for p in net.parameters():
        p.requires_grad_(False)
    return Edited(edited, n, 2 * n, time.perf_counter() - started, losses)


def concept_ablation(model, concepts: Sequence[str], anchors: Sequence[str], steps: int = 250, lr: float = 2e-6,
                     seed: int = 0, samples: int = 2, batch_size: int = 4) -> Edited:
    """Pairs concepts[i] -> anchors[i]; x_t from samples of the anchor prompts."""
    started = time.perf_counter()
    edited = _copy(model)
    params = _params(edited.network, "cross_kv")
    handles = _train(params)
    opt = torch.optim.Adam([p for _, p, _rows in params], lr=lr)
    x_anchor, idx = generate(model, list(anchors), samples, seed)
    with torch.no_grad():
        c_t, c_a = model.encode(list(concepts)), model.encode(list(anchors))
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        rows = torch.randint(0, x_anchor.shape[0], (batch_size,), generator=gen)
        sigma, xt = noised(model, x_anchor[rows], uniform_t(batch_size, gen), gen)
        with torch.no_grad():
            target = model.predict_x0(xt, sigma, model.select_cond(c_a, idx[rows]))
        pred = edited.predict_x0(xt, sigma, model.select_cond(c_t, idx[rows]))
        loss = _eps_mse(pred, target, sigma)
        _step(opt, loss, losses)
    return _finish(edited, params, started, losses, handles)


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
            target = model.predict_x0(xt, sigma, model.select_cond(c_s, i_f[rows]))
        return _eps_mse(net_model.predict_x0(xt, sigma, model.select_cond(c_f, i_f[rows])), target, sigma)

    # weight saliency mask: |grad of the forgetting loss| accumulated over a few batches, global top fraction
    _train(params)
    grads = {n: torch.zeros_like(p) for n, p, _rows in params}
    for _ in range(4):
        edited.network.zero_grad(set_to_none=True)
        forget_loss(edited).backward()
        for n, p, _rows in params:
            grads[n] += p.grad.abs()
    flat = torch.cat([g.flatten() for g in grads.values()])
    k = max(1, int(mask_fraction * flat.numel()))
    threshold = torch.topk(flat, k).values.min()
    masks = {n: (g >= threshold).float() for n, g in grads.items()}
    edited.network.zero_grad(set_to_none=True)
    opt = torch.optim.Adam([p for _, p, _rows in params], lr=lr)
    losses = []
    for step in range(steps):
        loss = forget_loss(edited)
        rows, sigma, xt = batch(x_r, batch_size)
        cr = model.select_cond(c_r, i_r[rows])
        with torch.no_grad():
            target = model.predict_x0(xt, sigma, cr)
        loss = loss + retain_weight * _eps_mse(edited.predict_x0(xt, sigma, cr), target, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, p, _rows in params:
            p.grad.mul_(masks[n])
        opt.step()
        losses.append(float(loss.detach()))
    changed = int(sum(m.sum() for m in masks.values()))
    out = _finish(edited, params, started, losses)
    out.trainable_params, out.changed_bytes = changed, 2 * changed
    return out


def uce_targets(network: nn.Module, include_pool: bool) -> list[tuple[str, int]]:
    """(module name, conditioning part) of the Linears UCE edits, part 0 the per-token text states, 1 the pooled
    vector. UNet: every cross-attention to_k / to_v (with include_pool, MiniCanvas' text-pooling attention
    `text_pool.attn2` too: a deviation from the paper kept only to measure what it changed). Flux (UCE's Flux script):
    `txt_in`, and with include_pool `vector_in.in_layer` (the pooled vector's path)."""
    if is_flux(network):
        return [("txt_in", 0)] + ([("vector_in.in_layer", 1)] if include_pool else [])
    return [(name, 0) for name, _ in network.named_modules()
            if (name.endswith("attn2.to_k") or name.endswith("attn2.to_v"))
            and (is_unet_cross_attention(name) or include_pool and name.startswith("text_pool."))]


def _columns(cond, part: int) -> torch.Tensor:
    """The inputs [D, N] a UCE target Linear sees from a conditioning: every token of a context tensor [B, L, D] (a
    tensor cond, or part 0 of a (context, pooled) pair), or the pooled vectors [B, D] (part 1)."""
    x = cond if torch.is_tensor(cond) else cond[part]
    if not torch.is_tensor(x) or x.dim() not in (2, 3):
        raise TypeError("UCE needs conditionings that are context tensors [B, L, D] (or (context, pooled) pairs)")
    return x.reshape(-1, x.shape[-1]).T.double()


@torch.no_grad()
def uce(model, concepts: Sequence[str], surrogates: Sequence[str], preserve: Sequence[str],
        lam: float = 0.5, preserve_scale: float = 1.0, include_pool: bool = False) -> Edited:
    """Closed-form UCE on the Linears of `uce_targets` (the UNet's cross-attention to_k / to_v; Flux's `txt_in`),
    include_pool: the pooled text path too (harness method "uce-pool")."""
    started = time.perf_counter()
    edited = _copy(model)
    c_e = model.encode(list(concepts))
    c_s = model.encode(list(surrogates))
    c_p = model.encode(list(preserve)) if preserve else None
    modules = dict(edited.network.named_modules())
    n = 0
    for name, part in uce_targets(edited.network, include_pool):
        module = modules[name]
        ce, cs = _columns(c_e, part), _columns(c_s, part)     # [D, N*L]
        w = module.weight.double()            # [out, D]
        d = w.shape[1]
        lhs = lam * w + (w @ cs) @ ce.T
        rhs = lam * torch.eye(d, dtype=torch.float64) + ce @ ce.T
        if c_p is not None:
            cp = _columns(c_p, part)
            lhs += preserve_scale * (w @ cp) @ cp.T
            rhs += preserve_scale * cp @ cp.T
        module.weight.copy_((lhs @ torch.linalg.inv(rhs)).to(module.weight.dtype))
        n += w.numel()
    return Edited(edited, n, 2 * n, time.perf_counter() - started)
