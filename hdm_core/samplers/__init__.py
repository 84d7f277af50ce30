"""The samplers' parts: the stepper interface (`stepper`), the time schedules (`schedules`), the project's own
Euler and Heun (`native`) and the diffusers multistep / stochastic solvers (`solvers`). The registry and the one
sampler signature are `hdm_core.sampler`."""
