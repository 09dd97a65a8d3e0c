"""The pack inside a real ComfyUI server: /object_info, the shipped workflows (workflows/*.json) run through
POST /prompt, the LoRA files they write, and an input error reported back to the client.

Skipped, with the reason printed, when COMFYUI_PATH is unset. Run:
    COMFYUI_PATH=/work/comfyui OMP_NUM_THREADS=1 .venv-comfy/bin/python -m pytest tests/test_server_comfy.py -q -s

The server is `python main.py --cpu` started from COMFYUI_PATH with the interpreter running pytest (or
$COMFYUI_PYTHON), with `--base-directory` set to a temporary folder: its custom_nodes/ holds links to this pack and to
tests/comfy_test_pack (a weightless tiny checkpoint loader), and models/loras, output, temp, input and user live there
too; the database is in memory. Nothing in COMFYUI_PATH is written (bytecode writing is off for the server).

Each workflow is converted to the API format by tests/workflow_api.py against the server's own /object_info (which
is the validation of the shipped JSON), then made tiny: CheckpointLoaderSimple -> SPARETestTinyCheckpoint, 64 px,
1 sample per prompt, 3 distill steps, 2 sampler steps.
"""
from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import workflow_api as wa
from comfy_fixtures import Server, comfy_server
from spare_core import neighbours
from spare_core.prompts import expand_alternatives

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
TEST_PACK = ROOT / "tests" / "comfy_test_pack"
STYLE_LORA = "spare/erase_vangogh_00001_.safetensors"  # what erase_style.json writes into an empty loras folder

# The six nodes and their inputs, in schema order (required; optional after "|").
EXPECTED_NODES = {
    "SPAREConceptSamples": (["model", "clip", "concept", "samples", "seed", "resolution", "steps", "cfg"], ["guidance"],
                            ["LATENT"]),
    "SPARENearestConcepts": (["clip", "concepts", "candidates", "count"], ["keep"], ["STRING", "STRING"]),
    "SPARESaliencyScan": (["model", "clip", "concept", "retain", "samples", "seed", "selection", "top_k", "targets",
                           "resolution"], ["scoring", "latents", "gradient_checkpointing", "guidance"],
                          ["SPARE_SALIENCY", "IMAGE", "STRING"]),
    "SPARETimestepProfile": (["model", "clip", "concept", "surrogate", "bins", "samples", "seed", "sharpness",
                              "uniform_floor", "resolution", "loss_weighting"], ["latents", "guidance"],
                             ["SPARE_TIMESTEPS", "IMAGE", "STRING"]),
    "SPARESparseLoraDistill": (["model", "clip", "concepts", "surrogates", "retain", "saliency", "rank", "alpha",
                                "steps", "learning_rate", "forget_weight", "retain_weight", "seed", "filename_prefix",
                                "key_format", "gradient_checkpointing", "resolution", "samples", "loss_weighting"],
                               ["timesteps", "latents", "stop_at_gap_closed", "surrogate_anchor", "guidance",
                                "text_encoder", "pseudo_rows", "concept_kind"],
                               ["LORA_MODEL", "IMAGE", "STRING"]),
    "SPAREApplyErasure": (["model", "strength", "lora_name"], ["lora", "clip", "strength_clip"], ["MODEL", "CLIP"]),
}


def _skip_reason() -> str | None:
    path = os.environ.get("COMFYUI_PATH", "")
    if not path or not os.path.isfile(os.path.join(path, "main.py")):
        return "COMFYUI_PATH is not set or holds no ComfyUI checkout (run scripts/setup_comfyui.sh, then export it)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        print("SKIP:", reason)
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "frontend").mkdir()  # an empty front end: the API is all these tests use
    with comfy_server(base, "--front-end-root", str(base / "frontend")) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


# ---------------------------------------------------------------------------------------------------------------------
# Workflows -> tiny API prompts

def load_workflow(name: str) -> dict:
    with open(WORKFLOWS / name, encoding="utf-8") as f:
        return json.load(f)


