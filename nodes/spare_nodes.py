"""The SPARE nodes (ComfyUI V3 API): Concept Samples, the three stages and Apply Erasure. Each `execute` only unpacks inputs, calls spare_core, and packs outputs;
the algorithm lives in spare_core, the ComfyUI adaptation in nodes/host.py.

Sockets: SPARE_SALIENCY carries a spare_core.Saliency, SPARE_TIMESTEPS a spare_core.TimestepProfile, LORA_MODEL is
ComfyUI's own type (a LoRA state dict), so its "Load LoRA Model" and "Save LoRA" nodes interoperate.
"""
from __future__ import annotations

import logging
import os
import time

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

import spare_core as sc
from spare_core import neighbours, render
from spare_core.errors import SpareInputError

from spare_core.distill import for_model, trains_text
from spare_core.families import text_candidates

from .host import ComfyDiffusionModel, latent_downscale, model_family, require_family, trainable

log = logging.getLogger("spare")

CATEGORY = "SPARE"
Saliency = io.Custom("SPARE_SALIENCY")
Timesteps = io.Custom("SPARE_TIMESTEPS")
KEY_FORMATS = list(sc.lora.KEY_FORMATS)
NO_FILE = "(none: use the lora input)"


def lines(text: str) -> list[str]:
    """One prompt per line; blank lines ignored."""
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def image(array) -> torch.Tensor:
    """numpy [H, W, 3] in [0, 1] -> ComfyUI IMAGE [1, H, W, 3]."""
    return torch.from_numpy(array).unsqueeze(0)


def should_stop() -> bool:
    # Raises comfy's InterruptProcessingException when the user pressed Cancel; spare_core cleans up on the way out.
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


class Progress:
    """ComfyUI progress bar plus a log line every ~10%, with an ETA from the measured time per step.

    The first report's time includes the warm-up (loading the model, drawing the samples, the first step's set-up),
    which is no guide to the rest: the ETA is measured from the first report on and shown once TIMED_STEPS steps have
    been timed since then (before that the line says so)."""

    TIMED_STEPS = 3

    def __init__(self, label: str, clock=time.perf_counter):
        self.label, self.bar, self.clock, self.last_logged = label, None, clock, -1
        self.started = clock()
        self.first: tuple[int, float] | None = None  # (done, time) at the first report

    def eta(self, done: int, total: int, now: float) -> float | None:
        """Seconds left, from the steps timed since the first report; None until TIMED_STEPS of them."""
        if self.first is None or done - self.first[0] < self.TIMED_STEPS:
            return None
        return (now - self.first[1]) / (done - self.first[0]) * max(total - done, 0)

    def __call__(self, done: int, total: int, loss: float | None = None):
        now = self.clock()
        if self.first is None:
            self.first = (done, now)
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)
        tenth = done * 10 // max(total, 1)
        if tenth != self.last_logged or done == total:
            self.last_logged = tenth
            eta = self.eta(done, total, now)
            if done >= total:
                when = "done"
            elif eta is None:
                when = f"ETA after {self.TIMED_STEPS} more steps are timed"
            else:
                when = f"ETA {eta:.0f}s"
            extra = f", loss {loss:.4g}" if loss is not None else ""
            log.info("SPARE %s: %d/%d (%.0fs elapsed, %s%s)", self.label, done, total, now - self.started, when,
                     extra)


def option_input(config, name: str, **extra):
    """The node input for field `name` of a spare_core config dataclass (spare_core/config.py): its name, default,
    tooltip and range come from the field, so no node repeats them. `extra`: ComfyUI-only settings (optional=True,
    round=False, a longer tooltip, ...)."""
    d = sc.config.describe(config, name)
    kw = {"default": d["default"], "tooltip": d["help"]}
    kw.update({k: d[k] for k in ("min", "max", "step") if d.get(k) is not None})
    kw.update(extra)
    if d.get("choices"):
        kw.pop("min", None), kw.pop("max", None), kw.pop("step", None)
        return io.Combo.Input(name, options=list(d["choices"]), **kw)
    if d["type"].startswith("list"):  # prompts: one per line
        kw["default"] = "\n".join(kw["default"] or [])
        return io.String.Input(name, multiline=True, **kw)
    kind = type(d["default"])
    if kind is bool:
        return io.Boolean.Input(name, **kw)
    if kind is int:
        return io.Int.Input(name, **kw)
    if kind is float:
        return io.Float.Input(name, **kw)
    raise TypeError(f"{config.__name__}.{name}: no node input for {kind.__name__}")


