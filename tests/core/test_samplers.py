"""The multistep and stochastic samplers (diffusers' schedulers behind the one sampler signature), the schedules,
and that every sampler keeps what Euler guarantees: image i alone equals image i in a batch (TREAD guidance and
adapters too), batched jobs and a cancelled job's rows leaving, image-to-image at strength 0 and 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from hdm_core.adapters.apply import apply_adapters
from hdm_core.adapters.files import AdapterInfo, load_adapter, save_adapter
from hdm_core.adapters.network import AdapterConfig, attach
from hdm_core.batching import ImageJob
from hdm_core.config import SAMPLER_INFO, SAMPLER_NAMES, SCHEDULE_NAMES
from hdm_core.edit import EditSpec
from hdm_core.imagefile import parameters_text
from hdm_core.pipeline import HDMPipeline, TreadGuidance
from hdm_core.sampler import SAMPLERS, model_evaluations, timesteps

ALL = sorted(SAMPLERS)
STOCHASTIC = sorted(n for n, s in SAMPLERS.items() if s.stochastic)
DETERMINISTIC = sorted(n for n, s in SAMPLERS.items() if not s.stochastic)
KW = dict(width=16, height=16, steps=3, guidance_scale=2.0, negative_prompt="low quality")


@pytest.fixture(scope="module")
def pipe(pixel_checkpoint, toy_text_encoder):
    return HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_every_name_has_a_sampler_and_its_info():
    assert set(SAMPLERS) == set(SAMPLER_NAMES) == set(SAMPLER_INFO)
    assert {"dpmpp_2m", "unipc", "euler_a"} <= set(SAMPLERS) and STOCHASTIC
    assert [SAMPLER_INFO[n].a1111 for n in ("dpmpp_2m", "unipc", "euler_a")] == [
        "DPM++ 2M",
        "UniPC",
        "Euler a",
    ]
    assert model_evaluations("heun", 4) == 7 and model_evaluations("unipc", 4) == 4
    assert SAMPLERS["euler"].default_schedule == "uniform"  # the reference's schedule


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_schedules_run_from_one_to_zero_strictly_decreasing(schedule):
    for steps in (1, 2, 8, 24):
        ts = timesteps(steps, schedule=schedule)
        assert len(ts) == steps + 1 and ts[0] == 1 and ts[-1] == 0
        assert torch.all(ts[1:] < ts[:-1])
    with pytest.raises(ValueError, match="schedule"):
        timesteps(4, schedule="linear-ish")


def test_karras_and_sd3_move_steps_to_the_ends_uniform_is_the_reference():
    torch.testing.assert_close(timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    uni, karras, sd3 = (timesteps(8, schedule=s) for s in ("uniform", "karras", "sd3"))
    assert karras[1] > uni[1] and karras[-2] < uni[-2]  # denser at both ends (EDM's rho = 7)
    assert torch.all(sd3[1:-1] > uni[1:-1])  # every inner step at higher noise
    torch.testing.assert_close(sd3, timesteps(8, shift=3.0))


def test_tuned_schedule_is_its_knots_at_their_step_count_and_read_off_them_at_others():
    from hdm_core.samplers.schedules import TUNED_KNOTS, TUNED_STEPS

    knots = torch.tensor(TUNED_KNOTS)
    torch.testing.assert_close(timesteps(TUNED_STEPS, schedule="tuned"), knots)
    torch.testing.assert_close(timesteps(TUNED_STEPS // 2, schedule="tuned"), knots[::2])
    doubled = timesteps(2 * TUNED_STEPS, schedule="tuned")
    torch.testing.assert_close(doubled[::2], knots)
    torch.testing.assert_close(doubled[1::2], (knots[:-1] + knots[1:]) / 2)  # midpoints between the knots


def test_explicit_sigmas_replace_the_schedule_and_are_checked(pipe):
    job = [ImageJob("a red circle", seed=3)]
    kw = dict(width=16, height=16, guidance_scale=2.0, sampler="unipc", decode=False)
    ts = timesteps(5, schedule="karras").tolist()
    (a,) = pipe.generate_batch(job, steps=5, schedule="karras", **kw)
    (b,) = pipe.generate_batch(job, sigmas=ts, **kw)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    for bad in ([1.0, 0.5], [0.9, 0.5, 0.0], [1.0, 0.5, 0.6, 0.0], [1.0]):
        with pytest.raises(ValueError, match="sigmas"):
            pipe.generate_batch(job, sigmas=bad, **kw)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_ode_samplers_solve_a_straight_flow_exactly(name, schedule):
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    field = lambda x, t: (x - x0) / t.view(-1, 1, 1, 1).clamp_min(1e-6)  # noqa: E731  exact v for one point
    out = SAMPLERS[name](field, noise, timesteps(5, schedule=schedule))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def _gaussian_flow(s2: float):
    """The exact velocity of x_t = t·eps + (1 - t)·x0 with x0 ~ N(0, s2): E[eps - x0 | x_t], a curved path."""

    def field(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        return x * (t - (1 - t) * s2) / (t**2 + (1 - t) ** 2 * s2)

    return field


def test_multistep_solvers_are_higher_order_than_euler():
    s2 = 0.25
    field = _gaussian_flow(s2)
    x1 = torch.ones(1, 1)
    exact = math.sqrt(s2)  # the flow maps N(0, 1) onto N(0, s2): x_0 = x_1 · s
    err = {
        n: abs(SAMPLERS[n](field, x1, timesteps(8)).item() - exact) for n in ("euler", "dpmpp_2m", "unipc")
    }
    assert err["dpmpp_2m"] < err["euler"] / 3 and err["unipc"] < err["euler"] / 3, err


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_draw_from_each_rows_generator(name):
    field = _gaussian_flow(0.25)  # the result depends on the path, so on the noise added along it
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    run = lambda gens: SAMPLERS[name](field, noise, timesteps(4), generators=gens)  # noqa: E731
    a, b = run(_gens([1, 2])), run(_gens([1, 3]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # row 1 alone changed with its generator
    with pytest.raises(ValueError, match="generator"):
        SAMPLERS[name](field, noise, timesteps(4))


def _random_adapter(pipe: HDMPipeline, path):
    net = attach(pipe.model, AdapterConfig(algorithm="lora", rank=4, alpha=2.0))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    save_adapter(net, path, AdapterInfo("debug", "ab" * 32, 1, (), "x"))
    net.detach()
    return load_adapter(path)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("extra", ["plain", "tread", "adapter"])
def test_image_i_alone_equals_image_i_in_a_batch(pipe, name, extra, tmp_path):
    kw = dict(KW, sampler=name)
    if extra == "tread":
        kw["tread"] = TreadGuidance(cond_rate=0.0, uncond_rate=0.5)
    adapters = [(_random_adapter(pipe, tmp_path / "a.safetensors"), 1.0)] if extra == "adapter" else []
    plain = pipe.generate("a red circle", n=1, seed=102, **kw).latents if adapters else None
    with apply_adapters(pipe.model, adapters):
        batch = pipe.generate("a red circle", n=3, seed=100, **kw)
        alone = pipe.generate("a red circle", n=1, seed=102, **kw)
    torch.testing.assert_close(batch.latents[2:], alone.latents, atol=1e-5, rtol=1e-5)
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 1e-2  # seeds matter
    if plain is not None:
        assert (plain - alone.latents).abs().max() > 1e-3  # the adapter really changed the image


@pytest.mark.parametrize("name", ALL)
def test_a_cancelled_jobs_rows_leave_the_solvers_history_too(pipe, name):
    kw = dict(width=16, height=16, steps=4, guidance_scale=2.0, sampler=name)
    jobs = [
        ImageJob("a red circle", seed=1, n=2),
        ImageJob("a big square", seed=2),
        ImageJob("a blue square", seed=3),
    ]
    out = pipe.generate_batch(jobs, callback=lambda step, total, active: {1} if step == 2 else None, **kw)
    assert out[1] is None
    for j in (0, 2):  # the rows that stayed stepped as if the cancelled ones had never been there
        alone = pipe.generate(jobs[j].prompt, seed=jobs[j].seed, n=jobs[j].n, **kw)
        torch.testing.assert_close(out[j].latents, alone.latents, atol=1e-5, rtol=0)


def _init() -> Image.Image:
    y, x = np.mgrid[0:16, 0:16]
    return Image.fromarray(np.stack([20 + 200 * x / 16, 30 + 180 * y / 16, 120 + 0 * x], -1).astype(np.uint8))


@pytest.mark.parametrize("name", ALL)
def test_image_to_image_at_strength_zero_and_one(pipe, name):
    init = _init()
    kept = pipe.generate("a red circle", seed=4, sampler=name, edit=EditSpec(init, 0.0), **KW)
    assert np.abs(np.asarray(kept.images[0]).astype(int) - np.asarray(init).astype(int)).max() <= 1
    t2i = pipe.generate("a red circle", n=2, seed=11, sampler=name, **KW)
    i2i = pipe.generate("a red circle", n=2, seed=11, sampler=name, edit=EditSpec(init, 1.0), **KW)
    assert torch.equal(i2i.latents, t2i.latents)


def test_schedule_changes_the_image_and_none_is_the_samplers_default(pipe):
    base = pipe.generate("a red circle", seed=3, sampler="unipc", **KW).latents
    own = pipe.generate(
        "a red circle", seed=3, sampler="unipc", schedule=SAMPLER_INFO["unipc"].default_schedule, **KW
    )
    assert torch.equal(base, own.latents)
    other = next(s for s in SCHEDULE_NAMES if s != SAMPLER_INFO["unipc"].default_schedule)
    changed = pipe.generate("a red circle", seed=3, sampler="unipc", schedule=other, **KW).latents
    assert (changed - base).abs().max() > 1e-3


def test_parameters_text_names_samplers_and_schedules_as_a1111_does():
    req = {"prompt": "p", "steps": 8, "guidance_scale": 3.0, "width": 32, "height": 32}
    for name, a1111 in (
        ("dpmpp_2m", "DPM++ 2M"),
        ("unipc", "UniPC"),
        ("euler_a", "Euler a"),
        ("euler", "Euler"),
    ):
        text = parameters_text(
            {**req, "sampler": name, "schedule": "karras"}, seed=1, model_name="m", model_hash=None
        )
        assert f"Sampler: {a1111}," in text and "Schedule type: Karras," in text
    assert "Schedule type" not in parameters_text(
        {**req, "sampler": "euler"}, seed=1, model_name="m", model_hash=None
    )
