"""Stage 2 of SPARE: sparse low-rank adapters trained by self-distillation.

Teacher = the network with adapters off (frozen); student = network + adapters on the salient modules only, and
with `text_encoder` on (the UNets' default, a measured deviation: DistillConfig.text_encoder) on every Linear of the
text encoder's layers that shape the conditioning too ("last": only each encoder's last such layer; `text_modules`),
the student's prompts encoded through them each step (`student_cond`).
For a concept c with surrogate s, retain prompts r, x_t from the concept's (self-generated) samples -- by default
replaced, in every forget row, by the SURROGATE's own samples (`surrogate_anchor`, below):

  forget = || eps_student(x_t, t, c) - sg eps_teacher(x_t, t, s) ||^2     (t ~ timestep profile)
  retain = || eps_student(x_r,t, t, r) - sg eps_teacher(x_r,t, t, r) ||^2  (t ~ uniform; r includes "" by default)
  loss   = forget_weight * forget + retain_weight * retain                 (authors: 0.3 and 1.0)

Every loss is written through x0 (ComfyUI's apply_model returns x0) with a per-noise-level weight w(sigma):
||x0_student - x0_teacher||^2 * w(sigma). loss_weighting="eps" (w = 1/sigma^2) is exactly the eps-prediction loss above
(the authors'); the default "v" (w = 1/sigma^2 + 1/sigma_data^2, the v-prediction loss) keeps weight on the noisy
steps where style and layout are decided: on MiniCanvas it erased objects that eps-weighting left untouched
(bench/RESULTS.md). AdamW (torch's fused kernel on the CPU and CUDA), cosine learning-rate decay, gradient clipping
(authors: 1.0).
Several concepts train into one adapter set: each batch draws samples of every concept.

Anchor samples (a measured deviation from the authors, who noise only concept samples): the forget loss sees x_t
noised from the surrogate's own samples, with the same concept-prompt student and surrogate-prompt teacher. Given a
half-drawn concept picture (mid noise) and the surrogate's prompt, the teacher repaints it and loses the rest of the
picture (measured per noise level: `python -m bench.minicanvas.diagnose targets`);
near t = 0 it keeps the concept it is given. Concept samples alone therefore teach the student debris at mid noise
and nothing at low noise. Anchor rows teach "concept prompt on a surrogate picture -> the surrogate's picture".
Every row (1.0, the default) kept more of the picture and more of the classes no retain list names than half of
them or none (bench/RESULTS.md, "Erase only the concept"). The share is applied in whole rows of the batch
(round(surrogate_anchor * batch_size)): with batch 2, 0.75 is 1.0.

Reading order: `distill` (the loop, on one screen), then the helpers it calls, in sections: the data
(`make_training_data`, `get_batch`, `training_batches` with the teacher's targets), the networks (`x0_no_grad`,
`backward_rows`), the optimizer (`training_mode`, `lr_at`, `optimizer_step`), the probes (`make_probes`,
`measure_probes`) and the file's record (`lora_metadata`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from ._version import __version__
from .adapters import AdapterSet, attach
from .autograd import backward_safe, feeding, frozen, inplace_safe
from .calibrate import calibrate_strength
from .config import LOSS_WEIGHTINGS, SAMPLE_CFG, SAMPLE_STEPS, option
from .families import family_of, last_layers, text_candidates
from .errors import Cancelled, NonFiniteLossError, SpareInputError
from .lora import LoraWeights, metadata_json
from .model import DiffusionModel, lora_targets, text_encoder_of, text_key_prefix
from .prompts import expand_alternatives, validate_prompts
from .sampling import GPU_SAMPLE_BATCH, data_std, forward_rows, generate, loss_weight, noised, uniform_t
from .saliency import Saliency
from .timesteps import TimestepProfile, check_pairs

TEXT_ENCODER_CHOICES = ("auto", "on", "last", "off")  # DistillConfig.text_encoder
LEARNING_RATE_AUTO = 0.0  # DistillConfig.learning_rate: the model family's measured rate (Family.learning_rate)
CROSS_ROWS_AUTO = -1  # DistillConfig.cross_rows: the model family's measured default (families.Family.cross_rows)
PSEUDO_ROWS_AUTO = -1  # DistillConfig.pseudo_rows: Family.pseudo_rows where the model reads pseudo words, else 0
MODEL_STRENGTH_AUTO = -1.0  # DistillConfig.model_strength: Family.model_strength where the text encoder trains, else 1
CONCEPT_KINDS = ("style", "object")  # DistillConfig.concept_kind
RETAIN_SAMPLE_BUDGET = 64  # auto retain samples: about this many in all (a long {a|b} retain list gets 1 per prompt)

log = logging.getLogger(__name__)


def anchor_samples(cfg: "DistillConfig") -> int:
    """Samples per surrogate prompt for the anchor rows (cfg.anchor_samples, or cfg.samples)."""
    return cfg.anchor_samples or cfg.samples


def retain_sample_steps(cfg: "DistillConfig") -> int:
    """Euler steps for the retain samples (cfg.retain_sample_steps, or half of sample_steps)."""
    return cfg.retain_sample_steps or max(1, cfg.sample_steps // 2)


def retain_samples_auto(samples: int, n_prompts: int) -> int:
    """Samples per retain prompt when not set: `samples` (per concept prompt) for a short list, fewer for a long one, so that
    self-generation stays about RETAIN_SAMPLE_BUDGET samples (13 prompts -> 4 each; 91 prompts -> 1 each: the two
    settings measured on MiniCanvas)."""
    return max(1, min(samples, RETAIN_SAMPLE_BUDGET // max(n_prompts, 1)))


AHEAD_STEPS = 20  # steps whose teacher targets are held at once (x_t and x0 of 4 rows each: 40 MB for SDXL latents)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # torch's fused AdamW runs there; elsewhere (mps, xpu, directml) torch's default
PROBE_SIZE = 8  # probe rows (concept samples spread over every concept, t spread over the schedule)


class Probe(NamedTuple):
    """A fixed probe batch: x_t, sigma, the student's prompts (rows of the conditioning batch), the teacher's x0 and
    the loss weight per row."""
    xt: torch.Tensor
    sigma: torch.Tensor
    student: torch.Tensor
    target: torch.Tensor
    w: torch.Tensor


@dataclass
class DistillConfig:
    """Stage 2, Sparse LoRA Distill: what the node sets (field = node input), with the engine options no node shows
    (node=False). Defaults follow the authors where they published one; the deviations name their evidence."""

    concepts: list[str] = option(help="Concept prompt(s) to erase, one per line.")
    surrogates: list[str] = option(help="What each concept becomes, one line per concept line (e.g. 'a painting').")
    retain: list[str] = option(
        help="Prompts that must not change, one per line: neighbour styles, other people, everyday subjects. "
             "{a|b|c} groups expand to every combination, e.g. 'a {cat|street|portrait} in {Monet|Picasso} style'. "
             "The empty prompt is always retained.", factory=list)
    rank: int = option(8, "LoRA rank: how much the update can express (the authors' 4; default 8). Larger = a bigger "
                          "file and more that can move.", min=1, max=128)
    alpha: float = option(8.0, "LoRA alpha; update scale = alpha / rank (default 8 / 8 = 1, like the authors' 4 / 4).",
                          min=0.01, max=256.0, step=0.01)
    steps: int = option(200, "Training steps (with stop_at_gap_closed > 0: the most steps).", min=1, max=100000)
    learning_rate: float = option(LEARNING_RATE_AUTO, "AdamW learning rate, cosine-decayed to 0. 0 = the model "
                                                      "family's measured rate: 1e-4 on SD1.x/SD2.x/SDXL (the "
                                                      "authors'), 2e-4 on Flux-class DiTs.",
                                  min=0.0, max=1.0, step=1e-5)
    forget_weight: float = option(0.3, "Weight of the forget (concept -> surrogate) loss (authors: 0.3).",
                                  min=0.0, max=100.0, step=0.05)
    retain_weight: float = option(1.0, "Weight of the retain loss (authors: 1.0). Higher = other prompts move less, "
                                       "the concept erases more slowly.", min=0.0, max=100.0, step=0.05)
    seed: int = option(0, "Seed for self-generated samples, timesteps and adapter init: same seed, same result.",
                       min=0, max=0xffffffffffffffff)
    text_encoder: str = option(
        "auto", "Also train the LoRA on the text encoder's layers (what the prompt means), beside the scanned "
                "diffusion-model modules: the erased prompt then draws the surrogate's picture more often and "
                "concepts nobody listed keep their looks better. on = every layer the model reads; last = only "
                "each encoder's last read layer (less memory and time on T5 / Qwen / Gemma); auto = on for SD1.x / "
                "SD2.x / SDXL, off for the DiTs (measured on a miniature only; the text encoder then has to fit on "
                "the GPU beside the model). The file then needs a loader with a CLIP input (LoraLoader, Apply "
                "Erasure with its clip).", choices=TEXT_ENCODER_CHOICES)
    gradient_checkpointing: bool = option(
        True, "Recompute activations in backward (what lets SD1.5/SDXL train on 8-16 GB cards), up to ~20% slower "
              "per step. On by default, as in ComfyUI's own trainer; turn off on a large GPU for speed.")
    samples: int = option(4, "Self-generated training samples per prompt: concept and surrogate lines; the retain "
                             "lines and the empty prompt get as many (fewer for a long list: about 64 in all), drawn "
                             "in half the Euler steps. More = steadier, slower start.", min=1, max=64)
    loss_weighting: str = option(
        "v", "How noise levels are weighted: v = also the noisy steps where style and layout are decided (erases in "
             "fewer steps); eps = the authors' noise-prediction loss. Use the same in Timestep Profile and Sparse "
             "LoRA Distill.", choices=LOSS_WEIGHTINGS)
    # erase until erased (ours; the authors train a fixed number of steps)
    stop_at_gap_closed: float = option(
        0.0, "Stop once the concept->surrogate gap (measured every check_every steps on a fixed probe) has closed by "
             "this fraction; 0 = run every step (default). Stopping early saves time, but the retain loss then has "
             "fewer steps to repair what the erasure moved in other concepts.", min=0.0, max=0.99, step=0.01)
    extend_until_gap_closed: float = option(
        0.0, "If > 0 and the concept->surrogate gap has closed by less than this after `steps`: train on until it has "
             "(a second cosine from half the learning rate, checked every check_every steps), at most `steps` more. "
             "0 = a fixed number of steps.", min=0.0, max=0.99, step=0.01, node=False)
    surrogate_anchor: float = option(
        1.0, "Share of each training batch's forget rows made from the SURROGATE's own self-generated samples (the "
             "rest: the concept's; whole rows of a batch of 2, so 0, 0.5 or 1). Surrogate samples teach the LoRA to "
             "turn the concept's prompt into the surrogate's picture, keeping the rest of the picture; the concept's "
             "own samples teach it to repaint them, which can leave debris. 0 = the authors' method.",
        min=0.0, max=1.0, step=0.5)
    # after training (calibrate.py; an engine option while it is measured)
    calibrate_share: float = option(
        0.0, "If > 0: after training, scale the LoRA down to the lowest strength (1, 0.9, ... 0.5) at which at least "
             "this share of the concept prompts' self-generated samples still follow the surrogate (nearer its "
             "sample from the same noise than the concept's), times calibrate_margin. 0 = strength 1.",
        min=0.0, max=1.0, step=0.05, node=False)
    calibrate_margin: float = option(1.0, "The calibrated strength = the lowest that passed x this (at most 1).",
                                     min=1.0, max=2.0, step=0.05, node=False)
    # engine options no node shows
    retain_unconditional: bool = option(True, "Also keep the empty prompt's prediction (classifier-free guidance "
                                              "uses it).", node=False)
    batch_size: int = option(2, "Forget samples per step (and as many retain samples).", node=False)
    grad_clip: float = option(1.0, "Max gradient norm (authors: 1.0); 0 disables.", node=False)
    # 0, not the authors' 0.1: 0.1 measured no better (20 concepts x 3 training seeds, paired: mean4 -0.18
    # [-0.88, +0.46], unlisted IRA -1.02; bench/RESULTS.md, "Why each default")
    dropout: float = option(0.0, "LoRA dropout (authors: 0.1; 0.1 measured no better here).", node=False)
    sample_steps: int = option(SAMPLE_STEPS, "Euler steps to self-generate the samples.", node=False)
    sample_cfg: float = option(SAMPLE_CFG, "Classifier-free guidance scale of the self-generation.", node=False)
    weight_decay: float = option(0.0, "AdamW weight decay on the adapters.", node=False)
    check_every: int = option(20, "Steps between probe-gap checks.", node=False)
    retain_samples: int = option(0, "Samples per retain prompt; 0 = auto (retain_samples_auto).", node=False)
    anchor_samples: int = option(0, "Self-generated samples per surrogate prompt for the anchors; 0 = `samples` "
                                    "(why not fewer: bench/HISTORY.md, \"Speed for the time target\").", node=False)
    retain_sample_steps: int = option(0, "Euler steps for the retain samples; 0 = half of sample_steps (at least 1): "
                                         "for time, retention unchanged (same section).", node=False)
    uncond_rows: int = option(0, "Retain rows per step that keep the EMPTY prompt's prediction on the forget rows' own "
                                 "x_t (the states the erased sampler visits; classifier-free guidance multiplies a "
                                 "drift of the empty prompt there by its scale - 1).", min=0, max=64, node=False)
    # default -1 = the family's (families.Family.cross_rows): 2 on the UNet (20 concepts x 3 training seeds, paired,
    # unlisted half: mean(UA, unlisted IRA, unlisted CRA, SFA) +0.87 [+0.13, +1.68], objects' unlisted IRA +2.7), 0 on
    # the DiTs (MiniCanvas-Flux, same protocol: mean4 -0.28 [-0.91, +0.27], 22% more time); bench/RESULTS.md,
    # "Why each default"
    cross_rows: int = option(CROSS_ROWS_AUTO, "Retain rows per step that keep a random RETAIN prompt's prediction on "
                                              "the forget rows' own x_t: on the very states the erasure trains, only "
                                              "the concept's prompt may change. -1 = the model family's measured "
                                              "default (UNet 2, DiT 0).",
                             min=-1, max=64, node=False)
    # off: mix_concept 0.5, 20 concepts x 2 training seeds, paired: objects' unlisted IRA +6.3 [+2.7, +10.3], but
    # object UA -3.0 (ring 82.5), mean4 -0.15 [-1.64, +1.33]; mix_concept 0.3, 20 x 3: objects' unlisted IRA +1.8
    # [+0.2, +3.5], styles' -1.7, mean4 -0.12 [-1.00, +0.75]; bench/RESULTS.md, "Blended codes as retain prompts"
    mix_rows: int = option(0, "Retain rows per step, on the forget rows' own x_t, whose prompt is a BLEND of two "
                              "prompt codes (see mix_concept) that the student must treat as the unerased model does: "
                              "it keeps the space between the listed prompts, where unlisted neighbours lie.",
                           min=0, max=64, node=False)
    mix_concept: float = option(0.0, "mix_rows' blends: 0 = two neighbouring retain prompts, (1 - u) a + u b with u "
                                     "uniform in [0, 1]; > 0 = a retain prompt moved toward its nearest concept "
                                     "prompt by u uniform in [0, mix_concept].", min=0.0, max=0.95, step=0.05,
                                node=False)
    # Retain rows whose prompt is the concept prompt with the concept's words replaced by perturbed copies of their
    # token embeddings that the unerased model draws as something else -- the concept's neighbourhood, found by the
    # model itself, without naming anything -- and forget rows where it still draws the concept (a model that reads
    # pseudo words: MiniCanvas, ComfyUI's CLIPs). pseudo_rows 2 + pseudo_forget_rows 2 (radius 2, keep 0.5) against
    # none, 20 concepts x 3 training seeds, paired: mean4 +3.11 [+1.49, +4.81], unlisted IRA +8.68 [+4.55, +13.80],
    # synonyms +1.83, SFA +1.58, for 38% more time (keep 0.25: mean4 +2.00, SFA -0.67, ukiyo's SFA 73 -> 62);
    # pseudo_rows alone: the objects' synonyms -34.5 (one seed).
    # "auto" (-1): Family.pseudo_rows (2 on the UNets, 0 on the DiTs: on MiniCanvas-Flux mean4 -0.20 [-0.93, +0.51],
    # one seed). bench/RESULTS.md, "Perturbed concept words", "Pseudo words on the DiT"
    pseudo_rows: int = option(PSEUDO_ROWS_AUTO,
                              "Guard for the concepts no retain line names: retain rows per step whose prompt is the "
                              "concept with its words nudged (in the text encoder's embedding) to where the unerased "
                              "model draws something else, so the erasure spares the concept's neighbours. -1 = "
                              "auto (2 on SD1/SD2/SDXL, 0 on the DiTs), 0 = off (about 30% faster).", min=-1, max=64)
    pseudo_radius: float = option(2.0, "pseudo_rows' perturbation, in units of the median distance from the word's "
                                       "embedding to the other words'.", min=0.0, max=10.0, step=0.05, node=False)
    pseudo_keep: float = option(0.5, "pseudo_rows keeps a perturbed word whose unerased x0 lies at least this "
                                    "fraction of the concept->surrogate gap from the concept's (pseudo_forget_rows "
                                    "those closer).", min=0.0, max=5.0, step=0.05, node=False)
    pseudo_forget_rows: int = option(PSEUDO_ROWS_AUTO,
                                     "Forget rows per step, on the forget rows' own x_t: the concept word's "
                                     "embedding perturbed by pseudo_forget_radius where the unerased model still "
                                     "draws the concept (closer than pseudo_keep), mapped to the surrogate (they "
                                     "follow the retain rows in a step and share their weight and mean). -1 = as "
                                     "many as pseudo_rows.", min=-1, max=64, node=False)
    pseudo_forget_radius: float = option(1.0, "pseudo_forget_rows' perturbation (as pseudo_radius).", min=0.0,
                                         max=10.0, step=0.05, node=False)
    # "auto" (-1): Family.model_strength where the text encoder trains too (0.9 on the UNets: MiniCanvas, 20 concepts
    # x 3 training seeds, paired against 1: mean4 +0.45 [+0.15, +0.78], unlisted IRA +0.92 [+0.32, +1.67], SFA +0.42;
    # bench/RESULTS.md, "The network's part at 0.9"), else 1. The network's part moves the unnamed neighbours, the
    # text encoder's keeps the object ("Which half of the LoRA moves the unlisted classes")
    model_strength: float = option(MODEL_STRENGTH_AUTO,
                                   "The LoRA's network part is saved at this strength, its text encoder's at 1 (as "
                                   "LoraLoader's strength_model / strength_clip). -1 = auto: 0.9 on SD1/SD2/SDXL (an "
                                   "object, concept_kind: 0.8) when the text encoder trains, else 1.", min=-1.0,
                                   max=2.0, step=0.05, node=False)
    # Which of the family's model strengths "auto" takes (Family.model_strength / object_model_strength): the objects'
    # unnamed neighbours keep their looks at a lower network strength, where the styles' erased rows lose the object
    # (MiniCanvas, the 10 objects x 3 training seeds at 0.8, paired against 0.9: unlisted IRA +1.80 [+0.73, +3.00], UA
    # -0.67, synonyms -2.0; the styles at 0.8, one seed: SFA -4.0; bench/RESULTS.md, "Objects at their own strength").
    # The engine cannot tell one from the other; the user can.
    concept_kind: str = option("style", "What the concepts are. object = a thing that is drawn (a dog, a car, a "
                                        "logo): the LoRA's network part is saved at a lower strength, which keeps "
                                        "similar objects nobody listed closer to their looks; style = an art style, "
                                        "an artist, a look, anything else, or a mix of kinds. SD1/SD2/SDXL; no effect "
                                        "on the DiTs.",
                               choices=CONCEPT_KINDS)


@dataclass
class DistillResult:
    lora: LoraWeights
    losses: list[dict]                       # per step: step, loss, forget, retain, lr
    seconds: float
    trainable_params: int
    config: DistillConfig

    probe: tuple[float, float] = (0.0, 0.0)  # forget loss on a fixed probe batch, before and after training
    checks: list = field(default_factory=list)  # per check: step, gap, gap_closed, retain_drift, modules
    stopped_early: bool = False              # the stopping rule ended training before `config.steps`
    strength: float = 1.0                    # the calibrated strength baked into `lora` (1 = none)
    calibration: list = field(default_factory=list)  # per strength tried: strength, erased share

    @property
    def steps_used(self) -> int:
        return len(self.losses)

    @property
    def gap_closed(self) -> float:
        """Relative drop of the forget loss on the fixed probe batch (0 = no progress, 1 = gap closed). The per-step
        losses are not used: they swing with the sampled timestep."""
        before, after = self.probe
        return 0.0 if before <= 0 else 1.0 - after / before

    @property
    def warning(self) -> str | None:
        """A plain-words warning when training visibly did not work (a trainer that reports success while nothing
        was learned is a known failure of other tools); None when the forget loss dropped by at least 20%."""
        if self.gap_closed < 0.2:
            return (f"the forget loss dropped only {100 * self.gap_closed:.0f}% over {len(self.losses)} steps: "
                    "the concept is probably not erased yet; raise steps or learning_rate, or select more modules")
        goal = self.config.stop_at_gap_closed
        if goal > 0 and self.gap_closed < goal:
            return (f"the concept-to-surrogate gap closed by {100 * self.gap_closed:.0f}% after "
                    f"{len(self.losses)} steps, short of the {100 * goal:.0f}% target: the erasure may be partial; "
                    "raise steps or learning_rate, or select more modules")
        return None

    def report(self) -> str:
        """One line for logs and file metadata: steps used and the probe gap before / after."""
        before, after = self.probe
        why = "gap target reached" if self.stopped_early else "step cap" if self.steps_used <= self.config.steps \
            else f"extended past {self.config.steps} steps to close the gap"
        drift = self.checks[-1].get("retain_drift", 0.0) if self.checks else 0.0
        return (f"{self.steps_used} of {self.config.steps} steps ({why}); concept->surrogate gap {before:.4g} -> "
                f"{after:.4g} (closed {100 * self.gap_closed:.0f}%); retain drift {drift:.4g}; "
                f"{self.lora_modules} modules")

    @property
    def lora_modules(self) -> int:
        return len(self.lora.modules)


def validate(config: DistillConfig, saliency: Saliency) -> DistillConfig:
    """Check every user input; returns a copy with prompts stripped. Raises SpareInputError naming the input."""
    concepts = validate_prompts(config.concepts, "concept")
    surrogates = validate_prompts(config.surrogates, "surrogate")
    check_pairs(concepts, surrogates)
    if any(not isinstance(r, str) for r in config.retain):
        raise SpareInputError("retain: every retain prompt must be text")
    retain = expand_alternatives(config.retain)  # "{a|b} in {c|d} style" -> the 4 combinations
    clash = sorted({c.lower() for c in concepts} & {r.lower() for r in retain})
    if clash:
        raise SpareInputError(f"retain prompts contain a concept being erased ({clash}); a prompt cannot be both "
                              "forgotten and retained — remove it from retain")
    if config.rank <= 0:
        raise SpareInputError(f"rank={config.rank} must be >= 1 (typical: 4-16)")
    if config.alpha <= 0:
        raise SpareInputError(f"alpha={config.alpha} must be > 0 (typical: equal to rank)")
    if config.steps <= 0:
        raise SpareInputError(f"steps={config.steps} must be >= 1")
    if not (config.learning_rate >= 0 and math.isfinite(config.learning_rate)):
        raise SpareInputError(f"learning_rate={config.learning_rate} must be a positive number (typical: 1e-4) or 0 "
                              "(the model family's measured rate)")
    if config.forget_weight <= 0 or config.retain_weight < 0:
        raise SpareInputError(f"forget_weight={config.forget_weight} must be > 0 and retain_weight="
                              f"{config.retain_weight} must be >= 0")
    if not 0.0 <= config.surrogate_anchor <= 1.0:
        raise SpareInputError(f"surrogate_anchor={config.surrogate_anchor} must be in [0, 1] (share of the forget "
                              "batch noised from surrogate samples)")
    if config.batch_size <= 0 or config.samples <= 0 or config.sample_steps <= 0:
        raise SpareInputError(f"batch_size={config.batch_size}, samples={config.samples} and sample_steps="
                              f"{config.sample_steps} must be >= 1")
    if config.anchor_samples < 0 or config.retain_sample_steps < 0:
        raise SpareInputError(f"anchor_samples={config.anchor_samples} and retain_sample_steps="
                              f"{config.retain_sample_steps} must be >= 0 (0 = auto)")
    if config.retain_samples < 0:
        raise SpareInputError(f"retain_samples={config.retain_samples} must be >= 0 (0 = auto)")
    if not 0.0 <= config.dropout < 1.0:
        raise SpareInputError(f"dropout={config.dropout} must be in [0, 1)")
    if config.loss_weighting not in LOSS_WEIGHTINGS:
        raise SpareInputError(f"loss_weighting='{config.loss_weighting}' is not one of {', '.join(LOSS_WEIGHTINGS)}")
    if not 0.0 <= config.stop_at_gap_closed < 1.0:
        raise SpareInputError(f"stop_at_gap_closed={config.stop_at_gap_closed} must be in [0, 1) (0 = run every step; "
                              "typical 0.8)")
    if not 0.0 <= config.extend_until_gap_closed < 1.0:
        raise SpareInputError(f"extend_until_gap_closed={config.extend_until_gap_closed} must be in [0, 1) (0 = a "
                              "fixed number of steps; typical 0.9)")
    if config.check_every <= 0:
        raise SpareInputError(f"check_every={config.check_every} must be >= 1")
    if not 0.0 <= config.calibrate_share <= 1.0 or not 1.0 <= config.calibrate_margin <= 2.0:
        raise SpareInputError(f"calibrate_share={config.calibrate_share} must be in [0, 1] (0 = off; typical 1.0) and "
                              f"calibrate_margin={config.calibrate_margin} in [1, 2] (typical 1.15)")
    if config.model_strength != MODEL_STRENGTH_AUTO and not 0.0 < config.model_strength <= 2.0:
        raise SpareInputError(f"model_strength={config.model_strength} must be in (0, 2] (or -1: auto, 0.9 on the "
                              "UNets, 0.8 for an object, when the text encoder trains, else 1)")
    if config.cross_rows < CROSS_ROWS_AUTO or config.uncond_rows < 0:
        raise SpareInputError(f"cross_rows={config.cross_rows} must be >= 0 (or -1: the family's default) and "
                              f"uncond_rows={config.uncond_rows} >= 0")
    if config.mix_rows < 0 or not 0.0 <= config.mix_concept <= 0.95:
        raise SpareInputError(f"mix_rows={config.mix_rows} must be >= 0 and mix_concept={config.mix_concept} in "
                              "[0, 0.95]")
    if config.pseudo_rows < PSEUDO_ROWS_AUTO or config.pseudo_forget_rows < PSEUDO_ROWS_AUTO:
        raise SpareInputError(f"pseudo_rows={config.pseudo_rows} and pseudo_forget_rows={config.pseudo_forget_rows} "
                              "must be >= 0 (or -1: auto)")
    if config.concept_kind not in CONCEPT_KINDS:
        raise SpareInputError(f"concept_kind='{config.concept_kind}' is not one of {', '.join(CONCEPT_KINDS)}")
    if config.text_encoder not in TEXT_ENCODER_CHOICES:
        raise SpareInputError(f"text_encoder='{config.text_encoder}' is not one of {', '.join(TEXT_ENCODER_CHOICES)}")
    if config.mix_rows and not config.retain:
        raise SpareInputError("mix_rows blends retain prompts: give at least one retain prompt")
    if saliency is None or not saliency.selected:
        raise SpareInputError("the saliency selects no module; rescan with a larger selection (fraction or top-k)")
    return DistillConfig(**{**asdict(config), "concepts": concepts, "surrogates": surrogates, "retain": retain})


def model_reads_pseudo(model) -> bool:
    """The model reads pseudo words (pseudo_bank): its `pseudo_words` is a dict, not None or missing."""
    return getattr(model, "pseudo_words", None) is not None


def for_model(cfg: DistillConfig, model: DiffusionModel) -> DistillConfig:
    """`cfg` with its "auto" fields resolved for `model`'s family: cross_rows -1 -> Family.cross_rows, learning_rate
    0 -> Family.learning_rate, text_encoder "auto" -> "on" where Family.text_encoder and the model has a text encoder
    (model.text_encoder_of), pseudo_rows -1 -> Family.pseudo_rows where the model reads pseudo words (a
    `pseudo_words` dict that is not None) else 0, pseudo_forget_rows -1 -> pseudo_rows, model_strength -1 ->
    Family.model_strength (concept_kind "object": Family.object_model_strength) where the text encoder trains, else 1.
    What trains (and what the LoRA's metadata records) is the resolved value."""
    family = family_of(model)
    has_text = text_encoder_of(model) is not None
    if cfg.text_encoder == "auto":
        cfg = replace(cfg, text_encoder="on" if family.text_encoder and has_text else "off")
    if trains_text(cfg):
        if not has_text:
            raise SpareInputError(f"text_encoder='{cfg.text_encoder}' needs the model's text encoder: give the node "
                                  "the CLIP the model was loaded with, or set text_encoder to 'off'")
        if cfg.mix_rows:
            raise SpareInputError("mix_rows blends prompt codes, which a trained text encoder does not have: set "
                                  "mix_rows to 0 or text_encoder to 'off'")
        if cfg.calibrate_share > 0:  # it samples through `encode`, which a host may cache from before training
            raise SpareInputError("calibrate_share is not supported with a trained text encoder: set calibrate_share "
                                  "to 0 or text_encoder to 'off'")
    reads_pseudo = model_reads_pseudo(model)
    if cfg.pseudo_rows == PSEUDO_ROWS_AUTO:
        cfg = replace(cfg, pseudo_rows=family.pseudo_rows if reads_pseudo else 0)
    if cfg.pseudo_forget_rows == PSEUDO_ROWS_AUTO:
        cfg = replace(cfg, pseudo_forget_rows=cfg.pseudo_rows)
    if (cfg.pseudo_rows or cfg.pseudo_forget_rows) and not reads_pseudo:
        raise SpareInputError(f"pseudo_rows={cfg.pseudo_rows} / pseudo_forget_rows={cfg.pseudo_forget_rows} need "
                              "the model's text encoder (give the node the CLIP the model was loaded with) and one "
                              "whose token embeddings SPARE can read: set pseudo_rows to 0 or -1 (auto)")
    if cfg.cross_rows == CROSS_ROWS_AUTO:
        cfg = replace(cfg, cross_rows=family.cross_rows)
    if cfg.learning_rate == LEARNING_RATE_AUTO:
        cfg = replace(cfg, learning_rate=family.learning_rate)
    if cfg.model_strength == MODEL_STRENGTH_AUTO:
        kind_strength = family.object_model_strength if cfg.concept_kind == "object" else family.model_strength
        cfg = replace(cfg, model_strength=kind_strength if trains_text(cfg) else 1.0)
    return cfg


def distill(
    model: DiffusionModel,
    config: DistillConfig,
    saliency: Saliency,
    profile: Optional[TimestepProfile] = None,
    latents: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[int, int, float], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    on_check: Optional[Callable[[dict, AdapterSet], None]] = None,
) -> DistillResult:
    """Train a sparse LoRA on `saliency.selected` that maps each concept to its surrogate. The network is left
    exactly as it was (no parameter written, every hook removed), also on error or cancellation.

    latents: optional concept samples [N, C, H, W] (model latent space) instead of self-generated ones; sample i
    belongs to concept i % len(concepts). progress(step, steps, loss) is called after every step; should_stop()
    before every step (return True to cancel: Cancelled is raised and nothing is returned). on_check(check,
    adapters) is called at every probe check inside the run with the check's record (step, gap, gap_closed,
    retain_drift, modules) and the live adapters: the node logs the gap closed there, the benchmark snapshots the
    LoRA (bench/minicanvas/selection.py).

    Erase until erased: every `check_every` steps the concept->surrogate gap is measured on a fixed probe batch;
    training stops once it has closed by `stop_at_gap_closed`, at the latest after `steps` (the learning rate is
    cosine-decayed to the cap, so a run stopped at step k equals the first k steps of the full run). The converse,
    `extend_until_gap_closed` (an engine option, off): a run whose gap has closed by less than that after `steps` trains
    on, on a second cosine from half the learning rate, until it has (at most `steps` more); a run that got there is
    unchanged bit for bit. Measured on MiniCanvas-Flux: UA +1.08 [0, +3.75] for ~10% more steps, not a default
    (bench/RESULTS.md, "Training on while the gap is open").
    """
    cfg = for_model(validate(config, saliency), model)
    started = time.perf_counter()
    data = make_training_data(model, cfg, latents, should_stop)
    with training_mode(model, cfg):
        data = data.trainable_copies()
        adapters = attach(*adapter_targets(model, cfg, saliency), cfg.rank, cfg.alpha, cfg.dropout,
                          device=model.device)
        try:
            params = adapters.parameters()
            opt, scaler = make_optimizer(model, cfg, params)
            batches = training_batches(model, adapters, data, cfg, profile, torch.Generator().manual_seed(cfg.seed + 2))
            probes = make_probes(model, adapters, data, cfg)
            gap_before = measure_probes(model, data, probes[:1])[0]  # the concept->surrogate gap before training
            checks = [check_record(0, gap_before, 0.0, gap_before, adapters)]
            losses, stopped_early, cap = [], False, step_cap(cfg)
            for step in range(cap):
                if step >= cfg.steps and checks[-1]["gap_closed"] >= cfg.extend_until_gap_closed:
                    break  # erased by the planned steps (or by the extension's last check)
                if should_stop is not None and should_stop():
                    raise Cancelled(f"cancelled at step {step} of {cfg.steps}; nothing was saved")
                lr = lr_at(step, cfg)
                batch, target = next(batches)  # target: the teacher's x0 (the network without adapters)
                opt.zero_grad(set_to_none=True)
                forget, retain = backward_rows(model, data, cfg, batch, target, scaler)
                value = cfg.forget_weight * forget + cfg.retain_weight * retain
                if not math.isfinite(value):
                    raise NonFiniteLossError(step + 1, value)
                optimizer_step(opt, scaler, params, lr, cfg.grad_clip)
                losses.append({"step": step + 1, "loss": value, "forget": forget, "retain": retain, "lr": lr})
                if progress is not None:
                    progress(step + 1, cfg.steps if step < cfg.steps else cap, value)
                at_check = (step + 1) % cfg.check_every == 0 or step + 1 == cfg.steps  # the plan's end: extend?
                if at_check and step + 1 < cap:
                    checks.append(check_record(step + 1, *measure_probes(model, data, probes), gap_before, adapters))
                    if on_check is not None:
                        on_check(checks[-1], adapters)
                    if cfg.stop_at_gap_closed > 0 and checks[-1]["gap_closed"] >= cfg.stop_at_gap_closed and \
                            step + 1 < cfg.steps:
                        stopped_early = True
                        if progress is not None:
                            progress(cfg.steps, cfg.steps, value)  # complete the bar
                        break
            checks.append(check_record(len(losses), *measure_probes(model, data, probes), gap_before, adapters))
            strength, tried = 1.0, []
            if cfg.calibrate_share > 0:
                strength, tried = calibrate_strength(model, adapters, cfg.concepts, cfg.surrogates, cfg.seed,
                                                     cfg.sample_steps, cfg.sample_cfg, cfg.calibrate_share,
                                                     cfg.calibrate_margin, should_stop)
            lora = LoraWeights.from_adapters(adapters, lora_metadata(cfg, profile, gap_before, checks[-1], strength))
            lora = lora.scaled(strength).scaled(cfg.model_strength, text=1.0)
            trainable = sum(p.numel() for p in params)
        finally:
            adapters.remove()
            if model_reads_pseudo(model):
                model.pseudo_words.clear()
    return DistillResult(lora, losses, time.perf_counter() - started, trainable, cfg,
                         (gap_before, checks[-1]["gap"]), checks, stopped_early, strength, tried)


def adapter_targets(model: DiffusionModel, cfg: DistillConfig, saliency: Saliency) -> tuple:
    """(where, paths) the adapters go: the network's selected modules; with cfg.text_encoder "on" or "last", first
    the text encoder's modules (text_modules), under "text_encoders." (model.LoraTargets) -- or, when the selection
    itself names text-encoder modules (a caller's own Saliency: the benchmark's experiments; the scan never selects
    them), those instead. The order sets the adapters' random init (the benchmark's stored runs made the text
    encoder's first)."""
    if not trains_text(cfg):
        return model.network, list(saliency.selected)
    prefix = text_key_prefix(model)
    named = [p for p in saliency.selected if p.startswith(prefix)]
    text = named or [prefix + p for p in text_modules(model, cfg)]
    return lora_targets(model), text + [p for p in saliency.selected if not p.startswith(prefix)]


def trains_text(cfg: DistillConfig) -> bool:
    """Whether the (resolved) config trains text-encoder adapters: text_encoder "on" or "last"."""
    return cfg.text_encoder in ("on", "last")


def text_modules(model: DiffusionModel, cfg: DistillConfig) -> list[str]:
    """The text encoder's modules that train, as paths inside it: every Linear of its layers (families.text_candidates)
    whose output reaches the conditioning of the first concept prompt (autograd.feeding: not Qwen2.5-VL's vision
    tower, nor the layers after the one a host reads), and with text_encoder "last" only each encoder's last such
    layer (families.last_layers)."""
    text = text_encoder_of(model)
    with frozen(text):
        reached = feeding(text, text_candidates(text), lambda: model.encode_text(cfg.concepts[:1]))
    if not reached:
        raise SpareInputError("text_encoder: no layer of the model's text encoder shapes its conditioning; set "
                              "text_encoder to 'off'")
    return last_layers(reached) if cfg.text_encoder == "last" else reached


# --- the data: samples and prompts ------------------------------------------------------------------------------------

@dataclass
class TrainingData:
    """What training draws its rows from. `cond` encodes every prompt once (the text side is frozen: no graph), so
    that a step's forget and retain rows share one forward per model: rows [0, n) concepts, [n, 2n) surrogates,
    [2n, ...) retain prompts (`concept_rows`, `surrogate_rows`, `retain_rows` map a prompt index to its row)."""

    cond: torch.Tensor
    n_concepts: int
    x_forget: torch.Tensor                   # concept samples; sample j belongs to concept i_forget[j]
    i_forget: torch.Tensor
    n_anchor: int                            # rows of each forget batch drawn from the surrogates' samples
    x_anchor: Optional[torch.Tensor]         # the surrogates' own samples (None when n_anchor == 0)
    i_anchor: Optional[torch.Tensor]
    x_retain: Optional[torch.Tensor]         # retain samples (None: no retain loss)
    i_retain: Optional[torch.Tensor]
    sigma_data: float                        # std of the concept samples (the "v" loss weighting's sigma_data)
    uncond_row: Optional[int] = None         # row of `cond` holding the empty prompt (None: not encoded)
    mix_row: Optional[int] = None            # first of the MIX_BANK blended codes at the end of `cond` (mix_rows)
    prompts: Optional[list] = None           # the prompt of each row of `cond`, when the text encoder trains: the
    #                                          student's conditioning is then encoded anew (`student_cond`)
    pseudo_row: Optional[int] = None         # first of the n_pseudo perturbed-word prompts (pseudo_rows)
    n_pseudo: int = 0
    pforget_row: Optional[int] = None        # first of the perturbed words still drawn as the concept
    pforget_concept: Optional[torch.Tensor] = None  # (pseudo_forget_rows) and the concept of each

    def concept_rows(self, i: torch.Tensor) -> torch.Tensor:
        return i

    def surrogate_rows(self, i: torch.Tensor) -> torch.Tensor:
        return i + self.n_concepts

    def retain_rows(self, i: torch.Tensor) -> torch.Tensor:
        return i + 2 * self.n_concepts

    def trainable_copies(self) -> "TrainingData":
        """Data made under inference mode (a LATENT input, samples generated by the executor) cannot be saved for
        backward; ordinary copies can."""
        def copy(x):
            return None if x is None else x.clone()
        return replace(self, x_forget=copy(self.x_forget), x_anchor=copy(self.x_anchor),
                       x_retain=copy(self.x_retain))


def make_training_data(model: DiffusionModel, cfg: DistillConfig, latents: Optional[torch.Tensor],
                       should_stop: Optional[Callable[[], bool]]) -> TrainingData:
    """Concept samples (forget: `latents` when given), the surrogates' own samples (anchors, when surrogate_anchor >
    0) and retain samples (when there is a retain loss), all from the model itself unless given; and the prompts'
    conditioning."""
    dev = model.device
    if latents is not None:
        if tuple(latents.shape[1:]) != tuple(model.latent_shape):
            raise SpareInputError(f"latents have shape {tuple(latents.shape)}; expected [N, "
                                  f"{', '.join(map(str, model.latent_shape))}] for this model")
        x_forget = latents.float().to(dev)
        i_forget = torch.arange(x_forget.shape[0]) % len(cfg.concepts)
    else:
        x_forget, i_forget = generate(model, cfg.concepts, cfg.samples, cfg.seed, cfg.sample_steps,
                                      cfg.sample_cfg, should_stop=should_stop)
    n_anchor = round(cfg.surrogate_anchor * cfg.batch_size)
    x_anchor = i_anchor = None
    if n_anchor:  # the surrogates' own samples, surrogate i drawn for concept i (its anchor)
        x_anchor, i_anchor = generate(model, cfg.surrogates, anchor_samples(cfg), cfg.seed + 5, cfg.sample_steps,
                                      cfg.sample_cfg, should_stop=should_stop)
    retain_prompts = cfg.retain + ([""] if cfg.retain_unconditional else [])
    x_retain = i_retain = None
    if cfg.retain_weight > 0 and retain_prompts:
        per_retain = cfg.retain_samples or retain_samples_auto(cfg.samples, len(retain_prompts))
        x_retain, i_retain = generate(model, retain_prompts, per_retain, cfg.seed + 1, retain_sample_steps(cfg),
                                      cfg.sample_cfg, should_stop=should_stop)
    else:
        retain_prompts = []
    with torch.no_grad():
        cond = model.encode(cfg.concepts + cfg.surrogates + retain_prompts)
    uncond_row = 2 * len(cfg.concepts) + retain_prompts.index("") if "" in retain_prompts else None
    mix_row = None
    if cfg.mix_rows and retain_prompts:
        mix_row = 2 * len(cfg.concepts) + len(retain_prompts)
        listed = [2 * len(cfg.concepts) + i for i, p in enumerate(retain_prompts) if p]
        with torch.no_grad():
            cond = cat_cond(cond, blend_bank(model, cond, list(range(len(cfg.concepts))), listed, cfg.mix_concept,
                                             torch.Generator().manual_seed(cfg.seed + 7)))
    prompts = cfg.concepts + cfg.surrogates + retain_prompts if trains_text(cfg) else None
    pseudo_row, pseudo, pforget_row, pforget_c = None, [], None, None
    n_rows = 2 * len(cfg.concepts) + len(retain_prompts)
    if cfg.pseudo_rows > 0:  # -1 (auto) is resolved by for_model; unresolved it is off
        pseudo = [p for p, _ in pseudo_bank(model, cfg, cond, x_forget, i_forget,
                                            torch.Generator().manual_seed(cfg.seed + 11), cfg.pseudo_radius, False)]
    if pseudo:  # none where no candidate qualified (logged): no rows
        pseudo_row, n_rows = n_rows, n_rows + len(pseudo)
        with torch.no_grad():
            cond = cat_cond(cond, model.encode(pseudo))
        if prompts is not None:
            prompts = prompts + pseudo
    near = []
    if cfg.pseudo_forget_rows > 0:
        near = pseudo_bank(model, cfg, cond, x_forget, i_forget, torch.Generator().manual_seed(cfg.seed + 13),
                           cfg.pseudo_forget_radius, True)
    if near:
        pforget_row, pforget_c = n_rows, torch.tensor([c for _, c in near])
        with torch.no_grad():
            cond = cat_cond(cond, model.encode([p for p, _ in near]))
        if prompts is not None:
            prompts = prompts + [p for p, _ in near]
    return TrainingData(cond, len(cfg.concepts), x_forget, i_forget, n_anchor, x_anchor, i_anchor, x_retain, i_retain,
                        data_std(x_forget), uncond_row, mix_row, prompts, pseudo_row, len(pseudo), pforget_row,
                        pforget_c)


PSEUDO_BANK = 32  # perturbed concept words kept per run (DistillConfig.pseudo_rows)


def pseudo_bank(model, cfg: DistillConfig, cond, x_forget: torch.Tensor, i_forget: torch.Tensor,
                gen: torch.Generator, radius: float, near: bool) -> list[tuple[str, int]]:
    """Up to PSEUDO_BANK (prompt, concept index): concept prompt i with each of its words that its surrogate lacks
    written as a pseudo word, the word's token embedding(s) plus a random direction of length `radius` x their scale
    (`model.pseudo_word`). near=False keeps those where the unerased model's x0 on the concept's own states lies at
    least pseudo_keep x the concept->surrogate gap from the concept's (it draws something else there), near=True those
    closer (it still draws the concept). Registers the kept pseudo words in model.pseudo_words (distill clears them).
    [] (logged) where no candidate qualifies. Hand-written: no library perturbs a prompt's token embedding for a
    retain set.

    A model that reads pseudo words has `pseudo_words` (a dict: name -> what `encode` reads for that name),
    `prompt_words(prompt)` (its words, in order; joined by spaces they are the prompt again), `knows_word(word)` and
    `pseudo_word(word, radius, generator)` (a perturbed copy of the word, drawn from the generator)."""
    words = []
    for c, s in zip(cfg.concepts, cfg.surrogates):
        ws, ss = model.prompt_words(c), {x.casefold() for x in model.prompt_words(s)}  # "A cat" / "a dog": cat
        diff = list(dict.fromkeys(w for w in ws if w.casefold() not in ss and model.knows_word(w)))
        if not diff:
            raise SpareInputError(f"pseudo_rows: concept prompt '{c}' has no word its surrogate '{s}' lacks; give a "
                                  "surrogate that differs from it in words, or set pseudo_rows to 0")
        words.append(diff)
    n = len(cfg.concepts)
    sig = model.sigma_at(torch.tensor([0.3, 0.5, 0.7]))
    with torch.no_grad():  # each concept's states: its first sample at 3 noise levels; its and its surrogate's x0
        states = []
        for c in range(n):
            x0 = x_forget[(i_forget == c).nonzero().flatten()[:1]].repeat(3, *[1] * (x_forget.dim() - 1))  # any rank
            xt = model.add_noise(x0, torch.randn(x0.shape, generator=gen).to(x0), sig.to(x0))
            pc = model.predict_x0(xt, sig.to(x0), model.select_cond(cond, torch.full((3,), c)))
            ps = model.predict_x0(xt, sig.to(x0), model.select_cond(cond, torch.full((3,), n + c)))
            states.append((xt, pc, (pc - ps).flatten(1).norm(dim=1).mean()))
        kept, tries = [], 0
        # a round's rows in one forward on the CPU (MiniCanvas: not forward_rows' 16, which would change the stored
        # runs' judgements by float rounding), GPU_SAMPLE_BATCH candidates' at a time on a GPU
        per = 3 * (PSEUDO_BANK if torch.device(model.device).type == "cpu" else GPU_SAMPLE_BATCH)
        while len(kept) < PSEUDO_BANK and tries < 8 * PSEUDO_BANK:
            batch = []
            for _ in range(PSEUDO_BANK):  # a round of candidates
                c = tries % n
                tries += 1
                names = {}
                for k, w in enumerate(words[c]):
                    names[w] = f"zzpseudo{'n' if near else 'f'}{tries}" + (f"w{k}" if k else "")
                    model.pseudo_words[names[w]] = model.pseudo_word(w, radius, gen)
                batch.append((c, list(names.values()),
                              " ".join(names.get(x, x) for x in model.prompt_words(cfg.concepts[c]))))
            xt = torch.cat([states[c][0] for c, _, _ in batch])
            codes = model.encode([p for _, _, p in batch])  # each candidate once, on its 3 states
            rows = torch.arange(len(batch)).repeat_interleave(3)
            sigs = sig.repeat(len(batch)).to(xt)
            pp = torch.cat([model.predict_x0(xt[a:a + per], sigs[a:a + per], model.select_cond(codes, rows[a:a + per]))
                            for a in range(0, len(rows), per)])
            for j, (c, names, prompt) in enumerate(batch):
                away = (pp[3 * j:3 * j + 3] - states[c][1]).flatten(1).norm(dim=1).mean()
                if (away < cfg.pseudo_keep * states[c][2]) == near and len(kept) < PSEUDO_BANK:
                    kept.append((prompt, c))
                else:
                    for name in names:
                        del model.pseudo_words[name]
    if not kept:
        log.warning("SPARE: no perturbed concept word drew %sthe concept in %d tries (%s %.2g): "
                    "training without those rows", "" if near else "anything but ", tries,
                    "pseudo_forget_radius" if near else "pseudo_radius", radius)
    return kept


MIX_BANK = 64  # blended prompt codes drawn once per run (DistillConfig.mix_rows)
MIX_NEAR = 4   # a blend's partner: one of a prompt's MIX_NEAR nearest retain prompts (cosine of the codes)


def _zip_cond(f, a, b):
    """f applied to every pair of floating tensors of two conditionings of the same structure (other leaves: a's)."""
    if torch.is_tensor(a):
        return f(a, b) if a.is_floating_point() else a
    if isinstance(a, (tuple, list)):
        return type(a)(_zip_cond(f, x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: _zip_cond(f, a[k], b[k]) if isinstance(a[k], (torch.Tensor, tuple, list, dict)) else a[k]
                for k in a}
    raise SpareInputError("mix_rows: this model's conditioning cannot be blended (prompts of different token "
                          "lengths); set mix_rows to 0")


def _cond_rows(c) -> list:
    """One conditioning per row: a row-wise conditioning's rows (the host's RowConds), or a batched dict split along
    dim 0 (its constants kept in every row)."""
    if hasattr(c, "rows"):
        return list(c.rows)
    n = next(v.shape[0] for v in c.values() if torch.is_tensor(v))
    return [{k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in c.items()} for i in range(n)]


def cat_cond(a, b):
    """Two conditionings' rows, a's then b's (every tensor is batched along dim 0, as select_cond assumes). Where
    either is row-wise (a host's `rows`: prompts of different token lengths on a DiT, which cannot share a forward),
    so is the result."""
    if hasattr(a, "rows") or hasattr(b, "rows"):
        return type(a if hasattr(a, "rows") else b)(_cond_rows(a) + _cond_rows(b))
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, (tuple, list)):
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] for k in a}
    raise SpareInputError(f"this model's conditionings ({type(a).__name__}) cannot be joined into one batch: set "
                          "mix_rows, pseudo_rows and pseudo_forget_rows to 0")


