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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import workflow_api as wa

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
TEST_PACK = ROOT / "tests" / "comfy_test_pack"
START_TIMEOUT = 120  # s until the server answers
RUN_TIMEOUT = 120  # s per prompt
STYLE_LORA = "spare/erase_vangogh_00001_.safetensors"  # what erase_style.json writes into an empty loras folder

# The five nodes and their inputs, in schema order (required; optional after "|").
EXPECTED_NODES = {
    "SPAREConceptSamples": (["model", "clip", "concept", "samples", "seed", "resolution", "steps", "cfg"], [],
                            ["LATENT"]),
    "SPARESaliencyScan": (["model", "clip", "concept", "retain", "samples", "seed", "selection", "top_k", "targets",
                           "resolution"], ["scoring", "latents", "gradient_checkpointing"],
                          ["SPARE_SALIENCY", "IMAGE", "STRING"]),
    "SPARETimestepProfile": (["model", "clip", "concept", "surrogate", "bins", "samples", "seed", "sharpness",
                              "uniform_floor", "resolution", "loss_weighting"], ["latents"],
                             ["SPARE_TIMESTEPS", "IMAGE", "STRING"]),
    "SPARESparseLoraDistill": (["model", "clip", "concepts", "surrogates", "retain", "saliency", "rank", "alpha",
                                "steps", "learning_rate", "forget_weight", "retain_weight", "seed", "filename_prefix",
                                "key_format", "gradient_checkpointing", "resolution", "samples", "loss_weighting"],
                               ["timesteps", "latents", "stop_at_gap_closed"],
                               ["LORA_MODEL", "IMAGE", "STRING"]),
    "SPAREApplyErasure": (["model", "strength", "lora_name"], ["lora"], ["MODEL"]),
}


def _skip_reason() -> str | None:
    path = os.environ.get("COMFYUI_PATH", "")
    if not path or not os.path.isfile(os.path.join(path, "main.py")):
        return "COMFYUI_PATH is not set or holds no ComfyUI checkout (run scripts/setup_comfyui.sh, then export it)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The server

class Server:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def post(self, path: str, payload) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, workflow: dict | None = None) -> dict:
        """POST /prompt, wait for /history/{id}; returns the history entry (status + outputs)."""
        extra = {"extra_pnginfo": {"workflow": workflow}} if workflow else {}
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "spare-test", "extra_data": extra})
        assert status == 200, f"/prompt refused the graph ({status}): {json.dumps(body)[:3000]}"
        return self.wait(body["prompt_id"])

    def wait(self, prompt_id: str) -> dict:
        """Poll /history/{id} until the prompt finished (success or error); interrupt it after RUN_TIMEOUT."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server died:\n{self.log()[-5000:]}"
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                if hist[prompt_id]["status"].get("status_str") in ("success", "error"):
                    return hist[prompt_id]
            time.sleep(0.2)
        self.post("/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} not finished after {RUN_TIMEOUT}s:\n{self.log()[-5000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session started for this server only
                self.proc.wait(timeout=15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        print("SKIP:", reason)
        pytest.skip(reason)
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    base = tmp_path_factory.mktemp("comfy_base")
    for d in ("custom_nodes", "models/loras", "output", "temp", "input", "user", "frontend"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / "spare").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "spare_test_pack").symlink_to(TEST_PACK, target_is_directory=True)
    port = _free_port()
    log_path = base / "server.log"
    cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--front-end-root", str(base / "frontend"), "--base-directory", str(base),
           "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
           "--disable-auto-launch"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1",
               PYTHONUNBUFFERED="1", SPARE_TESTS_DIR=str(ROOT / "tests"))
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    srv = Server(base, port, proc, log_path)
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}) while starting:\n{srv.log()[-5000:]}")
            if time.monotonic() - started > START_TIMEOUT:
                raise AssertionError(f"the server did not answer within {START_TIMEOUT}s:\n{srv.log()[-5000:]}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.3)
        print(f"\n[server] ready on port {port} after {time.monotonic() - started:.1f}s (base {base})")
        log = srv.log()
        assert "IMPORT FAILED" not in "\n".join(ln for ln in log.splitlines() if "custom_nodes" in ln), log[-5000:]
        yield srv
    except BaseException:
        srv.stop()
        print("[server] log tail:\n" + srv.log()[-5000:])
        raise
    srv.stop()
    print(f"[server] stopped; up {time.monotonic() - started:.1f}s")


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


def check_lora_file(path: Path, key_format: str):
    from safetensors import safe_open

    assert path.is_file(), f"{path} was not written; loras folder: {sorted(p.name for p in path.parent.rglob('*'))}"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    prefix = "diffusion_model." if key_format == "comfyui" else "lora_unet_"
    assert keys and all(k.startswith(prefix) for k in keys), keys[:5]
    assert any(k.endswith(".lora_up.weight") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    assert meta.get("spare.key_format") == key_format, meta
    assert meta.get("ss_network_dim") == "8" and "spare.base_model" in meta, meta
    downs = [s for k, s in shapes.items() if k.endswith(".lora_down.weight")]
    # rank 8 (the workflows' setting); a module narrower than 8 (the 4-channel output conv) is capped to its width
    assert max(s[0] for s in downs) == 8 and all(s[0] in (8, 4) for s in downs), \
        sorted({s[0] for s in downs})
    return keys, meta


def assert_no_lost_keys(server: Server):
    lost = [ln for ln in server.log().splitlines() if "lora key not loaded" in ln]
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
        assert any(n["class_type"].startswith("SPARE") or n["class_type"] == "LoraLoaderModelOnly"
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
    with pytest.raises(wa.WorkflowError, match="widgets_values has 9 values.*10 widget values"):
        wa.ui_to_api(bad, object_info)

    bad = json.loads(json.dumps(wf))
    next(n for n in bad["nodes"] if n["type"] == "KSampler")["widgets_values"].remove("fixed")
    with pytest.raises(wa.WorkflowError, match="widgets_values has 6 values"):
        wa.ui_to_api(bad, object_info)

    bad = json.loads(json.dumps(wf))  # a seed companion value on a SPARE seed (control_after_generate=False)
    values = next(n for n in bad["nodes"] if n["type"] == "SPARETimestepProfile")["widgets_values"]
    values.insert(values.index(0) + 1, "fixed")
    with pytest.raises(wa.WorkflowError, match="widgets_values has 10 values"):
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
    assert_no_lost_keys(server)
    # the new file is offered by Apply Erasure's lora_name list (fresh /object_info, no restart)
    options = server.get("/object_info/SPAREApplyErasure")["SPAREApplyErasure"]["input"]["required"]["lora_name"]
    assert STYLE_LORA in options[1]["options"], options


def test_erase_object_workflow_sdxl_kohya(server, object_info):
    """erase_object.json on the tiny SDXL (needs the `y` conditioning), saving kohya keys."""
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
    (loader,) = nodes_of(prompt, "LoraLoaderModelOnly").values()
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
