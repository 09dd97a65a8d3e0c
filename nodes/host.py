"""ComfyUI host: a MODEL (ModelPatcher) + CLIP wrapped as spare_core's `DiffusionModel`, and training inside the
executor.

Import this only inside ComfyUI (it imports `comfy`). Of spare_core it imports only the error type: `DiffusionModel`
is a structural Protocol, so `ComfyDiffusionModel` satisfies it without inheriting from it.

Conditioning follows what ComfyUI's samplers do (comfy/samplers.py, process_conds -> encode_model_conds): each
prompt's CONDITIONING (cross-attention tensor + dict with pooled_output, ...) goes through `BaseModel.extra_conds`,
which builds every keyword argument of `BaseModel.apply_model` for the family: `c_crossattn` always, `y` for SDXL (the
adm vector from pooled_output + size embeddings), `c_concat` for inpaint models, ... `apply_model(x, sigma, **kwargs)`
takes sigma (not a timestep) and returns the denoised x0 whatever the prediction type (eps / v / flow).

Training inside the executor: ComfyUI runs nodes under `torch.inference_mode()`, so the model's weights, the CLIP
outputs and anything the node creates are inference tensors, which autograd refuses to save for backward. See
`trainable()`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn

import comfy.conds
import comfy.latent_formats
import comfy.model_management
import comfy.patcher_extension
import comfy.utils
from spare_core import families
from spare_core.errors import SpareInputError
from spare_core.families import Family

log = logging.getLogger(__name__)

LATENT_DOWNSCALE = 8  # pixels per latent cell for the SD-family VAEs (ComfyUI hardcodes 8 in EmptyLatentImage too)


# --- what a MODEL says about its latent space (the bundled MiniCanvas demo model is pixel space, 32 x 32 only) -------
def latent_downscale(model) -> int:
    """Pixels per latent cell of a MODEL (ModelPatcher) or BaseModel: the BaseModel's `spare_latent_downscale` where it
    declares one (nodes/demo_model.py: 1), 1 for ComfyUI's pixel-space latent format, else LATENT_DOWNSCALE (8)."""
    base = getattr(model, "model", model)
    declared = getattr(base, "spare_latent_downscale", None)
    if declared is not None:
        return int(declared)
    pixel_space = getattr(comfy.latent_formats, "ChromaRadiance", None)  # identity, 3 channels (ComfyUI >= 0.3.6x)
    if pixel_space is not None and isinstance(getattr(base, "latent_format", None), pixel_space):
        return 1
    return LATENT_DOWNSCALE


def native_size(model) -> tuple[int, int] | None:
    """(width, height) in pixels of a model that draws one size only (BaseModel attribute `spare_native_size`; the
    MiniCanvas demo model: 32 x 32), else None."""
    size = getattr(getattr(model, "model", model), "spare_native_size", None)
    return None if size is None else (int(size[0]), int(size[1]))


def is_demo_model(model) -> bool:
    """A bundled MiniCanvas demo model (nodes/demo_model.py: MiniCanvas, not an openaimodel.UNetModel but SPARE's own
    benchmark model, or MiniCanvas-Flux), so SPARE supports it."""
    return bool(getattr(getattr(model, "model", model), "spare_demo_model", False))


# --- which family a MODEL is ---------------------------------------------------------------------------------------
# DiT families by their comfy.model_base class, matched exactly: a subclass is another model (ChromaRadiance is a
# pixel-space Chroma, not tested here) and stays refused.
DIT_BASE_MODELS = {"Flux": families.FLUX, "Chroma": families.CHROMA, "SD3": families.SD3,
                   "QwenImage": families.QWEN_IMAGE, "Lumina2": families.LUMINA2}
SUPPORTED_TEXT = ("SD1.x, SD2.x, SDXL, Flux.1 (dev, schnell, Krea, Kontext's text path), Chroma, SD3/SD3.5, "
                  "Qwen-Image, Lumina 2")


