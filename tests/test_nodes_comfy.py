"""The four SPARE nodes executed in-process on real tiny ComfyUI models (SD1.5, SD2.x v-prediction, SDXL), under
the executor's inference mode; the LoRA files they write (diffusion model and, by default on these UNets, the CLIP's
text encoder) loaded by ComfyUI's stock LoraLoader.

Needs a ComfyUI checkout in COMFYUI_PATH (scripts/setup_comfyui.sh); skipped with the reason printed otherwise.
"""
import json
import importlib.util
import logging
import os
import sys

import pytest
import torch

import comfy_fixtures as cf

FAMILIES = cf.FAMILIES
RES = 64  # pixels: latent 8x8
FAST = dict(samples=1, seed=0)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    cf.comfy_or_skip()
    import folder_paths

    loras = tmp_path_factory.mktemp("loras")
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], saved[1])
    # The pack, loaded the way ComfyUI loads a folder pack: its __init__.py as a package (relative imports work).
    name = "spare_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, cf.PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(cf.PACK_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    nodes_mod = sys.modules[name + ".nodes.spare_nodes"]
    yield nodes_mod, loras
    folder_paths.folder_names_and_paths["loras"] = saved
    import comfy.model_management
    comfy.model_management.unload_all_models()


def run(node, **kwargs):
    """Execute a node as the executor does: under torch.inference_mode()."""
    with torch.inference_mode():
        return node.execute(**kwargs).result


def probe(model, clip, prompt="a red cat"):
    """x0 predictions of a MODEL (with its own patches) at fixed inputs."""
    host = cf.load_pack_module("nodes/host.py")
    dm = host.ComfyDiffusionModel(model, clip, RES, RES)
    dm.load()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *dm.latent_shape), generator=g) * 3.0
    sigma = dm.sigma_at(torch.tensor([0.4, 0.8]))
    with torch.inference_mode():
        return dm.predict_x0(x, sigma, dm.encode([prompt, prompt])).float().clone()


def scan(nodes_mod, model, clip, **kw):
    args = dict(model=model, clip=clip, concept="a red cat", retain="a blue dog", selection=0.5, top_k=0,
                targets="attention", resolution=RES, **FAST)
    args.update(kw)
    return run(nodes_mod.SaliencyScan, **args)


def distill(nodes_mod, model, clip, saliency, **kw):
    args = dict(model=model, clip=clip, concepts="a red cat", surrogates="a plain house", retain="a blue dog",
                saliency=saliency, rank=2, alpha=2.0, steps=3, learning_rate=1e-2, forget_weight=0.3, samples=1,
                retain_weight=1.0, seed=0, filename_prefix="spare/test", key_format="comfyui",
                gradient_checkpointing=False, resolution=RES)
    args.update(kw)
    return run(nodes_mod.SparseLoraDistill, **args)


