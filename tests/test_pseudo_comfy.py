"""SPARE's pseudo words (DistillConfig.pseudo_rows, on by default for the UNets) on ComfyUI's real CLIPs: tiny SD1.5,
SD2.x and SDXL CLIPs (every part: CLIP-L, CLIP-H, CLIP-L + CLIP-G), the bundled MiniCanvas demo CLIP and every tiny
DiT's text encoders (where the rows are an explicit choice: auto is 0 on the DiTs). A pseudo
word's tokens become its perturbed embeddings (as ComfyUI reads textual-inversion embeddings), at the stated radius, in
every part; at radius 0 the prompt encodes as the word does; the demo CLIP reads a pseudo word as the benchmark's model
does; a distillation with the defaults trains with the rows and leaves nothing behind.

Needs a ComfyUI checkout in COMFYUI_PATH (scripts/setup_comfyui.sh); skipped with the reason printed otherwise.
"""
import sys

import pytest
import torch

import comfy_fixtures as cf

PACK_NAME = cf.PACK_UNDER_TEST
SD_FAMILIES = ("sd15", "sd2v", "sdxl")
PROMPT = "a watercolor of a ukiyo-e dog"


@pytest.fixture(scope="module", autouse=True)
def comfy():
    cf.comfy_or_skip()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    import gc
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture(scope="module")
def pack():
    return cf.import_pack(PACK_NAME)


@pytest.fixture(scope="module")
def host(pack):
    return sys.modules[PACK_NAME + ".nodes.host"]


@pytest.fixture(scope="module")
def demo(pack):
    yield from cf.demo_outputs(PACK_NAME)


def crossattn(dm, prompt):
    return dm.encode([prompt])["c_crossattn"]


@pytest.mark.parametrize("family", SD_FAMILIES)
def test_a_pseudo_word_is_its_tokens_moved_in_every_part_of_the_clip(host, family):
    model, clip = cf.build_tiny(family, seed=0)
    dm = host.ComfyDiffusionModel(model, clip, 64, 64)
    assert dm.pseudo_words == {} and dm.knows_word("ukiyo-e")
    parts = set(clip.tokenize("").keys())
    assert set(dm._parts) == parts
    gen = torch.Generator().manual_seed(0)
    same = dm.pseudo_word("ukiyo-e", 0.0, gen)
    moved = dm.pseudo_word("ukiyo-e", 2.0, gen)
    for key in parts:
        ids = dm.word_ids(key, "ukiyo-e")
        assert len(ids) >= 2  # a word of several BPE tokens: every one is moved
        table = host.input_embeddings(dm._parts[key][1]).weight.detach().float()
        assert moved.rows[key].shape == (len(ids), table.shape[1])
        for k, i in enumerate(ids):
            d = (table - table[i]).norm(dim=1)
            scale = float(d[d > 0].median())
            assert torch.equal(same.rows[key][k], table[i])
            assert abs(float((moved.rows[key][k] - table[i]).norm()) - 2.0 * scale) < 1e-3 * scale
    plain = dm.encode([PROMPT])
    dm.pseudo_words.update(zzsame=same, zzmoved=moved)
    try:
        at_zero = dm.encode([PROMPT.replace("ukiyo-e", "zzsame")])
        away = dm.encode([PROMPT.replace("ukiyo-e", "zzmoved")])
    finally:
        dm.pseudo_words.clear()
    for key, value in plain.items():  # c_crossattn (and SDXL's y: the pooled CLIP-G output)
        if torch.is_tensor(value):
            assert torch.allclose(at_zero[key], value, atol=1e-5), key
    assert not torch.allclose(away["c_crossattn"], plain["c_crossattn"], atol=1e-3)
    assert torch.equal(crossattn(dm, PROMPT), plain["c_crossattn"])  # the plain prompt is unchanged after


def test_the_demo_clip_reads_a_pseudo_word_as_the_benchmark_model_does(host, demo):
    from spare_core.minicanvas.model import load
    _, _, (model, clip, _, _) = demo
    dm = host.ComfyDiffusionModel(model, clip)
    bundled = load()
    assert dm.knows_word("neon") and not dm.knows_word("zebra")  # the demo's vocabulary only
    prompt = "A circle image in neon style."
    pw = dm.pseudo_word("neon", 2.0, torch.Generator().manual_seed(1))
    (rows,) = pw.rows.values()
    assert torch.equal(host.input_embeddings(dm._parts[None][1]).weight[bundled.tokenizer.ids["neon"]],
                       bundled.word_embedding("neon"))
    dm.pseudo_words["zzq"] = pw
    bundled.pseudo_words["zzq"] = rows[0]
    try:
        with torch.inference_mode():  # as the executor runs nodes (the demo CLIP's weights are inference tensors)
            here = crossattn(dm, prompt.replace("neon", "zzq"))
            plain = crossattn(dm, prompt)
        with torch.no_grad():
            there = bundled.encode([prompt.replace("neon", "zzq")])
    finally:
        dm.pseudo_words.clear()
        bundled.pseudo_words.clear()
    assert torch.allclose(here, there, atol=1e-5)
    assert not torch.allclose(here, plain, atol=1e-3)


