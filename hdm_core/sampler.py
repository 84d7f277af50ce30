"""ODE samplers for the velocity field and classifier-free / TREAD guidance (spec §8, §3).

Every sampler has one signature: `sampler(velocity, x, ts, *, callback=None) -> x0`, where `velocity(x, t)` maps
x [B, ...] and t [B] to v [B, ...], and ts runs from 1 (noise) to 0 (data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import SamplerName

VelocityFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int], None]


class SamplingCancelled(RuntimeError):
    """Raised from a step callback to stop sampling cooperatively."""


def timesteps(steps: int, *, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """steps + 1 times from 1 to 0, uniform (the reference) or warped by t' = s t / (1 + (s - 1) t) (SD3 shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t.to(device=device, dtype=torch.float32)


def _t(x: Tensor, value: Tensor) -> Tensor:
    return value.to(x.device).expand(x.shape[0])


@torch.no_grad()
def euler(velocity: VelocityFn, x: Tensor, ts: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """First-order: x <- x + (t_next - t) v. With uniform ts this is the reference's x - dt * v."""
    total = len(ts) - 1
    for i in range(total):
        t, t_next = ts[i], ts[i + 1]
        x = x + (t_next - t).to(x.dtype) * velocity(x, _t(x, t)).to(x.dtype)
        if callback is not None:
            callback(i + 1, total)
    return x


@torch.no_grad()
def heun(velocity: VelocityFn, x: Tensor, ts: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Second-order Heun (trapezoidal) steps; the step into t = 0 is Euler, as in k-diffusion."""
    total = len(ts) - 1
    for i in range(total):
        t, t_next = ts[i], ts[i + 1]
        dt = (t_next - t).to(x.dtype)
        v = velocity(x, _t(x, t)).to(x.dtype)
        x_euler = x + dt * v
        if float(t_next) > 0:
            v_next = velocity(x_euler, _t(x, t_next)).to(x.dtype)
            x = x + dt * (v + v_next) / 2
        else:
            x = x_euler
        if callback is not None:
            callback(i + 1, total)
    return x


# The names are hdm_core.config.SAMPLER_NAMES (the API validates requests with them, without torch).
SAMPLERS: dict[SamplerName, Callable[..., Tensor]] = {"euler": euler, "heun": heun}


def model_evaluations(sampler: str, steps: int) -> int:
    """Velocity evaluations per image for a sampler (each may be one or two network passes with CFG)."""
    return steps if sampler == "euler" else 2 * steps - 1


@dataclass(frozen=True)
class Conditioning:
    """What the network is conditioned on for one branch of guidance. ctx [B, T, ctx_dim], pos_map [B, H*W, 2]."""

    ctx: Tensor | None
    pos_map: Tensor | None = None
    addon_info: Tensor | None = None
    tread_rate: float = 0.0
    route_generators: Sequence[torch.Generator] | None = None


def _call(model: nn.Module, x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
    return model(
        x,
        t,
        c.ctx,
        pos_map=c.pos_map,
        addon_info=c.addon_info,
        tread_rate=c.tread_rate or None,
        route_generators=c.route_generators,
    )


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def can_batch(cond: Conditioning, uncond: Conditioning) -> bool:
    """One batched pass equals two separate passes only if nothing differs in shape or routing."""
    if cond.ctx is None or uncond.ctx is None or cond.ctx.shape != uncond.ctx.shape:
        return False
    if (cond.pos_map is None) != (uncond.pos_map is None) or (cond.addon_info is None) != (
        uncond.addon_info is None
    ):
        return False
    return cond.tread_rate == 0 and uncond.tread_rate == 0


def guided_velocity(
    model: nn.Module, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float
) -> VelocityFn:
    """v = v_u + s (v_c - v_u) (spec §8). s = 1 (or no uncond) is a single conditional pass per step.

    TREAD autoguidance (spec §3) is the same formula with the uncond branch routed at a higher rate.
    """
    if uncond is None or guidance_scale == 1.0:
        return lambda x, t: _call(model, x, t, cond)
    if can_batch(cond, uncond):
        both = Conditioning(
            torch.cat([cond.ctx, uncond.ctx]),
            _cat(cond.pos_map, uncond.pos_map),
            _cat(cond.addon_info, uncond.addon_info),
        )

        def batched(x: Tensor, t: Tensor) -> Tensor:
            v_c, v_u = _call(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return v_u + guidance_scale * (v_c - v_u)

        return batched

    def two_pass(x: Tensor, t: Tensor) -> Tensor:
        v_c = _call(model, x, t, cond)
        v_u = _call(model, x, t, uncond)
        return v_u + guidance_scale * (v_c - v_u)

    return two_pass
