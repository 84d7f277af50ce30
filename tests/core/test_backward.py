"""The hand-written backward passes (norm, gated SiLU, RoPE) and the last block's row pruning give autograd's gradients
of the plain formulas, written out here independently of hdm_core."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hdm_core.layers import BlockModulations, ModulatedNorm, Modulation, SwiGLU, TransformerBlock
from hdm_core.rope import AxialRoPE, position_map


def _grads(out: torch.Tensor, grad: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad))


def test_modulated_norm_backward_matches_autograd_of_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    norm = ModulatedNorm(16)
    with torch.no_grad():
        norm.norm.weight.copy_(torch.randn(16, generator=g))
    x = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    scale, shift = (torch.randn(2, 1, 16, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 7, 16, generator=g)

    out = norm(x, Modulation(1 + scale, shift, torch.ones(2, 1, 16)))
    got = _grads(out, grad, x, scale, shift, norm.norm.weight)

    w = norm.norm.weight
    ref_out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w * (1 + scale) + shift
    ref = _grads(ref_out, grad, x, scale, shift, w)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_modulated_norm_backward_passes_gradcheck_in_fp64() -> None:
    norm = ModulatedNorm(6).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    factor, shift = (torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, f, s: norm(a, Modulation(f, s, f)), (x, factor, shift))


def test_swiglu_backward_matches_autograd_of_the_formula() -> None:
    g = torch.Generator().manual_seed(1)
    mlp = SwiGLU(8, 12)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 8, generator=g)
    params = (mlp.w12.weight, mlp.w12.bias, mlp.w3.weight)
    out = mlp(x)
    got = _grads(out, grad, x, *params)

    gate, up = F.linear(x, mlp.w12.weight, mlp.w12.bias).split(12, dim=-1)
    ref_out = F.linear(gate * torch.sigmoid(gate) * up, mlp.w3.weight, mlp.w3.bias)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(got, _grads(ref_out, grad, x, *params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _rotate_by_formula(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Spec §2: out[2j] = x[2j] cos - x[2j+1] sin; out[2j+1] = x[2j+1] cos + x[2j] sin."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def test_rope_qk_backward_matches_autograd_of_the_formula() -> None:
    g = torch.Generator().manual_seed(2)
    rope = AxialRoPE(8, 3)
    with torch.no_grad():
        rope.freqs.add_(torch.randn(rope.freqs.shape, generator=g) * 0.3)
    for shared in (True, False):  # one map broadcast over the batch (as text-to-image) or one per row (TREAD)
        base = torch.cat([position_map(2, 3), torch.zeros(2, 2)])  # (8, 2): 6 image + 2 text tokens
        pos = base.expand(2, -1, -1) if shared else base + 0.1 * torch.randn(2, 8, 2, generator=g)
        qkv = torch.randn(2, 8, 3, 3, 8, generator=g, requires_grad=True)  # (B, L, q/k/v, H, Dh) as the layer
        q, k = qkv[:, :5, 0], qkv[:, :, 1]  # only the first 5 tokens query, as the last block does
        grad_q, grad_k = torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 8, 3, 8, generator=g)

        out_q, out_k = rope.rotate_qk(q, k, pos)
        got = torch.autograd.grad((out_q, out_k), (qkv, rope.freqs), (grad_q, grad_k))

        # (B, L, H, Dh/2); pair j: axis j % 2, frequency j // 2
        theta = torch.stack(
            [pos[:, :, None, j % 2] * rope.freqs[:, j // 2, j % 2].exp() for j in range(4)], -1
        )
        ref_q, ref_k = _rotate_by_formula(q, theta[:, :5]), _rotate_by_formula(k, theta)
        ref = torch.autograd.grad((ref_q, ref_k), (qkv, rope.freqs), (grad_q, grad_k))
        torch.testing.assert_close(out_q, ref_q)
        torch.testing.assert_close(out_k, ref_k)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_last_block_rows_match_the_full_block_sliced() -> None:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    block = TransformerBlock(16, 2, 8, 24)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    mods = BlockModulations(
        *(Modulation(*(torch.randn(2, 1, 16, generator=g) for _ in range(3))) for _ in range(3))
    )
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    pos = torch.cat([position_map(2, 3), torch.zeros(3, 2)]).expand(2, -1, -1)
    grad = torch.randn(2, 6, 16, generator=g)
    params = [x, *block.parameters()]

    pruned = block(x, pos, mods, out_rows=6)
    full = block(x, pos, mods)[:, :6]
    assert pruned.shape == (2, 6, 16)
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(pruned, grad, *params), _grads(full, grad, *params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
