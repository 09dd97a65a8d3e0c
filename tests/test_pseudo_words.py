"""DistillConfig.pseudo_rows / pseudo_forget_rows (auto: on for the UNets): rows whose prompt is the concept prompt
with the concept's words' token embeddings perturbed, on the bundled MiniCanvas model (ComfyUI's CLIPs:
tests/test_host_comfy.py). That a pseudo word reads as its embedding, what the banks hold, which rows a step gets, what
"auto" resolves to, and that nothing stays."""
import copy
import logging
from dataclasses import replace

import pytest
import torch

import spare_core as sc
from spare_core.distill import PSEUDO_BANK, for_model, get_batch, make_training_data, pseudo_bank, validate

CONCEPT, SURROGATE = "A circle image in neon style.", "A circle image in plain style."
RETAIN = ["A circle image in sketch style.", "A square image in neon style."]
FAST = dict(samples=2, sample_steps=4, batch_size=2, steps=3, seed=0, gradient_checkpointing=False, cross_rows=0,
            pseudo_rows=0, pseudo_forget_rows=0)
SAL = sc.Saliency({"input_blocks.3.1.transformer_blocks.0.attn2.to_k": 1.0},
                  ["input_blocks.3.1.transformer_blocks.0.attn2.to_k"], {})


@pytest.fixture(scope="module")
def model():
    from spare_core.minicanvas.model import load
    return load()


def test_a_pseudo_word_reads_as_its_embedding(model):
    with torch.no_grad():
        plain = model.encode([CONCEPT])
        model.pseudo_words["zzq"] = model.word_embedding("neon").clone()
        try:
            same = model.encode([CONCEPT.replace("neon", "zzq"), CONCEPT])
            u = torch.randn(model.word_embedding("neon").shape, generator=torch.Generator().manual_seed(0))
            model.pseudo_words["zzq"] = model.word_embedding("neon") + model.embedding_scale("neon") * u / u.norm()
            moved = model.encode([CONCEPT.replace("neon", "zzq")])
        finally:
            model.pseudo_words.clear()
        assert torch.equal(model.encode([CONCEPT]), plain)
    assert torch.allclose(same[0], plain[0], atol=1e-6) and torch.allclose(same[1], plain[0], atol=1e-6)
    assert not torch.allclose(moved, plain, atol=1e-3)
    assert model.embedding_scale("neon") > 0


def test_the_banks_hold_the_concept_prompt_with_its_word_perturbed(model):
    cfg = validate(sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, **FAST), SAL)
    data = make_training_data(model, cfg, None, None)
    try:
        for radius, near in ((2.0, False), (1.0, True)):
            bank = pseudo_bank(model, cfg, data.cond, data.x_forget, data.i_forget, torch.Generator().manual_seed(0),
                               radius, near)
            assert 0 < len(bank) <= PSEUDO_BANK and all(c == 0 for _, c in bank)
            for prompt, _ in bank:
                word = prompt.split()[CONCEPT.lower().split().index("neon")]
                assert prompt == CONCEPT.lower().rstrip(".").replace("neon", word) and word.startswith("zzpseudo")
                distance = (model.pseudo_words[word] - model.word_embedding("neon")).norm()
                assert torch.isclose(distance, torch.tensor(radius * model.embedding_scale("neon")), rtol=1e-4)
    finally:
        model.pseudo_words.clear()


