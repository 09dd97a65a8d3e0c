"""SPARE Demo Model (MiniCanvas) in a real ComfyUI: the stock graph (CLIPTextEncode -> KSampler -> VAEDecode) on the
demo MODEL/CLIP/VAE reproduces the bundled sampler (spare_core/minicanvas/model.py `MiniCanvasModel.sample`), unknown words
are refused by name, the node's outputs have the model's shapes, stock LoRA loaders map every module, and the host
adapter (nodes/host.py) sees the same model as the benchmark.

Needs a ComfyUI checkout in COMFYUI_PATH (scripts/setup_comfyui.sh); skipped with the reason printed otherwise.
"""
import asyncio
import logging
import sys

import pytest
import torch

import comfy_fixtures as cf

PACK_NAME = cf.PACK_UNDER_TEST
STEPS, CFG = 20, 4.0  # the bundled sampler's defaults (MiniCanvasModel.sample); karras sigmas, as it uses
# The bundled sampler starts from sigma_max * noise; ComfyUI's KSampler from sqrt(1 + sigma_max^2) * noise
# (model_sampling.noise_scaling with max_denoise): measured max |difference| ~1.2e-4 in [0, 1] images (1e-6 without
# that term), well under one 8-bit level (3.9e-3).
TOLERANCE = 1e-3
PROMPTS = {0: "A star image in ukiyo style.", 1: "An image of a heart in neon style.", 2: "ring, blueprint style"}


@pytest.fixture(scope="module")
def pack():
    return cf.import_pack(PACK_NAME)


@pytest.fixture(scope="module")
def demo(pack):
    """(demo_model module, host module, (MODEL, CLIP, VAE, LATENT) from the node, run as the executor runs it)."""
    yield from cf.demo_outputs(PACK_NAME)


@pytest.fixture(scope="module")
def bundled():
    from spare_core.minicanvas.model import load
    return load()


def graph(model, clip, vae, latent, prompt, seed, sampler, negative=""):
    """CLIPTextEncode x2 -> KSampler (karras) -> VAEDecode, under inference mode: IMAGE [B, H, W, 3]."""
    import nodes as comfy_nodes
    with torch.inference_mode():
        pos = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        neg = comfy_nodes.CLIPTextEncode().encode(clip, negative)[0]
        (out,) = comfy_nodes.common_ksampler(model, seed, STEPS, CFG, sampler, "karras", pos, neg, latent)
        return comfy_nodes.VAEDecode().decode(vae, out)[0].clone()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_ksampler_reproduces_the_bundled_sampler(demo, bundled, sampler):
    _, _, (model, clip, vae, latent) = demo
    for seed, prompt in PROMPTS.items():
        image = graph(model, clip, vae, latent, prompt, seed, sampler)
        assert image.shape == (1, 32, 32, 3)
        expected = bundled.sample([prompt], seed=seed, steps=STEPS, cfg=CFG, sampler=sampler)  # [1, 3, 32, 32]
        diff = (image.permute(0, 3, 1, 2) - expected).abs().max().item()
        print(f"{sampler} seed {seed}: max |ComfyUI - bundled| = {diff:.2e}")
        assert diff < TOLERANCE, (sampler, seed, prompt, diff)
    # the [-1, 1] clamp (post-CFG function) is what reproduces the bundled sampler's static thresholding
    unclamped = model.clone()
    unclamped.model_options["sampler_post_cfg_function"] = []
    seed, prompt = 0, PROMPTS[0]
    diff = (graph(unclamped, clip, vae, latent, prompt, seed, sampler).permute(0, 3, 1, 2)
            - bundled.sample([prompt], seed=seed, steps=STEPS, cfg=CFG, sampler=sampler)).abs().max().item()
    assert diff > 20 * TOLERANCE


def test_clip_matches_the_bundled_text_encoder_and_refuses_unknown_words(demo, bundled):
    mod, _, (_, clip, _, _) = demo
    from spare_core.errors import SpareInputError
    prompt = "A Star image, in ukiyo style!"
    tokens = clip.tokenize(prompt)
    assert [t for t, _ in tokens[0]] == bundled.tokenizer([prompt])[0].tolist()
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(tokens)[0][0]
        assert torch.allclose(cond, bundled.encode([prompt]), atol=1e-5)
        # ComfyUI's prompt weights: (word:w) moves that token's context away from the empty prompt's
        weighted = clip.encode_from_tokens_scheduled(clip.tokenize("A (star:1.5) image in ukiyo style."))[0][0]
    assert [round(w, 3) for _, w in clip.tokenize("A (star:1.5) image")[0][:4]] == [1.0, 1.0, 1.5, 1.0]
    assert not torch.allclose(weighted, cond, atol=1e-3)
    for text, words in (("A cat image in Van Gogh style.", ["'cat'", "'van'", "'gogh'"]), ("<unk> star", ["'unk'"])):
        with pytest.raises(SpareInputError) as err:
            clip.tokenize(text)
        message = str(err.value)
        assert all(w in message for w in words), message
        assert "knows only these 53 words" in message and "ukiyo" in message and "blueprint" in message
    assert len(mod.known_words()) == 53


