"""spare_core on a tiny SD-like denoiser with random weights (tests/tiny_denoiser.py): all three stages, export,
and every bad input of issue 2. Each test asserts something that fails if the stage is broken."""
import json
import os
import sys
from dataclasses import asdict, replace

import pytest
import torch
from safetensors import safe_open

import spare_core as sc
from spare_core import lora as lora_mod
from spare_core.adapters import attach
from spare_core.errors import Cancelled, NonFiniteLossError, SpareInputError
from spare_core.sampling import generate
from tiny_denoiser import TinyDiffusionModel

CONCEPT, SURROGATE, RETAIN = "a red cat", "a plain house", ["a blue dog", "a green tree"]
FAST = dict(samples=2, sample_steps=4, batch_size=2)


@pytest.fixture(scope="module")
def model():
    return TinyDiffusionModel(seed=0)


@pytest.fixture(scope="module")
def saliency(model):
    return sc.saliency_scan(model, [CONCEPT], retain=RETAIN, samples=2, sample_steps=4, selection=0.5, seed=0)


@pytest.fixture(scope="module")
def trained(model, saliency):
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=60, learning_rate=1e-2, seed=0, **FAST)
    before = _probe(model)
    result = sc.distill(model, cfg, saliency)
    return result, before


def _probe(model, seed=123):
    """Fixed noisy inputs and the network's x0 predictions for concept, surrogate and retain prompts."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((4, *model.latent_shape), generator=g)
    sigma = model.sigma_at(torch.tensor([0.3, 0.5, 0.7, 0.9]))
    xt = model.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    out = {}
    with torch.no_grad():
        for p in [CONCEPT, SURROGATE] + RETAIN:
            cond = model.encode([p] * 4)
            out[p] = model.predict_x0(xt, sigma, cond)
    return xt, sigma, out


def _eps_gap(a, b, sigma):
    return float((((a - b) / sigma.view(-1, 1, 1, 1)) ** 2).mean())


def _no_hooks(network):
    return all(not m._forward_hooks for m in network.modules())


# ---- stage 1: saliency ----

def test_saliency_selects_top_fraction_of_every_linear_and_conv(model, saliency):
    candidates = sc.candidate_modules(model.network)  # default: the authors' candidates, every Linear/Conv2d
    assert set(saliency.scores) == set(candidates)
    kinds = {type(m) for m in candidates.values()}
    assert kinds == {torch.nn.Linear, torch.nn.Conv2d}
    assert any(".attn2." in p for p in candidates) and any("emb_layers" in p for p in candidates)
    assert len(saliency.selected) == -(-len(candidates) // 2)  # ceil(0.5 * n)
    ranked = sorted(saliency.scores, key=saliency.scores.get, reverse=True)
    assert saliency.selected == ranked[: len(saliency.selected)]
    assert len(set(saliency.scores.values())) > len(saliency.scores) // 2  # real, varied gradient scores
    assert saliency.meta["scoring"] == sc.ScanConfig.scoring
    assert "selected" in saliency.summary()
    attention = sc.candidate_modules(model.network, "attention")
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for p in attention)


class GatedModel(TinyDiffusionModel):
    """The tiny denoiser plus one Conv2d (`concept_path`) that acts only when the prompt is CONCEPT: the concept's
    gradient dominates that module, other prompts' gradients never reach it."""

    def __init__(self):
        super().__init__(seed=0)
        self.network.concept_path = torch.nn.Conv2d(4, 4, 1)
        torch.nn.init.normal_(self.network.concept_path.weight, std=0.5, generator=torch.Generator().manual_seed(1))
        self.concept_ctx = self.encode([CONCEPT])[0]

    def predict_x0(self, x, sigma, cond):
        gate = ((cond - self.concept_ctx).flatten(1).norm(dim=1) < 1e-5).to(x.dtype).view(-1, 1, 1, 1)
        c_in = 1.0 / torch.sqrt(sigma.view(-1, 1, 1, 1) ** 2 + 1.0)
        return super().predict_x0(x, sigma, cond) + 5.0 * gate * self.network.concept_path(x * c_in)


@pytest.mark.parametrize("scoring", sc.config.SCORINGS)
def test_every_scoring_ranks_first_the_module_the_concept_dominates(scoring):
    gated = GatedModel()
    sal = sc.saliency_scan(gated, [CONCEPT], retain=RETAIN, samples=2, sample_steps=3, top_k=5,
                           scoring=scoring, seed=0)
    assert sal.selected[0] == "concept_path", sal.summary()
    # and the ranking is not a fixed order: without the gate's concept the module ranks low
    other = sc.saliency_scan(gated, ["a blue dog"], samples=2, sample_steps=3, top_k=5,
                             scoring=scoring, seed=0)
    assert other.scores["concept_path"] == 0.0 if scoring != "contrastive" else "concept_path" not in other.selected[:1]


def test_taylor_score_is_invariant_to_input_scale():
    """|W * grad| does not change when a module's input is scaled by a and its weight by 1/a (same network);
    the authors' mean |grad| does (the scale bias between text-token and image-token projections)."""
    model_a, model_b = TinyDiffusionModel(seed=0), TinyDiffusionModel(seed=0)
    path = "middle_block.1.transformer_blocks.0.attn2.to_k"
    with torch.no_grad():  # scale every context token by 4 and to_k/to_v weights by 1/4: same outputs
        for name, m in model_b.network.named_modules():
            if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
                m.weight.mul_(0.25)
    encode_b = model_b.encode
    model_b.encode = lambda prompts: encode_b(prompts) * 4.0
    kw = dict(samples=1, sample_steps=2, seed=0)
    ta, tb = (sc.saliency_scan(m, [CONCEPT], scoring="taylor", **kw) for m in (model_a, model_b))
    ga, gb = (sc.saliency_scan(m, [CONCEPT], scoring="gradient", **kw) for m in (model_a, model_b))
    assert tb.scores[path] == pytest.approx(ta.scores[path], rel=1e-3)
    assert gb.scores[path] == pytest.approx(4.0 * ga.scores[path], rel=1e-3)


def test_saliency_top_k_and_roundtrip(model, tmp_path):
    sal = sc.saliency_scan(model, [CONCEPT], samples=1, sample_steps=2, top_k=3, targets="all")
    assert len(sal.selected) == 3
    assert any(isinstance(dict(model.network.named_modules())[p], torch.nn.Conv2d) for p in sal.scores)
    assert sal.meta["top_k"] == 3 and sal.meta["selection"] == sc.ScanConfig.selection
    path = sal.save(str(tmp_path / "s.safetensors"))
    back = sc.Saliency.load(path)
    assert back.selected == sal.selected and back.scores == pytest.approx(sal.scores) and back.meta == sal.meta


def test_stage_options_are_config_fields(model):
    """Keyword options of the stages are their config's fields: a config object and keywords give the same scan; a
    name that is no field is refused, naming the valid ones."""
    kw = dict(samples=1, sample_steps=2, top_k=3)
    a = sc.saliency_scan(model, [CONCEPT], **kw)
    b = sc.saliency_scan(model, [CONCEPT], (), sc.ScanConfig(**kw))
    assert a.selected == b.selected and a.scores == b.scores
    with pytest.raises(TypeError, match="unknown ScanConfig option.*fraction.*valid"):
        sc.saliency_scan(model, [CONCEPT], fraction=0.5)
    with pytest.raises(TypeError, match="unknown ProfileConfig option.*gamma"):
        sc.timestep_profile(model, [CONCEPT], [SURROGATE], gamma=1.0)