@pytest.mark.parametrize("family", FAMILIES)
def test_nodes_end_to_end(pack, family, caplog):
    nodes_mod, loras = pack
    import nodes as comfy_nodes
    from safetensors import safe_open

    model, clip = cf.build_tiny(family, seed=1)
    before = cf.sample(model, clip, "a red cat", seed=3, steps=2, size=RES)

    saliency, heatmap, summary = scan(nodes_mod, model, clip)
    assert saliency.selected and "selected" in summary
    assert heatmap.ndim == 4 and heatmap.shape[0] == 1 and heatmap.shape[-1] == 3
    timesteps, plot, _ = run(nodes_mod.TimestepProfileNode, model=model, clip=clip, concept="a red cat",
                             surrogate="a plain house", bins=4, samples=1, seed=0, sharpness=1.0, uniform_floor=0.2,
                             resolution=RES)
    assert len(timesteps.probs) == 4 and plot.shape[-1] == 3
    results = {}
    for key_format in ("comfyui", "kohya"):
        lora_sd, curve, filename = distill(nodes_mod, model, clip, saliency, timesteps=timesteps,
                                           key_format=key_format, filename_prefix=f"spare/{family}_{key_format}")
        path = os.path.join(str(loras), filename)
        assert os.path.isfile(path) and curve.shape[-1] == 3
        with safe_open(path, "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        prefix, text = ("diffusion_model.", "text_encoders.") if key_format == "comfyui" else ("lora_unet_", "lora_te")
        assert keys and all(k.startswith((prefix, text)) for k in keys)
        assert any(k.startswith(prefix) for k in keys) and any(k.startswith(text) for k in keys)  # both sides
        if family == "sdxl" and key_format == "kohya":  # SDXL's two CLIPs: kohya's te1 (clip_l) and te2 (clip_g)
            assert {k[:9] for k in keys if k.startswith(text)} == {"lora_te1_", "lora_te2_"}
        assert meta["spare.concepts"] == '["a red cat"]' and meta["ss_network_dim"] == "2"
        # the base-model fields A1111 filters its LoRA list by (and Forge reads), as kohya's sd-scripts write them
        version, arch = {"sd15": ("sd_v1", "stable-diffusion-v1/lora"),
                         "sd2v": ("sd_v2_v", "stable-diffusion-v2-768-v/lora"),
                         "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")}[family]
        assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (version, arch)
        assert meta["ss_v2"] == ("True" if family == "sd2v" else "False")
        # stock loader: every key maps, to the model or to the CLIP ("NOT LOADED" / "lora key not loaded" would be
        # logged otherwise)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stock = comfy_nodes.LoraLoader().load_lora(model, clip, filename, 1.0, 1.0)
        assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
        assert len(stock[1].patcher.patches) > 0  # the CLIP got the text encoder's part
        applied = run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=nodes_mod.NO_FILE,
                      lora=lora_sd, clip=clip)
        from_file = run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename, clip=clip)
        p_stock, p_applied, p_file = probe(*stock), probe(*applied), probe(*from_file)
        p_base = probe(model, clip)
        assert not torch.allclose(p_applied, p_base, atol=1e-6), "the LoRA changed nothing"
        assert not torch.allclose(probe(model, applied[1]), p_base, atol=1e-6), "the text encoder's part did nothing"
        assert torch.allclose(p_stock, p_applied, atol=1e-4) and torch.allclose(p_file, p_applied, atol=1e-4)
        # strength 0 and strength_clip 0 are the original model and CLIP
        zero = run(nodes_mod.ApplyErasure, model=model, strength=0.0, lora_name=filename, clip=clip, strength_clip=0.0)
        assert zero[1] is clip and torch.equal(probe(*zero), p_base)
        # without the CLIP, half of the erasure is refused, not applied
        with pytest.raises(nodes_mod.SpareInputError, match="also edits the text encoder"):
            run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename)
        results[key_format] = p_applied
    assert torch.allclose(results["comfyui"], results["kohya"], atol=1e-5)  # same training, same seed
    # the input MODEL is untouched: same seed, bit-identical samples after every node ran
    after = cf.sample(model, clip, "a red cat", seed=3, steps=2, size=RES)
    assert torch.equal(before, after)


def test_distill_concept_kind_object_saves_the_network_part_at_the_object_strength(pack):
    """The node's concept_kind reaches the engine: the same training as "style" (default), its network part saved at
    Family.object_model_strength instead of model_strength, the CLIP's part unchanged; the file records the kind."""
    from safetensors import safe_open
    from spare_core.families import UNET
    nodes_mod, _ = pack
    model, clip = cf.build_tiny("sd15", seed=1)
    saliency = scan(nodes_mod, model, clip)[0]
    style = distill(nodes_mod, model, clip, saliency, filename_prefix="spare/kind_style")[0]
    obj, _, filename = distill(nodes_mod, model, clip, saliency, filename_prefix="spare/kind_object",
                               concept_kind="object")
    assert set(style) == set(obj)
    ratio = UNET.object_model_strength / UNET.model_strength
    ups = [k for k in obj if "lora_up" in k or "lora_B" in k]
    assert any(k.startswith("text_encoders.") for k in ups) and any(k.startswith("diffusion_model.") for k in ups)
    for k in ups:
        expected = style[k] if k.startswith("text_encoders.") else style[k] * ratio
        assert torch.allclose(obj[k].float(), expected.float(), rtol=2e-3, atol=1e-6), k  # saved in fp16
    with safe_open(os.path.join(str(pack[1]), filename), "pt") as f:
        config = json.loads(f.metadata()["spare.config"])
    assert (config["concept_kind"], config["model_strength"]) == ("object", UNET.object_model_strength)


