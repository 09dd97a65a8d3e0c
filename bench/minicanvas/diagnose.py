"""Why an erasure draws debris and hurts concepts nobody listed: measurements on one concept.

    python -m bench.minicanvas.diagnose targets --concept ukiyo              # the forget loss's targets, per sigma
    python -m bench.minicanvas.diagnose trajectory --concept ukiyo          # the erased model's sampling path
    python -m bench.minicanvas.diagnose strength --concept ukiyo            # the erasure at LoRA strengths < 1
    python -m bench.minicanvas.diagnose cfg --concept ukiyo                 # the erased model at guidance 1 ... 4
    python -m bench.minicanvas.diagnose residual --concept ukiyo            # what guidance multiplies, along the path
    python -m bench.minicanvas.diagnose groups --concept ukiyo              # the LoRA without one module group at a time
    python -m bench.minicanvas.diagnose geometry --concept ukiyo            # where the unlisted classes lie, what moved them
    python -m bench.minicanvas.diagnose words                               # synonyms vs nearest classes, per code
    python -m bench.minicanvas.diagnose ranking                             # which code predicts the unlisted damage
    python -m bench.minicanvas.diagnose losses                              # which unlisted classes lose, binned
    python -m bench.minicanvas.diagnose ceiling [--compare RUN.json:METHOD] # SFA of an exact replacement

- targets: SPARE's forget loss asks the student, on x_t noised from a sample, for the surrogate-prompt teacher's x0.
  For samples of the concept and of the surrogate, at each sigma, the classifiers judge that target x0: is the other
  domain (the object of an erased style) still there, and which style / object is it? Targets that lose the object
  teach the student to lose it.
- trajectory: one sampling run (the evaluation sampler) of the concept's prompts with the erased model, of the
  surrogate's prompts with the unerased model (where the erased model should go) and of the concept's prompts
  unerased; at each step the x0 prediction is judged (share of the other domain kept, the majority class).
- strength: the whole held-out grid at LoRA strengths 1 ... 0.35: UA, SFA and IRA / CRA on the unlisted classes.
- cfg: the whole held-out grid, erased and unerased, at the sampler's guidance scale 1 ... 4: a residual error of
  the erased conditional prediction is multiplied by the guidance scale; if SFA rises as guidance falls, debris is
  the amplified residual of an imperfect fit, not a wrong target.
- residual: along the erased model's sampling path of the concept's held-out prompts, at every step, the erased
  model's errors that classifier-free guidance multiplies, as fractions of the concept-surrogate gap |T(c) - T(s)|
  (T = the unerased model's x0, c / s = concept / surrogate prompt): `along` = the conditional residual's component
  toward the concept, `orth` = the rest of it, `uncond` = the drift of the EMPTY prompt's prediction, `signal` =
  |T(s) - T("")|, what guidance draws the object from. The guided x0 = u + cfg (c - u) carries cfg x the conditional
  residual and (cfg - 1) x the empty prompt's drift: at cfg 4, residuals of a few tenths of the gap rival the signal.
- groups: the whole held-out grid with the trained LoRA whole, then without one group of its modules at a time
  (budgets.MODULE_GROUPS: the text encoder's layers, the timestep embedding, the ResBlocks' convolutions, their
  timestep/pooled-text projections, the spatial transformers' self-attention, cross-attention and feed-forward, the
  pooled-text attention, the rest): which
  groups carry the erasure (UA falls without them) and which the damage (unlisted IRA / CRA or SFA rise without them).
- geometry: the text codes the network conditions on, per class of the concept's domain (relative to the neutral
  class, averaged over the other domain, training template): the pooled vector (`text_pool`, added to the timestep
  embedding) and the spatial cross-attentions' keys and values of the tokens. Their singular values (how many
  directions the classes use), and for each class the retain list leaves unlisted: its cosine with the concept's
  code and the share of its code OUTSIDE the span of the listed classes' and the concept's codes (near 0: any edit
  linear in that code that keeps the listed classes and moves the concept moves that class by a fixed amount, and
  no retain loss can protect it). Then, with the trained LoRA: how far each unlisted class's codes moved (a fraction
  of the concept's move) and its accuracy on the held-out grid (20 images), unerased -> erased, with the other
  domain's accuracy inside its row.
- words: for every class, how close its synonym and its nearest other class are to it in the pooled code and in the
  word's own token state (no erasure trained; --concept is ignored): whether an edit could tell a synonym, which
  must be erased too, from a neighbour, which must be kept.
- ranking / losses (read stored `geometry` runs, --runs GLOB; nothing trained): which text code ranks the damaged
  unlisted classes; the loss binned by how far a style's pooled code moved or by an object's key / value cosine.
- ceiling (nothing trained): the SFA an EXACT replacement scores -- every concept's erased row / column of the
  held-out grid (the harness' images per pair, seeds and templates) drawn by the unerased model with the concept's
  word replaced by the surrogate's ("plain" / "blob"), judged as the harness judges SFA and UA. What an erasure that
  draws the surrogate perfectly would score; with --compare, a results file's SFA per concept beside it, paired by
  concept (mean over training seeds, 95% bootstrap interval over concepts). --images sets the images per pair.

Training: SPARE at the product defaults (`run_method("spare", ...)`, retain list `--retain-set`, training
seed `--seed`), with `--set FIELD=VALUE` overrides of DistillConfig (as the harness' `--spare-set`). Everything is
judged on the training template (targets) or the held-out evaluation templates (trajectory, strength). Prints a
table; `--out` also writes JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import replace

import numpy as np
import torch

import spare_core as sc
from spare_core.calibrate import NOISE_OFFSET, erased_share
from spare_core.minicanvas import data
from spare_core.minicanvas.model import load as load_model, sample_loop, to_image
from spare_core.sampling import generate as generate_samples

from .budgets import (EVAL_TEMPLATES, ERASABLE_OBJECTS, RETAIN_SETS, ERASABLE_STYLES, Budget, class_codes,
                      class_ranking, module_group, parse_override, retention_split, unpadded_encode)
from . import metrics
from .judge import Judge, evaluate, grid, split_metrics
from .methods import generate, run_method
from .paired import runs_of

SIGMAS = (30.0, 10.0, 5.0, 2.0, 1.0, 0.3)
STRENGTHS = (1.0, 0.75, 0.5, 0.35)
CALIBRATE_STRENGTHS = (1.25, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
GUIDANCES = (1.0, 2.0, 4.0)
CFG = 4.0  # the evaluation sampler's guidance (model.sample's default)


def _prompts(domain: str, name: str, cls: str, template: int = 0) -> tuple[list[str], torch.Tensor]:
    """The concept's (or the surrogate's) row / column: prompts and the other domain's labels."""
    others = ERASABLE_OBJECTS if domain == "style" else ERASABLE_STYLES
    prompts = [data.prompt(cls, o, template) if domain == "style" else data.prompt(o, cls, template) for o in others]
    index = data.object_index if domain == "style" else data.style_index
    return prompts, torch.tensor([index(o) for o in others])


