"""MiniCanvas harness, what every method is asked to do: the concepts (ERASABLE_STYLES, ERASABLE_OBJECTS), the method names, the
budgets (Budget: steps, seeds, SPARE's settings; the --quick / --standard presets), the learning rates, the training
and evaluation templates, the prompt lists of an erasure (concept_prompts, with the retain lists and their
listed / unlisted split) and the SPARE variants named by the settings they change (SPARE_VARIANTS, split_variant).

Nothing here trains, samples or judges: methods.py trains, judge.py grades, dispatch.py runs the grid of tasks.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, replace

import spare_core as sc

from spare_core.minicanvas import data
from spare_core.families import FLUX, UNET

# The names the benchmark erases: every style / object but the neutral ones (the surrogates). data.STYLES /
# data.OBJECTS are the records (name, synonyms, drawing), data.STYLE_NAMES / OBJECT_NAMES every name, neutral included.
ERASABLE_STYLES = [c.name for c in data.STYLES if c.name != data.NEUTRAL_STYLE]
ERASABLE_OBJECTS = [c.name for c in data.OBJECTS if c.name != data.NEUTRAL_OBJECT]
METHODS = ("spare", "spare-all-pairs", "spare-no-saliency", "spare-uniform-t", "spare-no-retain", "spare-no-anchor",
           "spare-rank4", "spare-floor05", "spare-steps160", "spare-anchor2", "spare-strength08", "spare-strength09",
           "esd-x", "esd-u", "ca", "salun", "uce", "uce-pool", "eraseanything", "spare-text-in", "spare-slices",
           "spare-contrastive", "spare-no-resconv", "spare-no-global", "spare-no-time", "spare-te", "spare-te-mlp",
           "spare-te-mlp0", "spare-te-mlp1", "spare-te-attn", "spare-te-unet", "spare-sel25",
           "spare-temlp-unet", "spare-temlp1-unet", "spare-no-pool", "spare-unet08", "spare-unet09",
           "spare-unet08-te12", "spare-unet09-te11", "spare-te-pool", "spare-te-last", "spare-no-kv",
           "spare-no-kv-pool")
# spare-no-saliency, -uniform-t, -no-retain: ablations (methods.py); spare-text-in and the selection experiments
# (SELECTION_DROPS, below): the scan's selection changed (methods.py); spare-te*: the adapters in the text encoder
# (methods.TEXT_ENCODER_LINEARS, MiniCanvas' UNet model only; RESULTS, "The erasure in the text encoder"; -unet: plus
# the scan's UNet selection, as the product; spare-temlp*-unet: fewer text-encoder Linears, "Module groups with the
# text encoder"); spare-te-pool (MiniCanvas-Flux): the scan's selection plus the text encoder's pooling Linears only,
# the pooled vector's own path (as CLIP-L's on Flux.1); spare-te-last (either model): the scan's selection plus the
# text encoder's last layer's Linears only (methods.text_subset); the other spare-* names are SPARE_VARIANTS (below)
SHORT_STEPS = 0.8  # spare-steps160 (experiment, time): 0.8 x the step cap (160 of 200), cosine-decayed to that cap
PROFILE_FLOOR_05 = 0.5  # spare-floor05 (experiment): half of the steps spread evenly over the schedule (default 0.2)
# choice: kept from the first model (on which only some objects were drawn recognisably) so that runs compare across
# sessions; on the shipped model every object's generations are judged right >= 91% of the time.
QUICK_CONCEPTS = {"style": ["ukiyo", "neon"], "object": ["ring", "crescent"]}
# quick: SPARE exactly as shipped (its default steps and stopping rule); the baselines' budgets shrink instead
QUICK_BASELINE_SCALE = 0.1  # ESD 100, CA 40, SalUn 50 steps
QUICK_METHODS = ("spare", "esd-x", "ca", "salun", "uce")
QUICK_SAMPLE_STEPS = 8  # evaluation sampler steps in quick mode (default 12)
STANDARD_METHODS = ("spare", "spare-all-pairs", "uce", "uce-pool", "salun", "ca", "esd-x")
REFERENCE_METHODS = ("spare-all-pairs",)  # reference rows: as many training seeds as the step-trained baselines
# refused on the UNet: eraseanything (published for Flux only, baselines.erase_anything) and the experiment
# spare-text-in (SPARE's selection plus Flux's text embedders, methods.py)
FLUX_ONLY_METHODS = ("eraseanything", "spare-text-in", "spare-te-pool")
# the methods of --standard / --quick per model: on MiniCanvas-Flux the Flux-only baseline joins the UNet's; its
# --standard leaves out the all-pairs reference row and the spare-text-in experiment so that the one command stays
# within 90 min on 2 cores (its grids cost ~4x the UNet's)
FLUX_STANDARD_METHODS = tuple(m for m in STANDARD_METHODS if m not in REFERENCE_METHODS) + ("eraseanything",)
MODEL_METHODS = {"unet": {"standard": STANDARD_METHODS, "quick": QUICK_METHODS},
                 "flux": {"standard": FLUX_STANDARD_METHODS, "quick": QUICK_METHODS + FLUX_ONLY_METHODS[:2]}}
MODEL_METHODS["flux-dev"] = MODEL_METHODS["flux"]
STANDARD_ESD_STEPS = 200  # choice: ESD's paper trains 1000 steps (--standard is estimated at ~100 min; RESULTS)
STANDARD_BASELINE_SEEDS = 1  # the step-trained baselines run one training seed in --standard (time); SPARE, UCE 3
# UCE's training seeds in --standard per model (0 = all 3): on MiniCanvas-Flux one (time: each seed is 40 grids of
# ~27 s; UCE is closed-form, its only dependence on the seed is the retain split)
STANDARD_CLOSED_FORM_SEEDS = {"unet": 0, "flux": 1, "flux-dev": 1}
TRAIN_TEMPLATE = 0                   # UnlearnCanvas' "A {object} image in {style} style.": every training prompt
EVAL_TEMPLATES = tuple(i for i in range(len(data.TEMPLATES)) if i != TRAIN_TEMPLATE)  # held out for evaluation


@dataclass
class Budget:
    """Optimizer steps per method. choice: the papers' step counts (ESD 1000, CA 400, SalUn ~500; SPARE 200) in full
    mode, the same factor for every method in quick mode. Learning rates: the papers' values x LR_SCALE = 20, because
    the bundled model was trained at lr 2e-3, 20x Stable Diffusion's 1e-4 (SPARE 1e-4 -> 2e-3; ESD 1e-5 -> 2e-4;
    CA's effective 1.6e-5 -> 3.2e-4; SalUn 1e-5 -> 2e-4). UCE is closed-form (no steps, no learning rate)."""

    spare: int = sc.DistillConfig.steps  # SPARE's step cap (the product default)
    esd: int = 1000
    ca: int = 400
    salun: int = 500
    sample_steps: int = 12   # DPM++ 2M steps for the evaluation grids
    seeds: int = 2           # images per grid pair (each with another held-out template)
    spare_weighting: str = sc.DistillConfig.loss_weighting  # SPARE's loss weighting ("eps" = the authors')
    train_seeds: int = 1     # training seeds per concept (SPARE and every baseline)
    first_train_seed: int = 0  # the training seeds are first_train_seed .. first_train_seed + train_seeds - 1
    baseline_seeds: int = 0  # training seeds of the step-trained baselines (0 = train_seeds)
    closed_form_seeds: int = 0  # training seeds of UCE and uce-pool (0 = train_seeds)
    spare_scoring: str = sc.config.DEFAULT_SCORING
    spare_targets: str = sc.config.DEFAULT_TARGETS
    spare_fraction: float = sc.config.DEFAULT_SELECTION
    spare_stop: float = sc.DistillConfig.stop_at_gap_closed  # the stopping rule's target (0 = every step)
    spare_overrides: tuple = ()  # (field, value) pairs applied to SPARE's DistillConfig (experiments only)
    retain_set: str = "half"  # every method's retain list (concept_prompts; "spare-all-pairs" keeps "all-pairs")
    spare_retain: str = ""   # SPARE's own retain list when set (experiments: "neighbours" or "all-pairs")
    model: str = "unet"      # the bundled model erased: "unet" (MiniCanvas), "flux" (MiniCanvas-Flux), "flux-dev"
    # (MiniCanvas-Flux-dev, guidance-distilled; MODELS)
    eval_guidance: float = 0.0  # flux-dev: the FluxGuidance the grids are sampled at (0 = the one SPARE trains at)

    def scaled(self, factor: float, seeds: int) -> "Budget":
        """Every step-trained method's budget x factor (SPARE's cap included)."""
        return replace(self, spare=max(1, int(self.spare * factor)), esd=max(1, int(self.esd * factor)),
                       ca=max(1, int(self.ca * factor)), salun=max(1, int(self.salun * factor)), seeds=seeds)


