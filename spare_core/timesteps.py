"""Stage 3 of SPARE: a timestep profile that focuses training where the concept matters.

The paper's abstract describes "a timestep sampling scheme ... to target only the crucial timesteps for a given
concept"; its formulas were not available, so this design is ours (see README, "Timestep profile"):

  D(t_b) = E_{x0, eps, t in bin b} w(sigma_t) || x0_hat(x_t, c_concept) - x0_hat(x_t, c_surrogate) ||^2

over `bins` equal bins of the normalised position t in [0, 1] (1 = noisiest), with x0 the concept's own samples and
w the distillation's loss weighting (sampling.loss_weight: "v" = 1/sigma^2 + 1/sigma_data^2, "eps" = 1/sigma^2, the
latter being the eps-prediction gap). D is exactly the initial value of the forget loss at that timestep, so the
profile spends steps where the concept-to-surrogate gap is large. Sampling probability:
  p_b = floor / bins + (1 - floor) * D_b^gamma / sum D^gamma.
`floor` keeps every timestep reachable; `gamma` sharpens (>1) or flattens (<1) the profile.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .errors import Cancelled, SpareInputError
from .files import atomic_write
from .model import DiffusionModel
from .prompts import validate_prompts
from .sampling import LOSS_WEIGHTINGS, T_MIN, data_std, generate, loss_weight, noised

# Samples per concept the profile measures on: half of what Concept Samples draws (4), for time. The profile moves by
# less than a hundredth of a bin's probability against 4 per concept (bench/HISTORY.md, "Speed for the time target").
PROFILE_SAMPLES = 2


@dataclass
class TimestepProfile:
    """edges: bin edges in t [bins + 1] (ascending); divergence: D per bin; probs: sampling probability per bin."""

    edges: list[float]
    divergence: list[float]
    probs: list[float]
    meta: dict = field(default_factory=dict)

    @property
    def bins(self) -> int:
        return len(self.probs)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n positions t in [T_MIN, 1 - T_MIN]: a bin drawn by `probs`, then uniform inside it."""
        probs = torch.tensor(self.probs, dtype=torch.float64)
        b = torch.multinomial(probs, n, replacement=True, generator=generator)
        edges = torch.tensor(self.edges, dtype=torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        t = edges[b] + u * (edges[b + 1] - edges[b])
        return t.clamp(T_MIN, 1 - T_MIN).float()

    def summary(self) -> str:
        peak = max(range(self.bins), key=lambda i: self.probs[i])
        lines = [f"SPARE timestep profile ({self.bins} bins, gamma {self.meta.get('gamma')}, "
                 f"floor {self.meta.get('floor')}): peak at t in [{self.edges[peak]:.2f}, {self.edges[peak + 1]:.2f}] "
                 f"(1 = noisiest)."]
        for i in range(self.bins):
            lines.append(f"  t {self.edges[i]:.2f}-{self.edges[i + 1]:.2f}  D={self.divergence[i]:.4g}  "
                         f"p={self.probs[i]:.3f}")
        return "\n".join(lines)

    def save(self, path: str) -> str:
        data = {"spare.kind": "timestep_profile", "edges": self.edges, "divergence": self.divergence,
                "probs": self.probs, "meta": self.meta}

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str) -> "TimestepProfile":
        if not os.path.isfile(path):
            raise SpareInputError(f"timestep profile file '{path}' does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            raise SpareInputError(f"timestep profile file '{path}' is not readable JSON ({e})") from e
        if not isinstance(data, dict) or data.get("spare.kind") != "timestep_profile":
            raise SpareInputError(f"'{path}' is not a SPARE timestep profile")
        return cls(data["edges"], data["divergence"], data["probs"], data.get("meta", {}))


def uniform(bins: int = 10) -> TimestepProfile:
    """The authors' public code: t uniform over the schedule."""
    edges = torch.linspace(0, 1, bins + 1).tolist()
    return TimestepProfile(edges, [1.0] * bins, [1.0 / bins] * bins, {"gamma": 0.0, "floor": 1.0, "uniform": True})


def probabilities(divergence: Sequence[float], gamma: float, floor: float) -> list[float]:
    d = torch.tensor(divergence, dtype=torch.float64).clamp_min(0)
    shaped = d ** gamma
    total = float(shaped.sum())
    bins = len(divergence)
    focus = shaped / total if total > 0 else torch.full_like(d, 1.0 / bins)
    p = floor / bins + (1 - floor) * focus
    return (p / p.sum()).tolist()


@torch.no_grad()
def profile(
    model: DiffusionModel,
    concepts: Sequence[str],
    surrogates: Sequence[str],
    bins: int = 10,
    samples: int = 0,
    seed: int = 0,
    gamma: float = 1.0,
    floor: float = 0.2,
    draws_per_bin: int = 1,
    sample_steps: int = 8,
    sample_cfg: float = 5.0,
    weighting: str = "v",
    latents: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> TimestepProfile:
    """Measure D(t) per bin for concept/surrogate pairs and turn it into a sampling distribution.

    samples: samples per concept the gap is measured on (0 = PROFILE_SAMPLES): self-generated, or the first ones of
    `latents` (sample-major: row i belongs to concept i % len(concepts), so the first samples * len(concepts) rows
    hold `samples` of every concept)."""
    samples = samples or PROFILE_SAMPLES
    concepts = validate_prompts(concepts, "concept")
    surrogates = validate_prompts(surrogates, "surrogate")
    check_pairs(concepts, surrogates)
    if not 2 <= bins <= 100:
        raise SpareInputError(f"bins={bins} must be between 2 and 100")
    if samples <= 0:
        raise SpareInputError(f"samples={samples} must be >= 1")
    if gamma < 0:
        raise SpareInputError(f"gamma={gamma} must be >= 0 (0 = uniform, 1 = proportional, >1 = sharper)")
    if not 0.0 <= floor <= 1.0:
        raise SpareInputError(f"floor={floor} must be in [0, 1]")
    if weighting not in LOSS_WEIGHTINGS:
        raise SpareInputError(f"weighting='{weighting}' is not one of {', '.join(LOSS_WEIGHTINGS)} (use the same "
                              "as Sparse LoRA Distill)")
    if latents is not None:
        x0 = latents[:samples * len(concepts)].float().to(model.device)
        idx = torch.arange(x0.shape[0]) % len(concepts)
    else:
        x0, idx = generate(model, concepts, samples, seed, sample_steps, sample_cfg, should_stop=should_stop)
    c_concept, c_surrogate = model.encode(concepts), model.encode(surrogates)
    sigma_data = data_std(x0)
    gen = torch.Generator().manual_seed(seed + 7)
    edges = torch.linspace(0, 1, bins + 1)
    divergence = []
    for b in range(bins):
        if should_stop is not None and should_stop():
            raise Cancelled("timestep profile cancelled")
        total, count = 0.0, 0
        for _ in range(draws_per_bin):
            n = x0.shape[0]
            t = (edges[b] + torch.rand(n, generator=gen) * (edges[b + 1] - edges[b])).clamp(T_MIN, 1 - T_MIN)
            sigma, xt = noised(model, x0, t, gen)
            pc = model.predict_x0(xt, sigma, model.select_cond(c_concept, idx)).float()
            ps = model.predict_x0(xt, sigma, model.select_cond(c_surrogate, idx)).float()
            w = loss_weight(sigma, weighting, sigma_data)
            total += float(((pc - ps) ** 2).mean(dim=tuple(range(1, x0.dim()))).mul(w).sum())
            count += n
        divergence.append(total / count)
        if progress is not None:
            progress(b + 1, bins)
    probs = probabilities(divergence, gamma, floor)
    meta = {"concepts": concepts, "surrogates": surrogates, "samples": samples, "seed": seed, "gamma": gamma,
            "floor": floor, "uniform": False, "weighting": weighting}
    return TimestepProfile(edges.tolist(), divergence, probs, meta)


def check_pairs(concepts: Sequence[str], surrogates: Sequence[str]) -> None:
    if len(concepts) != len(surrogates):
        raise SpareInputError(f"{len(concepts)} concept(s) but {len(surrogates)} surrogate(s); give one surrogate per "
                              "concept (one line each)")
    for c, s in zip(concepts, surrogates):
        if c.strip().lower() == s.strip().lower():
            raise SpareInputError(f"surrogate '{s}' equals the concept '{c}'; choose what the concept should become "
                                  "instead (e.g. 'a painting' for an art style)")