def test_saliency_leaves_network_untouched(model):
    flags = [p.requires_grad for p in model.network.parameters()]
    xt, sigma, before = _probe(model)
    sc.saliency_scan(model, [CONCEPT], samples=1, sample_steps=2)
    assert [p.requires_grad for p in model.network.parameters()] == flags
    assert all(p.grad is None for p in model.network.parameters())
    _, _, after = _probe(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- stage 3: timestep profile ----

def test_timestep_profile_distribution(model, tmp_path):
    prof = sc.timestep_profile(model, [CONCEPT], [SURROGATE], bins=5, samples=2, sample_steps=2, sharpness=1.0,
                               uniform_floor=0.2)
    assert len(prof.probs) == 5 and sum(prof.probs) == pytest.approx(1.0)
    assert min(prof.probs) >= 0.2 / 5 - 1e-9  # the uniform floor
    peak = max(range(5), key=lambda i: prof.divergence[i])
    assert max(range(5), key=lambda i: prof.probs[i]) == peak
    t = prof.sample(20000, torch.Generator().manual_seed(0))
    hist = torch.histc(t, bins=5, min=0, max=1) / t.numel()
    assert torch.allclose(hist, torch.tensor(prof.probs, dtype=torch.float32), atol=0.02)
    back = sc.TimestepProfile.load(prof.save(str(tmp_path / "p.json")))
    assert back.probs == prof.probs
    flat = sc.uniform_profile(4)
    assert flat.probs == [0.25] * 4
    sharp = sc.timestep_profile(model, [CONCEPT], [SURROGATE], bins=5, samples=2, sample_steps=2, sharpness=3.0,
                                uniform_floor=0.0)
    assert max(sharp.probs) > max(prof.probs)


def test_profile_measures_the_first_samples_per_concept_of_given_latents(model):
    """With latents (sample-major: row i -> concept i % n), the profile measures on the first `samples` of every
    concept -- by default PROFILE_SAMPLES (2), half of Concept Samples' 4 -- so more rows do not change it."""
    concepts, surrogates = [CONCEPT, "a blue dog"], [SURROGATE, "a green tree"]
    x = torch.randn(8, *model.latent_shape, generator=torch.Generator().manual_seed(1))  # 4 per concept
    kw = dict(bins=4, seed=0)
    default = sc.timestep_profile(model, concepts, surrogates, latents=x, **kw)
    assert sc.ProfileConfig.samples == 2
    assert default.divergence == sc.timestep_profile(model, concepts, surrogates, latents=x[:4], **kw).divergence
    every = sc.timestep_profile(model, concepts, surrogates, latents=x, samples=4, **kw)
    assert every.divergence != default.divergence
    assert every.divergence == sc.timestep_profile(model, concepts, surrogates, latents=x, samples=9, **kw).divergence


def test_loss_weightings():
    from spare_core.sampling import loss_weight
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(loss_weight(sigma, "eps", 0.5), 1 / sigma ** 2)
    assert torch.allclose(loss_weight(sigma, "v", 0.5), 1 / sigma ** 2 + 4.0)
    with pytest.raises(ValueError, match="valid: v, eps"):
        loss_weight(sigma, "x0", 0.5)


def test_profile_weighting_moves_mass_to_high_noise(model):
    """Same draws (same seed), two weightings: "v" adds 1/sigma_data^2 to every weight, which matters most where
    1/sigma^2 is small, i.e. at the noisy end; so the v-profile's divergence relative to eps grows with t."""
    kw = dict(bins=5, samples=2, sample_steps=2, sharpness=1.0, uniform_floor=0.0, seed=3)
    eps = sc.timestep_profile(model, [CONCEPT], [SURROGATE], loss_weighting="eps", **kw)
    v = sc.timestep_profile(model, [CONCEPT], [SURROGATE], loss_weighting="v", **kw)
    ratio = [a / b for a, b in zip(v.divergence, eps.divergence)]
    assert all(r >= 1.0 for r in ratio), ratio
    assert ratio == sorted(ratio) and ratio[-1] > 1.05 * ratio[0], ratio
    assert v.probs[-1] > eps.probs[-1] and v.meta["loss_weighting"] == "v"
    with pytest.raises(SpareInputError, match="loss_weighting='x0'"):
        sc.timestep_profile(model, [CONCEPT], [SURROGATE], loss_weighting="x0", **kw)


# ---- stage 2: distillation ----

def test_distill_erases_concept_and_keeps_retain(model, trained):
    result, (xt, sigma, before) = trained
    assert len(result.losses) == 60
    with sc.apply_lora(model.network, result.lora, 1.0):
        _, _, after = _probe(model)
    gap_before = _eps_gap(before[CONCEPT], before[SURROGATE], sigma)
    gap_after = _eps_gap(after[CONCEPT], before[SURROGATE], sigma)
    print(f"concept->surrogate gap {gap_before:.4g} -> {gap_after:.4g}")
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)
    concept_moved = _eps_gap(after[CONCEPT], before[CONCEPT], sigma)
    for r in RETAIN:
        retain_moved = _eps_gap(after[r], before[r], sigma)
        print(f"{r}: moved {retain_moved:.4g} vs concept moved {concept_moved:.4g}")
        assert retain_moved < 0.25 * concept_moved, (r, retain_moved, concept_moved)


def test_adapters_only_on_selected_and_base_untouched(model, saliency, trained):
    result, (xt, sigma, before) = trained
    assert set(result.lora.modules) == set(saliency.selected)
    rank = result.lora.rank
    assert result.trainable_params == sum(m["down"].numel() + m["up"].numel() for m in result.lora.modules.values())
    assert rank == sc.DistillConfig.rank == 8  # the default (bench/HISTORY.md, "LoRA rank")
    assert _no_hooks(model.network)
    _, _, after = _probe(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical base outputs
    assert all(p.requires_grad for p in model.network.parameters())  # the user's flags are restored
    assert all(p.grad is None for p in model.network.parameters())


def test_a_step_is_one_teacher_and_one_student_forward_over_forget_and_retain_rows(model, saliency, monkeypatch):
    """Each step batches its forget and retain rows into one forward per model (speed: bench/HISTORY.md, "Speed"):
    the teacher sees the surrogate on the forget rows, the student the concept, both the same retain prompt. (The
    teacher's forwards run ahead, no-grad, one step's rows each here as on a GPU; on the CPU several steps' rows.)"""
    monkeypatch.setattr(sys.modules["spare_core.distill"], "forward_rows", lambda device, rows: rows)
    calls = []
    real = model.predict_x0

    def recording(x, sigma, cond):
        calls.append((x.shape[0], cond.detach().clone(), torch.is_grad_enabled()))
        return real(x, sigma, cond)
    # 10 rows: no sampling or probe batch has as many; without the rows on the forget states (their chunks:
    # test_rows_in_chunks_give_the_same_gradient)
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=3, learning_rate=1e-3, check_every=100,
                           uncond_rows=0, cross_rows=0, **{**FAST, "batch_size": 5})
    monkeypatch.setattr(model, "predict_x0", recording)
    sc.distill(model, cfg, saliency, latents=torch.randn(2, *model.latent_shape))
    b = cfg.batch_size
    encoded = {p: model.encode([p])[0] for p in [CONCEPT, SURROGATE, ""] + RETAIN}
    training = [c for c in calls if c[0] == 2 * b]
    assert len(training) == 2 * cfg.steps  # teacher, student per step; nothing else has 2 * batch_size rows
    teachers, students = [c for c in training if not c[2]], [c for c in training if c[2]]
    assert len(teachers) == len(students) == cfg.steps
    for (_, teacher, _), (_, student, _) in zip(teachers, students):
        assert all(torch.equal(row, encoded[SURROGATE]) for row in teacher[:b])
        assert all(torch.equal(row, encoded[CONCEPT]) for row in student[:b])
        assert torch.equal(teacher[b:], student[b:])  # retain rows: the same prompt for both
        assert all(any(torch.equal(row, encoded[p]) for p in RETAIN + [""]) for row in student[b:])


