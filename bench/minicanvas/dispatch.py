"""MiniCanvas harness, running the benchmark: the hosts that erase and sample (LibraryHost here, host_path.ComfyHost
for ComfyUI), the per-process worker state, the (concept, training seed) tasks spread over worker processes
(map_tasks) and `run`, which scores the unerased model once and every method on every task.
"""
from __future__ import annotations

import os

import torch

from spare_core.minicanvas import data
from spare_core.minicanvas.model import load as load_unet

from . import metrics
from .budgets import FLUX_MODELS, FLUX_ONLY_METHODS, METHODS, MODELS, ERASABLE_OBJECTS, REFERENCE_METHODS, ERASABLE_STYLES, Budget, retention_split
from .judge import Judge, evaluate, grid, split_metrics
from .methods import default_inputs, generate, run_method, sample_edited
from .summary import summarize


def load_model(name: str = "unet"):
    """The bundled model `name` of MODELS: MiniCanvas (a UNet) or MiniCanvas-Flux (ComfyUI's Flux class, so its code
    must be importable: COMFYUI_PATH and ComfyUI's Python environment). Both are spare_core DiffusionModels with the
    same `sample` signature, so the harness erases and judges them alike."""
    if name == "unet":
        return load_unet()
    if name in FLUX_MODELS:  # MiniCanvas-Flux, or its guidance-distilled sibling MiniCanvas-Flux-dev
        from spare_core.minicanvas.flux_model import DEV_MODEL_FILE, MODEL_FILE, load
        return load(MODEL_FILE if name == "flux" else DEV_MODEL_FILE)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


class LibraryHost:
    """The harness' host interface (`erase`, `sample`) over spare_core and a bundled model and its sampler (--host
    library). host_path.ComfyHost is the same interface over ComfyUI and the pack's nodes."""

    name = "library"

    def __init__(self, inputs=None, model: str = "unet", eval_guidance: float = 0.0):
        self.model_name = model
        self.model = load_model(model)
        self.inputs = inputs  # prompt lists, learning rates, memory probe (methods.default_inputs() when None)
        self.eval_guidance = eval_guidance  # flux-dev: the grids' FluxGuidance (0: the model's, what SPARE trains at)

    def erase(self, method, domain, name, budget, seed=0):
        return run_method(method, self.model, domain, name, budget, seed=seed, inputs=self.inputs)

    def sample(self, edited, prompts, seeds, steps):
        """Grid images [B, 3, H, W] in [0, 1]; edited None = the unerased model."""
        trained = getattr(self.model, "guidance", None)
        if self.eval_guidance:
            self.model.guidance = self.eval_guidance
        try:
            if edited is None:
                return generate(self.model, prompts, seeds, steps)
            return sample_edited(self.model, edited, prompts, seeds, steps)
        finally:
            if self.eval_guidance:
                self.model.guidance = trained

    def close(self):
        pass


HOSTS = ("library", "comfyui")


def make_host(name: str, inputs=None, model: str = "unet", eval_guidance: float = 0.0):
    """The host `name` of HOSTS for the bundled model `model`; `inputs`: what its erasures read
    (methods.default_inputs() when None)."""
    if name == "library":
        return LibraryHost(inputs, model, eval_guidance)
    if name == "comfyui":
        from . import host_path
        return host_path.ComfyHost(inputs or default_inputs(), model)
    raise ValueError(f"unknown host {name!r}; known: {', '.join(HOSTS)}")


_WORKER: dict = {}  # this process' host, judge and model (read and set through the functions below)


def set_worker(**state) -> None:
    """Keep `host`, `judge` and / or `model` as this process' own (what worker_model and erase_concept reuse)."""
    _WORKER.update(state)


def worker_model():
    """(model, judge) of this process, loaded on first use: what curve.py and selection.py erase and judge with (after
    `run` with the library host: that host's model and the run's judge)."""
    if "model" not in _WORKER:
        _WORKER["model"], _WORKER["judge"] = load_model(), Judge()
    return _WORKER["model"], _WORKER["judge"]


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def map_tasks(fn, tasks: list, jobs: int, threads: int) -> list:
    """[fn(t) for t in tasks], spread over `jobs` spawned worker processes of `threads` torch threads each."""
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        return list(pool.map(fn, tasks))