def resolution_input(default=512):
    # min/step 32: the bundled MiniCanvas demo model draws 32 x 32 only, and its workflow should say so
    return io.Int.Input("resolution", default=default, min=32, max=2048, step=32,
                        tooltip="Side in pixels of the self-generated training samples. 512 suits SD1.5/SD2; SDXL, "
                                "Flux, SD3.5, Qwen-Image and Lumina 2 work at 512 too (faster, less VRAM) but "
                                "768-1024 matches their training. A model that draws one size only (the MiniCanvas "
                                "demo model: 32) uses that size.")


def latents_input(use: str = "; 'samples' and 'resolution' are then ignored"):
    """The optional shared concept samples (SPARE Concept Samples' output) of the three stages; `use`: what they
    change in this node."""
    return io.Latent.Input("latents", optional=True,
                           tooltip="Concept samples from SPARE Concept Samples (or a KSampler with the concept prompt), "
                                   f"shared with the other stages{use}. Sample i belongs to concept line i % (number "
                                   "of lines).")


FLUX_GUIDANCE = 3.5  # ComfyUI's default for Flux-dev (model_base.Flux.extra_conds, the FluxGuidance node)


def guidance_input():
    # optional (with its default) so that workflows and API prompts saved before it existed still run
    return io.Float.Input("guidance", default=FLUX_GUIDANCE, min=0.0, max=100.0, step=0.1, optional=True,
                          tooltip="Flux-dev's guidance input (what a FluxGuidance node sets; ComfyUI's default 3.5), "
                                  "used for every sample and training step. Use the value you generate with. Other "
                                  "models ignore it; guidance-distilled Flux is sampled without a negative prompt "
                                  "(cfg 1) whatever cfg says.")


def seed_input(config=sc.DistillConfig):
    return option_input(config, "seed", control_after_generate=False)