def test_distill_deterministic(model):
    sal = sc.saliency_scan(model, [CONCEPT], samples=1, sample_steps=2, top_k=2)
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], steps=5, learning_rate=1e-3, seed=3, **FAST)
    a, b = sc.distill(model, cfg, sal), sc.distill(model, cfg, sal)
    for p in a.lora.modules:
        assert torch.equal(a.lora.modules[p]["up"], b.lora.modules[p]["up"])
        assert torch.equal(a.lora.modules[p]["down"], b.lora.modules[p]["down"])
        assert torch.count_nonzero(a.lora.modules[p]["up"]) > 0
    c = sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=5, learning_rate=1e-3, seed=4, **FAST), sal)
    assert not all(torch.equal(a.lora.modules[p]["down"], c.lora.modules[p]["down"]) for p in a.lora.modules)


def test_multi_concept_one_lora(model, saliency):
    concepts, surrogates = ["a red cat", "a yellow bird"], ["a plain house", "a plain box"]
    cfg = sc.DistillConfig(concepts, surrogates, retain=["a green tree"], steps=60, learning_rate=1e-2, **FAST)
    res = sc.distill(model, cfg, saliency)
    assert json.loads(res.lora.metadata["spare.concepts"]) == concepts
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn((4, *model.latent_shape), generator=g)
    sigma = model.sigma_at(torch.full((4,), 0.8))
    xt = model.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    with torch.no_grad():
        for c, s in zip(concepts, surrogates):
            target = model.predict_x0(xt, sigma, model.encode([s] * 4))
            before = _eps_gap(model.predict_x0(xt, sigma, model.encode([c] * 4)), target, sigma)
            with sc.apply_lora(model.network, res.lora):
                after = _eps_gap(model.predict_x0(xt, sigma, model.encode([c] * 4)), target, sigma)
            assert after < 0.6 * before, (c, before, after)


def test_given_latents_are_used(model, saliency):
    """The LoRA trained on given samples depends on them: other samples (or none: self-generated) give another LoRA,
    the same samples the same LoRA."""
    g = torch.Generator().manual_seed(3)
    lat_a = torch.randn((3, *model.latent_shape), generator=g)
    lat_b = 0.25 * lat_a  # same content, another scale (what a VAE-space LATENT passed unconverted would be)
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], steps=3, learning_rate=1e-2, **FAST)

    def ups(res):
        return torch.cat([m["up"].flatten() for m in res.lora.modules.values()])
    a, a2 = ups(sc.distill(model, cfg, saliency, latents=lat_a)), ups(sc.distill(model, cfg, saliency, latents=lat_a))
    b, own = ups(sc.distill(model, cfg, saliency, latents=lat_b)), ups(sc.distill(model, cfg, saliency))
    assert torch.equal(a, a2)
    assert not torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, own, atol=1e-6)
    with pytest.raises(SpareInputError, match="latents"):
        sc.distill(model, cfg, saliency, latents=torch.zeros(3, 1, 2, 2))


def test_progress_and_cancel(model, saliency):
    calls = []
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], steps=6, **FAST)
    sc.distill(model, cfg, saliency, progress=lambda s, n, loss: calls.append((s, n)))
    assert calls == [(i, 6) for i in range(1, 7)]
    state = {"n": 0}

    def stop():
        state["n"] += 1
        return state["n"] > 12  # after sampling has started: cancels inside sampling or training

    with pytest.raises(Cancelled):
        sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=50, **FAST), saliency, should_stop=stop)
    assert _no_hooks(model.network)


def test_non_finite_loss_stops_and_reports_step(model, saliency, tmp_path, monkeypatch):
    real = model.predict_x0
    state = {"calls": 0}

    def broken(x, sigma, cond):
        out = real(x, sigma, cond)
        if torch.is_grad_enabled() and out.requires_grad:
            state["calls"] += 1
            if state["calls"] >= 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(model, "predict_x0", broken)
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], steps=10, retain_unconditional=False, retain_weight=0.0, **FAST)
    with pytest.raises(NonFiniteLossError) as err:
        sc.distill(model, cfg, saliency)
    assert err.value.step == 3 and "step 3" in str(err.value)
    monkeypatch.setattr(model, "predict_x0", real)
    assert _no_hooks(model.network)


# ---- export / load / apply ----

def test_export_load_apply_matches_student(model, saliency, tmp_path):
    torch.manual_seed(0)
    adapters = attach(model.network, saliency.selected, rank=3, alpha=6.0)
    for a in adapters.adapters.values():
        torch.nn.init.normal_(a.up.weight, std=0.05)
    xt, sigma, _ = _probe(model)
    cond = model.encode([CONCEPT] * 4)
    with torch.no_grad():
        student = model.predict_x0(xt, sigma, cond)
    weights = sc.LoraWeights.from_adapters(adapters, {"note": "x"})
    adapters.remove()
    with torch.no_grad():
        base = model.predict_x0(xt, sigma, cond)
    assert not torch.allclose(student, base, atol=1e-4)
    for fmt in ("comfyui", "kohya"):
        path = sc.save_lora(str(tmp_path / f"{fmt}.safetensors"), weights, key_format=fmt, dtype=torch.float32,
                            metadata={"host": "y", "ss_network_dim": "99"})  # the format fields come from the weights
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            meta = f.metadata()
        prefix = "diffusion_model." if fmt == "comfyui" else "lora_unet_"
        assert all(k.startswith(prefix) for k in keys) and meta["ss_network_dim"] == "3" and meta["note"] == "x"
        assert meta["host"] == "y" and meta["spare.key_format"] == fmt and "host" not in weights.metadata
        assert len(keys) == 3 * len(saliency.selected)
        loaded = sc.load_lora(path, model.network)
        with sc.apply_lora(model.network, loaded, 1.0), torch.no_grad():
            assert torch.allclose(model.predict_x0(xt, sigma, cond), student, atol=1e-5)
        with sc.apply_lora(model.network, loaded, 0.0), torch.no_grad():
            assert torch.equal(model.predict_x0(xt, sigma, cond), base)
    assert _no_hooks(model.network)
    # fp16 files (the default) reproduce to half-precision tolerance
    loaded16 = sc.load_lora(sc.save_lora(str(tmp_path / "h.safetensors"), weights), model.network)
    with sc.apply_lora(model.network, loaded16), torch.no_grad():
        assert torch.allclose(model.predict_x0(xt, sigma, cond), student, rtol=2e-3, atol=2e-3)


def test_dense_delta_matches_hook(model, saliency):
    """The exported (up, down, alpha) mean W + alpha/r * up @ down: merge the dense delta and compare."""
    lin = torch.nn.Linear(6, 5)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    for base, x in ((lin, torch.randn(2, 6)), (conv, torch.randn(2, 3, 5, 5))):
        net = torch.nn.Sequential(base)
        ad = attach(net, ["0"], rank=2, alpha=3.0)
        torch.nn.init.normal_(ad.adapters["0"].up.weight)
        w = sc.LoraWeights.from_adapters(ad)
        with torch.no_grad():
            hooked = net(x)
            ad.remove()
            base.weight += w.delta_weight("0")
            assert torch.allclose(net(x), hooked, atol=1e-5)


def test_narrow_module_gets_a_capped_rank_with_the_same_scale(tmp_path):
    """rank 8 on a 4-channel output conv (like SD's out.2): that adapter is rank 4 with alpha scaled to keep the
    update scale alpha / rank; the saved file reloads to the same dense delta (loaders scale by alpha / rows)."""
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Conv2d(16, 4, 3, padding=1))
    ad = attach(net, ["0", "1"], rank=8, alpha=8.0)
    assert (ad.adapters["0"].rank, ad.adapters["1"].rank) == (8, 4)
    assert ad.adapters["0"].scale == ad.adapters["1"].scale == 1.0
    for a in ad.adapters.values():
        torch.nn.init.normal_(a.up.weight)
    w = sc.LoraWeights.from_adapters(ad)
    x = torch.randn(2, 12)
    with torch.no_grad():
        hooked = net[1](net[0](x).view(2, 16, 1, 1))
    ad.remove()
    path = sc.save_lora(str(tmp_path / "capped.safetensors"), w)
    back = sc.load_lora(path, net)
    assert float(back.modules["1"]["alpha"]) == 4.0 and back.modules["1"]["down"].shape[0] == 4
    with torch.no_grad():
        for name in ("0", "1"):  # fp16 file: compare loosely
            net.get_submodule(name).weight += back.delta_weight(name)
        assert torch.allclose(net[1](net[0](x).view(2, 16, 1, 1)), hooked, atol=2e-2)
    with pytest.raises(SpareInputError, match="rank=17 is larger than any selected module"):
        attach(net, ["1"], rank=17, alpha=17.0)


