"""spare_core's family rules without ComfyUI: candidates per family, exact gradients through in-place residual adds
(autograd.backward_safe), and what the stages do for a family that declares them (the DiT families themselves, on
ComfyUI's real classes: tests/test_dit_comfy.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import spare_core as sc
from spare_core import autograd, families
from spare_core.families import Family
from tiny_denoiser import TinyDiffusionModel


class InplaceBlock(nn.Module):
    """Flux's residual pattern (comfy/ldm/flux/layers.py): a norm reads the stream, then the stream is updated in
    place, twice."""

    def __init__(self, dim=8):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x, inplace=True):
        if inplace:
            x += self.attn(self.norm1(x))
            x += self.mlp(self.norm2(x))
            return x
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyDiT(nn.Module):
    def __init__(self, dim=8, inplace=True):
        super().__init__()
        self.txt_in = nn.Linear(dim, dim)
        self.double_blocks = nn.ModuleList([InplaceBlock(dim), InplaceBlock(dim)])
        self.inplace = inplace

    def forward(self, x):
        x = self.txt_in(x)
        for block in self.double_blocks:
            x = block(x, inplace=self.inplace)
        return x


def _grads(net, x, params, ctx):
    with ctx:
        return torch.autograd.grad((net(x) ** 2).sum(), params)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_backward_safe_gives_the_out_of_place_gradients(checkpointing):
    torch.manual_seed(0)
    net = ToyDiT().double()
    for p in net.parameters():
        p.requires_grad_(False)
    paths = [p for p, m in net.named_modules() if isinstance(m, nn.Linear) and p.startswith("double_blocks")]
    adapters = sc.adapters.attach(net, paths, 2, 2.0, dtype=torch.float64)
    with torch.no_grad():
        for a in adapters.adapters.values():
            a.up.weight.normal_(0, 0.1)
    params = adapters.parameters()
    x = torch.randn(3, 8, dtype=torch.float64)
    with adapters:
        net.inplace = False
        reference = _grads(net, x, params, torch.enable_grad())
        net.inplace = True
        with pytest.raises(RuntimeError, match="inplace operation"):
            _grads(net, x, params, autograd.gradient_checkpointing(net) if checkpointing
                   else torch.enable_grad())
        safe = _grads(net, x, params, autograd.backward_safe(net, checkpointing, inplace_residuals=True))
    for r, s in zip(reference, safe):
        assert torch.allclose(r, s, rtol=0, atol=1e-12)
    # the caller's input is not modified by a checkpointed in-place block
    before = x.clone()
    with adapters, autograd.backward_safe(net, checkpointing, inplace_residuals=True):
        net(x)
    assert torch.equal(x, before)


def test_candidates_follow_the_family():
    net = ToyDiT()
    net.double_blocks[0].txt_attn = nn.Linear(8, 8)  # a text-stream attention projection, Flux-named
    flux_like = Family("toy", "toy", blocks=("double_blocks",), attention=("attn", "txt_attn"),
                       text_attention=(".txt_attn",))
    every = sc.candidate_modules(net, "all", flux_like)
    assert "txt_in" not in every and set(every) == {f"double_blocks.{i}.{n}" for i in (0, 1) for n in ("attn", "mlp")
                                                    } | {"double_blocks.0.txt_attn"}
    assert set(sc.candidate_modules(net, "attention", flux_like)) == {"double_blocks.0.attn", "double_blocks.1.attn",
                                                                      "double_blocks.0.txt_attn"}
    assert set(sc.candidate_modules(net, "cross_attention", flux_like)) == {"double_blocks.0.txt_attn"}
    # the UNet rule (the default) is the whole network, as before
    assert "txt_in" in sc.candidate_modules(net, "all")


def test_every_family_is_named_and_has_an_architecture():
    for name, fam in families.FAMILIES.items():
        assert fam.name == name and fam.label
        assert fam.architecture or not fam.dit
        assert bool(fam.blocks) == fam.dit  # DiT candidates stay inside the blocks


@pytest.fixture()
def spied(monkeypatch):
    calls = []
    real = autograd.inplace_safe

    def spy(network):
        calls.append(network)
        return real(network)
    monkeypatch.setattr(autograd, "inplace_safe", spy)
    return calls


def test_stages_make_gradients_safe_for_families_with_inplace_residuals(spied):
    model = TinyDiffusionModel(seed=0)
    sal = sc.saliency_scan(model, ["a red cat"], samples=1, sample_steps=2, seed=0)
    cfg = sc.DistillConfig(["a red cat"], ["a plain house"], steps=2, seed=0, samples=1, sample_steps=2)
    sc.distill(model, cfg, sal)
    assert spied == []  # a UNet: no copies
    model.family = dataclasses.replace(families.UNET, name="inplace-toy", inplace_residuals=True)
    sc.saliency_scan(model, ["a red cat"], samples=1, sample_steps=2, seed=0)
    assert len(spied) == 1
    sc.distill(model, cfg, sal)
    assert len(spied) == 2


def test_guidance_distilled_families_sample_without_cfg():
    model = TinyDiffusionModel(seed=0)
    rows = []
    real = model.predict_x0

    def counting(x, sigma, cond):
        rows.append(x.shape[0])
        return real(x, sigma, cond)
    model.predict_x0 = counting
    sc.generate(model, ["a red cat"], 2, seed=0, steps=1, cfg=5.0)
    assert rows == [4]  # conditional + unconditional halves
    rows.clear()
    model.family = dataclasses.replace(families.UNET, name="distilled-toy", guidance_distilled=True)
    sc.generate(model, ["a red cat"], 2, seed=0, steps=1, cfg=5.0)
    assert rows == [2]


def _fused_toy():
    """The tiny UNet with one feed-forward input made a fused projection: 16 -> 56 rows = q, k, v (16 each) and an
    8-row "mlp" part, declared fused by a toy family."""
    model = TinyDiffusionModel(seed=0)
    block = model.network.input_blocks[1].transformer_blocks[0]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        block.ff[0], block.ff[2] = nn.Linear(16, 56), nn.Linear(56, 16)
    model.family = dataclasses.replace(families.UNET, name="fused-toy", fused=("ff.0",))
    return model, "input_blocks.1.transformer_blocks.0.ff.0"


def test_fused_projections_are_scored_and_adapted_as_row_slices():
    model, path = _fused_toy()
    whole = sc.saliency_scan(model, ["a red cat"], samples=1, sample_steps=2, seed=0)
    sliced = sc.saliency_scan(model, ["a red cat"], samples=1, sample_steps=2, seed=0, fused_slices=True,
                              selection=1.0)
    names = [f"{path}[{p}]" for p in ("q", "k", "v", "mlp")]
    assert path in whole.scores and path not in sliced.scores and set(names) <= set(sliced.scores)
    # the other candidates score as before; the slices' |grad| sums add up to the whole module's
    assert all(sliced.scores[p] == pytest.approx(s, rel=1e-5) for p, s in whole.scores.items() if p != path)
    rows = {"q": 16, "k": 16, "v": 16, "mlp": 8}
    parts = sum(sliced.scores[f"{path}[{p}]"] * n * 16 for p, n in rows.items())
    assert parts == pytest.approx(whole.scores[path] * 56 * 16, rel=1e-5)

    # a slice adapter moves its rows only; two slices of one module become one ordinary LoRA on it
    net = model.network
    module = dict(net.named_modules())[path]
    adapters = sc.adapters.attach(net, [f"{path}[k]", f"{path}[mlp]"], 2, 2.0)
    with torch.no_grad():
        for a in adapters.adapters.values():
            a.up.weight.normal_(0, 0.5)
    x = torch.randn(3, 16)
    with adapters:
        live = module(x)
        with adapters.disabled():
            base = module(x)
    moved = (live - base).abs().amax(0)
    assert moved[:16].max() == 0 and moved[32:48].max() == 0  # q and v rows untouched
    assert moved[16:32].min() > 0 and moved[48:].min() > 0
    lora = sc.LoraWeights.from_adapters(adapters)
    assert list(lora.modules) == [path] and lora.modules[path]["down"].shape == (4, 16)
    assert lora.modules[path]["up"].shape == (56, 4)
    assert set(lora.state_dict()) == {f"diffusion_model.{path}.{k}" for k in ("lora_down.weight", "lora_up.weight",
                                                                              "alpha")}
    with sc.apply_lora(net, lora, 1.0):
        applied = module(x)
    assert torch.allclose(applied, live, atol=1e-5)

    # distill trains on a sliced selection (the scan's top slices and modules)
    top = sc.Saliency(sliced.scores, [f"{path}[v]"] + [p for p in sliced.selected if "[" not in p][:3], {})
    cfg = sc.DistillConfig(["a red cat"], ["a plain house"], steps=2, seed=0, samples=1, sample_steps=2)
    result = sc.distill(model, cfg, top)
    assert path in result.lora.modules and result.lora.modules[path]["up"][:32].abs().max() == 0


def test_feeding_finds_the_modules_whose_output_reaches_the_result():
    """autograd.feeding: a module that never runs and one whose output is dropped get no gradient; one followed by a
    LayerNorm (which cancels a uniform shift) still counts; in-place residual adds after a norm stay legal; the values
    returned are unchanged and no hook stays."""
    from spare_core.autograd import feeding

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused, self.dropped = (torch.nn.Linear(4, 4) for _ in range(4))
            self.norm = torch.nn.LayerNorm(4)

        def forward(self, x):
            h = self.a(x)
            h += self.norm(h)  # an in-place residual add after a norm read h (T5's and CLIP's layers do this)
            self.dropped(h)
            return {"cond": self.norm(self.b(h)), "ids": torch.tensor([1, 2])}

    toy = Toy()
    x = torch.randn(2, 4)
    before = toy(x)["cond"]
    paths = ["a", "b", "unused", "dropped"]
    assert feeding(toy, paths, lambda: toy(x)) == ["a", "b"]
    assert torch.equal(toy(x)["cond"], before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in toy.modules())
