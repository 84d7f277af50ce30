from __future__ import annotations

import math

import pytest
import torch

from hdm_core.flow import flow_loss, interpolate, sample_t, velocity_target
from hdm_core.sampler import (
    SAMPLERS,
    Conditioning,
    SamplingCancelled,
    euler,
    guided_velocity,
    heun,
    timesteps,
)


def test_timesteps_uniform_and_shifted():
    torch.testing.assert_close(timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = timesteps(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0
    assert torch.all(shifted[1:-1] > timesteps(4)[1:-1])  # shift > 1 spends more steps at high noise
    with pytest.raises(ValueError):
        timesteps(0)


def _straight_field(x0):
    # The exact flow-matching velocity for a single data point x0: x_t = t*eps + (1-t)*x0 -> v = (x_t - x0)/t.
    return lambda x, t: (x - x0) / t.view(-1, *([1] * (x.ndim - 1))).clamp_min(1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_solve_a_straight_flow_exactly(name):
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    gens = [
        torch.Generator().manual_seed(i) for i in range(2)
    ]  # the stochastic ones' noise; exact all the same
    out = SAMPLERS[name](_straight_field(x0), noise, timesteps(5), generators=gens)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_heun_beats_euler_on_a_curved_field():
    # dx/dt = x  =>  x(0) = x(1) * e^-1
    field = lambda x, t: x  # noqa: E731
    x1 = torch.ones(1)
    exact = math.exp(-1)
    ts = timesteps(8)
    err_euler = abs(euler(field, x1, ts).item() - exact)
    err_heun = abs(heun(field, x1, ts).item() - exact)
    assert err_heun < err_euler / 5


def test_callback_every_step_and_cancellation():
    seen = []
    euler(lambda x, t: x, torch.ones(1), timesteps(6), callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(1, 7)]
    calls = []

    def field(x, t):
        calls.append(1)
        return x

    def cancel(i, n):
        if i == 2:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        heun(field, torch.ones(1), timesteps(10), callback=cancel)
    assert len(calls) == 4  # stopped right after the second step, not at the end


class _Recorder(torch.nn.Module):
    """A linear 'network' that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.batches = []

    def forward(self, x, t, ctx, *, pos_map=None, addon_info=None, tread_rate=None, route_generators=None):
        self.batches.append(x.shape[0])
        return x * self.w + ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_passes():
    m = _Recorder()
    x, t = torch.randn(2, 1, 2, 2), torch.rand(2)
    c = Conditioning(torch.ones(2, 3, 4))
    u = Conditioning(torch.zeros(2, 3, 4))
    u_short = Conditioning(torch.zeros(2, 1, 4))
    guided_velocity(m, c, u, 1.0)(x, t)
    assert m.batches == [2]  # scale 1: one conditional pass
    m.batches.clear()
    batched = guided_velocity(m, c, u, 3.0)(x, t)
    assert m.batches == [4]  # same shapes: one batched pass
    m.batches.clear()
    two = guided_velocity(m, c, u_short, 3.0)(x, t)
    assert m.batches == [2, 2]  # different lengths: two passes
    v_c, v_u = x * 0.5 + 1.0, x * 0.5
    torch.testing.assert_close(batched, v_u + 3.0 * (v_c - v_u))
    torch.testing.assert_close(two, batched)
    m.batches.clear()
    guided_velocity(m, c, Conditioning(torch.zeros(2, 3, 4), tread_rate=0.5), 3.0)(x, t)
    assert m.batches == [2, 2]  # routed uncond (TREAD autoguidance) cannot share the batch


def test_flow_objective_pieces():
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.full((3,), 0.25)
    torch.testing.assert_close(interpolate(x0, eps, t), 0.25 * eps + 0.75 * x0)
    torch.testing.assert_close(velocity_target(x0, eps), eps - x0)
    ts = sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert ts.min() > 0 and ts.max() < 1
    logits = torch.log(ts / (1 - ts))
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1) < 0.03  # logit-normal(0, 1)


def test_flow_loss_is_zero_for_the_true_velocity_and_mse_otherwise():
    x0 = torch.randn(2, 1, 2, 2)
    noise = torch.randn_like(x0)
    oracle = lambda x, t, ctx, **kw: noise - x0  # noqa: E731
    assert flow_loss(oracle, x0, None, noise=noise).item() == 0
    zero = lambda x, t, ctx, **kw: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(flow_loss(zero, x0, None, noise=noise), (noise - x0).square().mean())
    nan = lambda x, t, ctx, **kw: torch.full_like(x, float("nan"))  # noqa: E731
    with pytest.raises(FloatingPointError):
        flow_loss(nan, x0, None)