def test_save_is_atomic(tmp_path, monkeypatch, saliency, model):
    ad = attach(model.network, saliency.selected[:1], rank=2, alpha=2.0)
    w = sc.LoraWeights.from_adapters(ad)
    ad.remove()
    target = tmp_path / "x.safetensors"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lora_mod, "save_file", boom)
    with pytest.raises(OSError):
        sc.save_lora(str(target), w)
    assert os.listdir(tmp_path) == []


# ---- bad input ----

@pytest.mark.parametrize("field,value,match", [
    ("concepts", ["   "], "concept #1 is empty"),
    ("concepts", [], "at least one concept"),
    ("surrogates", ["A Red Cat "], "equals the concept"),
    ("surrogates", ["x", "y"], "surrogate"),
    ("retain", ["a red cat"], "retain prompts contain"),
    ("rank", 0, "rank=0"),
    ("rank", 33, "rank=33 is larger than any selected module"),
    ("steps", 0, "steps=0"),
    ("learning_rate", -1.0, "learning_rate"),
    ("loss_weighting", "snr", "loss_weighting='snr' is not one of v, eps"),
    ("stop_at_gap_closed", 1.0, "stop_at_gap_closed=1.0 must be in"),
    ("extend_until_gap_closed", -0.1, "extend_until_gap_closed=-0.1 must be in"),
    ("check_every", 0, "check_every=0"),
])
def test_bad_distill_inputs(model, saliency, field, value, match):
    kwargs = dict(concepts=[CONCEPT], surrogates=[SURROGATE], steps=1, **FAST)
    kwargs[field] = value
    with pytest.raises(SpareInputError, match=match):
        sc.distill(model, sc.DistillConfig(**kwargs), saliency)
    assert _no_hooks(model.network)


def test_empty_salient_set(model, saliency):
    empty = sc.Saliency(saliency.scores, [], {})
    with pytest.raises(SpareInputError, match="selects no module"):
        sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=1), empty)
    with pytest.raises(SpareInputError, match="selection"):
        sc.saliency_scan(model, [CONCEPT], selection=0.0)
    with pytest.raises(SpareInputError, match="concept #1 is empty"):
        sc.saliency_scan(model, [""])


def test_lora_file_for_other_model(tmp_path, model):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(SpareInputError, match="none of its 2 keys matches"):
        sc.load_lora(str(path), model.network)
    with pytest.raises(SpareInputError, match="does not exist"):
        sc.load_lora(str(tmp_path / "missing.safetensors"), model.network)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)  # e.g. a half-copied file: safetensors says "header too large"
    with pytest.raises(SpareInputError, match="'broken.safetensors' is not a readable .safetensors file"):
        sc.load_lora(str(broken), model.network)
    with pytest.raises(SpareInputError, match="saliency file 'broken.safetensors'"):
        sc.Saliency.load(str(broken))


def test_saved_files_get_the_folders_normal_permissions(model, saliency, trained, tmp_path):
    """Not mkstemp's 0600: 0666 minus the umask, as a plain open() (and ComfyUI) writes."""
    umask = os.umask(0o022)
    try:
        result, _ = trained
        paths = [sc.save_lora(str(tmp_path / "a.safetensors"), result.lora),
                 saliency.save(str(tmp_path / "s.safetensors"))]
        for path in paths:
            assert os.stat(path).st_mode & 0o777 == 0o644, path
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    finally:
        os.umask(umask)


def test_generate_is_deterministic(model):
    a, ia = generate(model, ["a red cat", "a dog"], 2, seed=1, steps=3)
    b, _ = generate(model, ["a red cat", "a dog"], 2, seed=1, steps=3)
    assert torch.equal(a, b) and ia.tolist() == [0, 0, 1, 1] and torch.isfinite(a).all()


def test_gradient_checkpointing_same_result(model, saliency):
    base = dict(concepts=[CONCEPT], surrogates=[SURROGATE], steps=4, learning_rate=1e-3, **FAST)
    a = sc.distill(model, sc.DistillConfig(**base), saliency)
    b = sc.distill(model, sc.DistillConfig(**base, gradient_checkpointing=True), saliency)
    for p in a.lora.modules:
        assert torch.allclose(a.lora.modules[p]["up"], b.lora.modules[p]["up"], atol=1e-6)
    assert all("forward" not in m.__dict__ for m in model.network.modules())


def test_gradient_checkpointing_recomputes(model, saliency):
    """Checkpointing really recomputes: the blocks' inner modules run more often (forward again in backward) than
    without it (sampling, teacher and probe passes run without grad and are counted equally in both runs)."""
    calls = {"n": 0}

    def count(module, args, output):
        calls["n"] += 1
    leaves = [m for m in model.network.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        counts = []
        for ckpt in (False, True):
            calls["n"] = 0
            sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=3, gradient_checkpointing=ckpt, **FAST),
                       saliency)
            counts.append(calls["n"])
    finally:
        for h in handles:
            h.remove()
    plain, checkpointed = counts
    assert checkpointed > plain, counts


def test_training_that_did_nothing_is_reported(model, saliency, trained):
    result, _ = trained
    assert result.gap_closed > 0.2 and result.warning is None
    idle = sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=10, learning_rate=1e-9, **FAST), saliency)
    assert idle.gap_closed < 0.2 and "probably not erased" in idle.warning


# ---- erase until erased: the stopping rule ----

def test_stopping_rule_stops_early_on_an_easy_concept(model, saliency):
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=300, learning_rate=1e-2, stop_at_gap_closed=0.6,
                           check_every=5, **FAST)
    result = sc.distill(model, cfg, saliency)
    assert result.stopped_early and result.steps_used < 300 and result.steps_used % 5 == 0
    assert result.gap_closed >= 0.6 and result.warning is None
    # it stopped at the first check that reached the target, not later
    assert all(c["gap_closed"] < 0.6 for c in result.checks[1:-2])
    assert result.lora.metadata["spare.steps_used"] == str(result.steps_used)
    assert "gap target reached" in result.report()
    assert _no_hooks(model.network)


def test_stopping_rule_runs_to_the_cap_when_it_cannot_erase(model, saliency):
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], steps=30, learning_rate=1e-9, stop_at_gap_closed=0.6, check_every=5, **FAST)
    result = sc.distill(model, cfg, saliency)
    assert not result.stopped_early and result.steps_used == 30
    assert result.gap_closed < 0.6 and "step cap" in result.report()
    assert result.warning  # the shortfall is reported, not hidden


