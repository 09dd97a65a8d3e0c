"""UnlearnCanvas metrics, as pure functions on classifier predictions. UnlearnCanvas: Zhang et al. 2024, arXiv
2402.11846, github.com/OPTML-Group/UnlearnCanvas (UA, IRA, CRA below are its definitions; "ours" marks additions).

For a concept k erased from domain D (style or object), over a grid of generations (style s, object o):
- UA  (unlearning accuracy)  = 1 - accuracy of D's classifier on the images whose prompt asks for k
- IRA (in-domain retain)     = accuracy of D's classifier on the images whose prompt asks for another class of D
- CRA (cross-domain retain)  = accuracy of the other domain's classifier on those same non-target images
- unlisted / listed IRA, CRA (ours): IRA and CRA restricted to the classes the retain list did not name / named
- SFA (surrogate fidelity, ours) = accuracy of the other domain's classifier on the target images (the object
  inside an erased style's row): an erasure that replaces the concept by the surrogate keeps it, one that
  destroys the images does not
All as percentages. Quality: Frechet distance between Gaussian fits of classifier features.
"""
from __future__ import annotations

import numpy as np
import torch


def erasure_metrics(domain: str, target: int, style_true: torch.Tensor, object_true: torch.Tensor,
                    style_pred: torch.Tensor, object_pred: torch.Tensor) -> dict[str, float]:
    """UA / IRA / CRA (percent) for `target` of `domain` ("style" or "object") from per-image labels/predictions."""
    if domain not in ("style", "object"):
        raise ValueError(f"domain must be 'style' or 'object', not {domain!r}")
    own_true, own_pred = (style_true, style_pred) if domain == "style" else (object_true, object_pred)
    other_true, other_pred = (object_true, object_pred) if domain == "style" else (style_true, style_pred)
    hit = own_true == target
    if not hit.any() or hit.all():
        raise ValueError("the grid needs images that ask for the target and images that do not")
    ua = 100.0 * (1.0 - (own_pred[hit] == target).float().mean().item())
    ira = 100.0 * (own_pred[~hit] == own_true[~hit]).float().mean().item()
    cra = 100.0 * (other_pred[~hit] == other_true[~hit]).float().mean().item()
    # not UnlearnCanvas': the other domain inside the erased row/column (is the object still drawn when its style
    # is erased?) -- UA/IRA/CRA cannot tell "replaced by the surrogate" from "destroyed"
    sfa = 100.0 * (other_pred[hit] == other_true[hit]).float().mean().item()
    return {"UA": ua, "IRA": ira, "CRA": cra, "SFA": sfa}


def split_retention(domain: str, classes, style_true: torch.Tensor, object_true: torch.Tensor,
                    style_pred: torch.Tensor, object_pred: torch.Tensor) -> dict[str, float]:
    """IRA and CRA (percent) restricted to the images whose prompt asks for one of `classes` (class indices of
    `domain`): e.g. the classes a retain list did not name ("unlisted") or did ("listed")."""
    own_true, own_pred = (style_true, style_pred) if domain == "style" else (object_true, object_pred)
    other_true, other_pred = (object_true, object_pred) if domain == "style" else (style_true, style_pred)
    sel = torch.isin(own_true, torch.as_tensor(list(classes), dtype=own_true.dtype))
    if not sel.any():
        raise ValueError(f"no image of the grid asks for the classes {sorted(classes)}")
    return {"IRA": 100.0 * (own_pred[sel] == own_true[sel]).float().mean().item(),
            "CRA": 100.0 * (other_pred[sel] == other_true[sel]).float().mean().item()}


def unlearning_accuracy(pred: torch.Tensor, target: int) -> float:
    """1 - share of images classified as `target`, percent (e.g. for prompts naming the target by a synonym)."""
    return 100.0 * (1.0 - (pred == target).float().mean().item())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (as FID, other features).

    tr(sqrt(S1 S2)) is the sum of the square roots of the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2), so
    numpy suffices (hand-written to avoid a scipy dependency for one matrix square root)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, 0.0))


def bootstrap_ci(groups, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and `level` percentile-bootstrap interval of values grouped by concept: `groups` is a list (one entry per
    concept) of lists (one value per training seed). Each replicate resamples concepts, then seeds within each drawn
    concept, with replacement (two-stage bootstrap), so the interval covers both sources of variation."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        raise ValueError("bootstrap_ci needs at least one value")
    mean = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    for i in range(reps):
        pick = rng.integers(0, len(groups), len(groups))
        stats[i] = np.mean([groups[j][rng.integers(0, len(groups[j]), len(groups[j]))].mean() for j in pick])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return mean, float(lo), float(hi)
