"""Multistep and stochastic solvers of the flow ODE through diffusers' schedulers (the solver maths is theirs).

Mapping onto diffusers: this project's flow is x_t = t·eps + (1 - t)·x0 with t = 1 noise (hdm_core.flow), which is
diffusers' flow-matching convention with sigma = t; the network's velocity v = eps - x0 is their
`prediction_type="flow_prediction"` (x0 = x_t - sigma·v). Every scheduler gets this project's schedule as its sigmas,
so all samplers step on the same times (`schedules.timesteps`), image-to-image's shortened schedule included.

A scheduler holds the state of one batch (its model-output history), so each batch gets its own, and rows leaving
the batch are dropped from that history too (`SchedulerStepper.take`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    LTXEulerAncestralRFScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from torch import Tensor

from .stepper import Stepper, VelocityFn, batch_times

# Log-SNR is -inf at sigma = 1, which the multistep formulas divide by; UniPC's own flow schedule nudges its first
# sigma by the same amount (diffusers UniPCMultistepScheduler.set_timesteps).
FIRST_SIGMA_EPS = 1e-6
TRAIN_TIMESTEPS = 1000  # diffusers' timestep = sigma * num_train_timesteps; only its sigmas matter here
# These schedulers' per-row history: DPM-Solver's and UniPC's converted model outputs, UniPC's previous sample.
ROW_STATE = ("model_outputs", "last_sample")


class SchedulerStepper(Stepper):
    """One diffusers scheduler stepping on `ts`; `noisy` schedulers draw from the rows' own generators."""

    def __init__(
        self,
        scheduler: SchedulerMixin,
        ts: Tensor,
        generators: Sequence[torch.Generator] | None = None,
        *,
        noisy: bool = False,
    ) -> None:
        super().__init__(ts, generators)
        if noisy and generators is None:
            raise ValueError("a stochastic sampler needs one generator per image (its own noise stream)")
        sigmas = ts.detach().to("cpu", torch.float64).clone()
        if sigmas[0] > 1 - FIRST_SIGMA_EPS:
            sigmas[0] = 1 - FIRST_SIGMA_EPS
        self.sigmas = sigmas.to(torch.float32)
        self.scheduler = scheduler
        self.noisy = noisy
        self._ready = False

    def _set_up(self, device: torch.device) -> None:
        """The scheduler's history for this many steps, then this schedule as its sigmas (on the first step, when
        the state's device is known: the Euler ancestral scheduler broadcasts its sigmas as tensors)."""
        scheduler, steps = self.scheduler, self.total
        if isinstance(scheduler, LTXEulerAncestralRFScheduler):
            scheduler.set_timesteps(
                sigmas=self.sigmas, device=device
            )  # its explicit-sigmas path, terminal 0 included
        else:
            scheduler.set_timesteps(num_inference_steps=steps)
            scheduler.sigmas = self.sigmas.clone()  # diffusers keeps these on the CPU
            scheduler.timesteps = self.sigmas[:-1] * TRAIN_TIMESTEPS
            scheduler.num_inference_steps = steps
        scheduler.set_begin_index(0)
        self._ready = True

    def _step(self, velocity: VelocityFn, x: Tensor, i: int) -> Tensor:
        if not self._ready:
            self._set_up(x.device)
        v = velocity(x, batch_times(x, self.sigmas[i])).to(x.dtype)
        extra = {"generator": self.generators} if self.noisy else {}
        return self.scheduler.step(v, self.scheduler.timesteps[i], x, return_dict=False, **extra)[0]

    def take(self, rows: Tensor) -> None:
        super().take(rows)
        for name in ROW_STATE:
            value = getattr(self.scheduler, name, None)
            if isinstance(value, Tensor):
                setattr(self.scheduler, name, value[rows.to(value.device)])
            elif isinstance(value, list):
                setattr(
                    self.scheduler,
                    name,
                    [v[rows.to(v.device)] if isinstance(v, Tensor) else v for v in value],
                )


def _flow(cls: type[SchedulerMixin], **config: object) -> Callable[[], SchedulerMixin]:
    """A factory of fresh schedulers (one per batch) for the flow-matching parameterisation."""
    return lambda: cls(
        num_train_timesteps=TRAIN_TIMESTEPS,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        final_sigmas_type="zero",
        **config,
    )


# DPM-Solver++ (Lu et al. 2022) in its multistep form; order 2 is the one recommended for guided sampling.
dpmpp_2m = _flow(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2)
dpmpp_3m = _flow(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=3)
# The SDE variant: the same multistep data prediction with fresh noise each step (the rows' generators).
dpmpp_2m_sde = _flow(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2)
# UniPC (Zhao et al. 2023): predictor + corrector, B(h) = expm1(h) ("bh2"), as Wan and SANA ship it.
unipc = _flow(UniPCMultistepScheduler, solver_type="bh2", solver_order=2)


def euler_ancestral() -> SchedulerMixin:
    """Euler ancestral for rectified flow (ComfyUI's sample_euler_ancestral_RF): each step goes below the next time
    and adds back fresh noise to reach it."""
    return LTXEulerAncestralRFScheduler(num_train_timesteps=TRAIN_TIMESTEPS, eta=1.0)
