"""Train the MiniCanvas style and object classifiers on rendered images, and measure them.

    python -m bench.minicanvas.train_classifiers              # train, ship, evaluate (real held-out + generations)
    python -m bench.minicanvas.train_classifiers --eval-only  # evaluate the shipped classifiers and model

Seeds: training renders use TRAIN_SEEDS, the held-out real set HELDOUT_SEEDS (disjoint from each other and from the
diffusion model's training seeds [0, DATA_VARIANTS)). Generations: the canonical UnlearnCanvas prompt
"A {object} image in {style} style." for every (style, object) pair, GEN_SEEDS seeds each.
Targets: >= 99% per domain on held-out real images, >= 98% per domain on generations.
"""
from __future__ import annotations

import os

# libgomp's default busy-waiting makes 2 threads ~7x slower than 1 when the cores are shared with other processes
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from spare_core.minicanvas import data

from .classifiers import (CLASSIFIER_FILE, DOMAINS, ConceptClassifier, augment, load_classifiers, n_classes,
                          per_class_accuracy, predict, save_classifiers)

WORK = pathlib.Path(__file__).parent / "_work"
TRAIN_SEEDS = range(100_000, 100_040)     # 40 renders per pair -> 4840 images
HELDOUT_SEEDS = range(200_000, 200_010)   # 10 renders per pair -> 1210 images
GEN_SEEDS = 4                             # generations per pair for the report (484 images)
GEN_SEED_BASE = 300_000
EPOCHS = 12
BATCH = 128
LR = 2e-3


def render_pairs(seeds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (style, object) pair x seeds: images [N, 3, 32, 32], style ids [N], object ids [N]."""
    seeds = list(seeds)
    imgs, st, ob = [], [], []
    for s in range(len(data.STYLES)):
        for o in range(len(data.OBJECTS)):
            imgs.append(data.render_batch([s] * len(seeds), [o] * len(seeds), seeds))
            st += [s] * len(seeds)
            ob += [o] * len(seeds)
    return torch.cat(imgs), torch.tensor(st), torch.tensor(ob)


def train_one(domain: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> ConceptClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = ConceptClassifier(n_classes(domain))
    steps_per_epoch = len(x) // BATCH
    opt = torch.optim.AdamW(clf.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch)
    for epoch in range(EPOCHS):
        clf.train()
        perm = torch.randperm(len(x), generator=gen)
        tot, correct, n = 0.0, 0, 0
        for k in range(steps_per_epoch):
            idx = perm[k * BATCH: (k + 1) * BATCH]
            xb = augment(x[idx], gen, domain)
            logits = clf(xb)
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
            n += len(idx)
        print(f"  {domain} epoch {epoch + 1}/{EPOCHS} loss {tot / n:.4f} train-acc(aug) {correct / n:.4f}", flush=True)
    return clf.eval()


def report(title: str, images: torch.Tensor, st: torch.Tensor, ob: torch.Tensor, style_clf, object_clf) -> dict:
    """Per-domain and per-class accuracy; prints it and returns it."""
    out = {}
    for domain, clf, y, names in (("style", style_clf, st, data.STYLE_NAMES),
                                  ("object", object_clf, ob, data.OBJECT_NAMES)):
        pred = predict(clf, images)
        acc = (pred == y).float().mean().item()
        per = per_class_accuracy(pred, y, names)
        out[domain] = {"accuracy": acc, "per_class": per, "n": len(y)}
        print(f"{title} {domain}: {acc * 100:.2f}% (n={len(y)})  " +
              " ".join(f"{k}={v * 100:.0f}" for k, v in per.items()), flush=True)
    return out


def generate_eval_set(model, seeds_per_pair: int, steps: int = 20, cfg: float = 4.0):
    """Generations for the canonical prompt of every pair: images, style ids, object ids."""
    prompts, st, ob, seeds = [], [], [], []
    for s, sc in enumerate(data.STYLES):
        for o, oc in enumerate(data.OBJECTS):
            for k in range(seeds_per_pair):
                prompts.append(data.prompt(sc.name, oc.name))
                st.append(s)
                ob.append(o)
                seeds.append(GEN_SEED_BASE + 1000 * k + 11 * s + o)
    imgs = model.sample(prompts, seed=seeds, steps=steps, cfg=cfg)
    return imgs, torch.tensor(st), torch.tensor(ob)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-seeds", type=int, default=GEN_SEEDS)
    ap.add_argument("--model", type=pathlib.Path, default=None, help="diffusion weights (default: shipped)")
    ap.add_argument("--out", type=pathlib.Path, default=CLASSIFIER_FILE)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    if not args.eval_only:
        x, st, ob = render_pairs(TRAIN_SEEDS)
        print(f"rendered {len(x)} training images in {time.time() - t0:.0f}s", flush=True)
        style_clf = train_one("style", x, st, args.seed)
        object_clf = train_one("object", x, ob, args.seed + 1)
        save_classifiers(style_clf, object_clf, args.out,
                         metadata={"train_seeds": f"{TRAIN_SEEDS.start}-{TRAIN_SEEDS.stop - 1}",
                                   "epochs": str(EPOCHS), "seed": str(args.seed)})
        print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); {time.time() - t0:.0f}s", flush=True)
    style_clf, object_clf = load_classifiers(args.out)  # evaluate what was shipped (fp16 round trip)

    results = {}
    xh, sh, oh = render_pairs(HELDOUT_SEEDS)
    results["real_heldout"] = report("real held-out", xh, sh, oh, style_clf, object_clf)

    from spare_core.minicanvas.model import MODEL_FILE, load

    model_path = args.model or MODEL_FILE
    if model_path.exists():
        model = load(model_path)
        t1 = time.time()
        xg, sg, og = generate_eval_set(model, args.gen_seeds)
        print(f"generated {len(xg)} images in {time.time() - t1:.0f}s", flush=True)
        results["generated"] = report("generated", xg, sg, og, style_clf, object_clf)
        WORK.mkdir(exist_ok=True)
        # the misjudged generations, for inspection
        wrong = ((predict(style_clf, xg) != sg) | (predict(object_clf, xg) != og)).nonzero().flatten()
        if len(wrong):
            data.grid_image(xg[wrong[:64]], 8, scale=4).save(WORK / "misjudged_generations.png")
            print("misjudged (style, object):",
                  [(data.STYLE_NAMES[sg[i]], data.OBJECT_NAMES[og[i]]) for i in wrong[:30].tolist()])
    else:
        print(f"no diffusion weights at {model_path}: generation accuracy not measured")
    WORK.mkdir(exist_ok=True)
    (WORK / "classifier_report.json").write_text(json.dumps(results, indent=1))
    print(f"done in {time.time() - t0:.0f}s; report -> {WORK / 'classifier_report.json'}")


if __name__ == "__main__":
    main()