def _judge(judge, x0: torch.Tensor, labels: torch.Tensor, domain: str) -> tuple[float, str]:
    """(% of the other domain kept, majority class of the erased domain) for x0 in [-1, 1]."""
    j = judge(to_image(x0))
    other, own = ("object", "style") if domain == "style" else ("style", "object")
    names = data.STYLE_NAMES if domain == "style" else data.OBJECT_NAMES
    return 100.0 * (j[other] == labels).float().mean().item(), names[int(j[own].mode().values)]


def targets(model, judge, domain: str, name: str, seed: int) -> list[dict]:
    surrogate = data.NEUTRAL_STYLE if domain == "style" else data.NEUTRAL_OBJECT
    concept_prompts, labels = _prompts(domain, name, name)
    surrogate_prompts, _ = _prompts(domain, name, surrogate)
    per = 4
    x_concept, i_concept = sc.generate(model, concept_prompts, per, seed)
    x_surrogate, i_surrogate = sc.generate(model, surrogate_prompts, per, seed + 5)
    cond = model.encode(surrogate_prompts)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in SIGMAS:
        for source, x, idx in (("concept", x_concept, i_concept), ("surrogate", x_surrogate, i_surrogate)):
            s = torch.full((len(x),), sigma)
            xt = model.add_noise(x, torch.randn(x.shape, generator=g), s)
            with torch.no_grad():
                x0 = model.predict_x0(xt, s, model.select_cond(cond, idx))
            kept, cls = _judge(judge, x0, labels[idx], domain)
            rows.append({"sigma": sigma, "samples": source, "kept": kept, "class": cls})
    return rows


def _encoded(model, lora, prompts: list[str], erased: bool) -> torch.Tensor:
    """The prompts' codes as the erased model (`lora` applied: its text-encoder half too) or the unerased one sees
    them."""
    with sc.apply_lora(sc.lora_targets(model), lora, 1.0 if erased else 0.0), torch.no_grad():
        return model.encode(prompts)