def test_extension_trains_on_only_while_the_gap_is_open(model, saliency):
    """extend_until_gap_closed: a run whose gap closed by the planned steps is the plain run, bit for bit; one whose
    gap stays open trains on, at a second cosine from half the learning rate, to twice the planned steps."""
    base = dict(concepts=[CONCEPT], surrogates=[SURROGATE], retain=RETAIN, steps=20, learning_rate=1e-2, check_every=5,
                **FAST)
    plain = sc.distill(model, sc.DistillConfig(**base), saliency)
    reached = sc.distill(model, sc.DistillConfig(**base, extend_until_gap_closed=0.01), saliency)
    assert plain.gap_closed > 0.01 and reached.steps_used == 20
    assert [r["loss"] for r in reached.losses] == [r["loss"] for r in plain.losses]
    assert all(torch.equal(reached.lora.modules[m]["up"], plain.lora.modules[m]["up"]) for m in plain.lora.modules)
    assert "step cap" in reached.report()

    stalled = sc.distill(model, sc.DistillConfig(**{**base, "learning_rate": 1e-9}, extend_until_gap_closed=0.9),
                         saliency)
    assert stalled.steps_used == 40 and stalled.gap_closed < 0.9 and "extended past 20 steps" in stalled.report()
    lrs = [r["lr"] for r in stalled.losses]
    assert lrs[20] == pytest.approx(0.5e-9) and lrs[19] < lrs[21] and lrs[-1] < lrs[21]  # the second cosine
    assert [c["step"] for c in stalled.checks if c["step"] >= 20][:2] == [20, 25]  # checked at the plan's end, then on
    assert stalled.warning and _no_hooks(model.network)


def test_calibration_scales_the_trained_lora_to_the_lowest_strength_that_still_erases(model, saliency):
    """calibrate_share: the same training as the plain run (bit for bit), then the LoRA's up weights times the
    calibrated strength, which is the lowest strength tried whose erased share passed (times the margin, at most 1),
    recorded in the result and the file's metadata; the live hooks are gone."""
    base = dict(concepts=[CONCEPT], surrogates=[SURROGATE], retain=RETAIN, steps=60, learning_rate=1e-2, **FAST)
    plain = sc.distill(model, sc.DistillConfig(**base), saliency)
    assert plain.strength == 1.0 and plain.calibration == [] and plain.lora.metadata["spare.strength"] == "1"
    for share, margin in ((1.0, 1.0), (1.0, 1.2), (0.3, 1.0)):
        cal = sc.distill(model, sc.DistillConfig(**base, calibrate_share=share, calibrate_margin=margin), saliency)
        assert [r["loss"] for r in cal.losses] == [r["loss"] for r in plain.losses]
        tried = [r["strength"] for r in cal.calibration]
        assert tried == [0.9, 0.8, 0.7, 0.6, 0.5][:len(tried)] and len(tried) >= 1
        ok = [r["erased"] >= share for r in cal.calibration]
        assert all(ok[:-1]) and (len(tried) == 5 or not ok[-1])  # the search stops at the first failure
        lowest = min([t for t, k in zip(tried, ok) if k], default=1.0)
        assert cal.strength == pytest.approx(min(1.0, lowest * margin)) and cal.strength < 1.0  # this toy: 0.7
        for m in plain.lora.modules:
            assert torch.allclose(cal.lora.modules[m]["up"], plain.lora.modules[m]["up"] * cal.strength)
            assert torch.equal(cal.lora.modules[m]["down"], plain.lora.modules[m]["down"])
        assert float(cal.lora.metadata["spare.strength"]) == pytest.approx(cal.strength, abs=1e-4)
        assert _no_hooks(model.network)


@pytest.mark.parametrize("bad", [dict(calibrate_share=1.5), dict(calibrate_share=-0.1), dict(calibrate_margin=0.5)])
def test_calibration_settings_out_of_range_are_refused_by_name(model, saliency, bad):
    with pytest.raises(SpareInputError, match=next(iter(bad))):
        sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=1, **FAST, **bad), saliency)


def test_erased_share_counts_samples_nearer_the_surrogate():
    from spare_core.calibrate import erased_share
    c, s = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    e = torch.stack([torch.full((1, 2, 2), v) for v in (0.9, 0.6, 0.4, 0.1)])
    assert erased_share(e, c, s) == 0.5 and erased_share(s, c, s) == 1.0 and erased_share(c, c, s) == 0.0


def test_scaled_lora_at_strength_one_adds_what_the_lora_adds_at_that_strength(model, saliency):
    lora = sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=3, learning_rate=1e-2, **FAST),
                      saliency).lora
    assert lora.scaled(1.0) is lora
    x, sigma = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 1.0])
    cond = model.encode([CONCEPT, SURROGATE])
    with torch.no_grad():
        with sc.apply_lora(model.network, lora, 0.6):
            want = model.predict_x0(x, sigma, cond)
        with sc.apply_lora(model.network, lora.scaled(0.6), 1.0):
            got = model.predict_x0(x, sigma, cond)
    assert torch.allclose(got, want, atol=1e-5) and lora.modules[next(iter(lora.modules))]["up"].abs().sum() > 0


def test_a_stalled_gap_keeps_the_saliency_selection(model, saliency):
    """Short of the target the adapter set stays the saliency's (no module is added mid-run)."""
    plain = sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=10, learning_rate=1e-9, stop_at_gap_closed=0.6,
                                               check_every=5, **FAST), saliency)
    assert set(plain.lora.modules) == set(saliency.selected)
    assert all(c["modules"] == len(saliency.selected) for c in plain.checks) and _no_hooks(model.network)


# ---- the retain-set builder ----

def test_expand_alternatives():
    out = sc.expand_alternatives(["a {cat|house} in {Monet|Picasso} style", "", "a photo", "A Photo"])
    assert out == ["a cat in Monet style", "a cat in Picasso style", "a house in Monet style",
                   "a house in Picasso style", "a photo"]
    with pytest.raises(SpareInputError, match="unbalanced or nested"):
        sc.expand_alternatives(["a {cat|{dog|fox}}"])
    with pytest.raises(SpareInputError, match="unbalanced"):
        sc.expand_alternatives(["a {cat|dog"])
    with pytest.raises(SpareInputError, match="empty group"):
        sc.expand_alternatives(["a {|} cat"])
    with pytest.raises(SpareInputError, match="more than"):
        sc.expand_alternatives(["{" + "|".join(map(str, range(50))) + "} {" + "|".join(map(str, range(50))) + "}"])


def test_distill_expands_retain_alternatives(model, saliency):
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=["a {blue|green} {dog|tree}"], steps=1, **FAST)
    result = sc.distill(model, cfg, saliency)
    assert result.config.retain == ["a blue dog", "a blue tree", "a green dog", "a green tree"]
    assert json.loads(result.lora.metadata["spare.retain"]) == result.config.retain


class _Damped(TinyDiffusionModel):
    """Gradients as small as a large trained model's per-weight ones: the prediction moves 1e-3 as much."""

    def predict_x0(self, x, sigma, cond):
        base = super().predict_x0(x, sigma, cond)
        return base.detach() + 1e-3 * (base - base.detach())


def test_saliency_on_fp16_weights_scales_the_loss(monkeypatch):
    """fp16 weights get fp16 gradients: unscaled, the small ones underflow to 0 and the ranking changes; with the
    loss scaling the fp16 scores match the fp32 ones (to fp16 precision)."""
    from spare_core import saliency as sal_mod
    x = generate(TinyDiffusionModel(0), [CONCEPT], 2, seed=0, steps=4)[0]
    kw = dict(samples=2, sample_steps=4, selection=0.5, seed=0, latents=x)
    ref = sc.saliency_scan(_Damped(0), [CONCEPT], **kw)
    half = _Damped(0)
    half.network.half()
    half.dtype = torch.float16
    scaled = sc.saliency_scan(half, [CONCEPT], **kw)
    monkeypatch.setattr(sal_mod, "LOSS_SCALE_FP16", 1.0)
    unscaled = sc.saliency_scan(half, [CONCEPT], **kw)
    for k, v in ref.scores.items():
        assert scaled.scores[k] == pytest.approx(v, rel=1e-2), k
    assert scaled.selected == ref.selected
    assert any(unscaled.scores[k] == 0.0 for k in ref.scores)  # what the scaling prevents


def test_saliency_checkpointing_same_scores(model):
    a = sc.saliency_scan(model, [CONCEPT], samples=2, sample_steps=4, seed=0)
    b = sc.saliency_scan(model, [CONCEPT], samples=2, sample_steps=4, seed=0, gradient_checkpointing=True)
    assert a.selected == b.selected
    assert all(b.scores[k] == pytest.approx(v, rel=1e-5) for k, v in a.scores.items())
    assert all("forward" not in m.__dict__ for m in model.network.modules())


