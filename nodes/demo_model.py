"""SPARE Demo Model (MiniCanvas): the bundled MiniCanvas models (spare_core.minicanvas) as ComfyUI MODEL, CLIP, VAE and
an empty LATENT, so the pack can be tried on a CPU without any checkpoint. Two models: MiniCanvas (a UNet, below) and
MiniCanvas-Flux (ComfyUI's own Flux class, tiny; its section at the end).

MiniCanvas draws 32 x 32 px images in pixel space (the "latent" is the image in [-1, 1], 3 channels) from prompts
written with a fixed vocabulary of 53 words (styles, objects and template words; see `known_words()`).

How it maps onto ComfyUI (checked against ComfyUI v0.3.64; tests/test_demo_model.py compares KSampler with the
bundled sampler):
- denoiser: `MiniCanvas`, a `comfy.model_base.BaseModel` of type V_PREDICTION_EDM with sigma_min/max/data from the
  weights' config (0.02 / 80 / 0.5). ComfyUI's V_PREDICTION formulas are MiniCanvas' preconditioning exactly:
  c_in = 1 / sqrt(sigma^2 + sd^2), denoised = x sd^2 / (sigma^2 + sd^2) - v sigma sd / sqrt(sigma^2 + sd^2), and
  ModelSamplingContinuousEDM's sigmas are log-linear in [sigma_min, sigma_max] like MiniCanvas' `sigma_at`. ComfyUI
  passes the timestep 0.25 * log(sigma); `MiniCanvasNet` turns it into MiniCanvas' 1000 * t(sigma).
- static thresholding: the bundled sampler clamps the guided x0 to [-1, 1] at every step; the MODEL carries the same
  clamp as a post-CFG function (`clamp_guided_x0`), which every clone (LoRA loaders, Apply Erasure) keeps.
- text encoder: a CLIP whose tokenizer maps words to MiniCanvas' vocabulary (ComfyUI's "(word:1.2)" weights work,
  through sd1_clip.ClipTokenWeightEncoder) and refuses unknown words, naming them and the known vocabulary.
- VAE: ComfyUI's pass-through pixel-space VAE (VAELoader's "pixel_space"): decode = (x + 1) / 2 clamped to [0, 1],
  MiniCanvas' own `to_image`. Latent format: ComfyUI's pixel-space one (latent_formats.ChromaRadiance, identity).
- LoRA keys: the network's state dict is MiniCanvas' own ("diffusion_model.input_blocks.1.1.transformer_blocks.0.
  attn2.to_k.weight", ...), so `comfy.lora.model_lora_keys_unet` maps every module for the stock LoRA loaders.

MiniCanvas-Flux (spare_core/minicanvas/flux_model.py; tests/test_demo_flux_comfy.py compares KSampler with the bundled
sampler) is ComfyUI's own classes throughout:
- denoiser: `MiniCanvasFlux`, a `comfy.model_base.Flux` (ModelType.FLUX: CONST + ModelSamplingFlux with the shift it
  was trained with, 1.15) around `comfy.ldm.flux.model.Flux` built from the weights' FluxParams; KSampler's euler on
  the "simple" scheduler is the bundled euler sampler step for step. The same [-1, 1] post-CFG clamp as MiniCanvas.
- text encoder: the MiniCanvas tokenizer; the encoder returns the per-token states (Flux's `context`) and the pooled
  vector, which CLIPTextEncode puts in the CONDITIONING as pooled_output and model_base.Flux passes as `y`.
- VAE: ComfyUI's pixel-space VAE with a 2 x 2 pixel-(un)shuffle as its model: the latent is the image in [-1, 1]
  unshuffled to 12 x 16 x 16, as the model was trained.
- family: Flux's blocks and modules, but sampled with CFG (`MINICANVAS_FLUX_FAMILY`; nodes/host.py reads the
  BaseModel's `spare_family`): it has no guidance embedding and is not guidance-distilled.
- MiniCanvas-Flux-dev (the same loader, its own weights): MiniCanvas-Flux guidance-distilled as Flux.1-dev is
  (bench/minicanvas/train_flux_dev.py): a `guidance_in` embedding that model_base.Flux feeds from the CONDITIONING's
  `guidance` (FluxGuidance; 3.5 when absent); sampled at cfg 1, family Flux.1-dev's (`MINICANVAS_FLUX_DEV_FAMILY`).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os

import torch
from torch import nn

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
from comfy_api.latest import io

from spare_core import families
from spare_core.errors import SpareInputError
from spare_core.minicanvas import data as mc_data
from spare_core.minicanvas import flux_model as mcf
from spare_core.minicanvas import model as mc

log = logging.getLogger("spare")

WEIGHTS_FILE = str(mc.MODEL_FILE)
FLUX_WEIGHTS_FILE = str(mcf.MODEL_FILE)
FLUX_DEV_WEIGHTS_FILE = str(mcf.DEV_MODEL_FILE)  # MiniCanvas-Flux-dev: guidance-distilled (Flux.1-dev's form)


def config_from_dict(d: dict):
    """MiniCanvasConfig from its JSON form (the weights file's "config" metadata)."""
    d = dict(d)
    for k in ("channel_mult", "attention_levels"):
        d[k] = tuple(d[k])
    d["vocab"] = list(d["vocab"])
    return mc.MiniCanvasConfig(**d)


def known_words(config=None) -> list[str]:
    """The words MiniCanvas' text encoder knows (its vocabulary without the special tokens)."""
    vocab = (config or mc.MiniCanvasConfig()).vocab
    return [w for w in vocab if w not in mc.SPECIAL_TOKENS]


# ----------------------------------------------------------------------------------------------------------------
# Denoiser

class MiniCanvasNet(mc.UNetModel):
    """MiniCanvas' UNet (same modules and state-dict keys) called the way ComfyUI's BaseModel calls a diffusion model:
    forward(x_in, timestep = 0.25 * log(sigma), context=..., control=..., transformer_options=...) -> v."""

    def __init__(self, minicanvas_config: dict, dtype=None, device=None, operations=None, **_ignored):
        cfg = config_from_dict(minicanvas_config)
        super().__init__(cfg)
        self.dtype = dtype or torch.float32  # BaseModel.get_dtype() reads it
        self.image_size = cfg.image_size
        self._log_smin, self._log_smax = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
        self.to(device=device, dtype=self.dtype)

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size) or x.shape[1] != 3:
            raise SpareInputError(
                f"MiniCanvas draws {self.image_size} x {self.image_size} px RGB images (latent [batch, 3, "
                f"{self.image_size}, {self.image_size}]); got a latent {list(x.shape)}: use the LATENT output of "
                f"SPARE Demo Model (MiniCanvas)")
        # ModelSamplingContinuousEDM.timestep(sigma) = 0.25 * log(sigma); MiniCanvas wants 1000 * t, with t the
        # position of log(sigma) between log(sigma_min) (t = 0) and log(sigma_max) (t = 1).
        t = (4.0 * timesteps.float() - self._log_smin) / (self._log_smax - self._log_smin)
        return super().forward(x, 1000.0 * t, context)