def blend_bank(model: DiffusionModel, cond, concepts: list[int], listed: list[int], mix_concept: float,
               gen: torch.Generator):
    """MIX_BANK blended codes: (1 - u) code(a) + u code(b) over every floating tensor of the conditioning. mix_concept
    0: a a random listed retain row, b one of its MIX_NEAR nearest listed rows, u ~ U(0, 1) -- the space between the
    listed prompts; > 0: a one of a random concept row's MIX_NEAR nearest listed rows, b that concept row, u ~ U(0,
    mix_concept) -- the listed prompts moved part of the way toward the concept. The teacher's prediction for such a
    code is what the student keeps (hand-written: no library blends prompt codes for a retain loss)."""
    rows = torch.tensor(concepts + listed)
    leaves = []  # the conditioning's floating tensors, in a fixed order
    _zip_cond(lambda x, y: leaves.append(x.flatten(1).float()) or x, *[model.select_cond(cond, rows)] * 2)
    flat = torch.cat(leaves, 1)
    flat = torch.nn.functional.normalize(flat - flat.mean(0), dim=1)
    sim = flat @ flat[len(concepts):].T  # each row (concepts, then listed) against the listed rows
    sim[len(concepts):].fill_diagonal_(-2.0)  # a listed row is not its own partner
    near = sim.topk(min(MIX_NEAR, max(1, len(listed) - (0 if mix_concept > 0 else 1))), dim=1).indices
    a, b = [], []
    for _ in range(MIX_BANK):
        if mix_concept > 0:
            c = int(torch.randint(0, len(concepts), (1,), generator=gen))
            j = int(near[c, torch.randint(0, near.shape[1], (1,), generator=gen)])
            a.append(listed[j]), b.append(concepts[c])
        else:
            i = int(torch.randint(0, len(listed), (1,), generator=gen))
            j = int(near[len(concepts) + i, torch.randint(0, near.shape[1], (1,), generator=gen)])
            a.append(listed[i]), b.append(listed[j])
    u = torch.rand(MIX_BANK, generator=gen) * (mix_concept if mix_concept > 0 else 1.0)
    ca, cb = model.select_cond(cond, torch.tensor(a)), model.select_cond(cond, torch.tensor(b))

    def lerp(x, y):
        w = u.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x + w * (y - x)
    return _zip_cond(lerp, ca, cb)