def test_apply_erasure_strengths_split_as_lora_loader(pack, caplog):
    """strength / strength_clip are LoraLoader's strength_model / strength_clip: the same patched model and CLIP; 0 on
    a side leaves that input itself; strength_clip 0 needs no CLIP and applies only the network's part (no "not
    loaded" log for the text keys); a prompt without strength_clip (saved before it existed) applies it at 1."""
    import nodes as comfy_nodes
    nodes_mod, _ = pack
    model, clip = cf.build_tiny("sd15", seed=4)
    saliency = scan(nodes_mod, model, clip)[0]
    lora_sd, _, filename = distill(nodes_mod, model, clip, saliency)
    base = probe(model, clip)
    stock = comfy_nodes.LoraLoader().load_lora(model, clip, filename, 0.9, 1.0)
    split = run(nodes_mod.ApplyErasure, model=model, strength=0.9, lora_name=filename, clip=clip, strength_clip=1.0)
    assert torch.allclose(probe(*split), probe(*stock), atol=1e-4)
    assert not torch.allclose(probe(*split), probe(*run(nodes_mod.ApplyErasure, model=model, strength=0.9,
                                                        lora_name=filename, clip=clip, strength_clip=0.9)), atol=1e-6)
    assert torch.equal(probe(*run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename, clip=clip)),
                       probe(*run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename, clip=clip,
                                  strength_clip=1.0)))
    # one side at 0: that input comes back itself, the other side patched as LoraLoader patches it
    clip_only = run(nodes_mod.ApplyErasure, model=model, strength=0.0, lora_name=filename, clip=clip, strength_clip=1.0)
    assert clip_only[0] is model and clip_only[1] is not clip
    assert torch.allclose(probe(*clip_only), probe(*comfy_nodes.LoraLoader().load_lora(model, clip, filename, 0.0,
                                                                                       1.0)), atol=1e-4)
    assert not torch.allclose(probe(*clip_only), base, atol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        net_only = run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename, strength_clip=0.0)
    assert net_only[1] is None and not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    stock_net = comfy_nodes.LoraLoader().load_lora(model, clip, filename, 1.0, 0.0)
    assert torch.allclose(probe(net_only[0], clip), probe(*stock_net), atol=1e-4)
    assert not torch.allclose(probe(net_only[0], clip), base, atol=1e-6)
    text_only = {k: v for k, v in lora_sd.items() if k.startswith("text_encoders.")}
    assert text_only and len(text_only) < len(lora_sd)
    with pytest.raises(nodes_mod.SpareInputError, match="edits only the text encoder"):
        run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=nodes_mod.NO_FILE, lora=text_only,
            strength_clip=0.0)
    both_zero = run(nodes_mod.ApplyErasure, model=model, strength=0.0, lora_name=filename, clip=clip,
                    strength_clip=0.0)
    assert both_zero[0] is model and both_zero[1] is clip
    assert torch.equal(probe(model, clip), base)  # the inputs untouched