def trajectory(model, judge, domain: str, name: str, lora, steps: int = 12) -> list[dict]:
    surrogate = data.NEUTRAL_STYLE if domain == "style" else data.NEUTRAL_OBJECT
    rows = []
    for label, cls, erased in (("erased, concept prompt", name, True), ("unerased, surrogate prompt", surrogate, False),
                               ("unerased, concept prompt", name, False)):
        prompts, labels = [], []
        for t in EVAL_TEMPLATES:
            p, lab = _prompts(domain, name, cls, t)
            prompts += p
            labels.append(lab)
        labels = torch.cat(labels)
        cond, uncond = (_encoded(model, lora, p, erased) for p in (prompts, [""] * len(prompts)))
        guided = model.guided_x0(cond, uncond, CFG)
        x = model.initial_noise(len(prompts), list(range(700, 700 + len(prompts)))) * model.cfg.sigma_max
        path = []

        def denoise(x, s):
            if erased:
                with sc.apply_lora(sc.lora_targets(model), lora, 1.0):
                    x0 = guided(x, s)
            else:
                x0 = guided(x, s)
            kept, c = _judge(judge, x0, labels, domain)
            path.append({"sigma": float(s[0]), "kept": kept, "class": c})
            return x0
        with torch.no_grad():
            sample_loop(denoise, x, model.karras_sigmas(steps), "dpmpp_2m")
        rows.append({"run": label, "path": path})
    return rows


def grid_judge(judge, domain: str, name: str, seed: int, retain_set: str):
    """The held-out grid (prompts, seeds) and a function images -> UA, SFA, IRA / CRA and their listed / unlisted
    split for erasing `name` with training seed `seed`: what strength, groups and cfg judge each variant on."""
    prompts, ls, lo, seeds = grid(1)
    target = (data.style_index if domain == "style" else data.object_index)(name)
    split = retention_split(domain, name, seed, retain_set)

    def metrics(images: torch.Tensor) -> dict:
        m, j = evaluate(judge, images, ls, lo, domain, target)
        m.update(split_metrics(domain, split, ls, lo, j["style"], j["object"]))
        return m
    return prompts, seeds, metrics


def metrics_text(r: dict) -> str:
    return (f"UA {r['UA']:5.1f}  SFA {r['SFA']:5.1f}  IRA {r['IRA']:5.1f}  CRA {r['CRA']:5.1f}  unlisted IRA "
            f"{r.get('IRA_unlisted', float('nan')):5.1f}  CRA {r.get('CRA_unlisted', float('nan')):5.1f}")


def strength(model, judge, domain: str, name: str, lora, seed: int, retain_set: str, steps: int = 12) -> list[dict]:
    prompts, seeds, metrics = grid_judge(judge, domain, name, seed, retain_set)
    rows = []
    for st in STRENGTHS:
        with sc.apply_lora(sc.lora_targets(model), lora, st):
            rows.append({"strength": st, **metrics(generate(model, prompts, seeds, steps))})
    return rows


def calibrate(model, judge, domain: str, name: str, lora, seed: int, retain_set: str, steps: int = 12,
              per_prompt: int = 8) -> list[dict]:
    """At each LoRA strength: the held-out grid judged (as `strength`) and what the engine could see without a
    classifier (spare_core/calibrate.py): the erased model's samples of its own concept prompts (the training
    sampler, fresh noise) placed between the unerased model's samples of the concept and of the surrogate prompt from
    the same noise: `along` = mean projection onto concept -> surrogate (0 = concept, 1 = surrogate), `dist` = mean
    |erased - surrogate| / |concept - surrogate|, `nearer` = % of samples nearer the surrogate's (erased_share)."""
    meta = lora.metadata
    concepts, surrogates = json.loads(meta["spare.concepts"]), json.loads(meta["spare.surrogates"])
    conf = json.loads(meta["spare.config"])

    def samples(prompts):
        return generate_samples(model, prompts, per_prompt, int(meta["ss_seed"]) + NOISE_OFFSET, conf["sample_steps"],
                                conf["sample_cfg"])[0].flatten(1)
    with torch.no_grad():
        xc, xs = samples(concepts), samples(surrogates)
    prompts, seeds, metrics = grid_judge(judge, domain, name, seed, retain_set)
    rows = []
    for st in CALIBRATE_STRENGTHS:
        with sc.apply_lora(sc.lora_targets(model), lora, st), torch.no_grad():
            xe = samples(concepts)
            m = metrics(generate(model, prompts, seeds, steps))
        axis = xs - xc
        along = ((xe - xc) * axis).sum(1) / axis.pow(2).sum(1)
        rows.append({"strength": st, "along": float(along.mean()),
                     "dist": float(((xe - xs).norm(dim=1) / axis.norm(dim=1)).mean()),
                     "nearer": 100 * erased_share(xe, xc, xs), **m})
    return rows


def groups(model, judge, domain: str, name: str, lora, seed: int, retain_set: str, steps: int = 12) -> list[dict]:
    prompts, seeds, metrics = grid_judge(judge, domain, name, seed, retain_set)
    by_group: dict[str, list[str]] = {}
    for path in lora.modules:
        by_group.setdefault(module_group(path), []).append(path)
    rows = []
    for group in [None] + list(by_group):
        dropped = set(by_group.get(group, []))
        kept = replace(lora, modules={k: v for k, v in lora.modules.items() if k not in dropped})
        with sc.apply_lora(sc.lora_targets(model), kept, 1.0):
            rows.append({"without": group or "(nothing)", "modules": len(by_group.get(group, [])),
                         **metrics(generate(model, prompts, seeds, steps))})
    return rows


