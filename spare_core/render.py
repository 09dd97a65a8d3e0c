"""Pictures for node outputs: saliency heatmap, timestep profile, loss curve.

Drawn with Pillow (a ComfyUI dependency) instead of matplotlib, which ComfyUI does not ship.
Every function returns float32 numpy [H, W, 3] in [0, 1] (one ComfyUI IMAGE frame without the batch axis).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BG, FG, GRID, ACCENT, SECOND = (24, 24, 28), (230, 230, 230), (70, 70, 80), (255, 140, 40), (80, 170, 255)


def _font():
    return ImageFont.load_default()


def _to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _heat(v: float) -> tuple[int, int, int]:
    """0..1 -> dark blue .. yellow (a perceptually ordered ramp, hand-rolled to avoid matplotlib)."""
    v = min(max(v, 0.0), 1.0)
    stops = [(0.0, (30, 30, 90)), (0.35, (120, 40, 140)), (0.7, (230, 90, 50)), (1.0, (250, 230, 80))]
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if v <= b:
            f = (v - a) / (b - a)
            return tuple(int(ca[i] + f * (cb[i] - ca[i])) for i in range(3))
    return stops[-1][1]


def block_of(path: str) -> str:
    """Group a module path by block, e.g. 'input_blocks.4.1.transformer_blocks.0.attn2.to_k' -> 'input_blocks.4'."""
    parts = path.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def saliency_heatmap(scores: dict[str, float], selected: Sequence[str], title: str = "") -> np.ndarray:
    """One row per block, one cell per module (in network order), colour = score rank; selected cells outlined."""
    rows: "OrderedDict[str, list[str]]" = OrderedDict()
    for p in scores:
        rows.setdefault(block_of(p), []).append(p)
    ranked = sorted(scores, key=lambda p: scores[p])
    rank = {p: i / max(len(ranked) - 1, 1) for i, p in enumerate(ranked)}
    sel = set(selected)
    cell, label_w, top = 14, 150, 34
    width = label_w + cell * max(len(v) for v in rows.values()) + 10 if rows else 300
    width = max(width, 360)
    img = Image.new("RGB", (width, top + cell * len(rows) + 24), BG)
    d = ImageDraw.Draw(img)
    font = _font()
    d.text((6, 4), title or "SPARE saliency", fill=FG, font=font)
    d.text((6, 18), f"{len(sel)} of {len(scores)} modules selected (outlined); colour = score rank", fill=FG,
           font=font)
    for r, (block, paths) in enumerate(rows.items()):
        y = top + r * cell
        d.text((6, y + 1), block[:24], fill=FG, font=font)
        for c, p in enumerate(paths):
            x = label_w + c * cell
            d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=_heat(rank[p]),
                        outline=(255, 255, 255) if p in sel else None, width=2 if p in sel else 0)
    return _to_array(img)


def _axes(d: ImageDraw.ImageDraw, box, xlabel: str, ylabel: str, font):
    x0, y0, x1, y1 = box
    d.rectangle(box, outline=GRID)
    d.text((x0, y1 + 4), xlabel, fill=FG, font=font)
    d.text((4, y0 - 14), ylabel, fill=FG, font=font)


def _plot_canvas(title: str, xlabel: str):
    """A 512x300 dark canvas with a titled, framed plot area; returns (image, draw, font, plot box)."""
    img = Image.new("RGB", (512, 300), BG)
    d = ImageDraw.Draw(img)
    font = _font()
    box = (40, 40, 512 - 20, 300 - 40)
    d.text((6, 4), title, fill=FG, font=font)
    _axes(d, box, xlabel, "", font)
    return img, d, font, box


def timestep_plot(edges: Sequence[float], divergence: Sequence[float], probs: Sequence[float],
                  title: str = "") -> np.ndarray:
    """Bars: sampling probability per t bin; line: normalised divergence D(t)."""
    img, d, font, box = _plot_canvas(
        title or "SPARE timestep profile",
        "t: 0 = clean ... 1 = noisiest   bars: sampling probability, line: concept/surrogate gap D(t)")
    x0, y0, x1, y1 = box
    pmax = max(probs) or 1.0
    dmax = max(divergence) or 1.0
    n = len(probs)
    pts = []
    for i in range(n):
        a = x0 + (x1 - x0) * edges[i]
        b = x0 + (x1 - x0) * edges[i + 1]
        top = y1 - (y1 - y0) * probs[i] / pmax
        d.rectangle([a + 1, top, b - 1, y1 - 1], fill=SECOND)
        pts.append(((a + b) / 2, y1 - (y1 - y0) * divergence[i] / dmax))
    if len(pts) > 1:
        d.line(pts, fill=ACCENT, width=2)
    d.text((x0 + 4, y0 + 4), f"max p = {pmax:.3f}", fill=FG, font=font)
    return _to_array(img)


def loss_plot(losses: Sequence[dict], title: str = "") -> np.ndarray:
    """Total, forget and retain loss per step (log scale)."""
    img, d, font, box = _plot_canvas(title or "SPARE distillation loss (log scale)",
                                     "step   orange: forget, blue: retain, white: total")
    if not losses:
        return _to_array(img)
    x0, y0, x1, y1 = box
    series = {"loss": FG, "forget": ACCENT, "retain": SECOND}
    vals = [max(r[k], 1e-12) for r in losses for k in series if r.get(k, 0) > 0]
    lo, hi = np.log10(min(vals)), np.log10(max(vals))
    hi = hi if hi > lo else lo + 1
    n = len(losses)
    for key, colour in series.items():
        pts = [(x0 + (x1 - x0) * i / max(n - 1, 1), y1 - (y1 - y0) * (np.log10(max(r[key], 1e-12)) - lo) / (hi - lo))
               for i, r in enumerate(losses) if r.get(key, 0) > 0]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=1)
    d.text((x0 + 4, y0 + 4), f"first {losses[0]['loss']:.3g}  last {losses[-1]['loss']:.3g}  steps {n}", fill=FG,
           font=font)
    return _to_array(img)