def test_by_default_every_forget_row_is_noised_from_surrogate_samples(model, saliency, monkeypatch):
    """The default forget batch (surrogate_anchor 1.0, a measured deviation: bench/RESULTS.md, "Erase only the
    concept"): every row is one of the surrogate's own self-generated samples; 0.5: the last half of the rows, the
    rest the concept's; 0 = the authors' (concept samples only, no surrogate sample drawn)."""
    distill_mod = sys.modules["spare_core.distill"]  # the module (spare_core.distill is the function)
    made, batches = {}, []
    real_generate, real_noised = distill_mod.generate, distill_mod.noised

    def generating(m, prompts, *args, **kwargs):
        out = real_generate(m, prompts, *args, **kwargs)
        made[tuple(prompts)] = out[0]
        return out

    def noising(m, x0, t, g):
        batches.append(x0.clone())
        return real_noised(m, x0, t, g)
    monkeypatch.setattr(distill_mod, "generate", generating)
    monkeypatch.setattr(distill_mod, "noised", noising)
    concept = torch.full((2, *model.latent_shape), 7.0)  # given concept samples, told apart from any generated one
    # no retain rows; the probes take 2 rows: every 4-row noising is a training step's forget batch
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], steps=3, learning_rate=1e-3, check_every=100, retain_unconditional=False,
                           **{**FAST, "batch_size": 4})
    assert cfg.surrogate_anchor == 1.0
    for share, n_concept in ((1.0, 0), (0.5, 2)):
        made.clear(), batches.clear()
        sc.distill(model, sc.DistillConfig(**{**asdict(cfg), "surrogate_anchor": share}), saliency, latents=concept)
        anchors = made[(SURROGATE,)]
        forget = [x for x in batches if x.shape[0] == 4]
        assert len(forget) == cfg.steps
        for x in forget:
            assert torch.equal(x[:n_concept], concept[:n_concept])
            assert all(any(torch.equal(row, a) for a in anchors) for row in x[n_concept:])

    made.clear(), batches.clear()
    sc.distill(model, sc.DistillConfig(**{**asdict(cfg), "surrogate_anchor": 0.0}), saliency, latents=concept)
    assert (SURROGATE,) not in made
    assert all(torch.equal(x, torch.full_like(x, 7.0)) for x in batches if x.shape[0] == 4)


def test_surrogate_anchor_trains_on_surrogate_samples_too(model, saliency):
    """surrogate_anchor > 0: part of each forget batch is noised from the surrogate's own samples (another LoRA than
    the authors' concept-samples-only training); out of [0, 1] is refused by name."""
    base = dict(concepts=[CONCEPT], surrogates=[SURROGATE], steps=3, learning_rate=1e-2, **FAST)
    plain = sc.distill(model, sc.DistillConfig(**base, surrogate_anchor=0.0), saliency)
    anchored = sc.distill(model, sc.DistillConfig(**base, surrogate_anchor=0.5), saliency)
    ups = [(plain.lora.modules[p]["up"], anchored.lora.modules[p]["up"]) for p in plain.lora.modules]
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in ups)
    with pytest.raises(SpareInputError, match="surrogate_anchor"):
        sc.distill(model, sc.DistillConfig(**base, surrogate_anchor=1.5), saliency)


def test_self_generated_samples_do_not_depend_on_the_batch(model):
    """generate() batches 16 samples per forward on the CPU by default (4 on a GPU): only the speed changes."""
    assert sc.sampling.forward_rows(torch.device("cpu"), 4) == sc.sampling.CPU_FORWARD_ROWS
    assert sc.sampling.forward_rows(torch.device("cuda"), 4) == 4
    one, i_one = generate(model, [CONCEPT, SURROGATE], 3, seed=5, steps=3, batch_size=1)
    auto, i_auto = generate(model, [CONCEPT, SURROGATE], 3, seed=5, steps=3)
    assert torch.equal(i_one, i_auto)
    assert torch.allclose(one, auto, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, [CONCEPT], 1, seed=0, batch_size=0)


def test_teacher_targets_computed_ahead_equal_step_by_step(model, saliency, monkeypatch):
    """The teacher's targets are computed ahead in batches (16 rows on the CPU); a run whose teacher takes one step's
    rows per forward (a GPU's) draws the same rows and trains the same LoRA, up to float rounding -- also with the
    stopping rule ending the run between windows."""
    distill_mod = sys.modules["spare_core.distill"]
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=12, learning_rate=1e-2, check_every=5, **FAST)
    ahead = sc.distill(model, cfg, saliency)
    monkeypatch.setattr(distill_mod, "forward_rows", lambda device, rows: rows)
    stepwise = sc.distill(model, cfg, saliency)
    assert [r["step"] for r in ahead.losses] == list(range(1, 13))
    assert [r["loss"] for r in ahead.losses] == pytest.approx([r["loss"] for r in stepwise.losses], rel=1e-4)
    for p, m in ahead.lora.modules.items():
        # float rounding of the batched teacher, carried through 12 AdamW steps at lr 1e-2: relative, not absolute
        diff = (m["up"] - stepwise.lora.modules[p]["up"]).norm() / stepwise.lora.modules[p]["up"].norm()
        assert diff < 1e-3, (p, float(diff))
    # windows capped at AHEAD_STEPS (a check_every longer than the cap): the same run again
    monkeypatch.setattr(distill_mod, "AHEAD_STEPS", 5)
    capped = sc.distill(model, sc.DistillConfig(**{**asdict(cfg), "check_every": 100}), saliency)
    assert [r["loss"] for r in capped.losses] == pytest.approx([r["loss"] for r in stepwise.losses], rel=1e-4)


def test_auto_anchor_samples_and_retain_sample_steps(model, saliency, monkeypatch):
    """By default the anchors take as many samples per prompt as the concepts, and the retain samples half the Euler
    steps of the concept samples (for time: bench/HISTORY.md, "Speed for the time target"); set values are honoured;
    negative ones are refused by name."""
    distill_mod = sys.modules["spare_core.distill"]
    calls = {}
    real_generate = distill_mod.generate

    def generating(m, prompts, per_prompt, seed, steps, *args, **kwargs):
        calls[tuple(prompts)] = (per_prompt, steps)
        return real_generate(m, prompts, per_prompt, seed, steps, *args, **kwargs)
    monkeypatch.setattr(distill_mod, "generate", generating)
    base = dict(concepts=[CONCEPT], surrogates=[SURROGATE], retain=RETAIN, steps=2, learning_rate=1e-3, samples=4,
                sample_steps=6, retain_samples=1)
    sc.distill(model, sc.DistillConfig(**base), saliency)
    assert calls[(CONCEPT,)] == (4, 6) and calls[(SURROGATE,)] == (4, 6) and calls[(*RETAIN, "")] == (1, 3)
    calls.clear()
    sc.distill(model, sc.DistillConfig(**base, anchor_samples=3, retain_sample_steps=6), saliency)
    assert calls[(SURROGATE,)] == (3, 6) and calls[(*RETAIN, "")] == (1, 6)
    for bad in ("anchor_samples", "retain_sample_steps"):
        with pytest.raises(SpareInputError, match=bad):
            sc.distill(model, sc.DistillConfig(**base, **{bad: -1}), saliency)