class Batch(NamedTuple):
    """One step's rows, forget rows first: x_t, sigma, and the rows of `TrainingData.cond` the student and the teacher
    see (forget rows: concept / surrogate prompt; retain rows: the retain prompt for both)."""
    xt: torch.Tensor
    sigma: torch.Tensor
    student: torch.Tensor
    teacher: torch.Tensor


def get_batch(model: DiffusionModel, data: TrainingData, cfg: DistillConfig, profile: Optional[TimestepProfile],
              gen: torch.Generator) -> Batch:
    """Draw one step's rows: batch_size forget rows at t ~ the timestep profile (the last n_anchor of them noised from
    the surrogates' samples), then batch_size retain rows at t ~ uniform."""
    rows = torch.randint(0, data.x_forget.shape[0], (cfg.batch_size,), generator=gen)
    t = profile.sample(cfg.batch_size, gen) if profile is not None else uniform_t(cfg.batch_size, gen)
    ids, x0 = data.i_forget[rows], data.x_forget[rows]
    if data.n_anchor:  # the last n_anchor rows: noised surrogate samples of the same concept index
        keep = cfg.batch_size - data.n_anchor
        a_rows = torch.randint(0, data.x_anchor.shape[0], (data.n_anchor,), generator=gen)
        ids = torch.cat([ids[:keep], data.i_anchor[a_rows]])
        x0 = torch.cat([x0[:keep], data.x_anchor[a_rows]])
    sigma, xt = noised(model, x0, t, gen)
    student, teacher = data.concept_rows(ids), data.surrogate_rows(ids)
    if data.x_retain is not None:  # drawn after the forget rows' noise (the RNG order of earlier versions)
        r_rows = torch.randint(0, data.x_retain.shape[0], (cfg.batch_size,), generator=gen)
        r_sigma, r_xt = noised(model, data.x_retain[r_rows], uniform_t(cfg.batch_size, gen), gen)
        r_ids = data.retain_rows(data.i_retain[r_rows])
        sigma, xt = torch.cat([sigma, r_sigma]), torch.cat([xt, r_xt])
        student, teacher = torch.cat([student, r_ids]), torch.cat([teacher, r_ids])
        # rows on the forget rows' own x_t (each kind cycles over the forget rows): the empty prompt, random retain
        # prompts; the same prompt for student and teacher
        ids, k = [], []
        if cfg.uncond_rows and data.uncond_row is not None:
            ids.append(torch.full((cfg.uncond_rows,), data.uncond_row, dtype=student.dtype))
            k.append(torch.arange(cfg.uncond_rows) % cfg.batch_size)
        if cfg.cross_rows:
            n_retain = int(data.i_retain.max()) + 1
            ids.append(data.retain_rows(torch.randint(0, n_retain, (cfg.cross_rows,), generator=gen)))
            k.append(torch.arange(cfg.cross_rows) % cfg.batch_size)
        if cfg.mix_rows and data.mix_row is not None:
            ids.append(data.mix_row + torch.randint(0, MIX_BANK, (cfg.mix_rows,), generator=gen))
            k.append(torch.arange(cfg.mix_rows) % cfg.batch_size)
        if cfg.pseudo_rows > 0 and data.pseudo_row is not None:
            ids.append(data.pseudo_row + torch.randint(0, data.n_pseudo, (cfg.pseudo_rows,), generator=gen))
            k.append(torch.arange(cfg.pseudo_rows) % cfg.batch_size)
        if ids:
            ids, k = torch.cat(ids), torch.cat(k)
            sigma, xt = torch.cat([sigma, sigma[k]]), torch.cat([xt, xt[k]])
            student, teacher = torch.cat([student, ids]), torch.cat([teacher, ids])
        if cfg.pseudo_forget_rows > 0 and data.pforget_row is not None:  # student: the pseudo word; teacher: surrogate
            j = torch.randint(0, data.pforget_concept.shape[0], (cfg.pseudo_forget_rows,), generator=gen)
            k = torch.arange(cfg.pseudo_forget_rows) % cfg.batch_size
            sigma, xt = torch.cat([sigma, sigma[k]]), torch.cat([xt, xt[k]])
            student = torch.cat([student, (data.pforget_row + j).to(student.dtype)])
            teacher = torch.cat([teacher, data.surrogate_rows(data.pforget_concept[j]).to(teacher.dtype)])
    return Batch(xt, sigma, student, teacher)


