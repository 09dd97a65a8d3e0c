"""Sparse LoRA adapters on one module (`LoraAdapter`), on a whole network (`attach`), and as a file (`LoraWeights`).

Why not peft's injection: peft replaces each target module by a wrapper (`base_layer` + adapters), i.e. it
restructures the network. ComfyUI shares `diffusion_model` between every clone of a MODEL and addresses weight
patches and LoRA files by module path, so SPARE must never rename or replace modules. Like kohya's sd-scripts, we
add the low-rank term with a forward hook and keep the base module untouched; removing the hook restores the
network exactly. The parameterisation and init are peft's (LoRA "gaussian" init: A ~ N(0, 1/r), B = 0;
scale = alpha / r), so a SPARE adapter is numerically a peft LoRA.

File format facts (comfy/lora.py, comfy/weight_adapter/lora.py; kohya networks/lora.py):
- ComfyUI native: "<prefix><module path>.lora_up.weight" [out, r(,1,1)], ".lora_down.weight" [r, in(,kh,kw)],
  ".alpha" scalar; prefix "diffusion_model." for ComfyUI models.
- kohya: "lora_unet_<module path with '.' -> '_'>" + the same suffixes; A1111/Forge load it for SD1.5/SDXL.
- peft-style ".lora_B.weight" / ".lora_A.weight" are read as up / down.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import SpareInputError
from .files import atomic_write, read_safetensors

log = logging.getLogger("spare")

KOHYA_PREFIX = "lora_unet_"
KEY_FORMATS = ("comfyui", "kohya")
UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight")
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
ALPHA_SUFFIX = ".alpha"
ADAPTABLE = (nn.Linear, nn.Conv2d)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear/Conv2d as seen by a LoRA: rank must not exceed min(fan_in, fan_out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw // module.groups, module.out_channels
    raise TypeError(f"{type(module).__name__} cannot carry a LoRA (Linear and Conv2d can)")


class LoraAdapter(nn.Module):
    """Low-rank delta for one base module: delta(x) = scale * up(down(dropout(x))), rows of `up` masked.

    Linear: down [r, in], up [out, r]. Conv2d: down is a conv with the base kernel/stride/padding, up is 1x1.
    `row_mask` (bool [out]) keeps the update in selected output rows only; the product stays rank <= r, so a
    masked adapter is still a standard LoRA file.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, row_mask: Optional[torch.Tensor] = None,
                 dropout: float = 0.0):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise SpareInputError(f"grouped Conv2d (groups={base.groups}) cannot carry a LoRA")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"{type(base).__name__} cannot carry a LoRA")
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.normal_(self.down.weight, std=1.0 / rank)  # peft init_lora_weights="gaussian"
        nn.init.zeros_(self.up.weight)
        self.register_buffer("row_mask", None if row_mask is None else row_mask.to(torch.bool).clone())

    def up_weight(self) -> torch.Tensor:
        w = self.up.weight
        if self.row_mask is None:
            return w
        return w * self.row_mask.view(-1, *[1] * (w.dim() - 1)).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.dropout(x))
        if isinstance(self.up, nn.Linear):
            return nn.functional.linear(h, self.up_weight()) * self.scale
        return nn.functional.conv2d(h, self.up_weight()) * self.scale


class _Hooks:
    """Forward-hook handles that `remove()` (or leaving a `with` block) takes off the network."""

    _handles: list

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class AdapterSet(_Hooks):
    """Adapters hooked onto a network's modules. `enabled` toggles them (teacher = disabled, student = enabled)."""

    def __init__(self, network: nn.Module, adapters: Mapping[str, LoraAdapter]):
        self.network = network
        self.adapters = dict(adapters)
        self.enabled = True
        self.strength = 1.0
        modules = dict(network.named_modules())
        self._handles = [modules[path].register_forward_hook(self._hook(adapter))
                         for path, adapter in self.adapters.items()]

    def _hook(self, adapter: LoraAdapter):
        def hook(module, args, output):
            if not self.enabled or self.strength == 0.0:
                return output
            x = args[0]
            delta = adapter(x.to(adapter.down.weight.dtype))
            return output + (self.strength * delta).to(output.dtype)
        return hook

    def extend(self, adapters: Mapping[str, LoraAdapter]) -> None:
        """Hook in more adapters (the distillation grows its adapter set when the gap stalls)."""
        modules = dict(self.network.named_modules())
        for path, adapter in adapters.items():
            if path in self.adapters:
                raise ValueError(f"module '{path}' already carries an adapter")
            self.adapters[path] = adapter
            self._handles.append(modules[path].register_forward_hook(self._hook(adapter)))

    def parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters()]