def test_exported_lora_matches_spare_core_hooks(pack):
    """ComfyUI's patching of our file == spare_core's own forward-hook application (key mapping, up/down order and
    alpha/rank scaling all agree)."""
    nodes_mod, loras = pack
    import spare_core as sc
    host = cf.load_pack_module("nodes/host.py")
    model, clip = cf.build_tiny("sd15", seed=2)
    saliency = scan(nodes_mod, model, clip)[0]
    lora_sd, _, filename = distill(nodes_mod, model, clip, saliency, alpha=5.0, rank=3)
    patched = run(nodes_mod.ApplyErasure, model=model, strength=0.7, lora_name=filename, clip=clip, strength_clip=0.7)
    expected_base = probe(model, clip)
    lora = sc.load_lora(os.path.join(str(loras), filename), sc.lora_targets(host.ComfyDiffusionModel(model, clip)))
    assert lora.edits_text_encoder
    with sc.apply_lora(sc.lora_targets(host.ComfyDiffusionModel(model, clip)), lora, 0.7):
        hooked = probe(model, clip)
    assert not torch.allclose(hooked, expected_base, atol=1e-6)
    assert torch.allclose(probe(*patched), hooked, atol=1e-4)
    assert torch.equal(probe(model, clip), expected_base)


@pytest.mark.parametrize("family,scale", [("sd15", 0.18215), ("sdxl", 0.13025)])
def test_distill_converts_a_ksampler_latent_to_model_space(pack, family, scale, monkeypatch):
    """A LATENT from KSampler is in VAE space; what reaches spare_core.distill is the model's own samples
    (process_latent_in: x scale_factor), as ComfyUI's samplers convert it. Checkpointing on, under inference mode."""
    nodes_mod, loras = pack
    model, clip = cf.build_tiny(family, seed=4)
    saliency = scan(nodes_mod, model, clip)[0]
    with torch.inference_mode():  # a LATENT made by the executor is an inference tensor
        samples = torch.cat([cf.sample(model, clip, "a red cat", seed=s, steps=2, size=RES) for s in (0, 1)])
    seen = {}
    real = nodes_mod.sc.distill

    def spy(dm, config, sal, timesteps=None, latents=None, **kw):
        seen["latents"] = latents.clone()
        return real(dm, config, sal, timesteps, latents, **kw)
    monkeypatch.setattr(nodes_mod.sc, "distill", spy)
    lora_sd, _, filename = distill(nodes_mod, model, clip, saliency, latents={"samples": samples},
                                   gradient_checkpointing=True)
    assert os.path.isfile(os.path.join(str(loras), filename)) and lora_sd
    assert model.model.latent_format.scale_factor == pytest.approx(scale)
    assert torch.allclose(seen["latents"], samples.float() * scale, atol=1e-6)


def test_distill_refuses_a_foreign_latent(pack):
    nodes_mod, loras = pack
    from spare_core.errors import SpareInputError
    model, clip = cf.build_tiny("sd15", seed=4)
    saliency = scan(nodes_mod, model, clip)[0]
    files_before = sorted(os.listdir(loras))
    for latent, match in (({"samples": torch.zeros(1, 16, 8, 8)}, "16 channels but this model's latents have 4"),
                          ({"samples": torch.zeros(4, 8, 8)}, "expected a LATENT")):
        with pytest.raises(SpareInputError, match=match):
            distill(nodes_mod, model, clip, saliency, latents=latent)
    assert sorted(os.listdir(loras)) == files_before


@pytest.mark.parametrize("kw,match", [
    ({"concepts": "  \n "}, "concept"),
    ({"surrogates": "A red cat"}, "equals the concept"),
    ({"retain": "a red cat"}, "retain"),
    ({"rank": 128}, "rank=128 is larger than any selected module"),
    ({"steps": 0}, "steps=0"),
    ({"filename_prefix": "../../escape"}, "filename_prefix"),
])
def test_bad_inputs_name_the_input(pack, kw, match):
    nodes_mod, loras = pack
    from spare_core.errors import SpareInputError
    model, clip = cf.build_tiny("sd15", seed=1)
    saliency = scan(nodes_mod, model, clip)[0]
    files_before = sorted(os.listdir(loras))
    with pytest.raises(SpareInputError, match=match):
        distill(nodes_mod, model, clip, saliency, **kw)
    assert sorted(os.listdir(loras)) == files_before