# MiniCanvas (a UNet), MiniCanvas-Flux (ComfyUI's Flux class; needs ComfyUI's code) and its guidance-distilled
# variant MiniCanvas-Flux-dev (Flux.1-dev's form: guidance_in, sampled at cfg 1)
MODELS = ("unet", "flux", "flux-dev")
FLUX_MODELS = ("flux", "flux-dev")
RETAIN_SETS = ("half", "few", "all-pairs", "neighbours", "grow1", "grow3", "grow6", "grow3near", "near",
               "near-token", "nearest", "nearest-unpadded", "grow3near-unpadded")
GROW_UNLISTED = 3          # "growK": the same 3 unlisted classes for every K; K of the other 6 listed
RETAIN_EXTRA = 3           # random (style, object) pairs added to the neighbour classes in the "neighbours" list
FEW_LISTED = 3             # "few": same-domain neighbours named by the builder line (and as many of the other domain)
LR_SCALE = 20.0  # bundled model's training lr / Stable Diffusion's (2e-3 / 1e-4)
# EraseAnything: the usual learning rate of a Flux LoRA (1e-4; its paper trains a LoRA where ESD trains weights)
# SPARE: the product's rate per family (DistillConfig.learning_rate 0 = families.Family.learning_rate), scaled
LR = {"spare": UNET.learning_rate * LR_SCALE, "spare-dit": FLUX.learning_rate * LR_SCALE, "esd": 1e-5 * LR_SCALE,
      "ca": 1.6e-5 * LR_SCALE, "salun": 1e-5 * LR_SCALE, "eraseanything": 1e-4 * LR_SCALE}


