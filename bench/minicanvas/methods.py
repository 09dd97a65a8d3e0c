"""MiniCanvas harness, training: one method on one concept and training seed (run_method: SPARE, its ablations and
variants through spare_core, the baselines through baselines.py), and sampling the model it leaves.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from types import SimpleNamespace

from torch import nn

import spare_core as sc
from spare_core.minicanvas.model import MiniCanvasModel

from . import baselines, budgets, memory
from .budgets import METHODS, SELECTION_DROPS, SPARE_VARIANTS, all_pairs, dropped, split_variant


TEXT_EMBEDDERS = ("txt_in", "vector_in.in_layer")  # spare-text-in (Flux): where the text enters, before the blocks
# spare-te-pool (MiniCanvas-Flux): the Linears that make the pooled vector `y` from the token states (its TextPool),
# with the text encoder's prefix; adapted, they move `y` only (the tokens `txt_in` reads stay), as a LoRA on Flux.1's
# CLIP-L moves its pooled vector and leaves T5's tokens
TEXT_POOL_LINEARS = tuple("text_encoders.text_encoder.pool." + m
                          for m in ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "proj.1"))
TEXT_SUBSETS = ("spare-te-pool", "spare-te-last")  # some of the text encoder's Linears, through the engine's text path


def text_subset(model, method: str) -> list[str]:
    """spare-te-pool: TEXT_POOL_LINEARS; spare-te-last: the Linears of the text encoder's last layer only (of 2 on
    both miniatures): whether the last layers of a large encoder (T5-XXL's 24 blocks) could carry the text side."""
    if method == "spare-te-pool":
        return list(TEXT_POOL_LINEARS)
    # the product's text_encoder "last" on these one-encoder miniatures, whose every layer is read (a test checks)
    names = sc.families.last_layers(sc.families.text_candidates(sc.model.text_encoder_of(model)))
    return [sc.model.text_key_prefix(model) + n for n in names]


def default_inputs():
    """What an erasure reads its prompt lists, learning rates and memory probe from, looked up on each call:
    concept_prompts and LR (budgets.py), peak_rss_reset and peak_rss_mb (memory.py). A host takes any object with
    these four names instead: bench.minicanvas.harness passes itself, so a test that replaces harness.concept_prompts
    (shorter lists) changes what both hosts train on."""
    return SimpleNamespace(concept_prompts=budgets.concept_prompts, LR=budgets.LR,
                           peak_rss_reset=memory.peak_rss_reset, peak_rss_mb=memory.peak_rss_mb)


# layer by layer: the order the adapters are made in (and so their random init) is the order of the stored runs
_TE_ALL = [f"text_encoder.layers.{i}.{m}" for i in range(2) for m in ("qkv", "proj", "mlp.0", "mlp.2")]
_TE_MLP = [p for p in _TE_ALL if ".mlp." in p]
TEXT_ENCODER_LINEARS = {  # spare-te experiments: the text encoder's Linears that carry the adapters
    "spare-te": _TE_ALL,
    "spare-te-mlp": _TE_MLP,
    "spare-te-mlp0": _TE_MLP[:2],
    "spare-te-mlp1": _TE_MLP[2:],
    "spare-te-attn": [p for p in _TE_ALL if ".mlp." not in p],
    "spare-te-unet": _TE_ALL,  # plus the scan's UNet selection, trained together (run_method)
    "spare-temlp-unet": _TE_MLP,  # the text encoder's MLPs only, plus the scan's UNet selection
    "spare-temlp1-unet": _TE_MLP[2:],  # the last layer's MLP only, plus the scan's UNet selection
}


class _TextAndUNet(nn.Module):
    """MiniCanvas' text encoder and UNet as one network whose conditioning is token ids (spare-te)."""

    def __init__(self, text_encoder, unet):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, x, t, tokens):
        return self.unet(x, t, self.text_encoder(tokens))


def text_side(model):
    """Experiment (spare-te): MiniCanvas with the text encoder inside `network` and token ids as the cond, so that
    SPARE's adapters can sit on the text encoder's Linears and the UNet stays as it is (a shallow copy: the same
    modules, no weights copied)."""
    if not isinstance(model, MiniCanvasModel):
        raise ValueError(f"the spare-te experiments run on MiniCanvas' UNet model only, not {type(model).__name__}")
    wrapped = copy.copy(model)
    wrapped.network = _TextAndUNet(model.text_encoder, model.network)
    wrapped.encode = lambda prompts: model.tokenizer(list(prompts)).to(model.device)
    return wrapped


