"""Several image jobs as one network batch: their rows, and dropping a cancelled job's rows mid-sampling."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .config import check_seed
from .sampler import Conditioning, ProjectFn, Sampler, guided_velocity

if TYPE_CHECKING:
    from .edit import EditSpec

BatchCallback = Callable[[int, int, Sequence[int]], Collection[int] | None]
"""(step, total, indices of the jobs still sampling) -> indices of jobs to cancel now, or None."""


@dataclass(frozen=True)
class ImageJob:
    """What may differ between the jobs of one batch. Image i of the job uses seed + i."""

    prompt: str | Sequence[str]
    seed: int
    negative_prompt: str = ""
    n: int = 1
    edit: EditSpec | None = None  # image-to-image / inpainting (hdm_core.edit); such a job samples alone

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.prompts:
            raise ValueError("a job needs at least one prompt")
        check_seed(self.seed, len(self.prompts) * self.n)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(len(self.prompts) * self.n)]


def _take(c: Conditioning | None, rows: Tensor, keep: list[int]) -> Conditioning | None:
    if c is None:
        return None

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[rows.to(t.device)]

    gens = None if c.route_generators is None else [c.route_generators[i] for i in keep]
    return Conditioning(pick(c.ctx), pick(c.pos_map), pick(c.addon_info), c.tread_rate, gens)


@torch.no_grad()
def sample_rows(
    model: nn.Module,
    noise: Tensor,
    rows_job: list[int],
    cond: Conditioning,
    uncond: Conditioning | None,
    ts: Tensor,
    *,
    guidance_scale: float,
    sampler: Sampler,
    callback: BatchCallback | None = None,
    project: ProjectFn | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[Tensor, list[int]]:
    """Integrate noise [B, C, h, w] (row r belongs to job rows_job[r]) one step at a time, so rows of cancelled jobs
    can leave between steps. Returns the latents of the remaining rows and their job indices.

    The sampler's stepper holds the batch's state (a multistep solver's history, a stochastic one's generators,
    `generators` one per row); leaving rows leave it too (`Stepper.take`), so the rows that stay step exactly as
    if the others had never been there. `project` (inpainting) runs after every step; it belongs to a batch of one
    job, so rows never leave it while it is still sampling. The ODE state stays fp32; the network runs in its dtype.
    """
    dtype = next(model.parameters()).dtype
    x = noise.float()
    stepper = sampler.start(ts, generators)
    total = stepper.total
    velocity = guided_velocity(model, cond, uncond, guidance_scale)
    for i in range(total):
        x = stepper.step(lambda x, t, v=velocity: v(x.to(dtype), t).float(), x)
        if project is not None:
            x = project(x, ts[i + 1])
        if callback is None:
            continue
        active = list(dict.fromkeys(rows_job))
        cancel = set(callback(i + 1, total, active) or ())
        if cancel & set(active):
            keep = [r for r, j in enumerate(rows_job) if j not in cancel]
            idx = torch.tensor(keep, dtype=torch.long)
            x, rows_job = x[idx.to(x.device)], [rows_job[r] for r in keep]
            if not keep:
                break
            stepper.take(idx)
            cond, uncond = _take(cond, idx, keep), _take(uncond, idx, keep)
            velocity = guided_velocity(model, cond, uncond, guidance_scale)
    return x, rows_job
