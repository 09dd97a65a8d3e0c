"""SPARE Demo Model with model "MiniCanvas-Flux (DiT)" in a real ComfyUI: the stock graph (CLIPTextEncode ->
KSampler -> VAEDecode) on its MODEL/CLIP/VAE reproduces the bundled sampler (spare_core/minicanvas/flux_model.py
`MiniCanvasFlux.sample`, euler), draws what the prompt asks for as judged by the benchmark's shipped classifiers with
ComfyUI's own samplers, the node's outputs have the model's shapes, the pack trains it as Flux sampled with CFG, and
the host adapter (nodes/host.py) predicts what the bundled model predicts.

Needs a ComfyUI checkout in COMFYUI_PATH (scripts/setup_comfyui.sh); skipped with the reason printed otherwise.
"""
import sys

import pytest
import torch

import comfy_fixtures as cf

PACK_NAME = cf.PACK_UNDER_TEST
STEPS, CFG = 12, 4.0  # flux_model's defaults (DEFAULT_STEPS, DEFAULT_CFG), what bench/minicanvas/flux_eval.py uses
# ComfyUI's euler on ModelSamplingFlux's "simple" sigmas is the bundled euler step for step (same noise, sigmas,
# formulas); only float rounding differs: measured max |difference| ~3e-6 in [0, 1] images.
TOLERANCE = 1e-3
PROMPTS = {0: "A star image in ukiyo style.", 1: "An image of a heart in neon style.", 2: "ring, blueprint style"}
JUDGE_FLOOR = 90.0  # % of judged images that must show the style / object asked for (flux_eval measured 100)


@pytest.fixture(scope="module")
def pack():
    return cf.import_pack(PACK_NAME)


@pytest.fixture(scope="module")
def demo(pack):
    """(demo_model module, host module, (MODEL, CLIP, VAE, LATENT) from the node, run as the executor runs it)."""
    yield from cf.demo_outputs(PACK_NAME, model=sys.modules[PACK_NAME + ".nodes.demo_model"].FLUX_CHOICE)


@pytest.fixture(scope="module")
def bundled(pack):
    from spare_core.minicanvas import flux_model
    return flux_model.load()


def graph(model, clip, vae, latent, prompt, seed, sampler, scheduler="simple", negative=""):
    """CLIPTextEncode x2 -> KSampler -> VAEDecode, under inference mode: IMAGE [B, H, W, 3]."""
    import nodes as comfy_nodes
    with torch.inference_mode():
        pos = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        neg = comfy_nodes.CLIPTextEncode().encode(clip, negative)[0]
        (out,) = comfy_nodes.common_ksampler(model, seed, STEPS, CFG, sampler, scheduler, pos, neg, latent)
        return comfy_nodes.VAEDecode().decode(vae, out)[0].clone()


