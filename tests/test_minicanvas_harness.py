"""MiniCanvas harness: the UnlearnCanvas metrics on hand-made inputs, the baselines' objectives on the tiny test
denoiser, and the harness end to end on a reduced setting (needs the shipped model and classifiers)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.minicanvas import baselines, budgets, metrics, report
import spare_core as sc
from tiny_denoiser import TinyDiffusionModel


def test_erasure_metrics_by_hand():
    # 2 styles x 2 objects, one image each; erase style 0.
    style_true = torch.tensor([0, 0, 1, 1])
    object_true = torch.tensor([0, 1, 0, 1])
    style_pred = torch.tensor([1, 0, 1, 0])   # target images: 1 of 2 still style 0 -> UA 50; others: 1 of 2 right
    object_pred = torch.tensor([0, 1, 0, 0])  # non-target images (2, 3): 1 of 2 right -> CRA 50
    m = metrics.erasure_metrics("style", 0, style_true, object_true, style_pred, object_pred)
    assert m == {"UA": 50.0, "IRA": 50.0, "CRA": 50.0, "SFA": 100.0}  # objects inside the erased row: both right
    m = metrics.erasure_metrics("object", 1, style_true, object_true, style_pred, object_pred)
    # target = images 1, 3: object preds 1, 0 -> UA 50; non-target 0, 2: objects right (IRA 100); styles 1/0 wrong
    # for image 0 (pred 1, true 0) and right for image 2 -> CRA 50
    assert m == {"UA": 50.0, "IRA": 100.0, "CRA": 50.0, "SFA": 50.0}  # styles of images 1, 3: 0 right, 1 wrong
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
    from spare_core.minicanvas.model import MODEL_FILE
    if not (MODEL_FILE.exists() and CLASSIFIER_FILE.exists()):
        pytest.skip("MiniCanvas weights not shipped yet (python -m bench.minicanvas.train_model / train_classifiers)")
    out = tmp_path / "r.json"
    harness.main(["--methods", "spare,uce", "--concepts", "neon", "--seeds", "1", "--train-seeds", "2",
                  "--budget-scale", "0.02", "--sample-steps", "3", "--jobs", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["meta"]) >= {"date", "machine", "command", "seeds", "train_seeds", "eval_templates"}
    assert r["meta"]["train_template"] not in r["meta"]["eval_templates"]
    for m in ("spare", "uce"):
        row = r["methods"][m]
        assert {"UA", "IRA", "CRA", "synonym_UA", "ci"} <= set(row["style"])
        for k in ("UA", "IRA", "CRA"):
            ci = row["style"]["ci"][k]
            assert ci["lo"] <= row["style"][k] <= ci["hi"]
        for k in ("quality_fd", "seconds_per_concept", "peak_rss_mb", "trainable_params", "lora_bytes"):
            assert row[k] is not None and row[k] >= 0
        # two training seeds really ran, and differ in what they trained
        runs = row["runs"]
        assert sorted(x["seed"] for x in runs) == [0, 1] and row["per_concept"]["neon"]["seeds"] == 2
    spare_runs = r["methods"]["spare"]["runs"]
    assert all(x["steps_used"] == 4 for x in spare_runs)  # 200 x 0.02: SPARE ran at its (scaled) cap
    assert spare_runs[0]["trainable_params"] > 0 and all(x["gap_closed"] > 0 for x in spare_runs)
    assert spare_runs[0]["gap_closed"] != spare_runs[1]["gap_closed"]  # the training seed changes the training
    # the grid's labels line up with its prompts: even at 3 sampler steps the unerased model is judged far above
    # chance (10%; measured 46 / 79 with these settings), which a shuffled or misaligned grid would not be
    assert r["base"]["style_acc"] > 30 and r["base"]["object_acc"] > 50, r["base"]
    text = report.table(r) + report.targets(r) + report.per_concept_table(r)
    assert "neon" in text and "[" in text
    # the half split: 4 listed and 5 unlisted styles, measured for the method and for the unerased model alike
    for x in spare_runs:
        assert {"IRA_unlisted", "CRA_unlisted", "IRA_listed", "base_IRA_unlisted", "mean4"} <= set(x)
    compact = report.compact_table(r).splitlines()
    assert compact[-1].startswith("| unerased model |") and len(compact) == 5  # head, rule, spare, uce, unerased


def test_evaluation_prompts_never_trained_on():
    from bench.minicanvas import harness
    from spare_core.minicanvas import data
    train = set()
    for name in harness.ERASABLE_STYLES + harness.ERASABLE_OBJECTS:
        domain = "style" if name in harness.ERASABLE_STYLES else "object"
        for seed in range(3):
            forget, surrogate, retain, short, short_surrogate = harness.concept_prompts(domain, name, seed)
            train |= set(forget) | set(surrogate) | set(retain) | {short, short_surrogate}
    evaluation, *_ = harness.grid(5)
    for name in harness.ERASABLE_STYLES + harness.ERASABLE_OBJECTS:
        domain = "style" if name in harness.ERASABLE_STYLES else "object"
        target = (data.style_index if domain == "style" else data.object_index)(name)
        syn = (data.STYLES if domain == "style" else data.OBJECTS)[target].synonyms[0]
        evaluation += harness.grid(2, domain, name, synonym=syn)[0]
    assert len(set(evaluation)) > 400
    assert not set(evaluation) & train
    # and every held-out template is used
    used = {t for t in harness.EVAL_TEMPLATES if any(p == data.prompt("neon", "ring", t) for p in evaluation)}
    assert used == set(harness.EVAL_TEMPLATES)


def test_bootstrap_interval():
    groups = [[1.0, 1.0], [3.0, 3.0]]
    mean, lo, hi = metrics.bootstrap_ci(groups)
    assert mean == 2.0 and lo == 1.0 and hi == 3.0  # concepts resampled: all-1, mixed, all-3
    mean, lo, hi = metrics.bootstrap_ci([[5.0, 5.0, 5.0]])
    assert (mean, lo, hi) == (5.0, 5.0, 5.0)
    mean, lo, hi = metrics.bootstrap_ci([[0.0, 10.0]])  # seeds resampled within a concept
    assert mean == 5.0 and lo == 0.0 and hi == 10.0
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([])


def test_paired_comparison_and_sign_test():
    from bench.minicanvas import paired
    assert paired.sign_test(17, 2) == pytest.approx(2 * (1 + 19 + 171) / 2 ** 19)  # exact binomial tail, doubled
    assert paired.sign_test(0, 0) == 1.0 and paired.sign_test(3, 3) == 1.0
    a = {(c, s): {"UA": 80.0, "IRA": 90.0} for c in ("ring", "cross") for s in range(3)}
    b = {k: {"UA": v["UA"] + (10.0 if k[0] == "ring" else 0.0), "IRA": v["IRA"] - 1.0} for k, v in a.items()}
    b.pop(("cross", 2))  # unpaired runs are left out
    out = paired.compare(a, b, ("UA", "IRA"))
    assert out["pairs"] == 5
    ua, ira = out["metrics"]["UA"], out["metrics"]["IRA"]
    assert (ua["up"], ua["down"], ua["tie"]) == (3, 0, 2) and ua["mean"] == pytest.approx(5.0)  # mean over concepts
    assert (ira["up"], ira["down"]) == (0, 5) and ira["mean"] == pytest.approx(-1.0) and ira["p"] < 0.07
    # runs are paired only on the same grid and the same unlisted classes (the growK lists share theirs)
    grid = {"seeds": 3, "sample_steps": 12}
    assert paired.incomparable(dict(grid, retain_set="grow3"), dict(grid, retain_set="grow3near")) is None
    assert "retain_set = half vs near" in paired.incomparable(dict(grid, retain_set="half"),
                                                              dict(grid, retain_set="near"))
    assert "seeds" in paired.incomparable(dict(grid, retain_set="grow3"), dict(grid, seeds=2, retain_set="grow3"))


def test_paired_across_lists_compares_the_drops(tmp_path, capsys):
    """`paired --across-lists`: runs of different retain sets pair on the erasure and on the drop of each run's own
    unlisted classes, and only those; without the flag they are refused, with a pointer to it."""
    from bench.minicanvas import paired
    runs = {}
    for name, retain_set, drop in (("a", "nearest", 20.0), ("b", "nearest-unpadded", 5.0)):
        rows = [{"concept": c, "seed": s, "domain": "object", "UA": 100.0, "IRA_unlisted": 90.0 - drop,
                 "IRA_unlisted_drop": drop} for c in ("ring", "cross") for s in range(2)]
        runs[name] = tmp_path / f"{name}.json"
        runs[name].write_text(json.dumps({"budget": {"seeds": 2, "sample_steps": 12, "retain_set": retain_set},
                                          "methods": {"spare": {"runs": rows}}}))
    with pytest.raises(SystemExit, match="--across-lists"):
        paired.main([f"{runs['a']}:spare", f"{runs['b']}:spare"])
    paired.main([f"{runs['a']}:spare", f"{runs['b']}:spare", "--across-lists"])
    out = capsys.readouterr().out
    assert "| IRA_unlisted_drop | -15.00 [-15.00, -15.00] | 0 / 4 / 0 |" in out and "IRA_unlisted |" not in out


def test_demo_verdict_follows_ua():
    from bench.minicanvas import demo
    base = {"UA": 0.0, "IRA": 100.0, "CRA": 95.0, "SFA": 95.0}
    not_erased = demo.verdict("style", "ukiyo", {"UA": 80.0, "IRA": 100.0, "CRA": 95.0, "SFA": 90.0}, base)
    assert not_erased.startswith("NOT erased") and "the object is still drawn (SFA 90)" in not_erased
    ok = demo.verdict("style", "ukiyo", {"UA": 100.0, "IRA": 99.0, "CRA": 94.0, "SFA": 90.0}, base)
    assert ok.startswith("erased") and "still drawn" in ok and ok.endswith("other concepts kept")
    hurt = demo.verdict("object", "ring", {"UA": 100.0, "IRA": 80.0, "CRA": 95.0, "SFA": 95.0}, base)
    assert hurt.startswith("erased") and "collateral damage" in hurt
    # a drop of exactly the line, as float32 shares of image counts store it, is on the line (not "lost")
    line = demo.verdict("style", "ukiyo", {"UA": 100.0, "IRA": 99.0, "CRA": 94.0, "SFA": 89.99999880790710},
                        dict(base, SFA=100.0))
    assert "still drawn in its place (SFA 90)" in line
    debris = demo.verdict("style", "ukiyo", {"UA": 100.0, "IRA": 99.0, "CRA": 94.0, "SFA": 20.0}, base)
    assert "the object is lost with it (SFA 20 vs 95" in debris
    # against the surrogate's own drawing ('plain' keeps the object in ~80% of its own row): a replacement that
    # draws what 'plain' draws is a replacement, not debris; below it by more than the line it is lost
    base100 = dict(base, SFA=100.0)
    swap = demo.verdict("style", "ukiyo", {"UA": 100.0, "IRA": 99.0, "CRA": 94.0, "SFA": 70.0}, base100, 80.0)
    assert "still drawn in its place, as 'plain' draws it (SFA 70 vs 80 in the unerased model's own 'plain' row, " \
        "100 in the concept's)" in swap
    lost = demo.verdict("style", "ukiyo", {"UA": 100.0, "IRA": 99.0, "CRA": 94.0, "SFA": 60.0}, base100, 80.0)
    assert "the object is lost with it (SFA 60 vs 80 in the unerased model's own 'plain' row" in lost
    # a surrogate drawn better than the concept's own row does not raise the bar above the unerased model's
    col = demo.verdict("object", "ring", {"UA": 100.0, "IRA": 99.0, "CRA": 94.0, "SFA": 86.0}, dict(base, SFA=96.0),
                       100.0)
    assert "as 'blob' draws it (SFA 86 vs 100 in the unerased model's own 'blob' column, 96 in the concept's)" in col
    # with a split, the verdict judges the unlisted classes: listed ones kept, unlisted ones hurt
    split_base = dict(base, IRA_unlisted=100.0, CRA_unlisted=96.0)
    unl = demo.verdict("style", "ukiyo", {"UA": 100.0, "IRA": 99.0, "CRA": 94.0, "SFA": 90.0, "IRA_unlisted": 88.0,
                                          "CRA_unlisted": 95.0}, split_base)
    assert "collateral damage on the concepts the retain list did not name: IRA 88.0 vs 100.0" in unl


def test_demo_surrogate_fidelity_reads_each_cell_against_its_own_label():
    """The surrogate row's cell k is object k (a style concept), the surrogate column's cell k style k (an object
    concept): a judge that names every cell right scores 100, one that shifts the labels by one scores 0, and the
    classifier of the other domain is the one read."""
    from bench.minicanvas import demo
    from bench.minicanvas.budgets import ERASABLE_OBJECTS, ERASABLE_STYLES
    from spare_core.minicanvas import data

    objects = torch.tensor([data.object_index(o) for o in ERASABLE_OBJECTS])
    styles = torch.tensor([data.style_index(s) for s in ERASABLE_STYLES])
    images = torch.zeros(len(objects), 3, 32, 32)

    def judge(pred_object, pred_style):
        return lambda _: {"object": pred_object, "style": pred_style}
    assert demo.surrogate_fidelity(judge(objects, objects.roll(1)), images, "style") == 100.0
    assert demo.surrogate_fidelity(judge(objects.roll(1), objects), images, "style") == 0.0
    assert demo.surrogate_fidelity(judge(styles.roll(1), styles), images[:len(styles)], "object") == 100.0
    assert demo.surrogate_fidelity(judge(styles, styles.roll(1)), images[:len(styles)], "object") == 0.0


def test_demo_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    from bench.minicanvas import demo
    for args, msg in ((["--steps", "-5"], "--steps -5"), (["--concept", "mauve"], "unknown concept"),
                      (["--out", str(tmp_path / "f")], "existing file"),
                      (["--retain", "all"], "invalid choice: 'all' (choose from 'half', 'nearest')")):
        (tmp_path / "f").write_text("x")
        with pytest.raises(SystemExit):
            demo.main(args + (["--out", str(tmp_path / "new")] if "--out" not in args else []))
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_profile_noise_refuses_bad_arguments_before_any_work(capsys):
    from bench import profile_noise
    for args, msg in ((["--concepts", "mauve"], "unknown ['mauve']"), (["--seeds", "1"], "--seeds 1")):
        with pytest.raises(SystemExit):
            profile_noise.main(args)
        assert msg in capsys.readouterr().err


def test_report_targets_marks_met_and_missed():
    from bench.minicanvas import report

    def m(ua, ira, cra, syn, secs, sfa=90.0, unlisted=95.0):
        d = {"UA": ua, "IRA": ira, "CRA": cra, "synonym_UA": syn, "SFA": sfa, "IRA_unlisted": unlisted,
             "CRA_unlisted": unlisted, "base_IRA_unlisted": 98.0, "base_CRA_unlisted": 98.0}
        return {"style": dict(d), "object": dict(d), "seconds_per_concept": secs,
                "mean4": {"mean": (ua + 2 * unlisted + sfa) / 4}}

    results = {"base": {"style": {"IRA": 98.0, "CRA": 98.0}, "object": {"IRA": 98.0, "CRA": 98.0}},
               "budget": {"esd": 200},
               "methods": {"spare": m(99.5, 97.5, 96.0, 96.0, 5.0), "esd-x": m(90.0, 95.0, 95.0, 80.0, 20.0),
                           "uce": m(99.9, 99.0, 99.0, 99.0, 0.1, sfa=80.0, unlisted=90.0)}}
    results["methods"]["spare"]["per_concept"] = {
        "neon": {"UA": 100.0, "IRA_unlisted_drop": 1.0, "CRA_unlisted_drop": 9.5}, "ring": {"UA": 93.0}}
    text = report.targets(results)
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines()}
    assert lines["mean UA >= 99"].endswith("| yes |")
    assert "NO (short by 2.00)" in lines["every concept UA >= 95 (mean over training seeds)"]
    assert "ring 93.0" in lines["every concept UA >= 95 (mean over training seeds)"]
    assert "NO (short by 0.50)" in lines["object CRA (every class) within 1.5 of the unerased model (98.00)"]
    assert lines["style IRA (every class) within 1.5 of the unerased model (98.00)"].endswith("| yes |")
    # with the listed / unlisted split, the 1.5-point line is graded on the listed classes only
    split = json.loads(json.dumps(results))
    sp = split["methods"]["spare"]
    for d, listed in (("style", 99.0), ("object", 97.0)):
        sp[d].update(IRA_listed=listed, CRA_listed=listed)
    sp["runs"] = [{"domain": d, "base_IRA_listed": 99.5, "base_CRA_listed": 99.5} for d in ("style", "object")]
    split_lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in report.targets(split).splitlines()}
    assert not any("every class" in k for k in split_lines)
    assert split_lines["style listed IRA within 1.5 of the unerased model (99.50)"].endswith("| yes |")
    assert "NO (short by 1.00)" in split_lines["object listed CRA within 1.5 of the unerased model (99.50)"]
    assert lines["style SFA >= 85 (object kept inside an erased style's row)"].endswith("| yes |")
    assert lines["style unlisted IRA within 3 of the unerased model (98.00)"].endswith("| yes |")  # 3.0 down
    worst = next(v for k, v in lines.items() if k.startswith("no concept's unlisted IRA / CRA"))
    assert "neon -9.5" in worst and "NO (1.5 over)" in worst
    # 19 of 20 images stored from float32 (94.9999988) is 95: met; a tenth of an image below is not
    import numpy as np
    for ua, met in ((float(np.float32(19 / 20)) * 100, True), (94.99, False)):
        results["methods"]["spare"]["per_concept"]["ring"]["UA"] = ua
        line = next(v for v in report.targets(results).splitlines() if "every concept UA >= 95" in v)
        assert line.endswith("| yes |") == met, (ua, line)
    # SPARE's mean(UA, unlisted IRA, unlisted CRA, SFA) 94.88 beats ESD-x's 92.50 and UCE's 89.98
    mean4 = next(v for k, v in lines.items() if k.startswith("mean(UA, unlisted IRA, unlisted CRA, SFA)"))
    assert "best: esd-x 92.50" in mean4 and mean4.endswith("| yes |")
    results["methods"]["uce"] = m(99.9, 99.0, 99.0, 99.0, 0.1, sfa=99.0, unlisted=98.0)
    mean4 = next(v for v in report.targets(results).splitlines() if "mean(UA, unlisted IRA" in v)
    assert "best: uce 98.72" in mean4 and "NO (short by 3.85)" in mean4
    # ESD ran 200 steps in 20 s: at the paper's 1000 steps that is 100 s, and SPARE's 5 s is 0.050x of it (a miss says
    # by how many percent)
    esd = next(v for k, v in lines.items() if k.startswith("time per concept <= 1/10 of esd-x"))
    assert "100.0 s" in esd and "(0.050x)" in esd and esd.endswith("| yes |")
    # SPARE and ESD from other runs (a merged file: load_results' "source"): other loads on the CPU, no ratio
    results["methods"]["spare"]["source"], results["methods"]["esd-x"]["source"] = "a.json", "b.json"
    esd = next(v for v in report.targets(results).splitlines() if "1/10 of esd-x" in v)
    assert "not compared" in esd and "a.json; b.json" in esd and "yes" not in esd and "NO" not in esd
    # ... unless a run of both together is given (--timing): its ratio, named as that run's; a timing run with only
    # one of them, or with each from another run, gives none
    timing = {"budget": {"esd": 100}, "methods": {
        "spare": dict(m(99.0, 97.0, 96.0, 96.0, 30.0), source="t.json",
                      runs=[{"concept": "ukiyo"}, {"concept": "ring"}, {"concept": "ring"}]),
        "esd-x": dict(m(90.0, 95.0, 95.0, 80.0, 25.0), source="t.json")}}
    esd = next(v for v in report.targets(results, timing).splitlines() if "1/10 of esd-x" in v)
    assert "250.0 s, from 100 steps; both measured in one run, t.json: 2 concepts" in esd
    assert "30.0 s (0.120x)" in esd and esd.endswith("| NO (20% over) |")
    timing["methods"]["esd-x"]["source"] = "u.json"
    assert "not compared" in next(v for v in report.targets(results, timing).splitlines() if "1/10 of esd-x" in v)
    del timing["methods"]["esd-x"]
    assert "not compared" in next(v for v in report.targets(results, timing).splitlines() if "1/10 of esd-x" in v)


def test_spare_variants_are_named_by_their_fields(capsys):
    from bench.minicanvas import harness
    assert harness.split_variant("spare") == ("spare", ())
    assert harness.split_variant("spare+surrogate_anchor=1+rank=4") == ("spare", (("surrogate_anchor", 1.0),
                                                                                  ("rank", 4)))
    assert isinstance(harness.split_variant("spare+surrogate_anchor=1")[1][0][1], float)  # typed as the field
    assert harness.split_variant("spare+text_encoder=off") == ("spare", (("text_encoder", "off"),))  # a text field
    for bad, msg in (("spare+colour=1", "colour"), ("uce+rank=4", "only spare"), ("spare+rank", "FIELD=VALUE")):
        with pytest.raises(ValueError, match=msg):
            harness.split_variant(bad)
    with pytest.raises(SystemExit):
        harness.main(["--methods", "spare+colour=1", "--out", "unused.json"])
    assert "colour" in capsys.readouterr().err


def test_split_retention_by_hand():
    # 3 styles x 1 object, two images each; styles 1 and 2 are "unlisted"
    style_true = torch.tensor([0, 0, 1, 1, 2, 2])
    object_true = torch.zeros(6, dtype=torch.long)
    style_pred = torch.tensor([0, 0, 1, 0, 2, 2])   # style 1: one of two right
    object_pred = torch.tensor([0, 0, 0, 0, 1, 0])  # style 2's images: one object of two right
    assert metrics.split_retention("style", [1, 2], style_true, object_true, style_pred, object_pred) == \
        {"IRA": 75.0, "CRA": 75.0}
    assert metrics.split_retention("style", [0], style_true, object_true, style_pred, object_pred) == \
        {"IRA": 100.0, "CRA": 100.0}
    with pytest.raises(ValueError, match="no image"):
        metrics.split_retention("style", [5], style_true, object_true, style_pred, object_pred)


def test_retain_lists_never_name_an_unlisted_class():
    from bench.minicanvas import harness
    from spare_core.minicanvas import data
    for name in ("ukiyo", "ring"):
        domain = "style" if name in harness.ERASABLE_STYLES else "object"
        own = harness.ERASABLE_STYLES if domain == "style" else harness.ERASABLE_OBJECTS
        splits = set()
        for seed in range(3):
            for retain_set, n_listed in (("half", 4), ("few", harness.FEW_LISTED), ("near", 4), ("near-token", 4),
                                     ("nearest", 4), ("nearest-unpadded", 4)):
                split = harness.retention_split(domain, name, seed, retain_set)
                assert len(split["listed"]) == n_listed and len(split["unlisted"]) == 9 - n_listed
                unlisted = {(data.STYLE_NAMES if domain == "style" else data.OBJECT_NAMES)[i]
                            for i in split["unlisted"]}
                forget, surrogate, retain, short, short_surrogate = harness.concept_prompts(domain, name, seed,
                                                                                            retain_set)
                seen = forget + surrogate + retain + [short, short_surrogate]
                words = {w for p in seen for w in data.tokenize_words(p)}
                assert not unlisted & words, (name, retain_set, unlisted & words)
                assert retain and name not in {w for p in retain for w in data.tokenize_words(p)}
                if retain_set == "half":
                    splits.add(tuple(split["listed"]))
                if retain_set == "nearest":  # the product's ranking of every other class
                    names = data.STYLE_NAMES if domain == "style" else data.OBJECT_NAMES
                    assert {names[i] for i in split["listed"]} == set(budgets.ranked_candidates(
                        domain, name, tuple(c for c in own if c != name))[:4])
                if retain_set == "nearest-unpadded":
                    names = data.STYLE_NAMES if domain == "style" else data.OBJECT_NAMES
                    assert {names[i] for i in split["listed"]} == set(budgets.ranked_candidates(
                        domain, name, tuple(c for c in own if c != name), unpadded=True)[:4])
            all_split = harness.retention_split(domain, name, seed, "all-pairs")
            assert all_split["unlisted"] == [] and len(all_split["listed"]) == 9
        assert len(splits) > 1  # the split changes with the training seed
        # growK (experiment): the same unlisted classes whatever K; K listed, none of them unlisted or named twice
        grows = [harness.retention_split(domain, name, 0, f"grow{k}") for k in (1, 3, 6)]
        assert grows[0]["unlisted"] == grows[1]["unlisted"] == grows[2]["unlisted"]
        assert [len(g["listed"]) for g in grows] == [1, 3, 6] and set(grows[0]["listed"]) < set(grows[2]["listed"])
        assert not set(grows[2]["listed"]) & set(grows[2]["unlisted"])
        # grow3near: grow3's unlisted classes; its 3 listed are the 3 of grow6's candidates that the product's ranking
        # (spare_core.neighbours, SPARE Nearest Concepts) puts first
        for seed in range(2):
            near = harness.retention_split(domain, name, seed, "grow3near")
            six = harness.retention_split(domain, name, seed, "grow6")
            assert near["unlisted"] == harness.retention_split(domain, name, seed, "grow3")["unlisted"]
            assert len(near["listed"]) == 3 and set(near["listed"]) < set(six["listed"])
            names = data.STYLE_NAMES if domain == "style" else data.OBJECT_NAMES
            candidates = tuple(names[i] for i in six["listed"])
            ranked = budgets.ranked_candidates(domain, name, candidates)
            assert {names[i] for i in near["listed"]} == set(ranked[:3]) and sorted(ranked) == sorted(candidates)
            # grow3near-unpadded: the same with the node's code since 2026-12-06 (each prompt's own positions)
            own = harness.retention_split(domain, name, seed, "grow3near-unpadded")
            assert own["unlisted"] == near["unlisted"]
            assert {names[i] for i in own["listed"]} == set(
                budgets.ranked_candidates(domain, name, candidates, unpadded=True)[:3])


def test_near_lists_the_classes_nearest_in_the_pooled_code_for_every_seed():
    """"near": the 4 other classes nearest to the concept in the pooled text code, whatever the training seed
    ("near-token": in the word's own token state); the first of each is the nearest class `diagnose words` finds (its
    own ranking over the same `budgets.class_codes`)."""
    from bench.minicanvas.diagnose import words
    from spare_core.minicanvas.model import load
    for row in words(load()):
        domain, name = row["domain"], row["class"]
        order = budgets.nearest_order(domain, name)
        assert order[0] == row["pooled_nearest"][0] and len(order) == 9 and name not in order
        near = budgets.listed_classes(domain, name, 0, "near")
        assert set(near) == set(order[:4]) and near == budgets.listed_classes(domain, name, 2, "near")
        token = budgets.nearest_order(domain, name, "token")  # "near-token": by the word's own token state
        assert token[0] == row["word_nearest"][0] and sorted(token) == sorted(order)
        assert set(budgets.listed_classes(domain, name, 1, "near-token")) == set(token[:4])


def test_uce_edits_only_the_unet_spatial_cross_attention():
    from spare_core.minicanvas.model import MODEL_FILE, load
    if not MODEL_FILE.exists():
        pytest.skip("MiniCanvas weights not shipped")
    model = load()
    args = (model, ["A circle image in neon style."], ["A circle image in plain style."],
            ["A square image in lava style."])
    before = {n: p.clone() for n, p in model.network.named_parameters()}
    for include_pool in (False, True):
        edited = baselines.uce(*args, include_pool=include_pool).model.network
        changed = {n for n, p in edited.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all(n.endswith(("to_k.weight", "to_v.weight")) for n in changed)
        assert all(baselines.is_unet_cross_attention(n) for n in changed if not n.startswith("text_pool."))
        assert any(n.startswith("text_pool.") for n in changed) == include_pool


def test_report_plot_draws_one_labelled_group_per_method(tmp_path):
    from PIL import Image
    from bench.minicanvas import report
    row = {"UA": 100.0, "SFA": 50.0, "IRA_unlisted": 80.0, "CRA_unlisted": 90.0, "IRA_listed": 99.0,
           "base_IRA_unlisted": 100.0, "base_CRA_unlisted": 96.0}
    results = {"base": {"style": {"SFA": 95.0}}, "methods": {
        "spare": {"style": dict(row), "object": dict(row, SFA=100.0)}, "uce": {"style": dict(row, UA=0.0)}}}
    assert report.bar_values(results["methods"]["spare"])["SFA"] == 50.0  # styles only: objects keep their style
    assert report.bar_ceiling(results, results["methods"]["spare"], "CRA_unlisted") == 96.0
    assert report.bar_ceiling(results, results["methods"]["spare"], "UA") is None
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    report.plot({**results, "methods": {"spare": results["methods"]["spare"]}}, None, str(one))
    report.plot(results, None, str(two))
    h1, h2 = Image.open(one).size[1], Image.open(two).size[1]
    assert h2 - h1 == len(report.PLOT_BARS) * 12 + 18  # one more bar group


def test_demo_picture_has_the_surrogate_reference():
    """demo.py's picture: the surrogate prompts are the erased row's / column's grid prompts with the neutral concept
    (same templates, same seeds), and the picture grows by a SURROGATE row (style) or column (object)."""
    import torch

    from bench.minicanvas import demo, harness

    prompts, _, _, seeds = harness.grid(1)
    n_o, n_s = len(harness.ERASABLE_OBJECTS), len(harness.ERASABLE_STYLES)
    ti = harness.ERASABLE_STYLES.index("ukiyo")
    sp, ss = demo.surrogate_prompts("style", ti)
    assert len(sp) == n_o and ss == seeds[ti * n_o:(ti + 1) * n_o]
    assert all(p == q.replace("ukiyo", "plain") for p, q in zip(sp, prompts[ti * n_o:(ti + 1) * n_o]))
    oi = harness.ERASABLE_OBJECTS.index("ring")
    sp, ss = demo.surrogate_prompts("object", oi)
    assert len(sp) == n_s and ss == seeds[oi::n_o]
    assert all(p == q.replace("ring", "blob") for p, q in zip(sp, prompts[oi::n_o]))
    grid = torch.rand(n_s * n_o, 3, 32, 32)
    plain = demo.labelled_grid(grid, grid, "style", ti, "t")
    row = demo.labelled_grid(grid, grid, "style", ti, "t", torch.rand(n_o, 3, 32, 32))
    col = demo.labelled_grid(grid, grid, "object", oi, "t", torch.rand(n_s, 3, 32, 32))
    assert row.width == plain.width and row.height > plain.height + 64
    assert col.width > plain.width + 64


def test_spare_variants_reach_the_stages(monkeypatch):
    """The named SPARE rows (budgets.SPARE_VARIANTS) are SPARE with their settings: what run_method hands the product
    pipeline (spare_core.erase: the distill and profile configs), read from a stand-in for it (nothing trains). Budget.spare_overrides win
    over a variant's, as before the variants were named."""
    import spare_core as sc
    from dataclasses import replace

    from bench.minicanvas import budgets, methods

    seen = {}

    class Stop(Exception):
        pass

    def erase(model, cfg, scan_cfg, profile_cfg, saliency=None, on_check=None):
        seen.update(cfg=cfg, profile=profile_cfg)
        raise Stop

    monkeypatch.setattr(sc, "erase", erase)

    def stages(method, budget=budgets.Budget()):
        seen.clear()
        with pytest.raises(Stop):
            methods.run_method(method, None, "style", "ukiyo", budget, seed=1)
        return seen["cfg"], seen["profile"]

    assert set(budgets.SPARE_VARIANTS) <= set(budgets.METHODS)
    base, base_profile = stages("spare")
    assert base.steps == budgets.Budget.spare and base_profile == sc.ProfileConfig()
    assert base.retain == budgets.concept_prompts("style", "ukiyo", 1)[2]
    cfg, _ = stages("spare-rank4")
    assert (cfg.rank, cfg.alpha) == (4, 4.0) and replace(cfg, rank=base.rank, alpha=base.alpha) == base
    cfg, _ = stages("spare-no-anchor")
    assert cfg.surrogate_anchor == 0.0 and replace(cfg, surrogate_anchor=base.surrogate_anchor) == base
    cfg, _ = stages("spare-anchor2")
    assert cfg.anchor_samples == base.samples // 2 and replace(cfg, anchor_samples=0) == base
    cfg, profile = stages("spare-floor05")
    assert profile.uniform_floor == 0.5 and cfg == base
    cfg, _ = stages("spare-steps160")
    assert cfg.steps == round(0.8 * budgets.Budget.spare) and replace(cfg, steps=base.steps) == base
    cfg, _ = stages("spare-all-pairs")
    assert cfg.retain == budgets.all_pairs("style", "ukiyo") and replace(cfg, retain=base.retain) == base
    cfg, _ = stages("spare-rank4", budgets.Budget(spare_overrides=(("rank", 8),)))
    assert (cfg.rank, cfg.alpha) == (8, 4.0)  # the budget's override wins over the variant's
    cfg, _ = stages("spare+rank=2")
    assert cfg.rank == 2


