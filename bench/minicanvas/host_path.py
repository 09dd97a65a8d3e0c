"""The MiniCanvas harness with ComfyUI as host (`python -m bench.minicanvas --host comfyui`): SPARE driven through
the pack's nodes and the evaluation grids drawn by ComfyUI's own sampler, so the benchmark measures the product as
shipped rather than the library under it.

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 .venv-comfy/bin/python -m bench.minicanvas --host comfyui \
        --methods spare --concepts ukiyo,neon,ring,crescent --seeds 1 --out host_comfyui.json

ComfyUI runs in this process (no server), on the CPU (as the library path does), and every node is executed as the
executor executes it: `Node.execute(...)` under `torch.inference_mode()`. Per concept and training seed:

    SPARE Demo Model (MiniCanvas, or MiniCanvas-Flux with --model flux) -> MODEL, CLIP, VAE   (loaded once)
    SPARE Concept Samples -> LATENT -> Saliency Scan, Timestep Profile, Sparse LoRA Distill -> LORA_MODEL
        -> SPARE Apply Erasure (strength 1) -> MODEL             (the erase workflows' wiring; workflows/)
    grid: CLIP encode -> KSampler's sampling call -> VAE decode -> the harness' Judge

Inputs are the harness' own (`budgets.concept_prompts`, `budgets.Budget`, `budgets.LR`: the family's SPARE rate), one
prompt per line.
What the nodes cannot express, or do differently from `--host library` (each is a difference of the product, not of
the method; how far the results move is measured in bench/HISTORY.md, "Library vs ComfyUI host"):
- the model is ComfyUI's: `BaseModel.apply_model` (V_PREDICTION_EDM, timestep 0.25 log sigma converted back to
  MiniCanvas' 1000 t) and ComfyUI's model_sampling (sigma_at = percent_to_sigma) instead of MiniCanvasModel's own
  formulas: equal up to float rounding, which training steps can amplify;
- the LoRA comes back as the node's LORA_MODEL (fp16 tensors, as in the saved file) and is merged into the weights
  by ComfyUI's patcher (Apply Erasure = the stock LoraLoaderModelOnly path), where the library path applies the fp32
  adapters as forward hooks (`sc.apply_lora`);
- KSampler starts from sqrt(1 + sigma_max^2) * noise, the bundled sampler from sigma_max * noise (tests/
  test_demo_model.py: <= 2.5e-4 per pixel at 20 steps);
- the grid is sampled in batches with one noise tensor per image drawn with that image's seed exactly as KSampler
  draws it (`comfy.sample.prepare_noise`) and one conditioning per image (a batched CONDITIONING); one image of such a
  batch equals a KSampler run with that seed (tests/test_minicanvas_host.py);
- `resolution` widgets are ignored (the LATENT sets the size; MiniCanvas draws 32 px only) and passed as 64, their
  minimum; the Distill node also writes its LoRA file (into a temporary loras folder) and that time is counted;
- DistillConfig fields without a widget (batch size, grad clip, dropout, retain_unconditional, ...) are at
  their defaults, which is what the harness uses too; experiments that change them (`Budget.spare_overrides`) are
  refused here.
Only the method "spare" exists as nodes: `--host comfyui` refuses the ablations and the baselines.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
import torch

import spare_core as sc

from spare_core.minicanvas.model import MiniCanvasModel
from .budgets import spare_lr_key

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_MODULE = "spare_pack_minicanvas_host"  # private import name of the pack (never `nodes`: ComfyUI's nodes.py)
METHODS = ("spare",)
# The harness' grid sampler (MiniCanvasModel.sample's defaults, read from its signature so they cannot drift apart)
# in ComfyUI's names: DPM++ 2M on a Karras schedule (rho 7, the model's sigma_min / sigma_max), CFG 4, negative "".
_SAMPLE_DEFAULTS = inspect.signature(MiniCanvasModel.sample).parameters
GRID_SAMPLER = _SAMPLE_DEFAULTS["sampler"].default   # "dpmpp_2m": the same name in comfy.samplers.KSAMPLER_NAMES
GRID_SCHEDULER = "karras"
GRID_CFG = _SAMPLE_DEFAULTS["cfg"].default
GRID_NEGATIVE = _SAMPLE_DEFAULTS["negative"].default
GRID_BATCH = 128  # images per sampling call (the bundled sampler's batch size)
WIDGET_RESOLUTION = 64  # the resolution widgets' minimum; ignored when a LATENT is connected (it sets the size)
FILENAME_PREFIX = "minicanvas/erase"


def grid_settings(model: str) -> dict:
    """KSampler's settings that reproduce the bundled sampler of `model` ("unet": the constants above; "flux":
    MiniCanvas-Flux's sample() defaults, on ComfyUI's "simple" schedule, which its flow_sigmas reproduces)."""
    if model == "unet":
        return {"sampler": GRID_SAMPLER, "scheduler": GRID_SCHEDULER, "cfg": GRID_CFG, "negative": GRID_NEGATIVE}
    from spare_core.minicanvas.flux_model import MiniCanvasFlux

    params = inspect.signature(MiniCanvasFlux.sample).parameters
    return {"sampler": params["sampler"].default, "scheduler": "simple", "cfg": params["cfg"].default,
            "negative": params["negative"].default}


class HostUnavailable(RuntimeError):
    """ComfyUI cannot be imported: the message says what to set."""


def import_comfyui() -> str:
    """Put the ComfyUI checkout in $COMFYUI_PATH first on sys.path (ComfyUI's `nodes.py` must win over this pack's
    `nodes/`), force CPU mode before `comfy.model_management` is imported, and import it. Returns the path."""
    path = os.environ.get("COMFYUI_PATH", "")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        raise HostUnavailable(
            f"--host comfyui needs a ComfyUI checkout: set COMFYUI_PATH to its folder (now: {path or 'unset'}); "
            "scripts/setup_comfyui.sh makes one and its Python environment .venv-comfy")
    path = os.path.abspath(path)
    if sys.path[:1] != [path]:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    try:
        if "comfy.model_management" not in sys.modules:
            import comfy.cli_args  # parses no argv outside main.py
            comfy.cli_args.args.cpu = True  # the library path runs on the CPU: compare like with like
        import comfy.model_management  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.utils
        import folder_paths  # noqa: F401
    except Exception as e:
        raise HostUnavailable(f"could not import ComfyUI from COMFYUI_PATH={path} ({type(e).__name__}: {e}); run with "
                              "ComfyUI's Python environment (.venv-comfy, scripts/setup_comfyui.sh)") from e
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bar per sampling call in the benchmark log
    return path


def load_pack():
    """The pack, imported the way ComfyUI imports a folder pack (its __init__.py as a package, relative imports), under
    a private name. Returns (nodes.spare_nodes, nodes.demo_model) modules."""
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, os.path.join(PACK_ROOT, "__init__.py"),
                                                      submodule_search_locations=[PACK_ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[PACK_MODULE]
            raise
    return sys.modules[PACK_MODULE + ".nodes.spare_nodes"], sys.modules[PACK_MODULE + ".nodes.demo_model"]


def run_node(node, **inputs):
    """Execute a V3 node as ComfyUI's executor does (under inference mode); its outputs as a tuple."""
    with torch.inference_mode():
        return node.execute(**inputs).result


