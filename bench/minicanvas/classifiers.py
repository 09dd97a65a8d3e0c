"""MiniCanvas judges: a style classifier and an object classifier (UnlearnCanvas' two ViT-L classifiers, in small).

    from bench.minicanvas.classifiers import load_classifiers, predict
    style_clf, object_clf = load_classifiers()
    style_ids = predict(style_clf, images)          # images [B, 3, 32, 32] in [0, 1] -> class indices [B]

Classes are `data.STYLES` / `data.OBJECTS` in order, the neutral concepts ("plain", "blob") included: an erased
concept's generations may legitimately land there. Both are trained on rendered ("real") images only, with
augmentation (shifts, blur, noise, small colour jitter; channel shuffles for the object judge, whose verdict must not
depend on colour) so that they also judge the diffusion model's samples; see train_classifiers.py.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spare_core.minicanvas import data

CLASSIFIER_FILE = pathlib.Path(__file__).parent / "weights" / "minicanvas_classifiers.safetensors"
DOMAINS = ("style", "object")


class ConceptClassifier(nn.Module):
    """Small VGG-style CNN: [B, 3, 32, 32] in [0, 1] -> logits [B, n_classes]."""

    def __init__(self, n_classes: int, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4 * w, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1).flatten(1))


def n_classes(domain: str) -> int:
    return len(data.STYLES) if domain == "style" else len(data.OBJECTS)


@torch.no_grad()
def predict(clf: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class indices [B] for images [B, 3, H, W] in [0, 1]."""
    clf.eval()
    return torch.cat([clf(images[a: a + batch_size]).argmax(1) for a in range(0, len(images), batch_size)])


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """{class name: accuracy over the samples of that class} (classes absent from target are left out)."""
    out = {}
    for i, n in enumerate(names):
        m = target == i
        if m.any():
            out[n] = (pred[m] == i).float().mean().item()
    return out


def save_classifiers(style_clf: nn.Module, object_clf: nn.Module, path: str | pathlib.Path = CLASSIFIER_FILE,
                     metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    sd = {f"style.{k}": v for k, v in style_clf.state_dict().items()}
    sd.update({f"object.{k}": v for k, v in object_clf.state_dict().items()})
    # BatchNorm's num_batches_tracked is an int64 counter; keep it, store floats as fp16
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    meta = {"format": "minicanvas-classifiers-v1", "styles": ",".join(data.STYLE_NAMES),
            "objects": ",".join(data.OBJECT_NAMES)}
    meta.update(metadata or {})
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), meta)


def load_classifiers(path: str | pathlib.Path = CLASSIFIER_FILE) -> tuple[ConceptClassifier, ConceptClassifier]:
    """(style classifier, object classifier), fp32, eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["styles"] == ",".join(data.STYLE_NAMES) and meta["objects"] == ",".join(data.OBJECT_NAMES), \
        "classifier file was trained for other MiniCanvas classes"
    sd = load_file(str(path))
    clfs = []
    for domain in DOMAINS:
        clf = ConceptClassifier(n_classes(domain))
        prefix = domain + "."
        clf.load_state_dict({k[len(prefix):]: (v.float() if v.is_floating_point() else v)
                             for k, v in sd.items() if k.startswith(prefix)})
        clfs.append(clf.eval().requires_grad_(False))
    return clfs[0], clfs[1]


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (training only)

def augment(images: torch.Tensor, gen: torch.Generator, domain: str) -> torch.Tensor:
    """Random shift (+-2 px, edge padding), blur, contrast/brightness and colour jitter, Gaussian noise.
    For the object judge also random channel permutations / inversions (shape, not colour, decides)."""
    b = images.shape[0]
    x = images
    # shift
    pad = 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    h, w = x.shape[-2:]
    x = torch.stack([xp[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])
    # blur (diffusion samples are softer than renders)
    blur_amt = torch.rand(b, generator=gen) * (torch.rand(b, generator=gen) < 0.5)
    k = torch.tensor([1.0, 2.0, 1.0])
    k2 = (k[:, None] * k[None]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2.expand(3, 1, 3, 3).contiguous(), groups=3)
    x = x + blur_amt.view(-1, 1, 1, 1) * (blurred - x)
    # contrast / brightness / per-channel jitter
    c = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.16
    br = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.08
    ch = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.06
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean + br + ch
    if domain == "object":
        perm = torch.stack([torch.randperm(3, generator=gen) for _ in range(b)])
        x = torch.stack([x[i, perm[i]] for i in range(b)])
        inv = (torch.rand(b, 1, 1, 1, generator=gen) < 0.3).float()
        x = x * (1 - inv) + (1 - x) * inv
    # Gaussian noise of random strength
    sig = torch.rand(b, 1, 1, 1, generator=gen) * 0.08
    x = x + sig * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)
