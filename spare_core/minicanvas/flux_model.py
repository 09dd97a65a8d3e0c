"""MiniCanvas-Flux: a tiny text-to-image model that IS ComfyUI's Flux architecture, trained from scratch on CPU.

    from spare_core.minicanvas.flux_model import load
    model = load()                                           # shipped weights, fp32 on CPU (needs ComfyUI importable)
    images = model.sample(["A star image in ukiyo style."], seed=0, steps=12, cfg=4.0)   # [1, 3, 32, 32] in [0, 1]

- network: `comfy.ldm.flux.model.Flux` itself (ComfyUI's class, not a copy), built with small sizes: double-stream
  blocks, single-stream blocks, RoPE over (index, row, column) ids (EmbedND, `axes_dim` summing to the head dim),
  `time_in`, `vector_in` fed by a pooled text vector (Flux's CLIP-L pooled `y`), `txt_in` fed by per-token text
  states (Flux's T5 tokens), no guidance embedding (CFG instead, like Flux-dev's undistilled cousins / Chroma). Its
  state dict has ComfyUI's Flux keys (`double_blocks.0.img_attn.qkv.weight`, `single_blocks.1.linear1.weight`,
  `final_layer.linear.weight`, ...); the shipped file prefixes them with `diffusion_model.` like a Flux checkpoint.
  Built with plain torch.nn Linear / LayerNorm as `operations` (ComfyUI's `disable_weight_init` would leave weights
  uninitialised) and trained in fp32.
- "latent": pixel space, no VAE. The image in [-1, 1] (3 x 32 x 32) is pixel-unshuffled by PIXEL_UNSHUFFLE = 2 into a
  12 x 16 x 16 latent; Flux then patchifies it 2 x 2 itself (`process_img`: "b c (h ph) (w pw) -> b (h w) (c ph
  pw)"; ComfyUI's Flux forward hard-codes 2 x 2 patches), so in_channels = out_channels = 12 (48 features per token)
  and the image is 8 x 8 = 64 tokens: a 4 x 4 pixel patch per token. 64 tokens instead of 256 (patches of 2 x 2
  pixels) makes a training step ~4x cheaper on one CPU thread, which is what lets ~2000+ steps fit in 40 minutes.
  A ComfyUI host sees a 12-channel 16 x 16 latent; `to_latent` / `from_latent` are the "VAE".
- positions: RoPE only (Flux has no absolute position embedding). Text tokens carry id (0, 0, 0) as in ComfyUI's
  `_forward`, so image-to-text attention sees each image token's absolute (row, column) relative to them.
- text encoder: the MiniCanvas one (model.TextEncoder: word tokens, learned positions, small pre-norm transformer),
  trained jointly, plus an attention pool (model.TextPool: a learned query cross-attending to the tokens) giving
  the pooled vector `y` [B, text_dim] that Flux's `vector_in` takes. encode() returns (tokens [B, L, D], pooled).
- flow matching, ComfyUI's formulas (model_sampling.CONST + ModelSamplingFlux): sigma in [0, 1],
  x_t = (1 - sigma) x0 + sigma eps, the network predicts v = eps - x0 (input x_t unscaled, timestep = sigma; Flux's
  timestep_embedding multiplies by 1000), denoised = x_t - sigma v. Sampling schedule: ComfyUI's "simple" scheduler
  on ModelSamplingFlux's sigma(t) = e^shift / (e^shift + 1/t - 1) with shift = SHIFT (ComfyUI's `shift` of
  ModelSamplingFlux, 1.15 for Flux-dev; here DEFAULT_SHIFT).
- sampling: Euler or DPM-Solver++(2M) on those sigmas (flow_sample_loop), classifier-free guidance (10% of
  training prompts are "").
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import types
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import families
from . import data
from .model import SPECIAL_TOKENS, PseudoWords, TextEncoder, TextPool, Tokenizer, to_image

WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
MODEL_FILE = WEIGHTS_DIR / "minicanvas_flux.safetensors"
CONFIG_FILE = WEIGHTS_DIR / "minicanvas_flux.json"
KEY_PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoder."
DEFAULT_COMFYUI = pathlib.Path.home() / ".cache" / "spare-comfyui" / "comfyui-v0.3.64-a125cd84"
DEFAULT_SHIFT = 1.15   # ModelSamplingFlux's shift (mu): sigma(t) = e^mu / (e^mu + 1/t - 1); Flux-dev's default
DEFAULT_STEPS = 12
DEFAULT_CFG = 4.0


@dataclass
class FluxMiniConfig:
    # text encoder (model.TextEncoder reads these names)
    vocab: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS) + data.vocabulary())
    max_tokens: int = 16
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    # image
    image_size: int = data.SIZE
    pixel_unshuffle: int = 2          # pixels -> latent (12 x 16 x 16); Flux patchifies 2 x 2 on top
    # comfy.ldm.flux.model.Flux kwargs (FluxParams)
    hidden_size: int = 128
    num_heads: int = 4
    depth: int = 2
    depth_single_blocks: int = 2
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, ...] = (8, 12, 12)
    theta: int = 10_000
    qkv_bias: bool = True
    shift: float = DEFAULT_SHIFT
    # Flux-dev's guidance embedding (`guidance_in`): the guidance-distilled variant MiniCanvas-Flux-dev
    # (bench/minicanvas/train_flux_dev.py), sampled at cfg 1 with the guidance as an input
    guidance_embed: bool = False

    @property
    def latent_channels(self) -> int:
        return 3 * self.pixel_unshuffle ** 2

    def flux_params(self) -> dict[str, Any]:
        """FluxParams as ComfyUI's model_detection would produce them for this model (patch_size 2; a guidance
        embedding for the -dev variant only)."""
        return dict(in_channels=self.latent_channels, out_channels=self.latent_channels, vec_in_dim=self.text_dim,
                    context_in_dim=self.text_dim, hidden_size=self.hidden_size, mlp_ratio=self.mlp_ratio,
                    num_heads=self.num_heads, depth=self.depth, depth_single_blocks=self.depth_single_blocks,
                    axes_dim=list(self.axes_dim), theta=self.theta, patch_size=2, qkv_bias=self.qkv_bias,
                    guidance_embed=self.guidance_embed)


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI import

def import_comfy(path: str | os.PathLike | None = None):
    """Put ComfyUI on sys.path (COMFYUI_PATH, else the cached checkout), force CPU mode before
    comfy.model_management is imported (as tests/comfy_fixtures.comfy_or_skip does), return comfy.ldm.flux.model."""
    path = str(path or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI)
    if not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        raise ImportError(f"no ComfyUI checkout at {path} (set COMFYUI_PATH)")
    if path not in sys.path:
        sys.path.append(path)  # after the repo: this pack's own packages keep their names
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    import comfy.ldm.flux.model as flux_model
    return flux_model


class CopyLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that normalises a copy of its input while gradients are on. ComfyUI's Flux blocks add residuals in
    place (`txt += ...`, `x += ...`) to a tensor a LayerNorm saved for backward; the copy keeps training exact (the
    same fix as spare_core.autograd's inplace_safe). No parameters (Flux's norms have elementwise_affine=False)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.clone() if torch.is_grad_enabled() and x.requires_grad else x)


# plain torch layers as ComfyUI `operations` (default init; state-dict keys identical to comfy.ops')
TORCH_OPS = types.SimpleNamespace(Linear=nn.Linear, LayerNorm=CopyLayerNorm, Conv2d=nn.Conv2d,
                                  GroupNorm=nn.GroupNorm, Embedding=nn.Embedding)


def build_flux(cfg: FluxMiniConfig) -> nn.Module:
    """comfy.ldm.flux.model.Flux with cfg's sizes, initialised: default torch init for Linear, RMSNorm scales 1,
    adaLN-Zero (every modulation and the final projection start at 0: each block starts as the identity)."""
    flux = import_comfy().Flux(operations=TORCH_OPS, dtype=torch.float32, **cfg.flux_params())
    with torch.no_grad():
        for name, p in flux.named_parameters():
            if name.endswith(".scale"):   # QKNorm's RMSNorm scales are torch.empty
                p.fill_(1.0)
        for name, m in flux.named_modules():
            if name.endswith("_mod.lin") or name.endswith("modulation.lin") or name in (
                    "final_layer.adaLN_modulation.1", "final_layer.linear"):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
    return flux


class FluxTextEncoder(nn.Module):
    """Word tokens [B, L] -> (per-token states [B, L, D] for `txt_in`, pooled vector [B, D] for `vector_in`)."""

    def __init__(self, cfg: FluxMiniConfig):
        super().__init__()
        self.encoder = TextEncoder(cfg)
        self.pool = TextPool(cfg.text_dim, cfg.text_dim, cfg.text_dim // cfg.text_heads)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.encoder(tokens)
        return ctx, self.pool(ctx)


def to_latent(img: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Image [B, 3, H, W] in [0, 1] -> latent [B, 3 f^2, H/f, W/f] in [-1, 1]."""
    return F.pixel_unshuffle(img * 2 - 1, factor)