def test_a_step_gets_the_pseudo_rows_after_the_others_and_nothing_stays(model):
    base = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, **FAST)
    cfg = replace(base, pseudo_rows=2, pseudo_forget_rows=3)
    plain_data = make_training_data(model, validate(base, SAL), None, None)
    data = make_training_data(model, validate(cfg, SAL), None, None)
    try:
        n = plain_data.cond.shape[0]
        assert data.pseudo_row == n and data.pforget_row == n + data.n_pseudo
        assert data.cond.shape[0] == n + data.n_pseudo + data.pforget_concept.shape[0]
        assert torch.equal(data.cond[:n], plain_data.cond)
        plain = get_batch(model, plain_data, base, None, torch.Generator().manual_seed(3))
        more = get_batch(model, data, cfg, None, torch.Generator().manual_seed(3))
        b = base.batch_size
        for field in ("xt", "sigma", "student", "teacher"):
            assert torch.equal(getattr(more, field)[:2 * b], getattr(plain, field))
        retain, forget = slice(2 * b, 2 * b + 2), slice(2 * b + 2, None)
        assert torch.equal(more.student[retain], more.teacher[retain])  # kept: the unerased model's own prediction
        assert all(n <= int(i) < data.pforget_row for i in more.student[retain])
        assert all(int(i) >= data.pforget_row for i in more.student[forget])
        assert all(int(i) == data.surrogate_rows(torch.tensor(0)) for i in more.teacher[forget])  # -> the surrogate
        for j, k in zip(range(2 * b, 2 * b + 5), [0, 1, 0, 1, 0]):  # on the forget rows' own states
            assert torch.equal(more.xt[j], more.xt[k])
    finally:
        model.pseudo_words.clear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sc.distill(model, cfg, SAL)
    assert len(result.losses) == 3 and model.pseudo_words == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(sc.SpareInputError, match="pseudo_rows=-2"):
        validate(replace(base, pseudo_rows=-2), SAL)


def test_auto_is_two_and_two_on_a_unet_that_reads_pseudo_words_and_off_elsewhere(model):
    from tiny_denoiser import TinyDiffusionModel
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE])
    assert (cfg.pseudo_rows, cfg.pseudo_forget_rows) == (-1, -1)
    on = for_model(cfg, model)
    assert (on.pseudo_rows, on.pseudo_forget_rows) == (2, 2)
    assert for_model(replace(cfg, pseudo_rows=3), model).pseudo_forget_rows == 3  # -1: as many as pseudo_rows
    assert for_model(replace(cfg, pseudo_rows=0), model).pseudo_forget_rows == 0
    dit = copy.copy(model)
    dit.family = "flux"  # the same text encoder on a DiT family: not measured there, auto is off
    assert (for_model(cfg, dit).pseudo_rows, for_model(cfg, dit).pseudo_forget_rows) == (0, 0)
    tiny = TinyDiffusionModel(seed=0)  # no pseudo words: auto is off, an explicit count refused
    assert (for_model(cfg, tiny).pseudo_rows, for_model(cfg, tiny).pseudo_forget_rows) == (0, 0)
    with pytest.raises(sc.SpareInputError, match="pseudo_rows=1 / pseudo_forget_rows=1 need the model's text enc"):
        for_model(replace(cfg, pseudo_rows=1), tiny)


def test_every_word_the_surrogate_lacks_is_perturbed(model):
    cfg = validate(sc.DistillConfig(["A circle image in neon style."], ["A square image in plain style."],
                                    retain=RETAIN, **FAST), SAL)
    data = make_training_data(model, cfg, None, None)
    try:
        bank = pseudo_bank(model, cfg, data.cond, data.x_forget, data.i_forget, torch.Generator().manual_seed(0),
                           2.0, False)
        assert bank
        for prompt, _ in bank:
            words = prompt.split()
            assert words[0] == "a" and words[2:4] == ["image", "in"] and words[5] == "style"
            assert words[1].startswith("zzpseudo") and words[4] == words[1] + "w1"  # circle, then neon
            for w, word in ((words[1], "circle"), (words[4], "neon")):
                distance = (model.pseudo_words[w] - model.word_embedding(word)).norm()
                assert torch.isclose(distance, torch.tensor(2.0 * model.embedding_scale(word)), rtol=1e-4)
    finally:
        model.pseudo_words.clear()


def test_an_empty_bank_trains_without_its_rows(model, caplog):
    cfg = validate(sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, **{**FAST, "pseudo_rows": 2},
                                    pseudo_keep=5.0), SAL)  # nothing lies 5 gaps away
    with caplog.at_level(logging.WARNING, logger="spare_core.distill"):
        data = make_training_data(model, cfg, None, None)
    try:
        assert data.pseudo_row is None and data.n_pseudo == 0 and model.pseudo_words == {}
        assert "training without those rows" in caplog.text
        get_batch(model, data, cfg, None, torch.Generator().manual_seed(3))  # draws no pseudo row
    finally:
        model.pseudo_words.clear()
