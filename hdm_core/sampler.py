"""The samplers' one signature and registry, and classifier-free / TREAD guidance (spec §8, §3).

Every sampler is a registry entry (`Sampler`) with one signature:
`sampler(velocity, x, ts, *, callback=None, project=None, generators=None) -> x0`, where `velocity(x, t)` maps
x [B, ...] and t [B] to v [B, ...], and ts runs from its first time (1 = noise, or lower when starting from a noised
image) to 0 (data). `project(x, t)`, if given, replaces the state after every step that ends at time t (inpainting
keeps the unmasked region on the original image's path; hdm_core.edit). `generators` (one per row) feed the
samplers that draw noise while stepping. `sampler.start(ts, generators)` gives the same integration as a stepper,
one call per step (hdm_core.samplers.stepper), which is how a batch drops rows between steps (hdm_core.batching).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import SAMPLER_INFO, SamplerInfo, SamplerName, ScheduleName
from .samplers import solvers
from .samplers.native import EulerStepper, HeunStepper
from .samplers.schedules import timesteps
from .samplers.stepper import (
    ProjectFn,
    SamplingCancelled,
    StepCallback,
    Stepper,
    VelocityFn,
    run,
)

__all__ = [
    "SAMPLERS",
    "Conditioning",
    "ProjectFn",
    "Sampler",
    "SamplingCancelled",
    "StepCallback",
    "Stepper",
    "VelocityFn",
    "can_batch",
    "euler",
    "guided_velocity",
    "heun",
    "model_evaluations",
    "timesteps",
]

StartFn = Callable[[Tensor, Sequence[torch.Generator] | None], Stepper]


@dataclass(frozen=True)
class Sampler:
    """A registry entry: how to start a stepper for one batch on the times ts."""

    name: SamplerName
    start: StartFn
    stochastic: bool = False  # draws noise while stepping, from the rows' own generators

    @property
    def info(self) -> SamplerInfo:
        return SAMPLER_INFO[self.name]

    @property
    def default_schedule(self) -> ScheduleName:
        return self.info.default_schedule

    @torch.no_grad()
    def __call__(
        self,
        velocity: VelocityFn,
        x: Tensor,
        ts: Tensor,
        *,
        callback: StepCallback | None = None,
        project: ProjectFn | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        return run(self.start(ts, generators), velocity, x, callback=callback, project=project)


def _scheduler(factory: Callable[[], object], *, noisy: bool = False) -> StartFn:
    return lambda ts, gens: solvers.SchedulerStepper(factory(), ts, gens, noisy=noisy)  # type: ignore[arg-type]


_ENTRIES = (
    Sampler("euler", EulerStepper),
    Sampler("heun", HeunStepper),
    Sampler("dpmpp_2m", _scheduler(solvers.dpmpp_2m)),
    Sampler("dpmpp_3m", _scheduler(solvers.dpmpp_3m)),
    Sampler("dpmpp_2m_sde", _scheduler(solvers.dpmpp_2m_sde, noisy=True), stochastic=True),
    Sampler("unipc", _scheduler(solvers.unipc)),
    Sampler("euler_a", _scheduler(solvers.euler_ancestral, noisy=True), stochastic=True),
)
# The names are hdm_core.config.SAMPLER_NAMES (the API validates requests with them, without torch).
SAMPLERS: dict[SamplerName, Sampler] = {s.name: s for s in _ENTRIES}
euler, heun = SAMPLERS["euler"], SAMPLERS["heun"]


def model_evaluations(sampler: str, steps: int) -> int:
    """Velocity evaluations per image for a sampler (each may be one or two network passes with CFG)."""
    return SAMPLER_INFO[sampler].evaluations(steps)


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
    return SAMPLERS[name]  # type: ignore[index]


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