def test_scan_and_apply_errors(pack, tmp_path):
    nodes_mod, loras = pack
    from safetensors.torch import save_file
    from spare_core.errors import SpareInputError
    model, clip = cf.build_tiny("sd15", seed=1)
    with pytest.raises(SpareInputError, match="'concept' is empty"):
        scan(nodes_mod, model, clip, concept="")
    with pytest.raises(SpareInputError, match="needs a LoRA"):
        run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=nodes_mod.NO_FILE)
    other = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(4, 2),  # a Flux LoRA
             "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(SpareInputError, match="none of its 2 keys matches this model"):
        run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=nodes_mod.NO_FILE, lora=other)
    # a truncated / foreign file in the loras folder: named, not safetensors' raw "header too large"
    import folder_paths
    for name, data in (("spare/broken.safetensors", b"\xff" * 64), ("spare/broken.ckpt", b"not a pickle")):
        path = os.path.join(str(loras), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        folder_paths.filename_list_cache.clear()
        try:
            with pytest.raises(SpareInputError, match=f"LoRA file '{name}'"):
                run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=name)
        finally:
            os.remove(path)


def test_cancel_leaves_no_file(pack):
    nodes_mod, loras = pack
    import comfy.model_management as mm
    model, clip = cf.build_tiny("sd15", seed=1)
    saliency = scan(nodes_mod, model, clip)[0]
    files_before = sorted(os.listdir(loras))
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            distill(nodes_mod, model, clip, saliency, steps=50)
    finally:
        mm.interrupt_current_processing(False)
    assert sorted(os.listdir(loras)) == files_before
    assert all(not m._forward_hooks for m in model.model.diffusion_model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_export_maps_every_key(pack, family, caplog):
    """spare_core's export (both key formats) of a LoRA on EVERY Linear/Conv2d of the full-size UNet (meta device):
    ComfyUI's loader maps every key, each to the right weight, logging no 'lora key not loaded'."""
    import comfy.lora
    import spare_core as sc
    from spare_core.adapters import module_dims

    base = cf.build_full_base_model(family)
    net = base.diffusion_model
    candidates = sc.candidate_modules(net, "all")
    assert len(candidates) > 200
    modules = {}
    for path, m in candidates.items():
        down_shape = (1, *m.weight.shape[1:])
        up_shape = (m.weight.shape[0], 1, *([1] * (m.weight.dim() - 2)))
        modules[path] = {"down": torch.zeros(down_shape), "up": torch.zeros(up_shape), "alpha": torch.tensor(1.0)}
        module_dims(m)  # every candidate is a shape a LoRA can take
    weights = sc.LoraWeights(modules, {})
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    for key_format in ("comfyui", "kohya"):
        sd = weights.state_dict(key_format, "diffusion_model.")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(sd, key_map)
        assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
        assert set(patches) == {f"diffusion_model.{p}.weight" for p in candidates}


def test_unsupported_families_are_refused_by_name(pack):
    """A real (meta-device, full-size) AuraFlow MODEL, a family SPARE does not train: every training node refuses it
    with a message naming the model and listing the supported families."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    from spare_core.errors import SpareInputError
    nodes_mod, _ = pack
    config = sm.AuraFlow({"cond_seq_dim": 2048})
    aura = comfy.model_patcher.ModelPatcher(config.get_model({}, device=torch.device("meta")),
                                            load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    _, clip = cf.build_tiny("sd15")
    with pytest.raises(SpareInputError, match="AuraFlow models .* are not supported; .*Flux.1 .*Qwen-Image"):
        scan(nodes_mod, aura, clip)
    with pytest.raises(SpareInputError, match="AuraFlow models"):
        run(nodes_mod.TimestepProfileNode, model=aura, clip=clip, concept="a", surrogate="b", bins=4, samples=1,
            seed=0, sharpness=1.0, uniform_floor=0.2, resolution=RES)
    with pytest.raises(SpareInputError, match="AuraFlow models"):
        distill(nodes_mod, aura, clip, None)
    with pytest.raises(SpareInputError, match="AuraFlow models"):
        run(nodes_mod.ConceptSamples, model=aura, clip=clip, concept="a", samples=1, seed=0, resolution=RES,
            steps=1, cfg=1.0)


def test_bf16_model_trains_under_autocast(pack):
    """A bf16 SD1.5 MODEL (weights and compute in bf16): Distill trains with autocast, the fp32 adapters get finite
    updates, and the file applies with the stock loader."""
    import comfy.model_management as mm
    import comfy.model_patcher
    nodes_mod, loras = pack
    config = cf._model_config("sd15", dict(cf.TINY_UNET["sd15"]), tiny=True)
    config.set_inference_dtype(torch.bfloat16, None)
    base = cf._base_model("sd15", config)
    cf.init_params_(base.diffusion_model, 5)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    assert base.get_dtype() == torch.bfloat16
    clip = cf.build_tiny_clip("sd15")
    saliency = scan(nodes_mod, model, clip)[0]
    lora_sd, curve, filename = distill(nodes_mod, model, clip, saliency, steps=3)
    ups = [v for k, v in lora_sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(u.float()).all() for u in ups) and any(u.abs().sum() > 0 for u in ups)
    patched = run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename, clip=clip)
    assert torch.isfinite(probe(*patched)).all()


def test_one_sample_set_feeds_every_stage(pack):
    """SPARE Concept Samples draws what the stages would draw themselves (same seed, samples, sampler), so feeding
    its LATENT to Saliency Scan, Timestep Profile and Distill gives the same results as their own self-generation,
    while the samples are drawn once. Multi-line concepts come out round-robin (sample i = concept i % n)."""
    nodes_mod, loras = pack
    host = cf.load_pack_module("nodes/host.py")
    import spare_core as sc
    model, clip = cf.build_tiny("sd15", seed=6)
    common = dict(model=model, clip=clip, seed=0, resolution=RES)
    (latent,) = run(nodes_mod.ConceptSamples, concept="a red cat", samples=2, steps=8, cfg=5.0, **common)
    assert latent["samples"].shape == (2, 4, RES // 8, RES // 8)

    own_sal = scan(nodes_mod, model, clip, samples=2)[0]
    shared_sal = scan(nodes_mod, model, clip, samples=2, latents=latent)[0]
    assert own_sal.selected == shared_sal.selected
    assert all(abs(own_sal.scores[k] - shared_sal.scores[k]) <= 1e-4 * abs(own_sal.scores[k]) + 1e-12
               for k in own_sal.scores)
    prof = dict(concept="a red cat", surrogate="a plain house", bins=4, samples=2, sharpness=1.0, uniform_floor=0.2,
                **common)
    own_prof = run(nodes_mod.TimestepProfileNode, **prof)[0]
    shared_prof = run(nodes_mod.TimestepProfileNode, latents=latent, **prof)[0]
    assert own_prof.probs == pytest.approx(shared_prof.probs, rel=1e-4)
    own = distill(nodes_mod, model, clip, own_sal, samples=2, filename_prefix="spare/own")[0]
    shared = distill(nodes_mod, model, clip, own_sal, samples=2, latents=latent, filename_prefix="spare/shared")[0]
    assert own.keys() == shared.keys()
    # equal up to the fp16 rounding of the state dict (the samples went VAE space and back: x / 0.18215 * 0.18215)
    assert all(torch.allclose(own[k].float(), shared[k].float(), rtol=1e-3, atol=1e-3) for k in own)

    # two concept lines: round-robin order, in VAE space (what VAE Decode expects)
    (two,) = run(nodes_mod.ConceptSamples, concept="a red cat\na blue dog", samples=2, steps=8, cfg=5.0, **common)
    dm = host.ComfyDiffusionModel(model, clip, RES, RES)
    with torch.inference_mode():
        x, index = sc.generate(dm, ["a red cat", "a blue dog"], 2, 0, 8, 5.0)
    assert index.tolist() == [0, 0, 1, 1]
    want = model.model.process_latent_out(x[torch.tensor([0, 2, 1, 3])])
    torch.testing.assert_close(two["samples"], want)


def test_progress_eta_ignores_the_warm_up(pack, caplog):
    """The first report comes after the warm-up (model load, sampling, first step): a 20 s warm-up then 0.1 s steps
    must not give 'ETA 3980s' at step 1, and the ETA from step 4 on is the measured step time x the steps left."""
    nodes_mod, _ = pack
    clock = iter([0.0, 20.0] + [20.0 + 0.1 * i for i in range(1, 200)])
    progress = nodes_mod.Progress("distill", clock=lambda: next(clock))
    with caplog.at_level(logging.INFO):
        progress(1, 200)
        assert progress.eta(1, 200, 20.0) is None
        for done in range(2, 5):
            progress(done, 200)
    first = [r.getMessage() for r in caplog.records if "SPARE distill: 1/200" in r.getMessage()]
    assert first and "ETA after" in first[0] and "ETA 3980" not in first[0], first
    assert progress.eta(4, 200, 20.3) == pytest.approx(0.1 * 196)


def test_stage_inputs_come_from_the_configs(pack):
    """Every option a stage node shows is a field of its spare_core config (spare_core/config.py, distill.py) with the
    same name, default and tooltip, and every such field has its input: one place for a default or a help text."""
    import spare_core as sc

    nodes_mod, _ = pack
    stages = {nodes_mod.SaliencyScan: sc.ScanConfig, nodes_mod.TimestepProfileNode: sc.ProfileConfig,
              nodes_mod.SparseLoraDistill: sc.DistillConfig}
    for node, config in stages.items():
        inputs = {i.id: i for i in node.define_schema().inputs}
        for name in sc.config.node_options(config):
            assert name in inputs, f"{node.__name__} has no input for {config.__name__}.{name}"
            d = sc.config.describe(config, name)
            default = "\n".join(d["default"] or []) if d["type"].startswith("list") else d["default"]
            assert inputs[name].default == default, (node.__name__, name)
            assert inputs[name].tooltip == d["help"], (node.__name__, name)


@pytest.mark.parametrize("family", FAMILIES + tuple(getattr(cf, "DIT_FAMILIES", ())))
def test_nearest_concepts_on_every_family_clip(pack, family):
    """SPARE Nearest Concepts on each family's real (tiny, random) CLIP: every candidate ranked once, nearest first,
    the retain output = keep + the `count` nearest, each prompt read at its own positions where the tokenizer tells
    them; on the UNets with the shipped default candidates."""
    nodes_mod, _ = pack
    from spare_core import neighbours
    dit = family in getattr(cf, "DIT_FAMILIES", ())
    clip = cf.build_tiny_dit_clip(family, seed=1) if dit else cf.build_tiny(family, seed=1)[1]
    candidates = list(neighbours.DEFAULT_CANDIDATES[:6] if dit else neighbours.DEFAULT_CANDIDATES)
    with torch.inference_mode():
        retain, ranking = run(nodes_mod.NearestConcepts, clip=clip, concepts="a cat in the style of Van Gogh",
                              candidates="\n".join(candidates), count=3, keep="a photo of a dog")
    marker = "  (names the concept: not retained)"
    rows = [line.removesuffix(marker).split("  ", 1) + [line.endswith(marker)] for line in ranking.splitlines()]
    assert sorted(r[1] for r in rows) == sorted(candidates)
    scores = [float(r[0]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores) and len(set(scores)) > 1
    # "... in the style of Vincent van Gogh" (with "a cat" among its subjects) names the concept: never retained
    marked = [r[1] for r in rows if r[2]]
    assert marked == [c for c in candidates if "van Gogh" in c] and marked
    assert retain.splitlines() == ["a photo of a dog"] + [r[1] for r in rows if not r[2]][:3]
    with torch.inference_mode():
        own = nodes_mod.clip_token_states(clip)(["a cat"]).shape[1]
        every = clip.encode_from_tokens(clip.tokenize("a cat")).shape[1]
    # each prompt's own positions (start, words, end) where the tokenizer says which they are: the padded outputs of
    # the UNets' CLIPs, Flux's T5 and SD3's CLIP + T5 (joined) shrink; the others pad nothing here
    shrink = ("sd15", "sd2v", "sdxl", "flux", "flux_schnell", "sd3")
    assert own < every if family in shrink else own == every, (own, every)
