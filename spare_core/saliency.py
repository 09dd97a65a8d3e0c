"""Stage 1 of SPARE: find the parameters most responsible for a concept (gradient saliency).

Following the authors' `vision_unlearning/unlearner/spare.py` and `utils/parameter_attribution.py` (and SalUn's
mask): on samples of the concept only, take the ordinary denoising loss at random timesteps and accumulate
|dL/dtheta| over batches. Every Linear/Conv2d of the denoiser is a candidate (`targets="all"`, the authors'); the
salient set is the top fraction (or top k) of modules by score. Three scores (`scoring`):

- "gradient": mean |dL/dW| of the module's weight -- exactly the authors'.
- "taylor": mean |W * dL/dW| -- the first-order estimate of the loss change if the weight were removed (Molchanov et
  al. 2019). The authors' mean |grad| depends on the scale of the module's *input*: text-token projections (to_k,
  to_v: CLIP-scale inputs) and image-token ones (to_q, to_out, convs: normalised activations) are ranked on different
  scales. Scaling a module's input by a and its weight by 1/a leaves the network unchanged and |W * grad| unchanged.
- "contrastive": a module's share of the forget gradient minus its share of the retain gradient (this pack's first
  score). For a style it subtracts the other styles' use of the very modules a style lives in.

The default is the authors' "gradient" over every Linear/Conv2d: on MiniCanvas (20 concepts, held-out prompts) it
erased 17 of 20 concepts (this pack's first default, contrastive over attention only, had erased 14 in the issue's
measurement), and "taylor" did not beat it (16 of 20, retention within the interval) -- bench/HISTORY.md,
"Saliency selection". An optional per-row mask (per-weight granularity that survives export as a standard LoRA)
keeps, inside the selected modules, only the output rows whose saliency is in the global top `row_fraction`.

Loss space: eps-space MSE, written through x0 as ||(x0_hat - x0) / sigma||^2 (x_t = x0 + sigma * eps).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from . import families
from .autograd import backward_safe, frozen
from .errors import Cancelled, NonFiniteLossError, SpareInputError
from .families import Family
from .files import atomic_write, read_safetensors
from .lora import ADAPTABLE
from .model import DiffusionModel
from .prompts import validate_prompts
from .sampling import generate, noised, uniform_t

TARGET_SETS = ("all", "attention", "cross_attention")
SCORINGS = ("gradient", "taylor", "contrastive")
DEFAULT_TARGETS = "all"        # the authors': every Linear/Conv2d of the denoiser
DEFAULT_SCORING = "gradient"   # the authors'; "taylor" measured no better on MiniCanvas (bench/HISTORY.md)
DEFAULT_FRACTION = 0.5         # the authors' sparsity_inclusiveness


def candidate_modules(network: nn.Module, targets: str = DEFAULT_TARGETS,
                      family: Family = families.UNET) -> dict[str, nn.Module]:
    """Modules that may carry an adapter, by module path (the rules per family: spare_core/families.py).

    "all": every Linear/Conv2d (UNets; the authors' candidates) or every Linear inside the transformer blocks (DiTs);
    "attention": the attention projections (UNets: to_q, to_k, to_v, to_out); "cross_attention": where the text
    enters (UNets: the cross-attention attn2; joint-attention DiTs: the text stream's attention projections).
    """
    if targets not in TARGET_SETS:
        raise SpareInputError(f"targets='{targets}' is not one of {', '.join(TARGET_SETS)}")
    out = {}
    for path, module in network.named_modules():
        if not isinstance(module, ADAPTABLE) or (isinstance(module, nn.Conv2d) and module.groups != 1):
            continue
        if not families.in_blocks(path, family):
            continue
        if targets != "all":
            if not any(path == leaf or path.endswith("." + leaf) for leaf in family.attention):
                continue
            if targets == "cross_attention" and not any(part in f".{path}" for part in family.text_attention):
                continue
        out[path] = module
    return out


@dataclass
class Saliency:
    """Result of a saliency scan.

    scores: module path -> score (higher = more responsible for the concept), every candidate module.
    selected: the salient module paths, best first. row_masks: optional bool [out] per selected module.
    """

    scores: dict[str, float]
    selected: list[str]
    row_masks: Optional[dict[str, torch.Tensor]] = None
    meta: dict = field(default_factory=dict)

    def summary(self, top: int = 10) -> str:
        n = len(self.scores)
        lines = [f"SPARE saliency for {self.meta.get('concepts')}: {len(self.selected)} of {n} candidate modules "
                 f"selected ({self.meta.get('targets', '?')} targets, {self.meta.get('samples', '?')} samples, "
                 f"seed {self.meta.get('seed', '?')})."]
        if self.row_masks:
            kept = sum(int(m.sum()) for m in self.row_masks.values())
            total = sum(m.numel() for m in self.row_masks.values())
            lines.append(f"Row masks keep {kept} of {total} output rows ({100.0 * kept / max(total, 1):.1f}%).")
        lines.append(f"Top {min(top, len(self.selected))}:")
        for path in self.selected[:top]:
            lines.append(f"  {self.scores[path]: .4e}  {path}")
        return "\n".join(lines)

    def save(self, path: str) -> str:
        """Write `<path>` (safetensors: scores + row masks) with the rest as JSON metadata, atomically."""
        if not path.endswith(".safetensors"):
            raise SpareInputError(f"saliency path '{path}' must end with .safetensors")
        names = list(self.scores)
        tensors = {"scores": torch.tensor([self.scores[n] for n in names], dtype=torch.float64)}
        for p, m in (self.row_masks or {}).items():
            tensors[f"row_mask/{p}"] = m.to(torch.uint8).contiguous()
        meta = {"spare.kind": "saliency", "names": json.dumps(names), "selected": json.dumps(self.selected),
                "meta": json.dumps(self.meta)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str) -> "Saliency":
        if not os.path.isfile(path):
            raise SpareInputError(f"saliency file '{path}' does not exist")
        tensors, meta = read_safetensors(path, "saliency file")
        if meta.get("spare.kind") != "saliency":
            raise SpareInputError(f"'{path}' is not a SPARE saliency file")
        names = json.loads(meta["names"])
        scores = dict(zip(names, tensors["scores"].tolist()))
        masks = {k[len("row_mask/"):]: v.bool() for k, v in tensors.items() if k.startswith("row_mask/")}
        return cls(scores, json.loads(meta["selected"]), masks or None, json.loads(meta["meta"]))


@contextmanager
def _weight_grads(modules: dict[str, nn.Module], on_grad):
    """Temporarily make only the candidates' weights require grad; `on_grad(path, grad)` consumes each gradient
    as soon as it is accumulated (so at most one weight's gradient is alive at a time). Restores every flag."""
    network_params = {}
    handles = []
    try:
        for path, module in modules.items():
            w = module.weight
            network_params[path] = (w, w.requires_grad)
            w.requires_grad_(True)

            def hook(p, path=path):
                on_grad(path, p.grad)
                p.grad = None
            handles.append(w.register_post_accumulate_grad_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for w, flag in network_params.values():
            w.requires_grad_(flag)
            w.grad = None


LOSS_SCALE_FP16 = 2.0 ** 16  # initial scale for fp16 weights (torch.amp.GradScaler's default init_scale)


def _accumulate(model: DiffusionModel, modules, x0, cond, index, seed, repeats, batch_size, should_stop, progress,
                scoring="gradient", checkpointing=False):
    """Sum of |grad| (scoring "gradient"/"contrastive") or |weight * grad| ("taylor") per module weight and per output
    row, of the eps-space denoising loss on x0 samples.

    fp16 weights get fp16 gradients, whose small values underflow to 0 and would distort the ranking: the loss is
    scaled (LOSS_SCALE_FP16) and the gradients unscaled in float32, like torch.amp.GradScaler does; a batch whose
    scaled gradients overflow is redone at half the scale. (GradScaler itself works on an optimizer's .grad fields;
    here each gradient is consumed by a hook as soon as it exists, so the scaling is written out.)"""
    sums = {p: 0.0 for p in modules}
    rows = {p: torch.zeros(m.weight.shape[0], dtype=torch.float64) for p, m in modules.items()}
    fp16 = model.dtype == torch.float16 or any(m.weight.dtype == torch.float16 for m in modules.values())
    state = {"scale": LOSS_SCALE_FP16 if fp16 else 1.0, "overflow": False}
    batch_sums, batch_rows = {}, {}

    def on_grad(path, g):
        g = g.detach().float() / state["scale"]
        if fp16 and not torch.isfinite(g).all():
            state["overflow"] = True
            return
        a = (g * modules[path].weight.detach().float()).abs() if scoring == "taylor" else g.abs()
        batch_sums[path] = float(a.sum())
        batch_rows[path] = a.flatten(1).sum(1).double().cpu()

    gen = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    total = repeats * math.ceil(n / batch_size)
    done = 0
    ckpt = backward_safe(model.network, checkpointing, families.family_of(model).inplace_residuals)
    with frozen(model.network), _weight_grads(modules, on_grad), torch.inference_mode(False), torch.enable_grad(), \
            ckpt:
        for _ in range(repeats):
            for start in range(0, n, batch_size):
                if should_stop is not None and should_stop():
                    raise Cancelled("saliency scan cancelled")
                xb = x0[start:start + batch_size].clone()  # clone: an ordinary tensor even if x0 is an inference one
                sigma, xt = noised(model, xb, uniform_t(xb.shape[0], gen), gen)
                c = model.select_cond(cond, index[start:start + batch_size])
                s = sigma.view(-1, *[1] * (xb.dim() - 1))
                while True:
                    batch_sums.clear()
                    batch_rows.clear()
                    state["overflow"] = False
                    with torch.autocast(model.device.type, dtype=model.dtype, enabled=model.dtype != torch.float32):
                        pred = model.predict_x0(xt, sigma, c)
                    loss = (((pred.float() - xb) / s) ** 2).mean()
                    (loss * state["scale"]).backward()
                    if not state["overflow"] or state["scale"] <= 1.0:
                        break
                    state["scale"] /= 2.0  # overflow: redo this batch at half the scale
                if state["overflow"]:
                    raise NonFiniteLossError("saliency scan: the gradients are not finite even without loss scaling "
                                             "(the model's fp16 weights overflow on these samples)")
                for p in batch_sums:
                    sums[p] += batch_sums[p]
                    rows[p] += batch_rows[p]
                done += 1
                if progress is not None:
                    progress(done, total)
    return sums, rows


def scan(
    model: DiffusionModel,
    concepts: Sequence[str],
    retain: Sequence[str] = (),
    samples: int = 4,
    seed: int = 0,
    fraction: float = DEFAULT_FRACTION,
    top_k: Optional[int] = None,
    targets: str = DEFAULT_TARGETS,
    scoring: str = DEFAULT_SCORING,
    retain_weight: float = 1.0,
    row_fraction: Optional[float] = None,
    repeats: int = 2,
    batch_size: int = 2,
    sample_steps: int = 8,
    sample_cfg: float = 5.0,
    latents: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    gradient_checkpointing: bool = False,
) -> Saliency:
    """Score every candidate module of `model.network` for `concepts` and select the salient ones.

    concepts: prompts naming the concept(s) to erase. retain: prompts whose behaviour must not move (used by
    scoring="contrastive" only, with weight `retain_weight`). scoring: "taylor", "gradient" (the authors') or
    "contrastive" (module docstring). samples: self-generated samples per prompt.
    fraction / top_k: how many modules to select (top_k wins when given). latents: optional concept samples
    [N, C, H, W] in the model's latent space, used instead of self-generated ones. gradient_checkpointing: recompute
    the blocks' activations in backward (less memory, same scores).
    """
    concepts = validate_prompts(concepts, "concept")
    retain = [r.strip() for r in retain if r.strip()]
    overlap = {c.lower() for c in concepts} & {r.lower() for r in retain}
    if overlap:
        raise SpareInputError(f"retain prompts contain the concept itself ({sorted(overlap)}); remove it from retain")
    if samples <= 0:
        raise SpareInputError(f"samples={samples} must be >= 1")
    if top_k is None and not 0.0 < fraction <= 1.0:
        raise SpareInputError(f"fraction={fraction} must be in (0, 1]")
    if top_k is not None and top_k <= 0:
        raise SpareInputError(f"top_k={top_k} must be >= 1")
    if scoring not in SCORINGS:
        raise SpareInputError(f"scoring='{scoring}' is not one of {', '.join(SCORINGS)}")
    if row_fraction is not None and not 0.0 < row_fraction <= 1.0:
        raise SpareInputError(f"row_fraction={row_fraction} must be in (0, 1]")
    family = families.family_of(model)
    modules = candidate_modules(model.network, targets, family)
    if not modules:
        raise SpareInputError(f"the model has no {targets} modules ({family.label}: Linear/Conv2d named "
                              f"{', '.join(family.attention)}); try targets='all'")

    def gen_or_given(prompts, seed_offset):
        return generate(model, prompts, samples, seed + seed_offset, sample_steps, sample_cfg,
                        should_stop=should_stop)

    if latents is not None:
        x_f = latents.float().to(model.device)
        idx_f = torch.arange(x_f.shape[0]) % len(concepts)
    else:
        x_f, idx_f = gen_or_given(concepts, 0)
    with torch.no_grad():  # the text side is frozen: conditionings carry no graph
        c_forget = model.encode(concepts)
        c_retain = model.encode(retain) if retain else None
    f_sum, f_rows = _accumulate(model, modules, x_f, c_forget, idx_f, seed + 1, repeats, batch_size,
                                should_stop, progress, scoring, gradient_checkpointing)
    numel = {p: m.weight.numel() for p, m in modules.items()}
    forget = {p: f_sum[p] / numel[p] for p in modules}
    if scoring == "contrastive" and retain and retain_weight > 0:
        x_r, idx_r = gen_or_given(retain, 1000)
        r_sum, _ = _accumulate(model, modules, x_r, c_retain, idx_r, seed + 2, repeats, batch_size,
                               should_stop, None, "gradient", gradient_checkpointing)
        retain_mean = {p: r_sum[p] / numel[p] for p in modules}
        f_tot, r_tot = sum(forget.values()) or 1.0, sum(retain_mean.values()) or 1.0
        scores = {p: forget[p] / f_tot - retain_weight * retain_mean[p] / r_tot for p in modules}
    else:
        scores = forget
    ranked = sorted(scores, key=lambda p: scores[p], reverse=True)
    k = top_k if top_k is not None else max(1, math.ceil(fraction * len(ranked)))
    selected = ranked[:min(k, len(ranked))]
    row_masks = None
    if row_fraction is not None:
        row_means = {p: f_rows[p] / (numel[p] / f_rows[p].numel()) for p in selected}
        all_rows = torch.cat([row_means[p] for p in selected])
        keep = max(1, math.ceil(row_fraction * all_rows.numel()))
        threshold = torch.topk(all_rows, keep).values.min()
        row_masks = {}
        for p in selected:
            m = row_means[p] >= threshold
            if not m.any():  # every selected module keeps at least its best row
                m[row_means[p].argmax()] = True
            row_masks[p] = m
    meta = {"concepts": list(concepts), "retain": list(retain), "samples": samples, "seed": seed,
            "targets": targets, "scoring": scoring, "fraction": fraction, "top_k": top_k, "row_fraction": row_fraction,
            "retain_weight": retain_weight, "latents_given": latents is not None}
    return Saliency(scores, selected, row_masks, meta)
