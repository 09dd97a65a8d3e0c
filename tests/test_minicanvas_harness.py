"""MiniCanvas harness: the UnlearnCanvas metrics on hand-made inputs, the baselines' objectives on the tiny test
denoiser, and the harness end to end on a reduced setting (needs the shipped model and classifiers)."""
import json

import numpy as np
import pytest
import torch

from bench.minicanvas import baselines, metrics
from tiny_denoiser import TinyDiffusionModel


def test_erasure_metrics_by_hand():
    # 2 styles x 2 objects, one image each; erase style 0.
    style_true = torch.tensor([0, 0, 1, 1])
    object_true = torch.tensor([0, 1, 0, 1])
    style_pred = torch.tensor([1, 0, 1, 0])   # target images: 1 of 2 still style 0 -> UA 50; others: 1 of 2 right
    object_pred = torch.tensor([0, 1, 0, 0])  # non-target images (2, 3): 1 of 2 right -> CRA 50
    m = metrics.erasure_metrics("style", 0, style_true, object_true, style_pred, object_pred)
    assert m == {"UA": 50.0, "IRA": 50.0, "CRA": 50.0}
    m = metrics.erasure_metrics("object", 1, style_true, object_true, style_pred, object_pred)
    # target = images 1, 3: object preds 1, 0 -> UA 50; non-target 0, 2: objects right (IRA 100); styles 1/0 wrong
    # for image 0 (pred 1, true 0) and right for image 2 -> CRA 50
    assert m == {"UA": 50.0, "IRA": 100.0, "CRA": 50.0}
    assert metrics.unlearning_accuracy(torch.tensor([3, 3, 1, 2]), 3) == 50.0
    with pytest.raises(ValueError):
        metrics.erasure_metrics("colour", 0, style_true, object_true, style_pred, object_pred)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(a, a + 2.0) == pytest.approx(12.0, rel=1e-6)  # |mu diff|^2 = 3 * 4
    b = rng.normal(size=(4000, 3)) * 2.0  # same mean, variance x4: tr(S1 + S2 - 2 sqrt(S1 S2)) ~ 3 * (1 + 4 - 4)
    assert metrics.frechet_distance(a, b) == pytest.approx(3.0, rel=0.1)


@pytest.fixture(scope="module")
def tiny():
    return TinyDiffusionModel(seed=0)


def _gap(edited, original, a, b):
    """How far the edited model's prediction for prompt a is from the original model's for prompt b."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn((2, *original.latent_shape), generator=g)
    s = original.sigma_at(torch.tensor([0.5, 0.8]))
    xt = original.add_noise(x, torch.randn(x.shape, generator=g), s)
    with torch.no_grad():
        return float(((edited.predict_x0(xt, s, edited.encode([a] * 2))
                       - original.predict_x0(xt, s, original.encode([b] * 2))) ** 2).mean())


def test_baselines_edit_a_copy_and_move_toward_their_targets(tiny):
    before = {n: p.clone() for n, p in tiny.network.named_parameters()}
    ca = baselines.concept_ablation(tiny, ["a red cat"], ["a plain house"], steps=30, lr=1e-2, samples=1)
    assert _gap(ca.model, tiny, "a red cat", "a plain house") < 0.5 * _gap(tiny, tiny, "a red cat", "a plain house")
    uce = baselines.uce(tiny, ["a red cat"], ["a plain house"], ["a blue dog"], lam=0.1)
    assert uce.trainable_params > 0
    # UCE is the closed-form minimiser: the edited to_k/to_v map the concept's tokens close to the surrogate's
    ctx_c, ctx_s = tiny.encode(["a red cat"])[0], tiny.encode(["a plain house"])[0]
    for name, m in uce.model.network.named_modules():
        if name.endswith("attn2.to_k"):
            orig = dict(tiny.network.named_modules())[name]
            err_after = (m(ctx_c) - orig(ctx_s)).norm()
            err_before = (orig(ctx_c) - orig(ctx_s)).norm()
            assert err_after < 0.5 * err_before
    salun = baselines.salun(tiny, ["a red cat"], ["a plain house"], ["a blue dog"], steps=5, lr=1e-3, samples=1)
    assert 0 < salun.trainable_params < sum(p.numel() for p in tiny.network.parameters())
    esd = baselines.esd(tiny, ["a red cat"], variant="x", steps=3, lr=1e-3, ddim_steps=3)
    changed = [n for n, p in esd.model.network.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".attn2." in n for n in changed)
    for n, p in tiny.network.named_parameters():  # every baseline edits a copy
        assert torch.equal(p, before[n])


def test_harness_end_to_end_reduced(tmp_path):
    from bench.minicanvas import harness
    from bench.minicanvas.classifiers import CLASSIFIER_FILE
    from bench.minicanvas.model import MODEL_FILE
    if not (MODEL_FILE.exists() and CLASSIFIER_FILE.exists()):
        pytest.skip("MiniCanvas weights not shipped yet (python -m bench.minicanvas.train_model / train_classifiers)")
    out = tmp_path / "r.json"
    harness.main(["--methods", "spare,uce", "--concepts", "neon", "--seeds", "1", "--budget-scale", "0.01",
                  "--sample-steps", "3", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["meta"]) >= {"date", "machine", "command", "seeds"}
    for m in ("spare", "uce"):
        row = r["methods"][m]
        assert set(row["style"]) == {"UA", "IRA", "CRA", "synonym_UA"}
        assert all(0.0 <= row["style"][k] <= 100.0 for k in row["style"])
        for k in ("quality_fd", "seconds_per_concept", "peak_rss_mb", "trainable_params", "lora_bytes"):
            assert row[k] is not None and row[k] >= 0
    assert 0 <= r["base"]["style_acc"] <= 100 and 0 <= r["base"]["object_acc"] <= 100


def test_report_targets_marks_met_and_missed():
    from bench.minicanvas import report

    def m(ua, ira, cra, syn, secs):
        d = {"UA": ua, "IRA": ira, "CRA": cra, "synonym_UA": syn}
        return {"style": dict(d), "object": dict(d), "seconds_per_concept": secs}

    results = {"base": {"style": {"IRA": 98.0, "CRA": 98.0}, "object": {"IRA": 98.0, "CRA": 98.0}},
               "methods": {"spare": m(99.5, 97.5, 96.0, 96.0, 5.0), "esd-x": m(90.0, 95.0, 95.0, 80.0, 100.0),
                           "uce": m(99.9, 99.0, 99.0, 99.0, 0.1)}}
    text = report.targets(results)
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines()}
    assert lines["style UA >= 99"].endswith("| yes |")
    assert "NO (short by 1.00)" in lines["style CRA >= 97"]
    assert "NO (short by 0.50)" in lines["object CRA within 1.5 of the unerased model (98.00)"]
    assert "NO" in next(v for k, v in lines.items() if k.startswith("mean(UA, IRA, CRA) above every baseline"))
    assert next(v for k, v in lines.items() if k.startswith("time per concept <= 1/10 of esd-x")).endswith("| yes |")
