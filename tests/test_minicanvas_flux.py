"""MiniCanvas-Flux (spare_core/minicanvas/flux_model.py): ComfyUI's own Flux class, tiny, in pixel space.

Builds a tiny instance (no weight file), checks its state dict is a ComfyUI Flux state dict (keys, and ComfyUI's
model_detection recognises it as "flux"), ComfyUI's flow formulas and schedule, deterministic sampling, a 2-step
training run through train_flux.main and a reload; the shipped weights when present. Needs a ComfyUI checkout in
COMFYUI_PATH (skipped with the reason printed otherwise).
"""
import json
from dataclasses import replace

import pytest
import torch

import comfy_fixtures as cf

TINY = dict(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, mlp_ratio=2.0, axes_dim=(8, 12, 12),
            text_dim=32, text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def fm():
    cf.comfy_or_skip()
    from spare_core.minicanvas import flux_model
    return flux_model


@pytest.fixture(scope="module")
def tiny(fm):
    """A tiny MiniCanvas-Flux with non-zero output layers (build_flux zero-initialises the modulations and the final
    layer, under which the prompt, the noise and any LoRA would not matter), whatever the tests' order."""
    torch.manual_seed(0)
    model = fm.MiniCanvasFlux(fm.FluxMiniConfig(**TINY))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_is_comfyui_flux(fm, tiny):
    import comfy.ldm.flux.model
    import comfy.model_detection

    assert type(tiny.network) is comfy.ldm.flux.model.Flux
    sd = tiny.state_dict()
    for key in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.proj.weight",
                "double_blocks.0.img_mod.lin.weight", "double_blocks.0.img_attn.norm.key_norm.scale",
                "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight", "single_blocks.0.modulation.lin.weight",
                "img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert fm.KEY_PREFIX + key in sd, key
    assert not any(k.startswith(fm.KEY_PREFIX + "guidance_in") for k in sd)
    cfg = comfy.model_detection.detect_unet_config(sd, fm.KEY_PREFIX)
    assert cfg["image_model"] == "flux" and cfg["in_channels"] == 12 and cfg["vec_in_dim"] == TINY["text_dim"]
    assert (cfg["depth"], cfg["depth_single_blocks"], cfg["guidance_embed"]) == (1, 1, False)
    assert tiny.latent_shape == (12, 16, 16)


def test_flow_formulas_and_schedule(fm, tiny):
    import comfy.model_sampling
    import comfy.samplers

    ms = comfy.model_sampling.ModelSamplingFlux()
    ms.set_parameters(shift=tiny.cfg.shift)
    assert torch.allclose(fm.flow_sigmas(12, tiny.cfg.shift), comfy.samplers.simple_scheduler(ms, 12), atol=1e-6)
    x0, eps, s = torch.randn(2, 12, 16, 16), torch.randn(2, 12, 16, 16), torch.tensor([0.3, 0.9])
    x_t = tiny.add_noise(x0, eps, s)
    const = comfy.model_sampling.CONST()
    assert torch.allclose(x_t, const.noise_scaling(s, eps, x0))
    # with the exact v, denoised recovers x0 (CONST.calculate_denoised)
    assert torch.allclose(const.calculate_denoised(s, tiny.v_target(x0, eps), x_t), x0, atol=1e-5)
    with torch.no_grad():
        v = tiny.predict_v(x_t, s, tiny.encode(["A star image in ukiyo style.", ""]))
        assert torch.allclose(tiny.predict_x0(x_t, s, tiny.encode(["A star image in ukiyo style.", ""])),
                              x_t - s.view(-1, 1, 1, 1) * v)


def test_sampling_is_deterministic(fm, tiny):
    prompts = ["A star image in ukiyo style.", "ring, neon style"]
    for sampler in ("euler", "dpmpp_2m"):
        a = tiny.sample(prompts, seed=3, steps=3, cfg=3.0, sampler=sampler)
        b = tiny.sample(prompts, seed=3, steps=3, cfg=3.0, sampler=sampler)
        assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, b)
        one = tiny.sample(prompts[1:], seed=[4], steps=3, cfg=3.0, sampler=sampler)
        assert torch.allclose(a[1:], one, atol=1e-5)   # image i uses seed + i, whatever the batch
        assert not torch.allclose(a, tiny.sample(prompts, seed=5, steps=3, cfg=3.0, sampler=sampler))


