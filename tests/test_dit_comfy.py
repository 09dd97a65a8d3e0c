"""The DiT families (Flux-dev, Flux-schnell, Chroma, SD3, Qwen-Image, Lumina 2) through the pack, on tiny models built
from ComfyUI's own classes (tests/comfy_fixtures.py: the family's comfy.supported_models config, model_base class
and text encoders, random weights, CPU):

- the whole graph: Concept Samples -> Saliency Scan -> Timestep Profile -> Sparse LoRA Distill -> Apply Erasure and
  ComfyUI's stock LoraLoaderModelOnly (0 keys dropped, both key formats, the family in the file's metadata); the
  input MODEL bit-identical; the concept's prediction moves toward the surrogate's, more than a retain prompt's moves;
- exact gradients: LoRA and weight gradients through the family's blocks in fp64 against central finite differences,
  with and without gradient checkpointing; for the families whose blocks add residuals in place (Flux, Chroma), the
  same backward without `backward_safe` fails;
- conditioning: prompts of different token lengths are never repeated or padded into one joint-attention forward;
- fp8-stored weights (a Flux fp8 checkpoint) train in the compute dtype; a model computed in fp8 is refused.

Needs a ComfyUI checkout in COMFYUI_PATH (scripts/setup_comfyui.sh); skipped with the reason printed otherwise.
"""
import logging
import os

import pytest
import torch

import comfy_fixtures as cf
from test_nodes_comfy import pack, run  # noqa: F401  (the pack fixture: the pack loaded as ComfyUI loads it)

DIT_FAMILIES = getattr(cf, "DIT_FAMILIES", ())
RES = 64  # pixels: latent 8 x 8 (Flux/SD3/Qwen patch 2: 16 image tokens)
SHORT, LONG = "a red cat", ("a red cat sitting on a wooden chair in a sunny garden with many flowers, painted "
                            "carefully in oil with thick brush strokes, warm evening light and long soft shadows "
                            "over green grass, " * 2).strip()


@pytest.fixture(scope="module")
def host():
    cf.comfy_or_skip()
    return cf.load_pack_module("nodes/host.py")