def _codes(model, domain: str, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [K, D], cross-attention keys and values [K, *]) per class, averaged over the other domain's classes
    (training template): the pooled vector `text_pool` adds to the timestep embedding, and what every spatial
    cross-attention's to_k / to_v make of the tokens (the two ways the prompt enters the UNet)."""
    others = data.OBJECT_NAMES if domain == "style" else data.STYLE_NAMES
    kv = [m for n, m in model.network.named_modules() if n.endswith("attn2") and not n.startswith("text_pool")]
    pooled, keys_values = [], []
    with torch.no_grad():
        for c in classes:
            ctx = model.encode([data.prompt(c, o) if domain == "style" else data.prompt(o, c) for o in others])
            pooled.append(model.network.text_pool(ctx).mean(0))
            keys_values.append(torch.cat([p(ctx).mean(0).flatten() for m in kv for p in (m.to_k, m.to_v)]))
    return torch.stack(pooled), torch.stack(keys_values)


def _outside(v: torch.Tensor, basis: torch.Tensor) -> float:
    """|v - its projection on the rows of `basis`| / |v|."""
    sol = torch.linalg.lstsq(basis.T, v[:, None]).solution
    return float((v - (basis.T @ sol)[:, 0]).norm() / v.norm())


@torch.no_grad()
def words(model) -> list[dict]:
    """For every erasable class: how close its synonym and its nearest other class (of the same domain) are to it in
    the two codes the network reads, averaged over the other domain's classes (training template): the pooled vector
    (`text_pool`, relative to the neutral class's) and the word's own contextual token state (what the
    cross-attentions' keys and values are computed from). Cosines; no erasure is trained."""
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for domain, concepts in (("style", data.STYLES[:-1]), ("object", data.OBJECTS[:-1])):
        neutral = class_codes(model, data.NEUTRAL_STYLE if domain == "style" else data.NEUTRAL_OBJECT, domain)[0]
        own = {c.name: class_codes(model, c.name, domain) for c in concepts}
        for c in concepts:
            (pooled, word), (s_pooled, s_word) = own[c.name], class_codes(model, c.synonyms[0], domain)
            others = [o for o in own if o != c.name]
            pooled_cos = {o: float(cos(own[o][0] - neutral, pooled - neutral, dim=0)) for o in others}
            word_cos = {o: float(cos(own[o][1], word, dim=0)) for o in others}
            p_near, w_near = max(pooled_cos, key=pooled_cos.get), max(word_cos, key=word_cos.get)
            rows.append({"domain": domain, "class": c.name, "synonym": c.synonyms[0],
                         "pooled_synonym": float(cos(s_pooled - neutral, pooled - neutral, dim=0)),
                         "pooled_nearest": (p_near, pooled_cos[p_near]),
                         "word_synonym": float(cos(s_word, word, dim=0)),
                         "word_nearest": (w_near, word_cos[w_near])})
    return rows


def geometry(model, judge, domain: str, name: str, lora, seed: int, retain_set: str, steps: int = 12) -> dict:
    names = data.STYLE_NAMES if domain == "style" else data.OBJECT_NAMES
    neutral = data.NEUTRAL_STYLE if domain == "style" else data.NEUTRAL_OBJECT
    classes = ERASABLE_STYLES if domain == "style" else ERASABLE_OBJECTS
    split = retention_split(domain, name, seed, retain_set)
    listed, unlisted = [names[i] for i in split["listed"]], [names[i] for i in split["unlisted"]]
    order = classes + [neutral]
    before = _codes(model, domain, order)
    with sc.apply_lora(sc.lora_targets(model), lora, 1.0):
        after = _codes(model, domain, order)
    out, per_class = {"spectrum": {}, "unlisted": []}, {u: {} for u in unlisted}
    for code, b, a in (("pooled", *[x[0] for x in (before, after)]), ("kv", *[x[1] for x in (before, after)])):
        rel = b[:-1] - b[-1]  # relative to the neutral class
        out["spectrum"][code] = [round(float(v), 3) for v in torch.linalg.svdvals(rel)]
        basis = torch.stack([rel[order.index(c)] for c in listed + [name]])
        moved_c = float((a[order.index(name)] - b[order.index(name)]).norm())
        for u in unlisted:
            i = order.index(u)
            per_class[u][code] = {"outside": _outside(rel[i], basis),
                                  "cos": float(torch.nn.functional.cosine_similarity(rel[i], rel[order.index(name)],
                                                                                     dim=0)),
                                  "moved": float((a[i] - b[i]).norm()) / moved_c if moved_c else 0.0}
    prompts, ls, lo, seeds = grid(2)
    labels, other_labels = (ls, lo) if domain == "style" else (lo, ls)
    own, other = ("style", "object") if domain == "style" else ("object", "style")
    acc = {}
    for erased in (False, True):
        with sc.apply_lora(sc.lora_targets(model), lora, 1.0 if erased else 0.0):
            j = judge(generate(model, prompts, seeds, steps))
        rows = {u: labels == names.index(u) for u in unlisted}
        acc[erased] = {u: (100.0 * float((j[own][r] == names.index(u)).float().mean()),
                           100.0 * float((j[other][r] == other_labels[r]).float().mean())) for u, r in rows.items()}
    for u in unlisted:
        out["unlisted"].append({"class": u, **{f"{code}_{k}": v for code, d in per_class[u].items()
                                               for k, v in d.items()},
                                "acc_unerased": acc[False][u][0], "acc_erased": acc[True][u][0],
                                "other_unerased": acc[False][u][1], "other_erased": acc[True][u][1]})
    out["listed"] = listed
    return out


