"""MiniCanvas images: a procedural, deterministic miniature of UnlearnCanvas (styles x objects).

    python -m spare_core.minicanvas.data       # writes out/minicanvas/data_grid.png (under the current folder)

An image is a background and an object silhouette, both painted by a *style*:
- the object (a shape, e.g. "star") decides only the silhouette (an inside-test in object coordinates, jittered in
  position, scale and rotation per image). The silhouette fills most of the image (scale 0.80-0.88 of the half-width,
  offset <= 0.05, rotation <= 8 degrees): at 32 x 32 the features that tell a circle from a diamond or a star are a
  few pixels, and a 30-minute CPU model drew only 61% of the smaller (scale 0.58-0.70, offset 0.10, 12 degrees)
  shapes recognisably;
- the style (e.g. "ukiyo") decides only the paint: background colour and pattern, fill colour and pattern, outline.
So every style is readable on every object (the background is always large) and every object on every style (fill
and background contrast in every palette; "blueprint" draws outlines only).

"plain" (style) and "blob" (object) are the neutral concepts that serve as surrogates when a concept is erased.
Every concept has a canonical name and synonyms; prompts use UnlearnCanvas' template "A {object} image in {style}
style." and a few variants, with canonical names and synonyms both.

Images are float tensors [3, H, W] in [0, 1] (the diffusion model works in [-1, 1]). The same (style, object, seed)
always gives the same image: every random draw comes from numpy's PCG64 seeded by (seed, style index, object index).
Edges are anti-aliased by rendering at SUPERSAMPLE x the size and average-pooling.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32
"""Side of a MiniCanvas image in pixels."""
SUPERSAMPLE = 4
"""Rendering oversampling factor (anti-aliasing)."""


@dataclass(frozen=True)
class Concept:
    name: str
    synonyms: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,) + self.synonyms


# ----------------------------------------------------------------------------------------------------------------
# Concepts. Order = class index of the classifiers. The neutral concept is last in each domain.

STYLES: tuple[Concept, ...] = (
    Concept("ukiyo", ("woodblock",)),
    Concept("neon", ("cyberpunk",)),
    Concept("pastel", ("candy",)),
    Concept("sketch", ("pencil",)),
    Concept("popart", ("comic",)),
    Concept("mosaic", ("tiled",)),
    Concept("sunset", ("dusk",)),
    Concept("forest", ("jungle",)),
    Concept("blueprint", ("schematic",)),
    Concept("lava", ("volcanic",)),
    Concept("plain", ("simple",)),
)
OBJECTS: tuple[Concept, ...] = (
    Concept("circle", ("disc",)),
    Concept("square", ("box",)),
    Concept("triangle", ("pyramid",)),
    Concept("star", ("pentagram",)),
    Concept("cross", ("plus",)),
    Concept("ring", ("donut",)),
    Concept("heart", ("valentine",)),
    Concept("diamond", ("rhombus",)),
    Concept("crescent", ("moon",)),
    Concept("arrow", ("pointer",)),
    Concept("blob", ("lump",)),
)
NEUTRAL_STYLE = "plain"
NEUTRAL_OBJECT = "blob"
STYLE_NAMES = tuple(c.name for c in STYLES)
OBJECT_NAMES = tuple(c.name for c in OBJECTS)

TEMPLATES: tuple[str, ...] = (
    "A {object} image in {style} style.",  # UnlearnCanvas' template: the evaluation prompt
    "An image of a {object} in {style} style.",
    "A {style} style painting of a {object}.",
    "A {object} drawn in the {style} style.",
    "{object}, {style} style",
)
OBJECT_ONLY_TEMPLATES: tuple[str, ...] = ("A {object} image.", "An image of a {object}.")
STYLE_ONLY_TEMPLATES: tuple[str, ...] = ("An image in {style} style.", "A {style} style painting.")


def style_index(name: str) -> int:
    """Class index of a style, by canonical name or synonym."""
    for i, c in enumerate(STYLES):
        if name in c.names:
            return i
    raise KeyError(f"unknown style {name!r}")


def object_index(name: str) -> int:
    """Class index of an object, by canonical name or synonym."""
    for i, c in enumerate(OBJECTS):
        if name in c.names:
            return i
    raise KeyError(f"unknown object {name!r}")


def prompt(style: str, obj: str, template: int = 0) -> str:
    """The prompt for a (style, object) pair; template 0 is UnlearnCanvas' "A {object} image in {style} style."."""
    return TEMPLATES[template].format(style=style, object=obj)


