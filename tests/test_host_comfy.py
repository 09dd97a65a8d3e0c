"""nodes/host.py against a real ComfyUI (tiny SD1.5 / SD2.x-v / SDXL built by tests/comfy_fixtures.py).

Skipped, with the reason printed, when COMFYUI_PATH is unset (see scripts/setup_comfyui.sh). Run:
    COMFYUI_PATH=/work/comfyui .venv-comfy/bin/python -m pytest tests/test_host_comfy.py
"""
from __future__ import annotations

import logging

import pytest
import torch

import comfy_fixtures as cf

FAMILIES = cf.FAMILIES
WIDTH = HEIGHT = 64  # pixels -> 8x8 latents
PROMPTS = ["a photo of a cat", "a watercolor of a dog", "an empty room"]


@pytest.fixture(scope="module", autouse=True)
def comfy():
    """ComfyUI on sys.path in CPU mode (or skip); one torch thread for the module (tiny models gain nothing from
    threads, and two OpenMP threads on a 2-core machine shared with another process run ~100x slower)."""
    cf.comfy_or_skip()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    # Drop the models while ComfyUI's modules are alive (else ModelPatcher.__del__ prints errors at exit).
    import gc
    import comfy.model_management
    _cache.clear()
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture(scope="module")
def host():
    return cf.load_pack_module("nodes/host.py")


_cache: dict = {}


def tiny(family):
    """Module-wide cache of (model, clip) per family, for the tests that do not change them."""
    if family not in _cache:
        _cache[family] = cf.build_tiny(family, seed=0)
    return _cache[family]


