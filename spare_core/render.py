"""Pictures for node outputs: saliency heatmap, timestep profile, loss curve.

Drawn with Pillow (a ComfyUI dependency) instead of matplotlib, which ComfyUI does not ship.
Every function returns float32 numpy [H, W, 3] in [0, 1] (one ComfyUI IMAGE frame without the batch axis). Each picture
has labelled axes (or, for the heatmap, labelled rows and columns) and a legend.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BG, FG, GRID, ACCENT, SECOND = (24, 24, 28), (230, 230, 230), (70, 70, 80), (255, 140, 40), (80, 170, 255)
GREEN, MUTED = (110, 220, 110), (160, 160, 170)

# Pictures are small (640 px wide plots) with large text (18 px): a preview node ~500 px wide shows it at >= 13 px at
# 100% zoom. Every size below is in pixels of the picture.
TEXT, SMALL, BIG = 18, 15, 21
PLOT_W, PLOT_H = 640, 420


def _font(size: int = TEXT):
    """Pillow's bundled scalable font (Pillow >= 10.1; ComfyUI requires newer); the fixed 10 px bitmap font where
    FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _text_w(d: ImageDraw.ImageDraw, text: str, font) -> float:
    return d.textlength(text, font=font)


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


def kind_of(path: str) -> str:
    """The module's kind inside its block (the heatmap's column), e.g. 'input_blocks.4.1.transformer_blocks.0.attn2.to_k'
    -> 'attn2.to_k', 'input_blocks.4.0.in_layers.2' -> 'in_layers.2', 'time_embed.2' -> '2': the block, the layer index
    after it and the transformer-block index dropped."""
    block = block_of(path)
    rest = path[len(block):].lstrip(".").split(".")
    if len(rest) > 1 and rest[0].isdigit():
        rest = rest[1:]
    if len(rest) > 2 and rest[0] == "transformer_blocks" and rest[1].isdigit():
        rest = rest[2:]
    return ".".join(rest) or "conv"


def _vertical_text(img: Image.Image, xy: tuple[int, int], text: str, font, fill) -> None:
    """Text rotated 90 degrees (reads bottom to top), its bottom-left corner at xy."""
    probe = ImageDraw.Draw(img)
    w, h = int(probe.textlength(text, font=font)) + 2, int(font.size if hasattr(font, "size") else 11) + 4
    tile = Image.new("RGB", (w, h), BG)
    ImageDraw.Draw(tile).text((0, 0), text, fill=fill, font=font)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (xy[0], xy[1] - tile.height))


def saliency_heatmap(scores: dict[str, float], selected: Sequence[str], title: str = "") -> np.ndarray:
    """Rows: the network's blocks (in network order); columns: the module kinds (labelled: resnet layers, attn1 =
    self-attention, attn2 = cross-attention with the text, ff = feed-forward, ...); colour = score rank among all
    modules (colour bar); selected modules outlined. Where a block holds several modules of one kind (SDXL's stacked
    transformer blocks), the cell shows the highest-ranked of them and is outlined if any of them is selected."""
    ranked = sorted(scores, key=lambda p: scores[p])
    rank = {p: i / max(len(ranked) - 1, 1) for i, p in enumerate(ranked)}
    sel = set(selected)
    rows: "OrderedDict[str, dict[str, list[str]]]" = OrderedDict()
    kinds: list[str] = []
    for p in scores:
        k = kind_of(p)
        rows.setdefault(block_of(p), {}).setdefault(k, []).append(p)
        if k not in kinds:
            kinds.append(k)
    stacked = any(len(v) > 1 for r in rows.values() for v in r.values())
    font, small = _font(TEXT), _font(SMALL)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = 22
    label_w = int(max([_text_w(probe, b[:24], small) for b in rows] or [100])) + 16
    head = int(max([_text_w(probe, k[:18], small) for k in kinds] or [40])) + 12
    top = 64
    grid_w = cell * max(len(kinds), 1)
    legend_h = 70
    width = max(label_w + grid_w + 12, 560)
    height = top + head + cell * len(rows) + legend_h
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    d.text((8, 6), title or "SPARE saliency", fill=FG, font=_font(BIG))
    d.text((8, 34), f"{len(sel)} of {len(scores)} modules selected (white outline)", fill=FG, font=font)
    y_grid = top + head
    for c, k in enumerate(kinds):
        _vertical_text(img, (label_w + c * cell + 3, y_grid - 4), k[:18], small, MUTED)
    for r, (block, by_kind) in enumerate(rows.items()):
        y = y_grid + r * cell
        d.text((8, y + 2), block[:24], fill=FG, font=small)
        for c, k in enumerate(kinds):
            paths = by_kind.get(k)
            x = label_w + c * cell
            if not paths:
                continue
            hit = any(p in sel for p in paths)
            d.rectangle([x, y, x + cell - 3, y + cell - 3], fill=_heat(max(rank[p] for p in paths)),
                        outline=(255, 255, 255) if hit else None, width=2 if hit else 0)
    # legend: the colour bar and the outline
    y = height - legend_h + 14
    d.text((8, y), "score rank:", fill=FG, font=small)
    x0 = 8 + int(_text_w(d, "score rank: ", small))
    d.text((x0, y), "low", fill=MUTED, font=small)
    bx = x0 + int(_text_w(d, "low ", small))
    for i in range(120):
        d.line([(bx + i, y + 3), (bx + i, y + 15)], fill=_heat(i / 119))
    d.text((bx + 126, y), "high", fill=MUTED, font=small)
    lx = bx + 126 + int(_text_w(d, "high", small)) + 24
    d.rectangle([lx, y, lx + 16, y + 16], fill=_heat(0.9), outline=(255, 255, 255), width=2)
    d.text((lx + 24, y), "selected", fill=FG, font=small)
    note = "attn1: self-attention, attn2: cross-attention (text), ff: feed-forward"
    if stacked:
        note += "; cell: best of its kind in the block"
    d.text((8, y + 26), note, fill=MUTED, font=small)
    return _to_array(img)