def attach(network: nn.Module, paths: Iterable[str], rank: int, alpha: float,
           row_masks: Optional[Mapping[str, torch.Tensor]] = None, dropout: float = 0.0,
           device=None, dtype=torch.float32) -> AdapterSet:
    """Create trainable adapters for `paths` (module paths inside `network`) and hook them in."""
    adapters = make_adapters(network, paths, rank, alpha, row_masks, dropout, device, dtype)
    widest = max((a.rank for a in adapters.values()), default=rank)
    if widest < rank:  # narrow modules are capped (make_adapters); a rank no selected module can take is a mistake
        raise SpareInputError(f"rank={rank} is larger than any selected module allows (the widest takes "
                              f"{widest}); use rank <= {widest}")
    return AdapterSet(network, adapters)


def make_adapters(network: nn.Module, paths: Iterable[str], rank: int, alpha: float,
                  row_masks: Optional[Mapping[str, torch.Tensor]] = None, dropout: float = 0.0,
                  device=None, dtype=torch.float32) -> dict[str, LoraAdapter]:
    """Fresh (zero-update) adapters for `paths`, checked against the network; not hooked in."""
    modules = dict(network.named_modules())
    adapters = {}
    for path in paths:
        if path not in modules:
            raise SpareInputError(f"saliency names module '{path}', which the model does not have; "
                                  "was the saliency scanned on a different model?")
        base = modules[path]
        # A module narrower than the rank (e.g. SD's 4-channel output conv at rank 8) gets a full-rank update: rank
        # min(in, out) with alpha scaled so that its update scale stays alpha / rank. The file stores alpha per
        # module and loaders scale by alpha / down rows, so it loads as trained. (peft would over-parameterise.)
        r = min(rank, *module_dims(base))
        mask = None if row_masks is None else row_masks.get(path)
        adapters[path] = LoraAdapter(base, r, alpha * r / rank, mask, dropout).to(device=device, dtype=dtype)
    return adapters


@dataclass
class LoraWeights:
    """A trained (or loaded) LoRA: per module path, `down`, `up` (row mask already applied) and `alpha`."""

    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_adapters(cls, adapters: AdapterSet, metadata: Optional[Mapping[str, str]] = None) -> "LoraWeights":
        modules = {}
        for path, a in adapters.adapters.items():
            modules[path] = {"down": a.down.weight.detach().float().cpu().clone(),
                             "up": a.up_weight().detach().float().cpu().clone(),
                             "alpha": torch.tensor(a.alpha, dtype=torch.float32)}
        return cls(modules, dict(metadata or {}))

    @property
    def rank(self) -> int:
        return max((m["down"].shape[0] for m in self.modules.values()), default=0)

    def num_bytes(self, dtype=torch.float16) -> int:
        size = torch.tensor([], dtype=dtype).element_size()
        return sum(m["down"].numel() + m["up"].numel() for m in self.modules.values()) * size

    def state_dict(self, key_format: str = "comfyui", prefix: str = "diffusion_model.",
                   dtype=torch.float16) -> dict[str, torch.Tensor]:
        """Tensors under ComfyUI-native ("comfyui") or kohya ("kohya") keys."""
        if key_format not in KEY_FORMATS:
            raise SpareInputError(f"key_format='{key_format}' is not one of {', '.join(KEY_FORMATS)}")
        sd = {}
        for path, m in self.modules.items():
            name = prefix + path if key_format == "comfyui" else KOHYA_PREFIX + path.replace(".", "_")
            sd[name + ".lora_down.weight"] = m["down"].to(dtype).contiguous()
            sd[name + ".lora_up.weight"] = m["up"].to(dtype).contiguous()
            sd[name + ALPHA_SUFFIX] = m["alpha"].to(dtype)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], network: nn.Module, prefix: str = "diffusion_model.",
                        metadata: Optional[Mapping[str, str]] = None, source: str = "state dict") -> "LoraWeights":
        """Parse either key format against `network`'s module paths.

        Raises SpareInputError when no key matches a Linear/Conv2d of `network`; unmatched keys are logged.
        """
        paths = {n for n, m in network.named_modules() if isinstance(m, ADAPTABLE)}
        kohya = {KOHYA_PREFIX + p.replace(".", "_"): p for p in paths}
        groups: dict[str, dict[str, torch.Tensor]] = {}
        unmatched = []
        for key, tensor in sd.items():
            for suffix, part in [(s, "up") for s in UP_SUFFIXES] + [(s, "down") for s in DOWN_SUFFIXES] + \
                                [(ALPHA_SUFFIX, "alpha")]:
                if key.endswith(suffix):
                    stem = key[: -len(suffix)]
                    path = stem[len(prefix):] if stem.startswith(prefix) else kohya.get(stem)
                    if path in paths:
                        groups.setdefault(path, {})[part] = tensor.float()
                    else:
                        unmatched.append(key)
                    break
            else:
                unmatched.append(key)
        modules = {}
        for path, g in groups.items():
            if "up" not in g or "down" not in g:
                unmatched.append(f"{path} (missing {'up' if 'up' not in g else 'down'} weight)")
                continue
            rank = g["down"].shape[0]
            g.setdefault("alpha", torch.tensor(float(rank)))
            g["alpha"] = g["alpha"].reshape(())
            modules[path] = g
        if not modules:
            example = next(iter(sd), "<no keys>")
            raise SpareInputError(
                f"{source}: none of its {len(sd)} keys matches a module of this model (first key: '{example}'); "
                f"expected '{prefix}<module>.lora_up.weight' or '{KOHYA_PREFIX}<module>.lora_up.weight' keys. "
                "Is it a LoRA for a different model family?")
        if unmatched:
            log.warning("%s: %d key(s) match no module of this model and are ignored, e.g. %s",
                        source, len(unmatched), unmatched[:3])
        return cls(modules, dict(metadata or {}))

    def delta_weight(self, path: str) -> torch.Tensor:
        """Dense weight update (alpha/r) * up @ down, shaped like the base module's weight."""
        m = self.modules[path]
        down, up = m["down"], m["up"]
        scale = float(m["alpha"]) / down.shape[0]
        if down.dim() == 2:
            return scale * (up @ down)
        return scale * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])