def tiny_prompt(workflow: dict, object_info: dict, family: str = "sd15", **extra) -> dict:
    """The API prompt of a shipped workflow, made tiny (see the module docstring). `extra`: class_type -> inputs."""
    prompt = wa.ui_to_api(workflow, object_info)
    small = {
        "SPAREConceptSamples": {"samples": 1, "resolution": 64, "steps": 2},
        "SPARESaliencyScan": {"samples": 1, "resolution": 64},
        "SPARETimestepProfile": {"samples": 1, "bins": 4, "resolution": 64},
        "SPARESparseLoraDistill": {"steps": 3, "resolution": 64, "samples": 1},
        "KSampler": {"steps": 2},
        "EmptyLatentImage": {"width": 64, "height": 64},
    }
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "SPARETestTinyCheckpoint", {"family": family, "seed": 0}
        node["inputs"].update(small.get(node["class_type"], {}))
        node["inputs"].update(extra.get(node["class_type"], {}))
    return prompt


def nodes_of(prompt: dict, class_type: str) -> dict:
    return {k: v for k, v in prompt.items() if v["class_type"] == class_type}


def assert_success(entry: dict, server: Server, what: str):
    status = entry["status"]
    if status.get("status_str") != "success":
        errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
        detail = "\n".join(f"{e.get('node_type')} (node {e.get('node_id')}): {e.get('exception_type')}: "
                           f"{e.get('exception_message')}\n{''.join(e.get('traceback') or [])}" for e in errors)
        raise AssertionError(f"{what} failed on the server:\n{detail or status}\n{server.log()[-3000:]}")


def assert_images(entry: dict, server: Server, prompt: dict, class_type: str):
    for node_id in nodes_of(prompt, class_type):
        images = entry["outputs"].get(node_id, {}).get("images")
        assert images, f"{class_type} {node_id} produced no image: {entry['outputs']}"
        for im in images:  # fetched back the way the frontend shows them
            query = urllib.parse.urlencode({k: im[k] for k in ("filename", "subfolder", "type")})
            with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
                assert r.status == 200 and r.read(8) == b"\x89PNG\r\n\x1a\n", (class_type, node_id, im)
            if im["type"] == "output":
                assert (server.base / "output" / im["subfolder"] / im["filename"]).is_file(), im


