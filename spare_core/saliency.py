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

The default is the authors' "gradient" over every Linear/Conv2d: on MiniCanvas it erased more concepts than this
pack's first default (contrastive over attention only), and "taylor" did not beat it (bench/HISTORY.md, "Saliency
selection").

Loss space: eps-space MSE, written through x0 as ||(x0_hat - x0) / sigma||^2 (x_t = x0 + sigma * eps).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from . import families
from .config import DEFAULT_TARGETS, SCORINGS, TARGET_SETS, ScanConfig, check_options
from .autograd import backward_safe, frozen
from .errors import Cancelled, NonFiniteLossError, SpareInputError
from .families import Family
from .files import atomic_write, read_safetensors
from .lora import ADAPTABLE
from .adapters import module_dims
from .model import DiffusionModel
from .prompts import validate_prompts
from .sampling import generate, noised, uniform_t

SCAN_REPEATS = 2     # passes over the samples, each at fresh timesteps and noise
SCAN_BATCH = 2       # samples per backward


def candidate_modules(network: nn.Module, targets: str = DEFAULT_TARGETS,
                      family: Family = families.UNET, fused_slices: bool = False) -> dict[str, nn.Module]:
    """Modules that may carry an adapter, by module path (the rules per family: spare_core/families.py). With
    `fused_slices`, each of the family's fused projections is there as its row slices (`<path>[q]`, ..., mapped to
    the module itself; `families.split_slice` / `slice_rows` give the path and the rows).

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
            if not any(families.is_leaf(path, leaf) for leaf in family.attention):
                continue
            if targets == "cross_attention" and not any(part in f".{path}" for part in family.text_attention):
                continue
        parts = families.fused_slices(path, *module_dims(module), family) if fused_slices else []
        for name in parts or [path]:
            out[name] = module
    return out


def candidate_rows(name: str, module: nn.Module) -> slice:
    """The rows of `module`'s weight that candidate `name` covers (all of them unless it is a row slice)."""
    return slice(*families.slice_rows(families.split_slice(name)[1], *module_dims(module)))


@dataclass
class Saliency:
    """Result of a saliency scan.

    scores: module path -> score (higher = more responsible for the concept), every candidate module.
    selected: the salient module paths, best first. meta: the scan's options and prompts.
    """

    scores: dict[str, float]
    selected: list[str]
    meta: dict = field(default_factory=dict)

    def summary(self, top: int = 10) -> str:
        n = len(self.scores)
        lines = [f"SPARE saliency for {self.meta.get('concepts')}: {len(self.selected)} of {n} candidate modules "
                 f"selected ({self.meta.get('targets', '?')} targets, {self.meta.get('samples', '?')} samples, "
                 f"seed {self.meta.get('seed', '?')})."]
        lines.append(f"Top {min(top, len(self.selected))}:")
        for path in self.selected[:top]:
            lines.append(f"  {self.scores[path]: .4e}  {path}")
        return "\n".join(lines)

    def save(self, path: str) -> str:
        """Write `<path>` (safetensors: the scores) with the rest as JSON metadata, atomically."""
        if not path.endswith(".safetensors"):
            raise SpareInputError(f"saliency path '{path}' must end with .safetensors")
        names = list(self.scores)
        tensors = {"scores": torch.tensor([self.scores[n] for n in names], dtype=torch.float64)}
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
        return cls(scores, json.loads(meta["selected"]), json.loads(meta["meta"]))


@contextmanager
def _weight_grads(modules: dict[str, nn.Module], on_grad):
    """Temporarily make only the candidates' weights require grad; `on_grad(path, grad)` consumes each gradient
    as soon as it is accumulated (so at most one weight's gradient is alive at a time). Restores every flag."""
    network_params = {}
    handles = []
    names = {}  # weight -> the candidates on it (several: row slices of one fused projection)
    for path, module in modules.items():
        names.setdefault(module.weight, []).append(path)
    try:
        for w, paths in names.items():
            network_params[paths[0]] = (w, w.requires_grad)
            w.requires_grad_(True)

            def hook(p, paths=paths):
                for path in paths:
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


