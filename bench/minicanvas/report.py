"""Turn results.json (harness) and curve.json (curve.py) into bench/RESULTS.md and bench/results.png.

    python -m bench.minicanvas.report --results results.json --curve curve.json

Plot (Pillow, no matplotlib): left, UA vs mean retention ((IRA + CRA) / 2) per method, styles and objects averaged;
right, mean UA vs training steps for the timestep profile and uniform timesteps.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

NOT_AS_PUBLISHED = ("uce-pool",)  # diagnostic variants shown in the table, never a target's reference
COLOURS = [(230, 90, 50), (250, 200, 60), (120, 200, 90), (80, 170, 255), (180, 120, 255), (255, 120, 200),
           (160, 160, 160), (90, 220, 220), (255, 255, 255)]


def _ci(row: dict, key: str) -> str:
    c = row.get("ci", {}).get(key)
    return f"{row[key]:.1f} [{c['lo']:.1f}, {c['hi']:.1f}]" if c else f"{row[key]:.2f}"


def _pair(row: dict, a: str, b: str) -> str:
    """'a / b' means, e.g. unlisted IRA / CRA; '–' when not measured."""
    return f"{row[a]:.1f} / {row[b]:.1f}" if a in row and b in row else "–"


def _mean_ci(m: dict, key: str) -> str:
    v = m.get(key)
    return f"{v['mean']:.1f} [{v['lo']:.1f}, {v['hi']:.1f}]" if isinstance(v, dict) else "–"


def table(results: dict) -> str:
    """Main table: per method and domain, mean [95% bootstrap interval over concepts and training seeds]."""
    base = results["base"]
    retain_set = results.get("budget", {}).get("retain_set", "all-pairs")
    lines = ["| method | style UA | style SFA | style IRA / CRA unlisted | style IRA / CRA listed | style syn-UA | "
             "object UA | object SFA | object IRA / CRA unlisted | object IRA / CRA listed | object syn-UA | "
             "mean(UA, unlisted IRA, unlisted CRA, SFA) | mean(UA, IRA, CRA) | erased / clean | training seeds | "
             "s / concept | LoRA / delta bytes |", "|" + "---|" * 17]
    for name, m in results["methods"].items():
        cells = [name + (" (reference: told to keep every pair)" if name == "spare-all-pairs" else "")]
        for d in ("style", "object"):
            row = m.get(d)
            if not row:
                cells += ["–"] * 5
                continue
            cells += [_ci(row, "UA"), _ci(row, "SFA"), _pair(row, "IRA_unlisted", "CRA_unlisted"),
                      _pair(row, "IRA_listed", "CRA_listed") if "IRA_listed" in row else _pair(row, "IRA", "CRA"),
                      _ci(row, "synonym_UA")]
        cells.append(_mean_ci(m, "mean4"))
        mean3 = m.get("mean3")
        cells.append(f"{mean3['mean']:.1f} [{mean3['lo']:.1f}, {mean3['hi']:.1f}]" if isinstance(mean3, dict)
                     else f"{_mean3(m):.2f}")
        cells.append(f"{m.get('erased', '?')} / {m.get('clean', '?')} of {m.get('concepts', '?')}")
        cells.append(str(m.get("seeds", "?")))
        cells += [f"{m['seconds_per_concept']:.1f}", f"{m['lora_bytes']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ceiling = []
    for d in ("style", "object"):
        if isinstance(base.get(d), dict):
            ceiling.append(f"{d}: IRA {base[d]['IRA']:.1f}, CRA {base[d]['CRA']:.1f}, SFA {base[d].get('SFA', 0):.1f}")
    unl = []
    for d in ("style", "object"):
        rows = [m[d] for m in results["methods"].values() if m.get(d) and "base_IRA_unlisted" in m[d]]
        if rows:
            unl.append(f"{d} {rows[0]['base_IRA_unlisted']:.1f} / {rows[0]['base_CRA_unlisted']:.1f}")
    lines.append("")
    lines.append(
        f"Retain list of every method: `{retain_set}` (bench/minicanvas/budgets.py, concept_prompts); \"unlisted\" "
        "= the classes of the erased concept's domain that no prompt any method saw names, \"listed\" = those it "
        "names (all of them for all-pairs). Unerased model on the same held-out grid: style accuracy "
        f"{base['style_acc']:.1f}%, object accuracy {base['object_acc']:.1f}%; its figures for the same concepts (the "
        "ceiling): " + "; ".join(ceiling) + (("; unlisted IRA / CRA " + ", ".join(unl)) if unl else "") + ". "
        "SFA (surrogate fidelity, ours): the other domain's accuracy inside the erased row/column (the object drawn "
        f"in an erased style). Erased = mean UA over training seeds >= 90; clean = UA >= 95, IRA and CRA within 2 "
        "points of the unerased model, unlisted IRA and CRA within 3, SFA within 10.")
    return "\n".join(lines)


def compact_table(results: dict) -> str:
    """The README's table: per method, styles and objects averaged where both ran -- UA, SFA of the styles, IRA / CRA
    on the listed and on the unlisted classes, each mean [95% interval over concepts and training seeds]; the unerased
    model's figures on the same classes in the last row."""
    def cell(m, d, k):
        row = m.get(d) or {}
        return _ci(row, k) if k in row else "–"

    lines = ["| method | style UA | object UA | SFA (styles) | IRA / CRA, listed classes (style; object) | "
             "IRA / CRA, unlisted classes (style; object) |", "|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        pairs = [f"{_pair(m[d], a, b)}" for d in ("style", "object") if m.get(d)
                 for a, b in [(("IRA_listed", "CRA_listed") if "IRA_listed" in m[d] else ("IRA", "CRA"))]]
        unl = [_pair(m[d], "IRA_unlisted", "CRA_unlisted") for d in ("style", "object") if m.get(d)]
        lines.append(f"| {name} | {cell(m, 'style', 'UA')} | {cell(m, 'object', 'UA')} | {cell(m, 'style', 'SFA')} | "
                     f"{'; '.join(pairs)} | {'; '.join(unl)} |")
    # the unerased model on the same classes (each run stores it for its own split): mean over the first method's runs
    runs = next(iter(results["methods"].values())).get("runs", [])
    cells = {}
    for part in ("listed", "unlisted"):
        doms = []
        for d in ("style", "object"):
            rs = [r for r in runs if r["domain"] == d and f"base_IRA_{part}" in r]
            if rs:
                doms.append(f"{sum(r[f'base_IRA_{part}'] for r in rs) / len(rs):.1f} / "
                            f"{sum(r[f'base_CRA_{part}'] for r in rs) / len(rs):.1f}")
        cells[part] = "; ".join(doms) or "–"
    sfa = results["base"].get("style", {}).get("SFA")
    lines.append(f"| unerased model | 0 | 0 | {'–' if sfa is None else f'{sfa:.1f}'} | {cells['listed']} | "
                 f"{cells['unlisted']} |")
    return "\n".join(ln for ln in lines if ln)