def test_ksampler_reproduces_the_bundled_sampler(demo, bundled):
    _, _, (model, clip, vae, latent) = demo
    for seed, prompt in PROMPTS.items():
        image = graph(model, clip, vae, latent, prompt, seed, "euler")
        assert image.shape == (1, 32, 32, 3)
        expected = bundled.sample([prompt], seed=seed, steps=STEPS, cfg=CFG, sampler="euler")  # [1, 3, 32, 32]
        diff = (image.permute(0, 3, 1, 2) - expected).abs().max().item()
        print(f"euler seed {seed}: max |ComfyUI - bundled| = {diff:.2e}")
        assert diff < TOLERANCE, (seed, prompt, diff)
    # another sampler is another image: the comparison can tell
    other = graph(model, clip, vae, latent, PROMPTS[0], 0, "euler", scheduler="karras")
    assert (other.permute(0, 3, 1, 2) - bundled.sample([PROMPTS[0]], seed=0, steps=STEPS, cfg=CFG,
                                                        sampler="euler")).abs().max().item() > 20 * TOLERANCE


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_ksampler_images_are_judged_as_prompted(demo, sampler):
    """Held-out wordings (bench/minicanvas/judge.grid: every template but the training one), every style on 3
    objects, through ComfyUI's KSampler (its own dpmpp_2m too, which the bundled sampler does not reproduce): the
    shipped classifiers see the style and the object asked for; another style is not what they see."""
    _, _, (model, clip, vae, latent) = demo
    from bench.minicanvas import judge as bench_judge
    prompts, styles, objects, seeds = bench_judge.grid(1)
    pick = [i for i in range(len(prompts)) if (i % 10) in ((i // 10) % 10, (i // 10 + 3) % 10, (i // 10 + 7) % 10)]
    images = torch.cat([graph(model, clip, vae, latent, prompts[i], seeds[i], sampler) for i in pick])
    verdict = bench_judge.Judge()(images.permute(0, 3, 1, 2))
    style_acc = 100.0 * (verdict["style"] == styles[pick]).float().mean().item()
    object_acc = 100.0 * (verdict["object"] == objects[pick]).float().mean().item()
    from spare_core.minicanvas import data
    other = (styles[pick] + 1) % len(data.STYLES)  # another style for every image
    shuffled = 100.0 * (verdict["style"] == other).float().mean().item()
    print(f"{sampler}, simple, {STEPS} steps, cfg {CFG}: style {style_acc:.1f}%, object {object_acc:.1f}% of "
          f"{len(pick)} held-out prompts (another style: {shuffled:.1f}%)")
    assert style_acc >= JUDGE_FLOOR and object_acc >= JUDGE_FLOOR, (style_acc, object_acc)
    assert shuffled <= 100.0 - JUDGE_FLOOR


def test_node_outputs_and_family(demo, bundled):
    mod, host, (model, clip, vae, latent) = demo
    import comfy.model_base
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.sd
    from spare_core import families
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(model.model, comfy.model_base.Flux)
    assert type(model.model.diffusion_model).__module__ == "comfy.ldm.flux.model"  # ComfyUI's own Flux class
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)
    assert isinstance(sampling, comfy.model_sampling.CONST)
    assert sampling.shift == pytest.approx(bundled.cfg.shift)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert latent["samples"].shape == (1, 12, 16, 16) and not latent["samples"].any()
    with torch.inference_mode():
        l2 = mod.empty_latent(model, 3)
        decoded = vae.decode(l2["samples"])
        image = torch.rand((2, 32, 32, 3), generator=torch.Generator().manual_seed(0))
        encoded = vae.encode(image)
        back = vae.decode(encoded)
    assert l2["samples"].shape == (3, 12, 16, 16) and decoded.shape == (3, 32, 32, 3)
    assert torch.allclose(decoded, torch.full_like(decoded, 0.5))  # latent 0 = mid grey
    from spare_core.minicanvas.flux_model import to_latent
    assert torch.allclose(encoded, to_latent(image.permute(0, 3, 1, 2)), atol=1e-6)  # the bundled "VAE"
    assert torch.allclose(back, image, atol=1e-6)
    # the pack trains it as Flux (its blocks, in-place residuals) with CFG: not guidance-distilled like Flux.1-dev
    family = host.require_family(model)
    assert family.name == "flux" and family.blocks == families.FLUX.blocks and family.inplace_residuals
    assert not family.guidance_distilled
    dm = host.ComfyDiffusionModel(model, clip, 512, 512)
    assert dm.latent_shape == (12, 16, 16) and (dm.width, dm.height) == (32, 32)
    # CLIP: the bundled tokens, per-token context and pooled vector (Flux's y)
    prompt = "A Star image, in ukiyo style!"
    tokens = clip.tokenize(prompt)
    assert [t for t, _ in tokens[0]] == bundled.tokenizer([prompt])[0].tolist()
    with torch.inference_mode():
        cond, extra = clip.encode_from_tokens_scheduled(tokens)[0]
        ctx, pooled = bundled.encode([prompt])
    assert torch.allclose(cond, ctx, atol=1e-5) and torch.allclose(extra["pooled_output"], pooled, atol=1e-5)
    from spare_core.errors import SpareInputError
    with pytest.raises(SpareInputError, match="'cat'"):
        clip.tokenize("A cat image in neon style.")


def test_host_sees_the_bundled_model(demo, bundled):
    """What SPARE trains on inside ComfyUI (ComfyDiffusionModel) is the bundled model: same x0 at every noise level."""
    _, host, (model, clip, _, _) = demo
    dm = host.ComfyDiffusionModel(model, clip, 32, 32)
    dm.load()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((3, 12, 16, 16), generator=g) * 2 - 1
    sigma = torch.tensor([0.05, 0.5, 0.95])
    x = bundled.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    prompts = ["A star image in ukiyo style.", "A crescent drawn in the lava style.", ""]
    with torch.inference_mode():
        ours = dm.predict_x0(x, sigma, dm.encode(prompts))
        theirs = bundled.predict_x0(x, sigma, bundled.encode(prompts))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_stock_lora_keys_cover_every_candidate_module(demo):
    """comfy.lora.model_lora_keys_unet maps every module SPARE may adapt (Flux's blocks) in both key formats."""
    mod, host, (model, _, _, _) = demo
    import comfy.lora
    import spare_core as sc
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    candidates = sc.candidate_modules(model.model.diffusion_model, "all", host.require_family(model))
    assert len(candidates) > 20
    for path in candidates:
        assert key_map["diffusion_model." + path] == f"diffusion_model.{path}.weight", path
        assert key_map["lora_unet_" + path.replace(".", "_")] == f"diffusion_model.{path}.weight", path


# --- MiniCanvas-Flux-dev: the guidance-distilled variant (bench/minicanvas/train_flux_dev.py) -------------------------

@pytest.fixture(scope="module")
def dev_demo(pack):
    from spare_core.minicanvas import flux_model
    if not flux_model.DEV_MODEL_FILE.exists():
        pytest.skip("no shipped MiniCanvas-Flux-dev weights")
    yield from cf.demo_outputs(PACK_NAME, model=sys.modules[PACK_NAME + ".nodes.demo_model"].FLUX_DEV_CHOICE)


def test_dev_variant_takes_flux_guidance(dev_demo):
    """The -dev choice is Flux.1-dev's form in ComfyUI: family guidance-distilled, the guidance the stage nodes pass
    (what a FluxGuidance node puts on the CONDITIONING) is what the network sees, as in the bundled model, and the
    stock graph (FluxGuidance -> KSampler at cfg 1) reproduces the bundled sampler at that guidance."""
    import node_helpers
    import nodes as comfy_nodes
    from spare_core.minicanvas import flux_model

    _, host, (model, clip, vae, latent) = dev_demo
    bundled = flux_model.load(flux_model.DEV_MODEL_FILE)
    family = host.require_family(model)
    assert family.name == "flux" and family.guidance_distilled and model.model.diffusion_model.params.guidance_embed
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, 12, 16, 16), generator=g) * 2 - 1
    sigma = torch.tensor([0.3, 0.9])
    x = bundled.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    prompts = ["A star image in ukiyo style.", "ring, blueprint style"]
    preds = {}
    for guidance in (1.5, 5.0):
        dm = host.ComfyDiffusionModel(model, clip, 32, 32, guidance)
        dm.load()
        bundled.guidance = guidance
        with torch.inference_mode():
            preds[guidance] = dm.predict_x0(x, sigma, dm.encode(prompts))
            theirs = bundled.predict_x0(x, sigma, bundled.encode(prompts))
        assert torch.allclose(preds[guidance], theirs, atol=1e-4), (guidance, (preds[guidance] - theirs).abs().max())
    assert (preds[1.5] - preds[5.0]).abs().max() > 1e-2  # the guidance reaches the prediction
    for guidance in (1.5, 5.0):
        with torch.inference_mode():
            pos = comfy_nodes.CLIPTextEncode().encode(clip, prompts[0])[0]
            pos = node_helpers.conditioning_set_values(pos, {"guidance": guidance})
            neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
            (out,) = comfy_nodes.common_ksampler(model, 0, STEPS, 1.0, "euler", "simple", pos, neg, latent)
            image = comfy_nodes.VAEDecode().decode(vae, out)[0].clone()
        bundled.guidance = guidance
        expected = bundled.sample([prompts[0]], seed=0, steps=STEPS, sampler="euler")
        diff = (image.permute(0, 3, 1, 2) - expected).abs().max().item()
        print(f"-dev, guidance {guidance}: max |ComfyUI - bundled| = {diff:.2e}")
        assert diff < TOLERANCE, (guidance, diff)