def generate(model, prompts, seeds, steps):
    """Grid images of the unerased `model`: the bundled sampler, one seed per image."""
    return model.sample(prompts, seed=seeds, steps=steps)


def sample_edited(model, edited, prompts, seeds, steps):
    """Grid images of an erased model: ("lora", LoraWeights) applied to `model`, or ("model", the edited model)."""
    kind, obj = edited
    if kind == "lora":  # on the network and, for a LoRA that edits it, the text encoder
        with sc.apply_lora(sc.lora_targets(model), obj, 1.0):
            return generate(model, prompts, seeds, steps)
    if kind == "te-lora":  # spare-te (experiment): a LoRA on the text encoder
        wrapped = text_side(model)
        with sc.apply_lora(wrapped.network, obj, 1.0):
            return generate(wrapped, prompts, seeds, steps)
    return generate(obj, prompts, seeds, steps)


def run_method(method, model, domain, name, budget, seed=0, on_check=None, inputs=None):
    """Train one method for one concept with training seed `seed`. Returns (("lora", LoraWeights) or ("model",
    edited model), info dict). SPARE runs through the same spare_core functions and defaults as the nodes (samples
    per prompt, batch size, step cap, stopping rule); only the learning rate is scaled (LR_SCALE). A name of
    SPARE_VARIANTS is SPARE with that variant's settings; "spare+FIELD=VALUE[+...]" is SPARE with DistillConfig fields
    set. `inputs`: where the prompt lists, learning rates and memory probe come from (default_inputs())."""
    inputs = inputs or default_inputs()
    method, extra = split_variant(method)
    variant = SPARE_VARIANTS.get(method)
    if variant is not None:
        method = "spare"
    # SPARE at the product defaults with these DistillConfig fields set (of a field set twice, the last one wins)
    budget = replace(budget, spare_overrides=(variant.overrides if variant is not None else ())
                     + tuple(budget.spare_overrides) + extra)
    forget, surrogate, retain, short, short_surrogate = inputs.concept_prompts(domain, name, seed, budget.retain_set)
    if method.startswith("spare") and budget.spare_retain:
        retain = inputs.concept_prompts(domain, name, seed, budget.spare_retain)[2]
    if variant is not None and variant.retain:  # the variant's own retain list wins
        retain = all_pairs(domain, name) if variant.retain == "all-pairs" else \
            inputs.concept_prompts(domain, name, seed, variant.retain)[2]
    inputs.peak_rss_reset()
    t0 = time.perf_counter()
    base = model
    if method in TEXT_ENCODER_LINEARS:
        base = text_side(model)
    if method.startswith("spare"):
        # The product pipeline (spare_core.erase: concept samples shared by the three stages, as the nodes wire one
        # Concept Samples LATENT into them) at the product defaults; the harness sets the training seed, the scaled
        # learning rate, the step cap, its own retain list and concept_kind (the domain, as a user picks it), and
        # experiments set any DistillConfig field, last.
        no_retain = method == "spare-no-retain"
        steps = budget.spare
        if variant is not None and variant.step_scale != 1.0:
            steps = max(1, round(variant.step_scale * budget.spare))
        cfg = sc.DistillConfig(forget, surrogate, retain=[] if no_retain else retain, steps=steps,
                               learning_rate=inputs.LR[budgets.spare_lr_key(budget.model)], seed=seed,
                               loss_weighting=budget.spare_weighting, stop_at_gap_closed=budget.spare_stop,
                               gradient_checkpointing=False, concept_kind=domain)
        if no_retain:
            cfg = replace(cfg, retain_unconditional=False, retain_weight=0.0)
        if method in TEXT_ENCODER_LINEARS:  # the experiments' own text-encoder adapters (text_side), not the product's
            cfg = replace(cfg, text_encoder="off")
        cfg = replace(cfg, **dict(budget.spare_overrides))
        scan_cfg = replace(sc.ScanConfig(selection=budget.spare_fraction, targets=budget.spare_targets,
                                         scoring=budget.spare_scoring),
                           **dict(variant.scan if variant is not None else ()))  # the variant's fields win
        profile_cfg = None if method == "spare-uniform-t" else sc.ProfileConfig()
        if profile_cfg is not None and variant is not None and variant.profile_floor is not None:
            profile_cfg = replace(profile_cfg, uniform_floor=variant.profile_floor)
        given = sc.pipeline.every_candidate(base, forget, budget.spare_targets) \
            if method == "spare-no-saliency" else None
        latents = None
        if method in TEXT_SUBSETS:  # some of the text encoder's Linears train (the engine's text path)
            cfg = replace(cfg, text_encoder="on")
        if method == "spare-text-in" or method in TEXT_SUBSETS or method in SELECTION_DROPS:  # the selection changed
            latents = sc.pipeline.concept_samples(base, cfg.concepts, cfg.samples, cfg.seed, cfg.sample_steps,
                                                  cfg.sample_cfg)
            scanned = sc.saliency_scan(base, cfg.concepts, cfg.retain, replace(scan_cfg, seed=cfg.seed,
                                                                       gradient_checkpointing=False), latents=latents)
            if method == "spare-text-in":  # plus Flux's text embedders (UCE's targets)
                selected = list(scanned.selected) + list(TEXT_EMBEDDERS)
            elif method in TEXT_SUBSETS:  # plus those text-encoder Linears, instead of all its layers
                selected = text_subset(base, method) + list(scanned.selected)
            else:  # minus some modules (groups, or path parts: budgets.dropped)
                selected = [m for m in scanned.selected if not dropped(m, SELECTION_DROPS[method])]
            given = sc.Saliency(scanned.scores, selected, scanned.meta)
        if method in TEXT_ENCODER_LINEARS:
            paths = list(TEXT_ENCODER_LINEARS[method])
            if method.endswith("-unet"):  # plus the scan's UNet selection (the scan runs on the UNet as SPARE's)
                latents = sc.pipeline.concept_samples(model, cfg.concepts, cfg.samples, cfg.seed, cfg.sample_steps,
                                                      cfg.sample_cfg)
                scanned = sc.saliency_scan(model, cfg.concepts, cfg.retain, replace(
                    scan_cfg, seed=cfg.seed, gradient_checkpointing=False), latents=latents)
                paths += ["unet." + m for m in scanned.selected]
            given = sc.Saliency({m: 1.0 for m in paths}, paths, {"targets": "text"})
        extra_args = {"latents": latents} if latents is not None else {}  # the scan's samples, reused
        result = sc.erase(base, cfg, scan_cfg, profile_cfg, saliency=given, on_check=on_check, **extra_args).result
        info = {"trainable_params": result.trainable_params, "lora_bytes": result.lora.num_bytes(),
                "losses": [r["forget"] for r in result.losses], "steps_used": result.steps_used,
                "gap_closed": result.gap_closed, "modules": len(result.lora.modules),
                "retain_drift": result.checks[-1].get("retain_drift"), "strength": result.strength,
                "warning": result.warning}
        judged_at = variant.strength if variant is not None else 1.0  # Apply Erasure's strength (spare-strength08)
        lora = result.lora.scaled(judged_at)
        if variant is not None:  # the parts apart (spare-unet08: LoraLoader's strength_model / strength_clip)
            lora = lora.scaled(variant.unet_strength, text=variant.te_strength)
        edited = ("te-lora" if base is not model else "lora", lora)
        info["strength"] = result.strength * judged_at
    elif method in ("esd-x", "esd-u"):
        out = baselines.esd(model, forget, variant=method[-1], steps=budget.esd, lr=inputs.LR["esd"], seed=seed)
        info, edited = {"trainable_params": out.trainable_params, "lora_bytes": out.changed_bytes}, ("model", out.model)
    elif method == "eraseanything":
        out = baselines.erase_anything(model, forget, steps=budget.esd, lr=inputs.LR["eraseanything"], seed=seed)
        info, edited = {"trainable_params": out.trainable_params, "lora_bytes": out.changed_bytes}, ("model", out.model)
    elif method == "ca":
        out = baselines.concept_ablation(model, forget, surrogate, steps=budget.ca, lr=inputs.LR["ca"], seed=seed)
        info, edited = {"trainable_params": out.trainable_params, "lora_bytes": out.changed_bytes}, ("model", out.model)
    elif method == "salun":
        out = baselines.salun(model, forget, surrogate, retain, steps=budget.salun, lr=inputs.LR["salun"], seed=seed)
        info, edited = {"trainable_params": out.trainable_params, "lora_bytes": out.changed_bytes}, ("model", out.model)
    elif method in ("uce", "uce-pool"):
        out = baselines.uce(model, forget, surrogate, retain, include_pool=method == "uce-pool")
        info, edited = {"trainable_params": out.trainable_params, "lora_bytes": out.changed_bytes}, ("model", out.model)
    else:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_mb"] = inputs.peak_rss_mb()
    return edited, info