def model_family(model) -> Family | None:
    """The spare_core family of a MODEL (ModelPatcher) or BaseModel; None for a model SPARE does not support."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = getattr(model, "model", model)
    declared = getattr(base, "spare_family", None)
    if declared is not None:  # a bundled demo model says which family it trains as (MiniCanvas-Flux: Flux with CFG)
        return declared
    net = getattr(base, "diffusion_model", None)
    if is_demo_model(base) or isinstance(net, UNetModel):
        return families.UNET
    family = DIT_BASE_MODELS.get(type(base).__name__)
    if family is families.FLUX and not getattr(getattr(net, "params", None), "guidance_embed", True):
        return families.FLUX_SCHNELL
    return family


def require_family(model) -> Family:
    """The model's family, or a clear refusal naming the model and the supported families."""
    family = model_family(model)
    if family is None:
        base = getattr(model, "model", model)
        net = getattr(base, "diffusion_model", None)
        raise SpareInputError(f"model: {type(base).__name__} models ({type(net).__name__} denoiser) are not "
                              f"supported; SPARE for ComfyUI erases concepts from {SUPPORTED_TEXT}.")
    return family


def latent_shape(model, width: int, height: int) -> tuple[int, ...]:
    """Shape of one latent of the MODEL at width x height pixels: (C, H, W), or (C, 1, H, W) for latent formats with a
    frame axis (Qwen-Image's Wan 2.1 latents; ComfyUI's samplers add the axis the same way, comfy/sample.py
    fix_empty_latent_channels)."""
    base = getattr(model, "model", model)
    fmt = base.latent_format
    down = latent_downscale(model)
    frames = (1,) * (getattr(fmt, "latent_dimensions", 2) - 2)
    return (fmt.latent_channels, *frames, height // down, width // down)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


class RowConds:
    """Conditionings of prompts that cannot share one forward: DiTs attend jointly over text and image tokens, so
    prompts of different token lengths (T5 beyond its padding, Qwen's and Gemma's unpadded embeddings) or different
    constants (Lumina 2's num_tokens) must not be padded or repeated into one batch (repeating tokens, as
    CONDCrossAttn.concat does for the UNets' cross-attention, changes joint attention). Holds one {kwarg: value} per
    prompt row; `ComfyDiffusionModel.predict_x0` runs each group of equal signatures in one forward."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


def _signature(cond: dict[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape) if torch.is_tensor(v) else repr(v)) for k, v in sorted(cond.items()))


def _cond_value(c):
    return c.cond if hasattr(c, "cond") else c


class PseudoWord(NamedTuple):
    """A perturbed copy of a prompt word (DistillConfig.pseudo_rows): the word and, per part of the CLIP (its
    `tokenize` keys: "l", "g", ...; None for a CLIP of one part), the perturbed embedding of each of its tokens as a
    prompt reads the word after a space (`rows`) and, where a part reads the word alone as other tokens (byte-level
    BPE, Gemma: the first word of a prompt), of those (`alone`)."""
    word: str
    rows: dict
    alone: dict | None = None


def _part(obj, key):
    """The sub-tokenizer / sub-encoder of a CLIP part: ComfyUI names them "clip_<key>" (SD1/SD2/SDXL's "l", "h",
    "g") or "<key>" (Flux's "t5xxl", ...)."""
    for name in (f"clip_{key}", str(key)):
        part = getattr(obj, name, None)
        if part is not None:
            return part
    return None


def input_embeddings(encoder) -> nn.Module | None:
    """The token-embedding module of a CLIP part (ComfyUI's `SDClipModel.transformer.get_input_embeddings()`, the
    demo model's own), or None."""
    inner = getattr(encoder, "transformer", None)
    get = getattr(inner if inner is not None else encoder, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb if torch.is_tensor(getattr(emb, "weight", None)) else None


class ComfyDiffusionModel:
    """spare_core.model.DiffusionModel for a ComfyUI MODEL + CLIP.

    `width`/`height` are in pixels: they fix `latent_shape` and, for SDXL, the size embeddings in `y`.
    Conditionings (`encode`) are dicts {apply_model kwarg: batched tensor (dim 0 = prompt) or constant}.
    """

    key_prefix = "diffusion_model."

    def __init__(self, model, clip, width: int = 512, height: int = 512, guidance: float | None = None):
        self.family = require_family(model)
        self.guidance = guidance  # Flux-dev's guidance input (ComfyUI's default 3.5 when None); other families ignore it
        self.patcher = model  # comfy.model_patcher.ModelPatcher
        self.clip = clip      # comfy.sd.CLIP
        self.base = model.model  # comfy.model_base.BaseModel (shared by every clone of `model`)
        self.network: nn.Module = self.base.diffusion_model
        self.width, self.height = int(width), int(height)
        fixed = native_size(model)
        if fixed is not None and fixed != (self.width, self.height):
            log.info("SPARE: %s draws %d x %d px only; using that instead of %d x %d", type(self.base).__name__,
                     fixed[0], fixed[1], self.width, self.height)
            self.width, self.height = fixed
        self.latent_shape = latent_shape(model, self.width, self.height)
        self.device = torch.device(model.load_device)
        # The dtype the network computes in: weights may be stored in another one (manual cast, e.g. fp8 weights,
        # computed in bf16/fp16/fp32 through comfy.ops).
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        if self.dtype in FP8_DTYPES:
            raise SpareInputError(
                f"model: its weights are {self.dtype} and ComfyUI computes in {self.dtype} on {self.device} (fp8 "
                "matrix multiplication); SPARE trains in the compute dtype and needs bf16, fp16 or fp32 there. Load "
                "the model with weight_dtype 'default' (or without --fast fp8 options): fp8-stored weights computed "
                "in bf16/fp16 work")
        # get_model_object honours object patches (e.g. ModelSamplingDiscrete/"shift" nodes on this clone).
        self.model_sampling = model.get_model_object("model_sampling")
        self._cond_cache: dict[str, dict[str, Any]] = {}  # prompt -> its extra_conds output
        # DistillConfig.pseudo_rows: name -> PseudoWord, read by `encode`; None where the CLIP's token embeddings
        # cannot be read (then no pseudo rows)
        self.pseudo_words: dict[str, PseudoWord] | None = None
        self._word_ids: dict[tuple, list[int]] = {}   # (part, word) -> its token ids
        self._scales: dict[tuple, float] = {}         # (part, token id) -> median distance to the other tokens
        self._unmatched: set = set()                  # (part, word) not found in a prompt's tokens (logged once)
        if clip is not None:
            # what SPARE may train beside the network (DistillConfig.text_encoder; "auto" per Family.text_encoder):
            # the CLIP's model, whose module paths are its state-dict keys, i.e. what ComfyUI's
            # "text_encoders.<key>" LoRA keys name
            self.text_encoder: nn.Module = clip.cond_stage_model
            self._parts = self._text_parts()
            if self._parts is not None:
                self.pseudo_words = {}

    # --- loading ---------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Put the diffusion model (with this clone's patches, e.g. LoRAs from loader nodes) on its load device.
        Cheap when it is already loaded. `trainable()` calls it; call it before `predict_x0` outside `trainable()`."""
        load_for_training(self.patcher)

    # --- conditioning ------------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> dict[str, Any]:
        """Encode each prompt with the CLIP (like CLIPTextEncode; each distinct prompt once per instance, cached) and
        build its apply_model kwargs with `BaseModel.extra_conds`, then batch them along dim 0 in prompt order.

        Encoding loads the CLIP, which on a small GPU can offload part of the diffusion model: a node should encode
        its prompts before entering `trainable()` (the cache then serves the calls made inside). A prompt with a pseudo
        word is encoded each time, not cached (its name may stand for another embedding in a later distillation)."""
        conds = []
        for p in prompts:
            if self._has_pseudo(p):
                conds.append(self._model_conds(p))
                continue
            if p not in self._cond_cache:
                self._cond_cache[p] = self._model_conds(p)
            conds.append(self._cond_cache[p])
        return self._batched(conds)

    def encode_text(self, prompts: Sequence[str]) -> dict[str, Any]:
        """`encode` computed now, not cached: through the CLIP as it is (with the adapters a distillation hooked onto
        `text_encoder`), differentiable under grad mode."""
        # CLIP.encode_from_tokens calls CLIP.load_model, i.e. asks ComfyUI for the CLIP's memory again, which on a
        # full card can offload part of the diffusion model mid-training; trainable(text=True) has loaded both whole,
        # so inside here the CLIP is used where it is (an instance attribute shadows the method, removed after)
        with self._clip_in_place():
            return self._batched([self._model_conds(p) for p in prompts])

    @contextlib.contextmanager
    def _clip_in_place(self, on: bool = True) -> Iterator[None]:
        """Inside: CLIP.load_model (which CLIP.encode_from_tokens calls) loads nothing, the CLIP is used where it is
        (an instance attribute shadows the method, removed after; nested uses keep the outer one's)."""
        if not on or "load_model" in vars(self.clip):
            yield
            return
        self.clip.load_model = lambda: self.clip.patcher
        try:
            yield
        finally:
            del self.clip.load_model

    def _batched(self, per_prompt: list[dict[str, Any]]) -> dict[str, Any] | RowConds:
        if not per_prompt:
            raise ValueError("encode() needs at least one prompt")
        if self.family.dit:
            rows = [{k: _cond_value(c) for k, c in pc.items()} for pc in per_prompt]
            if len({_signature(r) for r in rows}) > 1:
                return RowConds(rows)
        batched: dict[str, Any] = {}
        for key, first in per_prompt[0].items():
            items = [pc[key] for pc in per_prompt]
            if isinstance(first, comfy.conds.CONDConstant) or not torch.is_tensor(getattr(first, "cond", None)):
                batched[key] = first.cond if hasattr(first, "cond") else first  # same for every prompt
            elif isinstance(first, comfy.conds.CONDCrossAttn):
                # the host's own batching: conds of prompts over 75 tokens (154, 231, ... tokens) are repeated to the
                # least common multiple of the lengths, which leaves attention unchanged
                batched[key] = first.concat(items[1:])
            else:
                batched[key] = torch.cat([c.cond for c in items])
        return batched

    # --- pseudo words (DistillConfig.pseudo_rows; the protocol: spare_core.distill.pseudo_bank) ---------------------
    def _text_parts(self) -> dict | None:
        """{tokenize key: (its tokenizer, its encoder)} of the CLIP ({None: ...} for a CLIP of one part), or None where
        a part's token embeddings cannot be read."""
        tokens = self.clip.tokenize("")
        if isinstance(tokens, dict):
            parts = {key: (_part(self.clip.tokenizer, key), _part(self.clip.cond_stage_model, key)) for key in tokens}
        else:
            parts = {None: (self.clip.tokenizer, self.clip.cond_stage_model)}
        ok = all(t is not None and e is not None and input_embeddings(e) is not None for t, e in parts.values())
        return parts if ok else None

    def _has_pseudo(self, prompt: str) -> bool:
        return bool(self.pseudo_words) and any(w in self.pseudo_words for w in prompt.split(" "))

    def prompt_words(self, prompt: str) -> list[str]:
        """A prompt's words as ComfyUI's tokenizers split them: at spaces."""
        return prompt.split(" ")

    def word_ids(self, key, word: str) -> list[int]:
        """The token ids of `word` in CLIP part `key` as a prompt reads it after a space (without start, end and
        padding tokens): byte-level BPE (Qwen2.5's, Qwen3's) and Gemma's SentencePiece fold the space into the word's
        first token, so the word alone would be other tokens there; CLIP's and T5's read both alike."""
        if (key, word) not in self._word_ids:
            tok, enc = self._parts[key]
            special = set(getattr(enc, "special_tokens", {}).values())

            def ids(text: str) -> list[int]:
                return [int(t) for b in tok.tokenize_with_weights(text) for t, *_ in b
                        if not torch.is_tensor(t) and int(t) not in special]

            lead, after, alone = ids("a"), ids("a " + word), ids(word)
            self._word_ids[key, word] = after[len(lead):] if after[:len(lead)] == lead else alone
            self._word_ids[key, word, "alone"] = alone
        return self._word_ids[key, word]

    def word_ids_alone(self, key, word: str) -> list[int]:
        """The token ids of `word` read alone (as the first word of a prompt is): `word_ids` but for byte-level BPE
        and Gemma."""
        self.word_ids(key, word)
        return self._word_ids[key, word, "alone"]

    def knows_word(self, word: str) -> bool:
        """A word every part of the CLIP reads as at least one token."""
        try:
            return all(self.word_ids(key, word) for key in self._parts)
        except SpareInputError:  # the demo model's tokenizer refuses words outside its vocabulary
            return False

    def pseudo_word(self, word: str, radius: float, generator: torch.Generator) -> PseudoWord:
        """`word` with each of its tokens' embeddings (in every part of the CLIP) moved by a random direction (from
        `generator`) of length radius x that token's median distance to the vocabulary's other tokens."""
        rows, alone = {}, {}
        for key, (_, enc) in self._parts.items():
            table = input_embeddings(enc).weight.detach()
            forms = [(rows, self.word_ids(key, word))]
            if self.word_ids_alone(key, word) != self.word_ids(key, word):  # only then: no extra draws for CLIP, T5
                forms.append((alone, self.word_ids_alone(key, word)))
            for out, ids in forms:
                moved = []
                for i in ids:
                    e = table[i].float()
                    if (key, i) not in self._scales:  # in chunks: a 150k-token vocabulary in fp32 is 2 GB at once
                        d = torch.cat([(table[a:a + 8192].float() - e).norm(dim=1)
                                       for a in range(0, table.shape[0], 8192)])
                        self._scales[key, i] = float(d[d > 0].median())
                    u = torch.randn(e.shape, generator=generator)
                    moved.append(e.cpu() + radius * self._scales[key, i] * u / u.norm())
                out[key] = torch.stack(moved)
        return PseudoWord(word, rows, alone or None)

    def _tokens(self, prompt: str):
        """`clip.tokenize(prompt)`; a pseudo word's tokens are its perturbed embeddings (as ComfyUI's textual-inversion
        embeddings: a tensor in place of a token id, read by sd1_clip.SDClipModel.process_tokens)."""
        if not self.pseudo_words:
            return self.clip.tokenize(prompt)
        words = prompt.split(" ")
        used = list(dict.fromkeys(w for w in words if w in self.pseudo_words))
        if not used:
            return self.clip.tokenize(prompt)
        tokens = self.clip.tokenize(" ".join(self.pseudo_words[w].word if w in self.pseudo_words else w
                                             for w in words))
        for key in self._parts:
            batches = tokens[key] if key is not None else tokens
            for name in used:
                pw, found = self.pseudo_words[name], 0
                forms = [(self.word_ids(key, pw.word), pw.rows[key])]
                if pw.alone and key in pw.alone:  # the word read alone too (the first word of a prompt)
                    forms.append((self.word_ids_alone(key, pw.word), pw.alone[key]))
                for ids, moved in forms:
                    for b in batches:
                        for a in range(len(b) - len(ids) + 1):
                            if all(not torch.is_tensor(b[a + k][0]) and int(b[a + k][0]) == ids[k]
                                   for k in range(len(ids))):
                                for k in range(len(ids)):
                                    b[a + k] = (moved[k], *b[a + k][1:])
                                found += 1
                if not found and (key, pw.word) not in self._unmatched:  # e.g. a word inside "(a b:1.2)"
                    self._unmatched.add((key, pw.word))
                    log.warning("SPARE: the CLIP part %s reads '%s' in '%s' as other tokens than alone; that word is "
                                "not perturbed there (pseudo_rows)", key, pw.word, prompt)
        return tokens

    def _model_conds(self, prompt: str) -> dict[str, Any]:
        tokens = self._tokens(prompt)
        # a pseudo prompt is encoded inside `trainable()` (the training data are made there), where loading the CLIP
        # could push part of the diffusion model out: it reads the CLIP where it is, as encode_text does
        with self._clip_in_place(self._has_pseudo(prompt)):
            conditioning = self.clip.encode_from_tokens_scheduled(tokens)
        if len(conditioning) > 1:  # only with scheduled CLIP hooks
            log.warning("SPARE: CLIP returned %d scheduled conditionings; using the first", len(conditioning))
        cond, extra = conditioning[0]
        noise = torch.zeros((1,) + tuple(self.latent_shape), device=self.device)
        # The same parameters as comfy/samplers.py encode_model_conds (plus cross_attn from convert_cond).
        params = dict(extra)
        params.update(cross_attn=cond, device=self.device, noise=noise, width=self.width, height=self.height,
                      prompt_type="positive")
        if self.guidance is not None and self.family.name == "flux" and self.family.guidance_distilled:
            params["guidance"] = float(self.guidance)  # what a FluxGuidance node puts on the CONDITIONING
        out = self.base.extra_conds(**params)
        for c in out.values():  # keep the tensors on the model's device
            if torch.is_tensor(getattr(c, "cond", None)):
                c.cond = c.cond.to(self.device)
        return out

    def select_cond(self, cond: dict[str, Any] | RowConds, index: torch.Tensor) -> dict[str, Any] | RowConds:
        if isinstance(cond, RowConds):
            return RowConds([cond.rows[i] for i in index.tolist()])
        out = {}
        for key, value in cond.items():
            if torch.is_tensor(value):
                out[key] = value.index_select(0, index.to(value.device))
            else:
                out[key] = value
        return out

    # --- the denoiser --------------------------------------------------------------------------------------------------
    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any] | RowConds) -> torch.Tensor:
        if isinstance(cond, RowConds):
            return self._predict_rows(x, sigma, cond)
        return self._predict(x, sigma, cond)

    def _predict_rows(self, x: torch.Tensor, sigma: torch.Tensor, cond: RowConds) -> torch.Tensor:
        """One forward per group of rows whose conditionings share shapes and constants (see RowConds)."""
        batch = x.shape[0]
        rows = cond.rows * batch if len(cond) == 1 and batch > 1 else cond.rows
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} conditioning rows for a batch of {batch}")
        sigma = sigma.reshape(-1).to(x.device)
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(_signature(row), []).append(i)
        out = None
        for members in groups.values():
            idx = torch.tensor(members, device=x.device)
            first = rows[members[0]]
            kwargs = {k: torch.cat([rows[i][k] for i in members]) if torch.is_tensor(v) else v
                      for k, v in first.items()}
            pred = self._predict(x.index_select(0, idx), sigma.index_select(0, idx), kwargs)
            if out is None:
                out = pred.new_empty((batch, *pred.shape[1:]))
            out = out.index_copy(0, idx, pred)  # out of place: autograd tracks every group
        return out

    def _predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        batch = x.shape[0]
        kwargs = {}
        for key, value in cond.items():
            if torch.is_tensor(value):
                value = comfy.utils.repeat_to_batch_size(_usable(value), batch)
            kwargs[key] = value
        # This clone's model patches apply as under the sampler (comfy/samplers.py _calc_cond_batch and
        # sampler_helpers.prepare_model_patcher): transformer_options (attention patches, ...), the patcher's wrappers
        # (e.g. APPLY_MODEL / DIFFUSION_MODEL wrappers) and model_function_wrapper. Not applied: hooks carried by
        # conditionings (there are none: prompts are encoded here) and ControlNets (no control input in training).
        options = self.patcher.model_options
        transformer_options = comfy.patcher_extension.merge_nested_dicts(
            {}, options.get("transformer_options", {}), copy_dict1=False)
        transformer_options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(
            dict(transformer_options.get("wrappers", {})), self.patcher.wrappers, copy_dict1=False)
        sigma = _usable(sigma).reshape(-1).to(x.device)
        if sigma.numel() == 1 and batch > 1:
            sigma = sigma.expand(batch)
        transformer_options.update(cond_or_uncond=[0], uuids=[None], sigmas=sigma)
        kwargs["transformer_options"] = transformer_options
        x = _usable(x)
        wrapper = options.get("model_function_wrapper")
        if wrapper is not None:
            return wrapper(self.base.apply_model, {"input": x, "timestep": sigma, "c": kwargs, "cond_or_uncond": [0]})
        return self.base.apply_model(x, sigma, **kwargs)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # noise_scaling(sigma, noise, latent): x0 + sigma*eps (EPS/V), sigma*eps + (1 - sigma)*x0 (flow).
        return self.model_sampling.noise_scaling(sigma.reshape(-1).to(x0.device), noise, x0)

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """sigma for t in [0, 1] (1 = noisiest): `percent_to_sigma(1 - t)`, with the ends mapped to sigma_max / sigma_min
        (percent_to_sigma returns sentinels there: 999999999.9 for percent 0 on discrete models, 0.0 for percent 1)."""
        ms = self.model_sampling
        lo, hi = float(ms.sigma_min), float(ms.sigma_max)

        def one(v: float) -> float:
            if v >= 1.0:
                return hi
            if v <= 0.0:
                return lo
            return min(max(float(ms.percent_to_sigma(1.0 - v)), lo), hi)

        flat = [one(v) for v in t.detach().reshape(-1).tolist()]
        return torch.tensor(flat, dtype=torch.float32, device=t.device).reshape(t.shape)


def _usable(t: torch.Tensor) -> torch.Tensor:
    """An inference tensor (made under the executor's inference mode: CLIP outputs, cached data) cannot be saved for
    backward; outside inference mode, use an ordinary copy of it."""
    if torch.is_tensor(t) and t.is_inference() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def load_for_training(patcher, *others) -> None:
    """Load the diffusion model the way ComfyUI's own trainer does (comfy_extras/nodes_train.py): the whole model on
    its device, every other model (CLIP, VAE, ...) out of VRAM first (memory_required=1e20). Prompts must be encoded
    before (the CLIP would otherwise push part of this model out again). `others`: patchers loaded whole beside it
    (the CLIP's, when the distillation trains the text encoder too). Refused under --novram, where ComfyUI keeps
    the weights in system RAM and streams them per layer: training there is untested and would be very slow."""
    mm = comfy.model_management
    on_gpu = not mm.is_device_cpu(torch.device(patcher.load_device))
    if on_gpu and mm.vram_state == mm.VRAMState.NO_VRAM:
        raise SpareInputError("ComfyUI runs with --novram: SPARE trains with the whole diffusion model on the GPU. "
                              "Restart ComfyUI without --novram (under --lowvram the diffusion model is still loaded "
                              "whole while SPARE trains)")
    # Without autograd: loading bakes the clone's weight patches (a LoRA from a loader node) into the weights, which
    # for fp8-stored weights ends in comfy.float.stochastic_rounding's `clamp(out=...)`: under grad mode (inside
    # `trainable()`) that raises on parameters that require grad (tests/test_dit_comfy.py, fp8 test).
    with torch.no_grad():
        mm.load_models_gpu([patcher, *others], memory_required=1e20, force_full_load=True)


_ALIAS_FALLBACKS: list[str] = []  # (dtype, device) of tensors that had to be copied: logged once each


def _alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor sharing `t`'s memory: no copy. Where `set_` refuses (some tensor subclasses
    or storages), a copy, which costs that tensor's memory again: logged, once per kind."""
    try:
        out = torch.empty(0, dtype=t.dtype, device=t.device)
        out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        return out
    except RuntimeError as e:
        kind = f"{type(t).__name__} {t.dtype} on {t.device}"
        if kind not in _ALIAS_FALLBACKS:
            _ALIAS_FALLBACKS.append(kind)
            log.warning("SPARE: could not alias a %s weight for training (%s); copying it instead, which uses its "
                        "memory twice", kind, e)
        return t.detach().clone()


