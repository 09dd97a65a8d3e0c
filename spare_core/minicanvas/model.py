"""The MiniCanvas text-to-image diffusion model: a miniature Stable Diffusion, small enough to train on 2 CPU cores.

    from spare_core.minicanvas.model import load
    model = load()                                             # shipped weights, fp32 on CPU
    images = model.sample(["A star image in ukiyo style."], seed=0, steps=20, cfg=4.0)   # [1, 3, 32, 32] in [0, 1]

It follows SD 1.x / ldm (`openaimodel.UNetModel` with `SpatialTransformer`s) in structure and module names, so adapters
and LoRA keys look like ComfyUI's: `diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k`, ...
- pixel space, no VAE: the "latent" is the image in [-1, 1], shape (3, 32, 32). The UNet works on it after a 2x2
  pixel-unshuffle (12 x 16 x 16) and pixel-shuffles its output back, which keeps CPU training cheap. Two coordinate
  planes are appended to the input (CoordConv): SD learns where things are from padding cues over a long training;
  the miniature, trained for minutes, must place its objects from the first steps.
- conditioning: cross-attention (attn2) at 8 x 8, 4 x 4 and the middle block, plus an attention-pooled text vector
  added to the timestep embedding (Imagen / SDXL style, `TextPool`), and ADM's scale-shift res blocks; trained for
  minutes, cross-attention alone left the prompt nearly unused.
- text encoder: word tokens of the MiniCanvas vocabulary (+ <bos>, <eos>, <pad>, <unk>), learned positions, a small
  pre-norm transformer; per-token context [B, L, D] like CLIP's last hidden state. Trained jointly with the UNet.
- k-diffusion's sigma parameterisation with V-prediction (SD 2.x-v; ComfyUI's `V_PREDICTION` formulas, with
  sigma_data = SIGMA_DATA for pixels in [-1, 1]): x_t = x0 + sigma * eps, network input x_t / sqrt(sigma^2 + sd^2),
  denoised = x_t * sd^2 / (sigma^2 + sd^2) - v * sigma * sd / sqrt(sigma^2 + sd^2). An EPS network would have to
  learn the identity at high noise (eps ~ x_t / sigma) to a precision of 1 / sigma; v does not, which is what makes
  a 30-minute CPU training work. sigma_at(t) is log-linear in [SIGMA_MIN, SIGMA_MAX] and the network's timestep input
  is 1000 * t (like SD's discrete timesteps). SIGMA_MAX is EDM's 80: on 32 x 32 images
  the mean colour of x_t (which is what decides the style) is hidden from the model only at very high noise, so the
  prompt must be learnt and obeyed there.
- sampling: DPM-Solver++(2M) (k-diffusion's `sample_dpmpp_2m`) or Euler on a Karras schedule, with classifier-free
  guidance (the model is trained with 10% of prompts dropped to "").
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import data

WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
MODEL_FILE = WEIGHTS_DIR / "minicanvas_model.safetensors"
KEY_PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoder."
SIGMA_MIN = 0.02
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass
class MiniCanvasConfig:
    vocab: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS) + data.vocabulary())
    max_tokens: int = 16          # context length L (prompts are padded / truncated to it)
    text_dim: int = 128           # D: width of the text encoder = context_dim of cross-attention
    text_layers: int = 2
    text_heads: int = 4
    model_channels: int = 32      # UNet width at the first level (16 x 16 after pixel-unshuffle)
    channel_mult: tuple[int, ...] = (1, 2, 2)   # levels at 16, 8, 4 px
    num_res_blocks: int = 1       # per level on the way down (num_res_blocks + 1 on the way up, like ldm)
    attention_levels: tuple[int, ...] = (1, 2)     # 8 x 8 and 4 x 4 (and the middle block)
    head_dim: int = 32
    image_size: int = data.SIZE
    patch: int = 2                # pixel-unshuffle factor
    coord_channels: bool = True   # append (x, y) coordinate planes to the input (CoordConv)
    scale_shift: bool = True      # ADM's use_scale_shift_norm in every ResBlock
    pooled_text: bool = True      # attention-pooled text vector added to the timestep embedding (Imagen / SDXL style)
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    sigma_data: float = SIGMA_DATA


# ----------------------------------------------------------------------------------------------------------------
# Text encoder

class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, d)
        x = x + self.proj(a)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Word tokens [B, L] -> per-token context [B, L, D]."""

    def __init__(self, cfg: MiniCanvasConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(len(cfg.vocab), cfg.text_dim)
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_tokens, cfg.text_dim) * 0.02)
        self.layers = nn.ModuleList(TextBlock(cfg.text_dim, cfg.text_heads) for _ in range(cfg.text_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.text_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.from_embeddings(self.token_embedding(tokens))

    def from_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, D] -> per-token context (forward after the embedding lookup)."""
        x = x + self.position_embedding[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class Tokenizer:
    """Lower-case words -> ids: <bos> words <eos> <pad>...; unknown words -> <unk>."""

    def __init__(self, vocab: Sequence[str], max_tokens: int):
        self.vocab, self.max_tokens = list(vocab), max_tokens
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        pad, bos, eos, unk = (self.ids[t] for t in SPECIAL_TOKENS)
        out = torch.full((len(prompts), self.max_tokens), pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids = [bos] + [self.ids.get(w, unk) for w in data.tokenize_words(p)][: self.max_tokens - 2] + [eos]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


# ----------------------------------------------------------------------------------------------------------------
# UNet (names follow ldm's openaimodel / attention modules)

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(ch: int) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0 and g <= ch // 4)
    return nn.GroupNorm(groups, ch)


class ResBlock(nn.Module):
    """ldm's ResBlock; scale_shift: ADM's use_scale_shift_norm (the embedding scales and shifts the normalised
    features instead of only shifting them), which lets the prompt gate the spatial features that draw the object."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[2](self.out_layers[1](self.out_layers[0](h) * (1 + scale) + shift))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Self-attention (context=None) or cross-attention; SD's projection names to_q/to_k/to_v/to_out.0."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(a)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        heads = max(1, dim // head_dim)
        self.norm1, self.attn1 = nn.LayerNorm(dim), CrossAttention(dim, None, heads, head_dim)
        self.norm2, self.attn2 = nn.LayerNorm(dim), CrossAttention(dim, context_dim, heads, head_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, context_dim: int, head_dim: int):
        super().__init__()
        self.norm = norm(ch)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, context_dim, head_dim)])
        self.proj_out = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for blk in self.transformer_blocks:
            t = blk(t, context)
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class TextPool(nn.Module):
    """Attention pooling of the text context into one vector that joins the timestep embedding, as Imagen's
    attention-pooled text embedding and SDXL's pooled text embedding do. A learned query cross-attends to the tokens
    (`attn2`, SD's projection names), so erasure adapters on attention see this path as well as the spatial one.
    The miniature needs it: trained for minutes, cross-attention alone left the prompt nearly unused."""

    def __init__(self, context_dim: int, emb_dim: int, head_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)
        self.attn2 = CrossAttention(context_dim, context_dim, max(1, context_dim // head_dim), head_dim)
        self.proj = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, emb_dim))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        q = self.query.to(context.dtype).expand(context.shape[0], -1, -1)
        return self.proj(self.attn2(q, context))[:, 0]


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps = UNet(x_in [B, 3, S, S], timesteps [B] in [0, 1000], context [B, L, D]) -> [B, 3, S, S]."""

    def __init__(self, cfg: MiniCanvasConfig):
        super().__init__()
        mc, p = cfg.model_channels, cfg.patch
        emb_dim = 4 * mc
        self.patch, self.model_channels = p, mc
        in_ch = 3 + (2 if cfg.coord_channels else 0)
        if cfg.coord_channels:
            ramp = torch.linspace(-1, 1, cfg.image_size)
            self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))[None],
                                 persistent=False)
        else:
            self.coords = None
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_pool = TextPool(cfg.text_dim, emb_dim, cfg.head_dim) if cfg.pooled_text else None
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(in_ch * p * p, mc, 3, padding=1)])])
        chans, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, cfg.scale_shift)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg.text_dim, cfg.head_dim))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                chans.append(ch)
        self.middle_block = TimestepEmbedSequential([
            ResBlock(ch, emb_dim, ch, cfg.scale_shift), SpatialTransformer(ch, cfg.text_dim, cfg.head_dim),
            ResBlock(ch, emb_dim, ch, cfg.scale_shift)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, mult * mc, cfg.scale_shift)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg.text_dim, cfg.head_dim))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, 3 * p * p, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.text_pool is not None:
            emb = emb + self.text_pool(context)
        if self.coords is not None:
            x = torch.cat([x, self.coords.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        h = F.pixel_unshuffle(x, self.patch)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return F.pixel_shuffle(self.out(h), self.patch)


# ----------------------------------------------------------------------------------------------------------------
# The DiffusionModel protocol (spare_core.model) + sampling

class PseudoWords:
    """The pseudo-word protocol of spare_core.distill.pseudo_bank (DistillConfig.pseudo_rows) for a MiniCanvas model
    whose words go through a `TextEncoder` (`words_encoder`) and `tokenizer`; the model's `encode` reads
    `pseudo_embeddings` where `pseudo_words` is not empty. Shared by the UNet and MiniCanvas-Flux."""

    pseudo_words: dict[str, torch.Tensor]  # word -> token embedding (see pseudo_embeddings)

    @property
    def words_encoder(self) -> TextEncoder:
        raise NotImplementedError

    def pseudo_embeddings(self, prompts: Sequence[str], tokens: torch.Tensor) -> torch.Tensor:
        """The prompts' token embeddings [B, L, D] with each word of `pseudo_words` read as its embedding."""
        x = self.words_encoder.token_embedding(tokens)
        for i, p in enumerate(prompts):
            for j, w in enumerate(data.tokenize_words(p)[: self.cfg.max_tokens - 2]):
                if w in self.pseudo_words:
                    x[i, j + 1] = self.pseudo_words[w].to(x)
        return x

    def prompt_words(self, prompt: str) -> list[str]:
        """The words the tokenizer reads in a prompt, in order."""
        return data.tokenize_words(prompt)

    def knows_word(self, word: str) -> bool:
        """A word of the vocabulary (DistillConfig.pseudo_rows perturbs only those)."""
        return word in self.tokenizer.ids

    def pseudo_word(self, word: str, radius: float, generator: torch.Generator) -> torch.Tensor:
        """The word's token embedding plus a random direction (from `generator`) of length radius x
        `embedding_scale(word)`: what `pseudo_words` holds for a pseudo word (DistillConfig.pseudo_rows)."""
        u = torch.randn(self.word_embedding(word).shape, generator=generator)
        return self.word_embedding(word) + radius * self.embedding_scale(word) * u / u.norm()

    def word_embedding(self, word: str) -> torch.Tensor:
        """The token embedding of a vocabulary word."""
        return self.words_encoder.token_embedding.weight[self.tokenizer.ids[word]].detach()

    def embedding_scale(self, word: str) -> float:
        """The median distance from a word's embedding to every other word's: the scale of a perturbation."""
        w = self.words_encoder.token_embedding.weight.detach()
        d = (w - self.word_embedding(word)).norm(dim=1)
        return float(d[d > 0].median())


