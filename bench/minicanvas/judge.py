"""MiniCanvas harness, grading: the evaluation grid (held-out templates), the shipped classifiers that judge its
images (Judge), the UnlearnCanvas scores of one erased model (UA, IRA, CRA, SFA: metrics.erasure_metrics; IRA / CRA
on the listed and unlisted classes: split_metrics) and the lines a concept must clear to count as (cleanly) erased.
"""
from __future__ import annotations

import torch

from spare_core.minicanvas import data

from . import metrics
from .budgets import EVAL_TEMPLATES, ERASABLE_OBJECTS, ERASABLE_STYLES
from .classifiers import load_classifiers

ERASED_UA = 90.0   # a concept counts as erased at UA >= 90 (mean over training seeds)
CLEAN_UA, CLEAN_DROP = 95.0, 2.0  # clean erasure: UA >= 95 and IRA, CRA within 2 points of the unerased model,
CLEAN_UNLISTED_DROP = 3.0         # IRA, CRA on the unlisted classes within 3 points of the unerased model's,
CLEAN_SFA_DROP = 10.0             # and the other domain kept inside the erased row within 10 points (SFA)


class Judge:
    """The shipped style and object classifiers: images [B, 3, H, W] in [0, 1] -> predicted style and object
    indices and the features the quality FD compares."""

    def __init__(self):
        self.style, self.object = load_classifiers()

    @torch.no_grad()
    def __call__(self, images):
        out = {}
        feats = []
        for name, clf in (("style", self.style), ("object", self.object)):
            f = clf.features(images * 2 - 1).flatten(1)
            out[name] = clf.head(f).argmax(1)
            feats.append(f)
        out["features"] = torch.cat(feats, 1).numpy()
        return out


def grid(seeds: int, domain=None, name=None, synonym=None, templates=EVAL_TEMPLATES):
    """(prompts, style labels, object labels, seeds) of the evaluation grid; with `synonym`, only the target's row
    asked for by its synonym. Image k of pair (s, o) uses template templates[(s + o + k) % len]: with 2+ seeds
    every pair is asked in two wordings, and the grid uses every held-out template equally often."""
    prompts, st, ob, sd = [], [], [], []
    for si, s in enumerate(ERASABLE_STYLES):
        for oi, o in enumerate(ERASABLE_OBJECTS):
            if synonym is not None and (s if domain == "style" else o) != name:
                continue
            ps = synonym if synonym is not None and domain == "style" else s
            po = synonym if synonym is not None and domain == "object" else o
            for k in range(seeds):
                prompts.append(data.prompt(ps, po, templates[(si + oi + k) % len(templates)]))
                st.append(data.style_index(s))
                ob.append(data.object_index(o))
                sd.append(10_000 + 100 * (si * len(ERASABLE_OBJECTS) + oi) + k)
    return prompts, torch.tensor(st), torch.tensor(ob), sd


def evaluate(judge, images, labels_s, labels_o, domain, target):
    j = judge(images)
    return metrics.erasure_metrics(domain, target, labels_s, labels_o, j["style"], j["object"]), j


def split_metrics(domain, split, ls, lo, style_pred, object_pred) -> dict[str, float]:
    """IRA / CRA on the listed and on the unlisted classes (keys IRA_listed, CRA_listed, IRA_unlisted, ...)."""
    out = {}
    for part, classes in split.items():
        if classes:
            for k, v in metrics.split_retention(domain, classes, ls, lo, style_pred, object_pred).items():
                out[f"{k}_{part}"] = v
    return out