def per_concept_table(results: dict, methods=None) -> str:
    """Per concept (mean over training seeds; min UA over seeds) for each method: UA (min) / SFA / IRA / CRA on the
    classes no retain list named where the file has the listed / unlisted split, else UA (min) / IRA / CRA."""
    ms = {n: m for n, m in results["methods"].items() if m.get("per_concept") and (methods is None or n in methods)}
    if not ms:
        return ""
    names = list(next(iter(ms.values()))["per_concept"])
    for m in ms.values():
        names += [c for c in m["per_concept"] if c not in names]
    split = any("IRA_unlisted" in p for m in ms.values() for p in m["per_concept"].values())
    base = results["base"].get("per_concept", {})
    if split:  # every method shares the split (drawn per concept and training seed), so one method's ceiling serves
        base = {c: {"IRA": p["base_IRA_unlisted"], "CRA": p["base_CRA_unlisted"]}
                for m in reversed(list(ms.values())) for c, p in m["per_concept"].items() if "base_IRA_unlisted" in p}
    what = "UA (min) / SFA / unlisted IRA / CRA" if split else "UA (min) / IRA / CRA"
    head = f"| concept | unerased {'unlisted ' if split else ''}IRA / CRA | " + \
        " | ".join(f"{n} {what}" for n in ms) + " |"
    lines = [head, "|" + "---|" * (2 + len(ms))]
    for c in names:
        b = base.get(c)
        cells = [c, f"{b['IRA']:.0f} / {b['CRA']:.0f}" if b else "–"]
        for m in ms.values():
            p = m["per_concept"].get(c)
            if not p:
                cells.append("–")
            elif split:
                cells.append(f"{p['UA']:.0f} ({p['UA_min']:.0f}) / {p['SFA']:.0f} / {p['IRA_unlisted']:.0f} / "
                             f"{p['CRA_unlisted']:.0f}")
            else:
                cells.append(f"{p['UA']:.0f} ({p['UA_min']:.0f}) / {p['IRA']:.0f} / {p['CRA']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean3(row: dict) -> float:
    if isinstance(row.get("mean3"), dict):
        return row["mean3"]["mean"]
    doms = [row[d] for d in ("style", "object") if row.get(d)]
    return sum(r["UA"] + r["IRA"] + r["CRA"] for r in doms) / (3 * len(doms))


def _mean4(row: dict):
    v = row.get("mean4")
    return v["mean"] if isinstance(v, dict) else None


def _listed_ceiling(method: dict, domain: str, key: str):
    """The unerased model's accuracy on the classes the retain lists named (mean over the method's runs of the
    domain), or None where the file has no listed / unlisted split."""
    if f"{key}_listed" not in method.get(domain, {}):
        return None
    vals = [r[f"base_{key}_listed"] for r in method.get("runs", ())
            if r.get("domain") == domain and r.get(f"base_{key}_listed") is not None]
    return sum(vals) / len(vals) if vals else None


FLOAT_SLACK = 1e-4  # targets(): float32 rounding of a stored percentage, far below one image in any grid


def targets(results: dict, timing: Optional[dict] = None) -> str:
    """SPARE's targets, each marked met / missed with the gap (computed, never hand-written): the erasure targets
    (UA, every concept, synonyms), surrogate fidelity, retention on the unlisted and the listed classes, the four-way
    mean against every baseline and the time. `timing`: a results file (load_results) of one run with both spare
    and ESD, read for the time ratio where the table's spare and ESD rows come from different runs."""
    methods, base = results["methods"], results["base"]
    sp = methods.get("spare")
    if not sp:
        return "SPARE was not run: no target can be checked."
    lines = ["| target | value | met? |", "|---|---|---|"]

    def row(name, value, ok, gap=""):
        gap = "< 0.01" if gap == "0.00" else gap  # missed by less than the rounding shows (e.g. 98.998 vs 99)
        miss = f" ({gap})" if gap.endswith("over") else f" (short by {gap})" if gap else ""
        lines.append(f"| {name} | {value} | {'yes' if ok else 'NO' + miss} |")

    def at_least(value, target):  # accuracies are image counts over totals, stored from float32: 19 of 20 reads
        return value >= target - FLOAT_SLACK  # 94.9999988, which is 95

    doms = [d for d in ("style", "object") if sp.get(d)]
    ua = sum(sp[d]["UA"] for d in doms) / len(doms)
    row("mean UA >= 99", f"{ua:.2f}", at_least(ua, 99.0), f"{99.0 - ua:.2f}")
    per = sp.get("per_concept")
    if per:
        worst = min(per, key=lambda c: per[c]["UA"])
        row("every concept UA >= 95 (mean over training seeds)", f"lowest: {worst} {per[worst]['UA']:.1f}",
            at_least(per[worst]["UA"], 95.0), f"{95.0 - per[worst]['UA']:.2f}")
    if sp.get("style"):
        sfa = sp["style"]["SFA"]
        row("style SFA >= 85 (object kept inside an erased style's row)", f"{sfa:.2f}", at_least(sfa, 85.0),
            f"{85.0 - sfa:.2f}")
    for d in doms:
        r = sp[d]
        row(f"{d} synonym UA >= 95", f"{r['synonym_UA']:.2f}", at_least(r["synonym_UA"], 95.0),
            f"{95.0 - r['synonym_UA']:.2f}")
        for k in ("IRA", "CRA"):
            if f"{k}_unlisted" in r:
                drop = r[f"base_{k}_unlisted"] - r[f"{k}_unlisted"]
                row(f"{d} unlisted {k} within 3 of the unerased model ({r[f'base_{k}_unlisted']:.2f})",
                    f"{r[f'{k}_unlisted']:.2f}", at_least(3.0, drop), f"{drop - 3.0:.2f}")
            listed = _listed_ceiling(sp, d, k)
            if listed is not None:  # the classes the retain list named: kept as well as before the split
                drop = listed - r[f"{k}_listed"]
                row(f"{d} listed {k} within 1.5 of the unerased model ({listed:.2f})", f"{r[f'{k}_listed']:.2f}",
                    at_least(1.5, drop), f"{drop - 1.5:.2f}")
            elif isinstance(base.get(d), dict):  # a results file from before the listed / unlisted split
                ceiling = base[d]
                drop = ceiling[k] - r[k]
                row(f"{d} {k} (every class) within 1.5 of the unerased model ({ceiling[k]:.2f})", f"{r[k]:.2f}",
                    at_least(1.5, drop), f"{drop - 1.5:.2f}")
    if per and any("IRA_unlisted_drop" in p for p in per.values()):
        worst = max(per, key=lambda c: max(per[c].get("IRA_unlisted_drop", 0), per[c].get("CRA_unlisted_drop", 0)))
        w = max(per[worst].get("IRA_unlisted_drop", 0), per[worst].get("CRA_unlisted_drop", 0))
        row("no concept's unlisted IRA / CRA more than 8 below the unerased model's", f"worst: {worst} -{w:.1f}",
            at_least(8.0, w), f"{w - 8.0:.1f} over")
    mine = _mean4(sp)
    if mine is not None:
        others = {n: _mean4(m) for n, m in methods.items() if not n.startswith("spare") and _mean4(m) is not None}
        if others:
            best = max(others, key=others.get)
            row(f"mean(UA, unlisted IRA, unlisted CRA, SFA) above every baseline (best: {best} {others[best]:.2f})",
                f"{mine:.2f}", mine > others[best], f"{others[best] - mine:.2f}")
    for esd in ("esd-x", "esd-u"):
        e = methods.get(esd)
        if not e:
            continue
        budget = e.get("budget") or results.get("budget", {})  # its own run's (merged files: load_results)
        # ESD's time is linear in its steps: compare with ESD at the paper's 1000 steps
        esd_secs = e["seconds_per_concept"] * 1000 / max(1, budget.get("esd", 1000))
        ratio = sp["seconds_per_concept"] / esd_secs
        name = (f"time per concept <= 1/10 of {esd} at 1000 steps ({esd_secs:.1f} s, from {budget.get('esd', 1000)} "
                "steps)")
        if sp.get("source", "") != e.get("source", ""):  # other runs, other loads on the CPU: no ratio from them
            t_sp, t_e = ((timing or {}).get("methods", {}).get(m) for m in ("spare", esd))
            if not (t_sp and t_e and t_sp.get("source", "") == t_e.get("source", "")):
                lines.append(f"| {name} | not compared: SPARE ({sp['seconds_per_concept']:.1f} s) and {esd} ran in "
                             f"other runs ({sp['source']}; {e['source']}) | measure both in one run |")
                continue
            t_budget = t_e.get("budget") or timing.get("budget", {})
            t_esd = t_e["seconds_per_concept"] * 1000 / max(1, t_budget.get("esd", 1000))
            ratio = t_sp["seconds_per_concept"] / t_esd
            name = (f"time per concept <= 1/10 of {esd} at 1000 steps ({t_esd:.1f} s, from {t_budget.get('esd', 1000)} "
                    f"steps; both measured in one run, {t_sp['source']}: "
                    f"{len({r.get('concept') for r in t_sp.get('runs', [])})} concepts)")
            sp_secs = t_sp["seconds_per_concept"]
        else:
            sp_secs = sp["seconds_per_concept"]
        row(name, f"{sp_secs:.1f} s ({ratio:.3f}x)", ratio <= 0.1, f"{100 * (ratio / 0.1 - 1):.0f}% over")
    return "\n".join(lines)


PLOT_BARS = (("UA", "UA (erased)"), ("SFA", "SFA (styles: object kept)"),
             ("IRA_unlisted", "unlisted IRA"), ("CRA_unlisted", "unlisted CRA"), ("IRA_listed", "listed IRA"))


def bar_values(m: dict) -> dict:
    """The plotted figures of one method: means over styles and objects, SFA of the styles only (an erased object's
    column keeps its style in every method)."""
    doms = [m[k] for k in ("style", "object") if m.get(k)]
    out = {}
    for key, _ in PLOT_BARS:
        src = [m["style"]] if key == "SFA" and m.get("style") else doms
        vals = [r[key] for r in src if r.get(key) is not None]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def bar_ceiling(results: dict, m: dict, key: str):
    """The unerased model's figure for a bar (same classes, same grid), or None (UA has none)."""
    doms = [d for d in ("style", "object") if m.get(d)]
    if key == "SFA":
        return results.get("base", {}).get("style", {}).get("SFA")
    if key.endswith("_unlisted"):
        vals = [m[d].get(f"base_{key}") for d in doms]
    elif key.endswith("_listed"):
        vals = [_listed_ceiling(m, d, key[:-len("_listed")]) for d in doms]
    else:
        return None
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def plot(results: dict, curve: dict | None, path: str) -> None:
    """One labelled bar group per method (0-100 %, the unerased model's figure as a white tick where known); with a
    curve.json, the UA-vs-steps curve below."""
    font = ImageFont.load_default()
    methods = list(results["methods"].items())
    bar_h, gap, left, right = 12, 18, 230, 940
    group_h = len(PLOT_BARS) * bar_h + gap
    h = 70 + len(methods) * group_h + (300 if curve else 0)
    img = Image.new("RGB", (1000, h), (24, 24, 28))
    d = ImageDraw.Draw(img)
    d.text((10, 8), "Erase one concept, judged on held-out prompts (mean over concepts and training seeds; "
           "white tick = the unerased model)", fill=(230, 230, 230), font=font)
    for j, (key, label) in enumerate(PLOT_BARS):
        d.rectangle([10 + 190 * j, 28, 20 + 190 * j, 38], fill=COLOURS[j % len(COLOURS)])
        d.text((24 + 190 * j, 27), label, fill=(230, 230, 230), font=font)
    top = 56
    for pct in range(0, 101, 20):
        x = left + (right - left) * pct / 100
        d.line([x, top - 4, x, top + len(methods) * group_h - gap], fill=(60, 60, 70))
        d.text((x - 8, top + len(methods) * group_h - gap + 2), f"{pct}%", fill=(180, 180, 180), font=font)
    base = results.get("base", {})
    for i, (name, m) in enumerate(methods):
        y0 = top + i * group_h
        d.text((10, y0 + 2 * bar_h), name, fill=(230, 230, 230), font=font)
        vals = bar_values(m)
        for j, (key, _) in enumerate(PLOT_BARS):
            if key not in vals:
                continue
            y = y0 + j * bar_h
            x = left + (right - left) * vals[key] / 100
            d.rectangle([left, y + 1, x, y + bar_h - 2], fill=COLOURS[j % len(COLOURS)])
            d.text((x + 4, y), f"{vals[key]:.1f}", fill=(230, 230, 230), font=font)
            ceiling = bar_ceiling(results, m, key)
            if ceiling is not None:
                cx = left + (right - left) * ceiling / 100
                d.line([cx, y, cx, y + bar_h - 1], fill=(255, 255, 255), width=2)
    if curve:
        box = (60, h - 270, 940, h - 30)
        d.rectangle(box, outline=(70, 70, 80))
        d.text((60, h - 290), "mean UA vs training steps: profile (orange) / uniform (blue)", fill=(230, 230, 230),
               font=font)
        series = {}
        for per in curve["concepts"].values():
            for method, pts in per.items():
                for p in pts:
                    series.setdefault(method, {}).setdefault(p["steps"], []).append(p["UA"])
        steps = sorted({s for v in series.values() for s in v})
        for method, colour in (("spare", (255, 140, 40)), ("spare-uniform-t", (80, 170, 255))):
            pts = []
            for j, s in enumerate(steps):
                vals = series.get(method, {}).get(s)
                if vals:
                    x = box[0] + (box[2] - box[0]) * (j + 0.5) / len(steps)
                    y = box[3] - (box[3] - box[1]) * (sum(vals) / len(vals)) / 100
                    pts.append((x, y))
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
        for j, s in enumerate(steps):
            d.text((box[0] + (box[2] - box[0]) * (j + 0.5) / len(steps) - 8, box[3] + 5), f"{s} steps",
                   fill=(230, 230, 230), font=font)
    img.save(path)


def curve_table(curve: dict) -> str:
    lines = ["| concept | steps | UA profile | UA uniform |", "|---|---|---|---|"]
    for name, per in curve["concepts"].items():
        for a, b in zip(per["spare"], per["spare-uniform-t"]):
            lines.append(f"| {name} | {a['steps']} | {a['UA']:.2f} | {b['UA']:.2f} |")
    return "\n".join(lines)


SEED_FIELDS = ("train_seeds", "first_train_seed", "baseline_seeds", "closed_form_seeds")  # may differ when pooling


def pool_runs(name: str, row: dict, other: dict, base: dict) -> dict:
    """One method's row from two files whose runs are other training seeds of the same experiment (e.g. seed 0 in
    one, `--first-train-seed 1 --train-seeds 2` in the other): every run of both, summarised anew. Refused when
    the two ran with other budgets (steps, retain set, options: anything but the seed counts)."""
    from .budgets import Budget  # imports torch: only when pooling
    from .summary import DERIVED_KEYS, summarize

    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in Budget().__dict__.items()}

    def budget(r):  # a field the harness did not have yet when a file was written ran at its default
        return {k: v for k, v in {**defaults, **r["budget"]}.items() if k not in SEED_FIELDS}
    if budget(row) != budget(other):
        diff = sorted(k for k in set(budget(row)) | set(budget(other)) if budget(row).get(k) != budget(other).get(k))
        raise ValueError(f"method {name!r}: its runs in the two files had other budgets ({', '.join(diff)}); only "
                         "runs of the same experiment at other training seeds pool")
    # what summarize derives from a run is derived anew (left in, it would enter the per-domain means as a fresh
    # run's do not)
    runs = [{k: v for k, v in r.items() if k not in DERIVED_KEYS} for r in row["runs"] + other["runs"]]
    pooled = summarize({name: runs}, {k: base[k] for k in ("style_acc", "object_acc")}, base["per_concept"],
                       argparse.Namespace(**row["budget"]))["methods"][name]
    pooled["budget"] = dict(row["budget"], train_seeds=pooled["seeds"], first_train_seed=min(r["seed"] for r in runs))
    pooled["source"] = f"{row['source']} + {other['source']}"
    return pooled