class MiniCanvasModel(PseudoWords):
    """MiniCanvas as a `spare_core.model.DiffusionModel`. cond = context tensor [B, L, D] (the text encoder output)."""

    key_prefix = KEY_PREFIX
    # its text encoder's modules in a LoRA: the keys ComfyUI maps for the demo CLIP, which keeps the weights file's
    # "text_encoder." names (nodes/demo_model.py)
    text_key_prefix = "text_encoders." + TEXT_PREFIX

    def __init__(self, cfg: MiniCanvasConfig | None = None, network: UNetModel | None = None,
                 text_encoder: TextEncoder | None = None, device: torch.device | str = "cpu"):
        self.cfg = cfg or MiniCanvasConfig()
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.network = (network or UNetModel(self.cfg)).to(self.device)
        self.text_encoder = (text_encoder or TextEncoder(self.cfg)).to(self.device)
        self.tokenizer = Tokenizer(self.cfg.vocab, self.cfg.max_tokens)
        self.pseudo_words: dict[str, torch.Tensor] = {}  # word -> token embedding (see encode)
        self.latent_shape = (3, self.cfg.image_size, self.cfg.image_size)
        self._log_smin, self._log_smax = math.log(self.cfg.sigma_min), math.log(self.cfg.sigma_max)

    @property
    def words_encoder(self) -> TextEncoder:
        return self.text_encoder

    # --- protocol -------------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per-token context [B, L, D] (gradients flow only if the caller enables them). A word of `pseudo_words`
        is read as its embedding there (DistillConfig.pseudo_rows: perturbed copies of a concept word's embedding)."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        if not self.pseudo_words:
            return self.text_encoder(tokens)
        return self.text_encoder.from_embeddings(self.pseudo_embeddings(prompts, tokens))

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """`encode`, through the text encoder as it is now (DistillConfig.text_encoder trains adapters on it)."""
        return self.encode(prompts)

    def select_cond(self, cond: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return cond[index.to(cond.device)]

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """Log-linear: t = 0 -> SIGMA_MIN, t = 1 -> SIGMA_MAX."""
        return torch.exp(self._log_smin + t * (self._log_smax - self._log_smin))

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return (torch.log(sigma) - self._log_smin) / (self._log_smax - self._log_smin)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0 + sigma.view(-1, 1, 1, 1) * noise

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_in, c_skip, c_out), each [B, 1, 1, 1]: denoised = c_skip * x + c_out * v(c_in * x)."""
        sd2, s = self.cfg.sigma_data ** 2, sigma.view(-1, 1, 1, 1)
        c_in = 1.0 / torch.sqrt(s ** 2 + sd2)
        return c_in, sd2 / (s ** 2 + sd2), -s * self.cfg.sigma_data * c_in

    def predict_v(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Raw network output (v). x: [B, 3, H, W] noisy latent; sigma: [B]."""
        c_in, _, _ = self.preconditioning(sigma)
        return self.network(x * c_in, 1000.0 * self.t_of_sigma(sigma), cond)

    def v_target(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The v for which predict_x0 returns x0 exactly (training target)."""
        _, c_skip, c_out = self.preconditioning(sigma)
        return (x0 - c_skip * x) / c_out

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Denoised estimate x0. x: [B, 3, H, W] noisy latent; sigma: [B]; returns [B, 3, H, W]."""
        _, c_skip, c_out = self.preconditioning(sigma)
        return c_skip * x + c_out * self.predict_v(x, sigma, cond)

    # --- sampling -------------------------------------------------------------------------------------------------
    def karras_sigmas(self, steps: int, rho: float = 7.0) -> torch.Tensor:
        ramp = torch.linspace(0, 1, steps)
        lo, hi = self.cfg.sigma_min ** (1 / rho), self.cfg.sigma_max ** (1 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
        return torch.cat([sig, torch.zeros(1)]).to(self.device)

    def initial_noise(self, n: int, seed: int | Sequence[int]) -> torch.Tensor:
        """Unit noise [n, 3, H, W]; image i uses seed + i (or seeds[i]), independent of the batch it is in."""
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        assert len(seeds) == n
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(self.device)

    def guided_x0(self, cond: torch.Tensor, uncond: torch.Tensor, cfg: float):
        """x0 function (x, sigma [B]) -> x0 with classifier-free guidance: uncond + cfg * (cond - uncond)."""
        def denoise(x, sigma):
            if cfg == 1.0:
                return self.predict_x0(x, sigma, cond).clamp(-1, 1)
            both = self.predict_x0(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
            c, u = both.chunk(2)
            return (u + cfg * (c - u)).clamp(-1, 1)  # static thresholding (Imagen): images live in [-1, 1]
        return denoise

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int | Sequence[int] = 0, steps: int = 20, cfg: float = 4.0,
               sampler: str = "dpmpp_2m", negative: str = "", return_latent: bool = False,
               batch_size: int = 128) -> torch.Tensor:
        """Generate images for `prompts`: [B, 3, H, W] in [0, 1] (or the latent in [-1, 1] if return_latent).
        Deterministic given `seed` (int: image i uses seed + i; or one seed per prompt)."""
        prompts = list(prompts)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        outs = []
        for a in range(0, len(prompts), batch_size):
            p, s = prompts[a: a + batch_size], seeds[a: a + batch_size]
            cond = self.encode(p)
            uncond = self.encode([negative] * len(p))
            x = self.initial_noise(len(p), s) * self.cfg.sigma_max
            x = sample_loop(self.guided_x0(cond, uncond, cfg), x, self.karras_sigmas(steps), sampler)
            outs.append(x)
        x = torch.cat(outs)
        return x if return_latent else to_image(x)

    # --- weights ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {KEY_PREFIX + k: v for k, v in self.network.state_dict().items()}
        sd.update({TEXT_PREFIX + k: v for k, v in self.text_encoder.state_dict().items()})
        return sd

    def save(self, path: str | pathlib.Path = MODEL_FILE, dtype: torch.dtype = torch.float16,
             metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        meta = {"config": json.dumps(asdict(self.cfg)), "format": "minicanvas-v1"}
        meta.update(metadata or {})
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}, str(path), meta)


def to_image(x: torch.Tensor) -> torch.Tensor:
    """Latent [-1, 1] -> image [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


def to_latent(img: torch.Tensor) -> torch.Tensor:
    """Image [0, 1] -> latent [-1, 1]."""
    return img * 2 - 1


def sample_loop(denoise, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "dpmpp_2m") -> torch.Tensor:
    """k-diffusion samplers on x0-predictions. denoise(x, sigma [B]) -> x0; sigmas decreasing, last may be 0."""
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d0 = denoise(x, s.expand(x.shape[0]))
        if s_next == 0:
            x = d0
        elif sampler == "euler":
            x = d0 + (s_next / s) * (x - d0)
        elif sampler == "dpmpp_2m":
            h = torch.log(s) - torch.log(s_next)
            if old is None:
                d = d0
            else:
                h_last = torch.log(sigmas[i - 1]) - torch.log(s)
                r = h_last / h
                d = (1 + 1 / (2 * r)) * d0 - (1 / (2 * r)) * old
            x = (s_next / s) * x - torch.expm1(-h) * d
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
        old = d0
    return x


def load(path: str | pathlib.Path = MODEL_FILE, device: torch.device | str = "cpu") -> MiniCanvasModel:
    """The shipped MiniCanvas model (fp32, eval mode, requires_grad off)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg_d: dict[str, Any] = json.loads(meta["config"])
    for k in ("channel_mult", "attention_levels"):
        cfg_d[k] = tuple(cfg_d[k])
    model = MiniCanvasModel(MiniCanvasConfig(**cfg_d), device=device)
    sd = load_file(str(path))
    net = {k[len(KEY_PREFIX):]: v.float() for k, v in sd.items() if k.startswith(KEY_PREFIX)}
    txt = {k[len(TEXT_PREFIX):]: v.float() for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    model.network.load_state_dict(net)
    model.text_encoder.load_state_dict(txt)
    for m in (model.network, model.text_encoder):
        m.eval().requires_grad_(False)
    return model