def x0(model, clip, prompts, guidance=None, clean=None):
    """x0 predictions of a MODEL (with its own patches) for `prompts` at fixed noisy inputs: `clean` (model-space
    samples [N, ...]) noised at t = 0.3, 0.5, 0.7, 0.9 with fixed noise, per prompt; without `clean`, one input per
    prompt from a fixed generator. Returns [len(prompts), ...]: per prompt, its predictions stacked."""
    host = cf.load_pack_module("nodes/host.py")
    dm = host.ComfyDiffusionModel(model, clip, RES, RES, guidance)
    dm.load()
    g = torch.Generator().manual_seed(0)
    if clean is None:
        n = len(prompts)
        x = torch.randn((4, *dm.latent_shape), generator=g)[:n] * 0.5  # the same inputs for any prompt count <= 4
        noise = torch.randn((4, *dm.latent_shape), generator=g)[:n]
        sigma = dm.sigma_at(torch.full((n,), 0.6))
        with torch.inference_mode():
            return dm.predict_x0(dm.add_noise(x, noise, sigma), sigma, dm.encode(prompts)).float().clone()
    t = torch.tensor([0.3, 0.5, 0.7, 0.9]).repeat_interleave(clean.shape[0])
    x = clean.float().repeat(4, *[1] * (clean.dim() - 1))
    noise = torch.randn(x.shape, generator=g)
    sigma = dm.sigma_at(t)
    xt = dm.add_noise(x, noise, sigma)
    out = []
    with torch.inference_mode():
        for p in prompts:
            cond = dm.select_cond(dm.encode([p]), torch.zeros(len(t), dtype=torch.long))
            out.append(dm.predict_x0(xt, sigma, cond).float().clone())
    return torch.stack(out)


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_dit_graph_end_to_end(pack, host, family, caplog):  # noqa: F811
    nodes_mod, loras = pack
    import nodes as comfy_nodes
    from safetensors import safe_open

    from spare_core import families

    model, clip = cf.build_tiny(family, seed=1)
    fam = host.model_family(model)
    assert fam is families.FAMILIES[family]
    before = cf.sample(model, clip, "a red cat", seed=3, steps=2, size=RES)
    weights_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}

    latents = run(nodes_mod.ConceptSamples, model=model, clip=clip, concept="a red cat", samples=2, seed=0,
                  resolution=RES, steps=2, cfg=4.0)[0]
    assert latents["samples"].shape[0] == 2 and torch.isfinite(latents["samples"]).all()
    saliency, heatmap, summary = run(nodes_mod.SaliencyScan, model=model, clip=clip, concept="a red cat",
                                     retain="a blue dog", samples=1, seed=0, selection=0.5, top_k=0, targets="all",
                                     resolution=RES, latents=latents, gradient_checkpointing=True)
    # every candidate lies inside the transformer blocks (spare_core/families.py)
    assert saliency.selected and all(p.split(".")[0] in fam.blocks for p in saliency.scores)
    timesteps = run(nodes_mod.TimestepProfileNode, model=model, clip=clip, concept="a red cat",
                    surrogate="a plain house", bins=4, samples=1, seed=0, sharpness=1.0, uniform_floor=0.2,
                    resolution=RES, latents=latents)[0]
    clean = model.model.process_latent_in(latents["samples"].float())  # the concept's samples, model space
    probe_prompts = ["a red cat", "a plain house", "a blue dog"]
    base_x0 = x0(model, clip, probe_prompts, clean=clean)
    for key_format, checkpointing in (("comfyui", True), ("kohya", False)):
        lora_sd, curve, filename = run(
            nodes_mod.SparseLoraDistill, model=model, clip=clip, concepts="a red cat", surrogates="a plain house",
            retain="a blue dog", saliency=saliency, timesteps=timesteps, rank=4, alpha=4.0, steps=40,
            learning_rate=1e-2, forget_weight=1.0, retain_weight=1.0, samples=2, seed=0,
            filename_prefix=f"spare/{family}_{key_format}", key_format=key_format,
            gradient_checkpointing=checkpointing, resolution=RES)
        path = os.path.join(str(loras), filename)
        with safe_open(path, "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert keys and all(k.startswith("diffusion_model." if key_format == "comfyui" else "lora_unet_")
                            for k in keys)
        assert meta["modelspec.architecture"] == fam.architecture and meta["spare.family"] == family
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, filename, 1.0)[0]
        assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
        applied = run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename)[0]
        erased = x0(applied, clip, probe_prompts, clean=clean)
        assert torch.allclose(x0(stock, clip, ["a red cat"]), x0(applied, clip, ["a red cat"]), atol=1e-4)
        # the concept's prediction moves toward the surrogate's, more than the retain prompt's does
        def toward_surrogate(row):
            return float((base_x0[row] - base_x0[1]).norm() - (erased[row] - base_x0[1]).norm())
        assert toward_surrogate(0) > max(toward_surrogate(2), 0.0), (family, key_format, toward_surrogate(0),
                                                                     toward_surrogate(2))
    # the input MODEL is untouched
    after = cf.sample(model, clip, "a red cat", seed=3, steps=2, size=RES)
    assert torch.equal(before, after)
    assert all(torch.equal(v, weights_before[k]) for k, v in model.model.diffusion_model.state_dict().items())