class MiniCanvasModelConfig(comfy.supported_models_base.BASE):
    """The model config (comfy.supported_models style) of MiniCanvas. Never matched by checkpoint detection."""

    unet_config = {}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.ChromaRadiance  # 3-channel pixel space, identity in/out
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, cfg_dict: dict):
        super().__init__({"minicanvas_config": cfg_dict, "dtype": torch.float32})
        self.sampling_settings = {"sigma_min": float(cfg_dict["sigma_min"]), "sigma_max": float(cfg_dict["sigma_max"]),
                                  "sigma_data": float(cfg_dict["sigma_data"])}

    @classmethod
    def matches(cls, unet_config, state_dict=None):
        return False


class MiniCanvas(comfy.model_base.BaseModel):
    """The MiniCanvas BaseModel: V-prediction on ComfyUI's continuous EDM sigmas (log-linear, like MiniCanvas').

    Attributes read by nodes/host.py: `spare_latent_downscale` (pixels per latent cell: 1, pixel space),
    `spare_native_size` ((width, height): the only size it draws) and `spare_demo_model`."""

    spare_latent_downscale = 1
    spare_demo_model = True

    def __init__(self, model_config: MiniCanvasModelConfig, device=None):
        super().__init__(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION_EDM, device=device,
                         unet_model=MiniCanvasNet)
        size = int(model_config.unet_config["minicanvas_config"]["image_size"])
        self.spare_native_size = (size, size)


