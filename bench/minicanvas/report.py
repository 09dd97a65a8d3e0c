"""Turn results.json (harness) and curve.json (curve.py) into bench/RESULTS.md and bench/results.png.

    python -m bench.minicanvas.report --results results.json --curve curve.json

Plot (Pillow, no matplotlib): left, UA vs mean retention ((IRA + CRA) / 2) per method, styles and objects averaged;
right, mean UA vs training steps for the timestep profile and uniform timesteps.
"""
from __future__ import annotations

import argparse
import json
import os

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(230, 90, 50), (250, 200, 60), (120, 200, 90), (80, 170, 255), (180, 120, 255), (255, 120, 200),
           (160, 160, 160), (90, 220, 220), (255, 255, 255)]


def table(results: dict) -> str:
    base = results["base"]
    lines = ["| method | style UA | style IRA | style CRA | style syn-UA | object UA | object IRA | object CRA | "
             "object syn-UA | mean(UA,IRA,CRA) | quality FD | s / concept | peak RSS MB | trainable params | "
             "LoRA / delta bytes |", "|" + "---|" * 15]
    for name, m in results["methods"].items():
        cells = [name]
        means = []
        for d in ("style", "object"):
            row = m.get(d)
            if row:
                cells += [f"{row[k]:.2f}" for k in ("UA", "IRA", "CRA", "synonym_UA")]
                means += [row["UA"], row["IRA"], row["CRA"]]
            else:
                cells += ["–"] * 4
        cells.append(f"{sum(means) / len(means):.2f}" if means else "–")
        cells += [f"{m['quality_fd']:.3f}", f"{m['seconds_per_concept']:.1f}", f"{m['peak_rss_mb']:.0f}",
                  f"{m['trainable_params']:.0f}", f"{m['lora_bytes']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ira_cra = []
    for d in ("style", "object"):
        if isinstance(base.get(d), dict):
            ira_cra.append(f"{d}: IRA {base[d]['IRA']:.2f}, CRA {base[d]['CRA']:.2f}")
    lines.append("")
    lines.append(f"Unerased model: style accuracy {base['style_acc']:.2f}%, object accuracy {base['object_acc']:.2f}% "
                 f"on the grid; its IRA/CRA for the same erased concepts (the ceiling for retention): "
                 + "; ".join(ira_cra) + ".")
    return "\n".join(lines)


def _mean3(row: dict) -> float:
    doms = [row[d] for d in ("style", "object") if row.get(d)]
    return sum(r["UA"] + r["IRA"] + r["CRA"] for r in doms) / (3 * len(doms))


def targets(results: dict) -> str:
    """The issue's targets for SPARE, each marked met / missed with the gap (computed, never hand-written)."""
    methods, base = results["methods"], results["base"]
    sp = methods.get("spare")
    if not sp:
        return "SPARE was not run: no target can be checked."
    lines = ["| target | value | met? |", "|---|---|---|"]

    def row(name, value, ok, gap=""):
        miss = f" ({gap})" if gap.endswith("over") else f" (short by {gap})" if gap else ""
        lines.append(f"| {name} | {value} | {'yes' if ok else 'NO' + miss} |")

    for d in ("style", "object"):
        r = sp.get(d)
        if not r:
            continue
        for k, goal in (("UA", 99.0), ("IRA", 97.0), ("CRA", 97.0), ("synonym_UA", 95.0)):
            row(f"{d} {k} >= {goal:g}", f"{r[k]:.2f}", r[k] >= goal, f"{goal - r[k]:.2f}")
        ceiling = base.get(d)
        if isinstance(ceiling, dict):
            for k in ("IRA", "CRA"):
                drop = ceiling[k] - r[k]
                row(f"{d} {k} within 1.5 of the unerased model ({ceiling[k]:.2f})", f"{r[k]:.2f}", drop <= 1.5,
                    f"{drop - 1.5:.2f}")
    others = {n: _mean3(m) for n, m in methods.items() if not n.startswith("spare")}
    if others:
        best = max(others, key=others.get)
        row(f"mean(UA, IRA, CRA) above every baseline (best: {best} {others[best]:.2f})", f"{_mean3(sp):.2f}",
            _mean3(sp) > others[best], f"{others[best] - _mean3(sp):.2f}")
    for esd in ("esd-x", "esd-u"):
        e = methods.get(esd)
        if not e:
            continue
        ratio = sp["seconds_per_concept"] / e["seconds_per_concept"]
        keeps = all(sp[d][k] >= e[d][k] for d in ("style", "object") if sp.get(d) and e.get(d) for k in ("IRA", "CRA"))
        row(f"time per concept <= 1/10 of {esd} ({e['seconds_per_concept']:.1f} s)",
            f"{sp['seconds_per_concept']:.1f} s ({ratio:.2f}x)", ratio <= 0.1, f"{ratio / 0.1:.1f}x over")
        row(f"IRA and CRA >= {esd}'s", "see table", keeps)
    return "\n".join(lines)


def plot(results: dict, curve: dict | None, path: str) -> None:
    w, h = 1000, 420
    img = Image.new("RGB", (w, h), (24, 24, 28))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    # left: UA vs retention
    box = (50, 40, 470, 370)
    d.rectangle(box, outline=(70, 70, 80))
    d.text((50, 8), "UA vs retention ((IRA+CRA)/2), mean of styles and objects", fill=(230, 230, 230), font=font)
    d.text((50, 380), "retention % ->  (axes 0-100)", fill=(230, 230, 230), font=font)
    d.text((4, 24), "UA %", fill=(230, 230, 230), font=font)
    for i, (name, m) in enumerate(results["methods"].items()):
        doms = [m[k] for k in ("style", "object") if m.get(k)]
        ua = sum(r["UA"] for r in doms) / len(doms)
        ret = sum((r["IRA"] + r["CRA"]) / 2 for r in doms) / len(doms)
        x = box[0] + (box[2] - box[0]) * ret / 100
        y = box[3] - (box[3] - box[1]) * ua / 100
        c = COLOURS[i % len(COLOURS)]
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        d.text((x + 6, y - 6), name, fill=c, font=font)
    # right: UA vs steps
    box = (540, 40, 980, 370)
    d.rectangle(box, outline=(70, 70, 80))
    d.text((540, 8), "mean UA vs training steps: profile (orange) / uniform (blue)", fill=(230, 230, 230), font=font)
    if curve:
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
            d.text((box[0] + (box[2] - box[0]) * (j + 0.5) / len(steps) - 8, 375), str(s), fill=(230, 230, 230),
                   font=font)
    img.save(path)


def curve_table(curve: dict) -> str:
    lines = ["| concept | steps | UA profile | UA uniform |", "|---|---|---|---|"]
    for name, per in curve["concepts"].items():
        for a, b in zip(per["spare"], per["spare-uniform-t"]):
            lines.append(f"| {name} | {a['steps']} | {a['UA']:.2f} | {b['UA']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.report")
    ap.add_argument("--results", default="results.json")
    ap.add_argument("--curve")
    ap.add_argument("--md", default=os.path.join("bench", "RESULTS.md"))
    ap.add_argument("--png", default=os.path.join("bench", "results.png"))
    ap.add_argument("--notes", help="a markdown file appended verbatim (the analysis of these numbers)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    curve = None
    if args.curve:
        with open(args.curve) as f:
            curve = json.load(f)
    plot(results, curve, args.png)
    meta = results["meta"]
    text = [f"# MiniCanvas results\n", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
            f"- command: `{meta['command']}` ({meta.get('wall_seconds', '?')} s)", f"- seeds per prompt: {meta['seeds']}",
            "", table(results), "", "## Targets (issue 3), computed from the table", "", targets(results), "",
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
