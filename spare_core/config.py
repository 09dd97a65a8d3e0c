"""Options of the stages: one dataclass per stage, one field per option, in peft's `LoraConfig` shape.

A field's name is the name of the node input that sets it (`selection`, `sharpness`, `learning_rate`, ...), its default
is the product default, and its metadata holds the help text a node shows as the input's tooltip and, for numbers,
the range a node offers. The nodes build their inputs from these fields (nodes/spare_nodes.py `option_input`) and
repeat no default or tooltip; the benchmark overrides fields by name. Fields with `node=False` are engine options no
node shows (they keep the value the stages were measured with; tests and benchmarks may set them).

ScanConfig and ProfileConfig live here; DistillConfig lives in distill.py beside the loop that reads it, built with
the same `option`.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

TARGET_SETS = ("all", "attention", "cross_attention")  # candidate modules (saliency.candidate_modules)
SCORINGS = ("gradient", "taylor", "contrastive")       # module scores (saliency.py's docstring)
LOSS_WEIGHTINGS = ("v", "eps")                         # loss weight over noise levels (sampling.loss_weight)
DEFAULT_SELECTION = 0.5          # the authors' sparsity_inclusiveness: half of the candidate modules
DEFAULT_TARGETS = "all"          # the authors': every Linear/Conv2d of the denoiser
DEFAULT_SCORING = "gradient"     # the authors'; "taylor" measured no better on MiniCanvas (bench/HISTORY.md)
# Samples per concept the profile measures on: half of what Concept Samples draws (4), for time; the profile moves by
# less than a hundredth of a bin's probability against 4 (bench/HISTORY.md, "Speed for the time target").
PROFILE_SAMPLES = 2
SAMPLE_STEPS = 8                 # Euler steps of every stage's self-generated samples
SAMPLE_CFG = 5.0                 # their classifier-free guidance scale


def option(default: Any = MISSING, help: str = "", *, node: bool = True, min: Optional[float] = None,
           max: Optional[float] = None, step: Optional[float] = None, choices: Optional[tuple] = None,
           factory=None):
    """A config field: its default (or default factory), its help text and, for a node input, its range or
    choices."""
    meta = {"help": help, "node": node, "min": min, "max": max, "step": step, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def describe(cls, name: str) -> dict:
    """{"default", "type", "help", "node", "min", "max", "step", "choices"} of config class `cls`'s field `name`
    (type: the annotation as written, e.g. "list[str]"; default None for a required field)."""
    for f in fields(cls):
        if f.name == name:
            default = f.default_factory() if f.default_factory is not MISSING else \
                None if f.default is MISSING else f.default
            return {"default": default, "type": str(f.type), **f.metadata}
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def node_options(cls) -> list[str]:
    """The names of `cls`'s fields that a node shows."""
    return [f.name for f in fields(cls) if f.metadata.get("node", False)]


def check_options(cls, options: dict) -> None:
    """Refuse keyword options that are not fields of `cls`, naming the valid ones."""
    unknown = sorted(set(options) - {f.name for f in fields(cls)})
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s) {unknown}; valid: {[f.name for f in fields(cls)]}")


@dataclass(frozen=True)
class ScanConfig:
    """Stage 1, the saliency scan (saliency.py): which modules get adapters."""

    samples: int = option(4, "Self-generated samples per concept line used to measure gradients (authors: 4).",
                          min=1, max=64)
    seed: int = option(0, "Seed for self-generated samples, timesteps and adapter init: same seed, same result.",
                       min=0, max=0xffffffffffffffff)
    selection: float = option(DEFAULT_SELECTION, "Fraction of candidate modules to select (authors: 0.5).",
                              min=0.01, max=1.0, step=0.01)
    top_k: int = option(0, "If > 0, select exactly this many modules instead of a fraction.", min=0, max=10000)
    targets: str = option(DEFAULT_TARGETS,
                          "Candidate modules: all = every Linear/Conv of a UNet (the authors'; erases what "
                          "attention-only misses) or every Linear inside a DiT's blocks; attention = the attention "
                          "projections only; cross_attention = where the text enters (a UNet's cross-attention, a "
                          "DiT's text-stream attention).", choices=TARGET_SETS)
    scoring: str = option(DEFAULT_SCORING,
                          "How modules are ranked: gradient = mean |gradient| of the concept's denoising loss (the "
                          "authors'), taylor = |weight x gradient| (scale-free), contrastive = concept share minus "
                          "retain share.", choices=SCORINGS)
    gradient_checkpointing: bool = option(True, "Recompute activations in backward: much less VRAM, somewhat "
                                                "slower; the scores are the same.")
    sample_steps: int = option(SAMPLE_STEPS, "Euler steps of the self-generated samples.", node=False)
    sample_cfg: float = option(SAMPLE_CFG, "Guidance scale of the self-generated samples.", node=False)
    # whole modules: on MiniCanvas-Flux the slices erased less (UA -3.5, mean4 -0.7, one training seed; RESULTS.md)
    fused_slices: bool = option(False, "Score and adapt a DiT's fused projections (Flux's qkv, linear1) as row "
                                       "slices (q, k, v, mlp) instead of whole modules (families.Family.fused).",
                                node=False)


@dataclass(frozen=True)
class ProfileConfig:
    """Stage 3, the timestep profile (timesteps.py): at which noise levels training is spent."""

    bins: int = option(10, "Number of noise-level bins.", min=2, max=50)
    samples: int = option(PROFILE_SAMPLES, "Samples per concept line the gap is measured on: self-generated, or the "
                                           "first ones of the given latents. More = a steadier profile, slower.",
                          min=1, max=64)
    seed: int = option(0, "Seed for self-generated samples and the noise draws: same seed, same profile.",
                       min=0, max=0xffffffffffffffff)
    sharpness: float = option(1.0, "Exponent on the measured gap: 0 = uniform, 1 = proportional, >1 = sharper.",
                              min=0.0, max=4.0, step=0.1)
    uniform_floor: float = option(0.2, "Share of samples drawn uniformly so every noise level keeps some training.",
                                  min=0.0, max=1.0, step=0.05)
    loss_weighting: str = option("v", "How noise levels are weighted: v = also the noisy steps where style and "
                                      "layout are decided (erases in fewer steps); eps = the authors' "
                                      "noise-prediction loss. Use the same in Timestep Profile and Sparse LoRA "
                                      "Distill.", choices=LOSS_WEIGHTINGS)
    sample_steps: int = option(SAMPLE_STEPS, "Euler steps of the self-generated samples.", node=False)
    sample_cfg: float = option(SAMPLE_CFG, "Guidance scale of the self-generated samples.", node=False)