def test_node_outputs_and_host_helpers(demo, caplog):
    mod, host, (model, clip, vae, latent) = demo
    import comfy.model_patcher
    import comfy.sd
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(model.model, mod.MiniCanvas)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert latent["samples"].shape == (1, 3, 32, 32) and not latent["samples"].any()
    with torch.inference_mode():
        l2 = mod.empty_latent(model, 3)
        decoded = vae.decode(l2["samples"])
    assert l2["samples"].shape == (3, 3, 32, 32) and decoded.shape == (3, 32, 32, 3)
    assert torch.allclose(decoded, torch.full_like(decoded, 0.5))  # latent 0 = mid grey
    schema = mod.DemoModel.define_schema()
    assert (schema.node_id, schema.category) == ("SPAREDemoModel", "SPARE")
    (choice,) = schema.inputs  # the model choice only (see DemoModel.define_schema)
    assert (choice.id, choice.options, choice.default, choice.optional) == (
        "model", ["MiniCanvas (UNet)", "MiniCanvas-Flux (DiT)", "MiniCanvas-Flux-dev (DiT, guidance-distilled)"],
        "MiniCanvas (UNet)", True)
    assert [o.get_io_type() for o in schema.outputs] == ["MODEL", "CLIP", "VAE", "LATENT"]
    # registered by the pack's entry point next to the SPARE nodes
    extension = asyncio.run(sys.modules[PACK_NAME].comfy_entrypoint())
    node_ids = [n.define_schema().node_id for n in asyncio.run(extension.get_node_list())]
    assert "SPAREDemoModel" in node_ids and "SPARESaliencyScan" in node_ids
    # nodes/host.py: pixel space, one size, supported; SD-family models keep 8x and any size
    assert host.latent_downscale(model) == 1 and host.native_size(model) == (32, 32) and host.is_demo_model(model)
    with caplog.at_level(logging.INFO):
        dm = host.ComfyDiffusionModel(model, clip, 512, 512)
    assert dm.latent_shape == (3, 32, 32) and (dm.width, dm.height) == (32, 32)
    assert any("32 x 32 px only" in r.getMessage() for r in caplog.records)
    sd15 = cf.build_tiny_model("sd15")
    assert host.latent_downscale(sd15) == 8 and host.native_size(sd15) is None and not host.is_demo_model(sd15)
    # a latent of another size is refused with the reason
    from spare_core.errors import SpareInputError
    # the fixture ran the node with no model value (a workflow saved before the choice existed): the UNet; an unknown
    # value is refused with the valid ones
    with pytest.raises(SpareInputError, match="'MiniCanvas \\(UNet\\)', 'MiniCanvas-Flux \\(DiT\\)'"):
        mod.DemoModel.execute(model="SD 1.5")
    with torch.inference_mode(), pytest.raises(SpareInputError, match="32 x 32"):
        model.model.apply_model(torch.zeros(1, 3, 64, 64), torch.tensor([1.0]),
                                c_crossattn=torch.zeros(1, 16, 128))


