"""The erasure in the text encoder too (DistillConfig.text_encoder): spare_core on the bundled MiniCanvas model, whose
text encoder is a real (small) transformer. What the LoRA names, that the student's conditioning goes through the
adapted text encoder, that nothing of the model is written, and the file's text-encoder keys."""
import copy
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import spare_core as sc
from spare_core import lora as lora_mod
from spare_core.distill import for_model
from spare_core.errors import SpareInputError
from spare_core.families import UNET, text_candidates
from spare_core.model import lora_targets, text_encoder_of, text_key_prefix
from tiny_denoiser import TinyDiffusionModel

CONCEPT, SURROGATE = "A circle image in neon style.", "A circle image in plain style."
RETAIN = ["A circle image in sketch style.", "A square image in neon style."]
FAST = dict(samples=2, sample_steps=4, batch_size=2, steps=6, seed=0, gradient_checkpointing=False)


@pytest.fixture(scope="module")
def model():
    from spare_core.minicanvas.model import load
    return load()


@pytest.fixture(scope="module")
def run(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unet = ["input_blocks.3.1.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn2.to_v"]
    unet = [p for p in unet if p in dict(model.network.named_modules())]
    assert unet, "the MiniCanvas UNet's module names changed: update the test"
    saliency = sc.Saliency({p: 1.0 for p in unet}, unet, {})
    result = sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, **FAST), saliency)
    return result, before, unet


def test_auto_is_on_for_a_unet_with_a_text_encoder_and_off_elsewhere(model):
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE])
    assert cfg.text_encoder == "auto" and for_model(cfg, model).text_encoder == "on"
    tiny = TinyDiffusionModel(seed=0)  # a text encoder without encode_text: nothing SPARE can train
    assert text_encoder_of(tiny) is None and for_model(cfg, tiny).text_encoder == "off"
    dit = copy.copy(model)
    dit.family = "flux"  # the same text encoder on a DiT family: auto is off there
    assert for_model(cfg, dit).text_encoder == "off"
    with pytest.raises(SpareInputError, match="text_encoder='on' needs"):
        for_model(replace(cfg, text_encoder="on"), tiny)
    with pytest.raises(SpareInputError, match="mix_rows"):
        for_model(replace(cfg, text_encoder="on", mix_rows=2, retain=RETAIN), model)
    with pytest.raises(SpareInputError, match="calibrate_share"):
        for_model(replace(cfg, calibrate_share=0.5), model)
    with pytest.raises(SpareInputError, match="text_encoder='yes'"):
        sc.distill_validate(replace(cfg, text_encoder="yes"), sc.Saliency({"a": 1.0}, ["a"], {}))


def test_the_lora_holds_the_text_encoder_layers_and_the_selected_modules(model, run):
    result, _, unet = run
    text = [text_key_prefix(model) + p for p in text_candidates(model.text_encoder)]
    assert len(text) == 4 * model.cfg.text_layers  # qkv, proj and the MLP's two Linears of every layer
    assert list(result.lora.modules) == text + unet and result.lora.edits_text_encoder
    assert result.config.text_encoder == "on"
    trained = [p for p in text if result.lora.modules[p]["up"].abs().max() > 0]
    assert trained == text  # every text adapter got a gradient (B starts at zero)
    assert result.gap_closed > 0


def test_a_selection_naming_text_encoder_modules_trains_those_instead_of_every_layer(model):
    """The benchmark's experiments (spare-te-pool) pass their own Saliency: when it names text-encoder modules, those
    carry the text encoder's adapters instead of every Linear of its layers."""
    unet = "middle_block.1.transformer_blocks.0.attn2.to_v"
    text = text_key_prefix(model) + text_candidates(model.text_encoder)[-1]
    saliency = sc.Saliency({unet: 1.0}, [text, unet], {})
    result = sc.distill(model, sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, **FAST), saliency)
    assert list(result.lora.modules) == [text, unet]
    assert result.lora.modules[text]["up"].abs().max() > 0


def test_nothing_of_the_model_is_written_and_no_hook_stays(model, run):
    _, before, _ = run
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for net in (model.network, model.text_encoder):
        assert all(not m._forward_hooks for m in net.modules())


def test_applied_lora_changes_what_the_concept_prompt_means(model, run):
    result = run[0]
    plain = model.encode([CONCEPT, SURROGATE])
    with sc.apply_lora(lora_targets(model), result.lora, 1.0):
        erased = model.encode([CONCEPT, SURROGATE])
    assert not torch.allclose(erased[0], plain[0], atol=1e-4)
    assert torch.equal(model.encode([CONCEPT]), plain[:1])  # removed: the model as it was
    with pytest.raises(SpareInputError, match="text-encoder module"):
        sc.apply_lora(model.network, result.lora, 1.0)  # half of the erasure is refused, not applied