class _Warnings(logging.Handler):
    """Collects the pack's warnings (logger "spare") while a node runs: Distill's "not erased?" warning is the node's
    counterpart of DistillResult.warning."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class ComfyHost:
    """The harness' host interface (`erase`, `sample`) over an in-process ComfyUI and the pack's nodes.

    `inputs`: what `erase` reads on each call: concept_prompts, LR, peak_rss_reset and peak_rss_mb (the module
    bench.minicanvas.harness, or methods.default_inputs()). dispatch.make_host passes them in: this module does not
    import the dispatch that imports it."""

    name = "comfyui"

    def __init__(self, inputs, model: str = "unet"):
        self.inputs = inputs
        self.model_name = model
        self.comfyui_path = import_comfyui()
        import folder_paths

        self.nodes, demo = load_pack()
        # the SPARE Demo Model node's choice: MiniCanvas (UNet) or MiniCanvas-Flux (ComfyUI's Flux class)
        choice = {"unet": demo.UNET_CHOICE, "flux": demo.FLUX_CHOICE}[model]
        self.model, self.clip, self.vae, latent = run_node(demo.DemoModel, model=choice)
        self.latent_shape = tuple(latent["samples"].shape[1:])  # the demo's own LATENT: [C, H, W] of one image
        self.grid = grid_settings(model)
        # Distill writes its LoRA into the loras folder: a temporary one (set while it runs), never ComfyUI's own
        self.loras = tempfile.mkdtemp(prefix="minicanvas_loras_")
        atexit.register(shutil.rmtree, self.loras, True)  # worker processes (--jobs > 1) never call close()
        self._conds: dict[str, list] = {}  # prompt -> [cond [1, L, D], extras]

    def close(self):
        """Unload and drop the MODEL, CLIP and VAE (and the cached conditionings) now, while ComfyUI's modules are
        alive. dispatch.run keeps the closed host as its process' worker host (set_worker): a host that kept its
        patchers would have them collected only at interpreter exit, after comfy.model_patcher's globals are gone,
        and each `ModelPatcher.__del__` would print "Exception ignored ... 'NoneType' object has no attribute
        'ON_DETACH'". The host cannot be used after close()."""
        import gc

        import comfy.model_management

        self.model = self.clip = self.vae = None
        self._conds.clear()
        comfy.model_management.unload_all_models()
        gc.collect()  # patchers in reference cycles go now too, not at exit
        shutil.rmtree(self.loras, ignore_errors=True)

    @contextlib.contextmanager
    def _loras_folder(self):
        import folder_paths

        saved = folder_paths.folder_names_and_paths["loras"]
        folder_paths.folder_names_and_paths["loras"] = ([self.loras], saved[1])
        try:
            yield
        finally:
            folder_paths.folder_names_and_paths["loras"] = saved

    # --- training: the erase workflow -------------------------------------------------------------------------------
    def erase(self, method, domain, name, budget, seed=0):
        """`methods.run_method` through the nodes, for one concept and training seed: (("model", (erased MODEL, its
        CLIP)), info with the harness' keys, read from the Distill node's LoRA file metadata and LORA_MODEL)."""
        if method not in METHODS:
            raise ValueError(f"--host comfyui runs {', '.join(METHODS)} only (the nodes implement SPARE; the ablations "
                             f"and baselines have no nodes), not {method!r}")
        if budget.spare_overrides:
            raise ValueError("--host comfyui: Budget.spare_overrides have no node inputs")
        inputs = self.inputs
        forget, surrogate, retain, _, _ = inputs.concept_prompts(domain, name, seed, budget.retain_set)
        if budget.spare_retain:
            retain = inputs.concept_prompts(domain, name, seed, budget.spare_retain)[2]
        defaults, prof = sc.DistillConfig(forget, surrogate), sc.ProfileConfig()  # the nodes' defaults
        per = defaults.samples
        concept, surrogates, retain_text = "\n".join(forget), "\n".join(surrogate), "\n".join(retain)
        n = self.nodes
        common = dict(model=self.model, clip=self.clip, seed=seed)
        inputs.peak_rss_reset()
        t0 = time.perf_counter()
        (latents,) = run_node(n.ConceptSamples, concept=concept, samples=per, resolution=WIDGET_RESOLUTION,
                              steps=defaults.sample_steps, cfg=defaults.sample_cfg, **common)
        saliency, _, _ = run_node(n.SaliencyScan, concept=concept, retain=retain_text, samples=per,
                                  selection=budget.spare_fraction, top_k=0, targets=budget.spare_targets,
                                  resolution=WIDGET_RESOLUTION, scoring=budget.spare_scoring, latents=latents,
                                  gradient_checkpointing=False, **common)
        profile, _, _ = run_node(n.TimestepProfileNode, concept=concept, surrogate=surrogates, bins=prof.bins,
                                 samples=prof.samples, sharpness=prof.sharpness, uniform_floor=prof.uniform_floor,
                                 resolution=WIDGET_RESOLUTION,
                                 loss_weighting=budget.spare_weighting, latents=latents, **common)
        warnings = _Warnings()
        logging.getLogger("spare").addHandler(warnings)
        try:
            with self._loras_folder():
                lora, _, filename = run_node(
                    n.SparseLoraDistill, concepts=concept, surrogates=surrogates, retain=retain_text, saliency=saliency,
                    rank=defaults.rank, alpha=defaults.alpha, steps=budget.spare,
                    learning_rate=inputs.LR[spare_lr_key(budget.model)],
                    forget_weight=defaults.forget_weight, retain_weight=defaults.retain_weight,
                    filename_prefix=FILENAME_PREFIX, key_format="comfyui",
                    gradient_checkpointing=False, resolution=WIDGET_RESOLUTION, samples=per,
                    loss_weighting=budget.spare_weighting, stop_at_gap_closed=budget.spare_stop, timesteps=profile,
                    latents=latents, surrogate_anchor=defaults.surrogate_anchor, concept_kind=domain, **common)
        finally:
            logging.getLogger("spare").removeHandler(warnings)
        # (MODEL, CLIP): the LoRA edits the text encoder too where Distill's text_encoder is on (the UNet)
        erased = run_node(n.ApplyErasure, model=self.model, strength=1.0, lora_name=n.NO_FILE, lora=lora,
                          clip=self.clip)
        seconds = time.perf_counter() - t0
        meta = self._metadata(filename)
        matrices = [t for k, t in lora.items() if k.endswith((".lora_up.weight", ".lora_down.weight"))]
        info = {"trainable_params": sum(t.numel() for t in matrices),
                "lora_bytes": sum(t.numel() * t.element_size() for t in matrices),
                "steps_used": int(meta["spare.steps_used"]), "gap_closed": float(meta["spare.gap_closed"]),
                "modules": int(meta["spare.modules"]),
                "retain_drift": float(meta["spare.retain_drift"]) if "spare.retain_drift" in meta else None,
                "warning": "; ".join(warnings.messages) or None, "lora_file": filename,
                "seconds": seconds, "peak_rss_mb": inputs.peak_rss_mb()}
        return ("model", erased), info

    def _metadata(self, filename: str) -> dict:
        from safetensors import safe_open

        with safe_open(os.path.join(self.loras, filename), "pt") as f:
            return f.metadata() or {}

    # --- evaluation: KSampler -------------------------------------------------------------------------------------
    def _encode(self, prompts, clip=None) -> list:
        """CLIPTextEncode's CONDITIONING per prompt, batched into one entry: [[cond [B, L, D], {"pooled_output": [B,
        P]}]] (the pooled vector where the model has one: MiniCanvas-Flux's vector_in reads it). `clip`: an erased
        CLIP (Apply Erasure's output; not cached), else the demo CLIP (cached)."""
        clip = self.clip if clip is None else clip
        conds = self._conds if clip is self.clip else {}
        for p in prompts:
            if p not in conds:
                with torch.inference_mode():
                    conds[p] = clip.encode_from_tokens_scheduled(clip.tokenize(p))[0]
        extras = {}
        if all(conds[p][1].get("pooled_output") is not None for p in prompts):
            extras["pooled_output"] = torch.cat([conds[p][1]["pooled_output"] for p in prompts])
        return [[torch.cat([conds[p][0] for p in prompts]), extras]]

    def sample(self, edited, prompts, seeds, steps) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] of `prompts` (image i with seed seeds[i]) from the erased MODEL (or the demo
        MODEL when `edited` is None): KSampler's sampling call (`comfy.sample.sample`, what nodes.common_ksampler runs)
        with the model's grid settings (grid_settings), then VAE Decode."""
        import comfy.sample

        model, clip = (self.model, self.clip) if edited is None else edited[1] if isinstance(edited[1], tuple) \
            else (edited[1], self.clip)  # ("model", (MODEL, CLIP)) from erase, or ("model", MODEL)
        prompts, seeds = list(prompts), list(seeds)
        out = []
        for a in range(0, len(prompts), GRID_BATCH):
            p, s = prompts[a: a + GRID_BATCH], seeds[a: a + GRID_BATCH]
            with torch.inference_mode():
                latent = torch.zeros((len(p), *self.latent_shape))
                # KSampler's noise for a batch of one with seed s (comfy.sample.prepare_noise), one image at a time
                noise = torch.cat([comfy.sample.prepare_noise(latent[:1], int(seed)) for seed in s])
                positive = self._encode(p, clip)
                negative = self._encode([self.grid["negative"]], clip)
                x = comfy.sample.sample(model, noise, steps, self.grid["cfg"], self.grid["sampler"],
                                        self.grid["scheduler"], positive, negative, latent, disable_pbar=True,
                                        seed=int(s[0]))
                out.append(self.vae.decode(x).permute(0, 3, 1, 2).float().clone())  # IMAGE [B, H, W, 3] -> BCHW
        return torch.cat(out)


def check_methods(methods) -> None:
    """Refuse what --host comfyui cannot run, before any work."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--host comfyui runs {', '.join(METHODS)} only: the nodes implement SPARE; the ablations and "
                         f"baselines {bad} have no nodes (run them with --host library)")