def test_two_step_training_run(fm, tmp_path):
    from bench.minicanvas import train_flux

    out = tmp_path / "f.safetensors"
    train_flux.main(["--steps", "2", "--variants", "1", "--batch", "4", "--hidden", "64", "--heads", "2",
                     "--depth", "1", "--single", "1", "--mlp-ratio", "2", "--out", str(out), "--grid", ""])
    model = fm.load(out)
    assert type(model.network).__name__ == "Flux" and model.cfg.hidden_size == 64
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["flux_params"]["in_channels"] == 12 and meta["training"]["steps_done"] == "2"
    img = model.sample(["A star image in ukiyo style."], seed=0, steps=2)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_shipped_weights(fm):
    if not fm.MODEL_FILE.exists():
        pytest.skip("no shipped MiniCanvas-Flux weights")
    model = fm.load()
    assert fm.CONFIG_FILE.exists()
    assert fm.MODEL_FILE.stat().st_size < 20e6
    a = model.sample(["A star image in ukiyo style."], seed=0, steps=4)
    assert torch.equal(a, model.sample(["A star image in ukiyo style."], seed=0, steps=4))


def test_spare_erases_through_spare_core(fm, tiny):
    """MiniCanvas-Flux is a spare_core DiffusionModel (what `python -m bench.minicanvas --model flux` erases through):
    the whole pipeline runs on it with its own family (Flux's modules, sampled with CFG), leaves the network as it
    was, and its LoRA holds Flux module keys that change the prediction."""
    import spare_core as sc

    assert isinstance(tiny, sc.DiffusionModel)
    family = sc.families.family_of(tiny)
    assert family.name == "flux" and not family.guidance_distilled and family.inplace_residuals
    sigmas = tiny.sigma_at(torch.linspace(0, 1, 5))
    assert torch.all(sigmas[1:] > sigmas[:-1]) and sigmas[-1] == pytest.approx(1.0)
    before = {k: v.clone() for k, v in tiny.network.state_dict().items()}
    cfg = sc.DistillConfig(["A star image in ukiyo style."], ["A star image in plain style."],
                           retain=["A star image in neon style."], steps=3, learning_rate=1e-2, samples=1,
                           sample_steps=2, gradient_checkpointing=False)
    out = sc.erase(tiny, cfg, sc.ScanConfig(samples=1, sample_steps=2), sc.ProfileConfig(bins=3, samples=1))
    assert all(torch.equal(before[k], v) for k, v in tiny.network.state_dict().items())
    keys = list(out.result.lora.state_dict("comfyui", tiny.key_prefix))
    assert keys and all(k.startswith("diffusion_model.double_blocks.") or k.startswith("diffusion_model.single_blocks.")
                        for k in keys)
    xt = torch.randn(1, *tiny.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = tiny.encode(cfg.concepts)
    s = torch.tensor([0.5])
    with torch.no_grad():
        plain = tiny.predict_x0(xt, s, cond)
        with sc.apply_lora(tiny.network, out.result.lora, 1.0):
            erased = tiny.predict_x0(xt, s, cond)
    assert not torch.allclose(plain, erased)


def test_pseudo_words_on_the_flux_miniature(fm, tiny):
    """MiniCanvas-Flux reads pseudo words (DistillConfig.pseudo_rows) as the UNet does: a word of `pseudo_words` is
    read as its embedding in both text codes (per-token context and pooled vector), an explicit `pseudo_rows` builds
    its banks and trains, and nothing stays after. Auto stays 0 on the DiT family (measured in bench/RESULTS.md)."""
    import spare_core as sc
    from spare_core.distill import for_model

    c, s = "A star image in ukiyo style.", "A star image in plain style."
    with torch.no_grad():
        plain = tiny.encode([c])
        tiny.pseudo_words["zzq"] = tiny.word_embedding("ukiyo").clone()
        try:
            same = tiny.encode([c.replace("ukiyo", "zzq")])
            tiny.pseudo_words["zzq"] = tiny.pseudo_word("ukiyo", 2.0, torch.Generator().manual_seed(0))
            moved = tiny.encode([c.replace("ukiyo", "zzq")])
            distance = (tiny.pseudo_words["zzq"] - tiny.word_embedding("ukiyo")).norm()
        finally:
            tiny.pseudo_words.clear()
    for a, b in zip(same, plain):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(moved, plain):
        assert not torch.allclose(a, b, atol=1e-3)
    assert torch.isclose(distance, torch.tensor(2.0 * tiny.embedding_scale("ukiyo")), rtol=1e-4)
    cfg = sc.DistillConfig([c], [s], retain=["A star image in neon style."], steps=2, learning_rate=1e-2,
                           samples=1, sample_steps=2, gradient_checkpointing=False)
    assert (for_model(cfg, tiny).pseudo_rows, for_model(cfg, tiny).pseudo_forget_rows) == (0, 0)
    before = {k: v.clone() for k, v in tiny.network.state_dict().items()}
    out = sc.erase(tiny, replace(cfg, pseudo_rows=1, pseudo_keep=0.0), sc.ScanConfig(samples=1, sample_steps=2),
                   sc.ProfileConfig(bins=3, samples=1))
    assert len(out.result.losses) == 2 and tiny.pseudo_words == {}
    assert all(torch.equal(before[k], v) for k, v in tiny.network.state_dict().items())


def test_guidance_distilled_variant(fm, tmp_path):
    """MiniCanvas-Flux-dev (train_flux_dev.py): the network has Flux-dev's guidance_in (ComfyUI detects
    guidance_embed), its family is Flux-dev's (guidance-distilled: SPARE samples it at cfg 1), the guidance is an
    input (other values, other predictions), sampling ignores cfg, and the distillation's student starts as the
    teacher's conditional prediction at every guidance; two steps of train_flux_dev.main and a reload keep all that."""
    import comfy.model_detection
    import spare_core as sc
    from bench.minicanvas import train_flux, train_flux_dev

    teacher_file = tmp_path / "teacher.safetensors"
    train_flux.main(["--steps", "1", "--variants", "1", "--batch", "2", "--hidden", "64", "--heads", "2",
                     "--depth", "1", "--single", "1", "--mlp-ratio", "2", "--out", str(teacher_file), "--grid", ""])
    teacher = fm.load(teacher_file)
    torch.manual_seed(2)
    with torch.no_grad():  # adaLN-Zero layers drawn at random, so text and guidance reach the output
        for p in teacher.network.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    teacher.save(teacher_file, dtype=torch.float32)
    student = train_flux_dev.make_student(teacher)
    x, s = torch.randn(2, *teacher.latent_shape), torch.tensor([0.4, 0.8])
    cond = teacher.encode(["A star image in ukiyo style.", "ring, neon style"])
    with torch.no_grad():
        for g in (1.0, 3.5, 6.0):
            student.guidance = g
            assert torch.allclose(student.predict_v(x, s, cond), teacher.predict_v(x, s, cond), atol=1e-5)

    out = tmp_path / "dev.safetensors"
    train_flux_dev.main(["--steps", "2", "--variants", "1", "--batch", "2", "--teacher", str(teacher_file),
                         "--out", str(out)])
    dev = fm.load(out)
    sd = dev.state_dict()
    assert any(k.startswith(fm.KEY_PREFIX + "guidance_in.") for k in sd)
    assert comfy.model_detection.detect_unet_config(sd, fm.KEY_PREFIX)["guidance_embed"] is True
    family = sc.families.family_of(dev)
    assert family.guidance_distilled and family.name == "flux" and family.architecture.startswith("flux-1-minicanvas-dev")
    assert not sc.families.family_of(teacher).guidance_distilled
    with torch.no_grad():
        for p in dev.network.guidance_in.parameters():  # two steps moved them little: make the input matter
            p.normal_(0.0, 0.5)
        dev.guidance = 1.5
        a = dev.predict_v(x, s, cond)
        dev.guidance = 5.0
        assert not torch.allclose(a, dev.predict_v(x, s, cond))
    prompts = ["A star image in ukiyo style."]
    assert torch.equal(dev.sample(prompts, seed=0, steps=2, cfg=1.0), dev.sample(prompts, seed=0, steps=2, cfg=4.0))
    assert json.loads(out.with_suffix(".json").read_text())["flux_params"]["guidance_embed"] is True


def test_harness_takes_the_dev_model_and_its_guidance():
    """--model flux-dev runs the Flux methods; --eval-guidance is refused, by name, on a model sampled with CFG."""
    from bench.minicanvas import cli
    from bench.minicanvas.budgets import METHODS
    from bench.minicanvas.dispatch import check_model_methods

    check_model_methods(list(METHODS), "flux-dev")
    with pytest.raises(SystemExit):
        cli.main(["--model", "flux", "--eval-guidance", "2.0"])
    with pytest.raises(SystemExit):
        cli.main(["--model", "flux-dev", "--host", "comfyui"])


def test_harness_takes_every_method_on_flux():
    """`--model flux` runs every baseline in its Flux form; eraseanything (Flux only) is refused on the UNet, by
    name, before anything loads."""
    from bench.minicanvas import cli
    from bench.minicanvas.budgets import FLUX_ONLY_METHODS, METHODS
    from bench.minicanvas.dispatch import check_model_methods

    check_model_methods(list(METHODS), "flux")
    check_model_methods([m for m in METHODS if m not in FLUX_ONLY_METHODS], "unet")
    with pytest.raises(ValueError, match=r"\['eraseanything'\].*--model flux"):
        check_model_methods(["spare", "eraseanything"], "unet")
    with pytest.raises(SystemExit):
        cli.main(["--methods", "spare,eraseanything"])


def _changed(edited, before):
    return {n: p for n, p in edited.network.named_parameters() if not torch.equal(p, before[n])}


@pytest.fixture(scope="module")
def live(fm):
    """A tiny MiniCanvas-Flux whose adaLN-Zero layers (zero at init: every block the identity, the output 0) are
    drawn at random, so that text reaches the prediction and gradients reach every block, as in a trained model."""
    torch.manual_seed(1)
    model = fm.MiniCanvasFlux(fm.FluxMiniConfig(**TINY))
    with torch.no_grad():
        for p in model.network.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model


def test_baselines_in_their_flux_forms(live):
    """Each baseline edits a copy of MiniCanvas-Flux in the modules of its published Flux form (baselines.py), and
    only there: UCE txt_in (uce-pool also vector_in's first layer), ESD-x the double blocks' attention, CA the text
    stream's key and value rows of the fused qkv, EraseAnything a LoRA on the text stream's query and key rows only
    (merged), SalUn a masked subset of everything."""
    from bench.minicanvas import baselines

    concept, surrogate, keep = ["A star image in ukiyo style."], ["A star image in plain style."], \
        ["A ring image in neon style."]
    before = {n: p.clone() for n, p in live.network.named_parameters()}
    h = live.network.hidden_size

    for pool in (False, True):
        out = baselines.uce(live, concept, surrogate, keep, include_pool=pool)
        changed = set(_changed(out.model, before))
        assert changed == {"txt_in.weight"} | ({"vector_in.in_layer.weight"} if pool else set())
        ctx_c, ctx_s = live.encode(concept)[0], live.encode(surrogate)[0]
        with torch.no_grad():  # the closed form maps the concept's tokens near the surrogate's
            after = (out.model.network.txt_in(ctx_c) - live.network.txt_in(ctx_s)).norm()
            assert after < 0.5 * (live.network.txt_in(ctx_c) - live.network.txt_in(ctx_s)).norm()

    esd = baselines.esd(live, concept, variant="x", steps=2, lr=1e-3, ddim_steps=3)
    changed = _changed(esd.model, before)
    assert changed and all(n.split(".")[0] == "double_blocks" and n.split(".")[2] in ("img_attn", "txt_attn")
                           for n in changed)

    ca = baselines.concept_ablation(live, concept, surrogate, steps=2, lr=1e-3, samples=1, batch_size=2)
    changed = _changed(ca.model, before)
    assert changed and all(n.startswith("double_blocks.") and ".txt_attn.qkv." in n for n in changed)
    for n, p in changed.items():  # the query rows stay; key and value rows move
        assert torch.equal(p[:h], before[n][:h]) and not torch.equal(p[h:], before[n][h:])
    assert ca.trainable_params == sum(p[h:].numel() for p in changed.values())

    ea = baselines.erase_anything(live, concept, steps=3, lr=1e-2, ddim_steps=3)
    changed = _changed(ea.model, before)
    assert changed and all(n.startswith("double_blocks.") and n.endswith("txt_attn.qkv.weight") for n in changed)
    for n, p in changed.items():  # a low-rank change of the query and key rows, the value rows untouched
        assert torch.equal(p[2 * h:], before[n][2 * h:])
        assert torch.linalg.matrix_rank((p - before[n]).double(), atol=1e-6) <= 8  # float32 rounding aside
    assert not any(parametrized for parametrized in (hasattr(m, "parametrizations")
                                                     for m in ea.model.network.modules()))
    assert ea.trainable_params == len(changed) * 8 * (live.network.txt_in.out_features + 2 * h)

    salun = baselines.salun(live, concept, surrogate, keep, steps=2, lr=1e-3, samples=1, batch_size=2)
    assert 0 < salun.trainable_params < sum(p.numel() for p in live.network.parameters())

    for n, p in live.network.named_parameters():  # every baseline edited a copy
        assert torch.equal(p, before[n])


def test_text_encoder_trains_on_the_flux_miniature(live):
    """An experiment's setting, not a default: DistillConfig.text_encoder "on" trains MiniCanvas-Flux's text encoder
    beside the scan's blocks (auto stays off on the DiTs), through `encode_text`; its keys carry the demo CLIP's
    prefix, the model is left as it was, and the text encoder's adapters change the tokens and the pooled vector."""
    import spare_core as sc
    from spare_core.distill import for_model
    from spare_core.families import text_candidates
    from spare_core.model import lora_targets

    concept, surrogate = ["A star image in ukiyo style."], ["A star image in plain style."]
    cfg = sc.DistillConfig(concept, surrogate, retain=["A star image in neon style."], steps=3, learning_rate=1e-2,
                           samples=1, sample_steps=2, gradient_checkpointing=False)
    assert for_model(cfg, live).text_encoder == "off"
    before = {k: v.clone() for k, v in live.text_encoder.state_dict().items()}
    out = sc.erase(live, replace(cfg, text_encoder="on"), sc.ScanConfig(samples=1, sample_steps=2),
                   sc.ProfileConfig(bins=3, samples=1))
    text = [p for p in out.result.lora.modules if p.startswith("text_encoders.")]
    assert text == [live.text_key_prefix + p for p in text_candidates(live.text_encoder)]
    assert all(torch.equal(before[k], v) for k, v in live.text_encoder.state_dict().items())
    with torch.no_grad():
        ctx, pooled = live.encode(concept)
        with sc.apply_lora(lora_targets(live), out.result.lora, 1.0):
            ctx2, pooled2 = live.encode_text(concept)
    assert not torch.allclose(ctx, ctx2) and not torch.allclose(pooled, pooled2)