def check_lora_file(path: Path, key_format: str, text: bool = True):
    """The file's keys, format metadata and ranks; text: it must hold text-encoder keys too (Distill's text_encoder
    auto on a UNet), else none."""
    from safetensors import safe_open

    assert path.is_file(), f"{path} was not written; loras folder: {sorted(p.name for p in path.parent.rglob('*'))}"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    prefix, text_prefix = ("diffusion_model.", "text_encoders.") if key_format == "comfyui" else \
        ("lora_unet_", "lora_te")
    assert keys and all(k.startswith((prefix, text_prefix)) for k in keys), keys[:5]
    assert any(k.startswith(prefix) for k in keys) and any(k.startswith(text_prefix) for k in keys) == text, keys[:5]
    assert any(k.endswith(".lora_up.weight") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    assert meta.get("spare.key_format") == key_format, meta
    assert meta.get("ss_network_dim") == "8" and "spare.base_model" in meta, meta
    downs = [s for k, s in shapes.items() if k.endswith(".lora_down.weight")]
    # rank 8 (the workflows' setting); a module narrower than 8 (the 4-channel output conv) is capped to its width
    assert max(s[0] for s in downs) == 8 and all(s[0] in (8, 4) for s in downs), \
        sorted({s[0] for s in downs})
    return keys, meta


def assert_no_lost_keys(server: Server):
    lost = [ln for ln in server.log().splitlines() if "lora key not loaded" in ln or "NOT LOADED" in ln]
    assert not lost, "ComfyUI's LoRA loader ignored keys:\n" + "\n".join(lost[:10])


# ---------------------------------------------------------------------------------------------------------------------
# Tests

def test_object_info_lists_the_nodes(server, object_info):
    for name, (required, optional, outputs) in EXPECTED_NODES.items():
        assert name in object_info, f"{name} missing from /object_info (pack import failed?)\n{server.log()[-3000:]}"
        info = object_info[name]
        assert info["input_order"]["required"] == required, (name, info["input_order"])
        assert info["input_order"].get("optional", []) == optional, (name, info["input_order"])
        assert info["output"] == outputs, (name, info["output"])
        assert info["category"] == "SPARE"
    # seeds are plain widgets (no control_after_generate companion): the workflows' widgets_values rely on it
    for name in ("SPARESaliencyScan", "SPARETimestepProfile", "SPARESparseLoraDistill"):
        assert object_info[name]["input"]["required"]["seed"][1].get("control_after_generate") is False
    assert object_info["SPARESparseLoraDistill"]["output_node"] is True
    assert "SPARETestTinyCheckpoint" in object_info


def test_workflows_are_served_as_templates(server):
    """ComfyUI lists a pack's workflows/ folder in its template browser and serves the files."""
    templates = server.get("/api/workflow_templates")
    assert sorted(templates.get("spare", [])) == sorted(p.stem for p in WORKFLOWS.glob("*.json")), templates
    served = server.get("/api/workflow_templates/spare/erase_style.json")
    assert served == load_workflow("erase_style.json")


def test_converter_validates_against_object_info(object_info):
    for path in sorted(WORKFLOWS.glob("*.json")):
        wf = json.loads(path.read_text(encoding="utf-8"))
        prompt = wa.ui_to_api(wf, object_info)
        assert prompt, path.name
        assert any(n["class_type"].startswith("SPARE") or n["class_type"] == "LoraLoader"
                   for n in prompt.values()), path.name
        notes = [n for n in wf["nodes"] if n["type"] == "Note"]
        assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 100, path.name
        assert wf["version"] == 0.4 and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
        assert wf["last_link_id"] == max(link[0] for link in wf["links"])

    wf = load_workflow("erase_style.json")
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    prompt = wa.ui_to_api(wf, object_info)
    assert prompt[str(ks["id"])]["inputs"]["seed"] == 42 and prompt[str(ks["id"])]["inputs"]["steps"] == 20

    bad = json.loads(json.dumps(wf))
    next(n for n in bad["nodes"] if n["type"] == "SPAREApplyErasure")["type"] = "SPARENoSuchNode"
    with pytest.raises(wa.WorkflowError, match="unknown node type 'SPARENoSuchNode'"):
        wa.ui_to_api(bad, object_info)

    bad = json.loads(json.dumps(wf))
    next(n for n in bad["nodes"] if n["type"] == "SPARESaliencyScan")["widgets_values"].pop()
    with pytest.raises(wa.WorkflowError, match="widgets_values has 10 values.*11 widget values"):
        wa.ui_to_api(bad, object_info)

    bad = json.loads(json.dumps(wf))
    next(n for n in bad["nodes"] if n["type"] == "KSampler")["widgets_values"].remove("fixed")
    with pytest.raises(wa.WorkflowError, match="widgets_values has 6 values"):
        wa.ui_to_api(bad, object_info)

    bad = json.loads(json.dumps(wf))  # a seed companion value on a SPARE seed (control_after_generate=False)
    values = next(n for n in bad["nodes"] if n["type"] == "SPARETimestepProfile")["widgets_values"]
    values.insert(values.index(0) + 1, "fixed")
    with pytest.raises(wa.WorkflowError, match="widgets_values has 11 values"):
        wa.ui_to_api(bad, object_info)

    # frontend-only nodes: a PrimitiveNode feeding a widget converted to an input, through a Reroute
    wf = load_workflow("reuse_lora_stock_loader.json")
    ksn = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    nid, lid = wf["last_node_id"], wf["last_link_id"]
    wf["nodes"] += [
        {"id": nid + 1, "type": "PrimitiveNode", "mode": 0, "inputs": [], "widgets_values": [1234, "fixed"],
         "outputs": [{"name": "INT", "type": "INT", "links": [lid + 1], "widget": {"name": "seed"}}]},
        {"id": nid + 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": lid + 1}],
         "outputs": [{"name": "", "type": "INT", "links": [lid + 2]}]},
    ]
    ksn["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": lid + 2})
    wf["links"] += [[lid + 1, nid + 1, 0, nid + 2, 0, "INT"], [lid + 2, nid + 2, 0, ksn["id"], len(ksn["inputs"]) - 1,
                                                              "INT"]]
    prompt = wa.ui_to_api(wf, object_info)
    assert prompt[str(ksn["id"])]["inputs"]["seed"] == 1234
    assert all(n["class_type"] not in ("PrimitiveNode", "Reroute", "Note") for n in prompt.values())


