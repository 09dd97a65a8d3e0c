"""LoRA on a live network, by forward hooks: trainable adapters for the distillation (`LoraAdapter` on one module,
`attach` / `AdapterSet` on a whole network) and a finished `LoraWeights` added at a strength (`apply_lora`: tests, the
benchmark, scripts; inside ComfyUI the host's own LoRA loader applies the files).

Why not peft's injection: peft replaces each target module by a wrapper (`base_layer` + adapters), i.e. it
restructures the network. ComfyUI shares `diffusion_model` between every clone of a MODEL and addresses weight
patches and LoRA files by module path, so SPARE must never rename or replace modules. Like kohya's sd-scripts, we
add the low-rank term with a forward hook and keep the base module untouched; removing the hook restores the
network exactly. The parameterisation and init are peft's (LoRA "gaussian" init: A ~ N(0, 1/r), B = 0;
scale = alpha / r), so a SPARE adapter is numerically a peft LoRA.

This module imports the file format (lora.py: `LoraWeights`, `ADAPTABLE`), never the reverse.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from .errors import SpareInputError
from .families import slice_rows, split_slice
from .lora import ADAPTABLE, LoraWeights  # noqa: F401  (ADAPTABLE lives with the file format; re-exported here)
from .model import is_text_path


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear/Conv2d as seen by a LoRA: rank must not exceed min(fan_in, fan_out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw // module.groups, module.out_channels
    raise TypeError(f"{type(module).__name__} cannot carry a LoRA (Linear and Conv2d can)")


class LoraAdapter(nn.Module):
    """Low-rank delta for one base module: delta(x) = scale * up(down(dropout(x))).

    Linear: down [r, in], up [out, r]. Conv2d: down is a conv with the base kernel/stride/padding, up is 1x1.
    rows (Linear only): (a, b) = the adapter updates output rows [a, b) only (a row slice of a fused projection):
    up is [b - a, r] and the delta is zero elsewhere.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rows: Optional[tuple[int, int]] = None):
        super().__init__()
        fan_out = module_dims(base)[1]
        self.rows = None if rows is None or tuple(rows) == (0, fan_out) else (rows[0], rows[1], fan_out)
        if self.rows is not None and not isinstance(base, nn.Linear):
            raise TypeError("a row-slice adapter needs a Linear")
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            out = base.out_features if self.rows is None else self.rows[1] - self.rows[0]
            self.up = nn.Linear(rank, out, bias=False)
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

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(dropout(x))) without the scale: the hook adds it scaled in one op (`torch.add(..., alpha=)`). A
        row-slice adapter's delta is padded with zeros to the module's width (out of place: autograd stays exact)."""
        delta = self.up(self.down(self.dropout(x)))
        if self.rows is not None:
            a, b, fan_out = self.rows
            delta = nn.functional.pad(delta, (a, fan_out - b))
        return delta

    def full_up(self) -> torch.Tensor:
        """up as a weight of the whole module: [out, r(,1,1)], zero outside a row slice."""
        w = self.up.weight.detach()
        if self.rows is None:
            return w
        a, b, fan_out = self.rows
        full = w.new_zeros(fan_out, w.shape[1])
        full[a:b] = w
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low_rank(x) * self.scale


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
    """Adapters hooked onto a network's modules. `enabled` toggles them: `with adapters.disabled():` runs the
    network as it was (the distillation's teacher); outside, the network with the adapters (the student)."""

    def __init__(self, network: nn.Module, adapters: Mapping[str, LoraAdapter]):
        self.network = network
        self.adapters = dict(adapters)
        self.enabled = True
        self.strength = 1.0
        modules = dict(network.named_modules())
        # a row slice's name is '<module path>[q]' (families.split_slice): its hook goes on the module
        self._handles = [modules[split_slice(path)[0]].register_forward_hook(self._hook(adapter))
                         for path, adapter in self.adapters.items()]

    def _hook(self, adapter: LoraAdapter):
        dtype = adapter.down.weight.dtype

        # The student's forward runs this hook on every adapted module: as few ops as possible (scale and strength
        # fused into the add; no-op casts skipped). With scale 1 and strength 1 (the defaults) it is bit-identical
        # to output + strength * (scale * delta).
        def hook(module, args, output):
            if not self.enabled or self.strength == 0.0:
                return output
            x = args[0]
            delta = adapter.low_rank(x if x.dtype == dtype else x.to(dtype))
            if delta.dtype != output.dtype:
                delta = delta.to(output.dtype)
            return torch.add(output, delta, alpha=adapter.scale * self.strength)
        return hook

    @contextlib.contextmanager
    def disabled(self):
        """Inside the block the network runs without the adapters (the distillation's frozen teacher); leaving it
        switches them back on as they were."""
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled

    def parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters()]


