"""A tiny SD-like conditional denoiser implementing spare_core's DiffusionModel (test instrument, random weights).

Layout mirrors ComfyUI's LDM UNet names where SPARE cares: res blocks, `transformer_blocks.N.attn1` (self) and
`.attn2` (cross) attention with to_q / to_k / to_v / to_out.0 Linear projections, Conv2d in/out.
Text encoder: words hashed into a small embedding table + one Linear (deterministic, no tokenizer files).
EPS prediction with k-diffusion scaling: x_t = x0 + sigma * eps, input scaled by 1/sqrt(sigma^2 + 1).
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

SIGMA_MIN, SIGMA_MAX = 0.03, 14.6
CTX_LEN, CTX_DIM, VOCAB = 8, 16, 97


class Attention(nn.Module):
    def __init__(self, dim, ctx_dim, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        h = self.heads
        q, k, v = (t.view(b, -1, h, d // h).transpose(1, 2) for t in (self.to_q(x), self.to_k(context),
                                                                        self.to_v(context)))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, ctx_dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, ctx_dim):
        super().__init__()
        self.norm = nn.GroupNorm(4, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, ctx_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).view(b, c, hh, ww))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class TinyUNet(nn.Module):
    def __init__(self, channels=4, ch=16, ctx_dim=CTX_DIM):
        super().__init__()
        self.ch = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, ch * 2), nn.SiLU(), nn.Linear(ch * 2, ch * 2))
        self.conv_in = nn.Conv2d(channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([ResBlock(ch, ch, ch * 2), SpatialTransformer(ch, ctx_dim)])
        self.down = nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1)
        self.middle_block = nn.ModuleList([ResBlock(ch * 2, ch * 2, ch * 2), SpatialTransformer(ch * 2, ctx_dim)])
        self.up = nn.ConvTranspose2d(ch * 2, ch, 4, stride=2, padding=1)
        self.output_blocks = nn.ModuleList([ResBlock(ch * 2, ch, ch * 2), SpatialTransformer(ch, ctx_dim)])
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        half = self.ch // 2
        freqs = torch.exp(-math.log(1000) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        args = timesteps.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=1))
        h = self.conv_in(x)
        h = self.input_blocks[1](self.input_blocks[0](h, emb), context)
        skip = h
        h = self.down(h)
        h = self.middle_block[1](self.middle_block[0](h, emb), context)
        h = self.up(h)
        h = self.output_blocks[0](torch.cat([h, skip], 1), emb)
        h = self.output_blocks[1](h, context)
        return self.out(h)


class TinyTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, CTX_DIM)
        self.pos = nn.Parameter(torch.randn(CTX_LEN, CTX_DIM) * 0.1)
        self.proj = nn.Linear(CTX_DIM, CTX_DIM)

    def tokens(self, prompt: str) -> list[int]:
        words = prompt.lower().replace(".", " ").replace(",", " ").split()
        ids = [1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in words][:CTX_LEN]
        return ids + [0] * (CTX_LEN - len(ids))

    def forward(self, prompts):
        ids = torch.tensor([self.tokens(p) for p in prompts], device=self.pos.device)
        return self.proj(self.embed(ids) + self.pos)


class TinyDiffusionModel:
    """DiffusionModel over TinyUNet; `cond` is a context tensor [B, CTX_LEN, CTX_DIM]."""

    key_prefix = "diffusion_model."

    def __init__(self, seed: int = 0, size: int = 8, channels: int = 4):
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.network = TinyUNet(channels)
            self.text = TinyTextEncoder()
            # Random init leaves the prompt almost without effect; strengthen cross-attention so that
            # concepts are distinguishable (a trained model's cross-attention carries the prompt).
            for name, mod in self.network.named_modules():
                if name.endswith("attn2.to_v") or name.endswith("attn2.to_out.0"):
                    torch.nn.init.normal_(mod.weight, std=1.0 / mod.weight.shape[1] ** 0.5 * 3.0)
        self.network.eval()
        self.text.eval()
        self.latent_shape = (channels, size, size)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @torch.no_grad()
    def encode(self, prompts):
        return self.text(list(prompts)).detach()

    def select_cond(self, cond, index):
        return cond[index.to(cond.device)]

    def predict_x0(self, x, sigma, cond):
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        c_in = 1.0 / torch.sqrt(s ** 2 + 1.0)
        timesteps = sigma.log() * 100.0  # any smooth function of sigma will do for a test denoiser
        eps = self.network(x * c_in, timesteps, cond)
        return x - s * eps

    def add_noise(self, x0, noise, sigma):
        return x0 + sigma.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype) * noise

    def sigma_at(self, t):
        t = torch.as_tensor(t, dtype=torch.float32)
        return torch.exp(math.log(SIGMA_MIN) + t * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)))
