"""The project's own one-step samplers: Euler (the reference's sampler, spec §8) and Heun."""

from __future__ import annotations

from torch import Tensor

from .stepper import Stepper, VelocityFn, batch_times


class EulerStepper(Stepper):
    """First-order: x <- x + (t_next - t) v. With uniform ts this is the reference's x - dt * v."""

    def _step(self, velocity: VelocityFn, x: Tensor, i: int) -> Tensor:
        t, t_next = self.ts[i], self.ts[i + 1]
        return x + (t_next - t).to(x.dtype) * velocity(x, batch_times(x, t)).to(x.dtype)


class HeunStepper(Stepper):
    """Second-order Heun (trapezoidal) steps; the step into t = 0 is Euler, as in k-diffusion."""

    def _step(self, velocity: VelocityFn, x: Tensor, i: int) -> Tensor:
        t, t_next = self.ts[i], self.ts[i + 1]
        dt = (t_next - t).to(x.dtype)
        v = velocity(x, batch_times(x, t)).to(x.dtype)
        x_euler = x + dt * v
        if float(t_next) <= 0:
            return x_euler
        v_next = velocity(x_euler, batch_times(x, t_next)).to(x.dtype)
        return x + dt * (v + v_next) / 2
