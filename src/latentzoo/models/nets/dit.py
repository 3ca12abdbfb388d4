"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023).

The backbone of Latent Flow Matching (Dao et al. 2023) for its DiT runs. Patchify the latent
(conv, kernel = stride = p), add fixed 2-D sin-cos position embeddings, run transformer blocks
conditioned by adaLN-Zero on c = t_emb + y_emb, then an adaLN final layer and unpatchify.
``learn_sigma`` is off: the output has the input's channels (a velocity).

Zero-initialised modulation and final layer make the output exactly 0 at init, so training
starts from the zero velocity field. ``num_classes = 0`` builds no label table (unconditional);
with ``class_dropout`` > 0 the table has ``num_classes + 1`` rows and the last is the null label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

# (depth, width, heads) of the published sizes
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 1e4) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) times ``t`` of shape (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (h·w, dim): half the channels per axis (MAE/DiT)."""
    assert dim % 4 == 0, "position embedding width must be divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    gy, gx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(gx), axis(gy)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """t -> 256-d sinusoid -> Linear -> SiLU -> Linear. ``time_scale`` multiplies t first."""

    def __init__(self, hidden: int, freq_dim: int = 256, time_scale: float = 1.0) -> None:
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t * self.time_scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: shift/scale/gate for attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer velocity net ``v(x, t, y)`` for (B, C, H, W) latents.

    Args:
        in_channels: latent channels (output has the same).
        input_size: latent height/width (square), used for the position embedding.
        num_classes: label count; 0 = unconditional (no label table).
        class_dropout: > 0 adds the null label row (index ``num_classes``) for CFG.
        size: "S" | "B" | "L" | "XL" sets depth/width/heads unless given explicitly.
        patch_size: 2, 4 or 8.
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int = 32,
        num_classes: int = 0,
        class_dropout: float = 0.0,
        size: str | None = "S",
        patch_size: int = 2,
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        time_scale: float = 1.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        d, w, h = DIT_SIZES[size] if size else (None, None, None)
        depth, hidden_size, num_heads = depth or d, hidden_size or w, num_heads or h
        if None in (depth, hidden_size, num_heads):
            raise ValueError("DiT needs `size` (S/B/L/XL) or depth, hidden_size and num_heads")
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not divisible by patch {patch_size}")
        self.in_channels, self.input_size, self.patch_size = in_channels, input_size, patch_size
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        grid = input_size // patch_size
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, grid, grid)[None], persistent=False
        )
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = None
        if num_classes > 0:
            rows = num_classes + int(class_dropout > 0)
            self.y_embedder = nn.Embedding(rows, hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight  # patch embed as a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1], y: (B,) int labels (index num_classes = null)."""
        _, _, H, W = x.shape
        p = self.patch_size
        tokens = rearrange(self.x_embedder(x), "b d h w -> b (h w) d")
        pos = self.pos_embed
        if tokens.shape[1] != pos.shape[1]:  # another resolution than built for
            pos = sincos_pos_embed_2d(tokens.shape[-1], H // p, W // p).to(x.device)[None]
        tokens = tokens + pos.to(tokens.dtype)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:  # unlabelled call: the null row if there is one, else class 0
                y = torch.full((x.shape[0],), self.y_embedder.num_embeddings - 1, device=x.device)
            c = c + self.y_embedder(y)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        out = self.final_layer(tokens, c)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, w=W // p, p=p, q=p)


# facebookresearch/DiT (and LFM's copy of it) parameter names -> this module's
_REFERENCE_RENAMES = [
    ("x_embedder.proj.", "x_embedder."),
    ("y_embedder.embedding_table.", "y_embedder."),
    (".mlp.fc1.", ".mlp.0."),
    (".mlp.fc2.", ".mlp.2."),
]


def convert_reference_dit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a facebookresearch/DiT-style state dict (as in LFM checkpoints) for :class:`DiT`.

    A DDP ``module.`` prefix is removed only when every key has it (LFM strips 7 characters
    blindly). The fixed ``pos_embed`` is dropped (recomputed here). Load the result with
    ``strict=True`` so any other mismatch fails loudly; use ``time_convention: lfm`` for LFM nets.
    """
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        for old, new in _REFERENCE_RENAMES:
            if old.startswith("."):  # inside block names
                key = key.replace(old, new)
            elif key.startswith(old):  # top-level module names
                key = new + key[len(old) :]
        out[key] = value
    return out