def save_lora(path: str, lora: LoraWeights, key_format: str = "comfyui", prefix: str = "diffusion_model.",
              dtype=torch.float16) -> str:
    """Write a .safetensors LoRA atomically (temporary file in the same folder, then rename). Returns `path`."""
    if not str(path).endswith(".safetensors"):
        raise SpareInputError(f"LoRA path '{path}' must end with .safetensors")
    sd = lora.state_dict(key_format, prefix, dtype)
    for k, v in sd.items():
        if not torch.isfinite(v.float()).all():
            raise SpareInputError(f"refusing to save: tensor '{k}' contains NaN/Inf")
    meta = {k: str(v) for k, v in lora.metadata.items()}
    meta.update({"ss_network_dim": str(lora.rank), "ss_network_module": "networks.lora",
                 "spare.key_format": key_format})
    alphas = {float(m["alpha"]) for m in lora.modules.values()}
    if len(alphas) == 1:
        meta["ss_network_alpha"] = str(alphas.pop())
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return path


def load_lora(path: str, network: nn.Module, prefix: str = "diffusion_model.") -> LoraWeights:
    """Read a LoRA file (either key format) for `network`."""
    if not os.path.isfile(path):
        raise SpareInputError(f"LoRA file '{path}' does not exist")
    sd, meta = read_safetensors(path, "LoRA file")
    return LoraWeights.from_state_dict(sd, network, prefix, meta, source=f"LoRA file '{os.path.basename(path)}'")


class AppliedLora(_Hooks):
    """Forward hooks adding a LoRA at `strength`; `remove()` (or leaving the `with` block) restores the network."""

    def __init__(self, network: nn.Module, lora: LoraWeights, strength: float):
        self._handles = []
        if strength == 0.0:
            return  # strength 0 is the original model, bit for bit: no hook at all
        modules = dict(network.named_modules())
        missing = [p for p in lora.modules if p not in modules]
        if len(missing) == len(lora.modules):
            raise SpareInputError(f"none of the LoRA's {len(missing)} modules exists in this model "
                                  f"(first: '{missing[0]}')")
        for path, m in lora.modules.items():
            if path in modules:
                self._handles.append(modules[path].register_forward_hook(self._hook(m, strength)))

    @staticmethod
    def _hook(m, strength):
        down, up = m["down"], m["up"]
        scale = strength * float(m["alpha"]) / down.shape[0]
        cache = {}

        def weights(x):
            key = (x.device, x.dtype)
            if key not in cache:
                cache.clear()
                cache[key] = (down.to(x.device, torch.float32), up.to(x.device, torch.float32))
            return cache[key]

        def hook(module, args, output):
            x = args[0]
            d, u = weights(x)
            if d.dim() == 2:
                delta = nn.functional.linear(nn.functional.linear(x.float(), d), u)
            else:
                delta = nn.functional.conv2d(
                    nn.functional.conv2d(x.float(), d, None, module.stride, module.padding, module.dilation), u)
            return output + (scale * delta).to(output.dtype)
        return hook



def apply_lora(network: nn.Module, lora: LoraWeights, strength: float = 1.0) -> AppliedLora:
    """Add `lora` to `network` in memory at `strength` (0 = original). Use as a context manager or call remove()."""
    if not math.isfinite(strength):
        raise SpareInputError(f"strength={strength} must be a finite number")
    return AppliedLora(network, lora, strength)


def metadata_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)
