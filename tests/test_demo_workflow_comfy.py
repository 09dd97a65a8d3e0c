"""workflows/demo_minicanvas.json, demo_minicanvas_flux.json and demo_minicanvas_flux_dev.json on a real ComfyUI server
with real weights (the bundled MiniCanvas model; MiniCanvas-Flux: ComfyUI's own Flux class, tiny; MiniCanvas-Flux-dev:
the same guidance-distilled, sampled at cfg 1 behind FluxGuidance), judged by the shipped classifiers; every test
runs once per workflow (the `demo` fixture): the style it erases ("neon") is gone from the erased model's images, the other styles
are still drawn, and the LoRA file it writes loads through ComfyUI's stock loader with every key mapped.

Skipped, with the reason printed, when COMFYUI_PATH is unset. Run:
    COMFYUI_PATH=/work/comfyui OMP_NUM_THREADS=1 .venv-comfy/bin/python -m pytest -q tests/test_demo_workflow_comfy.py -s

The server is the one tests/test_server_comfy.py builds (its `server` fixture, imported here: module-scoped, so this
module gets its own server). The workflow is converted by tests/workflow_api.py against the server's /object_info and
run as shipped: every SPARE node keeps its settings (the test proves that the shipped settings erase), and so do the
before/after KSamplers. The test's copy of the API prompt only gains judge branches: KSamplers with the workflow's own
sampler settings (UNet: dpmpp_2m, karras, 20 steps, cfg 4; Flux: euler, simple, 12 steps, cfg 4; empty negative), one image each, through the erased MODEL (Apply
Erasure's output) and through the unerased one (the demo model's), on prompts written with the held-out templates
(data.TEMPLATES other than index 0, which every training prompt of the workflow uses), each saved at 32 x 32 by
SaveImage. The images are fetched back through /view and judged by bench/minicanvas's Judge (harness.py):
- UA (share of the erased model's "neon" images NOT classified neon) >= 90 (harness.ERASED_UA), over every object x
  every held-out template; the same prompts and seeds on the unerased model are classified neon (the judge sees the
  style the erasure removed);
- the other nine styles through the erased model: >= 80% classified as the style asked for;
- the workflow's own AFTER preview (4 images of its prompt "A star image in neon style.", upscaled 4x nearest) is not
  neon, its BEFORE preview is, and its SURROGATE preview (the original model on "A star image in plain style.") is
  plain.
Measured with one thread on a 2-core machine whose other core ran a benchmark: the file takes ~125 s (server start
~8 s; each workflow with its 116 judge images: UNet ~70 s, Flux ~42 s; the stock-loader prompts and the judging a few
seconds).
"""
from __future__ import annotations

import io
import json
import logging
import time
import urllib.parse
import urllib.request

import pytest
import torch
import torch.nn.functional as F

import workflow_api as wa
from test_server_comfy import (  # noqa: F401  (server, object_info: fixtures, used by name)
    Server, assert_no_lost_keys, assert_success, check_lora_file, load_workflow, nodes_of, object_info, server)

# (workflow, the LoRA it writes into an empty loras folder)
DEMOS = {"unet": ("demo_minicanvas.json", "spare/erase_neon_minicanvas_00001_.safetensors"),
         "flux": ("demo_minicanvas_flux.json", "spare/erase_neon_minicanvas_flux_00001_.safetensors"),
         # guidance-distilled: KSamplers at cfg 1 behind FluxGuidance 3.5 (the judge branches: Flux's default 3.5)
         "flux-dev": ("demo_minicanvas_flux_dev.json", "spare/erase_neon_minicanvas_flux_dev_00001_.safetensors")}
ERASED = "neon"
RUN_TIMEOUT = 420  # s for the workflow (the erase alone: ~70 s on one free core)
KEEP_MIN = 80.0  # % of the other styles' images still classified as the style asked for (erased model)
BASE_NEON_MIN = 80.0  # % of the unerased model's neon images classified neon (the judge sees the style at all)
FIRST_JUDGE_ID = 1000  # ids of the nodes the test adds (the workflow's own ids are below 100)