def training_batches(model: DiffusionModel, adapters: AdapterSet, data: TrainingData, cfg: DistillConfig,
                     profile: Optional[TimestepProfile], gen: torch.Generator) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Each step's batch with the teacher's x0 for it, step after step.

    The teacher's targets do not depend on training: they are computed ahead, for every step up to the next probe
    check (so an early stop wastes none; at most AHEAD_STEPS steps), in no-grad forwards of `forward_rows` rows -- on
    the CPU several steps' rows per forward (less time per row), on a GPU one step's rows, as a step-by-step teacher
    would (bench/HISTORY.md, "Speed"). The draws (and so the run) are those of step-by-step training."""
    step, cap = 0, step_cap(cfg)
    while step < cap:
        end = min(cap, (step // cfg.check_every + 1) * cfg.check_every, step + AHEAD_STEPS,
                  cfg.steps if step < cfg.steps else cap)  # an extension's targets only once it runs
        batches = [get_batch(model, data, cfg, profile, gen) for _ in range(step, end)]
        rows = forward_rows(model.device, batches[0].xt.shape[0])  # a step's rows (cross rows included) at once
        with adapters.disabled():  # the teacher: the network as it was
            targets = x0_no_grad(model, data, torch.cat([b.xt for b in batches]),
                                 torch.cat([b.sigma for b in batches]), torch.cat([b.teacher for b in batches]), rows)
        yield from zip(batches, targets.split([b.xt.shape[0] for b in batches]))
        step = end


# --- the networks: teacher and student --------------------------------------------------------------------------------

def autocast(model: DiffusionModel):
    """Mixed precision in the model's dtype (off for a float32 model)."""
    return torch.autocast(device_type=model.device.type, dtype=model.dtype, enabled=model.dtype != torch.float32)