# --- the fixtures themselves ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_samples(family):
    """A KSampler run (nodes.common_ksampler, cfg 5, 2 euler steps) gives finite latents; the model conds are what
    the family needs (SDXL: y), and sd2v is a v-prediction model."""
    import comfy.model_sampling

    model, clip = tiny(family)
    out = cf.sample(model, clip, steps=2, size=WIDTH)
    assert out.shape == (1, 4, HEIGHT // 8, WIDTH // 8)
    assert torch.isfinite(out).all()

    conds = cf.model_conds(model, cf.encode(clip, PROMPTS[0]), torch.zeros(1, 4, 8, 8))
    expected = {"c_crossattn", "y"} if family == "sdxl" else {"c_crossattn"}
    assert set(conds) == expected
    is_v = isinstance(model.model.model_sampling, comfy.model_sampling.V_PREDICTION)
    assert is_v == (family == "sd2v")


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_lora_keys(family):
    """The full-size UNet (meta device) maps both LoRA key forms of every Linear/Conv layer to its weight."""
    import comfy.lora

    base = cf.build_full_base_model(family)
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    paths = cf.build_full_unet_keys(family)
    assert len(paths) > 200
    for path in paths:
        weight = f"diffusion_model.{path}.weight"
        assert key_map[f"diffusion_model.{path}"] == weight
        assert key_map["lora_unet_" + path.replace(".", "_")] == weight


def test_lora_loader_reports_unknown_keys(caplog):
    """What LoraLoaderModelOnly does (comfy.sd.load_lora_for_models): known keys are patched, an unknown one is only
    logged ("lora key not loaded: ..."), and the input MODEL is untouched after its own reload."""
    import comfy.model_management
    import comfy.sd

    model, _ = cf.build_tiny("sd15", seed=3)
    path = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    g = torch.Generator().manual_seed(0)
    lora = {f"diffusion_model.{path}.lora_up.weight": torch.randn(32, 4, generator=g),
            f"diffusion_model.{path}.lora_down.weight": torch.randn(4, 32, generator=g),
            f"diffusion_model.{path}.alpha": torch.tensor(4.0),
            "diffusion_model.no.such.layer.lora_up.weight": torch.zeros(1, 1)}
    weight = dict(model.model.diffusion_model.named_parameters())[f"{path}.weight"]
    before = weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    missing = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert missing == ["lora key not loaded: diffusion_model.no.such.layer.lora_up.weight"]
    comfy.model_management.load_models_gpu([patched])
    now = dict(model.model.diffusion_model.named_parameters())[f"{path}.weight"]
    assert not torch.equal(now, before)  # the shared module carries the clone's patch while it is loaded
    comfy.model_management.load_models_gpu([model])
    now = dict(model.model.diffusion_model.named_parameters())[f"{path}.weight"]
    assert torch.equal(now, before)


# --- ComfyDiffusionModel ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_predict_x0_matches_apply_model(host, family):
    """predict_x0 on a batch of prompts == BaseModel.apply_model called per prompt with the kwargs that the samplers'
    encode_model_conds path builds (independent code in comfy_fixtures.model_conds)."""
    model, clip = tiny(family)
    dm = host.ComfyDiffusionModel(model, clip, width=WIDTH, height=HEIGHT)
    dm.load()
    assert dm.latent_shape == (4, HEIGHT // 8, WIDTH // 8)
    assert dm.network is model.model.diffusion_model and dm.key_prefix == "diffusion_model."

    cond = dm.encode(PROMPTS)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((len(PROMPTS),) + dm.latent_shape, generator=g)
    sigma = dm.sigma_at(torch.tensor([0.9, 0.5, 0.1]))
    x = dm.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    with torch.no_grad():
        got = dm.predict_x0(x, sigma, cond)
        for i, prompt in enumerate(PROMPTS):
            kwargs = {k: v.cond for k, v in cf.model_conds(model, cf.encode(clip, prompt), x[i:i + 1]).items()}
            want = model.model.apply_model(x[i:i + 1], sigma[i:i + 1], **kwargs)
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-4, atol=1e-4)

        # Sub-batches and broadcast of one cond row.
        idx = torch.tensor([2, 0])
        sub = dm.predict_x0(x[idx], sigma[idx], dm.select_cond(cond, idx))
        torch.testing.assert_close(sub, got[idx], rtol=1e-4, atol=1e-4)
        one = dm.predict_x0(x[:2], sigma[:1], dm.select_cond(cond, torch.tensor([0])))
        assert one.shape == x[:2].shape

        if family == "sdxl":  # the y vector is required: skipping extra_conds breaks SDXL
            assert cond["y"].shape == (len(PROMPTS), cf.TE_WIDTH + 6 * 256)
            with pytest.raises(AssertionError, match="must specify y"):
                model.model.apply_model(x, sigma, c_crossattn=cond["c_crossattn"])


def test_predict_x0_honours_the_clones_model_wrappers(host):
    """Other nodes' model patches act during training as during sampling: a model_function_wrapper (e.g. from a CFG
    or FreeU-style node) and an APPLY_MODEL wrapper registered on the patcher both run, on this clone only."""
    import comfy.patcher_extension as pe

    model, clip = tiny("sd15")
    calls = []

    def function_wrapper(apply_model, args):
        calls.append(("function", tuple(args["c"])))
        return 0.5 * apply_model(args["input"], args["timestep"], **args["c"])

    def apply_wrapper(executor, *args, **kwargs):
        calls.append(("apply", None))
        return executor(*args, **kwargs)
    wrapped = model.clone()
    wrapped.set_model_unet_function_wrapper(function_wrapper)
    wrapped.add_wrapper(pe.WrappersMP.APPLY_MODEL, apply_wrapper)
    plain_dm = host.ComfyDiffusionModel(model, clip, WIDTH, HEIGHT)
    dm = host.ComfyDiffusionModel(wrapped, clip, WIDTH, HEIGHT)
    dm.load()
    x = torch.randn((1,) + dm.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = dm.sigma_at(torch.tensor([0.5]))
    with torch.no_grad():
        plain = plain_dm.predict_x0(x, sigma, plain_dm.encode([PROMPTS[0]]))
        assert not calls
        got = dm.predict_x0(x, sigma, dm.encode([PROMPTS[0]]))
    assert [c[0] for c in calls] == ["function", "apply"]
    assert "c_crossattn" in calls[0][1] and "transformer_options" in calls[0][1]
    torch.testing.assert_close(got, 0.5 * plain, rtol=1e-5, atol=1e-6)
    assert not model.wrappers and "model_function_wrapper" not in model.model_options  # the input is untouched


@pytest.mark.parametrize("family", ["sd15", "sd2v"])
def test_sigma_and_noise(host, family):
    model, clip = tiny(family)
    dm = host.ComfyDiffusionModel(model, clip, width=WIDTH, height=HEIGHT)
    ms = model.get_model_object("model_sampling")
    s = dm.sigma_at(torch.tensor([0.0, 1e-4, 0.25, 0.5, 0.75, 1.0 - 1e-4, 1.0]))
    assert s[0] == pytest.approx(float(ms.sigma_min)) and s[-1] == pytest.approx(float(ms.sigma_max))
    assert torch.all(s[1:] >= s[:-1]) and torch.isfinite(s).all()
    assert s[2].item() == pytest.approx(ms.percent_to_sigma(0.75))
    x0, eps, sig = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(dm.add_noise(x0, eps, sig), x0 + sig.view(-1, 1, 1, 1) * eps)


def test_long_prompts_batch(host):
    """A prompt over 75 tokens gives a 154-token cond; batching repeats the others to the same length."""
    model, clip = tiny("sd15")
    dm = host.ComfyDiffusionModel(model, clip, width=WIDTH, height=HEIGHT)
    long = " ".join(["cat"] * 100)
    cond = dm.encode(["a dog", long])
    assert cond["c_crossattn"].shape[:2] == (2, 154)
    with torch.no_grad():
        got = dm.predict_x0(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 1.0]), cond)
    assert torch.isfinite(got).all()