def clamp_guided_x0(args: dict) -> torch.Tensor:
    """Post-CFG function: the guided x0 clamped to [-1, 1], as the bundled sampler's `guided_x0` does (static
    thresholding; images live in [-1, 1])."""
    return args["denoised"].clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Text encoder

class MiniCanvasTokenizer:
    """ComfyUI tokenizer interface (`tokenize_with_weights`) over MiniCanvas' word vocabulary: one section of
    max_tokens ids, <bos> words <eos> <pad>..., like the bundled `Tokenizer`. Prompt weights "(word:1.2)" are parsed
    as ComfyUI's own tokenizers do. Unknown words raise SpareInputError naming them and the known vocabulary (the
    bundled tokenizer would silently use <unk>, which the model never learnt)."""

    def __init__(self, embedding_directory=None, tokenizer_data={}, vocab=(), max_tokens: int = 16):
        self.vocab, self.max_tokens = list(vocab), int(max_tokens)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad, self.bos, self.eos = self.ids["<pad>"], self.ids["<bos>"], self.ids["<eos>"]

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        text = comfy.sd1_clip.escape_important(text or "")
        if kwargs.get("disable_weights", False):
            segments = [(text, 1.0)]
        else:
            segments = comfy.sd1_clip.token_weights(text, 1.0)
        words: list[tuple[str, float]] = []
        for segment, weight in segments:
            words += [(w, weight) for w in mc_data.tokenize_words(comfy.sd1_clip.unescape_important(segment))]
        unknown = list(dict.fromkeys(w for w, _ in words if w not in self.ids or w in mc.SPECIAL_TOKENS))
        if unknown:
            raise SpareInputError(
                f"the MiniCanvas demo model does not know the word(s) {', '.join(repr(w) for w in unknown)} in the "
                f"prompt {text!r}. It knows only these {len(self.vocab) - len(mc.SPECIAL_TOKENS)} words: "
                f"{', '.join(w for w in self.vocab if w not in mc.SPECIAL_TOKENS)}")
        room = self.max_tokens - 2
        if len(words) > room:
            log.warning("SPARE demo model: the prompt %r has %d words; MiniCanvas reads the first %d", text,
                        len(words), room)
            words = words[:room]
        batch = [(self.bos, 1.0, 0)] + [(self.ids[w], weight, i + 1) for i, (w, weight) in enumerate(words)]
        batch += [(self.eos, 1.0, 0)] + [(self.pad, 1.0, 0)] * (self.max_tokens - len(batch) - 1)
        if not return_word_ids:
            batch = [(t, w) for t, w, _ in batch]
        return [batch]

    def untokenize(self, token_weight_pair):
        return [(a, self.vocab[a[0]]) for a in token_weight_pair]

    def state_dict(self):
        return {}


class _DemoTextModel(nn.Module, comfy.sd1_clip.ClipTokenWeightEncoder):
    """What both demo CLIPs' cond_stage_models share: a bundled text encoder (keys "text_encoder.*", as in the weights
    file) over the MiniCanvas vocabulary, token ids as ComfyUI's tokenizer hands them over, no CLIP options."""

    def __init__(self, text_encoder: nn.Module, vocab: list, device=None, dtype=None):
        super().__init__()
        self.text_encoder = text_encoder
        ids = {w: i for i, w in enumerate(vocab)}
        self.special_tokens = {"start": ids["<bos>"], "end": ids["<eos>"], "pad": ids["<pad>"]}
        dtype = dtype or torch.float32
        self.dtypes = {dtype}
        self.to(device=device, dtype=dtype)

    def tokens(self, token_lists) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        return torch.tensor([[int(t) for t in row] for row in token_lists], dtype=torch.long, device=device)

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)