def erase_concept(task) -> list[tuple[str, str, dict]]:
    """Every method on one concept and training seed (in a worker process or inline). [(method, domain, row)]."""
    methods, domain, name, seed, budget, base, host_name = task
    if "host" not in _WORKER or _WORKER["host"].name != host_name or \
            getattr(_WORKER["host"], "model_name", "unet") != budget.model or \
            getattr(_WORKER["host"], "eval_guidance", 0.0) != budget.eval_guidance:
        _WORKER["host"], _WORKER["judge"] = make_host(host_name, model=budget.model,
                                                      eval_guidance=budget.eval_guidance), Judge()
    host, judge = _WORKER["host"], _WORKER["judge"]
    prompts, ls, lo, seeds = grid(budget.seeds)
    target = (data.style_index if domain == "style" else data.object_index)(name)
    syn = data.STYLES[target].synonyms[0] if domain == "style" else data.OBJECTS[target].synonyms[0]
    sp, _, _, sseeds = grid(budget.seeds, domain, name, synonym=syn)
    keep = (~((ls if domain == "style" else lo) == target)).numpy()
    split = retention_split(domain, name, seed, budget.retain_set)
    base_split = {f"base_{k}": v
                  for k, v in split_metrics(domain, split, ls, lo, base["style"], base["object"]).items()}
    rows = []
    for method in methods:
        edited, info = host.erase(method, domain, name, budget, seed=seed)
        images = host.sample(edited, prompts, seeds, budget.sample_steps)
        m, j = evaluate(judge, images, ls, lo, domain, target)
        m.update(split_metrics(domain, split, ls, lo, j["style"], j["object"]), **base_split)
        syn_pred = judge(host.sample(edited, sp, sseeds, budget.sample_steps))[domain]
        m["synonym_UA"] = metrics.unlearning_accuracy(syn_pred, target)
        m["quality_fd"] = metrics.frechet_distance(j["features"][keep], base["features"][keep])
        m.update({k: v for k, v in info.items() if k != "losses"})
        m["host"] = host_name
        m["concept"], m["seed"] = name, seed
        rows.append((method, domain, m))
        extra = (f" steps {info['steps_used']:3d} gap closed {info['gap_closed']:.2f} strength "
                 f"{info.get('strength', 1.0):.2f}" if "steps_used" in info else "")
        unl = f" unlisted IRA {m['IRA_unlisted']:6.2f} CRA {m['CRA_unlisted']:6.2f}" if "IRA_unlisted" in m else ""
        print(f"{domain:6s} {name:10s} seed {seed} {method:18s} UA {m['UA']:6.2f} IRA {m['IRA']:6.2f} "
              f"CRA {m['CRA']:6.2f}{unl} SFA {m['SFA']:6.2f} synUA {m['synonym_UA']:6.2f} FD {m['quality_fd']:7.3f} "
              f"{info['seconds']:6.1f}s" + extra, flush=True)
    return rows


def check_model_methods(methods, model: str) -> None:
    """Every method runs on both bundled models (baselines.py gives each its Flux form) except the Flux-only ones
    (FLUX_ONLY_METHODS), which the UNet refuses."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    flux_only = [m for m in methods if m in FLUX_ONLY_METHODS]
    if model not in FLUX_MODELS and flux_only:
        raise ValueError(f"{flux_only} adapt Flux's modules (bench/minicanvas/baselines.py) and run with --model flux "
                         f"only, not --model {model}")


def methods_for_seed(methods, seed: int, budget: Budget) -> list:
    """The methods that train at training seed `seed`: SPARE and its variants at every seed; UCE at the first
    `budget.closed_form_seeds`, the step-trained baselines and the reference rows at the first `budget.baseline_seeds`
    (0 = every seed), counted from `budget.first_train_seed`."""
    def seeds(m):
        if m.startswith("spare") and m not in REFERENCE_METHODS:
            return budget.train_seeds
        return (budget.closed_form_seeds if m.startswith("uce") else budget.baseline_seeds) or budget.train_seeds
    return [m for m in methods if 0 <= seed - budget.first_train_seed < seeds(m)]


def run(methods=METHODS, concepts=None, budget=None, log=print, jobs: int = 1, host: str = "library", inputs=None):
    """Erase every concept with every method, for every training seed. jobs > 1: (concept, seed) tasks are spread
    over that many worker processes of one torch thread each (one process per core beats one process with several
    threads on small models). Step-trained baselines run `budget.baseline_seeds` training seeds, UCE
    `budget.closed_form_seeds` (0 = all; methods_for_seed).
    host: "library" (spare_core + the bundled sampler) or "comfyui" (the pack's nodes + KSampler; SPARE only).
    inputs: what the erasures read (prompt lists, learning rates, memory probe; methods.default_inputs() when None;
    worker processes always use the defaults)."""
    threads = int(os.environ.get("MINICANVAS_THREADS", "1"))  # 2 threads on 2 shared cores ran ~100x slower
    torch.set_num_threads(threads)
    budget = budget or Budget()
    concepts = concepts or {"style": ERASABLE_STYLES, "object": ERASABLE_OBJECTS}
    if host == "comfyui":
        from . import host_path
        host_path.check_methods(methods)
    check_model_methods(methods, budget.model)
    host_obj = make_host(host, inputs, budget.model, budget.eval_guidance)
    judge = Judge()
    set_worker(host=host_obj, judge=judge)
    if isinstance(host_obj, LibraryHost):
        set_worker(model=host_obj.model)  # what curve.py / selection.py reuse
    prompts, ls, lo, seeds = grid(budget.seeds)
    base_images = host_obj.sample(None, prompts, seeds, budget.sample_steps)
    base = judge(base_images)
    base_acc = {"style_acc": 100.0 * (base["style"] == ls).float().mean().item(),
                "object_acc": 100.0 * (base["object"] == lo).float().mean().item()}
    log(f"base model: style {base_acc['style_acc']:.2f}%  object {base_acc['object_acc']:.2f}%  "
        f"({len(prompts)} images, held-out templates)")
    base_per = {}
    tasks = []
    for seed in range(budget.first_train_seed, budget.first_train_seed + budget.train_seeds):
        for domain, names in concepts.items():
            for name in names:
                target = (data.style_index if domain == "style" else data.object_index)(name)
                base_per[name] = dict(metrics.erasure_metrics(domain, target, ls, lo, base["style"], base["object"]),
                                      domain=domain)  # its SFA: the other domain in the row before erasure
                todo = methods_for_seed(methods, seed, budget)
                if todo:
                    tasks.append((todo, domain, name, seed, budget, base, host))
    try:
        results = map_tasks(erase_concept, tasks, jobs, threads)
    finally:
        host_obj.close()
    per = {m: [] for m in methods}
    for rows in results:
        for method, domain, m in rows:
            m["domain"] = domain
            per[method].append(m)
    out = summarize(per, base_acc, base_per, budget)
    out["host"] = host
    return out
