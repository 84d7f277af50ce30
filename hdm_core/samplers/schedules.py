"""Where the steps go in t (1 = noise, 0 = data): the schedules a request names (hdm_core.config.ScheduleName).

- uniform: steps + 1 evenly spaced times, the reference's schedule.
- karras: Karras et al. 2022 (EDM, eq. 5) rho = 7 spacing of sigma = t / (1 - t), the noise-to-signal ratio a
  flow x_t / (1 - t) = x0 + sigma·eps carries; sigma from 80 down to 0.002 as in EDM, with t = 1 and 0 as the ends
  (diffusers maps Karras sigmas to flow sigmas the same way, sigma / (1 + sigma)).
- sd3: uniform warped by SD3's shift 3 (Esser et al. 2024, t' = 3t / (1 + 2t)): more steps at high noise, where a
  flat image's composition (and the guidance's bend of the path) is decided.
- tuned: a spacing found by search on a model's training prompts, as Align Your Steps does (Sabour et al. 2024):
  `TUNED_KNOTS` are the TUNED_STEPS + 1 times that `bench/schedule_search.py` found best for UniPC at that many
  steps on the demo model; any other step count reads them off piecewise-linearly at k / steps (AYS interpolates its
  tuned schedules to other step counts the same way, in log sigma; t is used here because its ends, 1 and 0, are
  finite). docs/service.md "Samplers" has the search and what it measured.
- Every schedule is then warped by `shift` (SD3's t' = s·t / (1 + (s - 1)·t)); shift > 1 moves steps to high noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch
from torch import Tensor

from ..config import ScheduleName

KARRAS_RHO = 7.0
TUNED_KNOTS = (1.0, 0.9203, 0.7939, 0.625, 0.4688, 0.292, 0.1596, 0.0596, 0.0)
TUNED_STEPS = len(TUNED_KNOTS) - 1
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX = 0.002, 80.0
SD3_SHIFT = 3.0


def _shifted(t: Tensor, shift: float) -> Tensor:
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _karras(steps: int) -> Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = KARRAS_SIGMA_MIN ** (1 / KARRAS_RHO), KARRAS_SIGMA_MAX ** (1 / KARRAS_RHO)
    sigma = (hi + ramp * (lo - hi)) ** KARRAS_RHO
    t = sigma / (1 + sigma)
    t[0] = 1.0
    return torch.cat([t, t.new_zeros(1)])


def _tuned(steps: int) -> Tensor:
    knots = torch.tensor(TUNED_KNOTS, dtype=torch.float64)
    pos = torch.linspace(0, TUNED_STEPS, steps + 1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=TUNED_STEPS - 1)
    frac = pos - lo
    return knots[lo] + frac * (knots[lo + 1] - knots[lo])


def explicit_timesteps(sigmas: Sequence[float]) -> Tensor:
    """Given times (diffusers pipelines' `sigmas`), checked: from 1 down to 0, strictly decreasing."""
    t = torch.tensor(list(sigmas), dtype=torch.float64)
    if t.ndim != 1 or len(t) < 2 or t[0] != 1.0 or t[-1] != 0.0 or bool((t[1:] >= t[:-1]).any()):
        raise ValueError(f"sigmas must run strictly down from 1 to 0, got {list(sigmas)}")
    return t.to(torch.float32)


def timesteps(
    steps: int,
    *,
    shift: float = 1.0,
    schedule: ScheduleName = "uniform",
    device: torch.device | str | None = None,
) -> Tensor:
    """steps + 1 times from 1 to 0 (strictly decreasing), spaced by `schedule`, then warped by `shift`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if schedule == "uniform":
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    elif schedule == "karras":
        t = _karras(steps)
    elif schedule == "tuned":
        t = _tuned(steps)
    elif schedule == "sd3":
        t = _shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), SD3_SHIFT)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(get_args(ScheduleName))}")
    return _shifted(t, shift).to(device=device, dtype=torch.float32)
