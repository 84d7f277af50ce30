"""Jobs batched across requests equal the same jobs run alone; a cancelled job leaves the batch (pipeline level)."""

from __future__ import annotations

import pytest
import torch

from hdm_core.batching import ImageJob
from hdm_core.pipeline import HDMPipeline, TreadGuidance

# The toy tokenizer gives jobs 0 and 1 equal prompt and negative lengths (one sub-batch); 2 and 3 differ.
JOBS = [
    ImageJob("a red circle", seed=11, negative_prompt="noisy", n=2),
    ImageJob("a big square", seed=500, negative_prompt="ugly photo"),
    ImageJob(["a blue square", "a red square"], seed=7, n=1),
    ImageJob("a green circle on grey", seed=3, negative_prompt="blurry photo, ugly", n=1),
]


@pytest.fixture(scope="module")
def pipe(pixel_checkpoint, toy_text_encoder):
    return HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder)


def _network_batches(pipe: HDMPipeline) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = pipe.model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize("tread", [TreadGuidance(), TreadGuidance(cond_rate=0.0, uncond_rate=0.5)])
def test_batched_jobs_equal_the_jobs_run_alone(pipe, tread):
    kw = dict(width=32, height=16, steps=3, guidance_scale=2.5, tread=tread)
    sizes, handle = _network_batches(pipe)
    try:
        batched = pipe.generate_batch(JOBS, **kw)
    finally:
        handle.remove()
    # Some network pass really carried rows of several jobs (else this test proves nothing about batching).
    assert max(sizes) > max(len(j.seeds) for j in JOBS)
    for job, got in zip(JOBS, batched, strict=True):
        alone = pipe.generate(job.prompt, negative_prompt=job.negative_prompt, n=job.n, seed=job.seed, **kw)
        assert got is not None and got.seeds == alone.seeds == job.seeds
        assert len(got.images) == len(job.seeds)
        torch.testing.assert_close(got.latents, alone.latents, atol=1e-5, rtol=0)
    assert (batched[0].latents[0] - batched[0].latents[1]).abs().max() > 1e-2  # seeds matter


def test_cancelling_one_job_drops_its_rows_and_keeps_the_others(pipe):
    kw = dict(width=16, height=16, steps=4, guidance_scale=2.0)
    calls: list[tuple[int, int, list[int]]] = []

    def callback(step: int, total: int, active):
        calls.append((step, total, list(active)))
        return {1} if step == 2 else None

    sizes, handle = _network_batches(pipe)
    jobs = [
        ImageJob("a red circle", seed=1),
        ImageJob("a big square", seed=2),
        ImageJob("a blue square", seed=3),
    ]
    try:
        out = pipe.generate_batch(jobs, callback=callback, **kw)
    finally:
        handle.remove()
    assert out[1] is None and out[0] is not None and out[2] is not None
    # Progress is per job: after the cancel, job 1 is no longer reported active.
    reported = {step: active for step, _, active in calls}
    assert 1 in reported[2] and all(1 not in reported[s] for s in reported if s > 2)
    assert all(total == 4 for _, total, _ in calls)
    assert min(sizes) < max(sizes)  # the network batch shrank after the cancel
    for j in (0, 2):
        alone = pipe.generate(jobs[j].prompt, seed=jobs[j].seed, **kw)
        torch.testing.assert_close(out[j].latents, alone.latents, atol=1e-5, rtol=0)


def test_job_validation():
    with pytest.raises(ValueError, match="n must be"):
        ImageJob("x", seed=0, n=0)
    with pytest.raises(ValueError, match="prompt"):
        ImageJob([], seed=0)