def attach(network: nn.Module, paths: Iterable[str], rank: int, alpha: float, dropout: float = 0.0,
           device=None, dtype=torch.float32) -> AdapterSet:
    """Create trainable adapters for `paths` (module paths inside `network`) and hook them in."""
    adapters = make_adapters(network, paths, rank, alpha, dropout, device, dtype)
    widest = max((a.rank for a in adapters.values()), default=rank)
    if widest < rank:  # narrow modules are capped (make_adapters); a rank no selected module can take is a mistake
        raise SpareInputError(f"rank={rank} is larger than any selected module allows (the widest takes "
                              f"{widest}); use rank <= {widest}")
    return AdapterSet(network, adapters)


def make_adapters(network: nn.Module, paths: Iterable[str], rank: int, alpha: float, dropout: float = 0.0,
                  device=None, dtype=torch.float32) -> dict[str, LoraAdapter]:
    """Fresh (zero-update) adapters for `paths`, checked against the network; not hooked in."""
    modules = dict(network.named_modules())
    adapters = {}
    for path in paths:
        module_path, part = split_slice(path)
        base = modules.get(module_path)
        if base is None or (part is not None and not isinstance(base, nn.Linear)):
            raise SpareInputError(f"saliency names module '{path}', which the model does not have; "
                                  "was the saliency scanned on a different model?")
        fan_in, fan_out = module_dims(base)
        rows = slice_rows(part, fan_in, fan_out)
        # A module narrower than the rank (e.g. SD's 4-channel output conv at rank 8) gets a full-rank update: rank
        # min(in, out) with alpha scaled so that its update scale stays alpha / rank. The file stores alpha per
        # module and loaders scale by alpha / down rows, so it loads as trained. (peft would over-parameterise.)
        r = min(rank, fan_in, rows[1] - rows[0])
        adapters[path] = LoraAdapter(base, r, alpha * r / rank, dropout, rows).to(device=device, dtype=dtype)
    return adapters


class AppliedLora(_Hooks):
    """Forward hooks adding a LoRA at `strength`; `remove()` (or leaving the `with` block) restores the network."""

    def __init__(self, network: nn.Module, lora: LoraWeights, strength: float):
        self._handles = []
        if strength == 0.0:
            return  # strength 0 is the original model, bit for bit: no hook at all
        modules = dict(network.named_modules())
        missing = [p for p in lora.modules if p not in modules]
        if missing and len(missing) == len(lora.modules):  # (an empty LoRA adds nothing)
            raise SpareInputError(f"none of the LoRA's {len(missing)} modules exists in this model "
                                  f"(first: '{missing[0]}')")
        text = [p for p in missing if is_text_path(p)]
        if text:  # half an erasure is not the erasure: the text side must not be dropped silently
            raise SpareInputError(f"the LoRA edits {len(text)} text-encoder module(s) (first: '{text[0]}') that this "
                                  "network does not have: apply it to spare_core.lora_targets(model), the network "
                                  "and its text encoder")
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
    """Add `lora` to `network` in memory at `strength` (0 = original). Use as a context manager or call remove().
    A LoRA that also edits the text encoder goes onto `model.lora_targets(model)` (network and text encoder)."""
    if not math.isfinite(strength):
        raise SpareInputError(f"strength={strength} must be a finite number")
    return AppliedLora(network, lora, strength)
