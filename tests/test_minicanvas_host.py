"""`python -m bench.minicanvas --host comfyui` (bench/minicanvas/host_path.py): the MiniCanvas harness with SPARE
driven through the pack's nodes and the grids through ComfyUI's KSampler, end to end at a tiny budget; the nodes
train what the library path trains from the same inputs; a batched grid image equals a KSampler run.

The host tests need a ComfyUI checkout in COMFYUI_PATH (scripts/setup_comfyui.sh) and are skipped with the reason
printed otherwise; the CLI's refusals are tested without it.
"""
import json
import os

import pytest
import torch

from bench.minicanvas import harness
from spare_core.minicanvas import data

import comfy_fixtures as cf

CONCEPT = ("style", "ukiyo")
TINY = harness.Budget(spare=2, seeds=1, sample_steps=2)


def few_prompts(domain, name, seed, retain_set="all-pairs"):
    """harness.concept_prompts cut to 2 forget / surrogate and 2 retain prompts (the full lists take minutes)."""
    forget, surrogate, retain, short, short_surrogate = ORIGINAL(domain, name, seed, retain_set)
    return forget[:2], surrogate[:2], retain[:2], short, short_surrogate


ORIGINAL = harness.concept_prompts


@pytest.fixture(scope="module")
def host():
    cf.comfy_or_skip()
    from bench.minicanvas import host_path
    h = host_path.ComfyHost(harness)
    yield h
    h.close()


def test_cli_refuses_without_comfyui_and_other_methods(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SystemExit):
        harness.main(["--host", "comfyui", "--methods", "spare", "--concepts", "ukiyo", "--out", "unused.json"])
    assert "COMFYUI_PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        harness.main(["--host", "comfyui", "--methods", "spare,esd-x", "--out", "unused.json"])
    err = capsys.readouterr().err
    assert "esd-x" in err and "--host library" in err


def test_host_path_end_to_end(host, monkeypatch):
    monkeypatch.setattr(harness, "concept_prompts", few_prompts)
    before = host.sample(None, ["A star image in ukiyo style."], [3], 4)
    out = harness.run(["spare"], {CONCEPT[0]: [CONCEPT[1]]}, TINY, log=print, host="comfyui")
    assert out["host"] == "comfyui"
    row = out["methods"]["spare"]["runs"][0]
    assert row["host"] == "comfyui" and row["steps_used"] == TINY.spare and row["modules"] > 0
    for k in ("UA", "IRA", "CRA", "synonym_UA"):
        assert 0.0 <= row[k] <= 100.0, (k, row[k])
    assert 0.0 <= out["base"]["style_acc"] <= 100.0 and row["seconds"] > 0
    # the erasure did not leak into the demo MODEL (Apply Erasure patched a clone)
    assert torch.equal(host.sample(None, ["A star image in ukiyo style."], [3], 4), before)


def test_nodes_train_what_the_library_trains(host, monkeypatch):
    """Same prompts, seeds and settings through both paths: the same modules and (up to float rounding and the node's
    fp16 LORA_MODEL) the same LoRA; a wrong learning rate or seed would fail this. The LoRA changes the images."""
    import spare_core as sc

    monkeypatch.setattr(harness, "concept_prompts", few_prompts)
    domain, name = CONCEPT
    (_, erased), info = host.erase("spare", domain, name, TINY, seed=1)
    library = harness.LibraryHost()
    (_, lora), lib_info = library.erase("spare", domain, name, TINY, seed=1)
    assert info["steps_used"] == lib_info["steps_used"] and info["trainable_params"] == lib_info["trainable_params"]
    node_lora = sc.lora.LoraWeights.from_state_dict(_node_sd(host, info), sc.lora_targets(library.model))
    assert node_lora.edits_text_encoder  # the UNet's default: the text encoder trains too
    config = json.loads(_node_metadata(host, info)["spare.config"])  # the UNet's default: pseudo rows, through the CLIP
    assert (config["pseudo_rows"], config["pseudo_forget_rows"]) == (2, 2)
    assert set(node_lora.modules) == set(lora.modules)
    worst = 0.0
    for path, m in lora.modules.items():
        for part in ("up", "down"):
            ref, got = m[part], node_lora.modules[path][part].float()
            worst = max(worst, ((got - ref).norm() / ref.norm().clamp_min(1e-8)).item())
    print(f"largest relative (Frobenius) difference node vs library LoRA matrix: {worst:.2e}")
    # Element-wise maxima are not a fair measure: Adam turns rounding-sized gradient differences of near-zero elements
    # into lr-sized steps (rank 8: up to 1.5e-2 of a matrix's largest element after these few steps); a 20x lr or
    # another seed moves whole matrices (~1).
    assert worst < 1e-2, worst
    prompts = [data.prompt(name, "star", 1), data.prompt("neon", "heart", 2)]
    base, after = host.sample(None, prompts, [5, 6], 4), host.sample(("model", erased), prompts, [5, 6], 4)
    assert (after - base).abs().max() > 1e-3