@contextlib.contextmanager
def trainable(model, load: bool = True, text: bool = False) -> Iterator[None]:
    """Make a ComfyUI MODEL usable for backward passes, even when entered under the executor's inference mode.

    `model` is a ModelPatcher or a ComfyDiffusionModel. Inside the block:
    - the model is loaded (`load_for_training`: full load, other models out of VRAM, this clone's weight patches),
      unless load=False;
    - inference mode is off and grad mode on;
    - every inference-tensor parameter/buffer of the BaseModel is replaced by an ordinary Parameter/tensor that
      *aliases the same memory* (no copy; autograd may save it), and every parameter has requires_grad=False, so
      backward reaches only tensors the caller adds (adapters hooked onto modules of `model.model.diffusion_model`).
    On exit the exact original parameter/buffer objects and requires_grad flags are put back, so the input MODEL is
    left bit-identical (frozen weights are never written: only their aliases are read). A tensor that ComfyUI itself
    replaced or moved meanwhile (another model loaded inside the block, offloading this one) is left to ComfyUI.

    text=True (a ComfyDiffusionModel whose text encoder trains too, DistillConfig.text_encoder): the CLIP's model is
    loaded whole beside it and made trainable the same way.

    Conditionings, x and sigma made under inference mode are copied by `ComfyDiffusionModel.predict_x0` (`_usable`).
    Adapter parameters must be created inside the block (or outside any inference mode).
    """
    patcher = getattr(model, "patcher", model)
    clip_patcher = model.clip.patcher if text else None
    if load:
        load_for_training(patcher, *([clip_patcher] if text else []))
    roots: list[nn.Module] = [patcher.model] + ([clip_patcher.model] if text else [])
    # (module._parameters or ._buffers, name, original, replacement, (device, data_ptr) of the replacement)
    swapped: list[tuple[dict, str, Any, Any, tuple]] = []
    flags: list[tuple[nn.Parameter, bool]] = []
    with torch.inference_mode(False), torch.enable_grad():
        try:
            replacement: dict[int, Any] = {}  # id(original) -> replacement, so shared (tied) tensors stay shared
            for module in (m for root in roots for m in root.modules()):
                for slots, is_param in ((module._parameters, True), (module._buffers, False)):
                    for name, t in list(slots.items()):
                        if t is None:
                            continue
                        if t.is_inference():
                            new = replacement.get(id(t))
                            if new is None:
                                new = _alias(t)
                                if is_param:
                                    new = nn.Parameter(new, requires_grad=False)
                                replacement[id(t)] = new
                            slots[name] = new
                            swapped.append((slots, name, t, new, (new.device, new.data_ptr())))
                        elif is_param and t.requires_grad:
                            flags.append((t, True))
                            t.requires_grad_(False)
            yield
        finally:
            for slots, name, original, new, where in reversed(swapped):
                # Put the original back unless ComfyUI replaced or moved the tensor meanwhile (e.g. offloaded the
                # model to load another one); then its bookkeeping is about the current tensor, which stays.
                if slots.get(name) is new and (new.device, new.data_ptr()) == where:
                    slots[name] = original
            for p, flag in flags:
                p.requires_grad_(flag)