@pytest.fixture(scope="module")
def style_run(server, object_info):
    """erase_style.json on the tiny SD1.5, comfyui key format; the LoRA it writes is used by the later workflows."""
    wf = load_workflow("erase_style.json")
    prompt = tiny_prompt(wf, object_info, "sd15")
    t = time.monotonic()
    entry = server.run(prompt, wf)
    print(f"[erase_style] {time.monotonic() - t:.1f}s")
    return wf, prompt, entry


def test_erase_style_workflow(server, style_run):
    wf, prompt, entry = style_run
    assert_success(entry, server, "erase_style.json")
    assert_images(entry, server, prompt, "SaveImage")
    assert_images(entry, server, prompt, "PreviewImage")  # concept samples, heatmap, timestep plot, loss curve
    (distill,) = nodes_of(prompt, "SPARESparseLoraDistill").values()
    assert distill["inputs"]["filename_prefix"] + "_00001_.safetensors" == STYLE_LORA  # what the other workflows use
    keys, meta = check_lora_file(server.loras / STYLE_LORA, "comfyui")
    print(f"[erase_style] {STYLE_LORA}: {len(keys)} tensors, metadata {sorted(meta)}")
    # Distill's retain list came from SPARE Nearest Concepts: its keep lines, then the expansions of 8 of its
    # candidate lines (the default list's), as the file records
    ((nearest_id, nearest),) = nodes_of(prompt, "SPARENearestConcepts").items()
    assert distill["inputs"]["retain"] == [nearest_id, 0]
    retain = json.loads(meta["spare.retain"])
    keep = nearest["inputs"]["keep"].splitlines()
    assert retain[:len(keep)] == keep, retain
    picked = [line for line in neighbours.DEFAULT_CANDIDATES
              if set(expand_alternatives([line])) & set(retain[len(keep):])]
    assert len(picked) == nearest["inputs"]["count"] == 8, picked
    assert set(retain) == set(keep).union(*(expand_alternatives([line]) for line in picked)), retain
    assert_no_lost_keys(server)
    # the new file is offered by Apply Erasure's lora_name list (fresh /object_info, no restart)
    options = server.get("/object_info/SPAREApplyErasure")["SPAREApplyErasure"]["input"]["required"]["lora_name"]
    assert STYLE_LORA in options[1]["options"], options


