"""A sampler's state for one batch, advanced one step per call (docs/service.md "Samplers").

Multistep solvers carry a history of model outputs between steps, so a batch that loses rows between steps (a
cancelled job, `hdm_core.batching`) must drop the same rows from that history: `Stepper.take`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int], None]
ProjectFn = Callable[[Tensor, Tensor], Tensor]


class SamplingCancelled(RuntimeError):
    """Raised from a step callback to stop sampling cooperatively."""


def batch_times(x: Tensor, value: Tensor) -> Tensor:
    """A scalar time as the [B] tensor the velocity takes."""
    return value.to(x.device).expand(x.shape[0])


class Stepper(ABC):
    """Integrates from ts[0] to ts[-1] (t = 1 is noise, 0 data), step i going from ts[i] to ts[i + 1].

    `generators`: one per row, for the samplers that draw noise while stepping (each image its own stream, so image
    i alone equals image i in a batch)."""

    def __init__(self, ts: Tensor, generators: Sequence[torch.Generator] | None = None) -> None:
        if ts.ndim != 1 or len(ts) < 1:
            raise ValueError(f"ts must be a 1-d tensor of times, got shape {tuple(ts.shape)}")
        self.ts = ts
        self.generators = None if generators is None else list(generators)
        self.index = 0

    @property
    def total(self) -> int:
        return len(self.ts) - 1

    def step(self, velocity: VelocityFn, x: Tensor) -> Tensor:
        """x [B, ...] at ts[index] -> x at ts[index + 1]."""
        if self.index >= self.total:
            raise RuntimeError("the stepper has run every step of its schedule")
        out = self._step(velocity, x, self.index)
        self.index += 1
        return out

    @abstractmethod
    def _step(self, velocity: VelocityFn, x: Tensor, i: int) -> Tensor: ...

    def take(self, rows: Tensor) -> None:
        """Keep only these rows (a 1-d index into the batch) of every per-row state."""
        if self.generators is not None:
            self.generators = [self.generators[r] for r in rows.tolist()]


@torch.no_grad()
def run(
    stepper: Stepper,
    velocity: VelocityFn,
    x: Tensor,
    *,
    callback: StepCallback | None = None,
    project: ProjectFn | None = None,
) -> Tensor:
    """Every step of `stepper`; `project(x, t)` replaces the state after each step ending at t (inpainting),
    `callback(step, total)` follows it (raising SamplingCancelled stops sampling)."""
    total = stepper.total
    for i in range(total):
        x = stepper.step(velocity, x)
        if project is not None:
            x = project(x, stepper.ts[i + 1])
        if callback is not None:
            callback(i + 1, total)
    return x