GEOMETRY_RUNS = "bench/runs/erase_only/geometry_*.json"  # `geometry` for every concept (seed 0, the defaults)


def _stored_pairs(pattern: str) -> list[dict]:
    """Every (concept, unlisted class) pair of the stored `geometry` runs matching `pattern`, with its loss: the
    class's accuracy loss, or the other domain's inside it, whichever is larger."""
    pairs = []
    for path in sorted(glob.glob(pattern)):
        concept = os.path.basename(path)[len("geometry_"):-len(".json")]
        for r in json.load(open(path))["rows"]["unlisted"]:
            pairs.append({**r, "concept": concept, "domain": "style" if concept in ERASABLE_STYLES else "object",
                          "loss": max(r["acc_unerased"] - r["acc_erased"], r["other_unerased"] - r["other_erased"])})
    return pairs


LOSS_BINS = {"style": ("pooled_moved", (0.8, 0.5)), "object": ("kv_cos", (0.8, 0.6))}


def losses(pattern: str = GEOMETRY_RUNS) -> list[dict]:
    """Which unlisted classes lose, on the stored `geometry` runs: styles binned by how far the LoRA moved their
    pooled code (relative to the concept's own move), objects by the cosine of their keys / values to the concept's;
    per bin the pairs, their mean loss and how many lost 20+ points, and the correlation of loss and the binned
    figure."""
    pairs, rows = _stored_pairs(pattern), []
    for domain, (key, (high, mid)) in LOSS_BINS.items():
        sub = [p for p in pairs if p["domain"] == domain]
        if len(sub) < 3:
            continue
        corr = float(np.corrcoef([p[key] for p in sub], [p["loss"] for p in sub])[0, 1])
        for label, keep in ((f">= {high}", lambda v: v >= high), (f"{mid}-{high}", lambda v: mid <= v < high),
                            (f"< {mid}", lambda v: v < mid)):
            inside = [p["loss"] for p in sub if keep(p[key])]
            rows.append({"domain": domain, "figure": key, "bin": label, "pairs": len(inside),
                         "mean_loss": float(np.mean(inside)) if inside else float("nan"),
                         "lost_20": sum(v >= 20 for v in inside), "correlation": corr})
    return rows


def ranking(pattern: str = GEOMETRY_RUNS) -> list[dict]:
    """How well each text code ranks the neighbours an erasure damages, on the damage `geometry` measured (every
    (concept, unlisted class) pair of the stored runs: the class's accuracy loss, or the other domain's inside it,
    whichever is larger): the pooled code and the word's token state (`geometry`'s cosines) against SPARE Nearest
    Concepts' ranking (spare_core.neighbours: mean token state of the class's builder line) on every position
    (`product`, the node's code until 2026-12-06) and with the padding left out (`unpadded`, budgets.unpadded_encode:
    the node's since). Per domain:
    Spearman's rank correlation of loss and cosine, and the mean loss of each concept's 2 nearest unlisted classes
    minus that of the rest."""
    pairs = _stored_pairs(pattern)
    for concept in {p["concept"] for p in pairs}:
        mine = [p for p in pairs if p["concept"] == concept]
        classes = [p["class"] for p in mine]
        sims = {n.line: n.similarity for n in class_ranking(mine[0]["domain"], concept, classes)}
        unpadded = {n.line: n.similarity for n in class_ranking(mine[0]["domain"], concept, classes, unpadded_encode)}
        for p in mine:
            p.update(pooled=p["pooled_cos"], token=p["kv_cos"], product=sims[p["class"]],
                     unpadded=unpadded[p["class"]])
    rows = []
    for domain in ("style", "object"):
        sub = [p for p in pairs if p["domain"] == domain]
        if len(sub) < 3:
            continue  # no stored runs of that domain
        for code in ("pooled", "token", "product", "unpadded"):
            gaps = []
            for concept in sorted({p["concept"] for p in sub}):
                near = sorted((p for p in sub if p["concept"] == concept), key=lambda p: -p[code])
                gaps.append(np.mean([p["loss"] for p in near[:2]]) - np.mean([p["loss"] for p in near[2:]]))
            rows.append({"domain": domain, "code": code, "pairs": len(sub),
                         "spearman": _spearman([p["loss"] for p in sub], [p[code] for p in sub]),
                         "nearest2_minus_rest": float(np.mean(gaps))})
    return rows


