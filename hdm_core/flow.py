"""Rectified-flow objective (spec §6): x_t = t*eps + (1-t)*x0, target v = eps - x0, logit-normal t, plain MSE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_t(
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """t = sigmoid(N(mean, std)), [B]; no resolution shift (the reference uses logit-normal(0, 1))."""
    gen_device = generator.device if generator is not None else device
    z = torch.randn(batch, generator=generator, device=gen_device) * std + mean
    return torch.sigmoid(z).to(device)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t for data x0 [B, ...], noise [B, ...], t [B]; t = 1 is pure noise."""
    tt = _per_sample(t, x0)
    return tt * noise + (1 - tt) * x0


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def flow_loss(
    model: nn.Module,
    x0: Tensor,
    ctx: Tensor | None,
    *,
    pos_map: Tensor | None = None,
    addon_info: Tensor | None = None,
    tread_rate: float | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    t: Tensor | None = None,
    route_generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Mean squared error between the predicted and the true velocity, averaged over every element.

    x0 [B, C, H, W] (normalised latents or [-1, 1] pixels); ctx [B, T, ctx_dim]; pos_map [B, H*W, 2].
    """
    b = x0.shape[0]
    if t is None:
        t = sample_t(b, generator=generator, device=x0.device)
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(device=x0.device, dtype=x0.dtype)
    x_t = interpolate(x0, noise, t)
    v = model(
        x_t,
        t,
        ctx,
        pos_map=pos_map,
        addon_info=addon_info,
        tread_rate=tread_rate,
        route_generators=route_generators,
    )
    loss = F.mse_loss(v.float(), velocity_target(x0, noise).float())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"flow loss is not finite ({loss.item()}); lower the lr or use bf16/fp32")
    return loss