def _bench():
    """bench.minicanvas's data, harness (Judge, ERASABLE_STYLES, ERASABLE_OBJECTS, ERASED_UA, EVAL_TEMPLATES) and metrics."""
    from bench.minicanvas import harness, metrics
    from spare_core.minicanvas import data
    return data, harness, metrics


# ---------------------------------------------------------------------------------------------------------------------
# The test's copy of the API prompt: judge branches

def judge_set():
    """[(label, style, object, prompt, seed)]: every object in the erased style with every held-out template
    (10 x 4 prompts), then every other style on 4 objects (cycling, so every object and template appears)."""
    data, harness, _ = _bench()
    templates = harness.EVAL_TEMPLATES
    out = []
    for oi, o in enumerate(harness.ERASABLE_OBJECTS):
        for k, tpl in enumerate(templates):
            out.append(("erased", ERASED, o, data.prompt(ERASED, o, tpl), 10_000 + 10 * oi + k))
    others = [s for s in harness.ERASABLE_STYLES if s != ERASED]
    for si, s in enumerate(others):
        for k in range(4):
            oi = (2 * si + 3 * k) % len(harness.ERASABLE_OBJECTS)
            o = harness.ERASABLE_OBJECTS[oi]
            out.append(("other", s, o, data.prompt(s, o, templates[(si + k) % len(templates)]),
                        20_000 + 100 * si + k))
    return out


def source(prompt: dict, node_id: str, name: str) -> str:
    """Id of the node feeding input `name` of node `node_id`."""
    link = prompt[node_id]["inputs"][name]
    assert isinstance(link, list), (node_id, name, link)
    return link[0]


def add_judge_branches(prompt: dict) -> tuple[dict, dict]:
    """A copy of `prompt` with the judge branches (module docstring); returns (prompt, {SaveImage id: (model kind,
    label, style, object, text, seed)}), model kind "erased" (Apply Erasure's MODEL) or "base" (the demo model's)."""
    prompt = json.loads(json.dumps(prompt))
    (demo_id,) = nodes_of(prompt, "SPAREDemoModel")
    (apply_id,) = nodes_of(prompt, "SPAREApplyErasure")
    after = [k for k, n in nodes_of(prompt, "KSampler").items() if source(prompt, k, "model") == apply_id]
    assert len(after) == 1, after
    settings = prompt[after[0]]["inputs"]
    negative = settings["negative"]
    models = {"erased": [apply_id, 0], "base": [demo_id, 0]}
    clips = {"erased": [apply_id, 1], "base": [demo_id, 1]}  # Apply Erasure's CLIP: the LoRA's text-encoder part
    judged = {}
    next_id = FIRST_JUDGE_ID
    assert max(int(k) for k in prompt) < FIRST_JUDGE_ID
    for label, style, obj, text, seed in judge_set():
        for kind in ("erased", "base") if label == "erased" else ("erased",):
            enc, ks, dec, save = (str(next_id + i) for i in range(4))
            next_id += 4
            prompt[enc] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clips[kind]}}
            prompt[ks] = {"class_type": "KSampler", "inputs": {
                **{k: settings[k] for k in ("steps", "cfg", "sampler_name", "scheduler", "denoise")},
                "seed": seed, "model": models[kind], "positive": [enc, 0], "negative": negative,
                "latent_image": [demo_id, 3]}}  # the demo model's empty 32 x 32 latent, one image
            prompt[dec] = {"class_type": "VAEDecode", "inputs": {"samples": [ks, 0], "vae": [demo_id, 2]}}
            prompt[save] = {"class_type": "SaveImage", "inputs": {
                "images": [dec, 0], "filename_prefix": f"judge/{kind}_{label}_{style}_{obj}"}}
            judged[save] = (kind, label, style, obj, text, seed)
    return prompt, judged