class MiniCanvasTextModel(_DemoTextModel):
    """The CLIP's cond_stage_model: MiniCanvas' TextEncoder; per-token context [1, max_tokens, text_dim], no pooled
    output."""

    def __init__(self, device=None, dtype=None, model_options={}, minicanvas_config=None):
        cfg = config_from_dict(minicanvas_config)
        super().__init__(mc.TextEncoder(cfg), cfg.vocab, device, dtype)

    def encode(self, token_lists):
        if all(not torch.is_tensor(t) for row in token_lists for t in row):
            return self.text_encoder(self.tokens(token_lists)).float(), None
        # a tensor in place of a token id is that token's embedding, as ComfyUI's own CLIPs read textual-inversion
        # embeddings (sd1_clip.SDClipModel.process_tokens); SPARE's pseudo words (DistillConfig.pseudo_rows) use it
        pad = self.special_tokens["pad"]
        x = self.text_encoder.token_embedding(self.tokens([[pad if torch.is_tensor(t) else t for t in row]
                                                           for row in token_lists]))
        for i, row in enumerate(token_lists):
            for j, t in enumerate(row):
                if torch.is_tensor(t):
                    x[i, j] = t.reshape(-1).to(x)
        return self.text_encoder.from_embeddings(x).float(), None

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (what SPARE's pseudo words perturb; as `transformer.get_input_embeddings()` of
        ComfyUI's CLIPs)."""
        return self.text_encoder.token_embedding


# ----------------------------------------------------------------------------------------------------------------
# Loading

def read_weights(path: str = WEIGHTS_FILE) -> tuple[dict, dict, dict]:
    """(config dict, diffusion-model state dict, text-encoder state dict), fp32, from the shipped weights file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SpareInputError(f"the MiniCanvas weights are missing: {path} (reinstall the pack)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if "config" not in meta:
            raise SpareInputError(f"{path} is not a MiniCanvas weights file (no 'config' metadata)")
        cfg = json.loads(meta["config"])
        net, text = {}, {}
        for k in f.keys():
            if k.startswith(mc.KEY_PREFIX):
                net[k[len(mc.KEY_PREFIX):]] = f.get_tensor(k).float()
            elif k.startswith(mc.TEXT_PREFIX):  # kept: the CLIP's model holds the encoder as `text_encoder`
                text[k] = f.get_tensor(k).float()
    return cfg, net, text


def _check_loaded(what: str, result) -> None:
    missing, unexpected = result
    if missing or unexpected:
        raise SpareInputError(f"MiniCanvas {what} weights do not fit the model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def load_model(path: str = WEIGHTS_FILE, cfg: dict | None = None, net_sd: dict | None = None):
    """The MiniCanvas MODEL: a ModelPatcher around `MiniCanvas`, with the [-1, 1] clamp as post-CFG function."""
    if cfg is None or net_sd is None:
        cfg, net_sd, _ = read_weights(path)
    mm = comfy.model_management
    base = MiniCanvas(MiniCanvasModelConfig(cfg))
    _check_loaded("diffusion model", base.diffusion_model.load_state_dict(net_sd, strict=False))
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.set_model_sampler_post_cfg_function(clamp_guided_x0)
    return patcher


def load_clip(path: str = WEIGHTS_FILE, cfg: dict | None = None, text_sd: dict | None = None):
    """The MiniCanvas CLIP (fp32 on every device: the text encoder is 0.4M parameters)."""
    if cfg is None or text_sd is None:
        cfg, _, text_sd = read_weights(path)
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(MiniCanvasTokenizer, vocab=cfg["vocab"], max_tokens=cfg["max_tokens"]),
        functools.partial(MiniCanvasTextModel, minicanvas_config=cfg))
    parameters = sum(t.numel() for t in text_sd.values())
    clip = comfy.sd.CLIP(target, parameters=parameters, model_options={"dtype": torch.float32})
    _check_loaded("text encoder", clip.load_sd(text_sd))
    return clip


def load_vae():
    """ComfyUI's pass-through pixel-space VAE (what VAELoader's "pixel_space" option builds)."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def empty_latent(model, batch_size: int = 1) -> dict:
    """An empty LATENT of the model's size: zeros [batch, 3, 32, 32] (MiniCanvas), [batch, 12, 16, 16]
    (MiniCanvas-Flux)."""
    width, height = model.model.spare_native_size
    down = model.model.spare_latent_downscale
    channels = model.model.latent_format.latent_channels
    return {"samples": torch.zeros([batch_size, channels, height // down, width // down],
                                   device=comfy.model_management.intermediate_device())}


def load_demo(path: str = WEIGHTS_FILE, batch_size: int = 1):
    """(MODEL, CLIP, VAE, LATENT) of the bundled MiniCanvas model."""
    cfg, net_sd, text_sd = read_weights(path)
    model = load_model(path, cfg, net_sd)
    clip = load_clip(path, cfg, text_sd)
    return model, clip, load_vae(), empty_latent(model, batch_size)


# ----------------------------------------------------------------------------------------------------------------
# MiniCanvas-Flux: ComfyUI's own Flux (comfy.model_base.Flux around comfy.ldm.flux.model.Flux), tiny

MINICANVAS_FLUX_FAMILY = mcf.MINICANVAS_FLUX_FAMILY  # Flux's modules, sampled with CFG (flux_model.py says why)


class MiniCanvasFluxLatent(comfy.latent_formats.LatentFormat):
    """MiniCanvas-Flux's "latent": the image in [-1, 1] pixel-unshuffled 2 x 2 (12 x 16 x 16), no scaling."""

    latent_channels = 12
    scale_factor = 1.0


def flux_config_from_meta(meta: dict) -> mcf.FluxMiniConfig:
    """FluxMiniConfig from the weights file's metadata ("config" and "vocab", as flux_model.load reads them)."""
    d = json.loads(meta["config"])
    d["axes_dim"] = tuple(d["axes_dim"])
    return mcf.FluxMiniConfig(vocab=json.loads(meta["vocab"]), **d)


class MiniCanvasFluxModelConfig(comfy.supported_models_base.BASE):
    """The model config of MiniCanvas-Flux: Flux's unet_config (FluxParams as model_detection gives them) and
    ModelSamplingFlux's shift from the weights. Never matched by checkpoint detection."""

    unet_config = {}
    unet_extra_config = {}
    latent_format = MiniCanvasFluxLatent
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, cfg: mcf.FluxMiniConfig):
        super().__init__({"image_model": "flux", **cfg.flux_params()})
        self.set_inference_dtype(torch.float32, None)  # fp32 on every device: 2.3M parameters
        self.sampling_settings = {"shift": float(cfg.shift)}

    @classmethod
    def matches(cls, unet_config, state_dict=None):
        return False


