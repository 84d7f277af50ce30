"""XUT building blocks: attention, SwiGLU, modulated norms and the transformer block (spec §1.2-1.5)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .backward import hand_backward
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
        gain = self.norm.weight * mod.factor  # (B, 1, D)
        if hand_backward(x, mod.shift, gain):
            return _ModulatedRMSNorm.apply(x, mod.shift, gain, self.norm.eps)
        return torch.addcmul(mod.shift, x * _inv_rms(x, self.norm.eps), gain)


def _inv_rms(x: Tensor, eps: float) -> Tensor:
    """[B, L, D] -> 1 / sqrt(mean x^2 + eps), [B, L, 1] in x's dtype; the mean square in fp32 whatever x's dtype, as
    nn.RMSNorm does, in one fused reduction pass."""
    acc = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    return torch.rsqrt(norm.square() / x.shape[-1] + eps).to(x.dtype)


class _ModulatedRMSNorm(torch.autograd.Function):
    """shift + RMSNorm(x) * gain with the analytic backward: with n = x * r, r = (mean x^2 + eps)^-1/2 and
    h = grad * gain, dx = r * (h - n * mean(h * n)). Five passes over [B, L, D] where autograd's chain of the forward's
    ops takes about twelve; it saves n (as the chain does) and not x."""

    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor, gain: Tensor, eps: float) -> Tensor:
        inv_rms = _inv_rms(x, eps)  # (B, L, 1)
        normed = x * inv_rms
        ctx.save_for_backward(normed, inv_rms, gain)
        ctx.shift_shape = shift.shape
        return torch.addcmul(shift, normed, gain)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        normed, inv_rms, gain = ctx.saved_tensors
        grad_shift = grad.sum_to_size(ctx.shift_shape) if ctx.needs_input_grad[1] else None
        grad_gain = (grad * normed).sum_to_size(gain.shape) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            h = grad * gain
            mean_hn = torch.linalg.vecdot(h, normed, dim=-1).unsqueeze(-1) / normed.shape[-1]  # (B, L, 1)
            grad_x = torch.addcmul(h, normed, mean_hn, value=-1).mul_(inv_rms)
        return grad_x, grad_shift, grad_gain, None


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

    def forward(self, x: Tensor, pos: Tensor, out_rows: int | None = None) -> Tensor:
        """x [B, L, D], pos [B, L, 2] -> [B, L, D], or [B, out_rows, D]: only the first out_rows tokens query (all
        of them are still keys and values)."""
        # Unbound along the packed axis: the backward stacks the q, k, v grads straight into the [B, L, 3D] layout
        # that qkv's weight-gradient GEMM reads, with no extra permuting copy.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # each (B, L, H, Dh)
        q, k = self.rope.rotate_qk(q[:, :out_rows], k, pos)
        return self.out(_attention(q, k, v))


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
        k, v = self.kv(skip).unflatten(-1, (2, self.heads, -1)).unbind(2)  # each (B, L, H, Dh), as qkv
        q, k = self.rope.rotate_qk(q, k, pos)
        return self.out(_attention(q, k, v))


class _GatedSiLU(torch.autograd.Function):
    """[..., 2H] packed [gate; up] -> silu(gate) * up, [..., H].

    The same maths as `F.silu(gate) * up` on the two chunks; its backward writes the gate and up gradients into one
    [..., 2H] buffer, where autograd's chunk backward would concatenate them in an extra pass over the widest
    activation of the block.
    """

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


class SwiGLU(nn.Module):
    """w12 packs [gate; up]; out = w3(silu(gate) * up) (spec §1.5)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, D] -> [B, L, D]."""
        gate_up = self.w12(x)  # (B, L, 2H)
        if hand_backward(gate_up):
            return self.w3(_GatedSiLU.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
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

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        mods: BlockModulations,
        skip: Tensor | None = None,
        out_rows: int | None = None,
    ) -> Tensor:
        """x [B, L, D], pos [B, L, 2], skip [B, L, D] or None -> [B, L, D].

        out_rows: compute only the first out_rows tokens' outputs, [B, out_rows, D]; the others still serve as keys
        and values. For the last block, whose text-token outputs nothing reads.
        """
        if out_rows is not None and self.has_cross:
            raise ValueError("out_rows is for the self-attention-only blocks after the backbone")
        m = self.attn_pre_norm(x, mods.attn)
        # m[:, :None] is every row
        x = torch.addcmul(m[:, :out_rows], mods.attn.gain, self.attn(m, pos, out_rows))
        if self.has_cross:
            if skip is None:
                raise ValueError("a cross-attention block needs the encoder skip tensor")
            m = self.xattn_pre_norm(x, mods.xattn)
            x = torch.addcmul(m, mods.xattn.gain, self.xattn(m, skip, pos))
        m = self.mlp_pre_norm(x, mods.ffw)
        return torch.addcmul(m, mods.ffw.gain, self.mlp(m))