def from_latent(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Latent -> image in [0, 1]."""
    return to_image(F.pixel_shuffle(x, factor))


def flux_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """ModelSamplingFlux.sigma: flux_time_shift(shift, 1.0, t) = e^shift / (e^shift + 1/t - 1)."""
    return math.exp(shift) / (math.exp(shift) + (1 / t - 1))


def flow_sigmas(steps: int, shift: float = DEFAULT_SHIFT, table: int = 10_000) -> torch.Tensor:
    """ComfyUI's "simple" scheduler on ModelSamplingFlux(shift): steps sigmas from 1 down, then 0."""
    ts = flux_sigma(torch.arange(1, table + 1, dtype=torch.float64) / table, shift).float()
    ss = table / steps
    return torch.tensor([float(ts[-(1 + int(i * ss))]) for i in range(steps)] + [0.0])


# The family SPARE trains it as: Flux's blocks and modules (double_blocks / single_blocks, in-place residuals), but
# sampled with classifier-free guidance: the model has no guidance embedding and was trained with 10% of its prompts
# dropped to "", so it is not guidance-distilled, and families.FLUX / FLUX_SCHNELL would make SPARE draw its concept
# samples at cfg 1. Named "flux" (its LoRA files say spare.family "flux"); not in families.FAMILIES, whose "flux" is
# Flux.1-dev. The ComfyUI demo MODEL declares it too (nodes/demo_model.py).
MINICANVAS_FLUX_FAMILY = replace(
    families.FLUX, label="MiniCanvas-Flux (the Flux.1 architecture, sampled with CFG)", guidance_distilled=False,
    architecture="flux-1-minicanvas/lora")
# The guidance-distilled variant (MiniCanvas-Flux-dev): Flux.1-dev's family itself (sampled at cfg 1, guidance an
# input of the network), with its own architecture tag in the files it produces.
MINICANVAS_FLUX_DEV_FAMILY = replace(
    families.FLUX, label="MiniCanvas-Flux-dev (the Flux.1-dev architecture, guidance-distilled)",
    architecture="flux-1-minicanvas-dev/lora")
DEV_MODEL_FILE = WEIGHTS_DIR / "minicanvas_flux_dev.safetensors"
FLUX_GUIDANCE = 3.5  # ComfyUI's FluxGuidance default, the guidance the -dev variant is sampled and erased at


class MiniCanvasFlux(PseudoWords):
    """The model: tokenizer + text encoder + ComfyUI Flux + flow sampling. Latents are [B, 12, 16, 16]. It is a
    spare_core DiffusionModel (encode, select_cond, predict_x0, add_noise, sigma_at; family MINICANVAS_FLUX_FAMILY),
    so the benchmark erases from it with spare_core as from the UNet (`python -m bench.minicanvas --model flux`)."""

    key_prefix = KEY_PREFIX
    # its text encoder's modules in a LoRA (DistillConfig.text_encoder "on", an experiment on this model): the keys
    # ComfyUI maps for the demo CLIP, which keeps the weights file's "text_encoder." names (nodes/demo_model.py)
    text_key_prefix = "text_encoders." + TEXT_PREFIX

    def __init__(self, cfg: FluxMiniConfig | None = None, device: torch.device | str = "cpu"):
        self.cfg = cfg or FluxMiniConfig()
        # the -dev variant: the guidance every prediction is made at (what a FluxGuidance node sets on a ComfyUI
        # CONDITIONING); training and sampling both read it, as SPARE's stages and the KSampler share one conditioning
        self.guidance = FLUX_GUIDANCE
        self.family = MINICANVAS_FLUX_DEV_FAMILY if self.cfg.guidance_embed else MINICANVAS_FLUX_FAMILY
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.network = build_flux(self.cfg).to(self.device)
        self.text_encoder = FluxTextEncoder(self.cfg).to(self.device)
        self.tokenizer = Tokenizer(self.cfg.vocab, self.cfg.max_tokens)
        self.pseudo_words: dict[str, torch.Tensor] = {}  # word -> token embedding (DistillConfig.pseudo_rows)
        f = self.cfg.pixel_unshuffle
        self.latent_shape = (self.cfg.latent_channels, self.cfg.image_size // f, self.cfg.image_size // f)

    # --- conditioning / prediction ----------------------------------------------------------------------------------
    @property
    def words_encoder(self) -> TextEncoder:
        return self.text_encoder.encoder

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, L, D], pooled y [B, D]). A word of `pseudo_words` is read as its embedding there."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        if not self.pseudo_words:
            return self.text_encoder(tokens)
        ctx = self.text_encoder.encoder.from_embeddings(self.pseudo_embeddings(prompts, tokens))
        return ctx, self.text_encoder.pool(ctx)

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`, through the text encoder as it is now (DistillConfig.text_encoder trains adapters on it)."""
        return self.encode(prompts)

    @staticmethod
    def select_cond(cond: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(cond[0].device)
        return cond[0][index], cond[1][index]

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """ModelSamplingFlux: sigma = flux_sigma(t, shift) for the normalised position t (1 = noisiest)."""
        return flux_sigma(t.clamp_min(1e-6), self.cfg.shift)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """CONST.noise_scaling: x_t = sigma * eps + (1 - sigma) * x0."""
        s = sigma.view(-1, 1, 1, 1)
        return s * noise + (1 - s) * x0

    @staticmethod
    def v_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def predict_v(self, x: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Raw Flux output v. x: latent [B, 12, 16, 16]; sigma [B] in [0, 1] (timestep = sigma, ModelSamplingFlux)."""
        ctx, y = cond
        if self.cfg.guidance_embed:
            return self.network(x, sigma, ctx, y=y, guidance=torch.full_like(sigma, self.guidance))
        return self.network(x, sigma, ctx, y=y)

    def predict_x0(self, x, sigma, cond):
        """CONST.calculate_denoised: x_t - sigma * v."""
        return x - sigma.view(-1, 1, 1, 1) * self.predict_v(x, sigma, cond)

    # --- sampling -------------------------------------------------------------------------------------------------
    def initial_noise(self, n: int, seed: int | Sequence[int]) -> torch.Tensor:
        """Unit noise [n, 12, 16, 16]; image i uses seed + i (or seeds[i]), independent of the batch it is in."""
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        assert len(seeds) == n
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(self.device)

    def guided_x0(self, cond, uncond, cfg: float):
        def denoise(x, sigma):
            if cfg == 1.0:
                return self.predict_x0(x, sigma, cond).clamp(-1, 1)
            both_cond = (torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))
            both = self.predict_x0(torch.cat([x, x]), torch.cat([sigma, sigma]), both_cond)
            c, u = both.chunk(2)
            return (u + cfg * (c - u)).clamp(-1, 1)  # static thresholding: images live in [-1, 1]
        return denoise

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int | Sequence[int] = 0, steps: int = DEFAULT_STEPS,
               cfg: float = DEFAULT_CFG, sampler: str = "dpmpp_2m", negative: str = "", shift: float | None = None,
               return_latent: bool = False, batch_size: int = 128) -> torch.Tensor:
        """Images [B, 3, 32, 32] in [0, 1] (or latents [B, 12, 16, 16] if return_latent). Deterministic given seed.
        The guidance-distilled variant is sampled at cfg 1 (`cfg` ignored) at its `guidance`, as ComfyUI samples
        Flux-dev."""
        prompts = list(prompts)
        if self.cfg.guidance_embed:
            cfg = 1.0
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        sigmas = flow_sigmas(steps, self.cfg.shift if shift is None else shift).to(self.device)
        outs = []
        for a in range(0, len(prompts), batch_size):
            p, s = prompts[a: a + batch_size], seeds[a: a + batch_size]
            cond, uncond = self.encode(p), self.encode([negative] * len(p))
            x = self.initial_noise(len(p), s)  # sigma_max = 1: x_1 = eps
            outs.append(flow_sample_loop(self.guided_x0(cond, uncond, cfg), x, sigmas, sampler))
        x = torch.cat(outs)
        return x if return_latent else from_latent(x, self.cfg.pixel_unshuffle)

    # --- weights ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {KEY_PREFIX + k: v for k, v in self.network.state_dict().items()}
        sd.update({TEXT_PREFIX + k: v for k, v in self.text_encoder.state_dict().items()})
        return sd

    def config_json(self, extra: dict | None = None) -> dict:
        d = asdict(self.cfg)
        d.pop("vocab")
        d["axes_dim"] = list(self.cfg.axes_dim)
        return {"format": "minicanvas-flux-v1", "config": d, "flux_params": self.cfg.flux_params(),
                "vocab": self.cfg.vocab, "model_sampling": {"type": "ModelSamplingFlux (CONST)", "shift": self.cfg.shift},
                **(extra or {})}

    def save(self, path: str | pathlib.Path = MODEL_FILE, dtype: torch.dtype = torch.float16,
             metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        path = pathlib.Path(path)
        cj = self.config_json({"training": metadata or {}})
        meta = {"config": json.dumps(cj["config"]), "vocab": json.dumps(self.cfg.vocab), "format": cj["format"],
                "modelspec.architecture": "Flux.1-minicanvas", "shift": str(self.cfg.shift)}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}, str(path), meta)
        path.with_suffix(".json").write_text(json.dumps(cj, indent=1) + "\n")


def flow_sample_loop(denoise, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "dpmpp_2m") -> torch.Tensor:
    """Samplers on the CONST (flow) sigmas. denoise(x, sigma [B]) -> x0; sigmas from 1 down to 0.
    Euler: x' = x0 + (s'/s)(x - x0) (k-diffusion's Euler step, which is the flow ODE step on CONST sigmas).
    dpmpp_2m: DPM-Solver++(2M) (Lu et al., data prediction) for x_t = alpha x0 + sigma eps with alpha = 1 - sigma,
    on lambda = log(alpha / sigma). (ComfyUI's k-diffusion sample_dpmpp_2m uses the alpha = 1 formulas on whatever
    sigmas it is given; with 12+ steps the two differ little.) The first step from sigma = 1 is an Euler step."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d0 = denoise(x, s.expand(x.shape[0]))
        if s_next == 0:
            x = d0
        elif sampler == "euler":
            x = d0 + (s_next / s) * (x - d0)
        elif sampler == "dpmpp_2m":
            # DPM-Solver++(2M) in data prediction for x_t = alpha x0 + sigma eps, alpha = 1 - s:
            # lambda = log(alpha / sigma); x' = (s'/s) x - alpha' expm1(-h) D
            if s >= 1:  # lambda = -inf: the DPM++ step is the Euler step
                x, h_last = d0 + s_next * (x - d0), None
            else:
                h = torch.log((1 - s_next) / s_next) - torch.log((1 - s) / s)
                if old is None or h_last is None:
                    d = d0
                else:
                    r = h_last / h
                    d = (1 + 1 / (2 * r)) * d0 - (1 / (2 * r)) * old
                x = (s_next / s) * x - (1 - s_next) * torch.expm1(-h) * d
                h_last = h
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
        old = d0
    return x


def load(path: str | pathlib.Path = MODEL_FILE, device: torch.device | str = "cpu") -> MiniCanvasFlux:
    """The shipped MiniCanvas-Flux model (fp32, eval mode, requires_grad off)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg_d: dict[str, Any] = json.loads(meta["config"])
    cfg_d["axes_dim"] = tuple(cfg_d["axes_dim"])
    model = MiniCanvasFlux(FluxMiniConfig(vocab=json.loads(meta["vocab"]), **cfg_d), device=device)
    sd = load_file(str(path))
    model.network.load_state_dict({k[len(KEY_PREFIX):]: v.float() for k, v in sd.items() if k.startswith(KEY_PREFIX)})
    model.text_encoder.load_state_dict({k[len(TEXT_PREFIX):]: v.float() for k, v in sd.items()
                                        if k.startswith(TEXT_PREFIX)})
    for m in (model.network, model.text_encoder):
        m.eval().requires_grad_(False)
    return model
