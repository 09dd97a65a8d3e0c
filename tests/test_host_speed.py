"""bench/host_speed.py's bookkeeping: a configuration that fails or outlives --timeout still gives its JSON line, and
--summarize tables any mix of records. bench/gpu_check.sh relies on both to keep going past a bad configuration.

A real configuration builds a full-size UNet (~20 s for SD1.5 on one core before any step), too slow for the test
suite; here the child process meets a stand-in ComfyUI whose first module fails or hangs, so each case takes seconds
and needs no ComfyUI. The real path: `GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh` (minutes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import host_speed

SCRIPT = os.path.join(os.path.dirname(host_speed.__file__), "host_speed.py")


def fake_comfyui(tmp_path, body: str) -> str:
    """A folder that passes host_speed's COMFYUI_PATH check; `comfy.cli_args` (the first module the CPU child
    imports) runs `body`."""
    comfy = tmp_path / "ComfyUI" / "comfy"
    comfy.mkdir(parents=True)
    (comfy / "__init__.py").write_text("")
    (comfy / "model_management.py").write_text("raise RuntimeError('not reached')\n")
    (comfy / "cli_args.py").write_text(body)
    return str(comfy.parent)


def run_bench(tmp_path, comfyui: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "lines.jsonl"
    env = {**os.environ, "COMFYUI_PATH": comfyui}
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--family", "sd15", "--latent", "8",
                           "--checkpointing", "off,on", "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=120)
    return proc, [json.loads(line) for line in out.read_text().splitlines()]


def test_failed_and_timed_out_configurations_are_recorded_and_the_rest_still_run(tmp_path):
    proc, recs = run_bench(tmp_path, fake_comfyui(tmp_path, "raise RuntimeError('stand-in ComfyUI is broken')\n"))
    assert proc.returncode == 1
    assert [(r["checkpointing"], r["status"]) for r in recs] == [(False, "failed"), (True, "failed")]
    assert all("stand-in ComfyUI is broken" in r["error"] and r["family"] == "sd15" for r in recs)

    proc, recs = run_bench(tmp_path, fake_comfyui(tmp_path / "hang", "import time\ntime.sleep(60)\n"),
                           "--timeout", "3")
    assert proc.returncode == 1
    assert [r["status"] for r in recs[-2:]] == ["timeout", "timeout"]
    assert all(r["wall_seconds"] < 30 for r in recs[-2:])


def test_summarize_tables_every_kind_of_record(tmp_path):
    ok = {"family": "sd15", "pixels": 512, "dtype": "fp16", "checkpointing": True, "status": "ok",
          "seconds_per_step": 0.2, "floor_seconds": 0.16, "step_over_floor": 1.25, "peak_vram_allocated_mb": 9000,
          "peak_vram_reserved_mb": 9500, "erase_steps": 200, "erase_seconds": 61.5,
          "erase_peak_vram_allocated_mb": 9800}
    skipped = {"family": "sdxl", "pixels": 1024, "dtype": "fp16", "checkpointing": False, "status": "skipped",
               "error": "20s of the 450s budget left"}
    path = tmp_path / "lines.jsonl"
    path.write_text("# a comment line\n" + json.dumps(ok) + "\n" + json.dumps(skipped) + "\n")
    table = host_speed.summarize(str(path)).splitlines()
    assert len(table) == 4
    assert "0.200" in table[2] and "1.25" in table[2] and "9000/9500" in table[2] and "61.5 (200)" in table[2]
    assert table[3].startswith("sdxl") and "skipped: 20s of the 450s budget left" in table[3]


def test_full_size_dit_configurations_and_their_cut_for_a_cpu_smoke_run():
    """The GPU check's DiTs are the families' full-size configs as ComfyUI detects them (Flux.1-dev with its guidance
    embedding: 19 double + 38 single blocks of width 3072; SD3.5-large: 38 joint blocks of width 64 x 38); --blocks
    keeps the widths of Flux (SD3's width follows its depth) and is refused for the UNets."""
    sys.path.insert(0, os.path.join(os.path.dirname(SCRIPT), "..", "tests"))
    import comfy_fixtures as cf

    flux = host_speed.dit_config(cf, "flux", 0)
    assert (flux["depth"], flux["depth_single_blocks"], flux["hidden_size"]) == (19, 38, 3072) and flux["guidance_embed"]
    cut = host_speed.dit_config(cf, "flux", 1)
    assert (cut["depth"], cut["depth_single_blocks"], cut["hidden_size"]) == (1, 1, 3072)
    assert host_speed.dit_config(cf, "sd3", 0)["depth"] == 38
    sd3 = host_speed.dit_config(cf, "sd3", 2)
    assert sd3["depth"] == 2 and sd3["context_embedder_config"]["params"]["out_features"] == 128
    assert "float8_e4m3fn" == host_speed.DTYPES["fp8"]
    proc = subprocess.run([sys.executable, SCRIPT, "--family", "sd15", "--blocks", "1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--blocks 1" in proc.stderr and "flux, sd3" in proc.stderr
