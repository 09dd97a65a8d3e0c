"""Real, tiny ComfyUI objects for tests: no weight files, CPU only.

Import this module only from tests that need ComfyUI, and call `comfy_or_skip()` before touching anything else in it:
it finds ComfyUI through the environment variable COMFYUI_PATH (see scripts/setup_comfyui.sh), skips the test with
the reason printed when it is absent, puts ComfyUI on sys.path and forces CPU mode *before* `comfy.model_management`
is imported (otherwise ComfyUI tries CUDA). Nothing here imports `comfy` at module import time, so collecting tests
never needs ComfyUI.

What it builds, per family ("sd15", "sd2v" = SD2.x v-prediction, "sdxl"):
- `build_tiny(family, seed)` -> (ModelPatcher, CLIP): the real ComfyUI classes (comfy.supported_models.SD15 / SD20 /
  SDXL -> BaseModel / SDXL BaseModel -> ModelPatcher; comfy.sd.CLIP with the family's real ClipTarget and tokenizer
  files) with tiny layer sizes. comfy.ops layers skip init (their weights are `torch.empty`), so every parameter is
  filled deterministically from `seed`.
- `build_full_base_model(family)`: the full-size BaseModel on the meta device (no memory, ~0.1 s), e.g. for
  `comfy.lora.model_lora_keys_unet`; `build_full_unet_keys(family)`: the module paths of its Linear/Conv layers.
- DiT families (DIT_FAMILIES: "flux" = Flux-dev, "flux_schnell", "chroma", "sd3" = SD3.5, "qwen_image", "lumina2"):
  `build_tiny` / `build_full_base_model` do the same from the family's comfy.supported_models config (TINY_DIT /
  `_full_dit_config`: model_detection.py's keys) and its real ClipTarget + tokenizer, with tiny T5 / CLIP-L / CLIP-G /
  Qwen2.5-VL / Gemma 2 widths through model_options["<name>_model_config"]. Conditioning (tiny): Flux [1, 256+, 32] +
  pooled [1, 32]; Chroma [1, n, 32]; SD3 [1, 77k + 77+, 4096] + pooled [1, 64]; Qwen-Image [1, n, 32]; Lumina 2
  [1, n, 32] + attention_mask. Lumina 2's SentencePiece model is trained here (Gemma's ships only in checkpoints).
- `sample(model, clip, ...)`: a KSampler run (nodes.common_ksampler), as the graph would do it.
- `comfy_server(base, *args)`: a real ComfyUI server (`python main.py --cpu`) with this pack, yielding a `Server`
  (GET/POST, run a prompt and wait for it); tests/test_server_comfy.py and test_browser_comfy.py start theirs here.

Trap: ComfyUI's top-level `nodes.py` and this pack's `nodes/` package share the import name `nodes`. `comfy_or_skip`
puts COMFYUI_PATH first on sys.path; tests must load pack modules by file path (see `load_pack_module`), never as
`import nodes.host`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

FAMILIES = ("sd15", "sd2v", "sdxl")
PACK_ROOT = Path(__file__).resolve().parent.parent

# Tiny text encoders: same code and tokenizer (vocab 49408) as the real ones, small widths. SD2's clip_h and SDXL's
# clip_l/clip_g take the penultimate layer (layer_idx -2, which needs abs(-2) < num_hidden_layers), hence 3 layers.
# The pooled output (SDXL's `y` input) has the width hidden_size (text_projection is hidden x hidden).
TINY_TE = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
           "projection_dim": 32}
TE_WIDTH = TINY_TE["hidden_size"]

# Tiny UNets: the keys of comfy/model_detection.py's SD15 / SD21 / SDXL dicts, with 2 levels and 1 res block per
# level. list lengths: transformer_depth = sum(num_res_blocks), transformer_depth_output = sum(num_res_blocks + 1).
_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "use_temporal_attention": False, "use_temporal_resblock": False,
}
TINY_UNET = {
    # SD1.5: conv proj_in/proj_out, 8 heads (SD15.unet_extra_config), context = clip_l width.
    "sd15": {**_UNET_COMMON, "adm_in_channels": None, "use_linear_in_transformer": False, "context_dim": TE_WIDTH,
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]},
    # SD2.x: linear proj, num_head_channels (64 in the real one; 16 here), context = clip_h width.
    "sd2v": {**_UNET_COMMON, "adm_in_channels": None, "use_linear_in_transformer": True, "context_dim": TE_WIDTH,
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]},
    # SDXL: no attention at the first level (as the real [0, 0, 2, 2, 10, 10]), context = clip_l ++ clip_g widths,
    # adm = clip_g pooled width + 6 size embeddings of 256 (model_base.SDXL.encode_adm).
    "sdxl": {**_UNET_COMMON, "adm_in_channels": TE_WIDTH + 6 * 256, "num_classes": "sequential",
             "use_linear_in_transformer": True, "context_dim": 2 * TE_WIDTH,
             "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1]},
}
# Set after the model config's own unet_extra_config (which would give SD2/SDXL 64-channel heads: 0 heads here).
TINY_UNET_EXTRA = {"sd15": {}, "sd2v": {"num_head_channels": 16}, "sdxl": {"num_head_channels": 16}}


def comfy_or_skip() -> str:
    """Path of the ComfyUI checkout in $COMFYUI_PATH, importable and in CPU mode; else skip the calling test."""
    path = os.environ.get("COMFYUI_PATH", "")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        reason = ("COMFYUI_PATH is not set or holds no ComfyUI checkout "
                  "(run scripts/setup_comfyui.sh, then export COMFYUI_PATH)")
        print("SKIP:", reason)
        pytest.skip(reason)
    path = os.path.abspath(path)
    if sys.path[:1] != [path]:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)  # before the cwd: ComfyUI's `nodes.py` must win over this pack's `nodes/`
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args  # parses no argv (comfy.options.args_parsing is False unless main.py enables it)
        comfy.cli_args.args.cpu = True
    return path


def load_pack_module(relpath: str, name: str | None = None):
    """Import a pack file (e.g. "nodes/host.py") by path, under a private module name (see the module docstring)."""
    name = name or "spare_pack_" + relpath.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


PACK_UNDER_TEST = "spare_pack_under_test"  # the name tests/test_nodes_comfy.py loads the pack under (shared)


def import_pack(name: str = PACK_UNDER_TEST):
    """The whole pack imported the way ComfyUI loads a folder pack (relative imports work), once per name; ComfyUI's
    progress bars off. Skips without ComfyUI (comfy_or_skip)."""
    comfy_or_skip()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def demo_outputs(pack_name: str = PACK_UNDER_TEST, **inputs):
    """A generator for a module fixture: yields [demo_model module, host module, (MODEL, CLIP, VAE, LATENT)] of the
    SPARE Demo Model node run as the executor runs it (`inputs`: its widgets, e.g. model=FLUX_CHOICE), and empties
    that list at teardown: pytest keeps the last test's arguments until after the session's teardown, where
    conftest checks that no ModelPatcher is alive."""
    import torch
    mod = sys.modules[pack_name + ".nodes.demo_model"]
    host = sys.modules[pack_name + ".nodes.host"]
    with torch.inference_mode():
        outputs = mod.DemoModel.execute(**inputs).result
    value = [mod, host, outputs]
    yield value
    value.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic init

def init_params_(module, seed: int) -> None:
    """Fill every floating parameter of `module` deterministically (comfy.ops leaves them as torch.empty).

    Matrices/kernels ~ N(0, 1/fan_in) (embeddings ~ N(0, 1)), 1-d `*.weight` (norm gains) ~ 1 + N(0, 0.1), biases
    ~ N(0, 0.02). Parameters are visited in name order with one CPU generator, so the result depends only on `seed`
    and the architecture.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                fan_in = p[0].numel()
                std = 1.0 if "embedding" in name else fan_in ** -0.5
                v = torch.randn(p.shape, generator=gen) * std
            elif name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                v = 0.02 * torch.randn(p.shape, generator=gen)
            p.copy_(v.to(p.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Model configs

def _model_config(family: str, unet_config: dict, tiny: bool):
    """The comfy.supported_models config object for a family, with the given unet_config."""
    import torch
    import comfy.supported_models as sm

    cls = {"sd15": sm.SD15, "sd2v": sm.SD20, "sdxl": sm.SDXL}[family]
    config = cls(unet_config)  # adds cls.unet_extra_config (heads) over unet_config
    if tiny:
        config.unet_config.update(TINY_UNET_EXTRA[family])
    config.set_inference_dtype(torch.float32, None)  # what load_checkpoint_guess_config does (fp32 on CPU)
    return config


def _base_model(family: str, config, device=None):
    """config.get_model({}) equivalent. SD20.model_type() guesses v-prediction from a weight's std, so for "sd2v"
    the BaseModel is built the way SD20.get_model does, with the model type given."""
    import comfy.model_base as mb

    if family == "sd2v":
        return mb.BaseModel(config, model_type=mb.ModelType.V_PREDICTION, device=device)
    return config.get_model({}, device=device)


def _full_unet_config(family: str) -> dict:
    """The full-size unet_config of a family (from comfy/model_detection.py, as detection would produce it)."""
    import torch

    common = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
              "use_spatial_transformer": True, "legacy": False, "model_channels": 320, "dtype": torch.float32,
              "use_temporal_attention": False, "use_temporal_resblock": False}
    if family == "sd15":
        return {**common, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                "use_linear_in_transformer": False, "context_dim": 768}
    if family == "sd2v":
        return {**common, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                "use_linear_in_transformer": True, "context_dim": 1024}
    if family == "sdxl":
        return {**common, "adm_in_channels": 2816, "num_classes": "sequential", "num_res_blocks": [2, 2, 2],
                "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_linear_in_transformer": True,
                "context_dim": 2048}
    raise ValueError(family)


# ---------------------------------------------------------------------------------------------------------------------
# Builders

def build_tiny_model(family: str, seed: int = 0):
    """A tiny real ComfyUI MODEL (ModelPatcher around a BaseModel) of a family, weights initialised from `seed`."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config = _model_config(family, dict(TINY_UNET[family]), tiny=True)
    model = _base_model(family, config)
    init_params_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_tiny_clip(family: str, seed: int = 0):
    """A tiny real ComfyUI CLIP of a family: the family's ClipTarget (tokenizers from the ComfyUI repo, vocab 49408)
    with hidden sizes overridden through model_options["clip_<l|h|g>_model_config"]."""
    import torch
    import comfy.sd
    import comfy.supported_models as sm

    config = {"sd15": sm.SD15, "sd2v": sm.SD20, "sdxl": sm.SDXL}[family]({})
    target = config.clip_target()
    names = {"sd15": ["clip_l"], "sd2v": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}[family]
    options = {f"{n}_model_config": dict(TINY_TE) for n in names}
    options["dtype"] = torch.float32  # ComfyUI would pick fp16 for text encoders, even on CPU
    clip = comfy.sd.CLIP(target, model_options=options)
    init_params_(clip.cond_stage_model, seed + 1)
    return clip


def build_tiny(family: str, seed: int = 0):
    """(ModelPatcher, CLIP) of a tiny real ComfyUI model of `family` ("sd15", "sd2v", "sdxl" or one of DIT_FAMILIES)."""
    if family in TINY_DIT:
        return build_tiny_dit_model(family, seed), build_tiny_dit_clip(family, seed)
    return build_tiny_model(family, seed), build_tiny_clip(family, seed)


def build_full_base_model(family: str):
    """The full-size BaseModel of a family on the meta device: real module tree and state_dict keys, no memory."""
    import torch

    if family in TINY_DIT:
        return _dit_model_config(family, _full_dit_config(family)).get_model({}, device=torch.device("meta"))
    config = _model_config(family, _full_unet_config(family), tiny=False)
    return _base_model(family, config, device=torch.device("meta"))


def build_full_unet_keys(family: str) -> list[str]:
    """Module paths (relative to diffusion_model) of every Linear/Conv layer of the full-size UNet of a family:
    the layers a LoRA can target. Their LoRA keys are "diffusion_model.<path>" / "lora_unet_<path with . -> _>"."""
    model = build_full_base_model(family)
    return sorted(name for name, m in model.diffusion_model.named_modules()
                  if getattr(m, "weight", None) is not None and m.weight.ndim >= 2
                  and type(m).__name__ in ("Linear", "Conv2d", "Conv1d", "Conv3d"))


# ---------------------------------------------------------------------------------------------------------------------
# DiT families: tiny real networks (comfy.supported_models config -> model_base class) and real text encoders

DIT_FAMILIES = ("flux", "flux_schnell", "chroma", "sd3", "qwen_image", "lumina2")

# Tiny T5-XXL (same code and tokenizer as the real one, vocab 32128): context width = d_model.
TINY_T5 = {"d_model": TE_WIDTH, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}

# Hidden 64, 4 heads of 16; RoPE axes_dim sums to the head dim (16).
_FLUX_COMMON = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
                "context_in_dim": TE_WIDTH, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 1,
                "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True}
TINY_DIT = {
    # Flux: context from T5 (width TE_WIDTH), pooled vector from CLIP-L (width TE_WIDTH).
    "flux": {**_FLUX_COMMON, "vec_in_dim": TE_WIDTH, "guidance_embed": True},
    "flux_schnell": {**_FLUX_COMMON, "vec_in_dim": TE_WIDTH, "guidance_embed": False},
    # Chroma: T5 only (no vector_in); the Approximator (distilled_guidance_layer) reads 64 = 16 timestep + 16
    # guidance + 32 modulation-index features and writes hidden_size.
    "chroma": {**_FLUX_COMMON, "image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64,
               "out_dim": 64, "hidden_dim": 32, "n_layers": 1},
    # SD3.5 (MMDiT, model_detection's keys): hidden = 64 * depth with depth heads of 64 -> depth 1 (one joint block,
    # one head). Context: CLIP-L ++ CLIP-G (penultimate layers, 2 * TE_WIDTH) zero-padded to 4096 (hard-coded in
    # SD3ClipModel) and concatenated with the T5 tokens, so the tiny T5 keeps d_model 4096 (one layer, 2 small heads).
    # Pooled (y): CLIP-L ++ CLIP-G pooled = 2 * TE_WIDTH.
    "sd3": {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 1, "input_size": None,
            "adm_in_channels": 2 * TE_WIDTH,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64}},
            "num_patches": 64, "pos_embed_max_size": 8, "qk_norm": "rms", "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": []},
    # Qwen-Image: model_detection gives image_model, in_channels (16 * 2 * 2) and num_layers; the widths are the
    # class defaults there, set tiny here (4 heads of 16, RoPE axes 4+6+6); context = Qwen2.5-VL hidden states.
    "qwen_image": {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
                   "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": TE_WIDTH,
                   "axes_dims_rope": (4, 6, 6)},
    # Lumina 2 (NextDiT, model_detection's keys): dim 64, 4 heads of 16 (2 kv heads), RoPE axes 4+6+6; context =
    # Gemma 2 hidden states (cap_feat_dim).
    "lumina2": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": TE_WIDTH,
                "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "axes_dims": [4, 6, 6],
                "axes_lens": [300, 512, 512]},
}
# Tiny Gemma 2 (real SentencePiece tokenizer, vocab 256000; head_dim 256 is fixed by ComfyUI's config class). Lumina 2
# takes the penultimate layer (layer_idx -2 needs 3 layers).
TINY_GEMMA2 = {"hidden_size": TE_WIDTH, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 1,
               "num_key_value_heads": 1}
# Tiny Qwen2.5-VL text model (real tokenizer, vocab 152064): head_dim (128) and the vision tower (hidden 1280) are
# fixed by ComfyUI's classes; the vision tower is built (torch.empty) but never filled nor run for text prompts.
TINY_QWEN25 = {"hidden_size": TE_WIDTH, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
               "num_key_value_heads": 1}


def _dit_config_cls(family: str):
    import comfy.supported_models as sm

    return {"flux": sm.Flux, "flux_schnell": sm.FluxSchnell, "chroma": getattr(sm, "Chroma", None),
            "sd3": sm.SD3, "qwen_image": getattr(sm, "QwenImage", None), "lumina2": getattr(sm, "Lumina2", None)}[family]


def _dit_model_config(family: str, unet_config: dict, weight_dtype=None, compute_dtype=None):
    """The family's model config; weights stored in `weight_dtype` (default fp32), computed in `compute_dtype`
    (None: in the weights' dtype; otherwise comfy.ops' manual cast)."""
    import torch

    config = _dit_config_cls(family)(dict(unet_config))
    config.set_inference_dtype(weight_dtype or torch.float32, compute_dtype)
    return config


def _dit_te_options(family: str) -> dict:
    """model_options for comfy.sd.CLIP: tiny widths for each text encoder of the family."""
    import torch

    opts = {"dtype": torch.float32}
    if family in ("flux", "flux_schnell"):
        opts.update(clip_l_model_config=dict(TINY_TE), t5xxl_model_config=dict(TINY_T5))
    elif family == "sd3":
        opts.update(clip_l_model_config=dict(TINY_TE), clip_g_model_config=dict(TINY_TE),
                    t5xxl_model_config={**TINY_T5, "d_model": 4096, "num_layers": 1})
    elif family == "qwen_image":
        opts.update(qwen25_7b_model_config=dict(TINY_QWEN25))
    elif family == "lumina2":
        opts.update(gemma2_2b_model_config=dict(TINY_GEMMA2))
    elif family == "chroma":
        opts.update(t5xxl_model_config=dict(TINY_T5))
    return opts


def _full_dit_config(family: str) -> dict:
    """The full-size unet_config of a DiT family as comfy/model_detection.py detects it (Flux-dev, Flux-schnell,
    Chroma, SD3.5-large, Qwen-Image, Lumina 2)."""
    flux = {**_FLUX_COMMON, "context_in_dim": 4096, "hidden_size": 3072, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56]}
    if family in ("flux", "flux_schnell"):
        return {**flux, "vec_in_dim": 768, "guidance_embed": family == "flux"}
    if family == "chroma":
        return {**flux, "image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64,
                "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}
    if family == "sd3":
        return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 38, "input_size": None,
                "adm_in_channels": 2048,
                "context_embedder_config": {"target": "torch.nn.Linear",
                                            "params": {"in_features": 4096, "out_features": 2432}},
                "num_patches": 36864, "pos_embed_max_size": 192, "qk_norm": "rms", "pos_embed_scaling_factor": None,
                "x_block_self_attn_layers": []}
    if family == "qwen_image":
        return {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60}
    if family == "lumina2":
        return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": 2304,
                "n_layers": 26, "n_heads": 24, "n_kv_heads": 8, "qk_norm": True, "axes_dims": [32, 32, 32],
                "axes_lens": [300, 512, 512]}
    raise ValueError(family)


def _te_presence(family: str) -> dict:
    """The state_dict entries by which the family's clip_target detects which text encoders a checkpoint holds
    (SD3: all three, as a checkpoint with clip_l, clip_g and t5xxl; the others need none)."""
    import torch

    if family == "sd3":
        one = torch.zeros(1)
        return {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": one,
                "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": one,
                "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": one}
    return {}


def build_tiny_dit_model(family: str, seed: int = 0):
    import comfy.model_management as mm
    import comfy.model_patcher

    config = _dit_model_config(family, TINY_DIT[family])
    model = config.get_model({})
    init_params_(model.diffusion_model, seed)
    if family == "sd3":  # MMDiT's pos_embed is a torch.empty buffer (loaded from the checkpoint), not a parameter
        import torch
        gen = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            pe = model.diffusion_model.pos_embed
            pe.copy_(0.1 * torch.randn(pe.shape, generator=gen))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_tiny_dit_fp8(family: str, seed: int = 0, compute_dtype=None):
    """The tiny DiT of build_tiny_dit_model with its weights STORED in float8_e4m3fn, as ComfyUI loads an fp8
    checkpoint: computed in `compute_dtype` through comfy.ops' manual cast (None: computed in fp8 itself)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    model = _dit_model_config(family, TINY_DIT[family], torch.float8_e4m3fn, compute_dtype).get_model({})
    # the fp32 tiny model's weights, cast to fp8 on load (as a checkpoint's would be)
    model.diffusion_model.load_state_dict(build_tiny_dit_model(family, seed).model.diffusion_model.state_dict())
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


_SPM_CACHE: dict = {}


def _tiny_spiece_model() -> bytes:
    """A small SentencePiece model trained here (Gemma 2's tokenizer ships inside the text-encoder checkpoint as
    `spiece_model`, not in the ComfyUI repo, and there are no weight files in tests): ComfyUI's real Gemma2BTokenizer
    / SPieceTokenizer code reads it from tokenizer_data exactly as from a checkpoint. Ids as Gemma's: pad 0, eos 1,
    bos 2, unk 3."""
    if "m" not in _SPM_CACHE:
        import io
        import sentencepiece as spm

        words = ("a red cat sitting on a wooden chair in a sunny garden with many flowers painted carefully in oil "
                 "with thick brush strokes warm evening light and long soft shadows over green grass blue dog plain "
                 "house photo of the style by an artist").split()
        corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=120,
                                       model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                       minloglevel=2, hard_vocab_limit=False)
        _SPM_CACHE["m"] = buf.getvalue()
    return _SPM_CACHE["m"]