class ConceptSamples(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPAREConceptSamples",
            display_name="SPARE Concept Samples",
            category=CATEGORY,
            description="Draws the concept with the model once (Euler, CFG 5, like the stages' own self-generation) "
                        "so Saliency Scan, Timestep Profile and Sparse LoRA Distill share one sample set instead of "
                        "each drawing its own. VAE Decode shows what the model draws for the concept.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (left unchanged)."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.String.Input("concept", multiline=True, default="",
                                tooltip="Prompt(s) naming the concept, one per line (the same text as in the stages)."),
                option_input(sc.DistillConfig, "samples", tooltip="Samples per concept line (authors: 4)."),
                seed_input(),
                resolution_input(),
                io.Int.Input("steps", default=sc.DistillConfig.sample_steps, min=1, max=200,
                             tooltip="Sampler steps per sample (Euler), as the stages draw their own."),
                io.Float.Input("cfg", default=sc.DistillConfig.sample_cfg, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale, as the stages draw their own."),
                guidance_input(),
            ],
            outputs=[io.Latent.Output("latents", tooltip="The samples as a LATENT (VAE space, like a KSampler's), "
                                                         "ordered concept 1, 2, ..., 1, 2, ...: connect it to the "
                                                         "latents input of each stage.")],
        )

    @classmethod
    def execute(cls, model, clip, concept, samples, seed, resolution, steps, cfg, guidance=FLUX_GUIDANCE):
        require_supported(model)
        concepts = require_lines(concept, "concept")
        dm = ComfyDiffusionModel(model, clip, resolution, resolution, guidance)
        dm.encode(concepts + [""])
        dm.load()
        with torch.inference_mode():  # sample-major (c1 c2 .. c1 c2 ..): what the stages' latents input expects
            x = sc.concept_samples(dm, concepts, samples, seed, steps, cfg, should_stop=should_stop)
        out = model.model.process_latent_out(x.float()).to(comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": out})


class SaliencyScan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPARESaliencyScan",
            display_name="SPARE Saliency Scan",
            category=CATEGORY,
            description="Finds the modules most responsible for a concept from gradients (SPARE stage 1).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to erase the concept from (left unchanged)."),
                io.Clip.Input("clip", tooltip="The model's text encoder, used to encode the prompts."),
                io.String.Input("concept", multiline=True, default="",
                                tooltip="Prompt(s) naming the concept to erase, one per line, e.g. 'Van Gogh style'."),
                io.String.Input("retain", multiline=True, default="",
                                tooltip="Optional prompts that must keep working, one per line. Used by the "
                                        "'contrastive' scoring only (modules that matter as much for them as for the "
                                        "concept are scored down); retention itself is Distill's job."),
                option_input(sc.ScanConfig, "samples"),
                seed_input(sc.ScanConfig),
                option_input(sc.ScanConfig, "selection"),
                option_input(sc.ScanConfig, "top_k"),
                option_input(sc.ScanConfig, "targets"),
                resolution_input(),
                # optional (with its default) so that API-format prompts saved before it existed still run
                option_input(sc.ScanConfig, "scoring", optional=True),
                latents_input(),
                option_input(sc.ScanConfig, "gradient_checkpointing", optional=True),
                guidance_input(),
            ],
            outputs=[
                Saliency.Output("saliency", tooltip="The selected modules, for Sparse LoRA Distill."),
                io.Image.Output("heatmap", tooltip="Scores by block and module; selected modules outlined."),
                io.String.Output("summary", tooltip="The selection as text."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concept, retain, samples, seed, selection, top_k, targets, resolution,
                scoring=sc.ScanConfig.scoring, latents=None, gradient_checkpointing=sc.ScanConfig.gradient_checkpointing,
                guidance=FLUX_GUIDANCE):
        require_supported(model)
        given, (width, height) = given_latents(model, latents, resolution)
        dm = ComfyDiffusionModel(model, clip, width, height, guidance)
        concepts = require_lines(concept, "concept")
        retain_prompts = sc.expand_alternatives(lines(retain))
        dm.encode(concepts + retain_prompts + [""])  # encode (and cache) before the model is loaded for training
        with trainable(dm):
            config = sc.ScanConfig(samples=samples, seed=seed, selection=selection, top_k=top_k, targets=targets,
                                   scoring=scoring, gradient_checkpointing=gradient_checkpointing)
            sal = sc.saliency_scan(dm, concepts, retain_prompts, config, latents=given,
                                   progress=Progress("saliency"), should_stop=should_stop)
        title = f"SPARE saliency: {', '.join(sal.meta['concepts'])[:60]}"
        return io.NodeOutput(sal, image(render.saliency_heatmap(sal.scores, sal.selected, title)), sal.summary())


class TimestepProfileNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPARETimestepProfile",
            display_name="SPARE Timestep Profile",
            category=CATEGORY,
            description="Measures at which noise levels the concept changes the prediction most, and turns it into "
                        "a timestep sampling distribution for training (SPARE stage 3).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (left unchanged)."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.String.Input("concept", multiline=True, default="",
                                tooltip="Prompt(s) naming the concept, one per line."),
                io.String.Input("surrogate", multiline=True, default="",
                                tooltip="What each concept should become, one line per concept line."),
                option_input(sc.ProfileConfig, "bins"),
                option_input(sc.ProfileConfig, "samples"),
                seed_input(sc.ProfileConfig),
                option_input(sc.ProfileConfig, "sharpness"),
                option_input(sc.ProfileConfig, "uniform_floor"),
                resolution_input(),
                option_input(sc.ProfileConfig, "loss_weighting"),
                latents_input("; 'resolution' is then ignored, 'samples' picks the first ones per line"),
                guidance_input(),
            ],
            outputs=[
                Timesteps.Output("timesteps", tooltip="Timestep distribution for Sparse LoRA Distill."),
                io.Image.Output("plot", tooltip="Sampling probability (bars) and measured gap (line) per bin."),
                io.String.Output("summary", tooltip="The profile as text."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concept, surrogate, bins, samples, seed, sharpness, uniform_floor, resolution,
                loss_weighting=sc.ProfileConfig.loss_weighting, latents=None, guidance=FLUX_GUIDANCE):
        require_supported(model)
        given, (width, height) = given_latents(model, latents, resolution)
        dm = ComfyDiffusionModel(model, clip, width, height, guidance)
        dm.encode(require_lines(concept, "concept") + require_lines(surrogate, "surrogate") + [""])
        dm.load()
        with torch.inference_mode():
            config = sc.ProfileConfig(bins=bins, samples=samples, seed=seed, sharpness=sharpness,
                                      uniform_floor=uniform_floor, loss_weighting=loss_weighting)
            prof = sc.timestep_profile(dm, require_lines(concept, "concept"), require_lines(surrogate, "surrogate"),
                                       config, latents=given, progress=Progress("timestep profile"),
                                       should_stop=should_stop)
        return io.NodeOutput(prof, image(render.timestep_plot(prof.edges, prof.divergence, prof.probs)),
                             prof.summary())


class SparseLoraDistill(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPARESparseLoraDistill",
            display_name="SPARE Sparse LoRA Distill",
            category=CATEGORY,
            description="Trains a small LoRA, only on the salient modules, that makes the model draw the surrogate "
                        "when asked for the concept while retain prompts keep their behaviour (SPARE stage 2). "
                        "Saves it into the loras folder.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (left unchanged; the erasure is the LoRA)."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                option_input(sc.DistillConfig, "concepts"),
                option_input(sc.DistillConfig, "surrogates"),
                option_input(sc.DistillConfig, "retain"),
                Saliency.Input("saliency", tooltip="From SPARE Saliency Scan: which modules get adapters."),
                Timesteps.Input("timesteps", optional=True,
                                tooltip="From SPARE Timestep Profile; uniform timesteps when not connected."),
                latents_input(", instead of self-generated ones; their size sets the training resolution"),
                option_input(sc.DistillConfig, "rank"),
                option_input(sc.DistillConfig, "alpha"),
                option_input(sc.DistillConfig, "steps"),
                option_input(sc.DistillConfig, "learning_rate", round=False),
                option_input(sc.DistillConfig, "forget_weight"),
                option_input(sc.DistillConfig, "retain_weight"),
                seed_input(),
                io.String.Input("filename_prefix", default="spare/erase",
                                tooltip="File name prefix inside the loras folder; a counter is appended."),
                io.Combo.Input("key_format", options=KEY_FORMATS, default="comfyui",
                               tooltip="comfyui: diffusion_model.* keys (ComfyUI's Save LoRA format); kohya: "
                                       "lora_unet_* keys with LDM module names, read by A1111 (1.5.0+) and Forge "
                                       "(their loader code; not tested in them here). kohya's own sd-scripts cannot "
                                       "load them for SD1.x/SD2.x."),
                option_input(sc.DistillConfig, "gradient_checkpointing"),
                resolution_input(),
                option_input(sc.DistillConfig, "samples"),
                option_input(sc.DistillConfig, "loss_weighting"),
                # optional (with their defaults) so that API-format prompts saved before they existed still run
                option_input(sc.DistillConfig, "stop_at_gap_closed", optional=True),
                option_input(sc.DistillConfig, "surrogate_anchor", optional=True),
                guidance_input(),
                option_input(sc.DistillConfig, "text_encoder", optional=True),
                option_input(sc.DistillConfig, "pseudo_rows", optional=True),
                option_input(sc.DistillConfig, "concept_kind", optional=True),
            ],
            outputs=[
                io.LoraModel.Output("lora", tooltip="The erasure LoRA (ComfyUI's LORA_MODEL). SPARE Apply Erasure "
                                                    "applies it to the model and, with text_encoder on, its CLIP "
                                                    "('Load LoRA Model' would apply the model's part only)."),
                io.Image.Output("loss_curve", tooltip="Forget, retain and total loss per step."),
                io.String.Output("filename", tooltip="The saved file, relative to the loras folder."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concepts, surrogates, retain, saliency, rank, alpha, steps, learning_rate,
                forget_weight, retain_weight, seed, filename_prefix, key_format, gradient_checkpointing, resolution,
                samples=sc.DistillConfig.samples, loss_weighting=sc.DistillConfig.loss_weighting,
                stop_at_gap_closed=sc.DistillConfig.stop_at_gap_closed, timesteps=None, latents=None,
                surrogate_anchor=sc.DistillConfig.surrogate_anchor, guidance=FLUX_GUIDANCE,
                text_encoder=sc.DistillConfig.text_encoder, pseudo_rows=sc.DistillConfig.pseudo_rows,
                concept_kind=sc.DistillConfig.concept_kind):
        require_supported(model)
        given, (width, height) = given_latents(model, latents, resolution)
        if key_format not in KEY_FORMATS:
            raise SpareInputError(f"key_format='{key_format}' is not one of {', '.join(KEY_FORMATS)}")
        dm = ComfyDiffusionModel(model, clip, width, height, guidance)
        config = sc.DistillConfig(
            concepts=lines(concepts), surrogates=lines(surrogates), retain=sc.expand_alternatives(lines(retain)),
            rank=rank, alpha=alpha, steps=steps, learning_rate=learning_rate, forget_weight=forget_weight,
            retain_weight=retain_weight, seed=seed, gradient_checkpointing=gradient_checkpointing, samples=samples,
            loss_weighting=loss_weighting, stop_at_gap_closed=stop_at_gap_closed, surrogate_anchor=surrogate_anchor,
            text_encoder=text_encoder, pseudo_rows=pseudo_rows, concept_kind=concept_kind)
        sc.distill_validate(config, saliency)  # fail fast, before any model loading or sampling
        text = trains_text(for_model(config, dm))  # the CLIP trains too: loaded and made trainable with it
        if text and key_format == "kohya":  # fail fast: the names are checked again when the file is written
            paths = [sc.model.text_key_prefix(dm) + p for p in text_candidates(dm.text_encoder)]
            unnamed = [p for p in paths if p not in sc.lora.kohya_text_names(paths)]
            if unnamed:
                raise SpareInputError(f"key_format='kohya' has no name for the text encoder's '{unnamed[0]}' (kohya "
                                      "names CLIP encoders only, not T5 / Qwen / Gemma): set key_format to 'comfyui' "
                                      "or text_encoder to 'off'")
        check_prefix(filename_prefix)  # fail fast; the file's name is chosen when it is saved
        dm.encode(config.concepts + config.surrogates + config.retain + [""])  # cached; CLIP loads before the model
        with trainable(dm, text=text):
            result = sc.distill(dm, config, saliency, timesteps, given, progress=Progress("distill"),
                                should_stop=should_stop, on_check=log_check)
        folder, name = output_path(filename_prefix)
        path = os.path.join(folder, name)
        sc.save_lora(path, result.lora, key_format=key_format, prefix=dm.key_prefix,
                     metadata={"spare.base_model": type(model.model).__name__, **family_metadata(model)})
        rel = os.path.relpath(path, loras_root()).replace(os.sep, "/")
        log.info("SPARE: saved %s (rank %d, %.1fs): %s", rel, rank, result.seconds, result.report())
        title = f"{result.steps_used} steps, concept->surrogate gap closed {100 * result.gap_closed:.0f}%"
        if result.warning:
            log.warning("SPARE: %s", result.warning)
            title = f"NOT ERASED? gap closed only {100 * result.gap_closed:.0f}% - see console"
        sd = result.lora.state_dict(key_format, dm.key_prefix)
        return io.NodeOutput(sd, image(render.loss_plot(result.losses, title, result.checks)), rel)


def log_check(check: dict, adapters) -> None:
    """Every probe check of a distillation (DistillConfig.check_every steps): how far the erasure has come."""
    log.info("SPARE distill: step %d, concept->surrogate gap closed %.0f%% (retain drift %.3g)", check["step"],
             100 * check["gap_closed"], check["retain_drift"])


class NearestConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPARENearestConcepts",
            display_name="SPARE Nearest Concepts",
            category=CATEGORY,
            description="Ranks candidate concepts by how alike the CLIP reads them to the concept and outputs the "
                        "nearest as retain lines for Sparse LoRA Distill (and Saliency Scan): an erasure damages the "
                        "concepts nearest to it that no retain line names, so those are the ones worth naming. "
                        "Each prompt is read at its own tokens (padding left out where the tokenizer tells). "
                        "Measured on the benchmark model: the concepts it names keep their looks better than a "
                        "random choice, for styles and objects.",
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder (the one the erasure trains with)."),
                io.String.Input("concepts", multiline=True, default="",
                                tooltip="The concept prompt(s), one per line (the same text as in Distill)."),
                io.String.Input("candidates", multiline=True, default="\n".join(neighbours.DEFAULT_CANDIDATES),
                                tooltip="Concepts the erasure might take with it, one per line ({a|b} groups "
                                        "allowed: a line's expansions count as one concept). The default is a list "
                                        "of common painters, styles and subjects; your own list of what must "
                                        "survive is better."),
                io.Int.Input("count", default=8, min=1, max=256,
                             tooltip="How many of the nearest candidates to output."),
                io.String.Input("keep", multiline=True, default="", optional=True,
                                tooltip="Retain lines to output first whatever their rank (your own must-keeps)."),
            ],
            outputs=[
                io.String.Output("retain", tooltip="keep, then the nearest candidates, one per line: connect it to "
                                                   "the retain input of Sparse LoRA Distill and Saliency Scan."),
                io.String.Output("ranking", tooltip="Every candidate with its similarity (cosine), nearest first; "
                                                    "a line that names the concept itself is marked and never "
                                                    "retained. Check the top: a synonym of the concept in other "
                                                    "words belongs out of the candidates."),
            ],
        )

    @classmethod
    def execute(cls, clip, concepts, candidates, count, keep=""):
        if count < 1:  # before any encoding
            raise SpareInputError(f"count={count}: must be at least 1 (how many candidates to output)")
        ranked = neighbours.rank(clip_token_states(clip), require_lines(concepts, "concepts"), lines(candidates))
        picked = [n.line for n in neighbours.nearest(ranked, count)]
        own = lines(keep)
        retain = own + [p for p in picked if p not in own]
        log.info("SPARE: nearest of %d candidates to the concept: %s", len(ranked), "; ".join(picked))
        ranking = "\n".join(f"{n.similarity:+.3f}  {n.line}" + ("  (names the concept: not retained)"
                                                                 if n.names_concept else "") for n in ranked)
        return io.NodeOutput("\n".join(retain), ranking)