def _node_metadata(host, info):
    from safetensors import safe_open
    with safe_open(os.path.join(host.loras, info["lora_file"]), "pt") as f:
        return f.metadata()


def _node_sd(host, info):
    """The LoRA file the Distill node wrote (the same tensors as its LORA_MODEL output)."""
    from safetensors.torch import load_file
    return load_file(os.path.join(host.loras, info["lora_file"]))


def test_batched_grid_equals_ksampler(host):
    """host.sample draws a batch with one noise tensor per image seed; each image equals a KSampler run (batch 1,
    that seed) with the grid's sampler settings."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py (first on sys.path)
    from bench.minicanvas import host_path

    prompts, seeds, steps = ["A ring image in neon style.", "An image of a heart in ukiyo style."], [10_007, 42], 3
    batched = host.sample(None, prompts, seeds, steps)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        with torch.inference_mode():
            pos = comfy_nodes.CLIPTextEncode().encode(host.clip, p)[0]
            neg = comfy_nodes.CLIPTextEncode().encode(host.clip, host_path.GRID_NEGATIVE)[0]
            latent = {"samples": torch.zeros(1, 3, 32, 32)}
            (out,) = comfy_nodes.common_ksampler(host.model, s, steps, host_path.GRID_CFG, host_path.GRID_SAMPLER,
                                                 host_path.GRID_SCHEDULER, pos, neg, latent)
            image = comfy_nodes.VAEDecode().decode(host.vae, out)[0].permute(0, 3, 1, 2)
        assert torch.allclose(batched[i:i + 1], image, atol=1e-5), (batched[i:i + 1] - image).abs().max()


@pytest.fixture(scope="module")
def flux_host():
    cf.comfy_or_skip()
    from bench.minicanvas import host_path
    h = host_path.ComfyHost(harness, "flux")
    yield h
    h.close()


def test_flux_host_path_end_to_end_trains_what_the_library_trains(flux_host, monkeypatch):
    """`--model flux --host comfyui`: SPARE through the nodes on the Demo Model's MiniCanvas-Flux, the grid through
    KSampler with the flux model's own sampler settings; the nodes adapt the modules the library adapts, with the
    same step count; the demo MODEL is untouched."""
    from dataclasses import replace

    from bench.minicanvas import host_path

    monkeypatch.setattr(harness, "concept_prompts", few_prompts)
    budget = replace(TINY, model="flux")
    assert flux_host.grid == {"sampler": "dpmpp_2m", "scheduler": "simple", "cfg": 4.0, "negative": ""}
    assert flux_host.grid != host_path.grid_settings("unet")
    before = flux_host.sample(None, ["A star image in ukiyo style."], [3], 2)
    assert before.shape == (1, 3, 32, 32)
    domain, name = CONCEPT
    (_, erased), info = flux_host.erase("spare", domain, name, budget, seed=1)
    (_, lora), lib_info = harness.LibraryHost(model="flux").erase("spare", domain, name, budget, seed=1)
    assert info["steps_used"] == lib_info["steps_used"] == budget.spare
    assert info["trainable_params"] == lib_info["trainable_params"] and info["modules"] == len(lora.modules)
    after = flux_host.sample(("model", erased), ["A star image in ukiyo style."], [3], 2)
    assert not torch.equal(after, before)  # the LoRA changes the picture
    assert torch.equal(flux_host.sample(None, ["A star image in ukiyo style."], [3], 2), before)