def load_results(paths: str) -> dict:
    """One results file, or several ("a.json,b.json": runs of the same model and grid, e.g. SPARE at 3 training seeds
    in one and the baselines in another) merged: every method of every file, the first file's base and meta, the
    commands and wall times of all. A method in two files: the first wins where the later one ran none but the same
    (concept, training seed) pairs; where they ran disjoint training seeds of the same experiment their runs are
    pooled (`pool_runs`); other overlaps are refused. Files whose unerased model scored differently (another model,
    grid or sampler) are refused. Each method keeps its own run's budget (row["budget"]) and the run it came from
    (row["source"]: the file, unless a merged file names it), so that times are compared within one run only
    (`targets`)."""
    merged = None
    for path in paths.split(","):
        with open(path) as f:
            results = json.load(f)
        for row in results["methods"].values():
            row.setdefault("source", path)
        if merged is None:  # every method keeps the budget of the run it came from (ESD's steps for the time ratio)
            merged = results
            for row in merged["methods"].values():
                row.setdefault("budget", results.get("budget", {}))
            continue
        if results.get("base") != merged.get("base") or \
                results["meta"].get("model", "unet") != merged["meta"].get("model", "unet"):
            raise ValueError(f"{path}: another model, grid or sampler than {paths.split(',')[0]} (its unerased "
                             "model scored differently); only runs of the same grid merge")
        for name, row in results["methods"].items():
            row = dict(row, budget=results.get("budget", {}))
            mine = merged["methods"].get(name)
            if mine is None:
                merged["methods"][name] = row
                continue
            a, b = ({(r["concept"], r["seed"]) for r in x.get("runs", [])} for x in (mine, row))
            if a & b and not b <= a:
                raise ValueError(f"{path}: method {name!r} ran {len(a & b)} of the same (concept, training seed) "
                                 f"pairs as an earlier file and {len(b - a)} others; pool only disjoint training seeds")
            if a and b and not a & b:
                merged["methods"][name] = pool_runs(name, mine, row, merged["base"])
        meta, other = merged["meta"], results["meta"]
        meta["command"] = f"{meta['command']}` + `{other['command']}"
        meta["wall_seconds"] = round(float(meta.get("wall_seconds", 0)) + float(other.get("wall_seconds", 0)), 1)
    return merged


