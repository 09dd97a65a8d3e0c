"""The whole method in one call: concept samples -> saliency scan -> timestep profile -> distillation.

The nodes run the same four steps as separate nodes (SPARE Concept Samples feeds one LATENT to the three stages);
the benchmark and the speed tools call `erase`. The samples shared by the stages are in ONE order everywhere,
sample-major: row i belongs to concept i % len(concepts) (`concept_samples`), which is what each stage's `latents`
argument expects, so nobody reorders.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import einops
import torch

from .config import SAMPLE_CFG, SAMPLE_STEPS, ProfileConfig, ScanConfig
from .distill import DistillConfig, DistillResult, distill
from .model import DiffusionModel
from .saliency import Saliency, candidate_modules, scan
from .sampling import generate
from .timesteps import TimestepProfile, profile as timestep_profile


def concept_samples(model: DiffusionModel, concepts: Sequence[str], samples: int, seed: int,
                    steps: int = SAMPLE_STEPS, cfg: float = SAMPLE_CFG,
                    should_stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """`samples` self-generated samples of every concept prompt, sample-major (c1 c2 .. c1 c2 ..): the stages'
    `latents` convention. The same images as `generate` (prompt-major), reordered."""
    x, _ = generate(model, concepts, samples, seed, steps, cfg, should_stop=should_stop)
    return einops.rearrange(x, "(concept sample) ... -> (sample concept) ...", concept=len(concepts))


@dataclass
class Erasure:
    samples: torch.Tensor                    # the concept samples every stage used (sample-major)
    saliency: Saliency
    profile: Optional[TimestepProfile]       # None: uniform timesteps
    result: DistillResult


def erase(model: DiffusionModel, config: DistillConfig, scan_config: ScanConfig = ScanConfig(),
          profile_config: Optional[ProfileConfig] = ProfileConfig(), latents: Optional[torch.Tensor] = None,
          saliency: Optional[Saliency] = None, progress: Optional[Callable[[int, int, float], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None, on_check=None) -> Erasure:
    """SPARE from the concept prompts to the LoRA. `config` names the concepts, surrogates and retain prompts and
    holds the one seed, loss weighting and memory switch every stage uses; `scan_config` and `profile_config` hold
    the rest of those stages' options. profile_config None: uniform timesteps (the authors' public code). latents:
    concept samples (sample-major) instead of drawing `config.samples` per concept with the distillation's seed,
    steps and guidance. saliency: a given module selection instead of the scan (an ablation: every candidate)."""
    if latents is None:
        latents = concept_samples(model, config.concepts, config.samples, config.seed, config.sample_steps,
                                  config.sample_cfg, should_stop)
    if saliency is None:
        scan_config = replace(scan_config, seed=config.seed, gradient_checkpointing=config.gradient_checkpointing)
        saliency = scan(model, config.concepts, config.retain, scan_config, latents=latents, should_stop=should_stop)
    prof = None
    if profile_config is not None:
        profile_config = replace(profile_config, seed=config.seed, loss_weighting=config.loss_weighting)
        prof = timestep_profile(model, config.concepts, config.surrogates, profile_config, latents=latents,
                                should_stop=should_stop)
    result = distill(model, config, saliency, prof, latents=latents, progress=progress, should_stop=should_stop,
                     on_check=on_check)
    return Erasure(latents, saliency, prof, result)


def every_candidate(model: DiffusionModel, concepts: Sequence[str], targets: str) -> Saliency:
    """A selection of every candidate module (no saliency): the ablation `erase(saliency=...)` takes."""
    candidates = list(candidate_modules(model.network, targets))
    return Saliency({p: 1.0 for p in candidates}, candidates, {"concepts": list(concepts), "targets": targets})