def spare_lr_key(model: str) -> str:
    """The LR entry SPARE trains with on benchmark model `model` (unet / flux / flux-dev)."""
    return "spare-dit" if model in FLUX_MODELS else "spare"


def listed_classes(domain: str, name: str, seed: int, retain_set: str) -> list[str]:
    """The classes of `name`'s own domain that the retain list names (the others are "unlisted": no prompt any method
    sees names them). "half": half of the other classes (rounded down), drawn anew for every training seed, so the
    runs average over several splits; "few": FEW_LISTED of them (the builder line a user types in the shipped
    workflows); "near": as many as "half", the ones nearest to the concept in the model's pooled text code
    (nearest_order: a user who names the nearest neighbours; the same for every training seed); "near-token": the
    same by the word's own token state; "nearest": the half that SPARE Nearest Concepts ranked nearest until 2026-12-06
    (spare_core.neighbours on every position's token state); "nearest-unpadded": the half it ranks nearest since (each
    prompt's own positions, the padding left out: unpadded_encode); "all-pairs" and "neighbours": every other class
    (nothing unlisted)."""
    if retain_set not in RETAIN_SETS:
        raise ValueError(f"retain_set={retain_set!r}; valid: {', '.join(RETAIN_SETS)}")
    others = [c for c in (ERASABLE_STYLES if domain == "style" else ERASABLE_OBJECTS) if c != name]
    if retain_set in ("all-pairs", "neighbours"):
        return others
    if retain_set in ("grow3near", "grow3near-unpadded"):  # the 3 of grow6's candidates SPARE Nearest Concepts
        candidates = grow_order(domain, name, seed)[GROW_UNLISTED:]  # names (until / since 2026-12-06; same unlisted)
        ranked = ranked_candidates(domain, name, tuple(candidates), unpadded=retain_set.endswith("-unpadded"))
        return sorted(ranked[:3], key=others.index)
    if retain_set.startswith("grow"):  # experiment: does listing MORE classes protect the same unlisted ones?
        return sorted(grow_order(domain, name, seed)[GROW_UNLISTED:GROW_UNLISTED + int(retain_set[4:])],
                      key=others.index)
    if retain_set in ("near", "near-token"):
        code = "token" if retain_set == "near-token" else "pooled"
        return sorted(nearest_order(domain, name, code)[:len(others) // 2], key=others.index)
    if retain_set in ("nearest", "nearest-unpadded"):  # what SPARE Nearest Concepts names, every other class given
        ranked = ranked_candidates(domain, name, tuple(others), unpadded=retain_set == "nearest-unpadded")
        return sorted(ranked[:len(others) // 2], key=others.index)
    k = len(others) // 2 if retain_set == "half" else FEW_LISTED
    # a generator of its own (not `concept_prompts`' one) so the other lists' draws stay as they were
    return sorted(random.Random(f"split:{domain}:{name}:{seed}").sample(others, k), key=others.index)


def grow_order(domain: str, name: str, seed: int) -> list[str]:
    """The other classes in a seeded order: the first GROW_UNLISTED are the "growK" lists' unlisted classes."""
    others = [c for c in (ERASABLE_STYLES if domain == "style" else ERASABLE_OBJECTS) if c != name]
    return random.Random(f"grow:{domain}:{name}:{seed}").sample(others, len(others))


def class_codes(model, word: str, domain: str):
    """(pooled code, token state) of `word` (a class of `domain`, or its synonym) in the bundled MiniCanvas model, each
    averaged over the other domain's classes in the training template: the pooled vector `text_pool` makes of the text
    encoder's output, and the word's own contextual token state (what the cross-attentions' keys and values are
    computed from). The two codes the network reads a class by (`diagnose words`, `nearest_order`)."""
    import torch  # here, not at the top: the retain lists need no model

    others = ERASABLE_OBJECTS if domain == "style" else ERASABLE_STYLES
    prompts = [data.prompt(word, o) if domain == "style" else data.prompt(o, word) for o in others]
    with torch.no_grad():
        ctx = model.encode(prompts)
        at = model.tokenizer(prompts).to(ctx.device) == model.tokenizer.ids[word]
        return model.network.text_pool(ctx).mean(0), ctx[at].mean(0)


@functools.lru_cache(maxsize=None)
def nearest_order(domain: str, name: str, code: str = "pooled") -> tuple[str, ...]:
    """The other classes of `name`'s domain, nearest first, by the cosine of their `class_codes`: code "pooled"
    (relative to the neutral class's) -- the code a prompt's meaning is compared by (CLIP's pooled embedding on a real
    model) and the path where an erased style spreads to neighbours nobody named (RESULTS.md, "Which unlisted classes
    lose"); "token": the word's own token state, which the objects' damage follows."""
    import torch

    if code not in ("pooled", "token"):
        raise ValueError(f"code={code!r}; valid: pooled, token")
    model, which = _ranking_model(), 0 if code == "pooled" else 1
    neutral = class_codes(model, data.NEUTRAL_STYLE if domain == "style" else data.NEUTRAL_OBJECT, domain)[which] \
        if code == "pooled" else 0.0
    own = class_codes(model, name, domain)[which] - neutral
    others = [c for c in (ERASABLE_STYLES if domain == "style" else ERASABLE_OBJECTS) if c != name]
    cos = {c: float(torch.nn.functional.cosine_similarity(class_codes(model, c, domain)[which] - neutral, own, dim=0))
           for c in others}
    return tuple(sorted(others, key=lambda c: -cos[c]))


def class_ranking(domain: str, name: str, candidates, encode=None) -> list:
    """`candidates` (classes of `name`'s domain) as the product ranks them (spare_core.neighbours, the SPARE Nearest
    Concepts node) in the bundled model: the concept's forget prompts against one builder line per candidate, the
    candidate with every class of the other domain ("An {a|b|..} image in neon style."). Neighbours, nearest first,
    each line replaced by its class name. encode: the token states the ranking reads (default: the model's, every
    position, as CLIPTextEncode returns them: the node's code until 2026-12-06; `unpadded_encode`: the padding left
    out, as the node reads them since)."""
    from spare_core import neighbours

    others = ERASABLE_OBJECTS if domain == "style" else ERASABLE_STYLES
    alts = "{" + "|".join(others) + "}"
    forget = [data.prompt(name, o) if domain == "style" else data.prompt(o, name) for o in others]
    lines = {data.prompt(c, alts) if domain == "style" else data.prompt(alts, c): c for c in candidates}
    return [n._replace(line=lines[n.line])
            for n in neighbours.rank(encode or _ranking_model().encode, forget, list(lines))]


def unpadded_encode(prompts):
    """The bundled model's token states of `prompts` with the padding positions left out: each prompt's mean over
    <bos>, its words and <eos> ([N, 1, D]), found by the product's neighbours.prompt_positions from word ids: the code
    SPARE Nearest Concepts reads on the demo CLIP since 2026-12-06 (test_demo_model checks they agree)."""
    import torch

    from spare_core import neighbours

    model = _ranking_model()
    states, ids = model.encode(list(prompts)), model.tokenizer(list(prompts))
    special = {model.tokenizer.ids[t] for t in ("<pad>", "<bos>", "<eos>")}
    out = []
    for s, row in zip(states, ids.tolist()):
        words = [[[0 if t in special else i for i, t in enumerate(row)]]]  # as the demo CLIP's tokenizer gives them
        out.append(s[neighbours.prompt_positions(words, s.shape[0])].mean(0, keepdim=True))
    return torch.stack(out)


@functools.lru_cache(maxsize=None)
def ranked_candidates(domain: str, name: str, candidates: tuple[str, ...], unpadded: bool = False) -> tuple[str, ...]:
    """`candidates`, nearest first as the product ranks them (class_ranking; unpadded: with unpadded_encode)."""
    return tuple(n.line for n in class_ranking(domain, name, candidates, unpadded_encode if unpadded else None))


@functools.lru_cache(maxsize=1)
def _ranking_model():
    from spare_core.minicanvas.model import load
    return load()


def concept_prompts(domain: str, name: str, seed: int, retain_set: str = "half"):
    """The prompt lists every method gets for erasing `name`: forget prompts (the concept on every object / in every
    style), their surrogates (the neutral concept in the same place) and retain prompts; UCE's preserved set and
    SalUn's retain loss use the same retain list.

    retain_set (see listed_classes): "half" (default): every pair of a LISTED class of the concept's domain with every
    class of the other domain -- one builder line; the unlisted half is never named, so IRA / CRA on it measure what a
    user meets on the thousands of concepts no list names. "few": one builder line of FEW_LISTED neighbours x
    FEW_LISTED classes of the other domain (what the shipped workflows type). "all-pairs" (reference; the benchmark's
    list before the split): every other (style, object) pair, what the authors do (retain on every other theme) --
    retention then is graded on prompts the methods were told to keep. "neighbours": every neighbour class once (with
    a random class of the other domain) plus RETAIN_EXTRA random other pairs."""
    listed = listed_classes(domain, name, seed, retain_set)
    rng = random.Random(seed)
    if domain == "style":
        forget = [data.prompt(name, o) for o in ERASABLE_OBJECTS]
        surrogate = [data.prompt(data.NEUTRAL_STYLE, o) for o in ERASABLE_OBJECTS]
        pairs = [(s, o) for s in ERASABLE_STYLES if s != name for o in ERASABLE_OBJECTS]
        neighbours = [(s, rng.choice(ERASABLE_OBJECTS)) for s in ERASABLE_STYLES if s != name]
        short, short_surrogate = f"An image in {name} style.", f"An image in {data.NEUTRAL_STYLE} style."
    else:
        forget = [data.prompt(s, name) for s in ERASABLE_STYLES]
        surrogate = [data.prompt(s, data.NEUTRAL_OBJECT) for s in ERASABLE_STYLES]
        pairs = [(s, o) for s in ERASABLE_STYLES for o in ERASABLE_OBJECTS if o != name]
        neighbours = [(rng.choice(ERASABLE_STYLES), o) for o in ERASABLE_OBJECTS if o != name]
        short, short_surrogate = f"A {name} image.", f"A {data.NEUTRAL_OBJECT} image."
    if retain_set == "all-pairs":
        return forget, surrogate, all_pairs(domain, name), short, short_surrogate
    if retain_set in ("half", "few", "near", "near-token", "nearest", "nearest-unpadded") or \
            retain_set.startswith("grow"):
        others = ERASABLE_OBJECTS if domain == "style" else ERASABLE_STYLES
        cross = others if retain_set != "few" else \
            sorted(random.Random(f"few:{domain}:{name}:{seed}").sample(others, FEW_LISTED), key=others.index)
        retain = [data.prompt(c, x) if domain == "style" else data.prompt(x, c) for c in listed for x in cross]
        return forget, surrogate, retain, short, short_surrogate
    extra = rng.sample([p for p in pairs if p not in neighbours], RETAIN_EXTRA)
    retain = [data.prompt(s, o) for s, o in neighbours + extra]
    return forget, surrogate, retain, short, short_surrogate


def all_pairs(domain: str, name: str) -> list[str]:
    """Every (style, object) training prompt that does not name the concept (90 for MiniCanvas): the authors retain
    on every image of every other theme."""
    return [data.prompt(s, o) for s in ERASABLE_STYLES for o in ERASABLE_OBJECTS if (s if domain == "style" else o) != name]


def retention_split(domain: str, name: str, seed: int, retain_set: str) -> dict[str, list[int]]:
    """Class indices of `name`'s domain that the retain list of (seed, retain_set) names ("listed") and does not
    ("unlisted"; empty for the lists that name every class)."""
    index = data.style_index if domain == "style" else data.object_index
    others = [c for c in (ERASABLE_STYLES if domain == "style" else ERASABLE_OBJECTS) if c != name]
    listed = listed_classes(domain, name, seed, retain_set)
    unlisted = grow_order(domain, name, seed)[:GROW_UNLISTED] if retain_set.startswith("grow") else \
        [c for c in others if c not in listed]
    return {"listed": [index(c) for c in listed], "unlisted": [index(c) for c in unlisted]}


def parse_override(item: str) -> tuple[str, object]:
    """"field=value" -> (field, value typed as DistillConfig's default for that field); ValueError names the field."""
    key, _, value = item.partition("=")
    fields = sc.DistillConfig.__dataclass_fields__
    if key not in fields or not value:
        raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
    default = getattr(sc.DistillConfig([], []), key)
    return key, value if isinstance(default, str) else type(default)(json.loads(value))  # text_encoder=off: as typed


def split_variant(method: str) -> tuple[str, tuple]:
    """"spare+surrogate_anchor=1.0+learning_rate=0.001" -> ("spare", (("surrogate_anchor", 1.0), ("learning_rate", 0.001))): a SPARE
    variant named by the DistillConfig fields it sets, so an experiment needs no new method name (its row in the
    results keeps the full name)."""
    base, *items = method.split("+")
    if items and base != "spare" and not base.startswith("spare-te"):
        raise ValueError(f"{method!r}: only spare and the spare-te experiments take +FIELD=VALUE variants")
    return base, tuple(parse_override(i) for i in items)


# Module groups of the MiniCanvas LoRA (first match of a module path wins; its text encoder's adapters first: their
# paths hold "layers." too): `diagnose groups` judges a LoRA without one at a time, the selection experiments
# (SELECTION_DROPS) train without some
MODULE_GROUPS = (("text encoder", ("text_encoders.",)), ("time_embed", ("time_embed.",)),
                 ("text_pool", ("text_pool.",)), ("emb_layers", (".emb_layers.",)), ("attn2", (".attn2.",)),
                 ("attn1", (".attn1.",)), ("ff", (".ff.",)),
                 ("proj_in/out", (".proj_in", ".proj_out")), ("resnet convs", ("layers.", "skip_connection")),
                 ("other convs", ("",)))
# UNet experiments: the scan's selection without these groups. The ResBlocks' convolutions carried the damage to
# unlisted classes in `diagnose groups` (ukiyo's LoRA without them: unlisted CRA 70 -> 98); the timestep embedding
# and the pooled-text attention reach every prompt alike (sunset's without text_pool: unlisted IRA 60 -> 100); the
# timestep embedding's input never sees the prompt. With the text encoder (RESULTS, "Module groups with the text
# encoder"): without text_pool the styles' unlisted IRA +7.5 but style SFA -9.0 (a tie on mean4).
# A name starting with "." is a path part instead of a group. spare-no-kv drops the keys and values of every
# cross-attention, the pooling attention's too (linear readers of the token codes, where the objects' damage follows
# their cosine: RESULTS, "Which unlisted classes lose"), leaving the text side's change to the text encoder's own
# (nonlinear) layers; spare-no-kv-pool: and the rest of the pooled-text path.
KV_PARTS = (".attn2.to_k", ".attn2.to_v")
SELECTION_DROPS = {"spare-no-resconv": ("resnet convs",), "spare-no-global": ("time_embed", "text_pool"),
                   "spare-no-time": ("time_embed",), "spare-no-pool": ("text_pool",),
                   "spare-no-kv": KV_PARTS, "spare-no-kv-pool": KV_PARTS + ("text_pool",)}


def dropped(path: str, drops: tuple) -> bool:
    """Whether a SELECTION_DROPS entry removes module `path`: its group is named, or a "." path part in it."""
    return module_group(path) in drops or any(d.startswith(".") and d in f".{path}" for d in drops)


def module_group(path: str) -> str:
    """The MODULE_GROUPS name of a module path."""
    return next(g for g, parts in MODULE_GROUPS if any(p in f".{path}" if p.startswith(".") else p in path
                                                        for p in parts))


@dataclass(frozen=True)
class SpareVariant:
    """A named SPARE row that is SPARE with some settings changed (run_method trains it as "spare"): no method needs
    a branch of its own in the training code for a setting."""

    overrides: tuple = ()   # (field, value) DistillConfig pairs, applied before Budget.spare_overrides (those win)
    profile_floor: float | None = None  # timestep_profile's uniform floor (None: the product's)
    step_scale: float = 1.0  # x Budget.spare, rounded (at least 1 step)
    retain: str = ""         # SPARE's retain list ("all-pairs": every other pair; "": the budget's)
    scan: tuple = ()         # (field, value) ScanConfig pairs
    strength: float = 1.0    # the strength the LoRA is judged at (Apply Erasure's strength input)
    unet_strength: float = 1.0  # x the network's part only, the text encoder's at `strength` (LoraLoader's
    #                             strength_model / strength_clip)
    te_strength: float = 1.0    # x the text encoder's part only (LoraLoader's strength_clip)


SPARE_VARIANTS = {
    # the reference row: SPARE told to keep every other pair (graded on them too)
    "spare-all-pairs": SpareVariant(retain="all-pairs"),
    # the authors' forget batch: concept samples only (the default anchors half of it on surrogate samples: RESULTS,
    # "Anchor samples")
    "spare-no-anchor": SpareVariant(overrides=(("surrogate_anchor", 0.0),)),
    # the authors' LoRA rank (the default was 4 until measured: RESULTS, "LoRA rank")
    "spare-rank4": SpareVariant(overrides=(("rank", 4), ("alpha", 4.0))),
    # experiment (time): 2 anchor samples per surrogate prompt instead of 4 (half of samples's default)
    "spare-anchor2": SpareVariant(overrides=(("anchor_samples", max(1, sc.DistillConfig.samples // 2)),)),
    # experiment: half of the steps spread evenly over the schedule (default floor: 0.2)
    "spare-floor05": SpareVariant(profile_floor=PROFILE_FLOOR_05),
    # experiment (time): 0.8 x the step cap (160 of 200), cosine-decayed to that cap
    "spare-steps160": SpareVariant(step_scale=SHORT_STEPS),
    # experiment (DiTs): fused projections (Flux's qkv, linear1) scored and adapted as q / k / v / mlp row slices
    "spare-slices": SpareVariant(scan=(("fused_slices", True),)),
    # experiment (unlisted retention): modules ranked by their share of the concept's gradient minus their share of
    # the retain list's (fewer modules the listed classes use)
    "spare-contrastive": SpareVariant(scan=(("scoring", "contrastive"),)),
    # experiment (unlisted retention, with the text encoder training): a quarter of the UNet's candidates, not half
    "spare-sel25": SpareVariant(scan=(("selection", 0.25),)),
    # the product's LoRA judged at Apply Erasure strength 0.8 / 0.9 (README's limits for objects: RESULTS, "Strength:
    # the overshoot, calibrated, and what it costs")
    "spare-strength08": SpareVariant(strength=0.8),
    "spare-strength09": SpareVariant(strength=0.9),
    # experiment: the LoRA trained and saved at model_strength 1, judged with the network's part at 0.8 / 0.9, the
    # text encoder's at 1 (the UNet part moves the unlisted classes, the text encoder's keeps the object: RESULTS,
    # "Which half of the LoRA moves the unlisted classes"); spare-unet09 judges what the default (model_strength
    # auto: 0.9 on the UNet) saves, bit for bit
    "spare-unet08": SpareVariant(overrides=(("model_strength", 1.0),), unet_strength=0.8),
    "spare-unet09": SpareVariant(overrides=(("model_strength", 1.0),), unet_strength=0.9),
    # experiment: the network's part lowered and the text encoder's raised past 1 (it keeps the object: does more of
    # it win back the erasure and SFA the lower network part gives up?)
    "spare-unet08-te12": SpareVariant(overrides=(("model_strength", 1.0),), unet_strength=0.8, te_strength=1.2),
    "spare-unet09-te11": SpareVariant(overrides=(("model_strength", 1.0),), unet_strength=0.9, te_strength=1.1),
}