def tokenize_words(text: str) -> list[str]:
    """Lower-case words of a prompt (punctuation dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def vocabulary() -> list[str]:
    """Every word any training prompt can contain, sorted."""
    words: set[str] = set()
    for tpl in TEMPLATES + OBJECT_ONLY_TEMPLATES + STYLE_ONLY_TEMPLATES:
        words.update(tokenize_words(tpl.replace("{object}", " ").replace("{style}", " ")))
    for c in STYLES + OBJECTS:
        for n in c.names:
            words.update(tokenize_words(n))
    return sorted(words)


def training_prompt(rng: np.random.Generator, style: int, obj: int, p_object_only: float = 0.05,
                    p_style_only: float = 0.05) -> str:
    """A random prompt for a training image of (style, obj): random template, canonical name or synonym (50/50).
    With small probabilities only the object or only the style is named (the image still has both)."""
    s = STYLES[style].names[rng.integers(len(STYLES[style].names))] if rng.random() < 0.5 else STYLES[style].name
    o = OBJECTS[obj].names[rng.integers(len(OBJECTS[obj].names))] if rng.random() < 0.5 else OBJECTS[obj].name
    u = rng.random()
    if u < p_object_only:
        return OBJECT_ONLY_TEMPLATES[rng.integers(len(OBJECT_ONLY_TEMPLATES))].format(object=o)
    if u < p_object_only + p_style_only:
        return STYLE_ONLY_TEMPLATES[rng.integers(len(STYLE_ONLY_TEMPLATES))].format(style=s)
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(style=s, object=o)


# ----------------------------------------------------------------------------------------------------------------
# Objects: inside-tests in object coordinates (u, v) in about [-1, 1], v pointing up. Tensors [n, H, W] -> bool.

def _polar(u, v):
    return torch.sqrt(u * u + v * v), torch.atan2(v, u)


def _circle(u, v, p):
    return u * u + v * v < 0.82 ** 2


def _square(u, v, p):
    return torch.maximum(u.abs(), v.abs()) < 0.72


def _triangle(u, v, p):
    # equilateral, pointing up, centroid at the origin
    return (v > -0.55) & (1.732 * u.abs() + v < 0.95)


def _star(u, v, p):
    r, a = _polar(u, v)
    k = 5
    # angle distance to the nearest spike (spikes point up)
    seg = 2 * math.pi / k
    d = torch.remainder(a - math.pi / 2 + seg / 2, seg) - seg / 2  # in [-seg/2, seg/2]
    t = d.abs() / (seg / 2)  # 0 at a spike, 1 between spikes
    r_outer, r_inner = 1.0, 0.48
    # straight edges between outer and inner vertices, in polar form (approximately straight at this size)
    rmax = r_outer * r_inner / (r_inner + (r_outer - r_inner) * t)
    return r < rmax


def _cross(u, v, p):
    w, l = 0.27, 0.85
    return ((u.abs() < w) & (v.abs() < l)) | ((v.abs() < w) & (u.abs() < l))


def _ring(u, v, p):
    r = torch.sqrt(u * u + v * v)
    return (r < 0.88) & (r > 0.5)


def _heart(u, v, p):
    x, y = u * 1.2, v * 1.2 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0


def _diamond(u, v, p):
    return u.abs() / 0.78 + v.abs() < 0.98


def _crescent(u, v, p):
    big = u * u + v * v < 0.85 ** 2
    cut = (u - 0.42) ** 2 + (v - 0.12) ** 2 < 0.68 ** 2
    return big & ~cut


def _arrow(u, v, p):
    shaft = (u > -0.9) & (u < 0.15) & (v.abs() < 0.2)
    head = (u >= 0.1) & (u < 0.9) & (v.abs() < 0.62 * (0.9 - u) / 0.8)
    return shaft | head


def _blob(u, v, p):
    # an elongated, lumpy potato; p holds per-image harmonic amplitudes/phases [n, 4] (broadcast over H, W)
    r, a = _polar(u * 0.8, v * 1.25)
    a2, p2, a3, p3 = (p[:, i, None, None] for i in range(4))
    rmax = 0.74 * (1 + a2 * torch.cos(2 * a + p2) + a3 * torch.cos(3 * a + p3))
    return r < rmax


_SHAPES = {
    "circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "cross": _cross, "ring": _ring,
    "heart": _heart, "diamond": _diamond, "crescent": _crescent, "arrow": _arrow, "blob": _blob,
}
_MAX_ROTATION_DEG = {"square": 6.0, "diamond": 6.0, "cross": 6.0}  # keep square/diamond (and +/x) apart
_DEFAULT_ROTATION_DEG = 8.0

# ----------------------------------------------------------------------------------------------------------------
# Styles: background paint, fill paint, outline. Colours are RGB in [0, 1]; each image jitters them slightly.


@dataclass(frozen=True)
class StyleSpec:
    bg: tuple[float, float, float]
    fill: tuple[float, float, float] | None  # None: the object is not filled (outline only)
    bg_pattern: str = "none"
    bg2: tuple[float, float, float] = (0.0, 0.0, 0.0)  # second colour of the background pattern
    fill_pattern: str = "none"
    fill2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    outline: tuple[float, float, float] | None = None
    outline_width: float = 0.0  # in pixels of the final image


_STYLE_SPECS: dict[str, StyleSpec] = {
    "ukiyo": StyleSpec(bg=(0.93, 0.86, 0.70), bg_pattern="waves", bg2=(0.55, 0.70, 0.85),
                       fill=(0.14, 0.20, 0.48), outline=(0.08, 0.06, 0.05), outline_width=1.0),
    "neon": StyleSpec(bg=(0.05, 0.02, 0.12), fill=(0.85, 0.08, 0.75), outline=(0.1, 0.95, 0.95), outline_width=1.5),
    "pastel": StyleSpec(bg=(1.0, 0.78, 0.87), fill=(0.40, 0.78, 0.70)),  # fill darker than bg (equal luma: unlearnt)
    "sketch": StyleSpec(bg=(0.98, 0.98, 0.96), fill=(0.98, 0.98, 0.96), fill_pattern="hatch", fill2=(0.35, 0.35, 0.35),
                        outline=(0.05, 0.05, 0.05), outline_width=1.0),
    "popart": StyleSpec(bg=(1.0, 0.88, 0.08), bg_pattern="dots", bg2=(0.92, 0.12, 0.10),
                        fill=(0.10, 0.30, 0.95), outline=(0.0, 0.0, 0.0), outline_width=1.5),
    "mosaic": StyleSpec(bg=(0.22, 0.22, 0.26), bg_pattern="grid", bg2=(0.45, 0.46, 0.50),
                        fill=(0.0, 0.70, 0.66), fill_pattern="checker", fill2=(0.55, 0.95, 0.88)),
    "sunset": StyleSpec(bg=(1.0, 0.62, 0.15), bg_pattern="vgradient", bg2=(0.45, 0.12, 0.50), fill=(0.04, 0.03, 0.06)),
    "forest": StyleSpec(bg=(0.10, 0.38, 0.12), bg_pattern="camo", bg2=(0.22, 0.55, 0.18),
                        fill=(0.85, 0.62, 0.35), fill_pattern="vstripes", fill2=(0.58, 0.38, 0.16)),
    "blueprint": StyleSpec(bg=(0.08, 0.24, 0.62), bg_pattern="finegrid", bg2=(0.30, 0.48, 0.82),
                           fill=None, outline=(0.95, 0.97, 1.0), outline_width=1.5),
    "lava": StyleSpec(bg=(0.38, 0.04, 0.02), bg_pattern="blotches", bg2=(0.85, 0.25, 0.02),
                      fill=(1.0, 0.82, 0.10)),
    "plain": StyleSpec(bg=(0.55, 0.55, 0.55), fill=(0.85, 0.85, 0.85)),
}
assert set(_STYLE_SPECS) == set(STYLE_NAMES) and set(_SHAPES) == set(OBJECT_NAMES)

_COLOR_JITTER = 0.04
PATTERN_PHASE_JITTER = 0.0
"""Random shift of periodic patterns, in periods (0: every image of a style uses the same lattice, like a printed
paper; random phases make the miniature diffusion model spend its capacity on texture alignment)."""


def _pattern(name: str, x, y, p, n: int, res: int):
    """Pattern weight in [0, 1] ([n, res, res]) for the second colour. x, y: pixel coordinates of the final image
    (fractional at supersampled resolution), [1, res, res]; p: per-image random numbers [n, 4] in [0, 1)."""
    ph = [p[:, i, None, None] * PATTERN_PHASE_JITTER for i in range(4)]
    if name == "none":
        return torch.zeros(n, res, res)
    if name == "waves":  # wavy horizontal lines, period 6 px
        yy = y + 1.2 * torch.sin(x * 2 * math.pi / 10 + ph[1] * 2 * math.pi) + ph[0] * 6
        return (torch.remainder(yy, 6.0) < 1.5).float()
    if name == "dots":  # halftone dots on a 5 px lattice
        xx, yy = torch.remainder(x + ph[0] * 5, 5.0) - 2.5, torch.remainder(y + ph[1] * 5, 5.0) - 2.5
        return (xx * xx + yy * yy < 1.4 ** 2).float()
    if name == "grid":  # grout lines every 4 px
        return ((torch.remainder(x + ph[0] * 4, 4.0) < 1.0) | (torch.remainder(y + ph[1] * 4, 4.0) < 1.0)).float()
    if name == "finegrid":  # thin lines every 8 px
        return ((torch.remainder(x + ph[0] * 8, 8.0) < 0.75) | (torch.remainder(y + ph[1] * 8, 8.0) < 0.75)).float()
    if name == "checker":  # 4 px checkerboard
        return ((torch.floor((x + ph[0] * 8) / 4) + torch.floor((y + ph[1] * 8) / 4)).remainder(2)).expand(n, -1, -1)
    if name == "hatch":  # diagonal hatching, period 4 px
        return (torch.remainder(x + y + ph[0] * 4, 4.0) < 1.5).float()
    if name == "vstripes":  # vertical bark stripes, period 4 px
        return (torch.remainder(x + ph[0] * 4, 4.0) < 1.5).float()
    if name == "vgradient":  # top colour -> second colour at the bottom
        return (y / SIZE).expand(n, -1, -1).clamp(0, 1) * (0.85 + 0.15 * p[:, 0, None, None])
    raise ValueError(name)


def _noise_pattern(name: str, rng_fields: torch.Tensor, res: int):
    """Random-field patterns: rng_fields [n, 1, 16, 16] uniform noise, upsampled to [n, res, res]."""
    if name == "camo":  # hard-edged camouflage patches
        field = F.interpolate(rng_fields[:, :, ::2, ::2], size=(res, res), mode="bicubic", align_corners=False)[:, 0]
        return ((field - 0.5) * 12).clamp(0, 1)
    if name == "blotches":  # smooth glowing blotches
        field = F.interpolate(rng_fields[:, :, ::2, ::2], size=(res, res), mode="bicubic", align_corners=False)[:, 0]
        return ((field - 0.55) * 4).clamp(0, 1)
    raise ValueError(name)


_NOISE_PATTERNS = {"camo", "blotches"}


def render_batch(styles: Sequence[int | str], objects: Sequence[int | str], seeds: Sequence[int],
                 size: int = SIZE) -> torch.Tensor:
    """Images for parallel lists of styles, objects (indices or names) and integer seeds: [n, 3, size, size] in
    [0, 1]. Deterministic: image i depends only on (styles[i], objects[i], seeds[i])."""
    assert size == SIZE, "MiniCanvas patterns are laid out for 32 px"
    si = [s if isinstance(s, int) else style_index(s) for s in styles]
    oi = [o if isinstance(o, int) else object_index(o) for o in objects]
    out = torch.empty(len(si), 3, size, size)
    # group by (style, object) so each group is rendered with array ops
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (s, o) in enumerate(zip(si, oi)):
        groups.setdefault((s, o), []).append(k)
    for (s, o), idx in groups.items():
        out[idx] = _render_group(s, o, [int(seeds[k]) for k in idx], size)
    return out


def render(style: int | str, obj: int | str, seed: int, size: int = SIZE) -> torch.Tensor:
    """One image [3, size, size] in [0, 1]."""
    return render_batch([style], [obj], [seed], size)[0]


def _render_group(s: int, o: int, seeds: list[int], size: int) -> torch.Tensor:
    spec, shape_name = _STYLE_SPECS[STYLES[s].name], OBJECTS[o].name
    n, ss = len(seeds), SUPERSAMPLE
    res = size * ss
    # per-image random draws (a private generator per image: batch composition never changes an image)
    geo = np.zeros((n, 4)); shape_p = np.zeros((n, 4)); pat_p = np.zeros((n, 4)); jit = np.zeros((n, 4, 3))
    fields = np.zeros((n, 1, 16, 16))
    max_rot = _MAX_ROTATION_DEG.get(shape_name, _DEFAULT_ROTATION_DEG)
    for k, seed in enumerate(seeds):
        rng = np.random.default_rng([seed, s, o, 0x4D43])
        geo[k] = [rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.80, 0.88),
                  math.radians(rng.uniform(-max_rot, max_rot))]
        shape_p[k] = [rng.uniform(0.10, 0.18), rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.12),
                      rng.uniform(0, 2 * math.pi)]
        pat_p[k] = rng.random(4)
        jit[k] = rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=(4, 3))
        fields[k] = rng.random((1, 16, 16))
    geo_t, shape_t, pat_t = (torch.tensor(a, dtype=torch.float32) for a in (geo, shape_p, pat_p))
    jit_t = torch.tensor(jit, dtype=torch.float32)

    # pixel coordinates (of the final image, fractional) and normalised coordinates in [-1, 1], v up
    c = (torch.arange(res, dtype=torch.float32) + 0.5) / ss
    y, x = torch.meshgrid(c, c, indexing="ij")
    x, y = x[None], y[None]
    gx, gy = x / size * 2 - 1, 1 - y / size * 2
    tx, ty, sc, rot = (geo_t[:, i, None, None] for i in range(4))
    dx, dy = (gx - tx) / sc, (gy - ty) / sc
    cos, sin = torch.cos(rot), torch.sin(rot)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    inside = _SHAPES[shape_name](u, v, shape_t).float()  # [n, res, res]

    def colour(rgb, j):
        return (torch.tensor(rgb, dtype=torch.float32)[None] + jit_t[:, j]).clamp(0, 1)[:, :, None, None]

    def paint(base, second, pattern, j):
        if pattern in _NOISE_PATTERNS:
            w = _noise_pattern(pattern, torch.tensor(fields, dtype=torch.float32), res)
        else:
            w = _pattern(pattern, x, y, pat_t, n, res)
        w = w[:, None]
        return colour(base, j) * (1 - w) + colour(second, j + 1) * w

    img = paint(spec.bg, spec.bg2, spec.bg_pattern, 0)
    if spec.fill is not None:
        fill = paint(spec.fill, spec.fill2, spec.fill_pattern, 2)
        img = img * (1 - inside[:, None]) + fill * inside[:, None]
    if spec.outline is not None:
        # outline = inside minus the inside eroded by the outline width (a band along the inner edge)
        r = max(1, int(round(spec.outline_width * ss)))
        eroded = 1 - F.max_pool2d((1 - inside)[:, None], kernel_size=2 * r + 1, stride=1, padding=r)[:, 0]
        band = (inside - eroded).clamp(0, 1)[:, None]
        img = img * (1 - band) + colour(spec.outline, 3 if spec.fill is None else 3) * band
    return F.avg_pool2d(img, ss).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------

def grid_image(images: torch.Tensor, nrow: int, pad: int = 1, scale: int = 3):
    """A PIL image of a grid of images [n, 3, H, W] in [0, 1], each scaled up `scale` times (nearest)."""
    from PIL import Image

    n, _, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    canvas = torch.ones(3, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, ncol)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = \
            images[k]
    arr = (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


if __name__ == "__main__":
    import pathlib

    out = pathlib.Path("out") / "minicanvas"  # not next to this file: the package may be installed read-only
    out.mkdir(parents=True, exist_ok=True)
    ns, no = len(STYLES), len(OBJECTS)
    imgs = render_batch([s for s in range(ns) for o in range(no)], [o for s in range(ns) for o in range(no)],
                        [0] * (ns * no))
    grid_image(imgs, no, scale=4).save(out / "data_grid.png")
    print("rows = styles", STYLE_NAMES)
    print("cols = objects", OBJECT_NAMES)
    print("vocabulary", len(vocabulary()), vocabulary())