def test_host_sees_the_bundled_model(demo, bundled):
    """What SPARE trains on inside ComfyUI (ComfyDiffusionModel) is the benchmark's model: same sigmas, same x0."""
    _, host, (model, clip, _, _) = demo
    dm = host.ComfyDiffusionModel(model, clip, 32, 32)
    dm.load()
    t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0])
    assert torch.allclose(dm.sigma_at(t), bundled.sigma_at(t), rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((3, 3, 32, 32), generator=g) * 2 - 1
    sigma = bundled.sigma_at(torch.tensor([0.05, 0.5, 0.95]))
    x = bundled.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    prompts = ["A star image in ukiyo style.", "A crescent drawn in the lava style.", ""]
    with torch.inference_mode():
        ours = dm.predict_x0(x, sigma, dm.encode(prompts))
        theirs = bundled.predict_x0(x, sigma, bundled.encode(prompts))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("key_format", ["comfyui", "kohya"])
def test_stock_lora_loader_maps_every_module(demo, tmp_path, key_format, caplog):
    """model_lora_keys_unet enumerates the demo's state dict; a SPARE LoRA file on every candidate module loads through
    LoraLoaderModelOnly with no key left out and patches the weights as spare_core's hooks apply it."""
    _, host, (model, clip, _, _) = demo
    import comfy.lora
    import folder_paths
    import nodes as comfy_nodes
    import spare_core as sc
    net = model.model.diffusion_model
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = [k for k in model.model.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight")]
    assert weights and all(key_map[k[:-len(".weight")]] == k for k in weights)
    assert all(key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] == k
               for k in weights)
    g = torch.Generator().manual_seed(1)
    modules = {}
    for path, m in sc.candidate_modules(net, "all").items():
        fan_in, fan_out = sc.adapters.module_dims(m)
        down_shape = (2, fan_in) if m.weight.dim() == 2 else (2, *m.weight.shape[1:])
        up_shape = (fan_out, 2) if m.weight.dim() == 2 else (fan_out, 2, 1, 1)
        modules[path] = {"down": torch.randn(down_shape, generator=g) * 0.05,
                         "up": torch.randn(up_shape, generator=g) * 0.05, "alpha": torch.tensor(2.0)}
    lora = sc.LoraWeights(modules)
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path)], saved[1])
    try:
        sc.save_lora(str(tmp_path / "demo.safetensors"), lora, key_format=key_format)
        folder_paths.filename_list_cache.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "demo.safetensors", 1.0)[0]
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved
        folder_paths.filename_list_cache.clear()
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert len(patched.patches) == len(modules) > 100

    def probe(m):
        dm = host.ComfyDiffusionModel(m, clip, 32, 32)
        dm.load()
        x = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2.0
        with torch.inference_mode():
            return dm.predict_x0(x, torch.tensor([1.5]), dm.encode(["A star image in ukiyo style."])).clone()
    base = probe(model)
    stock = probe(patched)
    loaded = sc.load_lora(str(tmp_path / "demo.safetensors"), net)
    with sc.apply_lora(net, loaded, 1.0):
        hooked = probe(model)
    assert not torch.allclose(stock, base, atol=1e-4)
    assert torch.allclose(stock, hooked, atol=1e-4), (stock - hooked).abs().max()
    assert torch.equal(probe(model), base)  # the input MODEL is untouched


def test_nearest_concepts_node_ranks_as_the_bundled_model_does(demo, bundled):
    """SPARE Nearest Concepts on the demo CLIP: the same ranking (and similarities) as spare_core.neighbours on the
    bundled text encoder's states of each prompt's own positions (<bos> words <eos>: the padding left out, from the
    tokenizer's word ids); keep lines first; an unknown word in a candidate refused by name."""
    from spare_core import neighbours
    from spare_core.errors import SpareInputError
    _, _, (_, clip, _, _) = demo
    nodes = sys.modules[PACK_NAME + ".nodes.spare_nodes"]
    objects = "{circle|square|star|heart}"
    concepts = [f"A {o} image in ukiyo style." for o in ("circle", "square", "star", "heart")]
    candidates = [f"A {objects} image in {s} style." for s in ("neon", "sunset", "lava", "blueprint", "forest")]
    keep = "A star image in plain style."
    with torch.inference_mode():
        retain, ranking = nodes.NearestConcepts.execute(clip=clip, concepts="\n".join(concepts),
                                                        candidates="\n\n".join(candidates), count=2,
                                                        keep=keep).result
    pad = bundled.tokenizer.ids["<pad>"]

    def own_positions(prompts):  # one prompt at a time, as neighbours.prompt_codes asks (the lengths differ)
        states, ids = bundled.encode(list(prompts)), bundled.tokenizer(list(prompts))
        return torch.cat([s[row != pad].unsqueeze(0) for s, row in zip(states, ids)])

    with torch.inference_mode():
        assert nodes.clip_token_states(clip)(["A ring image."]).shape[1] == 5  # <bos> a ring image <eos>, of 16
    expected = neighbours.rank(own_positions, concepts, candidates)
    assert not any(n.names_concept for n in expected)
    assert retain.splitlines() == [keep] + [n.line for n in expected[:2]]
    assert "sunset" in retain.splitlines()[1]  # ukiyo's nearest style (the one its erasure takes with it)
    rows = [line.split("  ", 1) for line in ranking.splitlines()]
    assert [r[1] for r in rows] == [n.line for n in expected]
    assert [float(r[0]) for r in rows] == pytest.approx([n.similarity for n in expected], abs=2e-3)
    # a candidate naming the concept (ukiyo) is ranked, marked, and skipped: the next one is retained instead
    with torch.inference_mode():
        retain, ranking = nodes.NearestConcepts.execute(clip=clip, concepts=concepts[0], count=1,
                                                        candidates="a circle image, ukiyo\n" + candidates[0]).result
    assert retain == candidates[0] and ranking.splitlines()[0].endswith("ukiyo  (names the concept: not retained)")
    with torch.inference_mode(), pytest.raises(SpareInputError, match="'gogh'"):
        nodes.NearestConcepts.execute(clip=clip, concepts=concepts[0], candidates="a cat by van gogh", count=1)
    with pytest.raises(SpareInputError, match="count=0"):
        nodes.NearestConcepts.execute(clip=clip, concepts=concepts[0], candidates=candidates[0], count=0)
    with pytest.raises(SpareInputError, match="'concepts' is empty"):
        nodes.NearestConcepts.execute(clip=clip, concepts=" \n", candidates=candidates[0], count=1)