def test_a_distillation_with_the_defaults_trains_the_pseudo_rows_and_leaves_nothing(host, caplog):
    from dataclasses import replace

    import spare_core as sc
    from spare_core.distill import for_model

    model, clip = cf.build_tiny("sd15", seed=2)
    dm = host.ComfyDiffusionModel(model, clip, 64, 64)
    concept, surrogate = "A watercolor of a cat", "a photo of a cat"  # "A": the same word as "a" (not perturbed)
    cfg = sc.DistillConfig([concept], [surrogate], retain=["a photo of a dog"], samples=2, sample_steps=2, steps=2,
                           seed=0, gradient_checkpointing=False, text_encoder="off")
    assert (for_model(cfg, dm).pseudo_rows, for_model(cfg, dm).pseudo_forget_rows) == (2, 2)
    assert for_model(cfg, host.ComfyDiffusionModel(model, None, 64, 64)).pseudo_rows == 0  # no CLIP: off
    seen = []
    encode = dm.encode
    dm.encode = lambda prompts: seen.extend(prompts) or encode(prompts)
    modules = [n for n, m in dm.network.named_modules() if n.endswith("attn2.to_k")][:2]
    saliency = sc.Saliency({p: 1.0 for p in modules}, modules, {})
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    dm.encode([concept, surrogate, "a photo of a dog", ""])
    with host.trainable(dm):
        # keep 0: every candidate is a retain row (and none a forget row: logged), whatever the tiny model draws
        result = sc.distill(dm, replace(cfg, pseudo_keep=0.0), saliency)
    assert (result.config.pseudo_rows, result.config.pseudo_forget_rows) == (2, 2) and len(result.losses) == 2
    pseudo = [p for p in seen if "zzpseudo" in p]
    assert len(pseudo) >= 32 and all(p.replace(p.split(" ")[1], "watercolor") == concept for p in pseudo)
    assert "training without those rows" in caplog.text  # the forget side: nothing closer than 0 x the gap
    assert dm.pseudo_words == {} and "load_model" not in vars(clip)
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in before.items())


def test_weighted_words_keep_their_weight_and_a_word_read_otherwise_is_left_alone(host, caplog):
    import logging
    model, clip = cf.build_tiny("sd15", seed=0)
    dm = host.ComfyDiffusionModel(model, clip, 64, 64)
    gen = torch.Generator().manual_seed(0)
    prompt = "a watercolor of a (ukiyo-e:1.3) dog"
    word = dm.prompt_words(prompt)[4]
    assert word == "(ukiyo-e:1.3)" and dm.word_ids("l", word) == dm.word_ids("l", "ukiyo-e")
    dm.pseudo_words["zzw"] = dm.pseudo_word(word, 0.0, gen)
    tokens = dm._tokens(prompt.replace(word, "zzw"))["l"][0]
    moved = [(t, w) for t, w, *_ in tokens if torch.is_tensor(t)]
    assert len(moved) == len(dm.word_ids("l", "ukiyo-e")) and all(w == pytest.approx(1.3) for _, w in moved)
    assert torch.allclose(crossattn(dm, prompt.replace(word, "zzw")), crossattn(dm, prompt), atol=1e-5)
    # "(ukiyo-e" alone is other tokens than inside "(ukiyo-e dog:1.3)": logged, the prompt encodes as it is
    split = "a watercolor of a (ukiyo-e dog:1.3)"
    dm.pseudo_words["zzv"] = dm.pseudo_word("(ukiyo-e", 2.0, gen)
    with caplog.at_level(logging.WARNING):
        out = crossattn(dm, split.replace("(ukiyo-e", "zzv"))
    assert "as other tokens than alone" in caplog.text
    assert torch.allclose(out, crossattn(dm, split), atol=1e-5)
    # a pseudo prompt is not cached: the same name with another embedding encodes anew
    dm.pseudo_words["zzw"] = dm.pseudo_word(word, 2.0, gen)
    assert not torch.allclose(crossattn(dm, prompt.replace(word, "zzw")), crossattn(dm, prompt), atol=1e-3)
    dm.pseudo_words.clear()


def _one_row(cond) -> dict:
    """One prompt's encode() output as {key: value}: a batched dict, or the host's RowConds of one row."""
    if hasattr(cond, "rows"):
        assert len(cond.rows) == 1
        return dict(cond.rows[0])
    return dict(cond)