def _to64(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.detach().clone().double()
    return value


def _cond64(host, cond):
    if isinstance(cond, host.RowConds):
        return host.RowConds([{k: _to64(v) for k, v in row.items()} for row in cond.rows])
    return {k: _to64(v) for k, v in cond.items()}


def _central_difference(loss, params, direction, h):
    """(loss(params + h d) - loss(params - h d)) / 2h along `direction`, the parameters restored afterwards."""
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = loss()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = loss()
        for p, d in zip(params, direction):
            p.add_(h * d)
    return float((up - down) / (2 * h))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_gradients_are_exact(host, family, checkpointing):
    """fp64: the gradient of a loss through the family's network (called as apply_model calls it) w.r.t. LoRA adapters (what Distill trains) and
    w.r.t. candidate weights (what Saliency Scan scores) equals central finite differences along a random direction.
    For the families that add residuals in place, the same backward without backward_safe raises."""
    from spare_core import families
    from spare_core.adapters import attach
    from spare_core.autograd import backward_safe, frozen, gradient_checkpointing
    from spare_core.saliency import candidate_modules

    model, clip = cf.build_tiny(family, seed=2)
    dm = host.ComfyDiffusionModel(model, clip, RES, RES)
    fam = families.FAMILIES[family]
    cond = dm.encode([SHORT, SHORT])  # one length: the network gets one batch (lengths: the test below)
    net = dm.network
    with host.trainable(dm):
        net.double()
        if hasattr(net, "dtype"):
            net.dtype = torch.float64
        dm.base.manual_cast_dtype = None
        cond = _cond64(host, cond)
        g = torch.Generator().manual_seed(0)
        x = torch.randn((2, *dm.latent_shape), generator=g, dtype=torch.float64)
        sigma = dm.sigma_at(torch.tensor([0.3, 0.7])).double()
        modules = candidate_modules(net, "all", fam)
        paths = list(modules)[::3]
        with torch.random.fork_rng():  # the adapters' random init seeded too: the same check on every run
            torch.manual_seed(0)
            adapters = attach(net, paths, 2, 2.0, dtype=torch.float64)
        with torch.no_grad():
            for a in adapters.adapters.values():  # a nonzero up: the down projection's gradient is then nonzero
                a.up.weight.normal_(0, 0.1, generator=g)
        weights = [modules[p].weight for p in paths[:2]]
        params = adapters.parameters() + weights

        # The network called as BaseModel._apply_model calls it, but in fp64 throughout: apply_model casts the
        # network's output to fp32, whose rounding would swamp a finite difference.
        ms = dm.model_sampling
        xc, timestep = ms.calculate_input(sigma, x).double(), ms.timestep(sigma).double()
        extra = {k: v for k, v in cond.items() if k != "c_crossattn"}

        def loss():
            out = net(xc, timestep, context=cond["c_crossattn"], transformer_options={}, **extra)
            return (out ** 2).mean()

        try:
            with adapters, frozen(net):
                for w in weights:
                    w.requires_grad_(True)
                with backward_safe(net, checkpointing, fam.inplace_residuals):
                    grads = torch.autograd.grad(loss(), params)
                if fam.inplace_residuals:
                    unsafe = gradient_checkpointing(net) if checkpointing else torch.enable_grad()
                    with unsafe, pytest.raises(RuntimeError, match="inplace operation"):
                        torch.autograd.grad(loss(), params)
                for w in weights:
                    w.requires_grad_(False)
                direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
                # h 1e-5: the difference's error is truncation (it falls 100x per 10x smaller h); at 1e-4 it reached
                # 1.3e-5 of the gradient for some adapter inits (flaky against 1e-5), at 1e-5 at most 1.3e-7 (4 inits)
                numeric = _central_difference(loss, params, direction, 1e-5)
        finally:
            net.float()
            if hasattr(net, "dtype"):
                net.dtype = torch.float32
    analytic = float(sum((gr * d).sum() for gr, d in zip(grads, direction)))
    assert abs(analytic - numeric) <= 1e-5 * abs(numeric) + 1e-12, (family, analytic, numeric)


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_prompts_of_different_lengths_are_not_batched_together(host, family):
    """A batch of a short and a long prompt predicts what each prompt predicts alone: prompts whose conditionings
    differ in length go through separate forwards (no token repetition, no padding)."""
    model, clip = cf.build_tiny(family, seed=4)
    dm = host.ComfyDiffusionModel(model, clip, RES, RES)
    dm.load()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *dm.latent_shape), generator=g)
    sigma = dm.sigma_at(torch.tensor([0.4, 0.7]))
    with torch.inference_mode():
        cond = dm.encode([SHORT, LONG])
        both = dm.predict_x0(x, sigma, cond)
        alone = torch.cat([dm.predict_x0(x[i:i + 1], sigma[i:i + 1], dm.encode([p]))
                           for i, p in enumerate((SHORT, LONG))])
    assert torch.allclose(both, alone, atol=1e-5)
    if isinstance(cond, host.RowConds):  # the encoder gave the two prompts different lengths
        assert len({tuple(row["c_crossattn"].shape) for row in cond.rows}) == 2
    # no family's encoder has a length limit to refuse: a prompt of ~800 tokens (beyond CLIP's 77-token window and
    # T5's 512) is encoded whole, as ComfyUI's CLIPTextEncode does (chunks), and predicts finite values
    very_long = " ".join((LONG.split() * 30)[:700])
    with torch.inference_mode():
        y = dm.predict_x0(x[:1], sigma[:1], dm.encode([very_long]))
    assert torch.isfinite(y).all()


