"""Model families SPARE trains, described by their module names (host-independent: no ComfyUI import).

A host (nodes/host.py) tells which family a loaded model belongs to; spare_core reads from the family where the
candidate modules are, whether the network adds residuals in place (autograd.backward_safe), whether the model is
sampled without classifier-free guidance, and what a LoRA file says about its base model.

Candidates (saliency.candidate_modules), per family and `targets`:
- "all": the authors' rule, every Linear/Conv2d the saliency may pick. For the UNets that is the whole network (the
  authors' SD code). For the DiTs it is every Linear *inside the transformer blocks* (`blocks`): the projections,
  MLPs and per-block modulation of both streams. Left out: the embedders before the blocks (`img_in`, `txt_in` /
  `context_embedder`, `time_in`, `vector_in`, `guidance_in`) and the final layer, which every prompt passes through,
  so an update there moves everything. Erasers published on Flux train narrower sets (EraseAnything: rank 8 on the
  text stream's q/k; UCE's Flux script: closed form on `txt_in` / `vector_in`); we ship the wider rule because on
  MiniCanvas-Flux (ComfyUI's Flux class, trained) the narrower sets erased less: the text stream's attention alone
  lost 5 points of UA, the attention without the MLPs and modulation 26 (bench/RESULTS.md, "MiniCanvas-Flux").
  `txt_in` / `vector_in` added to the selection raised nothing but style SFA (one training seed; not adopted). Fused
  projections (`fused`: Flux's `qkv` and `linear1`, SD3's `qkv`) are scored and adapted whole by default;
  `ScanConfig.fused_slices` makes each a set of row-slice candidates named `<path>[q]`, `[k]`, `[v]` (and `[mlp]`:
  linear1's rows past 3 x its input width). A slice adapter trains only its rows and is written into the file as an
  ordinary LoRA on the whole module (zero rows elsewhere), so every loader takes it. On MiniCanvas-Flux slices
  erased less (UA -3.5, mean4 -0.7; one training seed) in files 1.7x larger, so whole modules stay the default
  (bench/RESULTS.md, "Fused projections as row slices").
- "attention": the attention projections inside the blocks (`attention` leaf names).
- "cross_attention": where the text enters. UNets: the cross-attention (attn2) projections. Joint-attention DiTs have
  no cross-attention; there it is the text stream's attention projections (`text_attention`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    label: str                       # what users call it, for messages
    blocks: tuple[str, ...] = ()     # top-level module lists holding the transformer blocks; () = the whole network
    attention: tuple[str, ...] = ()  # leaf names (module path endings) of attention projections
    text_attention: tuple[str, ...] = ()  # path fragments of the text-conditioned attention projections
    inplace_residuals: bool = False  # blocks add residuals in place (autograd.backward_safe makes gradients exact)
    guidance_distilled: bool = False  # guidance is an input of the network: sampled at cfg 1 (no negative prompt)
    architecture: str = ""           # modelspec.architecture of its LoRA files (kohya's sai_model_spec names)
    dit: bool = True
    # DistillConfig.cross_rows when it is left at "auto" (-1), as measured per architecture on the benchmark's trained
    # miniatures (bench/RESULTS.md, "Why each default"): 2 on the UNet (paired mean4 +0.87 [+0.13, +1.68]), 0 on the
    # DiTs (MiniCanvas-Flux: mean4 -0.28 [-0.91, +0.27], SFA -1.5, for 22% more time)
    cross_rows: int = 0
    # DistillConfig.learning_rate when it is left at "auto" (0): 1e-4 on the UNets (the authors'), 2e-4 on the DiTs
    # (MiniCanvas-Flux, every concept x 3 training seeds, paired: style SFA +6.2 [+0.5, +13.3], object UA +2.3, square
    # 65 -> 83, unlisted IRA -1.2 [-2.2, -0.3], mean4 +0.7 [-0.1, +1.8]; measured on that one DiT only)
    learning_rate: float = 2e-4
    fused: tuple[str, ...] = ()      # leaf names of fused q/k/v(/mlp) projections (row slices: ScanConfig.fused_slices)
    # DistillConfig.text_encoder "auto": also train the text encoder's layers. On for the UNets (MiniCanvas, every
    # concept x 3 training seeds, paired against the diffusion model alone: mean4 +1.94 [+0.50, +3.72], style SFA
    # +9.3, unlisted CRA +3.9; bench/RESULTS.md, "The text encoder and the UNet together"); off for the DiTs: on
    # MiniCanvas-Flux it gains more (mean4 +4.69 [+2.33, +7.37]) but loses the objects' synonyms (-20.3; its last
    # layer alone, "last": mean4 +1.92 [+0.69, +3.48], synonyms kept), and on the real DiTs' T5 / Qwen / Gemma
    # encoders (billions of parameters beside the DiT) neither quality nor memory is measured ("The text encoder on
    # the DiT"): "on" / "last" are offered there, not the default
    text_encoder: bool = False
    # DistillConfig.pseudo_rows "auto" (-1): retain rows on perturbed copies of the concept's words that the unerased
    # model draws as something else, and as many forget rows on those it still draws as the concept. 2 on the UNets
    # (MiniCanvas, every concept x 3 training seeds, paired: mean4 +3.11 [+1.49, +4.81], unlisted IRA +8.68 [+4.55,
    # +13.80], for 38% more time; bench/RESULTS.md, "Perturbed concept words"); 0 on the DiTs (MiniCanvas-Flux, every
    # concept x 1 training seed, paired: mean4 -0.20 [-0.93, +0.51], the objects' unlisted IRA -3.90 [-7.80, 0.00];
    # "Pseudo words on the DiT")
    pseudo_rows: int = 0
    # DistillConfig.model_strength "auto" (-1) where the text encoder trains too: the network's part of the LoRA is
    # saved at this strength, the text encoder's at 1 (LoraLoader's strength_model / strength_clip). 0.9 on the UNets
    # (MiniCanvas, every concept x 3 training seeds, paired against 1: mean4 +0.45 [+0.15, +0.78], unlisted IRA +0.92
    # [+0.32, +1.67], SFA +0.42, synonyms -0.17; bench/RESULTS.md, "The network's part at 0.9"); 1 on the DiTs (not
    # measured there; their text encoder does not train by default)
    model_strength: float = 1.0
    # The same for DistillConfig.concept_kind "object" (bench/RESULTS.md, "Objects at their own strength")
    object_model_strength: float = 1.0


TEXT_LAYER = re.compile(r"(^|\.)(layers|layer|block|blocks)\.\d+\.")  # a text encoder's transformer layers


def text_candidates(text_encoder) -> list[str]:
    """The text encoder's modules that carry adapters: every Linear inside its transformer layers (kohya's text
    encoder LoRA: CLIP's q/k/v/out projections and MLP), in module order; embeddings, final norms and projections
    outside the layers stay as they are."""
    from torch import nn  # families.py stays importable without torch for the rest
    return [n for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear) and TEXT_LAYER.search(n)]


def last_layers(names: list[str]) -> list[str]:
    """Of text-encoder module paths (text_candidates'), those in each encoder's last layer: the highest layer index
    under each stack (the path before TEXT_LAYER's match, e.g. "clip_l.transformer.text_model.encoder" and
    "t5xxl.transformer.encoder" on Flux), in the order given."""
    def stack_and_index(name):
        m = TEXT_LAYER.search(name)
        return name[:m.start()], int(m.group(0).rstrip(".").rsplit(".", 1)[1])
    last: dict[str, int] = {}
    for n in names:
        stack, i = stack_and_index(n)
        last[stack] = max(i, last.get(stack, i))
    return [n for n in names if stack_and_index(n)[1] == last[stack_and_index(n)[0]]]


UNET = Family("unet", "SD1.x / SD2.x / SDXL (UNet)", attention=("to_q", "to_k", "to_v", "to_out", "to_out.0"),
              text_attention=(".attn2.",), dit=False, cross_rows=2, learning_rate=1e-4, text_encoder=True,
              pseudo_rows=2, model_strength=0.9, object_model_strength=0.8)
FLUX = Family("flux", "Flux.1-dev (and Krea, Kontext)", blocks=("double_blocks", "single_blocks"),
              attention=("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2"),
              text_attention=(".txt_attn.",), inplace_residuals=True, guidance_distilled=True,
              architecture="flux-1-dev/lora", fused=("img_attn.qkv", "txt_attn.qkv", "linear1"))
FLUX_SCHNELL = Family("flux_schnell", "Flux.1-schnell", FLUX.blocks, FLUX.attention, FLUX.text_attention,
                      inplace_residuals=True, guidance_distilled=True, architecture="flux-1-schnell/lora",
                      fused=FLUX.fused)
CHROMA = Family("chroma", "Chroma", FLUX.blocks, FLUX.attention, FLUX.text_attention, inplace_residuals=True,
                architecture="chroma/lora", fused=FLUX.fused)
SD3 = Family("sd3", "SD3 / SD3.5", blocks=("joint_blocks",), attention=("attn.qkv", "attn.proj", "attn2.qkv",
                                                                          "attn2.proj"),
             text_attention=(".context_block.attn.",),
             architecture="stable-diffusion-3/lora", fused=("attn.qkv", "attn2.qkv"))
QWEN_IMAGE = Family("qwen_image", "Qwen-Image", blocks=("transformer_blocks",),
                    attention=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
                    text_attention=(".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj", ".attn.to_add_out"),
                    architecture="qwen-image/lora")
LUMINA2 = Family("lumina2", "Lumina 2 (NextDiT; Z-Image's backbone)",
                 blocks=("noise_refiner", "context_refiner", "layers"),
                 attention=("attention.qkv", "attention.out"), text_attention=("context_refiner.",),
                 architecture="lumina-2/lora")

FAMILIES = {f.name: f for f in (UNET, FLUX, FLUX_SCHNELL, CHROMA, SD3, QWEN_IMAGE, LUMINA2)}


def family_of(model) -> Family:
    """The family a DiffusionModel declares (`model.family`: a Family or its name); UNET when it declares none (the
    MiniCanvas model, the tests' tiny denoiser and SD UNets are UNets)."""
    f = getattr(model, "family", None)
    if f is None:
        return UNET
    return f if isinstance(f, Family) else FAMILIES[f]


def in_blocks(path: str, family: Family) -> bool:
    return not family.blocks or path.split(".", 1)[0] in family.blocks


SLICE_NAMES = ("q", "k", "v", "mlp")


def is_leaf(path: str, leaf: str) -> bool:
    return path == leaf or path.endswith("." + leaf)


def fused_slices(path: str, fan_in: int, fan_out: int, family: Family) -> list[str]:
    """The row-slice candidate names of module `path` (`<path>[q]`, ...) if it is one of `family`'s fused
    projections whose rows are q, k, v blocks of its input width (then the MLP's rows); [] otherwise."""
    if not any(is_leaf(path, leaf) for leaf in family.fused) or fan_out < 3 * fan_in:
        return []
    names = SLICE_NAMES[:3] + (SLICE_NAMES[3:] if fan_out > 3 * fan_in else ())
    return [f"{path}[{n}]" for n in names]


def split_slice(name: str) -> tuple[str, str | None]:
    """'double_blocks.0.img_attn.qkv[k]' -> ('double_blocks.0.img_attn.qkv', 'k'); a module path -> (path, None)."""
    if name.endswith("]") and "[" in name:
        path, _, part = name[:-1].rpartition("[")
        if part in SLICE_NAMES:
            return path, part
    return name, None


def slice_rows(part: str | None, fan_in: int, fan_out: int) -> tuple[int, int]:
    """The output rows [a, b) of slice `part` of a fused projection (None: every row)."""
    if part is None:
        return 0, fan_out
    i = SLICE_NAMES.index(part)
    return (i * fan_in, (i + 1) * fan_in) if i < 3 else (3 * fan_in, fan_out)