def _accumulate(model: DiffusionModel, modules, x0, cond, index, seed, should_stop, progress, scoring="gradient",
                checkpointing=False, repeats: int = SCAN_REPEATS, batch_size: int = SCAN_BATCH):
    """Sum of |grad| (scoring "gradient"/"contrastive") or |weight * grad| ("taylor") per module weight, of the
    eps-space denoising loss on x0 samples (`repeats` passes, `batch_size` samples per backward).

    fp16 weights get fp16 gradients, whose small values underflow to 0 and would distort the ranking: the loss is
    scaled (LOSS_SCALE_FP16) and the gradients unscaled in float32, like torch.amp.GradScaler does; a batch whose
    scaled gradients overflow is redone at half the scale. (GradScaler itself works on an optimizer's .grad fields;
    here each gradient is consumed by a hook as soon as it exists, so the scaling is written out.)"""
    sums = {p: 0.0 for p in modules}
    fp16 = model.dtype == torch.float16 or any(m.weight.dtype == torch.float16 for m in modules.values())
    state = {"scale": LOSS_SCALE_FP16 if fp16 else 1.0, "overflow": False}
    batch_sums = {}

    row_of = {p: candidate_rows(p, m) for p, m in modules.items()}

    def on_grad(path, g):
        rows = row_of[path]
        g = g[rows].detach().float() / state["scale"]
        if fp16 and not torch.isfinite(g).all():
            state["overflow"] = True
            return
        a = (g * modules[path].weight[rows].detach().float()).abs() if scoring == "taylor" else g.abs()
        batch_sums[path] = float(a.sum())

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
                done += 1
                if progress is not None:
                    progress(done, total)
    return sums


def scan(
    model: DiffusionModel,
    concepts: Sequence[str],
    retain: Sequence[str] = (),
    config: Optional[ScanConfig] = None,
    latents: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    **options,
) -> Saliency:
    """Score every candidate module of `model.network` for `concepts` and select the salient ones.

    concepts: prompts naming the concept(s) to erase. retain: prompts whose behaviour must not move (used by
    scoring="contrastive" only). config: a ScanConfig (default: the product's); keyword `options` set its fields
    (samples, seed, selection, top_k, targets, scoring, gradient_checkpointing, sample_steps, sample_cfg).
    latents: optional concept samples [N, C, H, W] in the model's latent space (sample i belongs to concept
    i % len(concepts)), used instead of self-generated ones.
    """
    check_options(ScanConfig, options)
    cfg = replace(config or ScanConfig(), **options)
    concepts = validate_prompts(concepts, "concept")
    retain = [r.strip() for r in retain if r.strip()]
    overlap = {c.lower() for c in concepts} & {r.lower() for r in retain}
    if overlap:
        raise SpareInputError(f"retain prompts contain the concept itself ({sorted(overlap)}); remove it from retain")
    if cfg.samples <= 0:
        raise SpareInputError(f"samples={cfg.samples} must be >= 1")
    if not cfg.top_k and not 0.0 < cfg.selection <= 1.0:
        raise SpareInputError(f"selection={cfg.selection} must be in (0, 1]")
    if cfg.top_k < 0:
        raise SpareInputError(f"top_k={cfg.top_k} must be >= 0 (0 = use selection)")
    if cfg.scoring not in SCORINGS:
        raise SpareInputError(f"scoring='{cfg.scoring}' is not one of {', '.join(SCORINGS)}")
    family = families.family_of(model)
    modules = candidate_modules(model.network, cfg.targets, family, cfg.fused_slices)
    if not modules:
        raise SpareInputError(f"the model has no {cfg.targets} modules ({family.label}: Linear/Conv2d named "
                              f"{', '.join(family.attention)}); try targets='all'")

    def self_generated(prompts, seed_offset):
        return generate(model, prompts, cfg.samples, cfg.seed + seed_offset, cfg.sample_steps, cfg.sample_cfg,
                        should_stop=should_stop)

    if latents is not None:
        x_f = latents.float().to(model.device)
        idx_f = torch.arange(x_f.shape[0]) % len(concepts)
    else:
        x_f, idx_f = self_generated(concepts, 0)
    with torch.no_grad():  # the text side is frozen: conditionings carry no graph
        c_forget = model.encode(concepts)
        c_retain = model.encode(retain) if retain else None
    f_sum = _accumulate(model, modules, x_f, c_forget, idx_f, cfg.seed + 1, should_stop, progress, cfg.scoring,
                        cfg.gradient_checkpointing)
    numel = {p: m.weight[candidate_rows(p, m)].numel() for p, m in modules.items()}
    forget = {p: f_sum[p] / numel[p] for p in modules}
    if cfg.scoring == "contrastive" and retain:
        x_r, idx_r = self_generated(retain, 1000)
        r_sum = _accumulate(model, modules, x_r, c_retain, idx_r, cfg.seed + 2, should_stop, None, "gradient",
                            cfg.gradient_checkpointing)
        retain_mean = {p: r_sum[p] / numel[p] for p in modules}
        f_tot, r_tot = sum(forget.values()) or 1.0, sum(retain_mean.values()) or 1.0
        scores = {p: forget[p] / f_tot - retain_mean[p] / r_tot for p in modules}
    else:
        scores = forget
    ranked = sorted(scores, key=lambda p: scores[p], reverse=True)
    k = cfg.top_k or max(1, math.ceil(cfg.selection * len(ranked)))
    selected = ranked[:min(k, len(ranked))]
    meta = {"concepts": list(concepts), "retain": list(retain), **asdict(cfg), "latents_given": latents is not None}
    return Saliency(scores, selected, meta)
