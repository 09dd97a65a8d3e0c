"""The MiniCanvas demo: erase one named concept from the bundled model with SPARE at the product's defaults, write the
LoRA and a labelled before/after picture, and print the measured verdict.

    python -m bench.minicanvas.demo --concept ukiyo --out out/demo

The picture: two grids side by side, BEFORE (left) and AFTER (right) the erasure, same prompts and seeds. Rows are
the styles, columns the objects (labelled); the erased style's row (or object's column) is outlined in red. The
prompts use templates the erasure did not train on. Everything outside the outline should look the same before and
after; inside it the concept should be gone (the neutral style / object drawn instead). The SURROGATE row (a style
concept: under the AFTER grid) or column (an object: right of it) is what "drawn instead" should look like: the
unerased model drawing the surrogate prompt ('plain' style / 'blob' object) for the same objects / styles, templates
and seeds as the erased row / column.

The verdict is measured, never assumed, against the unerased model: UA (share of the erased row/column the classifier no
longer recognises as the concept), SFA (surrogate fidelity: the object still recognised inside an erased style's row, or
the style inside an erased object's column -- replaced, not destroyed; judged against the green surrogate row's own
share, what a perfect replacement scores, where that is lower than the unerased model's), IRA and CRA (the other
rows/columns still recognised), also on the "unlisted" classes: the retain list names half of the other classes (the
benchmark's default list), and the other half shows what happens to concepts nobody listed. Below UA 90 the demo says
NOT erased.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import spare_core as sc
from spare_core.minicanvas import data
from spare_core.minicanvas.model import load as load_model

from .budgets import EVAL_TEMPLATES, ERASABLE_OBJECTS, ERASABLE_STYLES, Budget, retention_split
from .judge import (CLEAN_DROP, CLEAN_SFA_DROP, CLEAN_UNLISTED_DROP, ERASED_UA, Judge, evaluate, grid,
                    split_metrics)
from .methods import generate, run_method, sample_edited

CELL_SCALE = 2          # nearest-neighbour upscale of each 32 px image
LABEL_W, LABEL_H = 70, 46


def verdict(domain: str, concept: str, m: dict, base: dict, surrogate_sfa: float | None = None) -> str:
    """The demo's conclusion, from the measurement only: erased or not (UA), replaced by the surrogate or destroyed
    (SFA: the other domain still drawn inside the erased row/column), and other concepts kept -- on the classes the
    retain list did not name (unlisted) when there are such, else on all of them. `surrogate_sfa`: the same share in
    the unerased model's drawing of the surrogate prompt for the same cells (surrogate_fidelity) -- what a perfect
    replacement scores, and the reference when it is below the unerased model's SFA ('plain' draws faint shapes that
    the classifier misses in about a fifth of the images)."""
    if m["UA"] < ERASED_UA:
        head = f"NOT erased: {domain} '{concept}' is still recognised in {100 - m['UA']:.0f}% of its images (UA " \
               f"{m['UA']:.0f} < {ERASED_UA:.0f})"
    else:
        head = f"erased {domain} '{concept}' (UA {m['UA']:.0f})"
    inside = "object" if domain == "style" else "style"
    # where the concept is still drawn, nothing was drawn "in its place": SFA then says only whether the other
    # domain survived the attempt
    drawn = "still drawn in its place" if m["UA"] >= ERASED_UA else "still drawn"
    surrogate = NEUTRAL[domain]
    ref = base["SFA"] if surrogate_sfa is None else min(base["SFA"], surrogate_sfa)
    refs = f"{base['SFA']:.0f} unerased" if surrogate_sfa is None else \
        f"{surrogate_sfa:.0f} in the unerased model's own '{surrogate}' {'row' if domain == 'style' else 'column'}, " \
        f"{base['SFA']:.0f} in the concept's"
    # drops rounded to 1e-3: the metrics are shares of image counts stored as float32 (89.9999988 vs 100.0 is a
    # drop of 10, exactly the line)
    if round(ref - m["SFA"], 3) > CLEAN_SFA_DROP:
        middle = f"but the {inside} is lost with it (SFA {m['SFA']:.0f} vs {refs})"
    elif surrogate_sfa is None:
        middle = f"the {inside} is {drawn} (SFA {m['SFA']:.0f})"
    else:
        middle = f"the {inside} is {drawn}, as '{surrogate}' draws it (SFA {m['SFA']:.0f} vs {refs})"
    keys, line, where = ("IRA", "CRA"), CLEAN_DROP, ""
    if "IRA_unlisted" in m and "IRA_unlisted" in base:
        keys, line = ("IRA_unlisted", "CRA_unlisted"), CLEAN_UNLISTED_DROP
        where = " the retain list did not name"
    damage = round(max(base[k] - m[k] for k in keys), 3)
    tail = f"other concepts{where} kept" if damage <= line else \
        f"collateral damage on the concepts{where}: IRA {m[keys[0]]:.1f} vs {base[keys[0]]:.1f}, CRA " \
        f"{m[keys[1]]:.1f} vs {base[keys[1]]:.1f} unerased"
    return f"{head}; {middle}; {tail}"


NEUTRAL = {"style": data.NEUTRAL_STYLE, "object": data.NEUTRAL_OBJECT}  # each domain's surrogate word


def surrogate_fidelity(judge, images: torch.Tensor, domain: str) -> float:
    """SFA of the unerased model's surrogate row / column (images drawn from surrogate_prompts): the share of its
    images in which the other domain's classifier recognises the cell's object (a style concept) or style (an object
    concept)."""
    n = len(ERASABLE_OBJECTS) if domain == "style" else len(ERASABLE_STYLES)
    other = judge(images)["object" if domain == "style" else "style"]
    truth = torch.tensor([data.object_index(ERASABLE_OBJECTS[k]) if domain == "style"
                          else data.style_index(ERASABLE_STYLES[k]) for k in range(n)])
    return 100.0 * (other == truth).float().mean().item()


def surrogate_prompts(domain: str, target_index: int) -> tuple[list[str], list[int]]:
    """The erased row's (style) / column's (object) grid prompts (grid: same templates and seeds) with the
    concept replaced by the neutral one ('plain' style / 'blob' object): what that row should look like after a clean
    erasure."""
    templates, n_o = EVAL_TEMPLATES, len(ERASABLE_OBJECTS)
    if domain == "style":
        cells = [(target_index, oi) for oi in range(n_o)]
    else:
        cells = [(si, target_index) for si in range(len(ERASABLE_STYLES))]
    prompts, seeds = [], []
    for si, oi in cells:
        style = data.NEUTRAL_STYLE if domain == "style" else ERASABLE_STYLES[si]
        obj = data.NEUTRAL_OBJECT if domain == "object" else ERASABLE_OBJECTS[oi]
        prompts.append(data.prompt(style, obj, templates[(si + oi) % len(templates)]))
        seeds.append(10_000 + 100 * (si * n_o + oi))
    return prompts, seeds


def labelled_grid(before: torch.Tensor, after: torch.Tensor, domain: str, target_index: int, title: str,
                  surrogate: torch.Tensor | None = None):
    """PIL image: BEFORE | AFTER grids (rows = styles, columns = objects), erased row/column outlined; with
    `surrogate` (the unerased model on surrogate_prompts), a SURROGATE row under AFTER (a style) or column right of
    it (an object), outlined in green."""
    from PIL import Image, ImageDraw, ImageFont

    n_s, n_o = len(ERASABLE_STYLES), len(ERASABLE_OBJECTS)
    size = before.shape[-1] * CELL_SCALE
    pad = 2
    grid_w, grid_h = n_o * (size + pad), n_s * (size + pad)
    gap = 24
    extra_w = extra_h = 0
    if surrogate is not None:
        if domain == "style":
            extra_h = gap + size + pad + 16
        else:
            extra_w, extra_h = gap + size + pad + 30, 14
    width = LABEL_W + 2 * grid_w + gap + 10 + extra_w
    height = LABEL_H + 22 + grid_h + 10 + extra_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def tile(img):
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        return Image.fromarray(arr).resize((size, size), Image.NEAREST)

    draw.text((6, 4), title, fill=(0, 0, 0), font=font)
    top = LABEL_H + 22
    for g, (images, label) in enumerate(((before, "BEFORE"), (after, "AFTER"))):
        x0 = LABEL_W + g * (grid_w + gap)
        draw.text((x0 + grid_w // 2 - 18, 20), label, fill=(0, 0, 0), font=font)
        for oi, o in enumerate(ERASABLE_OBJECTS):
            draw.text((x0 + oi * (size + pad) + 2, LABEL_H + 6), o[:8], fill=(60, 60, 60), font=font)
        for si in range(n_s):
            for oi in range(n_o):
                canvas.paste(tile(images[si * n_o + oi]), (x0 + oi * (size + pad), top + si * (size + pad)))
        if domain == "style":
            box = (x0 - 2, top + target_index * (size + pad) - 2, x0 + grid_w, top + (target_index + 1) * (size + pad))
        else:
            box = (x0 + target_index * (size + pad) - 2, top - 2, x0 + (target_index + 1) * (size + pad), top + grid_h)
        draw.rectangle(box, outline=(220, 0, 0), width=2)
    for si, s in enumerate(ERASABLE_STYLES):
        draw.text((4, top + si * (size + pad) + size // 2 - 5), s[:11], fill=(60, 60, 60), font=font)
    if surrogate is not None:
        green, x_after = (0, 150, 0), LABEL_W + grid_w + gap
        if domain == "style":
            y = top + grid_h + gap
            for oi in range(n_o):
                canvas.paste(tile(surrogate[oi]), (x_after + oi * (size + pad), y))
            draw.rectangle((x_after - 2, y - 2, x_after + grid_w, y + size + pad), outline=green, width=2)
            text = f"SURROGATE '{data.NEUTRAL_STYLE}': the unerased model, same objects and seeds as the red row ->"
            draw.text((x_after - 10 - draw.textlength(text, font=font), y + size // 2 - 5), text, fill=green, font=font)
            note = ("a clean erasure turns the red row in AFTER into this row; the other rows stay as in BEFORE")
            draw.text((x_after, y + size + pad + 4), note, fill=(60, 60, 60), font=font)
        else:
            x = x_after + grid_w + gap
            for si in range(n_s):
                canvas.paste(tile(surrogate[si]), (x, top + si * (size + pad)))
            draw.rectangle((x - 2, top - 2, x + size + pad, top + grid_h), outline=green, width=2)
            draw.text((x - 6, 20), "SURROGATE", fill=green, font=font)
            draw.text((x, LABEL_H + 6), f"'{data.NEUTRAL_OBJECT}'", fill=green, font=font)
            note = ("SURROGATE: the unerased model drawing the neutral object in the same styles and seeds as the "
                    "red column; a clean erasure turns the red column in AFTER into it")
            draw.text((LABEL_W, height - 12), note, fill=(60, 60, 60), font=font)
    return canvas


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="ukiyo", help=f"a style {ERASABLE_STYLES} or an object {ERASABLE_OBJECTS} "
                    "(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=Budget().spare,
                    help="SPARE's step cap (the stopping rule may end training earlier)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--out", default="out/demo", help="folder for the LoRA and the picture (created if missing)")
    ap.add_argument("--retain", choices=("half", "nearest"), default="half",
                    help="which 4 of the other classes the retain list names: half (default: 4 drawn at random, as the "
                    "benchmark's table) or nearest (the 4 that SPARE Nearest Concepts ranks nearest to the concept)")
    args = ap.parse_args(argv)
    if args.concept in ERASABLE_STYLES:
        domain = "style"
    elif args.concept in ERASABLE_OBJECTS:
        domain = "object"
    else:
        ap.error(f"unknown concept {args.concept!r}; styles: {ERASABLE_STYLES}; objects: {ERASABLE_OBJECTS}")
    if args.steps <= 0:
        ap.error(f"--steps {args.steps}: must be >= 1 (default {Budget().spare})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out!r} is an existing file; give a folder")
    torch.set_num_threads(int(os.environ.get("MINICANVAS_THREADS", "1")))  # 2 threads on 2 shared cores ran ~100x slower
    model = load_model()
    judge = Judge()
    # nearest: as the node ranks them (since 2026-12-06 on each prompt's own positions: retain set nearest-unpadded)
    retain_set = "nearest-unpadded" if args.retain == "nearest" else args.retain
    budget = Budget(spare=args.steps, seeds=1, retain_set=retain_set)
    prompts, ls, lo, seeds = grid(1)
    target = (data.style_index if domain == "style" else data.object_index)(args.concept)
    print(f"erasing {domain} '{args.concept}' with SPARE (product defaults, cap {args.steps} steps) ...", flush=True)
    t0 = time.perf_counter()
    def progress(check, adapters):  # every probe check (20 steps): a line, so a minute of training is not silent
        print(f"  step {check['step']:4d}/{args.steps}: concept->surrogate gap closed {100 * check['gap_closed']:3.0f}%"
              f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    edited, info = run_method("spare", model, domain, args.concept, budget, seed=args.seed,
                                      on_check=progress)
    print(f"trained in {time.perf_counter() - t0:.0f}s: {info['steps_used']} steps, gap closed "
          f"{100 * info['gap_closed']:.0f}%, {info['modules']} modules; judging {len(prompts)} held-out prompts "
          "before and after ...", flush=True)
    before = generate(model, prompts, seeds, budget.sample_steps)
    after = sample_edited(model, edited, prompts, seeds, budget.sample_steps)
    m, j_after = evaluate(judge, after, ls, lo, domain, target)
    b, j_before = evaluate(judge, before, ls, lo, domain, target)
    sur_prompts, sur_seeds = surrogate_prompts(domain, target)
    surrogate = generate(model, sur_prompts, sur_seeds, budget.sample_steps)
    split = retention_split(domain, args.concept, args.seed, budget.retain_set)
    m.update(split_metrics(domain, split, ls, lo, j_after["style"], j_after["object"]))
    b.update(split_metrics(domain, split, ls, lo, j_before["style"], j_before["object"]))
    sur_sfa = surrogate_fidelity(judge, surrogate, domain)
    text = verdict(domain, args.concept, m, b, sur_sfa)
    os.makedirs(args.out, exist_ok=True)
    lora_path = sc.save_lora(os.path.join(args.out, f"erase_{args.concept}.safetensors"), edited[1])
    png = os.path.join(args.out, f"before_after_{args.concept}.png")
    image = labelled_grid(before, after, domain, target, f"SPARE: {text}", surrogate)
    tmp = png + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, png)
    def unl(r):
        return f"  unlisted IRA {r['IRA_unlisted']:.1f}  CRA {r['CRA_unlisted']:.1f}" if "IRA_unlisted" in r else ""
    print(f"UA {m['UA']:.1f}  SFA {m['SFA']:.1f}  IRA {m['IRA']:.1f}  CRA {m['CRA']:.1f}{unl(m)}   (unerased: UA "
          f"{b['UA']:.1f}  SFA {b['SFA']:.1f}  IRA {b['IRA']:.1f}  CRA {b['CRA']:.1f}{unl(b)}; the surrogate "
          f"'{NEUTRAL[domain]}' itself: SFA {sur_sfa:.1f})")
    names = data.STYLE_NAMES if domain == "style" else data.OBJECT_NAMES
    print(f"retain list: {len(split['listed'])} of the other {domain}s named ("
          + ", ".join(names[i] for i in split["listed"]) + "); unlisted: "
          + (", ".join(names[i] for i in split["unlisted"]) or "none"))
    print(text)
    if info.get("warning"):
        print(f"warning: {info['warning']}")
    where = "row (under AFTER)" if domain == "style" else "column (right of AFTER)"
    print(f"wrote {lora_path} and {png} (left: before, right: after; rows = styles, columns = objects; "
          f"the erased {'row' if domain == 'style' else 'column'} outlined in red; the surrogate {where}, the "
          "unerased model's reference for it, in green)")
    return 0 if m["UA"] >= ERASED_UA else 1


if __name__ == "__main__":
    sys.exit(main())