def student_cond(model: DiffusionModel, data: TrainingData, rows: torch.Tensor):
    """The conditioning of prompt rows `rows` as the student sees it: rows of data.cond; when the text encoder trains
    (data.prompts), those prompts encoded now, through the adapted text encoder (each distinct prompt once)."""
    if data.prompts is None:
        return model.select_cond(data.cond, rows)
    distinct, inverse = torch.unique(rows, return_inverse=True)
    cond = model.encode_text([data.prompts[i] for i in distinct.tolist()])
    return model.select_cond(cond, inverse)


def x0_no_grad(model: DiffusionModel, data: TrainingData, xt: torch.Tensor, sigma: torch.Tensor,
               prompts: torch.Tensor, rows: int, student: bool = False) -> torch.Tensor:
    """The network's x0 for x_t [N] under `prompts` (rows of data.cond), in no-grad forwards of `rows` rows: the
    teacher (inside `adapters.disabled()`), or with student=True the student (`student_cond`: a trained text encoder
    encodes anew)."""
    def cond(index):
        return student_cond(model, data, index) if student else model.select_cond(data.cond, index)
    with torch.no_grad(), autocast(model):
        return torch.cat([model.predict_x0(xt[i:i + rows], sigma[i:i + rows], cond(prompts[i:i + rows])).float()
                          for i in range(0, xt.shape[0], rows)])


