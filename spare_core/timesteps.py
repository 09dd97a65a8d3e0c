"""Stage 3 of SPARE: a timestep profile that focuses training where the concept matters.

The paper's abstract describes "a timestep sampling scheme ... to target only the crucial timesteps for a given
concept"; its formulas were not available, so this design is ours (see README, "Timestep profile"):

  D(t_b) = E_{x0, eps, t in bin b} w(sigma_t) || x0_hat(x_t, c_concept) - x0_hat(x_t, c_surrogate) ||^2

over `bins` equal bins of the normalised position t in [0, 1] (1 = noisiest), with x0 the concept's own samples and
w the distillation's loss weighting (sampling.loss_weight: "v" = 1/sigma^2 + 1/sigma_data^2, "eps" = 1/sigma^2, the
latter being the eps-prediction gap). D is exactly the initial value of the forget loss at that timestep, so the
profile spends steps where the concept-to-surrogate gap is large. Sampling probability:
  p_b = uniform_floor / bins + (1 - uniform_floor) * D_b^sharpness / sum D^sharpness.
`uniform_floor` keeps every timestep reachable; `sharpness` sharpens (>1) or flattens (<1) the profile. The options
and their defaults: config.ProfileConfig.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from .config import LOSS_WEIGHTINGS, ProfileConfig, check_options
from .errors import Cancelled, SpareInputError
from .files import atomic_write
from .model import DiffusionModel
from .prompts import validate_prompts
from .sampling import T_MIN, data_std, generate, loss_weight, noised

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
        lines = [f"SPARE timestep profile ({self.bins} bins, sharpness {self.meta.get('sharpness')}, "
                 f"uniform floor {self.meta.get('uniform_floor')}): peak at t in [{self.edges[peak]:.2f}, {self.edges[peak + 1]:.2f}] "
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
    return TimestepProfile(edges, [1.0] * bins, [1.0 / bins] * bins,
                           {"sharpness": 0.0, "uniform_floor": 1.0, "uniform": True})


def probabilities(divergence: Sequence[float], sharpness: float, uniform_floor: float) -> list[float]:
    d = torch.tensor(divergence, dtype=torch.float64).clamp_min(0)
    shaped = d ** sharpness
    total = float(shaped.sum())
    bins = len(divergence)
    focus = shaped / total if total > 0 else torch.full_like(d, 1.0 / bins)
    p = uniform_floor / bins + (1 - uniform_floor) * focus
    return (p / p.sum()).tolist()


@torch.no_grad()
def profile(
    model: DiffusionModel,
    concepts: Sequence[str],
    surrogates: Sequence[str],
    config: Optional[ProfileConfig] = None,
    latents: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    **options,
) -> TimestepProfile:
    """Measure D(t) per bin for concept/surrogate pairs and turn it into a sampling distribution.

    config: a ProfileConfig (default: the product's); keyword `options` set its fields (bins, samples, seed,
    sharpness, uniform_floor, loss_weighting, sample_steps, sample_cfg). `samples` per concept are self-generated,
    or the first ones of `latents` (sample-major: row i belongs to concept i % len(concepts), so the first
    samples * len(concepts) rows hold `samples` of every concept)."""
    check_options(ProfileConfig, options)
    cfg = replace(config or ProfileConfig(), **options)
    concepts = validate_prompts(concepts, "concept")
    surrogates = validate_prompts(surrogates, "surrogate")
    check_pairs(concepts, surrogates)
    if not 2 <= cfg.bins <= 100:
        raise SpareInputError(f"bins={cfg.bins} must be between 2 and 100")
    if cfg.samples <= 0:
        raise SpareInputError(f"samples={cfg.samples} must be >= 1")
    if cfg.sharpness < 0:
        raise SpareInputError(f"sharpness={cfg.sharpness} must be >= 0 (0 = uniform, 1 = proportional, >1 = sharper)")
    if not 0.0 <= cfg.uniform_floor <= 1.0:
        raise SpareInputError(f"uniform_floor={cfg.uniform_floor} must be in [0, 1]")
    if cfg.loss_weighting not in LOSS_WEIGHTINGS:
        raise SpareInputError(f"loss_weighting='{cfg.loss_weighting}' is not one of {', '.join(LOSS_WEIGHTINGS)} "
                              "(use the same as Sparse LoRA Distill)")
    if latents is not None:
        x0 = latents[:cfg.samples * len(concepts)].float().to(model.device)
        idx = torch.arange(x0.shape[0]) % len(concepts)
    else:
        x0, idx = generate(model, concepts, cfg.samples, cfg.seed, cfg.sample_steps, cfg.sample_cfg,
                           should_stop=should_stop)
    c_concept, c_surrogate = model.encode(concepts), model.encode(surrogates)
    sigma_data = data_std(x0)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    edges = torch.linspace(0, 1, cfg.bins + 1)
    divergence = []
    for b in range(cfg.bins):
        if should_stop is not None and should_stop():
            raise Cancelled("timestep profile cancelled")
        divergence.append(bin_gap(model, x0, idx, c_concept, c_surrogate, edges[b], edges[b + 1], gen,
                                  cfg.loss_weighting, sigma_data))
        if progress is not None:
            progress(b + 1, cfg.bins)
    probs = probabilities(divergence, cfg.sharpness, cfg.uniform_floor)
    meta = {"concepts": concepts, "surrogates": surrogates, **asdict(cfg), "uniform": False}
    return TimestepProfile(edges.tolist(), divergence, probs, meta)


def bin_gap(model: DiffusionModel, x0, idx, c_concept, c_surrogate, lo: torch.Tensor, hi: torch.Tensor, gen,
            weighting: str, sigma_data) -> float:
    """D for one bin: the weighted concept-vs-surrogate x0 gap, mean over the samples, each at a t drawn in [lo, hi)."""
    n = x0.shape[0]
    t = (lo + torch.rand(n, generator=gen) * (hi - lo)).clamp(T_MIN, 1 - T_MIN)
    sigma, xt = noised(model, x0, t, gen)
    pc = model.predict_x0(xt, sigma, model.select_cond(c_concept, idx)).float()
    ps = model.predict_x0(xt, sigma, model.select_cond(c_surrogate, idx)).float()
    w = loss_weight(sigma, weighting, sigma_data)
    return float(((pc - ps) ** 2).mean(dim=tuple(range(1, x0.dim()))).mul(w).sum()) / n


def check_pairs(concepts: Sequence[str], surrogates: Sequence[str]) -> None:
    if len(concepts) != len(surrogates):
        raise SpareInputError(f"{len(concepts)} concept(s) but {len(surrogates)} surrogate(s); give one surrogate per "
                              "concept (one line each)")
    for c, s in zip(concepts, surrogates):
        if c.strip().lower() == s.strip().lower():
            raise SpareInputError(f"surrogate '{s}' equals the concept '{c}'; choose what the concept should become "
                                  "instead (e.g. 'a painting' for an art style)")