def test_adapter_hook_adds_strength_times_scale_times_low_rank_in_the_output_dtype():
    """The training hook adds strength * alpha/r * up(down(x)) to the base output in one op, for Linear and Conv2d,
    and keeps the base module's output dtype (a bf16 model with fp32 adapters stays bf16)."""
    torch.manual_seed(0)
    for base, x in ((torch.nn.Linear(6, 5), torch.randn(2, 6)), (torch.nn.Conv2d(3, 4, 3, padding=1),
                                                                 torch.randn(2, 3, 5, 5))):
        for dtype in (torch.float32, torch.bfloat16):
            net = torch.nn.Sequential(base.to(dtype))
            ad = attach(net, ["0"], rank=2, alpha=3.0)
            a = ad.adapters["0"]
            torch.nn.init.normal_(a.up.weight)
            ad.strength = 0.5
            xin = x.to(dtype)
            with torch.no_grad():
                hooked = net(xin)
                with ad.disabled():  # the teacher: the base module exactly
                    plain = net(xin)
                assert ad.enabled and torch.equal(net(xin), hooked)  # on again after the block
                expected = plain.float() + 0.5 * 1.5 * a.up(a.down(xin.float()))
                ad.remove()
                assert torch.equal(net(xin), plain)  # disabled = the base module exactly
            assert hooked.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            assert torch.allclose(hooked.float(), expected, atol=tol, rtol=tol)
            assert not torch.allclose(hooked.float(), plain.float(), atol=1e-3)


def test_fused_adamw_trains_as_the_reference_adamw(model, saliency, monkeypatch):
    """The distillation's optimizer is torch's fused AdamW on the CPU (for speed: bench/HISTORY.md); it trains the
    same LoRA as the per-tensor AdamW, up to float rounding."""
    distill_mod = sys.modules["spare_core.distill"]
    made = []
    real = torch.optim.AdamW

    def recording(*args, **kwargs):
        made.append(kwargs.get("fused"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", recording)
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=12, learning_rate=1e-2, **FAST)
    fused = sc.distill(model, cfg, saliency)
    monkeypatch.setattr(distill_mod, "FUSED_ADAMW_DEVICES", ())
    loop = sc.distill(model, cfg, saliency)
    assert made == [True, None]
    assert [r["loss"] for r in fused.losses] == pytest.approx([r["loss"] for r in loop.losses], rel=1e-4)
    for p, m in fused.lora.modules.items():
        assert torch.allclose(m["up"], loop.lora.modules[p]["up"], atol=1e-5)
        assert torch.allclose(m["down"], loop.lora.modules[p]["down"], atol=1e-4)  # random init ~0.5: rel 2e-4


def test_a_check_measures_both_probes_in_one_student_forward(model, saliency, monkeypatch):
    """On the CPU every probe check is one no-grad student forward over the forget probe's rows (concept prompts) then
    the retain probe's (retain prompts); the check reports the concept gap and the retain drift from it. (On a GPU,
    one forward per probe: the memory of 8 rows, as before.)"""
    calls = []
    real = model.predict_x0

    def recording(x, sigma, cond):
        calls.append((x.shape[0], cond.detach().clone(), torch.is_grad_enabled()))
        return real(x, sigma, cond)
    checked = []
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=6, learning_rate=1e-2, check_every=3, **FAST)
    monkeypatch.setattr(model, "predict_x0", recording)
    result = sc.distill(model, cfg, saliency,
                        on_check=lambda check, adapters: checked.append((len(calls), adapters.enabled)))
    n_forget = min(sys.modules["spare_core.distill"].PROBE_SIZE, 2)  # 2 concept samples (FAST)
    concept = model.encode([CONCEPT])[0]
    (at_check, enabled), = checked  # one check inside the run (step 3); the last one follows step 6
    assert enabled
    size, cond, grad = calls[at_check - 1]
    assert not grad and size > n_forget
    assert all(torch.equal(row, concept) for row in cond[:n_forget])
    assert not any(torch.equal(row, concept) for row in cond[n_forget:])
    assert [c["step"] for c in result.checks] == [0, 3, 6]
    assert all(c["retain_drift"] > 0 for c in result.checks[1:]) and result.checks[0]["retain_drift"] == 0.0


def test_probe_checks_in_gpu_sized_forwards_measure_the_same(model, saliency, monkeypatch):
    """With a GPU's row limit (one probe of at most PROBE_SIZE rows per forward) the checks report the same gap and
    retain drift as the CPU's single forward, up to float rounding."""
    distill_mod = sys.modules["spare_core.distill"]
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=6, learning_rate=1e-2, check_every=3,
                           **{**FAST, "samples": 4})  # 4 + 8 probe rows: two forwards at a limit of 8
    cpu = sc.distill(model, cfg, saliency)
    monkeypatch.setattr(distill_mod, "forward_rows", lambda device, rows: rows)
    gpu = sc.distill(model, cfg, saliency)
    for a, b in zip(cpu.checks, gpu.checks):
        assert a["gap"] == pytest.approx(b["gap"], rel=1e-4) and a["retain_drift"] == pytest.approx(
            b["retain_drift"], rel=1e-4, abs=1e-12)
    assert cpu.checks[-1]["retain_drift"] > 0


def test_rows_on_the_forget_states_keep_other_prompts_there(model):
    """uncond_rows / cross_rows: extra retain rows on the forget rows' OWN x_t and sigma, with the empty prompt /
    random retain prompts for student and teacher alike; with both 0 (and for the forget and ordinary retain rows in
    any case) the step's rows are exactly those drawn without them."""
    from spare_core.distill import get_batch, make_training_data, validate
    base = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=3, uncond_rows=0, cross_rows=0, **FAST)
    full = sc.DistillConfig(**{**asdict(base), "uncond_rows": 1, "cross_rows": 3})
    data = make_training_data(model, validate(base, sc.Saliency({"x": 1.0}, ["x"], {})), None, None)
    n = 2 * len(base.concepts)
    assert data.uncond_row == n + len(RETAIN)  # the empty prompt is the last retain prompt
    plain = get_batch(model, data, base, None, torch.Generator().manual_seed(3))
    more = get_batch(model, data, full, None, torch.Generator().manual_seed(3))
    b = base.batch_size
    assert plain.xt.shape[0] == 2 * b and more.xt.shape[0] == 2 * b + 4
    for field in ("xt", "sigma", "student", "teacher"):
        assert torch.equal(getattr(more, field)[:2 * b], getattr(plain, field))
    extra = slice(2 * b, None)
    assert torch.equal(more.student[extra], more.teacher[extra])  # retain rows: the same prompt for both
    assert more.student[2 * b] == data.uncond_row
    assert all(n <= int(i) < n + len(RETAIN) + 1 for i in more.student[2 * b + 1:])
    for j, k in zip(range(2 * b, 2 * b + 4), [0, 0, 1, 0]):  # row k of the forget batch, cyclically
        assert torch.equal(more.xt[j], more.xt[k]) and more.sigma[j] == more.sigma[k]