# ---------------------------------------------------------------------------------------------------------------------
# Running and fetching

def run_long(server: Server, prompt: dict, workflow: dict, timeout: float = RUN_TIMEOUT) -> dict:
    """Server.run with a longer deadline (comfy_fixtures.RUN_TIMEOUT is sized for tiny models)."""
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "spare-test",
                                           "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert status == 200, f"/prompt refused the graph ({status}): {json.dumps(body)[:3000]}"
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"the server died:\n{server.log()[-5000:]}"
        hist = server.get(f"/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("status_str") in ("success", "error"):
            return hist[prompt_id]
        time.sleep(0.5)
    server.post("/interrupt", {})
    raise AssertionError(f"prompt {prompt_id} not finished after {timeout}s:\n{server.log()[-5000:]}")


def fetch_images(server: Server, entry: dict, node_id: str) -> torch.Tensor:
    """The images a SaveImage/PreviewImage node produced, fetched through /view: [B, 3, H, W] in [0, 1]."""
    import numpy as np
    from PIL import Image

    images = entry["outputs"].get(node_id, {}).get("images")
    assert images, f"node {node_id} produced no image: {entry['outputs'].get(node_id)}"
    out = []
    for im in images:
        query = urllib.parse.urlencode({k: im[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
            pixels = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(pixels).permute(2, 0, 1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------------
# The run (once for the module)

@pytest.fixture(scope="module", params=list(DEMOS))
def demo(request):
    """(workflow file, LoRA file) of one demo workflow; every test runs for each."""
    return DEMOS[request.param]


@pytest.fixture(scope="module")
def demo_run(server, object_info, demo):
    """The shipped workflow plus the judge branches, run once: (workflow, shipped API prompt, run prompt, judged
    SaveImage ids, history entry, seconds)."""
    workflow = demo[0]
    wf = load_workflow(workflow)
    shipped = wa.ui_to_api(wf, object_info)
    prompt, judged = add_judge_branches(shipped)
    t = time.monotonic()
    entry = run_long(server, prompt, wf)
    seconds = time.monotonic() - t
    print(f"\n[{workflow}] {seconds:.1f}s ({len(prompt)} nodes, {len(judged)} judge images)")
    return wf, shipped, prompt, judged, entry, seconds


@pytest.fixture(scope="module")
def verdicts(server, demo_run, demo):
    """{SaveImage id: (kind, label, style, object, text, seed, predicted style name)} from the shipped judge."""
    data, harness, _ = _bench()
    _, _, _, judged, entry, _ = demo_run
    assert_success(entry, server, demo[0])
    ids = list(judged)
    images = torch.cat([fetch_images(server, entry, i) for i in ids])
    assert images.shape == (len(ids), 3, 32, 32), images.shape  # full resolution, before any upscale
    pred = harness.Judge()(images)["style"]
    return {i: (*judged[i], data.STYLE_NAMES[p]) for i, p in zip(ids, pred.tolist())}


# ---------------------------------------------------------------------------------------------------------------------
# Tests

def test_demo_workflow_runs_as_shipped(server, demo_run, demo):
    workflow, lora_file = demo
    wf, shipped, prompt, _, entry, _ = demo_run
    assert_success(entry, server, workflow)
    # the workflow's own nodes ran unchanged (the test only added nodes)
    assert {k: prompt[k] for k in shipped} == shipped
    (distill,) = nodes_of(shipped, "SPARESparseLoraDistill").values()
    assert distill["inputs"]["filename_prefix"] + "_00001_.safetensors" == lora_file
    # every preview of the workflow (concept samples, heatmap, timestep plot, loss curve, before, after) was made
    for node_id in nodes_of(shipped, "PreviewImage"):
        assert entry["outputs"].get(node_id, {}).get("images"), (node_id, entry["outputs"].get(node_id))


def test_lora_file_is_written_and_loads_with_every_key(server, demo_run, demo, caplog):
    """The LoRA file: SPARE's format (check_lora_file), every key mapped by comfy.lora's key maps of the demo model
    and its CLIP (in this process, counted), no "lora key not loaded" in the server log, and the stock LoraLoader on
    the file (model and CLIP) draws what Apply Erasure drew from the in-memory LoRA."""
    workflow, lora_file = demo
    _, shipped, prompt, judged, entry, _ = demo_run
    assert_success(entry, server, workflow)
    (demo_id,) = nodes_of(shipped, "SPAREDemoModel")
    unet = shipped[demo_id]["inputs"].get("model", "MiniCanvas (UNet)") == "MiniCanvas (UNet)"  # text_encoder auto: UNet only
    keys, meta = check_lora_file(server.loras / lora_file, "comfyui", text=unet)
    assert_no_lost_keys(server)
    modules = {k[:-len(".lora_up.weight")] for k in keys if k.endswith(".lora_up.weight")}
    print(f"[lora] {lora_file}: {len(keys)} tensors, {len(modules)} modules, "
          f"{(server.loras / lora_file).stat().st_size / 1024:.0f} KiB, base model {meta.get('spare.base_model')}")

    import comfy_fixtures as cf
    cf.comfy_or_skip()
    import comfy.lora
    import comfy.utils
    # the MODEL the workflow's demo node loaded: its `model` choice through the node's own loaders
    model, clip = cf.load_pack_module("nodes/demo_model.py").DEMOS[shipped[demo_id]["inputs"]["model"]]()[:2]
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert modules and all(m in key_map for m in modules), sorted(modules - set(key_map))[:5]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(server.loras / lora_file), safe_load=True),
                                       key_map, log_missing=True)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()], caplog.text
    assert len(patches) == len(modules), (len(patches), len(modules))

    # the stock loader on the written file, same sampler, prompts and seeds as two judge images (a second prompt:
    # the file did not exist when the first one was validated)
    picks = [next(i for i, j in judged.items() if j[0] == "erased" and j[1] == label) for label in ("erased", "other")]
    second = {demo_id: shipped[demo_id],
              "900": {"class_type": "LoraLoader",
                      "inputs": {"model": [demo_id, 0], "clip": [demo_id, 1], "lora_name": lora_file,
                                 "strength_model": 1.0, "strength_clip": 1.0}}}

    def with_loader_clip(node_id):  # a CLIPTextEncode of the prompt, on the stock loader's CLIP
        return dict(prompt[node_id], inputs=dict(prompt[node_id]["inputs"], clip=["900", 1]))
    for save_id in picks:
        ks = source(prompt, source(prompt, save_id, "images"), "samples")
        enc, neg = source(prompt, ks, "positive"), source(prompt, ks, "negative")
        dec = source(prompt, save_id, "images")
        second.update({enc: with_loader_clip(enc), neg: with_loader_clip(neg), dec: prompt[dec],
                       save_id: prompt[save_id],
                       ks: dict(prompt[ks], inputs=dict(prompt[ks]["inputs"], model=["900", 0]))})
    entry2 = run_long(server, second, {}, timeout=120)
    assert_success(entry2, server, "stock LoraLoader on " + lora_file)
    assert_no_lost_keys(server)
    for save_id in picks:
        stock, ours = fetch_images(server, entry2, save_id), fetch_images(server, entry, save_id)
        diff = (stock - ours).abs().max().item() * 255
        print(f"[lora] stock loader vs Apply Erasure, {judged[save_id][4]!r}: max difference {diff:.0f}/255")
        assert diff <= 2, diff


def test_erased_style_is_judged_erased(server, demo_run, verdicts):
    data, harness, _ = _bench()
    _, shipped, prompt, judged, entry, seconds = demo_run
    erased = [v for v in verdicts.values() if v[0] == "erased" and v[1] == "erased"]
    base = [v for v in verdicts.values() if v[0] == "base"]
    others = [v for v in verdicts.values() if v[0] == "erased" and v[1] == "other"]
    ua = 100.0 * sum(v[6] != ERASED for v in erased) / len(erased)
    base_neon = 100.0 * sum(v[6] == ERASED for v in base) / len(base)
    keep = 100.0 * sum(v[6] == v[2] for v in others) / len(others)
    landed = {}
    for v in erased:
        landed[v[6]] = landed.get(v[6], 0) + 1
    per_style = {}
    for v in others:
        per_style.setdefault(v[2], []).append(v[6] == v[2])
    print(f"[judge] erased model, '{ERASED}' on {len(erased)} held-out prompts: UA {ua:.1f} (classified as "
          f"{dict(sorted(landed.items(), key=lambda kv: -kv[1]))})")
    print(f"[judge] unerased model, same prompts and seeds: {base_neon:.1f}% classified '{ERASED}'")
    print(f"[judge] erased model, other styles: {keep:.1f}% correct over {len(others)} images "
          f"({', '.join(f'{s} {sum(h)}/{len(h)}' for s, h in per_style.items())})")
    missed = [(v[4], v[6]) for v in erased if v[6] == ERASED]
    wrong = [(v[4], v[6]) for v in others if v[6] != v[2]]
    assert base_neon >= BASE_NEON_MIN, f"the unerased model's '{ERASED}' images are not judged '{ERASED}'"
    assert ua >= harness.ERASED_UA, f"NOT erased: UA {ua:.1f} < {harness.ERASED_UA}; still '{ERASED}': {missed}"
    assert keep >= KEEP_MIN, f"other styles damaged: {keep:.1f}% < {KEEP_MIN}; misjudged: {wrong}"

    # the workflow's own before/after previews (its prompt, template 0; upscaled 4x nearest: area-downscaled back)
    judge = harness.Judge()
    (apply_id,) = nodes_of(shipped, "SPAREApplyErasure")
    seen = {}
    for node_id in nodes_of(shipped, "PreviewImage"):
        up = source(shipped, node_id, "images")
        if shipped[up]["class_type"] != "ImageScale" or shipped[source(shipped, up, "image")]["class_type"] != \
                "VAEDecode":
            continue
        ks = source(shipped, source(shipped, up, "image"), "samples")
        if shipped[ks]["class_type"] != "KSampler":
            continue
        images = fetch_images(server, entry, node_id)
        assert images.shape[-1] % 32 == 0, images.shape
        small = F.interpolate(images, size=(32, 32), mode="area")
        encoder = source(shipped, ks, "positive")
        while shipped[encoder]["class_type"] != "CLIPTextEncode":  # through FluxGuidance (the -dev workflow)
            encoder = source(shipped, encoder, "conditioning")
        text = shipped[encoder]["inputs"]["text"]
        if source(shipped, ks, "model") == apply_id:
            kind = "after"
        else:  # the original model: BEFORE draws the erased style, SURROGATE the neutral one
            kind = "surrogate" if data.NEUTRAL_STYLE in text else "before"
        assert kind not in seen, (kind, node_id)
        seen[kind] = [data.STYLE_NAMES[p] for p in judge(small)["style"].tolist()]
    print(f"[judge] the workflow's previews ({len(seen.get('after', []))} images each): before {seen.get('before')}, "
          f"after {seen.get('after')}, surrogate {seen.get('surrogate')}  [run {seconds:.0f}s]")
    assert set(seen) == {"before", "after", "surrogate"}, seen
    neutral = data.NEUTRAL_STYLE
    assert seen["surrogate"].count(neutral) >= 0.8 * len(seen["surrogate"]), seen
    assert seen["before"].count(ERASED) >= 0.8 * len(seen["before"]), seen
    assert seen["after"].count(ERASED) <= 0.1 * len(seen["after"]), seen