def row_losses(model: DiffusionModel, data: TrainingData, cfg: DistillConfig, batch: Batch,
               target: torch.Tensor) -> torch.Tensor:
    """Per row: the student's weighted squared error to the teacher's x0, w(sigma) * ||x0_s - x0_t||^2, in one
    student forward."""
    w = loss_weight(batch.sigma, cfg.loss_weighting, data.sigma_data)
    with autocast(model):
        pred = model.predict_x0(batch.xt, batch.sigma, student_cond(model, data, batch.student)).float()
    return (pred - target).pow(2).flatten(1).mean(1) * w


def forget_retain_loss(model: DiffusionModel, data: TrainingData, cfg: DistillConfig, batch: Batch,
                       target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forget, retain): the row losses averaged over the forget rows and over the retain rows (0 without retain
    rows). Every row of a step goes through one student forward: the same loss as a forward per part, in less time
    on the CPU (bench/HISTORY.md, "Speed")."""
    per_row = row_losses(model, data, cfg, batch, target)
    forget = per_row[:cfg.batch_size].mean()
    retain = per_row[cfg.batch_size:].mean() if data.x_retain is not None else torch.zeros(())
    return forget, retain


def student_rows(device: torch.device, batch_size: int) -> int:
    """Rows per student forward and backward: every row of a step on the CPU (one forward is fastest there); on an
    accelerator 2 x batch_size, the forget and ordinary retain rows, so that the rows on the forget states
    (uncond_rows, cross_rows) add time but not peak memory."""
    return forward_rows(device, 2 * batch_size)


def backward_rows(model: DiffusionModel, data: TrainingData, cfg: DistillConfig, batch: Batch, target: torch.Tensor,
                  scaler) -> tuple[float, float]:
    """Forward and backward of one step's loss, forget_weight * forget + retain_weight * retain; returns (forget,
    retain). Rows beyond `student_rows` are taken in chunks, each chunk's share of the loss backwarded at once (the
    gradient is the same sum; only one chunk's graph is held)."""
    rows, n, b = student_rows(model.device, cfg.batch_size), batch.xt.shape[0], cfg.batch_size
    if n <= rows:
        forget, retain = forget_retain_loss(model, data, cfg, batch, target)
        scaler.scale(cfg.forget_weight * forget + cfg.retain_weight * retain).backward()
        return float(forget.detach()), float(retain.detach())
    forget = retain = 0.0
    for i in range(0, n, rows):
        per_row = row_losses(model, data, cfg, Batch(*(f[i:i + rows] for f in batch)), target[i:i + rows])
        is_forget = torch.arange(i, i + per_row.shape[0], device=per_row.device) < b
        f = per_row[is_forget].sum() / b
        r = per_row[~is_forget].sum() / (n - b)  # n > rows >= b: there are retain rows
        scaler.scale(cfg.forget_weight * f + cfg.retain_weight * r).backward()
        forget, retain = forget + float(f.detach()), retain + float(r.detach())
    return forget, retain