def test_mix_rows_keep_blends_of_the_listed_codes_on_the_forget_states(model):
    """mix_rows: rows on the forget rows' own x_t whose prompt is a blend of codes, the same for student and teacher.
    mix_concept 0: each blend lies on the segment between two listed retain codes; > 0: between a listed code and the
    concept's, at most mix_concept of the way to the concept. Without mix_rows the rows and `cond` are as before."""
    from spare_core.distill import MIX_BANK, get_batch, make_training_data, validate
    sal = sc.Saliency({"x": 1.0}, ["x"], {})
    base = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=3, cross_rows=0, **FAST)
    plain_data = make_training_data(model, validate(base, sal), None, None)
    assert plain_data.mix_row is None
    n_rows = 2 + len(RETAIN) + 1  # concept, surrogate, retain prompts, the empty prompt
    for mix_concept in (0.0, 0.5):
        cfg = validate(replace(base, mix_rows=3, mix_concept=mix_concept), sal)
        data = make_training_data(model, cfg, None, None)
        assert data.mix_row == n_rows and data.cond.shape[0] == n_rows + MIX_BANK
        assert torch.equal(data.cond[:n_rows], plain_data.cond)
        listed = plain_data.cond[2:2 + len(RETAIN)]
        ends = [(listed[0], listed[1])] if mix_concept == 0 else [(x, plain_data.cond[0]) for x in listed]
        for blend in data.cond[n_rows:]:  # on a segment between two listed codes / a listed code and the concept's
            fits = []
            for a, b in ends:
                u = float(((blend - a) * (b - a)).sum() / (b - a).pow(2).sum())
                if torch.allclose(blend, a + u * (b - a), atol=1e-5):
                    fits.append(u)
            assert len(fits) == 1 and -1e-6 <= fits[0] <= (mix_concept or 1.0) + 1e-6
        plain = get_batch(model, data, base, None, torch.Generator().manual_seed(3))
        more = get_batch(model, data, cfg, None, torch.Generator().manual_seed(3))
        b = base.batch_size
        for field in ("xt", "sigma", "student", "teacher"):
            assert torch.equal(getattr(more, field)[:2 * b], getattr(plain, field))
        extra = slice(2 * b, None)
        assert torch.equal(more.student[extra], more.teacher[extra])
        assert all(n_rows <= int(i) < n_rows + MIX_BANK for i in more.student[extra])
        for j, k in zip(range(2 * b, 2 * b + 3), [0, 1, 0]):
            assert torch.equal(more.xt[j], more.xt[k]) and more.sigma[j] == more.sigma[k]
    from spare_core.distill import _zip_cond, cat_cond  # a host's kwargs: tensors blended, constants kept
    a, b = {"c": torch.ones(2, 3), "n": 5, "i": torch.arange(2)}, {"c": torch.zeros(2, 3), "n": 5, "i": torch.arange(2)}
    half = _zip_cond(lambda x, y: (x + y) / 2, a, b)
    assert torch.equal(half["c"], torch.full((2, 3), 0.5)) and half["n"] == 5 and torch.equal(half["i"], a["i"])
    assert cat_cond(a, b)["c"].shape == (4, 3)
    with pytest.raises(sc.SpareInputError, match="mix_concept=1.0"):
        validate(replace(base, mix_rows=1, mix_concept=1.0), sal)
    with pytest.raises(sc.SpareInputError, match="mix_rows blends retain prompts"):
        validate(replace(base, retain=[], mix_rows=1), sal)


def test_the_teacher_takes_a_steps_rows_in_one_forward_with_the_default_rows_on_the_forget_states(model, saliency,
                                                                                                    monkeypatch):
    """On an accelerator the teacher's no-grad forward takes one step's rows at once, the rows on the forget states
    (cross_rows, on by default) included: one teacher forward per step, not a forward and a 2-row remainder."""
    monkeypatch.setattr(sys.modules["spare_core.distill"], "forward_rows", lambda device, rows: rows)
    calls = []
    real = model.predict_x0

    def recording(x, sigma, cond):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return real(x, sigma, cond)
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=3, check_every=100,
                           **{**FAST, "batch_size": 5})
    from spare_core.distill import CROSS_ROWS_AUTO, for_model
    assert cfg.cross_rows == CROSS_ROWS_AUTO and cfg.uncond_rows == 0  # the defaults: the family's cross rows
    assert for_model(cfg, model).cross_rows == 2  # a UNet's (the tiny denoiser declares no family: a UNet)
    monkeypatch.setattr(model, "predict_x0", recording)
    sc.distill(model, cfg, saliency, latents=torch.randn(2, *model.latent_shape))
    assert [c for c in calls if c == (12, False)] == [(12, False)] * (cfg.steps + 2)  # + the probe, before and after
    assert [c for c in calls if c[1]] == [(10, True), (2, True)] * cfg.steps  # the student: chunks of 2 x batch_size


def test_cross_rows_default_is_the_familys_measured_one():
    """cross_rows -1 (the default) resolves to the model family's measured value: 2 on a UNet, 0 on the DiTs
    (MiniCanvas-Flux measured no gain); an explicit value is kept; below -1 is refused by name."""
    from types import SimpleNamespace
    from spare_core import families
    from spare_core.distill import for_model, validate

    cfg = sc.DistillConfig([CONCEPT], [SURROGATE])
    assert for_model(cfg, SimpleNamespace()).cross_rows == 2
    for fam in ("flux", "flux_schnell", "chroma", "sd3", "qwen_image", "lumina2"):
        assert for_model(cfg, SimpleNamespace(family=fam)).cross_rows == 0, fam
    assert for_model(replace(cfg, cross_rows=3), SimpleNamespace(family=families.FLUX)).cross_rows == 3
    with pytest.raises(sc.SpareInputError, match="cross_rows=-2"):
        validate(replace(cfg, cross_rows=-2), sc.Saliency({"x": 1.0}, ["x"], {}))


def test_learning_rate_default_is_the_familys_measured_one(model, saliency):
    """learning_rate 0 (the default) resolves to the family's measured rate: 1e-4 on a UNet (the authors'), 2e-4 on
    the DiTs (MiniCanvas-Flux); an explicit rate is kept; the LoRA's metadata records the rate that trained."""
    from types import SimpleNamespace
    from spare_core.distill import LEARNING_RATE_AUTO, for_model

    cfg = sc.DistillConfig([CONCEPT], [SURROGATE])
    assert cfg.learning_rate == LEARNING_RATE_AUTO == 0.0
    assert for_model(cfg, SimpleNamespace()).learning_rate == 1e-4
    for fam in ("flux", "flux_schnell", "chroma", "sd3", "qwen_image", "lumina2"):
        assert for_model(cfg, SimpleNamespace(family=fam)).learning_rate == 2e-4, fam
    assert for_model(replace(cfg, learning_rate=3e-4), SimpleNamespace(family="flux")).learning_rate == 3e-4
    out = sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], steps=2, **FAST), saliency)
    assert out.lora.metadata["ss_learning_rate"] == "0.0001"
    assert out.losses[0]["lr"] == pytest.approx(1e-4)


def test_rows_in_chunks_give_the_same_gradient(model, saliency, monkeypatch):
    """On an accelerator a step's rows go through the student in chunks (peak memory of the forget and ordinary retain
    rows only), each chunk backwarded at once: the loss and the gradient are those of one forward over every row
    (forced here on the CPU: 2 rows per chunk). Compared on the gradient, not on trained weights: Adam's first steps
    turn rounding-level differences of near-zero gradients into differences of a whole step."""
    from spare_core.distill import backward_rows, get_batch, make_training_data, training_mode, validate, x0_no_grad
    distill_mod = sys.modules["spare_core.distill"]
    cfg = validate(sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, steps=3, seed=0, uncond_rows=1,
                                    cross_rows=2, **FAST), saliency)
    data = make_training_data(model, cfg, None, None)
    batch = get_batch(model, data, cfg, None, torch.Generator().manual_seed(1))
    assert batch.xt.shape[0] == 7  # 2 forget + 2 retain + 1 empty-prompt + 2 cross rows
    target = x0_no_grad(model, data, batch.xt, batch.sigma, batch.teacher, 16)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads, values, calls = [], [], []
    real = distill_mod.row_losses

    def counting(*args):
        calls.append(args[3].xt.shape[0])
        return real(*args)
    monkeypatch.setattr(distill_mod, "row_losses", counting)
    for rows in (None, 2):
        if rows:
            monkeypatch.setattr(distill_mod, "student_rows", lambda device, batch_size: rows)
        with training_mode(model, cfg):
            adapters = attach(model.network, saliency.selected, 4, 4.0, 0.0, device=model.device)
            try:
                for a in adapters.adapters.values():  # a non-zero up so that every adapter has a gradient
                    torch.nn.init.normal_(a.up.weight, std=0.1, generator=torch.Generator().manual_seed(0))
                values.append(backward_rows(model, data, cfg, batch, target, scaler))
                grads.append([p.grad.clone() for p in adapters.parameters()])
            finally:
                adapters.remove()
    assert calls == [7, 2, 2, 2, 1]
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    for g_whole, g_chunked in zip(*grads):
        assert torch.allclose(g_whole, g_chunked, rtol=1e-3, atol=1e-5 * float(g_whole.abs().max()))
