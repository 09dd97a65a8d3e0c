"""The LoRA file: `LoraWeights` (per module path: down, up, alpha) and its two key formats, saved and loaded.

File format facts (comfy/lora.py, comfy/weight_adapter/lora.py; kohya networks/lora.py):
- ComfyUI native: "<prefix><module path>.lora_up.weight" [out, r(,1,1)], ".lora_down.weight" [r, in(,kh,kw)],
  ".alpha" scalar; prefix "diffusion_model." for ComfyUI models.
- kohya: "lora_unet_<module path with '.' -> '_'>" + the same suffixes; A1111/Forge load it for SD1.5/SDXL.
- peft-style ".lora_B.weight" / ".lora_A.weight" are read as up / down.
- Text-encoder modules (a LoRA trained with DistillConfig.text_encoder): ComfyUI native "text_encoders.<the CLIP
  state-dict path>" (model_lora_keys_clip maps it for every encoder; LoraWeights holds them under that path, see
  model.TEXT_KEY_PREFIX); kohya "lora_te_text_model_encoder_layers_<i>_<module>" for one CLIP encoder (SD1.x: clip_l,
  SD2.x: clip_h), "lora_te1_" (clip_l) and "lora_te2_" (clip_g) for SDXL's two.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import SpareInputError
from .families import split_slice
from .files import atomic_write, read_safetensors
from .model import TEXT_KEY_PREFIX, is_text_path

log = logging.getLogger("spare")

KOHYA_PREFIX = "lora_unet_"
KEY_FORMATS = ("comfyui", "kohya")
UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight")
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
ALPHA_SUFFIX = ".alpha"
ADAPTABLE = (nn.Linear, nn.Conv2d)  # the module types a LoRA carries an update for (down/up: Linear or Conv2d weights)
TEXT_KEY_STARTS = (TEXT_KEY_PREFIX, "lora_te")  # a file's text-encoder keys, ComfyUI's and kohya's
KOHYA_TEXT = re.compile(r"^text_encoders\.(clip_[lgh])\.transformer\.(text_model\..+)$")


def kohya_text_names(paths) -> dict[str, str]:
    """kohya names of the CLIP text-encoder paths among `paths` (the keys comfy/lora.py model_lora_keys_clip and
    A1111 / Forge read): "lora_te_" for a model with one CLIP encoder, "lora_te1_" / "lora_te2_" for clip_l / clip_g
    when both are there (SDXL). Paths of other encoders (T5, ...) have no kohya name and are left out."""
    found = {p: m for p in paths if (m := KOHYA_TEXT.match(p))}
    both = {m.group(1) for m in found.values()} >= {"clip_l", "clip_g"}
    tag = {"clip_l": "lora_te1_", "clip_g": "lora_te2_"} if both else {}
    return {p: tag.get(m.group(1), "lora_te_") + m.group(2).replace(".", "_") for p, m in found.items()}


@dataclass
class LoraWeights:
    """A trained (or loaded) LoRA: per module path, `down`, `up` (row mask already applied) and `alpha`."""

    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_adapters(cls, adapters, metadata: Optional[Mapping[str, str]] = None) -> "LoraWeights":
        """The weights an `adapters.AdapterSet` has trained (read through its `adapters` mapping: the file format does
        not import the training hooks; adapters.py imports this module)."""
        modules, sliced = {}, {}
        for name, a in adapters.adapters.items():
            path, part = split_slice(name)
            if part is None and path not in sliced:
                modules[path] = {"down": a.down.weight.detach().float().cpu().clone(),
                                 "up": a.up.weight.detach().float().cpu().clone(),
                                 "alpha": torch.tensor(a.alpha, dtype=torch.float32)}
            else:
                sliced.setdefault(path, []).append(a)
        for path, parts in sliced.items():
            # row slices of one module -> one ordinary LoRA on the whole module (what every loader reads): the
            # slices' down rows stacked, their up columns side by side, zero outside each slice's rows; each slice's
            # scale is folded into its up and alpha = rank, so a loader's alpha / rank is 1
            if path in modules:
                raise ValueError(f"module '{path}' has both a whole-module and row-slice adapters")
            down = torch.cat([a.down.weight.detach().float().cpu() for a in parts])
            up = torch.cat([a.full_up().float().cpu() * a.scale for a in parts], dim=1)
            modules[path] = {"down": down, "up": up, "alpha": torch.tensor(float(down.shape[0]))}
        return cls(modules, dict(metadata or {}))

    def scaled(self, strength: float, text: Optional[float] = None) -> "LoraWeights":
        """This LoRA with `strength` baked into its up weights: at strength 1 it adds what this one adds at
        `strength` (the calibrated strength, calibrate.py). `text`: the text encoder's modules at that strength
        instead (LoraLoader's strength_model / strength_clip; DistillConfig.model_strength is `strength` with text
        1). The same object when nothing changes; a module whose factor is 1 is kept as it is."""
        text = strength if text is None else text
        if strength == 1.0 and text == 1.0:
            return self
        factor = {p: text if is_text_path(p) else strength for p in self.modules}
        return LoraWeights({p: m if factor[p] == 1.0 else {**m, "up": m["up"] * factor[p]}
                            for p, m in self.modules.items()}, dict(self.metadata))

    @property
    def rank(self) -> int:
        return max((m["down"].shape[0] for m in self.modules.values()), default=0)

    @property
    def edits_text_encoder(self) -> bool:
        """Whether some module is the text encoder's (the file then needs a loader that patches the CLIP too)."""
        return any(is_text_path(p) for p in self.modules)

    def num_bytes(self, dtype=torch.float16) -> int:
        size = torch.tensor([], dtype=dtype).element_size()
        return sum(m["down"].numel() + m["up"].numel() for m in self.modules.values()) * size

    def state_dict(self, key_format: str = "comfyui", prefix: str = "diffusion_model.",
                   dtype=torch.float16) -> dict[str, torch.Tensor]:
        """Tensors under ComfyUI-native ("comfyui") or kohya ("kohya") keys."""
        if key_format not in KEY_FORMATS:
            raise SpareInputError(f"key_format='{key_format}' is not one of {', '.join(KEY_FORMATS)}")
        sd, text = {}, kohya_text_names(self.modules) if key_format == "kohya" else {}
        for path, m in self.modules.items():
            if is_text_path(path):  # already "text_encoders.<path>": ComfyUI's key
                name = path if key_format == "comfyui" else text.get(path)
                if name is None:
                    raise SpareInputError(f"key_format='kohya' has no name for the text-encoder module '{path}' "
                                          "(kohya names CLIP encoders only); save with key_format 'comfyui'")
            else:
                name = prefix + path if key_format == "comfyui" else KOHYA_PREFIX + path.replace(".", "_")
            sd[name + ".lora_down.weight"] = m["down"].to(dtype).contiguous()
            sd[name + ".lora_up.weight"] = m["up"].to(dtype).contiguous()
            sd[name + ALPHA_SUFFIX] = m["alpha"].to(dtype)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], network: nn.Module, prefix: str = "diffusion_model.",
                        metadata: Optional[Mapping[str, str]] = None, source: str = "state dict") -> "LoraWeights":
        """Parse either key format against `network`'s module paths (`network`: an nn.Module, or a
        model.LoraTargets, whose text-encoder modules match "text_encoders." and kohya "lora_te*" keys).

        Raises SpareInputError when no key matches a Linear/Conv2d of `network`; unmatched keys are logged.
        """
        paths = {n for n, m in network.named_modules() if isinstance(m, ADAPTABLE)}
        kohya = {KOHYA_PREFIX + p.replace(".", "_"): p for p in paths if not is_text_path(p)}
        kohya.update({name: p for p, name in kohya_text_names(paths).items()})
        groups: dict[str, dict[str, torch.Tensor]] = {}
        unmatched = []
        for key, tensor in sd.items():
            for suffix, part in [(s, "up") for s in UP_SUFFIXES] + [(s, "down") for s in DOWN_SUFFIXES] + \
                                [(ALPHA_SUFFIX, "alpha")]:
                if key.endswith(suffix):
                    stem = key[: -len(suffix)]
                    path = stem[len(prefix):] if stem.startswith(prefix) else \
                        stem if is_text_path(stem) else kohya.get(stem)
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