def test_strength_variant_judges_the_same_lora_scaled(monkeypatch):
    """spare-strength08 / 09: SPARE trained exactly as `spare` (same configs), its LoRA judged at Apply Erasure strength
    0.8 / 0.9 (the up weights scaled, the file's other parts unchanged); `spare` judges the LoRA as trained;
    spare-unet08 scales the network's modules only."""
    import spare_core as sc
    from types import SimpleNamespace

    from bench.minicanvas import budgets, methods

    lora = sc.LoraWeights({"m": {"down": torch.ones(2, 3), "up": torch.full((4, 2), 0.5),
                                 "alpha": torch.tensor(2.0)}}, {})
    seen = []

    def erase(model, cfg, scan_cfg, profile_cfg, saliency=None, on_check=None):
        seen.append((cfg, scan_cfg, profile_cfg))
        result = SimpleNamespace(trainable_params=1, lora=lora, losses=[], steps_used=1, gap_closed=1.0,
                                 checks=[{}], strength=1.0, warning=None)
        return SimpleNamespace(result=result)

    monkeypatch.setattr(sc, "erase", erase)
    (kind, plain), info = methods.run_method("spare", None, "object", "ring", budgets.Budget(), seed=2)
    (_, scaled), info08 = methods.run_method("spare-strength08", None, "object", "ring", budgets.Budget(), seed=2)
    assert seen[0] == seen[1]  # trained the same way
    assert kind == "lora" and plain is lora and info["strength"] == 1.0
    assert torch.equal(scaled.modules["m"]["up"], 0.8 * lora.modules["m"]["up"]) and info08["strength"] == 0.8
    assert torch.equal(scaled.modules["m"]["down"], lora.modules["m"]["down"])
    (_, scaled09), _ = methods.run_method("spare-strength09", None, "object", "ring", budgets.Budget(), seed=2)
    assert torch.equal(scaled09.modules["m"]["up"], 0.9 * lora.modules["m"]["up"]) and seen[2] == seen[0]
    # spare-unet08: trained as spare but saved at model_strength 1 (the default saves the UNet part at 0.9), judged
    # with the network's part at 0.8, the text encoder's as trained (LoraLoader's strength_model / _clip)
    lora.modules["text_encoders.t"] = {k: v.clone() for k, v in lora.modules["m"].items()}
    (_, part), info_u = methods.run_method("spare-unet08", None, "object", "ring", budgets.Budget(), seed=2)
    at_one = (replace(seen[0][0], model_strength=1.0),) + seen[0][1:]
    assert seen[3] == at_one and seen[0][0].model_strength == -1 and info_u["strength"] == 1.0
    assert torch.equal(part.modules["m"]["up"], 0.8 * lora.modules["m"]["up"])
    assert torch.equal(part.modules["text_encoders.t"]["up"], lora.modules["text_encoders.t"]["up"])
    (_, both), _ = methods.run_method("spare-unet08-te12", None, "object", "ring", budgets.Budget(), seed=2)
    assert seen[4] == at_one and torch.equal(both.modules["m"]["up"], 0.8 * lora.modules["m"]["up"])
    assert torch.equal(both.modules["text_encoders.t"]["up"], 1.2 * lora.modules["text_encoders.t"]["up"])
    assert torch.equal(both.modules["text_encoders.t"]["down"], lora.modules["text_encoders.t"]["down"])


