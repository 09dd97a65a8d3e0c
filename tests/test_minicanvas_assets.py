"""MiniCanvas assets: the generator is deterministic, the shipped diffusion model implements the DiffusionModel
protocol and draws what it is asked for, and the shipped classifiers judge real and generated images correctly.

The accuracy tests run on small deterministic samples (a few seconds on 2 CPU cores); the full measurement is
`python -m bench.minicanvas.train_classifiers --eval-only`. Negative controls check that the same tests fail on an
untrained model and on wrong labels.
"""
from __future__ import annotations

import pytest
import torch

from bench.minicanvas.classifiers import CLASSIFIER_FILE, load_classifiers, predict
from spare_core.minicanvas import data
from spare_core.minicanvas.model import MODEL_FILE, MiniCanvasModel, load

torch.set_num_threads(1)

NS, NO = len(data.STYLES), len(data.OBJECTS)
REAL_SEEDS = (910_000, 910_001)   # disjoint from all training seeds
GEN_SEED = 920_000
REAL_TARGET = 0.99
# The target is measured on 484 generations (train_classifiers --eval-only: style 100.00%, object 98.14%); on this
# 22-image sample 98% still allows a second miss now and then (P ~ 7%), so the test holds a regression floor of at
# most 2 misses per domain, and the negative control below shows an untrained model cannot reach it.
GEN_FLOOR = 0.90


def pairs_two_per_class() -> list[tuple[int, int]]:
    """2 * 11 (style, object) pairs in which every style and every object appears exactly twice."""
    return [(s, (s + k) % NO) for k in (0, 5) for s in range(NS)]


@pytest.fixture(scope="module")
def classifiers():
    if not CLASSIFIER_FILE.exists():
        pytest.fail(f"missing shipped classifiers {CLASSIFIER_FILE}")
    return load_classifiers()


@pytest.fixture(scope="module")
def model():
    if not MODEL_FILE.exists():
        pytest.fail(f"missing shipped model {MODEL_FILE}")
    return load()


def domain_accuracy(clfs, images, styles, objects):
    st, ob = torch.tensor(styles), torch.tensor(objects)
    return ((predict(clfs[0], images) == st).float().mean().item(),
            (predict(clfs[1], images) == ob).float().mean().item())


def generate(m, pairs, seed=GEN_SEED):
    prompts = [data.prompt(data.STYLES[s].name, data.OBJECTS[o].name) for s, o in pairs]
    return m.sample(prompts, seed=seed, steps=20, cfg=4.0)


# --- generator ---------------------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_batch_independent():
    a = data.render_batch([0, 3, 8], [1, 3, 5], [7, 8, 9])
    b = data.render_batch([8, 0], [5, 1], [9, 7])
    assert a.shape == (3, 3, data.SIZE, data.SIZE) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert torch.equal(data.render("ukiyo", "star", 7), data.render(0, 3, 7))
    assert not torch.equal(data.render(0, 3, 7), data.render(0, 3, 8))  # seeds vary the image


def test_concepts_names_and_prompts():
    assert data.NEUTRAL_STYLE in data.STYLE_NAMES and data.NEUTRAL_OBJECT in data.OBJECT_NAMES
    assert NS >= 11 and NO >= 11
    names = [n for c in data.STYLES + data.OBJECTS for n in c.names]
    assert len(names) == len(set(names)), "names and synonyms must be unique across both domains"
    assert all(c.synonyms for c in data.STYLES + data.OBJECTS)
    assert data.prompt("ukiyo", "star") == "A star image in ukiyo style."
    vocab = set(data.vocabulary())
    assert all(w in vocab for n in names for w in data.tokenize_words(n))
    assert data.style_index("woodblock") == data.style_index("ukiyo")
    assert data.object_index("pentagram") == data.object_index("star")


def test_every_style_and_object_changes_the_image():
    base = data.render(0, 0, 1)
    for s in range(1, NS):
        assert (data.render(s, 0, 1) - base).abs().mean() > 0.05, data.STYLE_NAMES[s]
    for o in range(1, NO):
        assert (data.render(0, o, 1) - base).abs().mean() > 0.01, data.OBJECT_NAMES[o]


# --- model ----------------------------------------------------------------------------------------------------------

