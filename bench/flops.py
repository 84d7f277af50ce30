"""The one analytic FLOP model of an XUT forward pass (matmuls and attention; norms and activations ignored).

bench.gpu (TFLOP/s, % of peak) and bench.train (TREAD's theoretical step-time ratio, model TFLOP/s) use it."""

from __future__ import annotations

from hdm_core import XUTConfig
from hdm_core.tread import kept_image_tokens


def _block_flops(cfg: XUTConfig, tokens: int, *, cross: bool) -> int:
    d, m = cfg.dim, cfg.mlp_dim
    linear = 3 * d * d + d * d + 2 * d * m + m * d  # qkv, out, w12, w3
    attn = 2 * tokens * d  # QK^T and AV, per query token
    flops = 2 * tokens * (linear + attn)
    if cross:
        flops += 2 * tokens * (d * d + 2 * d * d + d * d + 2 * tokens * d)
    return flops


def xut_forward_flops(cfg: XUTConfig, image_tokens: int, text_tokens: int, tread_rate: float = 0.0) -> int:
    """FLOPs (multiply-add = 2) for a batch of one."""
    full = image_tokens + text_tokens
    routed = kept_image_tokens(image_tokens, tread_rate) + text_tokens if tread_rate > 0 else full
    total = (cfg.tread_pre + cfg.tread_post) * _block_flops(cfg, full, cross=False)
    total += cfg.depth * cfg.enc_blocks * _block_flops(cfg, routed, cross=False)
    total += cfg.depth * (
        _block_flops(cfg, routed, cross=True) + (cfg.dec_blocks - 1) * _block_flops(cfg, routed, cross=False)
    )
    p2c = cfg.patch_size**2 * cfg.in_channels
    total += 2 * image_tokens * p2c * cfg.dim * 2  # patch embed + head
    total += 2 * text_tokens * cfg.ctx_dim * cfg.dim
    return total