# --- training inside the executor's inference mode -------------------------------------------------------------------

def _attn_modules(network):
    return [m for name, m in network.named_modules() if name.endswith(("attn1", "attn2"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_under_inference_mode(host, family):
    """As in a node: everything (model, conds, data) is made under torch.inference_mode(). Inside `trainable`,
    gradients reach a parameter added to every attention output by forward hooks; afterwards the MODEL's parameter
    objects, values, flags and outputs are exactly as before."""
    with torch.inference_mode():  # the executor; CheckpointLoader also runs under it, so weights are inference tensors
        model, clip = cf.build_tiny(family, seed=5)
        dm = host.ComfyDiffusionModel(model, clip, width=WIDTH, height=HEIGHT)
        dm.load()
        cond = dm.encode(PROMPTS[:2])
        g = torch.Generator().manual_seed(2)
        x0 = torch.randn((2,) + dm.latent_shape, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = dm.sigma_at(torch.tensor([0.7, 0.3]))
        x = dm.add_noise(x0, eps, sigma)
        ref = dm.predict_x0(x, sigma, cond)

        params = dict(model.model.named_parameters())
        assert all(p.is_inference() for p in params.values())
        snapshot = {k: (p, p.clone(), p.requires_grad) for k, p in params.items()}

        # The trap this guards against: a naive backward outside inference mode fails.
        with torch.inference_mode(False):
            delta = torch.zeros(1, requires_grad=True)
            with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                (dm.predict_x0(x, sigma, cond) * delta).sum().backward()

        with host.trainable(dm):
            assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
            # Frozen weights are aliased, not copied.
            for k, p in model.model.named_parameters():
                assert not p.is_inference() and not p.requires_grad
                assert p.data_ptr() == snapshot[k][0].data_ptr()
            attn = _attn_modules(dm.network)
            assert attn
            deltas = [torch.nn.Parameter(torch.zeros(m.to_out[0].weight.shape[0])) for m in attn]
            handles = [m.register_forward_hook(lambda mod, args, out, d=d: out + d) for m, d in zip(attn, deltas)]
            try:
                # predict_x0 copies its inference-tensor inputs; tensors the caller feeds to the loss are its own
                # business: the target made under inference mode must be copied too (mse_loss saves it).
                loss = torch.nn.functional.mse_loss(dm.predict_x0(x, sigma, cond), x0.clone())
                loss.backward()
            finally:
                for h in handles:
                    h.remove()
            assert all(d.grad is not None and torch.isfinite(d.grad).all() for d in deltas)
            assert any(d.grad.abs().sum() > 0 for d in deltas)

        assert torch.is_inference_mode_enabled()
        after = dict(model.model.named_parameters())
        assert after.keys() == snapshot.keys()
        for k, (p, value, flag) in snapshot.items():
            assert after[k] is p and p.requires_grad == flag and torch.equal(p, value) and p.grad is None
        assert torch.equal(dm.predict_x0(x, sigma, cond), ref)


def test_trainable_on_lora_patched_clone(host):
    """The MODEL input is often a LoraLoader output: a clone whose patches are written into the shared module when
    it is loaded. `trainable` trains on the patched weights, restores the patched objects, and the unpatched base
    model is still exact afterwards."""
    import comfy.model_management
    import comfy.sd

    with torch.inference_mode():
        base, clip = cf.build_tiny("sd15", seed=7)
        path = "input_blocks.1.1.transformer_blocks.0.attn2.to_v"
        g = torch.Generator().manual_seed(0)
        lora = {f"diffusion_model.{path}.lora_up.weight": torch.randn(32, 4, generator=g),
                f"diffusion_model.{path}.lora_down.weight": torch.randn(4, 32, generator=g)}
        patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
        x, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([2.0])

        def out(mp):
            dm = host.ComfyDiffusionModel(mp, clip, width=WIDTH, height=HEIGHT)
            dm.load()
            return dm, dm.predict_x0(x, sigma, dm.encode(["a cat"]))

        _, base_ref = out(base)
        dm, patched_ref = out(patched)
        assert not torch.equal(base_ref, patched_ref)
        objects = dict(base.model.named_parameters())

        with host.trainable(dm):
            cond = dm.encode(["a cat"])
            block = dm.network.input_blocks[1][1].transformer_blocks[0].attn2
            d = torch.nn.Parameter(torch.zeros(block.to_out[0].weight.shape[0]))
            h = block.register_forward_hook(lambda mod, args, o: o + d)
            try:
                pred = dm.predict_x0(x, sigma, cond)
                torch.testing.assert_close(pred, patched_ref)  # trains on the LoRA-patched weights
                pred.square().mean().backward()
            finally:
                h.remove()
            assert d.grad is not None and d.grad.abs().sum() > 0

        assert all(p is objects[k] for k, p in base.model.named_parameters())
        assert torch.equal(out(patched)[1], patched_ref)
        assert torch.equal(out(base)[1], base_ref)  # unpatching restored the base weights exactly


def test_novram_is_refused_with_advice(host, monkeypatch):
    """Under --novram (weights streamed from system RAM per layer) training is refused before anything loads, with
    what to do; on the CPU (tests, CPU users) there is nothing to refuse."""
    import comfy.model_management as mm

    model, _ = tiny("sd15")
    gpu_clone = model.clone()
    gpu_clone.load_device = torch.device("cuda", 0)  # as on a GPU machine; the refusal comes before any CUDA call
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    from spare_core.errors import SpareInputError
    with pytest.raises(SpareInputError, match="--novram"):
        host.load_for_training(gpu_clone)
    host.load_for_training(model)  # CPU device: loads


@pytest.mark.parametrize("family,read", [("sd15", {"clip_l": 2}), ("sd2v", {"clip_h": 1}),
                                         ("sdxl", {"clip_l": 1, "clip_g": 2})])
def test_the_text_encoder_trains_the_layers_the_model_reads(host, family, read):
    """ComfyUI reads SD2.x's CLIP-H and SDXL's CLIP-L at the penultimate layer (SDXL's CLIP-G pools from the last):
    text_encoder "on" trains every layer up to the one read, "last" that one (the tiny CLIPs have 3 layers)."""
    from dataclasses import replace

    import spare_core as sc
    from spare_core.distill import for_model, text_modules
    from spare_core.families import TEXT_LAYER

    model, clip = cf.build_tiny(family, seed=1)
    dm = host.ComfyDiffusionModel(model, clip, 64, 64)
    cfg = for_model(sc.DistillConfig(["a red cat"], ["a blue dog"]), dm)
    assert cfg.text_encoder == "on"

    def layers(paths):
        out = {}
        for p in paths:
            out.setdefault(p.split(".")[0], set()).add(int(TEXT_LAYER.search(p).group(0).strip(".").rsplit(".")[-1]))
        return out
    assert layers(text_modules(dm, cfg)) == {enc: set(range(i + 1)) for enc, i in read.items()}
    assert layers(text_modules(dm, replace(cfg, text_encoder="last"))) == {enc: {i} for enc, i in read.items()}
