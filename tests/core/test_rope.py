"""Axial RoPE against spec §2 written out element by element."""

from __future__ import annotations

import math

import torch

from hdm_core.rope import AxialRoPE


def test_rope_matches_the_spec_formula():
    heads, head_dim = 2, 8
    rope = AxialRoPE(head_dim, heads)
    with torch.no_grad():
        rope.freqs.copy_(torch.randn_like(rope.freqs) * 0.3)
    x = torch.randn(1, 3, heads, head_dim)
    pos = torch.randn(1, 3, 2)
    out = rope(x, pos)
    expected = torch.empty_like(x)
    for l in range(3):  # noqa: E741
        for h in range(heads):
            for j in range(head_dim // 2):
                k, a = j // 2, j % 2  # pairs alternate y (a=0), x (a=1)
                angle = pos[0, l, a].item() * math.exp(rope.freqs[h, k, a].item())
                c, s = math.cos(angle), math.sin(angle)
                x0, x1 = x[0, l, h, 2 * j].item(), x[0, l, h, 2 * j + 1].item()
                expected[0, l, h, 2 * j] = x0 * c - x1 * s
                expected[0, l, h, 2 * j + 1] = x1 * c + x0 * s
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_text_position_origin_is_identity_and_init_range():
    rope = AxialRoPE(16, 3)
    x = torch.randn(2, 4, 3, 16)
    torch.testing.assert_close(rope(x, torch.zeros(2, 4, 2)), x)
    freqs = rope.freqs.exp()
    torch.testing.assert_close(
        freqs[0, :, 0], torch.linspace(math.log(math.pi), math.log(5 * math.pi), 4).exp()
    )
    assert torch.equal(rope.freqs[0], rope.freqs[2])  # same init for every head and axis


def test_bf16_activations_keep_dtype():
    rope = AxialRoPE(8, 2)
    x = torch.randn(1, 2, 2, 8, dtype=torch.bfloat16)
    assert rope(x, torch.randn(1, 2, 2)).dtype == torch.bfloat16