def file_metadata(lora: LoraWeights, key_format: str, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Every metadata field of a saved LoRA file, in one place: the LoRA's own record (a distilled one:
    distill.lora_metadata, what was trained and how), the caller's `extra` fields (the node: the base model), then
    the format fields, read off the weights so that they always match them (kohya's ss_network_*: A1111, Forge and
    kohya's tools read them; ss_network_alpha only when every module has the same alpha)."""
    alphas = {float(m["alpha"]) for m in lora.modules.values()}
    return {**{k: str(v) for k, v in {**lora.metadata, **(extra or {})}.items()},
            "ss_network_dim": str(lora.rank), "ss_network_module": "networks.lora", "spare.key_format": key_format,
            **({"ss_network_alpha": str(alphas.pop())} if len(alphas) == 1 else {})}


def save_lora(path: str, lora: LoraWeights, key_format: str = "comfyui", prefix: str = "diffusion_model.",
              dtype=torch.float16, metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write a .safetensors LoRA atomically (temporary file in the same folder, then rename). Returns `path`.
    metadata: fields the file carries besides the LoRA's own (file_metadata)."""
    if not str(path).endswith(".safetensors"):
        raise SpareInputError(f"LoRA path '{path}' must end with .safetensors")
    sd = lora.state_dict(key_format, prefix, dtype)
    for k, v in sd.items():
        if not torch.isfinite(v.float()).all():
            raise SpareInputError(f"refusing to save: tensor '{k}' contains NaN/Inf")
    meta = file_metadata(lora, key_format, metadata)
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return path


def load_lora(path: str, network: nn.Module, prefix: str = "diffusion_model.") -> LoraWeights:
    """Read a LoRA file (either key format) for `network`."""
    if not os.path.isfile(path):
        raise SpareInputError(f"LoRA file '{path}' does not exist")
    sd, meta = read_safetensors(path, "LoRA file")
    return LoraWeights.from_state_dict(sd, network, prefix, meta, source=f"LoRA file '{os.path.basename(path)}'")


def metadata_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)