class MiniCanvasFlux(comfy.model_base.Flux):
    """comfy.model_base.Flux with ModelType.FLUX: CONST (rectified flow: x_t = (1 - sigma) x0 + sigma eps, denoised
    = x_t - sigma v) on ModelSamplingFlux's sigmas with the trained shift, timestep = sigma, exactly the formulas
    MiniCanvas-Flux was trained and is sampled with (flux_model.py). Attributes read by nodes/host.py as for
    `MiniCanvas`, plus `spare_family`."""

    spare_latent_downscale = 2  # pixels per latent cell (pixel-unshuffle 2)
    spare_demo_model = True
    spare_family = MINICANVAS_FLUX_FAMILY

    def __init__(self, model_config: MiniCanvasFluxModelConfig, image_size: int, device=None):
        super().__init__(model_config, model_type=comfy.model_base.ModelType.FLUX, device=device)
        self.spare_native_size = (image_size, image_size)


class PixelUnshuffleVAE(nn.Module):
    """The "VAE" of MiniCanvas-Flux as ComfyUI's VAE calls it (after its process_input x * 2 - 1 / before its
    process_output (x + 1) / 2 clamped): pixels [-1, 1] <-> pixel-unshuffled latents, flux_model.to_latent /
    from_latent. `pixel_space_vae` is the parameter ComfyUI's pixel-space VAE has (a model must have one to load)."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.pixel_space_vae = nn.Parameter(torch.tensor(1.0))

    def encode(self, pixels: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
        return torch.nn.functional.pixel_unshuffle(pixels, self.factor)

    def decode(self, samples: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
        return torch.nn.functional.pixel_shuffle(samples, self.factor)


class MiniCanvasFluxTextModel(_DemoTextModel):
    """The CLIP's cond_stage_model for MiniCanvas-Flux: flux_model.FluxTextEncoder: per-token states
    [1, max_tokens, text_dim] for Flux's `txt_in` and the pooled vector [1, text_dim] for its `vector_in`
    (CONDITIONING's pooled_output, which model_base.Flux passes as `y`)."""

    def __init__(self, device=None, dtype=None, model_options={}, flux_config=None):
        super().__init__(mcf.FluxTextEncoder(flux_config), flux_config.vocab, device, dtype)

    def encode(self, token_lists):
        ctx, pooled = self.text_encoder(self.tokens(token_lists))
        return ctx.float(), pooled.float()


def read_flux_weights(path: str = FLUX_WEIGHTS_FILE) -> tuple[mcf.FluxMiniConfig, dict, dict]:
    """(config, diffusion-model state dict, text-encoder state dict), fp32, from the shipped MiniCanvas-Flux file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SpareInputError(f"the MiniCanvas-Flux weights are missing: {path} (reinstall the pack)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if "config" not in meta or "vocab" not in meta:
            raise SpareInputError(f"{path} is not a MiniCanvas-Flux weights file (no 'config' / 'vocab' metadata)")
        cfg = flux_config_from_meta(meta)
        net, text = {}, {}
        for k in f.keys():
            if k.startswith(mcf.KEY_PREFIX):
                net[k[len(mcf.KEY_PREFIX):]] = f.get_tensor(k).float()
            elif k.startswith(mcf.TEXT_PREFIX):  # kept: the CLIP's model holds the encoder as `text_encoder`
                text[k] = f.get_tensor(k).float()
    return cfg, net, text


def load_flux_model(path: str = FLUX_WEIGHTS_FILE, cfg=None, net_sd: dict | None = None):
    """The MiniCanvas-Flux MODEL: a ModelPatcher around `MiniCanvasFlux`, with the [-1, 1] clamp as post-CFG function
    (the bundled sampler's static thresholding; the latent is the unshuffled image, so the clamp is the same)."""
    if cfg is None or net_sd is None:
        cfg, net_sd, _ = read_flux_weights(path)
    mm = comfy.model_management
    base = MiniCanvasFlux(MiniCanvasFluxModelConfig(cfg), cfg.image_size)
    if cfg.guidance_embed:  # the guidance-distilled variant trains and samples as Flux.1-dev (guidance an input)
        base.spare_family = mcf.MINICANVAS_FLUX_DEV_FAMILY
    # comfy.ops layers are not initialised: every weight must come from the file (_check_loaded refuses a gap)
    _check_loaded("diffusion model", base.diffusion_model.load_state_dict(net_sd, strict=False))
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.set_model_sampler_post_cfg_function(clamp_guided_x0)
    return patcher


def load_flux_clip(path: str = FLUX_WEIGHTS_FILE, cfg=None, text_sd: dict | None = None):
    """The MiniCanvas-Flux CLIP (the MiniCanvas tokenizer; fp32)."""
    if cfg is None or text_sd is None:
        cfg, _, text_sd = read_flux_weights(path)
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(MiniCanvasTokenizer, vocab=cfg.vocab, max_tokens=cfg.max_tokens),
        functools.partial(MiniCanvasFluxTextModel, flux_config=cfg))
    parameters = sum(t.numel() for t in text_sd.values())
    clip = comfy.sd.CLIP(target, parameters=parameters, model_options={"dtype": torch.float32})
    _check_loaded("text encoder", clip.load_sd(text_sd))
    return clip


def load_flux_vae(factor: int = 2):
    """ComfyUI's pixel-space VAE with MiniCanvas-Flux's pixel-(un)shuffle as its model: IMAGE [B, 32, 32, 3] <->
    LATENT [B, 12, 16, 16]."""
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    vae.first_stage_model = PixelUnshuffleVAE(factor).eval().to(vae.vae_dtype)
    vae.latent_channels = 3 * factor * factor
    vae.downscale_ratio = vae.upscale_ratio = factor
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.patcher.load_device,
                                                   offload_device=vae.patcher.offload_device)
    return vae


