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


SCALE = 2  # pictures are drawn at 2x (text ~22 px): still readable when a preview node shows them at half size


def _font(size: int = 11 * SCALE):
    """Pillow's bundled scalable font (Pillow >= 10.1; ComfyUI requires newer); the fixed 10 px bitmap font where
    FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
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
    cell, label_w, top = 14 * SCALE, 150 * SCALE, 40 * SCALE
    width = label_w + cell * max(len(v) for v in rows.values()) + 10 * SCALE if rows else 300 * SCALE
    width = max(width, 512 * SCALE)
    img = Image.new("RGB", (width, top + cell * len(rows) + 12 * SCALE), BG)
    d = ImageDraw.Draw(img)
    font = _font()
    d.text((6 * SCALE, 4 * SCALE), title or "SPARE saliency", fill=FG, font=font)
    d.text((6 * SCALE, 20 * SCALE), f"{len(sel)} of {len(scores)} modules selected (outlined); colour = score rank",
           fill=FG, font=font)
    for r, (block, paths) in enumerate(rows.items()):
        y = top + r * cell
        d.text((6 * SCALE, y), block[:24], fill=FG, font=_font(10 * SCALE))
        for c, p in enumerate(paths):
            x = label_w + c * cell
            d.rectangle([x, y, x + cell - 2 * SCALE, y + cell - 2 * SCALE], fill=_heat(rank[p]),
                        outline=(255, 255, 255) if p in sel else None, width=2 * SCALE if p in sel else 0)
    return _to_array(img)


def _plot_canvas(title: str, subtitle: str, xlabel: str):
    """A dark 1024 x 600 canvas (512 x 300 at SCALE 1) with a title, a subtitle line (figures) and a framed plot area
    below them; returns (image, draw, font, plot box)."""
    w, h = 512 * SCALE, 300 * SCALE
    img = Image.new("RGB", (w, h), BG)
    d = ImageDraw.Draw(img)
    font = _font()
    box = (20 * SCALE, 48 * SCALE, w - 14 * SCALE, h - 30 * SCALE)
    d.text((6 * SCALE, 4 * SCALE), title, fill=FG, font=_font(13 * SCALE))
    d.text((6 * SCALE, 24 * SCALE), subtitle, fill=FG, font=font)
    d.rectangle(box, outline=GRID)
    d.text((box[0], box[3] + 6 * SCALE), xlabel, fill=FG, font=font)
    return img, d, font, box


def _inside(box, margin: float = 0.06):
    """The plot box shrunk by `margin` of its height at top and bottom, so curves never run on the frame."""
    x0, y0, x1, y1 = box
    pad = (y1 - y0) * margin
    return x0, y0 + pad, x1, y1 - pad


def timestep_plot(edges: Sequence[float], divergence: Sequence[float], probs: Sequence[float],
                  title: str = "") -> np.ndarray:
    """Bars: sampling probability per t bin; line: normalised divergence D(t)."""
    pmax = max(probs) or 1.0
    dmax = max(divergence) or 1.0
    img, d, font, box = _plot_canvas(
        title or "SPARE timestep profile", f"bars: training probability per noise level (max {pmax:.2f});  "
        "orange line: concept/surrogate gap D(t)", "t: 0 = clean  ...  1 = noisiest")
    x0, y0, x1, y1 = _inside(box)
    n = len(probs)
    pts = []
    for i in range(n):
        a = box[0] + (box[2] - box[0]) * edges[i]
        b = box[0] + (box[2] - box[0]) * edges[i + 1]
        top = y1 - (y1 - y0) * probs[i] / pmax
        d.rectangle([a + SCALE, top, b - SCALE, box[3] - 1], fill=SECOND)
        pts.append(((a + b) / 2, y1 - (y1 - y0) * divergence[i] / dmax))
    if len(pts) > 1:
        d.line(pts, fill=ACCENT, width=2 * SCALE)
    return _to_array(img)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average (the per-step loss is mostly timestep noise: the trend is what a user reads)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < 3:
        return v.tolist()
    k = np.ones(min(window, len(v))) / min(window, len(v))
    padded = np.pad(v, (len(k) // 2, len(k) - 1 - len(k) // 2), mode="edge")
    return np.convolve(padded, k, mode="valid").tolist()


def loss_plot(losses: Sequence[dict], title: str = "", checks: Sequence[dict] = ()) -> np.ndarray:
    """Forget and retain loss per step (log scale; faint: per step, bold: moving average over ~5% of the steps) and,
    from the probe checks, the share of the concept->surrogate gap closed (green dots, 0-100% on the same height)."""
    img, d, font, box = _plot_canvas(
        title or "SPARE distillation", "orange: forget loss, blue: retain loss (log scale, smoothed);  green: gap "
        "closed 0-100%", "step")
    if not losses:
        return _to_array(img)
    x0, y0, x1, y1 = _inside(box)
    n = len(losses)
    series = {"forget": ACCENT, "retain": SECOND}
    vals = [max(r[k], 1e-12) for r in losses for k in series if r.get(k, 0) > 0]
    if vals:
        lo, hi = np.log10(min(vals)), np.log10(max(vals))
        hi = hi if hi > lo else lo + 1

        def y_of(v):
            return y1 - (y1 - y0) * (np.log10(max(v, 1e-12)) - lo) / (hi - lo)

        window = max(1, n // 20)
        for key, colour in series.items():
            steps = [i for i, r in enumerate(losses) if r.get(key, 0) > 0]
            if len(steps) < 2:
                continue
            raw = [losses[i][key] for i in steps]
            xs = [x0 + (x1 - x0) * i / max(n - 1, 1) for i in steps]
            faint = tuple(int(0.35 * c + 0.65 * b) for c, b in zip(colour, BG))
            d.line(list(zip(xs, [y_of(v) for v in raw])), fill=faint, width=1)
            d.line(list(zip(xs, [y_of(v) for v in _smooth(raw, window)])), fill=colour, width=2 * SCALE)
    green = (110, 220, 110)
    for c in checks:
        x = x0 + (x1 - x0) * min(c["step"], n) / max(n, 1)
        y = y1 - (y1 - y0) * min(max(c.get("reduction", 0.0), 0.0), 1.0)
        r = 3 * SCALE
        d.ellipse([x - r, y - r, x + r, y + r], fill=green)
    if checks:
        last = checks[-1]
        d.text((x1 - 150 * SCALE, y0), f"gap closed {100 * last.get('reduction', 0.0):.0f}%", fill=green, font=font)
    return _to_array(img)
