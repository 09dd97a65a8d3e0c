"""After training: the lowest LoRA strength that still erases, found from the model's own samples (no classifier).

A trained erasure LoRA usually pushes further than the erasure needs, and the excess lands on concepts no retain list
names (measured on MiniCanvas: `python -m bench.minicanvas.diagnose calibrate`: for the object "ring", UA stays 100
down to strength 0.7 while the unlisted objects' accuracy rises 64 -> 80). Which strength is enough differs from
concept to concept (ring: 0.7, square: 0.8, pastel: 0.6), so no fixed strength does.

The search, per candidate strength from 1 down in steps of `STEP`: sample the concept's prompts with the erased
model (the training sampler, noise no training sample was drawn from) and, from the same noise, the unerased model's
samples of the concept's and of the surrogate's prompts (computed once). A sample counts as erased when it lies
nearer (in latent space) to the surrogate's sample than to the concept's: with the same noise the composition is
shared, so the nearer one is the prompt the picture follows. The search stops at the first strength where fewer
than `share` of the samples are erased; the LoRA is scaled to the lowest strength that passed, times `margin`
(at most 1). Scaling is baked into the LoRA's up weights, so every loader gets the calibrated LoRA at strength 1.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .adapters import AdapterSet
from .model import DiffusionModel
from .sampling import generate

STEP = 0.1          # strength grid step
LOWEST = 0.5        # the lowest strength tried
MIN_SAMPLES = 32    # samples per search step in all (a single concept prompt gets 32 samples, not `samples`)
NOISE_OFFSET = 7    # noise seed = the training seed + this (the training samples use +0, +1 and +5)


def erased_share(x_erased: torch.Tensor, x_concept: torch.Tensor, x_surrogate: torch.Tensor) -> float:
    """Share of samples nearer the surrogate's sample (same noise) than the concept's."""
    e, c, s = (x.flatten(1).float() for x in (x_erased, x_concept, x_surrogate))
    return float(((e - s).norm(dim=1) < (e - c).norm(dim=1)).float().mean())


def calibrate_strength(model: DiffusionModel, adapters: AdapterSet, concepts: Sequence[str],
                       surrogates: Sequence[str], seed: int, steps: int, cfg: float, share: float, margin: float,
                       should_stop: Optional[Callable[[], bool]] = None) -> tuple[float, list[dict]]:
    """The calibrated strength (see the module docstring) and, per strength tried, {"strength", "erased"}. The live
    `adapters` are used at each strength and left at strength 1."""
    per_prompt = max(1, math.ceil(MIN_SAMPLES / len(concepts)))

    def samples(prompts):
        return generate(model, prompts, per_prompt, seed + NOISE_OFFSET, steps, cfg, should_stop=should_stop)[0]
    with torch.no_grad():
        with adapters.disabled():
            x_concept, x_surrogate = samples(concepts), samples(surrogates)
        tried, lowest = [], 1.0
        try:
            for k in range(1, round((1.0 - LOWEST) / STEP) + 1):
                strength = round(1.0 - k * STEP, 6)
                adapters.strength = strength
                erased = erased_share(samples(concepts), x_concept, x_surrogate)
                tried.append({"strength": strength, "erased": erased})
                if erased < share:
                    break
                lowest = strength
        finally:
            adapters.strength = 1.0
    return min(1.0, lowest * margin), tried