@pytest.mark.parametrize("family", cf.DIT_FAMILIES)
def test_a_pseudo_word_moves_every_conditioning_of_a_dit(host, family):
    """The DiTs' text encoders (CLIP-L + T5, T5 alone, CLIP-L + CLIP-G + T5, Qwen2.5's byte-level BPE, Gemma's
    SentencePiece): at radius 0 every conditioning tensor (context, pooled `y`, masks) is the word's, and every
    constant (Lumina 2's num_tokens) too; at radius 2 the context and the pooled vector move. Qwen's BPE reads the
    word after a space as other tokens than alone: word_ids reads it as a prompt does."""
    model, clip = cf.build_tiny(family, seed=0)
    dm = host.ComfyDiffusionModel(model, clip, 64, 64)
    assert dm.pseudo_words == {} and dm.knows_word("ukiyo-e")
    gen = torch.Generator().manual_seed(0)
    same, moved = dm.pseudo_word("ukiyo-e", 0.0, gen), dm.pseudo_word("ukiyo-e", 2.0, gen)
    plain = _one_row(dm.encode([PROMPT]))
    dm.pseudo_words.update(zzsame=same, zzmoved=moved)
    try:
        at_zero = _one_row(dm.encode([PROMPT.replace("ukiyo-e", "zzsame")]))
        away = _one_row(dm.encode([PROMPT.replace("ukiyo-e", "zzmoved")]))
    finally:
        dm.pseudo_words.clear()
    assert set(at_zero) == set(plain) == set(away)
    for key, value in plain.items():
        if torch.is_tensor(value):
            assert torch.allclose(at_zero[key].float(), value.float(), atol=1e-5), key
        else:
            assert at_zero[key] == value == away[key], key
    assert not torch.allclose(away["c_crossattn"], plain["c_crossattn"], atol=1e-3)
    if torch.is_tensor(plain.get("y")) and plain["y"].is_floating_point():  # a pooled vector from a CLIP part
        assert not torch.allclose(away["y"], plain["y"], atol=1e-5)


@pytest.mark.parametrize("family", ("sd15", "flux", "qwen_image"))
def test_the_first_word_of_a_prompt_is_perturbed_too(host, family, caplog):
    """Qwen's byte-level BPE reads a word after a space and at the start of a prompt (after its template's newline)
    as different tokens: a pseudo word carries rows for both forms there, and for one where they are the same (CLIP,
    T5: no extra random draws, so their banks are as before)."""
    import logging

    model, clip = cf.build_tiny(family, seed=0)
    dm = host.ComfyDiffusionModel(model, clip, 64, 64)
    pw = dm.pseudo_word("ukiyo-e", 2.0, torch.Generator().manual_seed(0))
    differs = {key: dm.word_ids_alone(key, "ukiyo-e") != dm.word_ids(key, "ukiyo-e") for key in dm._parts}
    assert differs == {key: family == "qwen_image" for key in dm._parts}
    assert (pw.alone is not None) == (family == "qwen_image")
    first = "ukiyo-e painting of a dog"
    plain = _one_row(dm.encode([first]))["c_crossattn"]
    dm.pseudo_words["zzf"] = pw
    try:
        with caplog.at_level(logging.WARNING):
            away = _one_row(dm.encode([first.replace("ukiyo-e", "zzf")]))["c_crossattn"]
    finally:
        dm.pseudo_words.clear()
    assert "as other tokens than alone" not in caplog.text
    assert away.shape == plain.shape and not torch.allclose(away, plain, atol=1e-3)


@pytest.mark.parametrize("family", cf.DIT_FAMILIES)
def test_explicit_pseudo_rows_train_on_a_dit(host, family, caplog):
    """pseudo_rows set by hand on a DiT (auto is 0 there): the banks' prompts join the conditionings, also where the
    host keeps them row-wise (prompts of different token lengths: Chroma's T5, Qwen's and Gemma's unpadded
    embeddings) and where the latents have a frame axis (Qwen-Image); nothing stays after."""
    import logging
    from dataclasses import replace

    import spare_core as sc
    from spare_core import families
    from spare_core.distill import for_model
    from spare_core.saliency import candidate_modules

    model, clip = cf.build_tiny(family, seed=2)
    dm = host.ComfyDiffusionModel(model, clip, 64, 64)
    concept, surrogate = "a watercolor of a cat", "a photo of a cat"
    cfg = sc.DistillConfig([concept], [surrogate], retain=["a photo of a dog"], samples=2, sample_steps=2, steps=2,
                           seed=0, gradient_checkpointing=False, text_encoder="off", pseudo_rows=2,
                           pseudo_forget_rows=2, pseudo_keep=0.0)
    assert for_model(replace(cfg, pseudo_rows=-1, pseudo_forget_rows=-1), dm).pseudo_rows == 0  # auto: off on DiTs
    seen = []
    encode = dm.encode
    dm.encode = lambda prompts: seen.extend(prompts) or encode(prompts)
    modules = list(candidate_modules(dm.network, "all", families.FAMILIES[family]))[:2]
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    dm.encode([concept, surrogate, "a photo of a dog", ""])
    with caplog.at_level(logging.WARNING), host.trainable(dm):
        result = sc.distill(dm, cfg, sc.Saliency({p: 1.0 for p in modules}, modules, {}))
    assert (result.config.pseudo_rows, result.config.pseudo_forget_rows) == (2, 2) and len(result.losses) == 2
    pseudo = [p for p in seen if "zzpseudo" in p]
    assert len(pseudo) >= 32 and all(p.replace(p.split(" ")[1], "watercolor") == concept for p in pseudo)
    assert "as other tokens than alone" not in caplog.text  # the word was perturbed inside every prompt
    assert dm.pseudo_words == {} and "load_model" not in vars(clip)
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in before.items())
