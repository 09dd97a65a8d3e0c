"""SPARE on FULL-SIZE architectures with random weights, on the real ComfyUI host: seconds per Sparse LoRA Distill
step, the step's floor, seconds for a default erase, peak memory; with and without gradient checkpointing.

    COMFYUI_PATH=/path/to/ComfyUI python bench/host_speed.py --device cuda            # SD1.5 512 px + SDXL 1024 px
    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 python bench/host_speed.py --device cpu --family sd15 \\
        --latent 8 --steps 2 --erase-steps 2 --erase-retain empty                      # a CPU smoke run
    python bench/host_speed.py --summarize out/gpu_check.jsonl                         # JSON lines -> a table

One configuration = (family, weight dtype, gradient checkpointing on/off); each runs in its own subprocess, so its
peak RSS / VRAM is its own, and prints one JSON line (also appended to --out). A configuration that fails, crashes or
outlives --timeout still gives a line: status "failed" / "timeout", with whatever it had measured before. Defaults:
on cuda SD1.5 at 512 px (latent 64) and SDXL at 1024 px (latent 128) in fp16 and bf16; on the CPU SD1.5 at latent
16 in fp32. --gpu is an alias of --device cuda.

The model. The UNet is the family's real full-size ComfyUI model (tests/comfy_fixtures.py: comfy.supported_models
config -> BaseModel -> ModelPatcher) filled with random weights (comfy_fixtures.init_params_, seed 0); the text
encoder is ComfyUI's CLIP class at the real width but three layers, fp32 (only its output width matters here, and it
runs once per prompt). The weights are in the chosen dtype exactly as ComfyUI's checkpoint loader
(comfy.sd.load_state_dict_guess_config) puts them there when a dtype is forced (model_options["dtype"], what the
UNET loader's weight_dtype and --fp16-unet/--bf16-unet amount to):
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)         # unet_config["dtype"] = dtype
    BaseModel(config, device=comfy.model_management.unet_inital_load_device(params, dtype))
BaseModel builds its layers with comfy.ops.pick_operations(dtype, manual_cast), so every weight is created in
`dtype`, on the GPU directly when ComfyUI would load it there (enough free VRAM), and computes in `manual_cast` when
that is set (e.g. fp16 weights on a CPU compute in fp32). The reported `compute_dtype` is what spare_core trains in
(ComfyDiffusionModel.dtype: autocast to it when it is not fp32).

Per configuration, in one process on one network:
1. Distill step: spare_core.distill through nodes/host.py (ComfyDiffusionModel + trainable(), under inference mode as
   under the executor) for --steps steps, with the Distill node's defaults (rank 8, batch 2 forget + 2 retain
   samples + the family's cross rows, 2 on UNets, ...) on half of every Linear/Conv2d (every other candidate of
   targets "all": as many modules as the default selection, 0.5; which ones a real scan picks differs).
   Self-generation is cut to 1 sample x 2 Euler steps, as it is not part of a step. Steps after the first are timed (wall, and process CPU seconds: the steadier figure
   on a shared CPU); on cuda each step ends with torch.cuda.synchronize().
2. Floor: what a step cannot do without, on the same network, input shapes and batch, with the same adapters (same
   modules, rank, fp32) attached through spare_core.adapters.attach and the same checkpointing and autocast: as
   distill does, the forget, the retain and the cross rows (DistillConfig.cross_rows: the forget rows' x_t under a
   retain prompt) batched into one teacher forward (adapters off, no grad), and the student's forward and backward
   in distill's chunks (every row at once on the CPU; on a GPU 2 x batch_size rows, then the cross rows). No
   optimizer, clipping, loss scaling, noise draws or syncs. One warm-up, then --steps - 1 timed
   repetitions; `step_over_floor` = seconds_per_step / floor_seconds (`floor_cpu_seconds`, `cpu_step_over_floor`:
   the same in process CPU seconds).
3. Default erase (--erase-steps > 0): the shipped erase_style workflow run the way the nodes run it (same spare_core
   calls with the nodes' default inputs, under inference mode): Concept Samples (4 samples, 8 Euler steps, CFG 5,
   LATENT round trip), Saliency Scan (targets "all", fraction 0.5, gradient scoring, 4 samples, checkpointing as the
   configuration), Timestep Profile (10 bins), Sparse LoRA Distill (--erase-steps steps, node defaults, its own
   retain samples, checkpointing as the configuration; the LoRA saved to a temporary folder). The node default is
   checkpointing on: the "on" configuration is THE default erase. Prompts are the erase_style workflow's (22 retain
   prompts after {a|b} expansion) or, with --erase-retain empty, none but the always-retained empty prompt.
Peak VRAM (torch.cuda.max_memory_allocated / max_memory_reserved) is reset (after empty_cache) before phases 1-2 and
again before phase 3: `peak_vram_allocated_mb` / `peak_vram_reserved_mb` and `erase_peak_vram_*`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
UNET_FAMILIES = ("sd15", "sd2v", "sdxl")
DIT_FAMILIES = ("flux", "sd3")  # Flux.1-dev (guidance embedding) and SD3.5-large, as model_detection sees them
FAMILIES = UNET_FAMILIES + DIT_FAMILIES
# The UNets' CLIPs at their real size (width, MLP width, heads, layers): Distill's text_encoder (on by default there)
# trains and backpropagates through every layer, so their depth counts in time and memory
CLIP_SIZES = {"clip_l": (768, 3072, 12, 12), "clip_h": (1024, 4096, 16, 24), "clip_g": (1280, 5120, 20, 32)}
WIDTHS = {"sd15": {"clip_l": 768}, "sd2v": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}
NATIVE_LATENT = {"sd15": 64, "sd2v": 96, "sdxl": 128, "flux": 128, "sd3": 128}  # 512, 768, 1024 px
# The DiTs' text encoders at their real output widths but a fraction of their depth (only the width reaches the
# network; they run once per prompt): CLIP-L 768 (Flux's pooled vector; SD3's with CLIP-G 1280), T5-XXL d_model 4096.
DIT_TE = {"clip_l": {"hidden_size": 768, "intermediate_size": 768, "num_attention_heads": 8, "num_hidden_layers": 3,
                     "projection_dim": 768},
          "clip_g": {"hidden_size": 1280, "intermediate_size": 1280, "num_attention_heads": 8,
                     "num_hidden_layers": 3, "projection_dim": 1280},
          "t5xxl": {"d_model": 4096, "d_ff": 256, "d_kv": 64, "num_heads": 2, "num_layers": 1}}
DIT_ENCODERS = {"flux": ("clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g", "t5xxl")}
# fp8: weights stored as float8_e4m3fn (Flux users' fp8 checkpoints), computed in ComfyUI's manual-cast dtype
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp8": "float8_e4m3fn"}

# The erase_style workflow's prompts (workflows/erase_style.json): Concept Samples / Timestep Profile / Distill take
# CONCEPT and SURROGATE; Saliency Scan's retain box (read by contrastive scoring only) and Distill's retain box.
CONCEPT, SURROGATE = "Van Gogh style", "a painting"
SCAN_RETAIN = ["Claude Monet style", "Pablo Picasso style", "Rembrandt style", "Ukiyo-e woodblock print",
               "a photo of a city street"]
DISTILL_RETAIN = ["{a portrait|a landscape|a city street|a cat|a bowl of fruit} in {Claude Monet|Pablo Picasso|"
                  "Rembrandt|Ukiyo-e woodblock print} style", "a photo of a city street", "a photo of a dog"]
# The nodes' default inputs (nodes/spare_nodes.py define_schema) where spare_core's defaults differ or are not used.
NODE_SEED = 0


def log(tag: str, msg: str) -> None:
    print(f"[host_speed {time.strftime('%H:%M:%S')} {tag}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# One configuration (the subprocess)

def import_comfy(device: str):
    """Put ComfyUI ($COMFYUI_PATH) first on sys.path (its `nodes.py` must win over this pack's `nodes/`), force CPU
    mode for --device cpu, and return the comfy_fixtures module."""
    sys.path.insert(0, ROOT)  # spare_core
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import comfy_fixtures as cf

    if device == "cpu":
        cf.comfy_or_skip()  # also sets comfy.cli_args.args.cpu before comfy.model_management is imported
    else:
        sys.path.insert(0, os.path.abspath(os.environ["COMFYUI_PATH"]))
    return cf


def dit_config(cf, family: str, blocks: int) -> dict:
    """The full-size unet_config of a DiT family (comfy_fixtures._full_dit_config, as model_detection detects a
    checkpoint); blocks > 0 keeps only that many blocks (Flux: double and single blocks each, widths unchanged; SD3:
    MMDiT's width is 64 x depth, so a cut SD3 is narrower too) -- for a CPU smoke run of the same code path."""
    config = cf._full_dit_config(family)
    if blocks and family == "flux":
        config.update(depth=blocks, depth_single_blocks=blocks)
    elif blocks and family == "sd3":
        config["depth"] = blocks
        config["context_embedder_config"] = {"target": "torch.nn.Linear",
                                             "params": {"in_features": 4096, "out_features": 64 * blocks}}
    return config


def init_params_on_device_(module, seed: int) -> None:
    """comfy_fixtures.init_params_'s distribution, drawn on each parameter's own device (one generator per device,
    parameters in name order): a full-size DiT has 8-12 B weights, which a CPU generator would take minutes to
    draw and copy to the GPU. Deterministic for a given seed and device, not equal across devices."""
    import torch

    gens = {}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if not p.is_floating_point():
                continue
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            v = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            if p.ndim >= 2:
                v.mul_(1.0 if "embedding" in name else p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                v.mul_(0.1).add_(1.0)
            else:
                v.mul_(0.02)
            p.copy_(v.to(p.dtype))
            del v


def build_dit(cf, family: str, dtype, blocks: int):
    """(ModelPatcher, CLIP, facts) of a full-size DiT (random weights) the way ComfyUI's UNETLoader builds one with a
    weight dtype: the family's supported_models config, its model_base class on ComfyUI's initial load device, every
    weight created in `dtype` by comfy.ops (module docstring); the text encoders at real widths (DIT_TE)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    unet_config = dit_config(cf, family, blocks)
    cls = cf._dit_config_cls(family)
    params = sum(p.numel() for p in cls(dict(unet_config)).get_model(
        {}, device=torch.device("meta")).diffusion_model.parameters())
    config = cls(dict(unet_config))
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    initial_device = mm.unet_inital_load_device(params, dtype)
    base = config.get_model({}, device=initial_device)
    init_params_on_device_(base.diffusion_model, 0)
    if family == "sd3":  # MMDiT's pos_embed is a buffer a checkpoint fills (torch.empty otherwise)
        with torch.no_grad():
            pe = base.diffusion_model.pos_embed
            pe.copy_((0.1 * torch.randn(pe.shape, generator=torch.Generator().manual_seed(7))).to(pe))
    model = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    options = {f"{name}_model_config": dict(DIT_TE[name]) for name in DIT_ENCODERS[family]}
    options["dtype"] = torch.float32
    clip = comfy.sd.CLIP(config.clip_target(cf._te_presence(family)), model_options=options)
    cf.init_params_(clip.cond_stage_model, 1)
    weight_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in base.diffusion_model.parameters()})
    facts = {"unet_params_M": round(params / 1e6, 1), "weight_dtype": ",".join(weight_dtypes),
             "manual_cast_dtype": str(manual_cast).removeprefix("torch.") if manual_cast is not None else None,
             "initial_load_device": str(initial_device), "blocks": blocks or "all"}
    return model, clip, facts


def build(cf, family: str, dtype_name: str, blocks: int = 0):
    """(ModelPatcher, CLIP, facts) of the full-size `family` with random weights in `dtype_name` (module docstring)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm

    dtype = getattr(torch, DTYPES[dtype_name])
    if family in DIT_FAMILIES:
        return build_dit(cf, family, dtype, blocks)
    config = cf._model_config(family, cf._full_unet_config(family), tiny=False)
    params = sum(p.numel() for p in cf.build_full_base_model(family).diffusion_model.parameters())
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    initial_device = mm.unet_inital_load_device(params, dtype)
    base = cf._base_model(family, config, device=initial_device)
    cf.init_params_(base.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    target = {"sd15": sm.SD15, "sd2v": sm.SD20, "sdxl": sm.SDXL}[family]({}).clip_target()
    options = {f"{n}_model_config": dict(zip(("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_hidden_layers"), CLIP_SIZES[n]), projection_dim=CLIP_SIZES[n][0])
               for n in WIDTHS[family]}
    options["dtype"] = torch.float32
    clip = comfy.sd.CLIP(target, model_options=options)
    cf.init_params_(clip.cond_stage_model, 1)
    weight_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in base.diffusion_model.parameters()})
    facts = {"unet_params_M": round(params / 1e6, 1), "weight_dtype": ",".join(weight_dtypes),
             "manual_cast_dtype": str(manual_cast).removeprefix("torch.") if manual_cast is not None else None,
             "initial_load_device": str(initial_device)}
    return model, clip, facts


class Clock:
    """Wall and process-CPU stamps; on cuda each stamp first waits for the queued GPU work."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter(), time.process_time()


def per_step(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """(wall, CPU) seconds per interval between consecutive stamps, the first stamp being the end of step 1."""
    n = max(len(stamps) - 1, 1)
    return (stamps[-1][0] - stamps[0][0]) / n, (stamps[-1][1] - stamps[0][1]) / n


def reset_peaks(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # else the reserved peak starts at what earlier phases left cached
        torch.cuda.reset_peak_memory_stats()


def peaks(device, prefix: str) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    return {f"{prefix}peak_vram_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20),
            f"{prefix}peak_vram_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20)}


def step_phase(host, sc, model, clip, latent: int, steps: int, checkpointing: bool, text_encoder: str = "auto") -> dict:
    """Phase 1 (distill steps) and phase 2 (their floor), see the module docstring."""
    import torch
    from spare_core.distill import for_model, trains_text

    dm = host.ComfyDiffusionModel(model, clip, latent * 8, latent * 8)
    candidates = list(sc.candidate_modules(dm.network, sc.ScanConfig.targets))
    saliency = sc.Saliency({p: 0.0 for p in candidates}, candidates[::2], {})
    cfg = sc.DistillConfig([CONCEPT], [SURROGATE], retain=["a photo of a dog"], steps=steps,
                           samples=1, sample_steps=2, gradient_checkpointing=checkpointing, text_encoder=text_encoder)
    clock = Clock(dm.device)
    stamps = []
    dm.encode(cfg.concepts + cfg.surrogates + cfg.retain + [""])  # before loading for training, as the node does
    with torch.inference_mode():  # as under the executor
        with host.trainable(dm, text=trains_text(for_model(cfg, dm))):  # the CLIP on the GPU too when it trains
            result = sc.distill(dm, cfg, saliency, progress=lambda s, n, loss: stamps.append(clock()))
            wall, cpu = per_step(stamps)
            floor, floor_cpu = floor_seconds(sc, dm, cfg, saliency.selected, max(steps - 1, 1), clock)
    return {"steps": steps, "seconds_per_step": round(wall, 4), "cpu_seconds_per_step": round(cpu, 4),
            "floor_seconds": round(floor, 4), "step_over_floor": round(wall / floor, 3),
            "floor_cpu_seconds": round(floor_cpu, 4), "cpu_step_over_floor": round(cpu / floor_cpu, 3),
            "candidate_modules": len(candidates), "adapted_modules": len(saliency.selected),
            "trainable_params": result.trainable_params, "batch_size": cfg.batch_size,
            "compute_dtype": str(dm.dtype).removeprefix("torch.")}


def floor_seconds(sc, dm, cfg, selected: list[str], reps: int, clock) -> tuple[float, float]:
    """(wall, process CPU) seconds of the step floor (phase 2): the forward/backward work of one distill step and
    nothing else. Called inside host.trainable(dm), like the distill it is compared with."""
    import torch
    from spare_core.autograd import backward_safe, frozen
    from spare_core.distill import for_model, student_rows
    from spare_core.families import family_of

    dev, b, c = dm.device, cfg.batch_size, for_model(cfg, dm).cross_rows  # the family's default (Family.cross_rows)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((2 * b, *dm.latent_shape), generator=gen).to(dev)  # b forget rows, then b retain rows
    sigma = dm.sigma_at(torch.rand(2 * b, generator=gen)).float().to(dev)
    xt = dm.add_noise(x0, torch.randn(x0.shape, generator=gen).to(dev), sigma)
    cross = torch.arange(c) % b  # the cross rows: the forget rows' own x_t under a retain prompt
    xt, sigma = torch.cat([xt, xt[cross]]), torch.cat([sigma, sigma[cross]])
    conds = dm.encode([CONCEPT, SURROGATE, cfg.retain[0]])
    forget_rows, retain_rows = torch.zeros(b, dtype=torch.long), torch.full((b + c,), 2)
    student = torch.cat([forget_rows, retain_rows])                              # concept, retain
    teacher = dm.select_cond(conds, torch.cat([forget_rows + 1, retain_rows]))   # surrogate, retain
    rows, n = student_rows(dev, b), xt.shape[0]  # the student's chunks, as distill's backward_rows takes them
    autocast = dict(device_type=dev.type, dtype=dm.dtype, enabled=dm.dtype != torch.float32)
    # as distill's training_mode: checkpointing if asked, exact gradients through in-place residual adds (DiTs)
    checkpointing = backward_safe(dm.network, cfg.gradient_checkpointing, family_of(dm).inplace_residuals)
    with frozen(dm.network), torch.inference_mode(False), torch.enable_grad(), checkpointing:
        adapters = sc.adapters.attach(dm.network, selected, cfg.rank, cfg.alpha, cfg.dropout, device=dev)
        params = adapters.parameters()
        try:
            def once():
                adapters.enabled = False
                with torch.no_grad(), torch.autocast(**autocast):
                    target = dm.predict_x0(xt, sigma, teacher).float()
                adapters.enabled = True
                for i in range(0, n, rows):
                    with torch.autocast(**autocast):
                        pred = dm.predict_x0(xt[i:i + rows], sigma[i:i + rows],
                                             dm.select_cond(conds, student[i:i + rows])).float()
                    per_row = (pred - target[i:i + rows]).pow(2).flatten(1).mean(1)
                    forget = torch.arange(i, i + per_row.shape[0], device=per_row.device) < b
                    (per_row[forget].sum() / b + per_row[~forget].sum() / (n - b)).backward()
                for p in params:
                    p.grad = None

            once()  # warm-up, as distill's first step is not timed
            start = clock()
            for _ in range(reps):
                once()
            end = clock()
        finally:
            adapters.remove()
    return (end[0] - start[0]) / reps, (end[1] - start[1]) / reps


def erase_phase(host, sc, model, clip, latent: int, erase_steps: int, checkpointing: bool, retain: str,
                text_encoder: str = "auto") -> dict:
    """Phase 3: the default erase, node by node (each node's spare_core calls with its default inputs; module
    docstring). Called under torch.inference_mode(), as the executor runs nodes."""
    import torch
    import comfy.model_management as mm
    from spare_core.distill import for_model, trains_text

    px = latent * 8
    concepts, surrogates = [CONCEPT], [SURROGATE]
    scan_retain = sc.expand_alternatives(SCAN_RETAIN if retain == "workflow" else [])
    distill_retain = sc.expand_alternatives(DISTILL_RETAIN if retain == "workflow" else [])
    device = torch.device(model.load_device)
    clock = Clock(device)
    seconds = {}
    start = t = clock()

    def lap(name):
        nonlocal t
        now = clock()
        seconds[name] = round(now[0] - t[0], 2)
        t = now

    # SPARE Concept Samples -> a LATENT (VAE space), as the workflow wires it into every stage
    dm = host.ComfyDiffusionModel(model, clip, px, px)
    dm.encode(concepts + [""])
    dm.load()
    x = sc.concept_samples(dm, concepts, sc.DistillConfig.samples, NODE_SEED)  # Concept Samples at its defaults
    latents = model.model.process_latent_out(x.float()).to(mm.intermediate_device())
    lap("concept_samples")

    # each stage converts the LATENT back to model space (nodes/spare_nodes.py model_space_latents)
    given = model.model.process_latent_in(latents.float())
    dm = host.ComfyDiffusionModel(model, clip, px, px)  # SPARE Saliency Scan
    dm.encode(concepts + scan_retain + [""])
    with host.trainable(dm):
        # the node's defaults (spare_core.ScanConfig) but the run's memory switch
        saliency = sc.saliency_scan(dm, concepts, scan_retain, sc.ScanConfig(seed=NODE_SEED), latents=given,
                                    gradient_checkpointing=checkpointing)
    lap("saliency_scan")

    given = model.model.process_latent_in(latents.float())
    dm = host.ComfyDiffusionModel(model, clip, px, px)  # SPARE Timestep Profile
    dm.encode(concepts + surrogates + [""])
    dm.load()
    profile = sc.timestep_profile(dm, concepts, surrogates, sc.ProfileConfig(seed=NODE_SEED), latents=given)
    lap("timestep_profile")

    given = model.model.process_latent_in(latents.float())
    dm = host.ComfyDiffusionModel(model, clip, px, px)  # SPARE Sparse LoRA Distill
    config = sc.DistillConfig(concepts=concepts, surrogates=surrogates, retain=distill_retain, steps=erase_steps,
                              seed=NODE_SEED, gradient_checkpointing=checkpointing,
                              text_encoder=text_encoder)  # else the node's defaults
    sc.distill_validate(config, saliency)
    dm.encode(config.concepts + config.surrogates + config.retain + [""])
    stamps = []
    with host.trainable(dm, text=trains_text(for_model(config, dm))):  # as the node: the CLIP too when it trains
        result = sc.distill(dm, config, saliency, profile, given,
                            progress=lambda s, n, loss: stamps.append(clock()))
    with tempfile.TemporaryDirectory() as folder:
        sc.save_lora(os.path.join(folder, "erase.safetensors"), result.lora, key_format="comfyui",
                     prefix=dm.key_prefix)
    lap("distill")
    wall, _ = per_step(stamps)
    return {"erase_steps": erase_steps, "erase_retain": retain, "erase_retain_prompts": len(config.retain),
            "erase_seconds": round(clock()[0] - start[0], 2), "erase_stage_seconds": seconds,
            "erase_distill_seconds_per_step": round(wall, 4), "erase_adapted_modules": result.lora_modules,
            "erase_gap_closed": round(result.gap_closed, 3)}


def one(args) -> dict:
    """Run one configuration; print the record so far after each phase (the parent keeps the last line)."""
    tag = f"{args.family} {args.dtype} ckpt={args.checkpointing} text_encoder={args.text_encoder}"
    rec = {"family": args.family, "latent": args.latent, "pixels": args.latent * 8, "dtype": args.dtype,
           "checkpointing": args.checkpointing == "on", "text_encoder": args.text_encoder, "device": args.device,
           "status": "partial"}

    def emit():
        print(json.dumps(rec), flush=True)

    try:
        cf = import_comfy(args.device)
        import torch
        import spare_core as sc

        rec.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if args.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
            rec["gpu"] = torch.cuda.get_device_name(0)
        host = cf.load_pack_module("nodes/host.py")
        log(tag, "building the model")
        t0 = time.perf_counter()
        model, clip, facts = build(cf, args.family, args.dtype, args.blocks)
        rec.update(facts, build_seconds=round(time.perf_counter() - t0, 1))
        device = torch.device(model.load_device)
        if device.type != args.device:
            raise RuntimeError(f"ComfyUI's load device is {device}, not {args.device}")
        log(tag, f"distill steps ({args.steps}) and floor")
        reset_peaks(device)
        rec.update(step_phase(host, sc, model, clip, args.latent, args.steps, args.checkpointing == "on",
                              args.text_encoder))
        rec.update(peaks(device, ""))
        rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if args.erase_steps > 0:
            emit()
            log(tag, f"default erase ({args.erase_steps} distill steps)")
            reset_peaks(device)
            with torch.inference_mode():
                rec.update(erase_phase(host, sc, model, clip, args.latent, args.erase_steps,
                                       args.checkpointing == "on", args.erase_retain, args.text_encoder))
            rec.update(peaks(device, "erase_"))
            rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        rec["status"] = "ok"
        log(tag, "done")
    except BaseException as e:  # KeyboardInterrupt too: the record says what had been measured
        traceback.print_exc()
        rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
    emit()
    return rec


# ---------------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per configuration

def run_config(args, family: str, latent: int, dtype: str, checkpointing: str) -> dict:
    cmd = [sys.executable, __file__, "--only", "--device", args.device, "--family", family, "--latent", str(latent),
           "--dtype", dtype, "--checkpointing", checkpointing, "--steps", str(args.steps),
           "--erase-steps", str(args.erase_steps), "--erase-retain", args.erase_retain, "--blocks", str(args.blocks),
           "--text-encoder", args.text_encoder]
    base = {"family": family, "latent": latent, "pixels": latent * 8, "dtype": dtype,
            "checkpointing": checkpointing == "on", "text_encoder": args.text_encoder, "device": args.device}
    started = time.perf_counter()
    try:  # the child's stderr (its progress log and any traceback) passes through
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout or None)
        stdout, status = proc.stdout, None if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as e:  # run() killed the child; e.stdout holds what it had printed
        out = e.stdout or ""
        stdout, status = out.decode() if isinstance(out, bytes) else out, "timeout"
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    rec = {**base, **(json.loads(lines[-1]) if lines else {})}
    if status == "timeout":
        rec.update(status="timeout", error=f"killed after --timeout {args.timeout:g} s")
    elif status is not None and rec.get("status") != "failed":
        rec.update(status="failed", error=f"{status} (crashed: killed for memory?)")
    rec["wall_seconds"] = round(time.perf_counter() - started, 1)
    return rec


def split(ap: argparse.ArgumentParser, option: str, value: str, allowed) -> list[str]:
    """The items of a comma-list option; a usage error names the option when one is not in `allowed`."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items or any(v not in allowed for v in items):
        ap.error(f"{option} {value!r}: expected a comma list of {', '.join(allowed)}")
    return items


def summarize(path: str) -> str:
    """A fixed-width table of the JSON lines in `path` (host_speed records; lines without "family" are skipped)."""
    recs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("{"):
                rec = json.loads(line)
                if "family" in rec:
                    recs.append(rec)
    head = (f"{'family':6} {'px':>5} {'dtype':5} {'ckpt':4} {'s/step':>8} {'floor s':>8} {'ratio':>6} "
            f"{'VRAM alloc/resv MB':>19} {'erase s (steps)':>16} {'erase VRAM MB':>14}  status")
    rows = [head, "-" * len(head)]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in recs:
        vram = f"{num(r.get('peak_vram_allocated_mb'), 'd')}/{num(r.get('peak_vram_reserved_mb'), 'd')}"
        erase = f"{num(r.get('erase_seconds'), '.1f')} ({r['erase_steps']})" if "erase_seconds" in r else "-"
        status = r.get("status", "?") + (f": {r['error'][:80]}" if r.get("error") else "")
        rows.append(f"{r['family']:6} {r.get('pixels', '-'):>5} {r.get('dtype', '-'):5} "
                    f"{'on' if r.get('checkpointing') else 'off':4} {num(r.get('seconds_per_step'), '.3f'):>8} "
                    f"{num(r.get('floor_seconds'), '.3f'):>8} {num(r.get('step_over_floor'), '.2f'):>6} "
                    f"{vram:>19} {erase:>16} {num(r.get('erase_peak_vram_allocated_mb'), 'd'):>14}  {status}")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--gpu", action="store_const", const="cuda", dest="device", help="alias of --device cuda")
    ap.add_argument("--family", help="comma list of " + ", ".join(FAMILIES) + " (default: cuda sd15,sdxl; cpu sd15)")
    ap.add_argument("--latent", type=int, help="latent side = pixels / 8 (default: cuda the family's native size, "
                                               "SD1.5 64, SD2 96, SDXL, Flux and SD3.5 128; cpu 16)")
    ap.add_argument("--dtype",
                    help="comma list of weight dtypes fp16, bf16, fp32, fp8 (default: cuda fp16,bf16; cpu fp32)")
    ap.add_argument("--checkpointing", default="off,on", help="comma list of on, off (default: off,on)")
    ap.add_argument("--steps", type=int, help="distill steps timed for s/step, the first excluded; also the floor's "
                                              "repetitions + 1 (default: cuda 10, cpu 3)")
    # 200 = the Distill node's default (DistillConfig.steps); written out so the parent need not import torch
    ap.add_argument("--erase-steps", type=int, default=200,
                    help="Distill steps of the default erase; 0 skips it (default: %(default)s, the node's)")
    ap.add_argument("--erase-retain", choices=["workflow", "empty"], default="workflow",
                    help="the erase's retain prompts: the erase_style workflow's, or none (the node left empty)")
    ap.add_argument("--blocks", type=int, default=0,
                    help="DiT families only: keep this many blocks (Flux: double and single each; SD3: joint blocks, "
                         "width 64 x blocks) for a CPU smoke run; 0 = the full model (default)")
    # spare_core.distill.TEXT_ENCODER_CHOICES, written out so the parent need not import torch
    ap.add_argument("--text-encoder", choices=["auto", "on", "last", "off"], default="auto",
                    help="Distill's text_encoder (default: %(default)s, the node's; last / on train the DiTs' T5 etc.)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per configuration (0: none)")
    ap.add_argument("--out", help="append the JSON lines to this file")
    ap.add_argument("--summarize", metavar="JSONL", help="print a table of a JSON-lines file and exit")
    ap.add_argument("--only", action="store_true", help=argparse.SUPPRESS)  # the child: one configuration
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    cuda = args.device == "cuda"
    families = split(ap, "--family", args.family or ("sd15,sdxl" if cuda else "sd15"), FAMILIES)
    dtypes = split(ap, "--dtype", args.dtype or ("fp16,bf16" if cuda else "fp32"), DTYPES)
    modes = split(ap, "--checkpointing", args.checkpointing, ("on", "off"))
    if args.steps is None:
        args.steps = 10 if cuda else 3
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is not timed)")
    if args.erase_steps < 0:
        ap.error("--erase-steps must be >= 0")
    if args.blocks < 0 or (args.blocks and not all(f in DIT_FAMILIES for f in families)):
        ap.error(f"--blocks {args.blocks}: a count >= 1 for the DiT families ({', '.join(DIT_FAMILIES)}) only, "
                 "or 0 for the full model")
    if not os.path.isfile(os.path.join(os.environ.get("COMFYUI_PATH", ""), "comfy", "model_management.py")):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (scripts/setup_comfyui.sh or bench/gpu_check.sh)")
    if args.only:
        args.family, args.dtype, args.checkpointing = families[0], dtypes[0], modes[0]
        args.latent = args.latent or (NATIVE_LATENT[args.family] if cuda else 16)
        rec = one(args)
        sys.exit(0 if rec["status"] == "ok" else 1)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    failed = 0
    for family in families:
        latent = args.latent or (NATIVE_LATENT[family] if cuda else 16)
        for dtype in dtypes:
            for mode in modes:
                rec = run_config(args, family, latent, dtype, mode)
                failed += rec["status"] != "ok"
                line = json.dumps(rec)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.write(line + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