def _plot_canvas(title: str, xlabel: str, left_label: str, right_label: str = "",
                 right_colour=FG):
    """A dark PLOT_W x PLOT_H canvas with a title, a framed plot area, the x axis title under it and the y axes' titles
    written vertically beside it; returns (image, draw, font, plot box)."""
    img = Image.new("RGB", (PLOT_W, PLOT_H), BG)
    d = ImageDraw.Draw(img)
    font, small = _font(TEXT), _font(SMALL)
    box = (78, 74, PLOT_W - (78 if right_label else 16), PLOT_H - 56)
    d.text((8, 6), title, fill=FG, font=_font(BIG))
    d.rectangle(box, outline=GRID)
    tw = _text_w(d, xlabel, font)
    d.text(((box[0] + box[2] - tw) / 2, box[3] + 26), xlabel, fill=FG, font=font)
    mid = (box[1] + box[3]) // 2
    _vertical_text(img, (4, mid + int(_text_w(d, left_label, small)) // 2), left_label, small, FG)
    if right_label:
        _vertical_text(img, (PLOT_W - 22, mid + int(_text_w(d, right_label, small)) // 2), right_label, small,
                       right_colour)
    return img, d, font, box


def _legend(d: ImageDraw.ImageDraw, items: Sequence[tuple[str, str, tuple]], y: int, x: int = 8) -> None:
    """One line of legend entries (kind 'line' | 'bar' | 'dot', label, colour)."""
    small = _font(SMALL)
    for kind, label, colour in items:
        if kind == "line":
            d.line([(x, y + 9), (x + 22, y + 9)], fill=colour, width=3)
        elif kind == "bar":
            d.rectangle([x + 4, y + 2, x + 18, y + 16], fill=colour)
        else:
            d.ellipse([x + 6, y + 4, x + 16, y + 14], fill=colour)
        d.text((x + 28, y), label, fill=FG, font=small)
        x += 28 + int(_text_w(d, label, small)) + 22


def _tick(d, x: float, y: float, text: str, anchor: str, colour=MUTED) -> None:
    """A tick label: anchor 'left' (right-aligned left of x), 'right' (left of nothing, starting at x) or 'below'."""
    small = _font(SMALL)
    w = _text_w(d, text, small)
    if anchor == "left":
        d.text((x - w - 6, y - 9), text, fill=colour, font=small)
    elif anchor == "right":
        d.text((x + 6, y - 9), text, fill=colour, font=small)
    else:
        d.text((x - w / 2, y + 4), text, fill=colour, font=small)


def _inside(box, margin: float = 0.06):
    """The plot box shrunk by `margin` of its height at top and bottom, so curves never run on the frame."""
    x0, y0, x1, y1 = box
    pad = (y1 - y0) * margin
    return x0, y0 + pad, x1, y1 - pad


def timestep_plot(edges: Sequence[float], divergence: Sequence[float], probs: Sequence[float],
                  title: str = "") -> np.ndarray:
    """Bars: sampling probability per t bin (left axis); line: concept/surrogate divergence D(t), normalised to its
    maximum (right axis); x: t from clean (0) to noisiest (1)."""
    pmax = max(probs) or 1.0
    dmax = max(divergence) or 1.0
    img, d, font, box = _plot_canvas(title or "SPARE timestep profile", "t (noise level): 0 = clean ... 1 = noisiest",
                                     "training probability", "gap D(t) / max", ACCENT)
    _legend(d, [("bar", "training probability per t", SECOND), ("line", "concept/surrogate gap D(t)", ACCENT)], 38)
    x0, y0, x1, y1 = _inside(box)
    for f in (0.0, 0.5, 1.0):
        y = y1 - (y1 - y0) * f
        d.line([(box[0] - 4, y), (box[0], y)], fill=MUTED)
        _tick(d, box[0], y, f"{pmax * f:.2f}", "left")
        _tick(d, box[2], y, f"{f:.1f}", "right", ACCENT)
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        _tick(d, box[0] + (box[2] - box[0]) * f, box[3], f"{f:g}", "below")
    n = len(probs)
    pts = []
    for i in range(n):
        a = box[0] + (box[2] - box[0]) * edges[i]
        b = box[0] + (box[2] - box[0]) * edges[i + 1]
        top = y1 - (y1 - y0) * probs[i] / pmax
        d.rectangle([a + 1, top, b - 1, box[3] - 1], fill=SECOND)
        pts.append(((a + b) / 2, y1 - (y1 - y0) * divergence[i] / dmax))
    if len(pts) > 1:
        d.line(pts, fill=ACCENT, width=3)
    return _to_array(img)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average (the per-step loss is mostly timestep noise: the trend is what a user reads)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < 3:
        return v.tolist()
    k = np.ones(min(window, len(v))) / min(window, len(v))
    padded = np.pad(v, (len(k) // 2, len(k) - 1 - len(k) // 2), mode="edge")
    return np.convolve(padded, k, mode="valid").tolist()


def _loss_ticks(lo: float, hi: float) -> list[float]:
    """Log10 positions to label on the loss axis: the decades inside [lo, hi], else both ends."""
    decades = [float(e) for e in range(int(np.ceil(lo)), int(np.floor(hi)) + 1)]
    return decades if len(decades) >= 2 else [lo, hi]


def loss_plot(losses: Sequence[dict], title: str = "", checks: Sequence[dict] = ()) -> np.ndarray:
    """Forget and retain loss per step (left axis, log scale; faint: per step, bold: moving average over ~5% of the
    steps) and, from the probe checks, the share of the concept->surrogate gap closed (green dots, right axis 0-100%);
    a legend names the three."""
    img, d, font, box = _plot_canvas(title or "SPARE distillation", "training step", "loss (log scale)",
                                     "gap closed (%)" if checks else "", GREEN)
    items = [("line", "forget loss", ACCENT), ("line", "retain loss", SECOND)]
    if checks:
        last = 100 * checks[-1].get("gap_closed", 0.0)
        items.append(("dot", f"concept->surrogate gap closed (last {last:.0f}%)", GREEN))
    _legend(d, items, 38)
    x0, y0, x1, y1 = _inside(box)
    n = len(losses)
    for f in (0.0, 0.5, 1.0):
        _tick(d, x0 + (x1 - x0) * f, box[3], f"{round(f * max(n - 1, 0)) + 1}", "below")  # steps count from 1
    if checks:
        for f in (0.0, 0.5, 1.0):
            _tick(d, box[2], y1 - (y1 - y0) * f, f"{100 * f:.0f}", "right", GREEN)
    if not losses:
        return _to_array(img)
    series = {"forget": ACCENT, "retain": SECOND}
    vals = [max(r[k], 1e-12) for r in losses for k in series if r.get(k, 0) > 0]
    if vals:
        lo, hi = np.log10(min(vals)), np.log10(max(vals))
        hi = hi if hi > lo else lo + 1

        def y_of(v):
            return y1 - (y1 - y0) * (np.log10(max(v, 1e-12)) - lo) / (hi - lo)

        for e in _loss_ticks(lo, hi):
            y = y1 - (y1 - y0) * (e - lo) / (hi - lo)
            d.line([(box[0] - 4, y), (box[0], y)], fill=MUTED)
            _tick(d, box[0], y, f"{10 ** e:.2g}", "left")
        window = max(1, n // 20)
        for key, colour in series.items():
            steps = [i for i, r in enumerate(losses) if r.get(key, 0) > 0]
            if len(steps) < 2:
                continue
            raw = [losses[i][key] for i in steps]
            xs = [x0 + (x1 - x0) * i / max(n - 1, 1) for i in steps]
            faint = tuple(int(0.35 * c + 0.65 * b) for c, b in zip(colour, BG))
            d.line(list(zip(xs, [y_of(v) for v in raw])), fill=faint, width=1)
            d.line(list(zip(xs, [y_of(v) for v in _smooth(raw, window)])), fill=colour, width=3)
    for c in checks:
        x = x0 + (x1 - x0) * min(c["step"], n) / max(n, 1)
        y = y1 - (y1 - y0) * min(max(c.get("gap_closed", 0.0), 0.0), 1.0)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=GREEN)
    return _to_array(img)
