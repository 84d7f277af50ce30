"""XUT building blocks: attention, SwiGLU, modulated norms and the transformer block (spec §1.2-1.5)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .rope import AxialRoPE


class Modulation(NamedTuple):
    """One shared adaLN triple, each [B, 1, D], with the 1 + already added once per forward (not once per block):
    factor = 1 + scale, gain = 1 + gate (spec §1.3)."""

    factor: Tensor
    shift: Tensor
    gain: Tensor


class BlockModulations(NamedTuple):
    attn: Modulation
    xattn: Modulation
    ffw: Modulation


def shared_adaln(dim: int) -> nn.Sequential:
    """LayerNorm -> Linear(d, 4d) -> Mish -> Linear(4d, 3d); the last layer starts at zero (spec §1.2 step 4)."""
    mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, 3 * dim))
    nn.init.zeros_(mlp[3].weight)
    nn.init.zeros_(mlp[3].bias)
    return mlp


def modulation(mlp: nn.Module, t_emb: Tensor) -> Modulation:
    scale, shift, gate = mlp(t_emb).chunk(3, dim=-1)
    return Modulation(1 + scale, shift, 1 + gate)


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> [B, 1, D]: sinusoids of 1000 t as [cos, sin], then Linear + Mish."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs[None], persistent=True)  # (1, half); stored in checkpoints
        self.proj = nn.Sequential(nn.Linear(2 * half, dim), nn.Mish())

    def forward(self, t: Tensor) -> Tensor:
        """t [B] -> [B, 1, D]."""
        args = t.reshape(-1, 1).float() * 1000.0 * self.freqs.float()  # (B, half)
        feats = torch.cat([args.cos(), args.sin()], dim=-1).to(self.proj[0].weight.dtype)
        return self.proj(feats)[:, None, :]


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> tokens [B, (H/p)*(W/p), D], row-major."""
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class UnPatch(nn.Module):
    """Linear head; each token's p*p*C outputs are (p_row, p_col, C) with C fastest (spec §1.2 step 7)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, patch_size * patch_size * out_channels)
        nn.init.normal_(self.proj.weight, std=1.0 / dim**2)

    def forward(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """x [B, N, D] -> [B, C, H, W]."""
        p = self.patch_size
        return rearrange(
            self.proj(x), "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid_hw[0], w=grid_hw[1], p1=p, p2=p
        )


class ModulatedNorm(nn.Module):
    """m = RMSNorm(x) * (1 + scale) + shift (eps 1e-6, learnable weight).

    Computed as shift + (x * rsqrt(mean x^2 + eps)) * (weight * factor): the norm weight is folded into the
    [B, 1, D] factor, so three passes over the [B, L, D] activations instead of seven. `norm` only holds the weight
    under the released key `*_pre_norm.norm.weight`.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, mod: Modulation) -> Tensor:
        """x [B, L, D] -> [B, L, D]."""
        if getattr(self.norm.forward, "__func__", None) is not type(self.norm).forward:
            # An adapter library (LyCORIS, hdm_core.adapters) has wrapped the norm's forward to train its weight:
            # call it, or the folded path below would bypass the adapter.
            return torch.addcmul(mod.shift, self.norm(x), mod.factor)
        # The mean square in fp32 whatever x's dtype, as nn.RMSNorm does; one fused reduction pass.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (B, L, 1)
        inv_rms = torch.rsqrt(norm.square() / x.shape[-1] + self.norm.eps).to(x.dtype)
        return torch.addcmul(mod.shift, x * inv_rms, self.norm.weight * mod.factor)


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v [B, L, H, Dh] -> [B, L, H*Dh]; SDPA default scale 1/sqrt(Dh), no mask (as trained)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return rearrange(out, "b h l d -> b l (h d)")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.rope = AxialRoPE(head_dim, heads)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x [B, L, D], pos [B, L, 2] -> [B, L, D]."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b l h d", three=3, h=self.heads)
        rot = self.rope.rotation(pos)  # once for q and k
        return self.out(_attention(self.rope.apply(q, rot), self.rope.apply(k, rot), v))


class CrossAttention(nn.Module):
    """The cross-U skip: queries from the decoder, keys/values from an encoder output (spec §1.4, §1.6)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.rope = AxialRoPE(head_dim, heads)

    def forward(self, x: Tensor, skip: Tensor, pos: Tensor) -> Tensor:
        """x [B, L, D], skip [B, L, D] (same tokens and positions), pos [B, L, 2] -> [B, L, D]."""
        q = rearrange(self.q(x), "b l (h d) -> b l h d", h=self.heads)
        k, v = rearrange(self.kv(skip), "b l (two h d) -> two b l h d", two=2, h=self.heads)
        rot = self.rope.rotation(pos)
        return self.out(_attention(self.rope.apply(q, rot), self.rope.apply(k, rot), v))


class SwiGLU(nn.Module):
    """w12 packs [gate; up]; out = w3(silu(gate) * up) (spec §1.5)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention, SwiGLU; each as x = m + (1 + gate) * F(m) (spec §1.3).

    The residual adds to the modulated norm m, not to the incoming x: the released weights were trained so.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int, *, cross: bool = False) -> None:
        super().__init__()
        self.attn_pre_norm = ModulatedNorm(dim)
        self.attn = SelfAttention(dim, heads, head_dim)
        if cross:
            self.xattn_pre_norm = ModulatedNorm(dim)
            self.xattn = CrossAttention(dim, heads, head_dim)
        self.mlp_pre_norm = ModulatedNorm(dim)
        self.mlp = SwiGLU(dim, mlp_dim)

    @property
    def has_cross(self) -> bool:
        return hasattr(self, "xattn")

    def forward(self, x: Tensor, pos: Tensor, mods: BlockModulations, skip: Tensor | None = None) -> Tensor:
        """x [B, L, D], pos [B, L, 2], skip [B, L, D] or None -> [B, L, D]."""
        m = self.attn_pre_norm(x, mods.attn)
        x = torch.addcmul(m, mods.attn.gain, self.attn(m, pos))
        if self.has_cross:
            if skip is None:
                raise ValueError("a cross-attention block needs the encoder skip tensor")
            m = self.xattn_pre_norm(x, mods.xattn)
            x = torch.addcmul(m, mods.xattn.gain, self.xattn(m, skip, pos))
        m = self.mlp_pre_norm(x, mods.ffw)
        return torch.addcmul(m, mods.ffw.gain, self.mlp(m))
