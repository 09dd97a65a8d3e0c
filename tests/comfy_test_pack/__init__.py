"""Test-only ComfyUI custom node pack (never shipped): a checkpoint loader that needs no weight files.

tests/test_server_comfy.py links this folder into a temporary custom_nodes folder of a ComfyUI server started for
the test, and replaces CheckpointLoaderSimple in the shipped workflows by "SPARETestTinyCheckpoint". It returns the
real ComfyUI classes with tiny layer sizes:
- MODEL, CLIP: tests/comfy_fixtures.py build_tiny_model / build_tiny_clip (SD1.5, SD2.x-v or SDXL).
- VAE: a real comfy.sd.VAE around a tiny AutoencoderKL (the class SD1.x/SD2/SDXL checkpoints use; 32 channels,
  one res block per level, 3 downsamples -> the usual 8x scale and 4 latent channels), weights from the seed.
  VAEDecode / SaveImage / PreviewImage then run unchanged.
"""
import importlib.util
import os
import sys

_TESTS = os.environ.get("SPARE_TESTS_DIR") or os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _fixtures():
    name = "spare_test_pack_comfy_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(_TESTS, "comfy_fixtures.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def build_tiny_vae(seed: int = 0):
    """A real comfy.sd.VAE (AutoencoderKL, GroupNorm needs channels divisible by 32) with deterministic weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"params": {"ddconfig": dict(TINY_VAE_DDCONFIG), "embed_dim": 4}}
    module = AutoencoderKL(**config["params"])
    _fixtures().init_params_(module, seed + 2)
    return comfy.sd.VAE(sd=module.state_dict(), config=config)


class SPARETestTinyCheckpoint:
    """CheckpointLoaderSimple stand-in: same outputs (MODEL, CLIP, VAE), tiny real models, no files."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (["sd15", "sd2v", "sdxl"], {"default": "sd15"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "SPARE/testing"

    def load(self, family, seed):
        fx = _fixtures()
        return (fx.build_tiny_model(family, seed), fx.build_tiny_clip(family, seed), build_tiny_vae(seed))


NODE_CLASS_MAPPINGS = {"SPARETestTinyCheckpoint": SPARETestTinyCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {"SPARETestTinyCheckpoint": "SPARE test: tiny checkpoint (no weights)"}