def clip_token_states(clip):
    """prompts -> the CLIP's token states (CLIPTextEncode's conditioning), each prompt's own positions only where its
    tokenizer says which they are (neighbours.prompt_positions), else every position; for one prompt at a time
    (neighbours.prompt_codes' use: the lengths may differ), [1, L, D]."""
    def word_ids(text):  # per sub-tokenizer (a dict of them, or one tokenizer's chunks), per chunk, per token
        tokens = clip.tokenize(text, return_word_ids=True)
        return [[[t[2] if len(t) > 2 else 0 for t in chunk] for chunk in chunks]
                for chunks in (tokens.values() if isinstance(tokens, dict) else [tokens])]

    # where a prompt's first word sits, per sub-tokenizer: after a start token (CLIP) or first (T5)
    lead = [next((i for i, w in enumerate(chunks[0]) if w > 0), 1) for chunks in word_ids("a")]

    def encode(prompts):  # called under no_grad (neighbours.prompt_codes)
        states = []
        for p in prompts:
            cond = clip.encode_from_tokens(clip.tokenize(p))
            keep = neighbours.prompt_positions(word_ids(p), cond.shape[1], lead)
            states.append(cond if keep is None else cond[:, keep])
        return torch.cat(states)
    return encode


class ApplyErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPAREApplyErasure",
            display_name="SPARE Apply Erasure",
            category=CATEGORY,
            description="Applies an erasure LoRA to a model (and its CLIP, for a LoRA that also edits the text "
                        "encoder) at a strength (strength and strength_clip 0 = the originals). Same result as the "
                        "stock LoRA loader (strength = its strength_model, strength_clip = its strength_clip).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to erase from (the input is left unchanged)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the LoRA's network part (LoraLoader's strength_model). 1 = full "
                                       "erasure as trained (a SPARE file for SD1/SD2/SDXL already holds this part at "
                                       "the measured 0.9, 0.8 for an object), 0 = the network unchanged, between = "
                                       "partial: below 1 the concepts no retain line named move less and the concept "
                                       "erases less; check it is still gone."),
                io.Combo.Input("lora_name", options=[NO_FILE] + folder_paths.get_filename_list("loras"),
                               default=NO_FILE, tooltip="An erasure LoRA file from the loras folder."),
                io.LoraModel.Input("lora", optional=True,
                                   tooltip="An erasure LoRA from Sparse LoRA Distill (used instead of lora_name)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The model's CLIP. Needed for a LoRA trained with text_encoder on (the default "
                                      "on SD1.x/SD2.x/SDXL): encode your prompts with the clip output."),
                # optional, last: workflows and API prompts saved before it existed still load (default 1, as
                # LoraLoader's strength_clip)
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                               tooltip="Strength of the LoRA's text-encoder part (LoraLoader's strength_clip; a LoRA "
                                       "without one ignores it). Its part keeps the object in the erased prompt's "
                                       "images: keep 1. 0 = the CLIP unchanged (then no clip is needed)."),
            ],
            # No output ids: V3 requires ids unique across inputs and outputs ("model", "clip" are inputs); the
            # sockets are still labelled "model" and "clip".
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the concept erased."),
                     io.Clip.Output(display_name="clip", tooltip="The CLIP with the LoRA's text-encoder part (the "
                                                                 "clip input unchanged for a LoRA without one).")],
        )

    @classmethod
    def execute(cls, model, strength, lora_name, lora=None, clip=None, strength_clip=1.0):
        if lora is None:
            if lora_name == NO_FILE:
                raise SpareInputError("Apply Erasure needs a LoRA: connect the 'lora' input or choose a lora_name")
            path = folder_paths.get_full_path("loras", lora_name)
            if path is None:
                raise SpareInputError(f"lora_name '{lora_name}' is not in the loras folder")
            lora = sc.read_safetensors(path, "LoRA file", lora_name)[0] if path.endswith(".safetensors") else \
                _load_other(path, lora_name)
            source = f"LoRA file '{lora_name}'"
        else:
            source = "the connected LoRA"
        if strength == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        return io.NodeOutput(*patch_model(model, lora, strength, source, clip, strength_clip))