def test_guidance_reaches_flux_dev(pack, host):  # noqa: F811
    """Flux-dev's guidance input is what the network sees: other values, other predictions."""
    if "flux" not in DIT_FAMILIES:
        pytest.skip("no tiny Flux-dev fixture")
    model, clip = cf.build_tiny("flux", seed=5)
    a, b = x0(model, clip, [SHORT], guidance=1.5), x0(model, clip, [SHORT], guidance=5.0)
    assert not torch.allclose(a, b, atol=1e-6)
    assert torch.equal(x0(model, clip, [SHORT]), x0(model, clip, [SHORT], guidance=3.5))  # ComfyUI's default


def test_noise_levels_follow_a_shift_node_on_the_model(host):
    """A ModelSamplingFlux node put on the MODEL (resolution-dependent shift) moves the noise levels SPARE trains at
    exactly as it moves the sampler's: sigma_at goes through the clone's own model_sampling."""
    if "flux" not in DIT_FAMILIES:
        pytest.skip("no tiny Flux-dev fixture")
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    model, clip = cf.build_tiny("flux", seed=6)
    (shifted,) = ModelSamplingFlux().patch(model, max_shift=1.15, base_shift=0.5, width=256, height=256)
    t = torch.tensor([0.2, 0.5, 0.8])
    plain = host.ComfyDiffusionModel(model, clip, RES, RES).sigma_at(t)
    moved = host.ComfyDiffusionModel(shifted, clip, RES, RES).sigma_at(t)
    ms = shifted.get_model_object("model_sampling")
    assert not torch.allclose(plain, moved)
    assert torch.allclose(moved, torch.tensor([float(ms.percent_to_sigma(1 - v)) for v in t.tolist()]), atol=1e-6)


