"""Where the steps go in t (1 = noise, 0 = data): the schedules a request names (hdm_core.config.ScheduleName).

- uniform: steps + 1 evenly spaced times, the reference's schedule.
- karras: Karras et al. 2022 (EDM, eq. 5) rho = 7 spacing of sigma = t / (1 - t), the noise-to-signal ratio a
  flow x_t / (1 - t) = x0 + sigma·eps carries; sigma from 80 down to 0.002 as in EDM, with t = 1 and 0 as the ends
  (diffusers maps Karras sigmas to flow sigmas the same way, sigma / (1 + sigma)).
- sd3: uniform warped by SD3's shift 3 (Esser et al. 2024, t' = 3t / (1 + 2t)): more steps at high noise, where a
  flat image's composition (and the guidance's bend of the path) is decided.
- tuned: a spacing found by search on a model's training prompts, as Align Your Steps does (Sabour et al. 2024).
  A model's own knots, when `hdm tune-schedule` (hdm_core.samplers.tuning) has written them next to its checkpoint
  (`schedule_file`), else `TUNED_KNOTS`: the TUNED_STEPS + 1 times the same search found best for UniPC at that many
  steps on the first demo model. Any other step count reads the knots off piecewise-linearly at k / steps (AYS
  interpolates its tuned schedules to other step counts the same way, in log sigma; t is used here because its
  ends, 1 and 0, are finite). docs/service.md "Samplers" has the search and what it measured.
- Every schedule is then warped by `shift` (SD3's t' = s·t / (1 + (s - 1)·t)); shift > 1 moves steps to high noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from torch import Tensor

from ..config import ScheduleName
from ..files import atomic_write_text

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


def _tuned(steps: int, knots: Sequence[float]) -> Tensor:
    k = torch.tensor(list(knots), dtype=torch.float64)
    n = len(k) - 1
    pos = torch.linspace(0, n, steps + 1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=n - 1)
    frac = pos - lo
    return k[lo] + frac * (k[lo + 1] - k[lo])


def _check_times(sigmas: Sequence[float], what: str) -> Tensor:
    t = torch.tensor(list(sigmas), dtype=torch.float64)
    if t.ndim != 1 or len(t) < 2 or t[0] != 1.0 or t[-1] != 0.0 or bool((t[1:] >= t[:-1]).any()):
        raise ValueError(f"{what} must run strictly down from 1 to 0, got {list(sigmas)}")
    return t


def explicit_timesteps(sigmas: Sequence[float]) -> Tensor:
    """Given times (diffusers pipelines' `sigmas`), checked: from 1 down to 0, strictly decreasing."""
    return _check_times(sigmas, "sigmas").to(torch.float32)


SCHEDULE_FORMAT = "hdm-tuned-schedule/1"


def schedule_file(checkpoint: str | Path) -> Path:
    """Where a checkpoint's own tuned schedule lives: `<stem>.schedule.json` beside a file, `schedule.json` inside a
    diffusers-style folder (as diffusers keeps a model's scheduler config beside its weights). A sidecar, not the
    checkpoint's metadata, so tuning never changes the checkpoint's bytes (its sha256 names it to adapters and the
    registry)."""
    path = Path(checkpoint)
    return path / "schedule.json" if path.is_dir() else path.with_name(path.stem + ".schedule.json")


@dataclass(frozen=True)
class TunedSchedule:
    """A model's `tuned` knots, one set per sampler searched (each from 1 down to 0), and how they were found."""

    knots: dict[str, tuple[float, ...]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.knots:
            raise ValueError("a tuned schedule needs knots for at least one sampler")
        for sampler, ks in self.knots.items():
            _check_times(ks, f"tuned knots of {sampler!r}")

    def for_sampler(self, sampler: str) -> tuple[float, ...]:
        """The sampler's own knots, else those of the sampler searched first (a spacing good for one solver of the
        ODE is a fair start for another: docs/service.md "Samplers")."""
        return self.knots.get(sampler) or next(iter(self.knots.values()))

    def to_json(self) -> str:
        body = {
            "format": SCHEDULE_FORMAT,
            "knots": {k: list(v) for k, v in self.knots.items()},
            "meta": self.meta,
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "schedule") -> TunedSchedule:
        try:
            body = json.loads(text)
            if body.get("format") != SCHEDULE_FORMAT:
                raise ValueError(f"format must be {SCHEDULE_FORMAT!r}, got {body.get('format')!r}")
            knots = {str(k): tuple(float(t) for t in v) for k, v in body["knots"].items()}
            return cls(knots, dict(body.get("meta") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source}: not a tuned schedule: {exc}") from None


def own_knots(tuned: TunedSchedule | None, sampler: str) -> tuple[float, ...] | None:
    """`timesteps`' tuned_knots for `sampler` on a model with `tuned` (None: it has none, the shipped knots apply)."""
    return None if tuned is None else tuned.for_sampler(sampler)


def load_schedule_file(path: Path) -> TunedSchedule | None:
    """The tuned schedule in `path`, or None when there is no such file (ValueError names a malformed one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return TunedSchedule.from_json(text, source=str(path))


def write_tuned_schedule(checkpoint: str | Path, schedule: TunedSchedule) -> Path:
    """Write `schedule` as the checkpoint's own (`schedule_file`), atomically: a reader sees the old or the new."""
    path = schedule_file(checkpoint)
    atomic_write_text(path, schedule.to_json())
    return path


def read_tuned_schedule(checkpoint: str | Path) -> TunedSchedule | None:
    """The checkpoint's own tuned schedule (`schedule_file`), or None when it has none."""
    return load_schedule_file(schedule_file(checkpoint))


def timesteps(
    steps: int,
    *,
    shift: float = 1.0,
    schedule: ScheduleName = "uniform",
    tuned_knots: Sequence[float] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """steps + 1 times from 1 to 0 (strictly decreasing), spaced by `schedule`, then warped by `shift`.
    `tuned_knots`: the model's own knots for `tuned` (TunedSchedule.for_sampler); None = TUNED_KNOTS."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if schedule == "uniform":
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    elif schedule == "karras":
        t = _karras(steps)
    elif schedule == "tuned":
        t = _tuned(steps, TUNED_KNOTS if tuned_knots is None else tuned_knots)
    elif schedule == "sd3":
        t = _shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), SD3_SHIFT)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(get_args(ScheduleName))}")
    return _shifted(t, shift).to(device=device, dtype=torch.float32)
