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

from typing import Any, Protocol, Sequence, runtime_checkable

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
