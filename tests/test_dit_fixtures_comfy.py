"""The tiny DiT fixtures of tests/comfy_fixtures.py (cf.DIT_FAMILIES): each samples a finite latent of the model's
channel count, its CLIP (the family's real ClipTarget and tokenizer, tiny widths) encodes a short and a long prompt,
and comfy.lora.model_lora_keys_unet maps every Linear of the tiny network in both key formats."""
import pytest
import torch

import comfy_fixtures as cf

LONG = " ".join(["a red cat sitting on a wooden chair in a sunny garden with many flowers"] * 8)  # 120 words


@pytest.fixture(scope="module")
def tiny():
    cf.comfy_or_skip()
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = cf.build_tiny(family, seed=0)
        return cache[family]
    yield get
    cache.clear()  # no ModelPatcher may outlive the module (conftest checks)


@pytest.mark.parametrize("family", cf.DIT_FAMILIES)
def test_sample_finite(tiny, family):
    model, clip = tiny(family)
    out = cf.sample(model, clip, "a red cat", "", seed=0, steps=2, cfg=4.0, size=64)
    assert out.shape[0] == 1 and out.shape[1] == model.model.latent_format.latent_channels
    assert out.shape[-2:] == (8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", cf.DIT_FAMILIES)
def test_clip_encodes(tiny, family):
    # Token lengths, measured ("a red cat" -> the 120-word prompt): Flux / Flux-schnell T5 256 -> 256 (T5 pads to
    # at least 256; the long prompt stays under), pooled CLIP-L [1, 32]; Chroma (T5, no padding) 5 -> 145; SD3
    # 154 -> 299 (77 CLIP-L/G tokens per 75-token chunk ++ T5 tokens, min 77), pooled [1, 64]; Qwen-Image 8 -> 125
    # (the template's system prompt is dropped); Lumina 2 4 -> 121 (+ attention_mask). So lengths differ for all but
    # Flux. Printed with -s.
    model, clip = tiny(family)
    unet = model.model.model_config.unet_config
    for text in ("a red cat", LONG):
        cond = cf.encode(clip, text)
        c, extra = cond[0]
        print(family, len(text.split()), "words ->", tuple(c.shape),
              {k: tuple(v.shape) for k, v in extra.items() if torch.is_tensor(v)})
        assert c.ndim == 3 and c.shape[0] == 1 and torch.isfinite(c).all()
        width = unet.get("context_in_dim", unet.get("joint_attention_dim", unet.get("cap_feat_dim")))
        if width is not None:
            assert c.shape[-1] == width
        if unet.get("vec_in_dim"):
            assert extra["pooled_output"].shape == (1, unet["vec_in_dim"])
        if unet.get("adm_in_channels"):
            assert extra["pooled_output"].shape == (1, unet["adm_in_channels"])


@pytest.mark.parametrize("family", cf.DIT_FAMILIES)
def test_lora_keys_cover_every_linear(tiny, family):
    import comfy.lora

    model, _ = tiny(family)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    linears = [n for n, m in model.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for name in linears:
        target = f"diffusion_model.{name}.weight"
        assert key_map.get(f"diffusion_model.{name}") == target, name
        assert key_map.get("lora_unet_" + name.replace(".", "_")) == target, name


@pytest.mark.parametrize("family", cf.DIT_FAMILIES)
def test_full_base_model_on_meta(family):
    """Full-size configs as model_detection.py detects them: the real class, no memory, every Linear LoRA-mappable.
    Parameter counts: Flux 11.9B, Chroma 8.9B, SD3.5-large 8.1B, Qwen-Image 20.4B, Lumina 2 2.6B."""
    cf.comfy_or_skip()
    import comfy.lora

    model = cf.build_full_base_model(family)
    assert all(p.device.type == "meta" for p in model.diffusion_model.parameters())
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    linears = [n for n, m in model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(key_map.get(f"diffusion_model.{n}") == f"diffusion_model.{n}.weight" for n in linears)