def test_model_implements_protocol(model):
    from spare_core.model import DiffusionModel

    assert isinstance(model, DiffusionModel)
    assert model.key_prefix == "diffusion_model." and model.latent_shape == (3, 32, 32)
    cond = model.encode(["A star image in ukiyo style.", "", "A box drawn in the pencil style."])
    sub = model.select_cond(cond, torch.tensor([2, 0]))
    assert torch.equal(sub[1], cond[0])
    x0 = data.render_batch([0, 3], [3, 1], [1, 2]) * 2 - 1
    sigma = model.sigma_at(torch.tensor([0.0, 1.0]))
    assert torch.allclose(sigma, torch.tensor([model.cfg.sigma_min, model.cfg.sigma_max]))
    xt = model.add_noise(x0, torch.randn_like(x0), sigma)
    assert model.predict_x0(xt, sigma, sub).shape == x0.shape
    # low noise: the denoised estimate is close to the clean image
    s_lo = model.sigma_at(torch.tensor([0.2, 0.2]))
    err = (model.predict_x0(model.add_noise(x0, torch.randn_like(x0), s_lo), s_lo, sub) - x0).pow(2).mean()
    assert err < 0.01


def test_attention_projections_are_sd_like(model):
    names = dict(model.network.named_modules())
    cross = [n for n in names if n.endswith("attn2")]
    assert len(cross) >= 4
    for n in cross:
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            assert isinstance(names[f"{n}.{p}"], torch.nn.Linear)
        assert names[f"{n}.to_k"].in_features == model.cfg.text_dim


def test_sampling_is_deterministic(model):
    a = model.sample(["A star image in ukiyo style."], seed=5, steps=6)
    b = model.sample(["A heart image in lava style.", "A star image in ukiyo style."], seed=[1, 5], steps=6)
    assert torch.allclose(a[0], b[1], atol=1e-5)


# --- accuracy ------------------------------------------------------------------------------------------------------

def test_classifiers_on_real_images(classifiers):
    styles = [s for s in range(NS) for o in range(NO) for _ in REAL_SEEDS]
    objects = [o for s in range(NS) for o in range(NO) for _ in REAL_SEEDS]
    seeds = [k for s in range(NS) for o in range(NO) for k in REAL_SEEDS]
    acc_s, acc_o = domain_accuracy(classifiers, data.render_batch(styles, objects, seeds), styles, objects)
    assert acc_s >= REAL_TARGET and acc_o >= REAL_TARGET, (acc_s, acc_o)


def test_classifiers_reject_wrong_labels(classifiers):
    """Negative control: the same check fails when the labels are shifted by one class."""
    pairs = pairs_two_per_class()
    imgs = data.render_batch([s for s, _ in pairs], [o for _, o in pairs], [REAL_SEEDS[0]] * len(pairs))
    acc_s, acc_o = domain_accuracy(classifiers, imgs, [(s + 1) % NS for s, _ in pairs],
                                   [(o + 1) % NO for _, o in pairs])
    assert acc_s < 0.2 and acc_o < 0.2


def test_model_generations_are_recognised(model, classifiers):
    """The shipped model's generations are recognised per domain (see GEN_FLOOR for the sample size)."""
    pairs = pairs_two_per_class()
    acc_s, acc_o = domain_accuracy(classifiers, generate(model, pairs), [s for s, _ in pairs],
                                   [o for _, o in pairs])
    assert acc_s >= GEN_FLOOR and acc_o >= GEN_FLOOR, (acc_s, acc_o)


def test_untrained_model_fails_the_generation_check(classifiers):
    """Negative control: an untrained network with the same config does not pass the generation check."""
    torch.manual_seed(0)
    shipped_cfg = load().cfg
    untrained = MiniCanvasModel(shipped_cfg)
    for p in untrained.network.parameters():  # the zero-initialised output layers would give x0 = x: perturb them
        torch.nn.init.normal_(p, std=0.02)
    pairs = pairs_two_per_class()
    acc_s, acc_o = domain_accuracy(classifiers, generate(untrained, pairs), [s for s, _ in pairs],
                                   [o for _, o in pairs])
    assert not (acc_s >= GEN_FLOOR and acc_o >= GEN_FLOOR), (acc_s, acc_o)