# --- training: autograd mode, optimizer, learning rate ----------------------------------------------------------------

@contextlib.contextmanager
def training_mode(model: DiffusionModel, cfg: DistillConfig):
    """Where training runs: under a forked RNG seeded with cfg.seed (the caller's global RNG is untouched and runs
    are reproducible), the network's own parameters frozen, autograd on (also when called under inference mode, as
    ComfyUI runs nodes), with gradient checkpointing if asked and exact gradients through in-place residual adds
    (autograd.backward_safe)."""
    devices = [model.device] if model.device.type == "cuda" else []
    checkpointing = backward_safe(model.network, cfg.gradient_checkpointing, family_of(model).inplace_residuals)
    text = text_encoder_of(model) if trains_text(cfg) else None
    # a text encoder's layers may add residuals in place (ComfyUI's CLIPLayer: x += attn(norm(x))): its norms read
    # copies whenever autograd records them (autograd.inplace_safe; a no-op for the no-grad teacher)
    text_safe = contextlib.ExitStack()
    if text is not None:
        text_safe.enter_context(frozen(text))
        text_safe.enter_context(inplace_safe(text))
    with torch.random.fork_rng(devices=devices), frozen(model.network), text_safe, torch.inference_mode(False), \
            torch.enable_grad(), checkpointing:
        torch.manual_seed(cfg.seed)
        yield