def test_report_merges_runs_of_one_grid_only(tmp_path):
    """`report --results a.json,b.json`: the methods of both runs (SPARE's training seeds in one, the baselines in
    another), the first run's base, both commands; a run whose unerased model scored differently is refused."""
    from bench.minicanvas import report
    base = {"style_acc": 100.0, "object_acc": 100.0}
    a = {"base": base, "methods": {"spare": {"x": 1}}, "meta": {"command": "a", "wall_seconds": 10, "model": "flux"}}
    b = {"base": base, "methods": {"uce": {"x": 2}, "spare": {"x": 3}}, "budget": {"esd": 200},
         "meta": {"command": "b", "wall_seconds": 5, "model": "flux"}}
    c = {"base": {"style_acc": 90.0, "object_acc": 100.0}, "methods": {}, "meta": {"command": "c", "model": "flux"}}
    for name, r in (("a", a), ("b", b), ("c", c)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    merged = report.load_results(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}")
    assert {k: v["x"] for k, v in merged["methods"].items()} == {"spare": 1, "uce": 2}
    assert merged["methods"]["uce"]["budget"] == {"esd": 200}  # each method keeps its own run's budget
    assert merged["meta"]["wall_seconds"] == 15 and "a" in merged["meta"]["command"] and "b" in merged["meta"]["command"]
    with pytest.raises(ValueError, match="another model, grid or sampler"):
        report.load_results(f"{tmp_path / 'a.json'},{tmp_path / 'c.json'}")


def test_report_pools_a_method_run_at_other_training_seeds(tmp_path):
    """A method run at training seed 0 in one file and at seeds 1-2 in another (`--first-train-seed 1 --train-seeds
    2`) merges into the row a 3-seed run summarises; runs of other budgets or overlapping seeds are refused."""
    from dataclasses import replace
    from bench.minicanvas import report
    from bench.minicanvas.budgets import Budget
    from bench.minicanvas.summary import summarize
    rng = np.random.default_rng(0)
    base_per = {c: {"IRA": 100.0, "CRA": 96.0, "SFA": 95.0, "domain": d}
                for c, d in (("ukiyo", "style"), ("neon", "style"), ("ring", "object"))}

    def run(concept, seed):
        m = {k: float(rng.integers(50, 101)) for k in ("UA", "IRA", "CRA", "SFA", "synonym_UA", "IRA_unlisted",
                                                       "CRA_unlisted", "base_IRA_unlisted", "base_CRA_unlisted")}
        return dict(m, concept=concept, seed=seed, domain=base_per[concept]["domain"], seconds=float(seed + 1),
                    peak_rss_mb=1.0, trainable_params=4, lora_bytes=8, quality_fd=None)
    runs = {s: [run(c, s) for c in base_per] for s in range(3)}
    acc = {"style_acc": 100.0, "object_acc": 95.0}

    def results(seeds, budget):
        out = summarize({"spare": [dict(r) for s in seeds for r in runs[s]]}, acc, base_per, budget)
        return dict(out, meta={"command": f"seeds {seeds}", "wall_seconds": 1})
    one = results([0], Budget())
    (tmp_path / "a.json").write_text(json.dumps(one))
    later = results([1, 2], Budget(train_seeds=2, first_train_seed=1))
    del later["budget"]["eval_guidance"]  # a file from before the field: it ran at the field's default
    (tmp_path / "b.json").write_text(json.dumps(later))
    pooled = report.load_results(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}")["methods"]["spare"]
    whole = results([0, 1, 2], Budget(train_seeds=3))["methods"]["spare"]
    assert pooled["seeds"] == 3 and pooled["budget"]["train_seeds"] == 3 and len(pooled["runs"]) == 9
    assert pooled["source"] == f"{tmp_path / 'a.json'} + {tmp_path / 'b.json'}"  # two runs: no time ratio with it
    for key in ("mean4", "mean3", "IRA_unlisted_drop", "style", "object", "per_concept", "seconds_per_concept"):
        assert pooled[key] == whole[key], key
    (tmp_path / "c.json").write_text(json.dumps(results([0, 1], Budget(train_seeds=2))))  # seed 0 twice
    with pytest.raises(ValueError, match="same .concept, training seed. pairs"):
        report.load_results(f"{tmp_path / 'a.json'},{tmp_path / 'c.json'}")
    (tmp_path / "d.json").write_text(json.dumps(results([1], replace(Budget(), spare=100, first_train_seed=1))))
    with pytest.raises(ValueError, match="other budgets .spare."):
        report.load_results(f"{tmp_path / 'a.json'},{tmp_path / 'd.json'}")
    # the same runs twice, or a later file with some of the same runs only: the first file wins
    assert report.load_results(f"{tmp_path / 'a.json'},{tmp_path / 'a.json'}")["methods"]["spare"]["runs"] == \
        one["methods"]["spare"]["runs"]
    report.main(["--results", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--write-merged",
                 str(tmp_path / "ab.json")])
    written = json.loads((tmp_path / "ab.json").read_text())
    assert written["methods"]["spare"]["mean4"] == whole["mean4"] and "--write-merged" in written["meta"]["note"]
    again = report.load_results(f"{tmp_path / 'ab.json'},{tmp_path / 'a.json'}")["methods"]["spare"]
    assert len(again["runs"]) == 9 and again["source"] == written["methods"]["spare"]["source"]


def test_residual_diagnosis_of_a_model_that_erased_nothing():
    """`diagnose residual` with an empty LoRA (the erased model IS the unerased one): the conditional residual is
    the whole concept-surrogate gap, all of it toward the concept (along 1, orth 0), the empty prompt has not drifted,
    and the path ends in the concept itself."""
    from bench.minicanvas import diagnose
    from bench.minicanvas.judge import Judge
    from spare_core.minicanvas.model import load
    rows = diagnose.residual(load(), Judge(), "style", "ukiyo", sc.LoraWeights({}), steps=4)
    assert len(rows) == 4
    for r in rows:
        assert r["along"] == pytest.approx(1.0, abs=1e-4) and r["orth"] < 1e-3 and r["uncond"] == 0.0
        assert r["signal"] > 0
    assert rows[-1]["class"] == "ukiyo"


def test_ceiling_draws_each_erased_row_with_the_surrogate_word(monkeypatch):
    """`diagnose ceiling`: every concept's row / column of the held-out grid, the concept's word (and only it)
    replaced by the surrogate's, at the grid's own seeds; SFA / UA judged as the harness judges them (a fake judge
    that calls every image the neutral classes: UA 100, SFA 0)."""
    from bench.minicanvas import diagnose
    from bench.minicanvas.budgets import ERASABLE_OBJECTS, ERASABLE_STYLES
    from bench.minicanvas.judge import grid
    from spare_core.minicanvas import data
    assert diagnose._replace_word("A ring image in sketch style.", "ring", "blob") == "A blob image in sketch style."
    assert diagnose._replace_word("ring, sketch style", "ring", "blob") == "blob, sketch style"
    assert diagnose._replace_word("A Sketch style painting of a star.", "sketch", "plain") == \
        "A plain style painting of a star."
    with pytest.raises(ValueError, match="names 'cross' 0 times"):
        diagnose._replace_word("A ring image in sketch style.", "cross", "blob")
    asked = []

    def fake_generate(model, prompts, seeds, steps):
        asked.extend(zip(prompts, seeds))
        return torch.zeros(len(prompts), 3, 4, 4)

    def judge(images):
        n = images.shape[0]
        return {"style": torch.full((n,), data.style_index(data.NEUTRAL_STYLE)),
                "object": torch.full((n,), data.object_index(data.NEUTRAL_OBJECT))}
    monkeypatch.setattr(diagnose, "generate", fake_generate)
    rows = diagnose.ceiling(None, judge, 1, steps=2)
    assert [r["concept"] for r in rows] == list(ERASABLE_STYLES) + list(ERASABLE_OBJECTS)
    assert all(r["UA"] == 100.0 and r["SFA"] == 0.0 and r["images"] == 10 for r in rows)
    prompts, _, _, seeds = grid(1)
    ukiyo = [(p, sd) for p, sd in zip(prompts, seeds) if "ukiyo" in p]
    assert asked[:10] == [(p.replace("ukiyo", data.NEUTRAL_STYLE), sd) for p, sd in ukiyo]
    assert len(asked) == 200  # 10 styles' rows (plain) then 10 objects' columns (blob), 10 images each
    assert all(data.NEUTRAL_STYLE in p for p, _ in asked[:100])
    assert all(data.NEUTRAL_OBJECT in p for p, _ in asked[100:])


def test_residual_and_trajectory_diagnoses_see_a_lora_text_encoder_half():
    """A LoRA that edits only the text encoder changes what the erased model's prompts encode to: `diagnose residual`
    and `trajectory` must encode the erased run's prompts with it applied (they once encoded before applying it, and
    measured only a LoRA's UNet half)."""
    from bench.minicanvas import diagnose
    from bench.minicanvas.judge import Judge
    from spare_core.minicanvas.model import load
    from spare_core.model import text_key_prefix
    model = load()
    fc = model.text_encoder.layers[0].mlp[2]  # a Linear of the text encoder's first layer
    gen = torch.Generator().manual_seed(0)
    text_only = sc.LoraWeights({text_key_prefix(model) + "layers.0.mlp.2": {
        "down": torch.randn(4, fc.in_features, generator=gen), "up": torch.randn(fc.out_features, 4, generator=gen),
        "alpha": torch.tensor(4.0)}})
    rows = diagnose.residual(model, Judge(), "style", "ukiyo", text_only, steps=2)
    assert rows[0]["uncond"] > 0 and rows[0]["along"] != pytest.approx(1.0, abs=1e-4)
    path = diagnose.trajectory(model, Judge(), "style", "ukiyo", text_only, steps=2)
    plain = diagnose.trajectory(model, Judge(), "style", "ukiyo", sc.LoraWeights({}), steps=2)
    assert path[0]["path"] != plain[0]["path"]  # the erased run: the text-side edit changes the path
    assert path[1:] == plain[1:]  # the unerased runs do not see the LoRA


def test_geometry_diagnosis_measures_span_and_moves():
    """`diagnose geometry`: `_outside` is 0 for a vector in the span and 1 for one orthogonal to it; on the bundled
    UNet the 10 styles' pooled codes use 5 directions (the 6th singular value is < 1% of the first: why any 4
    listed styles and the concept fix the pooled code of every other one), and a LoRA that changes nothing moves
    no code (the move is reported as 0, not a division by zero)."""
    from bench.minicanvas import diagnose
    from bench.minicanvas.budgets import ERASABLE_STYLES
    from spare_core.minicanvas import data
    from spare_core.minicanvas.model import load
    basis = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert diagnose._outside(torch.tensor([2.0, -3.0, 0.0]), basis) == pytest.approx(0.0, abs=1e-6)
    assert diagnose._outside(torch.tensor([0.0, 0.0, 5.0]), basis) == pytest.approx(1.0)
    model = load()
    pooled, kv = diagnose._codes(model, "style", ERASABLE_STYLES + [data.NEUTRAL_STYLE])
    assert pooled.shape[0] == kv.shape[0] == len(ERASABLE_STYLES) + 1
    sv = torch.linalg.svdvals(pooled[:-1] - pooled[-1])
    assert sv[5] < 0.01 * sv[0] and sv[4] > 0.05 * sv[0]
    with sc.apply_lora(model.network, sc.LoraWeights({}), 1.0):
        again = diagnose._codes(model, "style", ERASABLE_STYLES + [data.NEUTRAL_STYLE])
    assert torch.equal(again[0], pooled) and torch.equal(again[1], kv)


def test_text_encoder_experiment_trains_only_the_text_encoder():
    """spare-te (experiment): SPARE's distillation with its adapters on the text encoder's Linears; the LoRA names
    only text-encoder modules, the UNet's and the text encoder's weights are untouched after the run, and applying the
    LoRA changes the concept's conditioning (and so the picture) through the wrapped model."""
    from dataclasses import replace
    from bench.minicanvas.budgets import Budget
    from bench.minicanvas.methods import TEXT_ENCODER_LINEARS, run_method, sample_edited, text_side
    from spare_core.minicanvas.model import load
    model = load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = replace(Budget(), spare=4)
    (kind, lora), info = run_method("spare-te", model, "style", "neon", budget, seed=0)
    assert kind == "te-lora" and set(lora.modules) == set(TEXT_ENCODER_LINEARS["spare-te"])
    assert info["steps_used"] == 4 and info["gap_closed"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    wrapped = text_side(model)
    tokens = wrapped.encode(["A circle image in neon style."])
    with sc.apply_lora(wrapped.network, lora, 1.0):
        erased = wrapped.network.text_encoder(tokens)
    assert not torch.allclose(erased, model.encode(["A circle image in neon style."]))
    images = sample_edited(model, (kind, lora), ["A circle image in neon style."], [0], 2)
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def test_words_diagnosis_separates_synonyms_from_neighbours_in_the_token_state():
    """`diagnose words` on the bundled UNet: a row per erasable class with its synonym; in the word's token state
    every style's synonym is closer than its nearest other style (the separation a token-level edit could use), and
    the pooled code cannot tell the styles' synonyms apart from the styles themselves (cosine ~1)."""
    from bench.minicanvas import diagnose
    from bench.minicanvas.budgets import ERASABLE_OBJECTS, ERASABLE_STYLES
    from spare_core.minicanvas.model import load
    rows = diagnose.words(load())
    assert [r["class"] for r in rows] == list(ERASABLE_STYLES) + list(ERASABLE_OBJECTS)
    for r in rows:
        assert r["word_nearest"][0] != r["class"] and -1.0 <= r["word_nearest"][1] <= 1.0
    styles = [r for r in rows if r["domain"] == "style"]
    assert all(r["word_synonym"] > r["word_nearest"][1] + 0.1 for r in styles)
    assert all(r["pooled_synonym"] > 0.99 for r in styles)


def test_standard_presets_train_each_method_at_its_seeds():
    """--standard: SPARE at every training seed; the step-trained baselines and the all-pairs reference row at one;
    UCE at every seed on the UNet and at one on MiniCanvas-Flux (whose --standard drops the reference row and the
    spare-text-in experiment, for the 90-minute budget)."""
    from dataclasses import replace
    from bench.minicanvas.budgets import (MODEL_METHODS, STANDARD_BASELINE_SEEDS, STANDARD_CLOSED_FORM_SEEDS,
                                          Budget)
    from bench.minicanvas.dispatch import methods_for_seed
    assert "spare-all-pairs" in MODEL_METHODS["unet"]["standard"]
    assert "spare-all-pairs" not in MODEL_METHODS["flux"]["standard"]
    flux_standard = MODEL_METHODS["flux"]["standard"]
    assert "eraseanything" in flux_standard and "spare-text-in" not in flux_standard
    for model, uce_seeds in (("unet", 3), ("flux", 1)):
        methods = MODEL_METHODS[model]["standard"]
        budget = replace(Budget(model=model), train_seeds=3, baseline_seeds=STANDARD_BASELINE_SEEDS,
                         closed_form_seeds=STANDARD_CLOSED_FORM_SEEDS[model])
        runs = {m: sum(m in methods_for_seed(methods, s, budget) for s in range(3)) for m in methods}
        assert runs["spare"] == 3 and runs["uce"] == runs["uce-pool"] == uce_seeds
        assert all(runs[m] == 1 for m in ("salun", "ca", "esd-x"))
        assert runs.get("spare-all-pairs", 1) == 1
    assert methods_for_seed(["spare", "uce", "ca"], 2, Budget(train_seeds=3)) == ["spare", "uce", "ca"]  # 0 = all
    # --first-train-seed 1 --train-seeds 2 --baseline-seeds 1: seeds 1 and 2, the baselines at the first of them
    later = Budget(train_seeds=2, first_train_seed=1, baseline_seeds=1)
    assert [methods_for_seed(["spare", "ca"], s, later) for s in range(4)] == [[], ["spare", "ca"], ["spare"], []]


def test_module_groups_and_the_selection_experiments(monkeypatch):
    """`diagnose groups` puts every candidate module of the bundled UNet in one named group, and the product LoRA's
    text-encoder modules in their own (not with the ResBlocks' "layers."); the selection
    experiments spare-no-resconv / spare-no-global hand the product pipeline the scan's own selection minus the
    ResBlock convolutions / minus the timestep and pooled-text paths (spare-no-time / spare-no-pool: one of them) /
    minus the cross-attentions' keys and values (spare-no-kv; -pool: and the pooled-text path), and
    spare-te*-unet their text-encoder Linears plus that selection (read from a stand-in for spare_core.erase)."""
    import math

    from bench.minicanvas import budgets, methods
    from spare_core.minicanvas.model import load
    model = load()
    names = [g for g, _ in budgets.MODULE_GROUPS]
    groups = {p: budgets.module_group(p) for p in sc.saliency.candidate_modules(model.network)}
    assert set(groups.values()) == set(names) - {"text encoder"}  # every UNet group is met, every candidate has one
    text = [sc.model.text_key_prefix(model) + p for p in sc.families.text_candidates(model.text_encoder)]
    assert text and {budgets.module_group(p) for p in text} == {"text encoder"}  # e.g. "...layers.0.qkv"
    assert groups["time_embed.0"] == "time_embed" and groups["text_pool.attn2.to_v"] == "text_pool"
    assert groups["input_blocks.1.0.in_layers.2"] == "resnet convs" and groups["input_blocks.0.0"] == "other convs"
    assert groups["input_blocks.1.0.emb_layers.1"] == "emb_layers"

    seen = {}

    class Stop(Exception):
        pass

    def erase(model, cfg, scan_cfg, profile_cfg, saliency=None, on_check=None, latents=None):
        seen["saliency"] = saliency
        raise Stop

    monkeypatch.setattr(sc, "erase", erase)
    selected = {}
    for method in ("spare-no-resconv", "spare-no-global", "spare-no-time", "spare-no-pool", "spare-no-kv",
                   "spare-no-kv-pool"):
        with pytest.raises(Stop):
            methods.run_method(method, model, "style", "ukiyo", budgets.Budget(), seed=0)
        selected[method] = seen["saliency"].selected
    scanned = seen["saliency"].scores  # the full scan's scores: its selection is the top half of them
    top = sorted(scanned, key=scanned.get, reverse=True)[:math.ceil(sc.ScanConfig().selection * len(scanned))]
    # written out: the test reads neither SELECTION_DROPS nor TEXT_ENCODER_LINEARS
    for method, drop in (("spare-no-resconv", {"resnet convs"}), ("spare-no-global", {"time_embed", "text_pool"}),
                         ("spare-no-time", {"time_embed"}), ("spare-no-pool", {"text_pool"})):
        assert set(selected[method]) == {m for m in top if groups[m] not in drop}, method
        assert len(selected[method]) < len(top)
    kv = {m for m in top if m.endswith(("attn2.to_k", "attn2.to_v"))}  # every cross-attention's, text_pool's too
    assert kv and any(m.startswith("text_pool.") for m in kv) and any(m.startswith("output_blocks.") for m in kv)
    assert set(selected["spare-no-kv"]) == set(top) - kv
    assert set(selected["spare-no-kv-pool"]) == {m for m in top if m not in kv and groups[m] != "text_pool"}

    # spare-te*-unet: the experiment's text-encoder Linears plus the scan's UNet selection (as the product trains)
    every = [f"text_encoder.layers.{i}.{m}" for i in range(2) for m in ("qkv", "proj", "mlp.0", "mlp.2")]
    mlp = [p for p in every if ".mlp." in p]
    for method, linears in (("spare-te-unet", every), ("spare-temlp-unet", mlp), ("spare-temlp1-unet", mlp[2:])):
        with pytest.raises(Stop):
            methods.run_method(method, model, "style", "ukiyo", budgets.Budget(), seed=0)
        paths = seen["saliency"].selected
        assert [p for p in paths if p.startswith("text_encoder.")] == linears, method
        assert {p[len("unet."):] for p in paths if p.startswith("unet.")} == set(top), method


def test_ranking_diagnosis_scores_each_code_on_the_stored_damage(tmp_path):
    """`diagnose ranking` on a made-up geometry file: a code whose cosine orders the classes as their losses do gets
    Spearman 1 and the largest nearest-2 gap; the product's code is spare_core.neighbours' similarity."""
    from bench.minicanvas import diagnose
    classes, losses = ["sunset", "neon", "lava", "forest"], [80.0, 30.0, 10.0, 0.0]
    stored = [{"class": c, "acc_unerased": 100.0, "acc_erased": 100.0 - loss, "other_unerased": 95.0,
               "other_erased": 95.0, "pooled_cos": 0.9 - 0.2 * i, "kv_cos": 0.1 * i}
              for i, (c, loss) in enumerate(zip(classes, losses))]
    (tmp_path / "geometry_ukiyo.json").write_text(json.dumps({"rows": {"unlisted": stored}}))
    rows = {r["code"]: r for r in diagnose.ranking(str(tmp_path / "geometry_*.json")) if r["domain"] == "style"}
    assert rows["pooled"]["spearman"] == pytest.approx(1.0) and rows["token"]["spearman"] == pytest.approx(-1.0)
    assert rows["pooled"]["nearest2_minus_rest"] == pytest.approx(50.0)  # (80 + 30) / 2 - (10 + 0) / 2
    assert rows["token"]["nearest2_minus_rest"] == pytest.approx(-50.0)
    sims = {n.line: n.similarity for n in budgets.class_ranking("style", "ukiyo", classes)}
    by_product = sorted(classes, key=lambda c: -sims[c])
    expected = np.mean([losses[classes.index(c)] for c in by_product[:2]]) - \
        np.mean([losses[classes.index(c)] for c in by_product[2:]])
    assert rows["product"]["nearest2_minus_rest"] == pytest.approx(expected) and by_product[0] == "sunset"
    unpadded = {n.line: n.similarity for n in budgets.class_ranking("style", "ukiyo", classes, budgets.unpadded_encode)}
    assert rows["unpadded"]["spearman"] == pytest.approx(
        diagnose._spearman(losses, [unpadded[c] for c in classes]))


def test_unpadded_encode_averages_the_prompt_s_own_positions():
    """budgets.unpadded_encode: per prompt, the mean token state over <bos>, its words and <eos> only (not the mean
    over every position, which includes the padding)."""
    prompts = ["A circle image in ukiyo style.", "A ring image."]
    model = budgets._ranking_model()
    with torch.no_grad():
        got, states = budgets.unpadded_encode(prompts), model.encode(prompts)
    assert got.shape == (2, 1, states.shape[-1])
    for i, prompt in enumerate(prompts):
        n = len(prompt.rstrip(".").split()) + 2  # <bos> words <eos>
        assert torch.allclose(got[i, 0], states[i, :n].mean(0), atol=1e-6)
        assert not torch.allclose(got[i, 0], states[i].mean(0), atol=1e-3)


def test_losses_diagnosis_bins_the_stored_damage(tmp_path):
    """`diagnose losses` on made-up geometry files: styles binned by how far their pooled code moved, objects by their
    key / value cosine; per bin the pairs, mean loss and how many lost 20+; a domain without runs has no rows."""
    from bench.minicanvas import diagnose
    moved, losses = [0.9, 0.6, 0.55, 0.1], [100.0, 40.0, 10.0, 0.0]
    stored = [{"class": c, "acc_unerased": 100.0, "acc_erased": 100.0 - loss, "other_unerased": 95.0,
               "other_erased": 95.0, "pooled_moved": m, "kv_cos": 0.0}
              for c, m, loss in zip(["sunset", "neon", "lava", "forest"], moved, losses)]
    (tmp_path / "geometry_ukiyo.json").write_text(json.dumps({"rows": {"unlisted": stored}}))
    rows = diagnose.losses(str(tmp_path / "geometry_*.json"))
    assert [r["domain"] for r in rows] == ["style"] * 3
    assert [(r["bin"], r["pairs"], r["lost_20"]) for r in rows] == [(">= 0.8", 1, 1), ("0.5-0.8", 2, 1), ("< 0.5", 1, 0)]
    assert [r["mean_loss"] for r in rows] == pytest.approx([100.0, 25.0, 0.0])
    assert rows[0]["correlation"] == pytest.approx(float(np.corrcoef(moved, losses)[0, 1]))


def test_text_subset_names_the_last_text_encoder_layer():
    """spare-te-last trains the text encoder's last layer only: its Linears, under the LoRA's text-encoder prefix, in
    module order; spare-te-pool is MiniCanvas-Flux's pooling Linears (refused on the UNet before anything loads)."""
    from bench.minicanvas.dispatch import check_model_methods
    from bench.minicanvas.methods import TEXT_POOL_LINEARS, text_subset
    from spare_core.minicanvas.model import load

    model = load()
    last = text_subset(model, "spare-te-last")
    assert last == [sc.model.text_key_prefix(model) + f"layers.1.{m}" for m in ("qkv", "proj", "mlp.0", "mlp.2")]
    assert all(p in dict(sc.lora_targets(model).named_modules()) for p in last)
    assert text_subset(model, "spare-te-pool") == list(TEXT_POOL_LINEARS)
    with pytest.raises(ValueError, match="spare-te-pool"):
        check_model_methods(["spare-te-pool"], "unet")