def test_erase_object_workflow_sdxl_kohya(server, object_info):
    """erase_object.json on the tiny SDXL (needs the `y` conditioning), saving kohya keys; its retain list from SPARE
    Nearest Concepts."""
    wf = load_workflow("erase_object.json")
    prompt = tiny_prompt(wf, object_info, "sdxl", SPARESparseLoraDistill={"key_format": "kohya"})
    (distill,) = nodes_of(prompt, "SPARESparseLoraDistill").values()
    t = time.monotonic()
    entry = server.run(prompt, wf)
    print(f"[erase_object, sdxl] {time.monotonic() - t:.1f}s")
    assert_success(entry, server, "erase_object.json")
    assert_images(entry, server, prompt, "SaveImage")
    assert_images(entry, server, prompt, "PreviewImage")
    name = distill["inputs"]["filename_prefix"] + "_00001_.safetensors"
    keys, meta = check_lora_file(server.loras / name, "kohya")
    assert meta["spare.base_model"] == "SDXL", meta
    # retain from SPARE Nearest Concepts, as in erase_style.json: the keep lines' expansions, then 8 candidate lines';
    # every default line with "a cat" in it names the concept and is never retained
    ((nearest_id, nearest),) = nodes_of(prompt, "SPARENearestConcepts").items()
    assert distill["inputs"]["retain"] == [nearest_id, 0] and nearest["inputs"]["concepts"] == "a cat"
    retain, keep = json.loads(meta["spare.retain"]), expand_alternatives(nearest["inputs"]["keep"].splitlines())
    assert retain[:len(keep)] == keep and not any("cat" in p.split() for p in retain), retain
    picked = [line for line in neighbours.DEFAULT_CANDIDATES
              if set(expand_alternatives([line])) & set(retain[len(keep):])]
    assert len(picked) == 8 and set(retain) == set(keep).union(*(expand_alternatives([x]) for x in picked)), picked
    assert_no_lost_keys(server)


def test_before_after_workflow(server, object_info, style_run):
    assert_success(style_run[2], server, "erase_style.json (makes the LoRA)")
    wf = load_workflow("before_after.json")
    prompt = tiny_prompt(wf, object_info, "sd15")
    (apply,) = nodes_of(prompt, "SPAREApplyErasure").values()
    assert apply["inputs"]["lora_name"] == STYLE_LORA and "lora" not in apply["inputs"]
    assert len(nodes_of(prompt, "KSampler")) == 2
    seeds = {n["inputs"]["seed"] for n in nodes_of(prompt, "KSampler").values()}
    assert len(seeds) == 1, seeds
    t = time.monotonic()
    entry = server.run(prompt, wf)
    print(f"[before_after] {time.monotonic() - t:.1f}s")
    assert_success(entry, server, "before_after.json")
    assert_images(entry, server, prompt, "SaveImage")
    (save_id,) = nodes_of(prompt, "SaveImage")
    assert len(entry["outputs"][save_id]["images"]) == 2  # original and erased, side by side
    assert_no_lost_keys(server)


def test_reuse_lora_with_stock_loader(server, object_info, style_run):
    assert_success(style_run[2], server, "erase_style.json (makes the LoRA)")
    wf = load_workflow("reuse_lora_stock_loader.json")
    prompt = tiny_prompt(wf, object_info, "sd15")
    (loader,) = nodes_of(prompt, "LoraLoader").values()  # model and CLIP: the file edits the text encoder too
    assert loader["inputs"]["lora_name"] == STYLE_LORA
    t = time.monotonic()
    entry = server.run(prompt, wf)
    print(f"[reuse_lora_stock_loader] {time.monotonic() - t:.1f}s")
    assert_success(entry, server, "reuse_lora_stock_loader.json")
    assert_images(entry, server, prompt, "SaveImage")
    assert_no_lost_keys(server)


def test_empty_concept_is_reported_with_the_input_name(server, object_info):
    prompt = {
        "1": {"class_type": "SPARETestTinyCheckpoint", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "SPARESaliencyScan", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concept": "  \n ", "retain": "", "samples": 1, "seed": 0,
            "selection": 0.5, "top_k": 0, "targets": "attention", "resolution": 64}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "spare-test"})
    if status == 400:  # rejected by validation: the node error must name the input
        text = json.dumps(body.get("node_errors", body))
    else:
        assert status == 200, (status, body)
        entry = server.wait(body["prompt_id"])
        assert entry["status"]["status_str"] == "error", entry["status"]
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and errors[0]["node_type"] == "SPARESaliencyScan", errors
        text = errors[0]["exception_message"]
    print(f"[empty concept] {text}")
    assert "'concept' is empty" in text, text
    # the server keeps serving after the error
    assert server.get("/object_info/SPAREApplyErasure")