def section(results: dict) -> str:
    """The headline table, the targets and the per-concept table of `results` as one markdown block (for a section
    of RESULTS.md other than the headline, e.g. MiniCanvas-Flux)."""
    return "\n".join([table(results), "", "Targets, computed from the table:", "", targets(results), "",
                      "Per concept (mean over training seeds):", "", per_concept_table(results)])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.report")
    ap.add_argument("--results", default="results.json",
                    help="a results file, or several of the same grid separated by commas (merged: load_results)")
    ap.add_argument("--curve")
    ap.add_argument("--md", default=os.path.join("bench", "RESULTS.md"))
    ap.add_argument("--png", default=os.path.join("bench", "results.png"))
    ap.add_argument("--notes", help="a markdown file appended verbatim (the analysis of these numbers)")
    ap.add_argument("--timing", metavar="RUN.json",
                    help="one run of spare and esd-x together: the time target's ratio where --results' spare and "
                    "esd-x rows come from different runs")
    ap.add_argument("--compact", action="store_true", help="print the README's compact table and exit")
    ap.add_argument("--section", action="store_true",
                    help="print the tables (headline, targets, per concept) as a markdown block and exit")
    ap.add_argument("--write-merged", metavar="PATH",
                    help="write the merged --results (each method with its budget and source run) to PATH, its note "
                    "naming this command, and exit")
    args = ap.parse_args(argv)
    try:
        results = load_results(args.results)
    except ValueError as e:
        ap.error(str(e))
    if args.write_merged:
        meta = results["meta"]
        said = f"Merged on {time.strftime('%Y-%m-%d')} by `python -m bench.minicanvas.report --results " \
               f"{args.results} --write-merged {args.write_merged}`."
        meta["note"] = f"{meta['note']} {said}" if meta.get("note") else said
        tmp = args.write_merged + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.write_merged)
        print(f"wrote {args.write_merged}: {', '.join(results['methods'])}")
        return
    if args.section:
        print(section(results))
        return
    if args.compact:
        print(compact_table(results))
        return
    timing = load_results(args.timing) if args.timing else None
    curve = None
    if args.curve:
        with open(args.curve) as f:
            curve = json.load(f)
    plot(results, curve, args.png)
    meta = results["meta"]
    text = [f"# MiniCanvas results\n", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
            f"- command: `{meta['command']}` ({meta.get('wall_seconds', '?')} s)",
            f"- images per grid pair: {meta['seeds']}; "
            f"training seeds: {meta.get('train_seeds', 1)}; evaluation templates (held out): "
            f"{meta.get('eval_templates', 'the training template (before 2026-11-28)')}",
            "", table(results), "", "## Targets, computed from the table", "", targets(results, timing), "",
            "## Per concept (mean over training seeds)", "", per_concept_table(results), "",
            f"![results]({os.path.basename(args.png)})", ""]
    if curve:
        text += ["## Timestep profile vs uniform timesteps", "", f"`{curve['meta']['command']}` "
                 f"({curve['meta']['date']}, {curve['meta']['seeds']} seeds)", "", curve_table(curve), ""]
    if meta.get("note"):
        text.insert(5, f"- note: {meta['note']}")
    if args.notes:
        with open(args.notes) as f:
            text += ["", f.read()]
    tmp = args.md + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(text))
    os.replace(tmp, args.md)
    print(f"wrote {args.md} and {args.png}")


if __name__ == "__main__":
    main()
