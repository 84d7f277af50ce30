"""A model's own `tuned` schedule: the times at which one sampler, at one step count, lands closest to the exact
solution of the model's guided ODE on a set of prompts (`hdm tune-schedule`; `python -m bench.samplers` runs it on
the demo's training prompts).

The idea is Align Your Steps' (Sabour et al. 2024): choose the steps for the model instead of a formula. The
objective is the RMS distance of the final latents to a many-step Euler solution of the same guided ODE from the
same noise, averaged over the prompts x seeds. The interior times move in logit space, one at a time, by +-delta
(kept strictly between their neighbours); a move is kept when it lowers the objective; delta halves when a full
pass keeps nothing, from 0.5 down to `min_delta`. The start is the uniform schedule. Each evaluation is one
`steps`-step batch, so the search costs about (steps - 1) x 2 x 4 such batches at the default `min_delta`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .schedules import TunedSchedule

if TYPE_CHECKING:  # the pipeline (and its batching) sample for the search; this module only drives them
    from ..batching import ImageJob
    from ..pipeline import HDMPipeline

log = logging.getLogger(__name__)
REFERENCE_STEPS = 400
DEFAULT_MIN_DELTA = 0.06


@dataclass(frozen=True)
class SearchResult:
    knots: tuple[float, ...]  # steps + 1 times from 1 to 0
    distance: float  # the objective at `knots`
    uniform_distance: float  # the objective at the uniform start
    evaluations: int
    history: tuple[dict, ...]  # every kept move: knots, distance, delta


def _logit(t: float) -> float:
    return math.log(t / (1 - t))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def search_knots(
    objective: Callable[[list[float]], float], steps: int, *, min_delta: float = DEFAULT_MIN_DELTA
) -> SearchResult:
    """Coordinate search over the interior times (see the module docstring). `objective(knots)`: lower is better."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 to have a time to move, got {steps}")
    if not 0 < min_delta <= 0.5:
        raise ValueError(f"min_delta must be in (0, 0.5], got {min_delta}")
    z = [_logit(1 - i / steps) for i in range(1, steps)]  # uniform start, interior times only

    def knots(zs: list[float]) -> list[float]:
        return [1.0, *(_sigmoid(v) for v in zs), 0.0]

    best = uniform = objective(knots(z))
    evaluations = 1
    history = [{"knots": knots(z), "distance": best}]
    delta = 0.5
    while delta >= min_delta:
        improved = False
        for i in range(len(z)):
            for sign in (1.0, -1.0):
                trial = list(z)
                trial[i] += sign * delta
                if (i > 0 and trial[i] >= trial[i - 1]) or (i + 1 < len(z) and trial[i] <= trial[i + 1]):
                    continue  # times must stay strictly decreasing
                d = objective(knots(trial))
                evaluations += 1
                if d < best:
                    z, best, improved = trial, d, True
                    history.append({"knots": knots(z), "distance": best, "delta": delta})
                    log.info("distance %.5f  knots %s", best, [round(k, 4) for k in knots(z)])
                    break
        if not improved:
            delta /= 2
    return SearchResult(tuple(knots(z)), best, uniform, evaluations, tuple(history))


def final_latents(pipe: HDMPipeline, jobs: Sequence[ImageJob], **generate) -> Tensor:
    """Every job's final latents in one batch, [N, C, h, w] fp32 (`generate`: HDMPipeline.generate_batch's)."""
    results = pipe.generate_batch(jobs, decode=False, **generate)
    return torch.cat([r.latents.float() for r in results if r is not None])


def reference_latents(
    pipe: HDMPipeline, jobs: Sequence[ImageJob], *, steps: int = REFERENCE_STEPS, **generate
) -> Tensor:
    """The exact solution the search aims at: a `steps`-step Euler solution of the same guided ODE, uniform times."""
    return final_latents(pipe, jobs, steps=steps, sampler="euler", schedule="uniform", **generate)


def rms_distance(a: Tensor, b: Tensor) -> float:
    """RMS over each image's elements, averaged over images."""
    return (a - b).square().flatten(1).mean(dim=1).sqrt().mean().item()


def tune_knots(
    pipe: HDMPipeline,
    jobs: Sequence[ImageJob],
    reference: Tensor,
    *,
    sampler: str,
    steps: int,
    min_delta: float = DEFAULT_MIN_DELTA,
    **generate,
) -> SearchResult:
    """The knots at which `sampler` in `steps` steps comes closest to `reference` (from `reference_latents` with the
    same jobs and `generate` settings: width, height, guidance_scale, ...)."""

    def objective(knots: list[float]) -> float:
        return rms_distance(final_latents(pipe, jobs, sampler=sampler, sigmas=knots, **generate), reference)

    return search_knots(objective, steps, min_delta=min_delta)


def tune_schedule(
    pipe: HDMPipeline,
    jobs: Sequence[ImageJob],
    reference: Tensor,
    *,
    samplers: Sequence[str],
    steps: int,
    min_delta: float = DEFAULT_MIN_DELTA,
    **generate,
) -> TunedSchedule:
    """One set of knots per sampler (`tune_knots` each), with what each search found in the meta."""
    knots, found = {}, {}
    for sampler in samplers:
        res = tune_knots(pipe, jobs, reference, sampler=sampler, steps=steps, min_delta=min_delta, **generate)
        knots[sampler] = res.knots
        found[sampler] = {
            "distance": res.distance,
            "uniform_distance": res.uniform_distance,
            "evaluations": res.evaluations,
        }
        log.info(
            "%s at %d steps: uniform %.5f -> tuned %.5f", sampler, steps, res.uniform_distance, res.distance
        )
    meta = {"steps": steps, "images": len(reference), "min_delta": min_delta, "found": found}
    return TunedSchedule(
        knots, meta | {k: v for k, v in generate.items() if isinstance(v, int | float | str)}
    )