def test_file_keys_round_trip_and_kohya_refuses_non_clip_names(model, run, tmp_path):
    lora = run[0].lora
    path = sc.save_lora(str(tmp_path / "te.safetensors"), lora)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    # ComfyUI's "text_encoders.<state-dict key>" of the demo CLIP (nodes/demo_model.py keeps "text_encoder.*")
    assert "text_encoders.text_encoder.layers.0.qkv.lora_up.weight" in keys
    assert any(k.startswith("diffusion_model.") for k in keys)
    back = sc.load_lora(path, lora_targets(model))
    assert set(back.modules) == set(lora.modules)
    for p, m in lora.modules.items():
        assert torch.allclose(back.modules[p]["up"], m["up"].half().float())
    with pytest.raises(SpareInputError, match="key_format 'comfyui'"):
        sc.save_lora(str(tmp_path / "k.safetensors"), lora, key_format="kohya")


def test_kohya_names_of_clip_text_encoders_are_the_ones_comfyui_maps():
    """comfy/lora.py model_lora_keys_clip: "lora_te_text_model_encoder_layers_<b>_<c>" for one CLIP (SD1 clip_l, SD2
    clip_h), lora_te1_ / lora_te2_ for SDXL's clip_l / clip_g (the host tests load such files with LoraLoader)."""
    layer = "transformer.text_model.encoder.layers.3.self_attn.q_proj"
    sd1 = lora_mod.kohya_text_names([f"text_encoders.clip_l.{layer}", "text_encoders.t5xxl.transformer.x"])
    assert sd1 == {f"text_encoders.clip_l.{layer}": "lora_te_text_model_encoder_layers_3_self_attn_q_proj"}
    sdxl = lora_mod.kohya_text_names([f"text_encoders.clip_l.{layer}", f"text_encoders.clip_g.{layer}"])
    assert sorted(sdxl.values()) == ["lora_te1_text_model_encoder_layers_3_self_attn_q_proj",
                                     "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"]


def test_on_trains_every_read_layer_and_last_only_the_last(model):
    """text_encoder "on": every Linear of the text encoder's layers (each one shapes the conditioning on MiniCanvas);
    "last": its last layer's only -- the modules the benchmark's spare-te-last row trained."""
    from bench.minicanvas.methods import text_subset
    from spare_core.distill import text_modules

    cfg = for_model(sc.DistillConfig([CONCEPT], [SURROGATE], text_encoder="on"), model)
    assert text_modules(model, cfg) == text_candidates(text_encoder_of(model))
    last = text_modules(model, replace(cfg, text_encoder="last"))
    assert last == [p for p in text_candidates(text_encoder_of(model)) if p.startswith("layers.1.")]
    assert [text_key_prefix(model) + p for p in last] == text_subset(model, "spare-te-last")


def test_the_network_part_is_saved_at_model_strength_and_the_text_encoders_at_one(model, run):
    result, _, unet = run
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, **FAST)
    assert cfg.model_strength == -1 and result.config.model_strength == 0.9  # auto: 0.9 on a UNet whose CLIP trains
    assert '"model_strength": 0.9' in result.lora.metadata["spare.config"]
    assert for_model(replace(cfg, text_encoder="off"), model).model_strength == 1.0
    dit = copy.copy(model)
    dit.family = "flux"
    assert for_model(cfg, dit).model_strength == 1.0
    assert for_model(replace(cfg, model_strength=0.7), model).model_strength == 0.7
    full = sc.distill(model, replace(cfg, model_strength=1.0), sc.Saliency({p: 1.0 for p in unet}, unet, {})).lora
    assert list(full.modules) == list(result.lora.modules)
    for path, m in result.lora.modules.items():  # the same training; only the network's up weights are scaled
        assert torch.equal(m["down"], full.modules[path]["down"])
        up = full.modules[path]["up"]
        assert torch.equal(m["up"], up if lora_mod.is_text_path(path) else up * 0.9)
    with pytest.raises(SpareInputError, match="model_strength=0"):
        sc.distill_validate(replace(cfg, model_strength=0.0), sc.Saliency({"a": 1.0}, ["a"], {}))


def test_an_object_is_saved_at_the_familys_object_strength(model):
    """concept_kind "object" takes Family.object_model_strength where "auto" resolves (the UNet family's is below its
    style strength); an explicit model_strength, a DiT or an untrained text encoder ignore the kind; anything but
    style / object is refused, naming the input and the choices."""
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=RETAIN, **FAST)
    assert cfg.concept_kind == "style" and for_model(cfg, model).model_strength == UNET.model_strength
    obj = replace(cfg, concept_kind="object")
    assert for_model(obj, model).model_strength == UNET.object_model_strength < UNET.model_strength
    assert for_model(replace(obj, model_strength=1.0), model).model_strength == 1.0
    assert for_model(replace(obj, text_encoder="off"), model).model_strength == 1.0
    dit = copy.copy(model)
    dit.family = "flux"
    assert for_model(obj, dit).model_strength == 1.0
    with pytest.raises(SpareInputError, match="concept_kind='person' is not one of style, object"):
        sc.distill_validate(replace(cfg, concept_kind="person"), sc.Saliency({"a": 1.0}, ["a"], {}))