def _load_other(path: str, name: str) -> dict:
    """A LoRA in another format the loras folder lists (.ckpt/.pt/...): ComfyUI's own loader (weights only), with a
    clear error when it is not one."""
    try:
        return comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:
        raise SpareInputError(f"LoRA file '{name}' could not be read ({type(e).__name__}: {e}); it may be truncated "
                              "or not a LoRA: choose a .safetensors LoRA") from e


def patch_model(model, lora_sd: dict, strength: float, source: str, clip, strength_clip: float):
    """(model, clip) patched the stock way, step for step what LoraLoader does (comfy.sd.load_lora_for_models: key
    maps of the model and the CLIP, comfy.lora_convert's format conversion, add_patches on clones at strength_model =
    `strength` and strength_clip = `strength_clip`; clip None: what LoraLoaderModelOnly does), plus two refusals the
    stock loaders do not make: a file none of whose keys belongs to this model (they would silently apply nothing),
    and a file with text-encoder keys but no CLIP (they would apply half of the erasure; allowed when strength_clip is
    0, the half asked for). A strength of 0 leaves its side unpatched (the input object itself)."""
    text_keys = [k for k in lora_sd if k.startswith(sc.lora.TEXT_KEY_STARTS)]
    if text_keys and clip is None and strength_clip != 0:
        raise SpareInputError(f"{source} also edits the text encoder ({len(text_keys)} keys such as '{text_keys[0]}'): "
                              "connect the model's CLIP to Apply Erasure's clip input and encode prompts with its "
                              "clip output (or set strength_clip to 0 to apply only the network's part)")
    if text_keys and clip is None:  # strength_clip 0: the network's part alone (no "not loaded" log for the rest)
        lora_sd = {k: v for k, v in lora_sd.items() if not k.startswith(sc.lora.TEXT_KEY_STARTS)}
        if not lora_sd:
            raise SpareInputError(f"{source} edits only the text encoder: with strength_clip 0 nothing is left to "
                                  "apply; connect the model's CLIP and set strength_clip above 0")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map, log_missing=True)
    if not patches:
        first = next(iter(lora_sd), "<no keys>")
        raise SpareInputError(f"{source}: none of its {len(lora_sd)} keys matches this model (first key '{first}'); "
                              "is it a LoRA for another model family?")
    patched = model
    if strength != 0:
        patched = model.clone()
        patched.add_patches(patches, strength)
    if clip is not None and strength_clip != 0:
        clip = clip.clone()
        clip.add_patches(patches, strength_clip)
    return patched, clip


