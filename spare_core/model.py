"""The one interface SPARE needs from a text-to-image diffusion model.

ComfyUI's loaded objects (a ModelPatcher's BaseModel + CLIP) are wrapped into it by `nodes/host.py`; the MiniCanvas
benchmark model (`bench/minicanvas`) and the tests' tiny denoiser implement it directly. `spare_core` never imports
`comfy`: everything it does to a model goes through these few members.

Spaces and conventions (k-diffusion / ComfyUI):
- `sigma` is the noise level, x_t = add_noise(x0, eps, sigma) (for EPS and V-prediction models x_t = x0 + sigma*eps).
- `predict_x0(x_t, sigma, cond)` returns the model's *denoised* estimate x0 (ComfyUI's `apply_model` does the same,
  whatever the prediction type).
- `t` is the normalised noise position in [0, 1]: 0 = clean end of the schedule, 1 = the noisiest end.
  `sigma_at(t)` maps it to sigma (ComfyUI: `model_sampling.percent_to_sigma(1 - t)`).
- A `cond` is opaque to SPARE: whatever `encode(prompts)` returns for a batch of prompts, consumed only by
  `predict_x0`. `select_cond(cond, index)` takes rows of it (a batch of prompts -> a sub-batch).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class DiffusionModel(Protocol):
    """What SPARE reads from a diffusion model. All tensors are on `device`."""

    network: nn.Module
    """The denoiser (UNet/DiT). Adapters are attached to its Linear/Conv modules by forward hooks, never by
    restructuring it (ComfyUI shares this module between model clones)."""

    key_prefix: str
    """Prefix of the network's weights in a LoRA file, e.g. "diffusion_model." for ComfyUI."""

    latent_shape: tuple[int, ...]
    """Shape of one latent sample used for self-generated training data: (C, H, W), or (C, T, H, W) for families whose
    latents carry a frame axis (Qwen-Image: T = 1)."""

    device: torch.device
    dtype: torch.dtype
    """Dtype the network computes in (fp32 on CPU; fp16/bf16 models train under autocast)."""

    # Optional: `family` (a spare_core.families.Family or its name), the model family; absent = a UNet (families.UNET).
    # Optional: `text_encoder` (nn.Module) with `encode_text(prompts)`: the text encoder `encode` runs, so that the
    # distillation can put adapters on it too (DistillConfig.text_encoder). encode_text is encode computed now,
    # through text_encoder's modules as they are (adapters included), differentiable under grad mode: no cache.
    # `text_key_prefix` (default TEXT_KEY_PREFIX): what its module paths get in a LoRA, so that they name the keys of
    # the host's text-encoder state dict ("text_encoders." + the path ComfyUI's CLIP model has for it).
    # Optional: pseudo words (DistillConfig.pseudo_rows): `pseudo_words` (a dict; None or absent = none), read by
    # `encode` -- a prompt word that is one of its keys is read as its value --, `prompt_words(prompt)`,
    # `knows_word(word)` and `pseudo_word(word, radius, generator)` (distill.pseudo_bank says what each does).

    def encode(self, prompts: Sequence[str]) -> Any:
        """Text conditioning for a batch of prompts (opaque to SPARE). SPARE calls it under torch.no_grad()."""

    def select_cond(self, cond: Any, index: torch.Tensor) -> Any:
        """Rows `index` (a LongTensor into the prompt batch) of a conditioning, in that order."""

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """Denoised estimate. x: [B, C, H, W] noisy latent; sigma: [B]; returns [B, C, H, W] in x0 space."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Forward process: x_t for clean x0 [B,C,H,W], unit Gaussian noise, sigma [B]."""

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level for normalised positions t in [0, 1] (1 = noisiest). Shape preserved."""


TEXT_KEY_PREFIX = "text_encoders."
"""Text-encoder modules in a LoraWeights and in a ComfyUI-format file: "text_encoders.<the text encoder's module
path>" (comfy/lora.py model_lora_keys_clip maps "text_encoders.<state-dict key>" for every encoder it loads)."""


def text_encoder_of(model: DiffusionModel) -> Optional[nn.Module]:
    """The model's trainable text encoder, or None (a model without one, or without `encode_text`)."""
    te = getattr(model, "text_encoder", None)
    return te if isinstance(te, nn.Module) and callable(getattr(model, "encode_text", None)) else None


class LoraTargets:
    """The modules a LoRA's paths name: the network's under their own paths, the text encoder's (if any) under
    TEXT_KEY_PREFIX (or the model's text_key_prefix). It offers the one nn.Module method that adapters and the file format read, `named_modules`
    (hand-written: registering both as children of a new nn.Module would give the network's modules a prefix that
    its LoRA files and saliency paths do not have)."""

    def __init__(self, network: nn.Module, text_encoder: Optional[nn.Module] = None, prefix: str = TEXT_KEY_PREFIX):
        self.network, self.text_encoder, self.prefix = network, text_encoder, prefix

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        yield from self.network.named_modules()
        if self.text_encoder is not None:
            for name, module in self.text_encoder.named_modules():
                if name:
                    yield self.prefix + name, module


def text_key_prefix(model: DiffusionModel) -> str:
    """The prefix of the model's text-encoder modules in a LoRA (`text_key_prefix`, default TEXT_KEY_PREFIX)."""
    prefix = getattr(model, "text_key_prefix", TEXT_KEY_PREFIX)
    if not prefix.startswith(TEXT_KEY_PREFIX):
        raise ValueError(f"text_key_prefix '{prefix}' must start with '{TEXT_KEY_PREFIX}'")
    return prefix


def lora_targets(model: DiffusionModel) -> LoraTargets:
    """Where a LoRA trained on `model` goes: its network and, if it has one, its text encoder."""
    return LoraTargets(model.network, text_encoder_of(model), text_key_prefix(model))


def is_text_path(path: str) -> bool:
    return path.startswith(TEXT_KEY_PREFIX)