def _spearman(a, b) -> float:
    """Spearman's rank correlation (ties broken by order: the losses are multiples of 5)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(x, dtype=float))) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def guidance(model, judge, domain: str, name: str, lora, seed: int, retain_set: str, steps: int = 12) -> list[dict]:
    prompts, seeds, metrics = grid_judge(judge, domain, name, seed, retain_set)
    rows = []
    for g in GUIDANCES:
        for erased in (False, True):
            with sc.apply_lora(sc.lora_targets(model), lora, 1.0 if erased else 0.0):
                images = model.sample(prompts, seed=seeds, steps=steps, cfg=g)
            rows.append({"cfg": g, "erased": erased, **metrics(images)})
    return rows


def ceiling(model, judge, images: int, steps: int = 12) -> list[dict]:
    """Per concept: SFA and UA of an exact replacement -- its erased row (a style) / column (an object) of the held-out
    grid (`grid(images)`: the same seeds and templates the harness judges) drawn by the unerased model with the
    concept's word replaced by the surrogate's (data.NEUTRAL_STYLE / NEUTRAL_OBJECT)."""
    prompts, ls, lo, seeds = grid(images)
    rows = []
    for domain, names, own, other, surrogate in (
            ("style", ERASABLE_STYLES, ls, lo, data.NEUTRAL_STYLE),
            ("object", ERASABLE_OBJECTS, lo, ls, data.NEUTRAL_OBJECT)):
        index = data.style_index if domain == "style" else data.object_index
        for name in names:
            hit = (own == index(name)).nonzero().flatten().tolist()
            asked = [_replace_word(prompts[i], name, surrogate) for i in hit]
            j = judge(generate(model, asked, [seeds[i] for i in hit], steps))
            pred_own, pred_other = (j["style"], j["object"]) if domain == "style" else (j["object"], j["style"])
            rows.append({"domain": domain, "concept": name, "images": len(hit),
                         "SFA": 100.0 * (pred_other == other[hit]).float().mean().item(),
                         "UA": 100.0 * (pred_own != index(name)).float().mean().item()})
    return rows


def _replace_word(prompt: str, word: str, by: str) -> str:
    """`prompt` with the whole word `word` replaced by `by` (a grid prompt names it once)."""
    words = prompt.split(" ")
    hits = [i for i, w in enumerate(words) if w.strip(".,").lower() == word]
    if len(hits) != 1:
        raise ValueError(f"{prompt!r} names {word!r} {len(hits)} times")
    i = hits[0]
    words[i] = words[i].lower().replace(word, by)
    return " ".join(words)


def _sfa_by_concept(path_and_method: str) -> dict[str, list[float]]:
    """{concept: [SFA per training seed]} of one method in a results file (paired.runs_of)."""
    runs, _ = runs_of(path_and_method)
    out: dict[str, list[float]] = {}
    for (concept, _seed), r in sorted(runs.items()):
        out.setdefault(concept, []).append(r["SFA"])
    return out


def residual(model, judge, domain: str, name: str, lora, steps: int = 12) -> list[dict]:
    surrogate = data.NEUTRAL_STYLE if domain == "style" else data.NEUTRAL_OBJECT
    concept_prompts, surrogate_prompts, labels = [], [], []
    for t in EVAL_TEMPLATES:
        p, lab = _prompts(domain, name, name, t)
        concept_prompts += p
        surrogate_prompts += _prompts(domain, name, surrogate, t)[0]
        labels.append(lab)
    labels = torch.cat(labels)
    c, s, u = (model.encode(p) for p in (concept_prompts, surrogate_prompts, [""] * len(concept_prompts)))
    # the erased model's codes (a LoRA with a text-encoder half changes them)
    c_erased, u_erased = (_encoded(model, lora, p, True) for p in (concept_prompts, [""] * len(concept_prompts)))
    x = model.initial_noise(len(c), list(range(700, 700 + len(c)))) * model.cfg.sigma_max
    rows = []

    def denoise(x, sigma):
        with sc.apply_lora(sc.lora_targets(model), lora, 1.0):
            ec, eu = model.predict_x0(x, sigma, c_erased), model.predict_x0(x, sigma, u_erased)
        tc, ts, tu = (model.predict_x0(x, sigma, k) for k in (c, s, u))
        gap = (tc - ts).pow(2).sum().sqrt()
        d, r = (tc - ts) / gap, ec - ts
        along = (r * d).sum()
        guided = (eu + CFG * (ec - eu)).clamp(-1, 1)
        kept, cls = _judge(judge, guided, labels, domain)
        rows.append({"sigma": float(sigma[0]), "along": float(along / gap),
                     "orth": float((r - along * d).pow(2).sum().sqrt() / gap),
                     "uncond": float((eu - tu).pow(2).sum().sqrt() / gap),
                     "signal": float((ts - tu).pow(2).sum().sqrt() / gap), "kept": kept, "class": cls})
        return guided
    with torch.no_grad():
        sample_loop(denoise, x, model.karras_sigmas(steps), "dpmpp_2m")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("targets", "trajectory", "strength", "cfg", "residual", "groups", "calibrate",
                                     "geometry", "words", "ranking", "losses", "ceiling"))
    ap.add_argument("--concept", default="ukiyo", help=f"a style {ERASABLE_STYLES} or an object {ERASABLE_OBJECTS}")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--retain-set", choices=RETAIN_SETS, default=Budget.retain_set)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a DistillConfig field for the erasure (repeatable), e.g. --set surrogate_anchor=1.0")
    ap.add_argument("--runs", default=GEOMETRY_RUNS,
                    help="ranking, losses: the geometry files to read (a glob; default: %(default)s)")
    ap.add_argument("--compare", metavar="RUN.json:METHOD",
                    help="ceiling: a results file's method whose SFA to set beside the exact replacement's")
    ap.add_argument("--images", type=int, default=Budget().seeds,
                    help="ceiling: images per grid pair (default: the harness', %(default)s)")
    ap.add_argument("--out", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.concept not in ERASABLE_STYLES + ERASABLE_OBJECTS:
        ap.error(f"unknown concept {args.concept!r}; styles: {ERASABLE_STYLES}; objects: {ERASABLE_OBJECTS}")
    try:
        overrides = [parse_override(item) for item in args.set]
    except ValueError as e:
        ap.error(f"--set {e}")
    torch.set_num_threads(int(os.environ.get("MINICANVAS_THREADS", "1")))
    domain = "style" if args.concept in ERASABLE_STYLES else "object"
    model, judge = load_model(), Judge()
    if args.what == "words":
        rows = words(model)
        print("cosine to each class: its synonym / its nearest other class, in the pooled code (relative to the "
              "neutral class) and in the word's token state")
        for r in rows:
            (pn, pc), (wn, wc) = r["pooled_nearest"], r["word_nearest"]
            print(f"  {r['domain']:6s} {r['class']:9s} pooled: synonym {r['pooled_synonym']:5.2f}, nearest {pn:9s} "
                  f"{pc:5.2f}   word: synonym {r['word_synonym']:5.2f}, nearest {wn:9s} {wc:5.2f}")
    elif args.what == "ranking":
        rows = ranking(args.runs)
        print("per domain, over every stored (concept, unlisted class) pair of " + args.runs + ": Spearman of the "
              "class's loss and its cosine to the concept, and the loss of each concept's 2 nearest unlisted classes "
              "minus the rest's, by code")
        for r in rows:
            print(f"  {r['domain']:6s} {r['code']:8s} ({r['pairs']} pairs): Spearman {r['spearman']:+.2f}, "
                  f"2 nearest minus rest {r['nearest2_minus_rest']:+.1f} points")
    elif args.what == "losses":
        rows = losses(args.runs)
        print("which unlisted classes lose, over every stored (concept, unlisted class) pair of " + args.runs + ": "
              "styles by how far their pooled code moved (x the concept's own move), objects by their keys' / "
              "values' cosine to the concept's")
        for r in rows:
            print(f"  {r['domain']:6s} {r['figure']:12s} {r['bin']:8s}: {r['pairs']:2d} pairs, mean loss "
                  f"{r['mean_loss']:5.1f} points, {r['lost_20']} lost 20+ (correlation of loss and figure "
                  f"{r['correlation']:+.2f})")
    elif args.what == "ceiling":
        rows = ceiling(model, judge, args.images, Budget().sample_steps)
        reference = _sfa_by_concept(args.compare) if args.compare else {}
        print(f"an exact replacement (the unerased model, the concept's word replaced by the surrogate's; "
              f"{args.images} images per pair of the held-out grid): SFA / UA per concept"
              + (f"; {args.compare}'s SFA (mean over training seeds) beside it" if reference else ""))
        method = args.compare.rpartition(":")[2] if args.compare else ""
        for r in rows:
            got = reference.get(r["concept"])
            r["compare_SFA"] = None if got is None else float(np.mean(got))
            print(f"  {r['domain']:6s} {r['concept']:9s} exact replacement: SFA {r['SFA']:5.1f}  UA {r['UA']:5.1f}"
                  + ("" if got is None else f"   {method}: SFA {r['compare_SFA']:5.1f}"))
        for domain in ("style", "object"):
            part = [r for r in rows if r["domain"] == domain]
            mean, lo, hi = metrics.bootstrap_ci([[r["SFA"]] for r in part])
            line = f"  {domain}s: exact replacement SFA {mean:.1f} [{lo:.1f}, {hi:.1f}]"
            paired = [[v - r["SFA"] for v in reference[r["concept"]]] for r in part if r["concept"] in reference]
            if paired:
                mean, lo, hi = metrics.bootstrap_ci(paired)
                line += f"; {method} minus it {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            print(line)
    elif args.what == "targets":
        rows = targets(model, judge, domain, args.concept, args.seed)
        print(f"forget targets (surrogate-prompt teacher's x0) for '{args.concept}': % of the "
              f"{'object' if domain == 'style' else 'style'} kept / majority {domain}")
        for r in rows:
            print(f"  sigma {r['sigma']:5.1f}  x_t from {r['samples']:9s} samples: kept {r['kept']:5.1f}%  "
                  f"{domain} {r['class']}")
    else:
        budget = replace(Budget(), retain_set=args.retain_set, spare_overrides=tuple(overrides))
        (_, lora), info = run_method("spare", model, domain, args.concept, budget, seed=args.seed)
        print(f"erased '{args.concept}' (seed {args.seed}, retain {args.retain_set}, {dict(overrides)}): "
              f"{info['steps_used']} steps, gap closed {100 * info['gap_closed']:.0f}%", flush=True)
        if args.what == "trajectory":
            rows = trajectory(model, judge, domain, args.concept, lora)
            print(f"x0 prediction along the sampling path (sigma: % of the other domain kept, majority {domain})")
            for r in rows:
                print(f"  {r['run']:27s} " + " ".join(f"{p['sigma']:.2g}:{p['kept']:.0f}{p['class'][:3]}"
                                                     for p in r["path"]))
        elif args.what == "residual":
            rows = residual(model, judge, domain, args.concept, lora)
            print(f"along the erased path, as fractions of |T(c) - T(s)| (cfg {CFG:g}); guided x0: % of the other "
                  f"domain kept / majority {domain}")
            for r in rows:
                print(f"  sigma {r['sigma']:6.2f}  along {r['along']:6.3f}  orth {r['orth']:.3f}  uncond "
                      f"{r['uncond']:.3f}  signal {r['signal']:.2f}  guided: kept {r['kept']:5.1f}%  {r['class']}")
        elif args.what == "cfg":
            rows = guidance(model, judge, domain, args.concept, lora, args.seed, args.retain_set)
            for r in rows:
                print(f"  cfg {r['cfg']:.1f} {'erased  ' if r['erased'] else 'unerased'}: {metrics_text(r)}")
        elif args.what == "calibrate":
            rows = calibrate(model, judge, domain, args.concept, lora, args.seed, args.retain_set)
            for r in rows:
                print(f"  strength {r['strength']:.2f}: along {r['along']:.3f} dist {r['dist']:.3f} nearer "
                      f"{r['nearer']:5.1f}  {metrics_text(r)}", flush=True)
        elif args.what == "geometry":
            rows = geometry(model, judge, domain, args.concept, lora, args.seed, args.retain_set)
            for code, sv in rows["spectrum"].items():
                print(f"  {code:7s} codes of the {len(sv)} {domain}s (relative to the neutral one), singular values: "
                      + " ".join(f"{v:.3g}" for v in sv))
            print(f"  listed: {', '.join(rows['listed'])}; per unlisted {domain}: share of its code outside "
                  f"span(listed, '{args.concept}'), its move / the concept's, accuracy unerased -> erased")
            for r in rows["unlisted"]:
                print(f"  {r['class']:10s} pooled: cos {r['pooled_cos']:.2f} outside {r['pooled_outside']:.3f} "
                      f"moved {r['pooled_moved']:.2f}  "
                      f"keys/values: cos {r['kv_cos']:.2f} outside {r['kv_outside']:.3f} moved {r['kv_moved']:.2f}  "
                      f"accuracy {r['acc_unerased']:5.1f} -> {r['acc_erased']:5.1f}, of the other domain in it "
                      f"{r['other_unerased']:5.1f} -> {r['other_erased']:5.1f}")
        elif args.what == "groups":
            rows = groups(model, judge, domain, args.concept, lora, args.seed, args.retain_set)
            for r in rows:
                print(f"  without {r['without']:12s} ({r['modules']:2d} modules): {metrics_text(r)}")
        else:
            rows = strength(model, judge, domain, args.concept, lora, args.seed, args.retain_set)
            for r in rows:
                print(f"  strength {r['strength']:.2f}: {metrics_text(r)}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"command": "python -m bench.minicanvas.diagnose " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv), "rows": rows}, f,
                      indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