def build_tiny_dit_clip(family: str, seed: int = 0):
    import comfy.sd

    config = _dit_model_config(family, TINY_DIT[family])
    target = config.clip_target(_te_presence(family))
    tokenizer_data = {"spiece_model": _tiny_spiece_model()} if family == "lumina2" else {}
    clip = comfy.sd.CLIP(target, model_options=_dit_te_options(family), tokenizer_data=tokenizer_data)
    if family == "qwen_image":  # the text model only (the vision tower is unused for text and large)
        init_params_(clip.cond_stage_model.qwen25_7b.transformer.model, seed + 1)
    else:
        init_params_(clip.cond_stage_model, seed + 1)
    return clip


# ---------------------------------------------------------------------------------------------------------------------
# Using them as the graph would

def encode(clip, text: str):
    """CLIPTextEncode: CONDITIONING [[cond [1, 77, D], {"pooled_output": [1, P]}]]."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(model, clip, positive: str = "a photo of a cat", negative: str = "", seed: int = 0, steps: int = 2,
           cfg: float = 5.0, size: int = 64, sampler_name: str = "euler", scheduler: str = "normal"):
    """A KSampler run (nodes.common_ksampler) on an EmptyLatentImage of size x size pixels; returns the latent."""
    import torch
    import nodes as comfy_nodes  # ComfyUI's nodes.py (comfy_or_skip put COMFYUI_PATH first on sys.path)

    import comfy.sample

    # EmptyLatentImage (4 channels) / EmptySD3LatentImage (16); fix_empty_latent_channels adapts an empty latent to
    # the model (channel count, and Qwen-Image's frame axis) as common_ksampler does.
    latent = {"samples": torch.zeros(1, model.model.latent_format.latent_channels, size // 8, size // 8)}
    latent["samples"] = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler,
                                         encode(clip, positive), encode(clip, negative), latent)
    return out["samples"]


def model_conds(model, conditioning, noise):
    """What comfy/samplers.py (process_conds -> encode_model_conds) turns one CONDITIONING entry into: the
    apply_model keyword arguments, as cond wrapper objects (comfy/conds.py; the tensor is `.cond`)."""
    cond, extra = conditioning[0]
    params = dict(extra)
    params.update(cross_attn=cond, device=noise.device, noise=noise, width=noise.shape[3] * 8,
                  height=noise.shape[2] * 8, prompt_type="positive")
    return model.model.extra_conds(**params)


# ---------------------------------------------------------------------------------------------------------------------
# A real ComfyUI server

SERVER_START_TIMEOUT = 120  # s until the server answers
RUN_TIMEOUT = 120  # s per prompt


class Server:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def post(self, path: str, payload) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, workflow: dict | None = None) -> dict:
        """POST /prompt, wait for /history/{id}; returns the history entry (status + outputs)."""
        extra = {"extra_pnginfo": {"workflow": workflow}} if workflow else {}
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "spare-test", "extra_data": extra})
        assert status == 200, f"/prompt refused the graph ({status}): {json.dumps(body)[:3000]}"
        return self.wait(body["prompt_id"])

    def wait(self, prompt_id: str) -> dict:
        """Poll /history/{id} until the prompt finished (success or error); interrupt it after RUN_TIMEOUT."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server died:\n{self.log()[-5000:]}"
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                if hist[prompt_id]["status"].get("status_str") in ("success", "error"):
                    return hist[prompt_id]
            time.sleep(0.2)
        self.post("/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} not finished after {RUN_TIMEOUT}s:\n{self.log()[-5000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session started for this server only
                self.proc.wait(timeout=15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def comfy_server(base: Path, *args: str) -> Iterator[Server]:
    """`python main.py --cpu` started from COMFYUI_PATH with the interpreter running pytest (or $COMFYUI_PYTHON), with
    `--base-directory base`: its custom_nodes/ links this pack and tests/comfy_test_pack; models/loras, output, temp,
    input and user are made there; the database is in memory. `args`: more command-line arguments. Yields the server
    once it answers and the pack imported; stops it on leaving (printing its log tail on an error)."""
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    for d in ("custom_nodes", "models/loras", "output", "temp", "input", "user"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "spare").symlink_to(PACK_ROOT, target_is_directory=True)
    (base / "custom_nodes" / "spare_test_pack").symlink_to(PACK_ROOT / "tests" / "comfy_test_pack",
                                                           target_is_directory=True)
    port = free_port()
    log_path = base / "server.log"
    cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--base-directory", str(base), "--user-directory", str(base / "user"),
           "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--disable-auto-launch", *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1",
               PYTHONUNBUFFERED="1", SPARE_TESTS_DIR=str(PACK_ROOT / "tests"))
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    srv = Server(base, port, proc, log_path)
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}) while starting:\n{srv.log()[-5000:]}")
            if time.monotonic() - started > SERVER_START_TIMEOUT:
                raise AssertionError(f"the server did not answer within {SERVER_START_TIMEOUT}s:\n"
                                     f"{srv.log()[-5000:]}")
            try:
                srv.get("/system_stats")
                break
            except OSError:  # not listening yet (URLError, ConnectionError and socket timeouts are OSErrors)
                time.sleep(0.3)
        print(f"\n[server] ready on port {port} after {time.monotonic() - started:.1f}s (base {base})")
        log = srv.log()
        assert "IMPORT FAILED" not in "\n".join(ln for ln in log.splitlines() if "custom_nodes" in ln), log[-5000:]
        yield srv
    except BaseException:
        srv.stop()
        print("[server] log tail:\n" + srv.log()[-5000:])
        raise
    srv.stop()
    print(f"[server] stopped; up {time.monotonic() - started:.1f}s")