def load_flux_demo(path: str = FLUX_WEIGHTS_FILE, batch_size: int = 1):
    """(MODEL, CLIP, VAE, LATENT) of the bundled MiniCanvas-Flux model."""
    cfg, net_sd, text_sd = read_flux_weights(path)
    model = load_flux_model(path, cfg, net_sd)
    clip = load_flux_clip(path, cfg, text_sd)
    return model, clip, load_flux_vae(cfg.pixel_unshuffle), empty_latent(model, batch_size)


# ----------------------------------------------------------------------------------------------------------------
# The node

UNET_CHOICE = "MiniCanvas (UNet)"
FLUX_CHOICE = "MiniCanvas-Flux (DiT)"
FLUX_DEV_CHOICE = "MiniCanvas-Flux-dev (DiT, guidance-distilled)"
DEMOS = {UNET_CHOICE: load_demo, FLUX_CHOICE: load_flux_demo,
         FLUX_DEV_CHOICE: functools.partial(load_flux_demo, FLUX_DEV_WEIGHTS_FILE)}


class DemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        words = ", ".join(known_words())
        return io.Schema(
            node_id="SPAREDemoModel",
            display_name="SPARE Demo Model (MiniCanvas)",
            category="SPARE",
            description="A bundled MiniCanvas model, to try SPARE on a CPU without a checkpoint: 32 x 32 px images "
                        "of a shape (object) in a style, from prompts such as 'A star image in ukiyo style.'. It "
                        f"knows only these words: {words}. Sample MiniCanvas (UNet) with KSampler (euler or "
                        "dpmpp_2m, karras, 20 steps, cfg 4), MiniCanvas-Flux (DiT, ComfyUI's own Flux class) with "
                        "KSampler (euler, simple, 12 steps, cfg 4; the -dev variant cfg 1 after a FluxGuidance "
                        "node, 3.5), then VAE Decode; upscale the images (nearest) "
                        "to see them. For more images per run, put Repeat Latent Batch after LATENT.",
            # No other input: a widget here (e.g. a batch size) would be part of the cache key of every node
            # downstream, so changing it would re-run the SPARE stages (re-train the LoRA). Batch with Repeat Latent
            # Batch. `model` is optional with its default so that workflows and API prompts saved before it existed
            # still load the UNet.
            inputs=[io.Combo.Input("model", options=list(DEMOS), default=UNET_CHOICE, optional=True,
                                   tooltip="MiniCanvas (UNet): an SD 1.x-style UNet, v-prediction. MiniCanvas-Flux "
                                           "(DiT): ComfyUI's Flux class, tiny, rectified flow (ModelSamplingFlux, "
                                           "shift 1.15), sampled with CFG; SPARE erases from it as from Flux. "
                                           "MiniCanvas-Flux-dev: the same, guidance-distilled as Flux.1-dev is "
                                           "(sample at cfg 1; FluxGuidance sets the guidance, default 3.5).")],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The denoiser (pixel space: MiniCanvas v-prediction, "
                                                              "MiniCanvas-Flux rectified flow)."),
                io.Clip.Output(display_name="CLIP", tooltip="The model's text encoder (a fixed vocabulary: unknown "
                                                            "words are an error naming them)."),
                io.Vae.Output(display_name="VAE", tooltip="Pixel-space VAE (MiniCanvas-Flux: 2 x 2 pixel-unshuffle)."),
                io.Latent.Output(display_name="LATENT", tooltip="An empty 32 x 32 px latent (one image) for KSampler."),
            ],
        )

    @classmethod
    def execute(cls, model: str = UNET_CHOICE):
        if model not in DEMOS:
            raise SpareInputError(f"model: {model!r} is not a bundled demo model; choose one of "
                                  f"{', '.join(repr(k) for k in DEMOS)}")
        return io.NodeOutput(*DEMOS[model]())


DEMO_NODES = [DemoModel]