def require_supported(model):
    """The MODEL's spare_core family (nodes/host.py: SD1.x/SD2.x/SDXL UNets, the bundled MiniCanvas demo model, and the
    DiT families Flux, Chroma, SD3, Qwen-Image, Lumina 2), or a clear refusal that lists the supported ones."""
    return require_family(model)


def model_space_latents(model, latent: dict) -> torch.Tensor:
    """A LATENT (KSampler / VAE Encode output: VAE space) as the diffusion model's samples, as ComfyUI's samplers
    convert it (`BaseModel.process_latent_in`: SD1.5 x 0.18215, SDXL x 0.13025)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    fmt = model.model.latent_format
    dims = getattr(fmt, "latent_dimensions", 2)
    if torch.is_tensor(samples) and dims == 3 and samples.dim() == 4:
        samples = samples.unsqueeze(2)  # an image LATENT for a model with a frame axis (Qwen-Image), as KSampler does
    if not torch.is_tensor(samples) or samples.dim() != dims + 2:
        shape = tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__
        want = "[batch, channels, height, width]" if dims == 2 else "[batch, channels, frames, height, width]"
        raise SpareInputError(f"latents: expected a LATENT with 'samples' {want} for this model, got {shape}")
    channels = fmt.latent_channels
    if samples.shape[1] != channels:
        raise SpareInputError(f"latents have {samples.shape[1]} channels but this model's latents have {channels}: "
                              "connect a LATENT made for this model (its KSampler, VAE Encode or empty-latent node)")
    if dims == 3 and samples.shape[2] != 1:
        raise SpareInputError(f"latents have {samples.shape[2]} frames; SPARE trains on images (1 frame)")
    return model.model.process_latent_in(samples.float())


def family_metadata(model) -> dict:
    """The base-model fields kohya's sd-scripts write (`ss_base_model_version`, `ss_v2`, `modelspec.architecture`):
    A1111 reads them to decide which checkpoints a LoRA is listed for (without them an SDXL LoRA is listed as SD1),
    Forge to detect the version. DiT families get `modelspec.architecture` as kohya's sd-scripts name them
    (spare_core/families.py) and `spare.family`."""
    import comfy.model_base
    import comfy.supported_models as sm

    config = getattr(model.model, "model_config", None)
    v_pred = model.model.model_type in (comfy.model_base.ModelType.V_PREDICTION,)
    if isinstance(config, sm.SDXL):
        version, arch, v2 = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"
    elif isinstance(config, sm.SD20):
        version, v2 = ("sd_v2_v" if v_pred else "sd_v2"), "True"
        arch = "stable-diffusion-v2-768-v/lora" if v_pred else "stable-diffusion-v2-512/lora"
    elif isinstance(config, sm.SD15):
        version, arch, v2 = "sd_v1", "stable-diffusion-v1/lora", "False"
    else:
        family = model_family(model)
        if family is None or not family.dit:
            return {}
        return {"modelspec.architecture": family.architecture, "spare.family": family.name}
    return {"ss_base_model_version": version, "ss_v2": v2, "modelspec.architecture": arch}


def given_latents(model, latent, resolution: int):
    """(model-space samples or None, (width, height) in pixels): a connected LATENT sets the training size."""
    if latent is None:
        return None, (resolution, resolution)
    x = model_space_latents(model, latent)
    down = latent_downscale(model)
    return x, (x.shape[-1] * down, x.shape[-2] * down)


def require_lines(text: str, name: str) -> list[str]:
    out = lines(text)
    if not out:
        raise SpareInputError(f"'{name}' is empty: write the prompt that names the {name} (one per line)")
    return out


def loras_root() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def check_prefix(prefix: str) -> None:
    """Refuse an empty prefix or one that leaves the loras folder, before any work. Written out (ComfyUI's own check
    lives in get_save_image_path, which also creates the folder: a run that then fails would leave it behind)."""
    if not prefix or not prefix.strip():
        raise SpareInputError("filename_prefix is empty; give a name such as 'spare/erase_vangogh'")
    root = os.path.abspath(loras_root())
    folder = os.path.abspath(os.path.join(root, os.path.dirname(os.path.normpath(prefix.strip()))))
    if os.path.commonpath((root, folder)) != root:
        raise SpareInputError(f"filename_prefix '{prefix}' is not a valid path inside the loras folder ({root})")


def output_path(prefix: str) -> tuple[str, str]:
    """(folder, file name) for a new LoRA under the loras folder, ComfyUI-style counter; called when saving (ComfyUI
    creates the folder here)."""
    check_prefix(prefix)
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix.strip(), loras_root())
    except Exception as e:  # ComfyUI raises on a prefix that leaves the folder
        raise SpareInputError(f"filename_prefix '{prefix}' is not a valid path inside the loras folder ({e})")
    while True:
        name = f"{filename}_{counter:05}_.safetensors"
        if not os.path.exists(os.path.join(folder, name)):
            return folder, name
        counter += 1


NODES = [ConceptSamples, NearestConcepts, SaliencyScan, TimestepProfileNode, SparseLoraDistill, ApplyErasure]