def make_optimizer(model: DiffusionModel, cfg: DistillConfig, params: list) -> tuple:
    """AdamW on the adapters, and the loss scaler that fp16 training needs."""
    # torch's fused AdamW (one kernel for every adapter tensor; the update rule is AdamW's) where torch has it: the
    # default per-tensor loop is slower on the CPU (bench/HISTORY.md, "Speed").
    fused = True if model.device.type in FUSED_ADAMW_DEVICES else None
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    # fp16 activations can underflow in backward: scale the loss (no-op for fp32/bf16 and on the CPU).
    scaler = torch.amp.GradScaler(model.device.type,
                                  enabled=model.dtype == torch.float16 and model.device.type == "cuda")
    return opt, scaler


def step_cap(cfg: DistillConfig) -> int:
    """The most steps a run may take: `steps`, doubled when extend_until_gap_closed may extend it."""
    return 2 * cfg.steps if cfg.extend_until_gap_closed > 0 else cfg.steps


def lr_at(step: int, cfg: DistillConfig) -> float:
    """The learning rate at `step`: cosine decay from cfg.learning_rate to 0 at `steps`; in an extension (steps beyond
    `steps`, extend_until_gap_closed) a second cosine from half of it to 0 at step_cap."""
    if step < cfg.steps:
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    extra = step_cap(cfg) - cfg.steps
    return 0.5 * cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * (step - cfg.steps) / extra))


def optimizer_step(opt, scaler, params: list, lr: float, grad_clip: float) -> None:
    """After the backward: clip the gradient norm to grad_clip (0: no clipping), one AdamW step at learning rate lr."""
    for group in opt.param_groups:
        group["lr"] = lr
    scaler.unscale_(opt)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


# --- the probes: is the concept erased, are the retain prompts kept ---------------------------------------------------
# Fixed batches (the same x_t, t, prompts at every check). The forget probe measures the concept->surrogate gap
# (whether training did anything, when to stop); the retain probe how far the retain prompts' predictions drifted
# from the teacher's (the collateral damage). Rows span every prompt; t spans the schedule; the teacher's targets are
# computed once. On the CPU a check measures both probes in one student forward; on a GPU one probe per forward.

def make_probe(model: DiffusionModel, adapters: AdapterSet, data: TrainingData, cfg: DistillConfig,
               x_all: torch.Tensor, index: torch.Tensor, student: Callable, teacher: Callable, seed: int) -> Probe:
    rows = torch.linspace(0, x_all.shape[0] - 1, min(PROBE_SIZE, x_all.shape[0])).long()
    ids = index[rows]
    x0 = x_all[rows]
    t = torch.linspace(0.15, 0.95, len(rows))
    sigma, xt = noised(model, x0, t, torch.Generator().manual_seed(seed))
    w = loss_weight(sigma, cfg.loss_weighting, data.sigma_data).view(-1, *[1] * (x0.dim() - 1))
    with adapters.disabled():
        target = x0_no_grad(model, data, xt, sigma, teacher(ids), forward_rows(model.device, PROBE_SIZE))
    return Probe(xt, sigma, student(ids), target, w)


def make_probes(model: DiffusionModel, adapters: AdapterSet, data: TrainingData, cfg: DistillConfig) -> list[Probe]:
    """The forget probe (concept prompt vs the surrogate-prompt teacher), and the retain probe if there are retain
    samples."""
    probes = [make_probe(model, adapters, data, cfg, data.x_forget, data.i_forget, data.concept_rows,
                         data.surrogate_rows, cfg.seed + 3)]
    if data.x_retain is not None:
        probes.append(make_probe(model, adapters, data, cfg, data.x_retain, data.i_retain, data.retain_rows,
                                 data.retain_rows, cfg.seed + 4))
    return probes


def measure_probes(model: DiffusionModel, data: TrainingData, probes: list[Probe]) -> tuple[float, float]:
    """(forget gap, retain drift): each probe's weighted squared student-teacher error, the probes' rows in forwards
    of `forward_rows` rows (on the CPU both probes in one); drift 0 without a retain probe."""
    pred = x0_no_grad(model, data, torch.cat([p.xt for p in probes]), torch.cat([p.sigma for p in probes]),
                      torch.cat([p.student for p in probes]), forward_rows(model.device, PROBE_SIZE), student=True)
    errors = [float(((x0 - p.target) ** 2 * p.w).mean())
              for x0, p in zip(pred.split([len(p.xt) for p in probes]), probes)]
    return errors[0], (errors[1] if len(errors) > 1 else 0.0)


def check_record(step: int, gap: float, drift: float, gap_before: float, adapters: AdapterSet) -> dict:
    """One probe check as DistillResult.checks holds it; gap_closed = the share of the starting gap closed."""
    return {"step": step, "gap": gap, "gap_closed": 0.0 if step == 0 or gap_before <= 0 else 1.0 - gap / gap_before,
            "retain_drift": drift, "modules": len(adapters.adapters)}


# --- the file ---------------------------------------------------------------------------------------------------------

def lora_metadata(cfg: DistillConfig, profile: Optional[TimestepProfile], gap_before: float,
                  final: dict, strength: float = 1.0) -> dict[str, str]:
    """What the LoRA file records of its training, from the validated config and the final probe check. The file's
    other fields (the base model, the key format) are added when it is saved (lora.file_metadata); kohya's ss_*
    fields are the ones its loaders and UIs read."""
    return {
        "spare.version": __version__,
        "spare.concepts": metadata_json(cfg.concepts),
        "spare.surrogates": metadata_json(cfg.surrogates),
        "spare.retain": metadata_json(cfg.retain),
        "spare.modules": str(final["modules"]),
        "spare.timesteps": "uniform" if profile is None or profile.meta.get("uniform") else "profile",
        "spare.config": metadata_json({k: v for k, v in asdict(cfg).items()
                                       if k not in ("concepts", "surrogates", "retain")}),
        "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha),
        "ss_max_train_steps": str(final["step"]), "ss_seed": str(cfg.seed), "ss_learning_rate": str(cfg.learning_rate),
        "spare.retain_drift": f"{final['retain_drift']:.6g}",
        "spare.gap_closed": f"{final['gap_closed']:.4f}",
        "spare.steps_used": str(final["step"]),
        "spare.gap": f"{gap_before:.6g} -> {final['gap']:.6g}",
        "spare.strength": f"{strength:.4g}",
    }