def test_fp8_stored_weights_train_in_the_compute_dtype(pack, host):  # noqa: F811
    """Flux users load fp8_e4m3fn checkpoints: ComfyUI stores the weights in fp8 and computes in another dtype
    (comfy.ops' manual cast). The whole erasure runs on such a model (a tiny Flux stored in fp8, computed in fp32 on
    the CPU): the scan scores its modules, the LoRA trains (finite, not zero), the erased prediction differs and the
    fp8 weights stay bit-identical. The same weights computed IN fp8 are refused, naming the input and the fix."""
    if "flux" not in DIT_FAMILIES:
        pytest.skip("no tiny Flux-dev fixture")
    from safetensors.torch import load_file

    from spare_core.errors import SpareInputError

    nodes_mod, loras = pack
    clip = cf.build_tiny_dit_clip("flux", seed=1)
    model = cf.build_tiny_dit_fp8("flux", seed=1, compute_dtype=torch.float32)
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {torch.float8_e4m3fn}
    bits_before = {k: v.view(torch.uint8).clone() for k, v in model.model.diffusion_model.state_dict().items()
                   if v.dtype == torch.float8_e4m3fn}
    latents = run(nodes_mod.ConceptSamples, model=model, clip=clip, concept="a red cat", samples=2, seed=0,
                  resolution=RES, steps=2, cfg=4.0)[0]
    saliency = run(nodes_mod.SaliencyScan, model=model, clip=clip, concept="a red cat", retain="a blue dog",
                   samples=1, seed=0, selection=0.5, top_k=0, targets="all", resolution=RES, latents=latents,
                   gradient_checkpointing=False)[0]
    assert saliency.selected and all(v > 0 for v in saliency.scores.values())
    timesteps = run(nodes_mod.TimestepProfileNode, model=model, clip=clip, concept="a red cat",
                    surrogate="a plain house", bins=4, samples=1, seed=0, sharpness=1.0, uniform_floor=0.2,
                    resolution=RES, latents=latents)[0]
    _, _, filename = run(nodes_mod.SparseLoraDistill, model=model, clip=clip, concepts="a red cat",
                         surrogates="a plain house", retain="a blue dog", saliency=saliency, timesteps=timesteps,
                         rank=4, alpha=4.0, steps=10, learning_rate=1e-2, forget_weight=1.0, retain_weight=1.0,
                         samples=2, seed=0, filename_prefix="spare/flux_fp8", key_format="comfyui",
                         gradient_checkpointing=True, resolution=RES)
    tensors = load_file(os.path.join(str(loras), filename))
    ups = [v for k, v in tensors.items() if ".lora_up." in k]
    assert ups and all(torch.isfinite(v).all() for v in tensors.values()) and any(v.abs().sum() > 0 for v in ups)
    applied = run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename)[0]
    # a MODEL with a LoRA patch on its fp8 weights (a user's LoRA loader before SPARE): loading bakes the patch into
    # fp8 with stochastic rounding, also when the load happens under grad mode (trainable() reloads a model ComfyUI
    # offloaded meanwhile, e.g. for the CLIP on a small GPU): that once raised in comfy.float's clamp(out=...)
    with torch.enable_grad():
        host.ComfyDiffusionModel(applied, clip, RES, RES).load()
    again = run(nodes_mod.SparseLoraDistill, model=applied, clip=clip, concepts="a red cat",
                surrogates="a plain house", retain="a blue dog", saliency=saliency, timesteps=timesteps, rank=4,
                alpha=4.0, steps=2, learning_rate=1e-2, forget_weight=1.0, retain_weight=1.0, samples=1, seed=0,
                filename_prefix="spare/flux_fp8_patched", key_format="comfyui", gradient_checkpointing=False,
                resolution=RES)[2]
    assert os.path.exists(os.path.join(str(loras), again))
    assert not torch.allclose(x0(applied, clip, ["a red cat"]), x0(model, clip, ["a red cat"]), atol=1e-6)
    for k, v in model.model.diffusion_model.state_dict().items():
        if k in bits_before:
            assert torch.equal(v.view(torch.uint8), bits_before[k]), k
    computed_in_fp8 = cf.build_tiny_dit_fp8("flux", seed=1, compute_dtype=None)
    with pytest.raises(SpareInputError, match=r"model: its weights are torch.float8_e4m3fn.*weight_dtype 'default'"):
        host.ComfyDiffusionModel(computed_in_fp8, clip, RES, RES)


def test_a_latent_of_another_family_is_refused(pack):  # noqa: F811
    """An SD (4-channel) LATENT given to a 16-channel DiT: a clear error naming the input, and no file written."""
    nodes_mod, loras = pack
    from spare_core.errors import SpareInputError
    if not DIT_FAMILIES:
        pytest.skip("no tiny DiT fixture")
    family = DIT_FAMILIES[0]
    model, clip = cf.build_tiny(family, seed=7)
    before = sorted(p.name for p in loras.rglob("*"))
    with pytest.raises(SpareInputError, match="latents have 4 channels but this model's latents have 16"):
        run(nodes_mod.SaliencyScan, model=model, clip=clip, concept="a red cat", retain="", samples=1, seed=0,
            selection=0.5, top_k=0, targets="all", resolution=RES, latents={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(SpareInputError, match="latents: expected a LATENT"):
        run(nodes_mod.TimestepProfileNode, model=model, clip=clip, concept="a red cat", surrogate="a house", bins=4,
            samples=1, seed=0, sharpness=1.0, uniform_floor=0.2, resolution=RES,
            latents={"samples": torch.zeros(1, 16, 2, 2, 8, 8)})
    assert sorted(p.name for p in loras.rglob("*")) == before


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_full_size_export_maps_every_key(pack, family, caplog):  # noqa: F811
    """spare_core's export (both key formats) of a LoRA on every candidate of the full-size network (meta device):
    ComfyUI's loader maps every key to its weight, logging no 'lora key not loaded'."""
    import comfy.lora

    import spare_core as sc
    from spare_core import families
    try:
        base = cf.build_full_base_model(family)
    except (KeyError, NotImplementedError) as e:
        pytest.skip(f"no full-size {family} configuration in the fixtures: {e}")
    net = base.diffusion_model
    candidates = sc.candidate_modules(net, "all", families.FAMILIES[family])
    assert len(candidates) > 50
    modules = {p: {"down": torch.zeros(1, m.weight.shape[1]), "up": torch.zeros(m.weight.shape[0], 1),
                   "alpha": torch.tensor(1.0)} for p, m in candidates.items()}
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    for key_format in ("comfyui", "kohya"):
        sd = sc.LoraWeights(modules, {}).state_dict(key_format, "diffusion_model.")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(sd, key_map)
        assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
        assert set(patches) == {f"diffusion_model.{p}.weight" for p in candidates}


def test_fused_slices_on_flux_load_in_the_stock_loader(pack, host, caplog):  # noqa: F811
    """Flux's fused projections as row slices (ScanConfig.fused_slices): the scan scores q / k / v of every qkv and
    q / k / v / mlp of every linear1; the LoRA trained on slices is written as ordinary whole-module keys, which
    ComfyUI's stock LoraLoaderModelOnly loads with 0 keys dropped and which predict what the live adapters did."""
    if "flux" not in DIT_FAMILIES:
        pytest.skip("no tiny Flux-dev fixture")
    import comfy.lora
    import nodes as comfy_nodes

    import spare_core as sc
    _, loras = pack
    model, clip = cf.build_tiny("flux", seed=6)
    dm = host.ComfyDiffusionModel(model, clip, RES, RES)
    dm.load()
    sal = sc.saliency_scan(dm, [SHORT], samples=1, sample_steps=2, seed=0, fused_slices=True, selection=1.0)
    slices = [p for p in sal.scores if p.endswith("]")]
    assert {p.rsplit("[", 1)[1] for p in slices} == {"q]", "k]", "v]", "mlp]"}
    assert all(p.rsplit("[", 1)[0].endswith(("qkv", "linear1")) for p in slices)
    picked = [p for p in slices if p.endswith(("[k]", "[mlp]"))][:4] + [p for p in sal.scores if "[" not in p][:2]
    adapters = sc.adapters.attach(dm.network, picked, 2, 2.0)
    try:
        with torch.no_grad():
            for a in adapters.adapters.values():
                a.up.weight.normal_(0, 0.05)
        live = x0(model, clip, [SHORT])
        lora = sc.LoraWeights.from_adapters(adapters, {"spare.family": "flux"})
    finally:
        adapters.remove()
    assert set(lora.modules) == {p.split("[")[0] for p in picked}
    sc.save_lora(os.path.join(str(loras), "slices.safetensors"), lora)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "slices.safetensors", 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert (live - x0(model, clip, [SHORT])).abs().max() > 0.02  # the adapters did move it (10x the tolerance)
    assert torch.allclose(x0(stock, clip, [SHORT]), live, atol=2e-3)  # the file is fp16
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert len(comfy.lora.load_lora(lora.state_dict(), key_map)) == len(lora.modules)


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_text_encoder_trains_on_every_dit(pack, family, caplog):  # noqa: F811
    """text_encoder "on" / "last" (off by default on the DiTs): the LoRA holds the Linears of the text-encoder layers
    that shape the conditioning -- not Qwen2.5-VL's vision tower, not the Gemma layer after the one Lumina 2 reads --
    ("last": only each encoder's last such layer), every one trained; the stock LoraLoader maps every key, its CLIP
    encodes the concept differently (Apply Erasure's CLIP as it), and the input CLIP is unchanged. T5's in-place
    residual adds stay legal (autograd.inplace_safe knows T5LayerNorm)."""
    nodes_mod, loras = pack
    import nodes as comfy_nodes
    from spare_core.families import TEXT_LAYER

    model, clip = cf.build_tiny(family, seed=1)
    cond_before = cf.encode(clip, "a red cat")[0][0]
    saliency = run(nodes_mod.SaliencyScan, model=model, clip=clip, concept="a red cat", retain="a blue dog",
                   samples=1, seed=0, selection=0.5, top_k=0, targets="attention", resolution=RES,
                   gradient_checkpointing=False)[0]
    text_keys = {}
    for mode in ("on", "last"):
        lora_sd, _, filename = run(
            nodes_mod.SparseLoraDistill, model=model, clip=clip, concepts="a red cat", surrogates="a plain house",
            retain="a blue dog", saliency=saliency, rank=2, alpha=2.0, steps=3, learning_rate=1e-2, samples=1,
            forget_weight=0.3, retain_weight=1.0, seed=0, filename_prefix=f"spare/{family}_te_{mode}",
            key_format="comfyui", text_encoder=mode, gradient_checkpointing=mode == "on", resolution=RES)
        ups = {k[:-len(".lora_up.weight")]: v for k, v in lora_sd.items()
               if k.startswith("text_encoders.") and k.endswith(".lora_up.weight")}
        assert ups and all(float(v.abs().max()) > 0 for v in ups.values()), (family, mode)  # every one trained
        assert not [k for k in ups if ".visual." in k]
        text_keys[mode] = set(ups)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stock_model, stock_clip = comfy_nodes.LoraLoader().load_lora(model, clip, filename, 1.0, 1.0)
        assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
        erased = cf.encode(stock_clip, "a red cat")[0][0]
        assert not torch.allclose(erased, cond_before, atol=1e-6), (family, mode)
        applied_clip = run(nodes_mod.ApplyErasure, model=model, strength=1.0, lora_name=filename, clip=clip)[1]
        assert torch.allclose(cf.encode(applied_clip, "a red cat")[0][0], erased, atol=1e-5)

    def stack_layer(key):
        m = TEXT_LAYER.search(key)
        return key[:m.start()], int(m.group(0).rstrip(".").rsplit(".", 1)[1])
    last = {}
    for key in text_keys["on"]:
        stack, i = stack_layer(key)
        last[stack] = max(i, last.get(stack, i))
    assert text_keys["last"] == {k for k in text_keys["on"] if stack_layer(k)[1] == last[stack_layer(k)[0]]}
    assert {stack_layer(k)[0] for k in text_keys["last"]} == set(last)  # every encoder keeps its last layer
    if family == "lumina2":  # Lumina 2 reads the penultimate of the tiny Gemma's 3 layers
        assert set(last.values()) == {1}
    assert torch.equal(cf.encode(clip, "a red cat")[0][0], cond_before)  # the input CLIP is untouched
    # kohya names CLIP encoders only: refused before anything trains, the input named
    with pytest.raises(nodes_mod.SpareInputError, match="key_format='kohya'.*text_encoder to 'off'"):
        run(nodes_mod.SparseLoraDistill, model=model, clip=clip, concepts="a red cat", surrogates="a plain house",
            retain="a blue dog", saliency=saliency, rank=2, alpha=2.0, steps=3, learning_rate=1e-2, samples=1,
            forget_weight=0.3, retain_weight=1.0, seed=0, filename_prefix="spare/never", key_format="kohya",
            text_encoder="last", gradient_checkpointing=False, resolution=RES)


def test_text_encoder_last_trains_beside_an_fp8_t5(host):
    """Most Flux users load t5xxl_fp8_e4m3fn: its weights stay fp8 (ComfyUI's manual cast computes in a wider dtype)
    and text_encoder "last" trains T5's last block and CLIP-L's last layer beside it; the CLIP's weights unchanged."""
    import comfy.sd
    import comfy.text_encoders.flux as flux_te
    import spare_core as sc

    model = cf.build_tiny_dit_model("flux", seed=1)
    target = cf._dit_model_config("flux", cf.TINY_DIT["flux"]).clip_target({})
    target.clip = flux_te.flux_clip(dtype_t5=torch.float8_e4m3fn)
    clip = comfy.sd.CLIP(target, model_options=cf._dit_te_options("flux"))
    clip.cond_stage_model.load_state_dict(cf.build_tiny_dit_clip("flux", seed=1).cond_stage_model.state_dict())
    t5 = clip.cond_stage_model.t5xxl.transformer.encoder
    assert t5.block[1].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    dm = host.ComfyDiffusionModel(model, clip, RES, RES)
    net = [n for n, m in dm.network.named_modules() if isinstance(m, torch.nn.Linear)][:2]
    cfg = sc.DistillConfig(["a red cat"], ["a blue dog"], retain=["a house"], samples=1, sample_steps=2, steps=3,
                           seed=0, text_encoder="last", gradient_checkpointing=False, learning_rate=1e-2)
    dm.encode(cfg.concepts + cfg.surrogates + cfg.retain + [""])
    with host.trainable(dm, text=True):
        lora = sc.distill(dm, cfg, sc.Saliency({p: 1.0 for p in net}, net, {})).lora
    text = {p: m for p, m in lora.modules.items() if p.startswith("text_encoders.")}
    assert {p.split(".")[1] for p in text} == {"clip_l", "t5xxl"}
    assert all(".block.1." in p for p in text if ".t5xxl." in p)
    assert all(float(m["up"].abs().max()) > 0 for m in text.values())
    assert all(torch.equal(before[k].float(), v.float()) for k, v in clip.cond_stage_model.state_dict().items())


def test_text_encoder_gradients_through_t5_are_exact(host):
    """The text side's gradients through ComfyUI's T5, which adds residuals in place after its norms read them: with
    the norms reading copies (autograd.inplace_safe, as distill's training_mode sets up) the LoRA gradient equals a
    central finite difference along a random direction (T5 computes in fp32 whatever its weights: 1% tolerance, far
    below what a gradient through a modified tensor would be off by); without them backward raises."""
    from spare_core.adapters import attach
    from spare_core.autograd import frozen, inplace_safe
    from spare_core.families import text_candidates

    model, clip = cf.build_tiny("flux", seed=2)
    dm = host.ComfyDiffusionModel(model, clip, RES, RES)
    te = dm.text_encoder
    paths = [p for p in text_candidates(te) if p.startswith("t5xxl.")][::3]  # in both of the tiny T5's blocks
    assert {".block.0." in p for p in paths} == {True, False}
    g = torch.Generator().manual_seed(0)
    adapters = attach(te, paths, 2, 2.0)
    with torch.no_grad():
        for a in adapters.adapters.values():  # a nonzero up: every adapter's down gets a gradient too
            a.up.weight.normal_(0, 0.1, generator=g)
    params = adapters.parameters()

    def loss():
        weights = torch.Generator().manual_seed(1)
        outs = [t for t in dm.encode_text(["a red cat"]).values() if torch.is_tensor(t) and t.is_floating_point()]
        return sum((t.double() * torch.randn(t.shape, generator=weights, dtype=torch.float64)).sum() for t in outs)

    with adapters, frozen(te), torch.enable_grad():
        with inplace_safe(te):
            grads = torch.autograd.grad(loss(), params)
        with pytest.raises(RuntimeError, match="inplace operation"):
            torch.autograd.grad(loss(), params)
        direction = [torch.randn(p.shape, generator=g) for p in params]
        # h measured: the difference converges to the gradient as h shrinks (1e-2 is 5% off: curvature)
        numeric = _central_difference(loss, params, direction, 1e-3)
    analytic = float(sum((gr.double() * d.double()).sum() for gr, d in zip(grads, direction)))
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (analytic, numeric)
